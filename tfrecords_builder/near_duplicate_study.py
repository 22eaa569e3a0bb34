"""How far apart are true copies? The study behind DEFAULT_NEAR_DISTANCE and PIXEL_AGREEMENT.

    python -m tfrecords_builder.near_duplicate_study fracatlas --source FracAtlas/ --max-distance 12

Validates the source as a default build does (truncated JPEGs quarantined), keeps one file per
sha256, and for every pair of distinct images within ``--max-distance`` hash bits prints, per
distance: how many pairs, how many have another aspect (never paired), and how the pixel
agreement of the rest is distributed (the share of 128x128 grayscale pixels within 8 grey
levels: >= 0.9 is a copy). Pixel samples are decoded once per image, so the whole study is
about one more decode of the images involved.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from tfrecords_builder import datasets, duplicates, validation
from tfrecords_builder.defaults import (
    ASPECT_TOLERANCE,
    PIXEL_AGREEMENT,
    PIXEL_CHECK_SIZE,
    PIXEL_TOLERANCE,
)

BINS = (0.5, 0.8, 0.9, 0.95, 1.01)


def study(dataset: str, source: Path, max_distance: int) -> dict[int, dict]:
    """``{distance: {"pairs", "other_aspect", "agreement_bins": [counts per BINS band],
    "copies"}}`` over distinct images of ``source``."""

    found = datasets.dataset(dataset).find(Path(source))
    checks = validation.check_all([c.path for c in found.candidates], progress=False)
    reps = {}
    for c in checks:
        if not c.reason:
            reps.setdefault(c.sha256, c)
    reps = list(reps.values())
    pairs = duplicates.near_duplicate_pairs([c.phash for c in reps], max_distance)
    samples: dict[int, object] = {}

    def sample(k: int):
        if k not in samples:
            samples[k] = validation.pixel_sample(reps[k].path.read_bytes(), PIXEL_CHECK_SIZE)
        return samples[k]

    table: dict[int, dict] = {}
    for k, m, dist in pairs:
        row = table.setdefault(
            dist, {"pairs": 0, "other_aspect": 0, "agreement_bins": [0] * len(BINS), "copies": 0}
        )
        row["pairs"] += 1
        a, b = reps[k], reps[m]
        if not duplicates.same_aspect((a.height, a.width), (b.height, b.width), ASPECT_TOLERANCE):
            row["other_aspect"] += 1
            continue
        agreement = duplicates.pixel_agreement(sample(k), sample(m), PIXEL_TOLERANCE)
        row["agreement_bins"][next(i for i, hi in enumerate(BINS) if agreement < hi)] += 1
        row["copies"] += agreement >= PIXEL_AGREEMENT
    return dict(sorted(table.items()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tfrecords_builder.near_duplicate_study")
    p.add_argument("dataset", choices=datasets.names())
    p.add_argument("--source", required=True, help="dataset folder")
    p.add_argument("--max-distance", type=int, default=12)
    args = p.parse_args(argv)
    table = study(args.dataset, Path(args.source), args.max_distance)
    edges = ("0",) + tuple(f"{b:.2f}" for b in BINS[:-1])
    bands = [f"[{lo},{hi})" for lo, hi in zip(edges, edges[1:] + ("1]",))]
    print("| distance | pairs | other aspect | " + " | ".join(bands) + " | copies (>= 0.9) |")
    print("|--:|--:|--:|" + "--:|" * len(bands) + "--:|")
    total = Counter()
    for dist, row in table.items():
        print(
            f"| {dist} | {row['pairs']} | {row['other_aspect']} | "
            + " | ".join(str(n) for n in row["agreement_bins"])
            + f" | {row['copies']} |"
        )
        total["copies"] += row["copies"]
    print(f"copies within {args.max_distance} bits: {total['copies']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
