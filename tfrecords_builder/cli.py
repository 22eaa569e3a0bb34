"""`kerasfrac build ...` / `python -m tfrecords_builder ...`: the builder's command line."""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = """Turn a dataset, as its users download it (extracted folder or original .zip),
into a tensorflow-datasets dataset (TFRecord shards, dataset_info.json; readable with
tfds.builder_from_directory) with leakage-safe stratified splits and a manifest.json.
Every image is decoded once: bad files are quarantined with a reason, never written;
byte-identical copies share a split (or are dropped with --drop-duplicates), and so do
near-duplicates (perceptual hash, one aspect); near-duplicates that a pixel-level check calls
the same image but that carry different labels are quarantined, like byte-identical conflicts."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from tfrecords_builder import datasets
    from tfrecords_builder.defaults import DEFAULT_MAX_PIXELS, DEFAULT_NEAR_DISTANCE

    parser.add_argument("dataset", choices=datasets.names(), help="which source layout to read")
    parser.add_argument(
        "--source",
        help="dataset folder or .zip; for 'synthetic': where to write the generated raw images "
        "(default: a temporary folder, deleted afterwards)",
    )
    parser.add_argument("--out", required=True, help="output TFRecord directory")
    parser.add_argument("--seed", type=int, default=42, help="split seed (default 42)")
    parser.add_argument("--split", default="0.7,0.15,0.15", help="train,val,test fractions")
    parser.add_argument("--shards", type=int, default=8, help="shards per split (default 8)")
    parser.add_argument(
        "--drop-duplicates", action="store_true", help="keep one file of each byte-identical group"
    )
    parser.add_argument(
        "--recover-truncated",
        action="store_true",
        help="keep truncated JPEGs, decoded with recovery, as lossless PNG",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument(
        "--near-duplicate-distance",
        type=int,
        default=DEFAULT_NEAR_DISTANCE,
        help="max perceptual-hash Hamming distance of near-duplicates "
        f"(default {DEFAULT_NEAR_DISTANCE}; -1 disables)",
    )
    parser.add_argument(
        "--group-near-duplicates",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep near-duplicates in one split whatever their labels, and quarantine those the "
        "pixel check calls one image with two labels (default); --no-group-near-duplicates only "
        "reports them (they may then straddle splits)",
    )
    parser.add_argument(
        "--groups",
        metavar="FILE",
        help="CSV with columns file (or image_id) and group, e.g. patient ids: images of one "
        "group share a split (merged with the duplicate groups)",
    )
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="quarantine larger images (decompression bombs)",
    )
    parser.add_argument("--workers", type=int, default=None, help="validation threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    synth = parser.add_argument_group("synthetic source")
    synth.add_argument("--count", type=int, default=400, help="images to generate")
    synth.add_argument("--fractured-fraction", type=float, default=0.3)
    synth.add_argument("--image-size", type=int, default=128)
    synth.add_argument(
        "--marker",
        action="store_true",
        help="burn a class-correlated L/R letter into a corner (a planted shortcut)",
    )
    synth.add_argument("--marker-correlation", type=float, default=0.95)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from tfrecords_builder.build import BuildOptions, build
    from tfrecords_builder.splits import parse_ratios

    opts = BuildOptions(
        seed=args.seed,
        split=parse_ratios(args.split),
        shards=args.shards,
        drop_duplicates=args.drop_duplicates,
        recover_truncated=args.recover_truncated,
        overwrite=args.overwrite,
        near_duplicate_distance=args.near_duplicate_distance,
        group_near_duplicates=args.group_near_duplicates,
        groups_file=args.groups,
        max_pixels=args.max_pixels,
        workers=args.workers,
        progress=not args.no_progress,
    )
    if args.dataset == "synthetic":
        from tfrecords_builder.datasets import synthetic

        with tempfile.TemporaryDirectory(prefix="kerasfrac-synthetic-") as tmp:
            raw = Path(args.source) if args.source else Path(tmp) / "raw"
            synthetic.generate(
                raw,
                count=args.count,
                fractured_fraction=args.fractured_fraction,
                image_size=args.image_size,
                seed=args.seed,
                marker=args.marker,
                marker_correlation=args.marker_correlation,
            )
            manifest = build(args.dataset, raw, args.out, opts)
    else:
        if not args.source:
            raise ValueError(f"--source is required for {args.dataset}: its folder or .zip")
        manifest = build(args.dataset, args.source, args.out, opts)
    print(summary(manifest, args.out))
    return 0


def summary(m: dict, out) -> str:
    from pathlib import Path

    from tfrecords_builder.schema import MANIFEST

    lines = [f"built {m['source']} into {out} in {m['build_seconds']} s"]
    lines.append(
        f"  found {m['found']['total']} files ({m['found']['fractured']} fractured, "
        f"{m['found']['normal']} normal)"
    )
    lines.append(
        f"  written {m['written']['total']}, quarantined {m['quarantined_count']['total']}"
        f" {m['quarantine_reasons'] or ''}, dropped duplicates "
        f"{len(m['dropped_duplicates'])}"
    )
    d = m["duplicate_summary"]
    lines.append(
        f"  byte-identical groups {d['groups']} holding {d['files_in_groups']} files "
        f"({100 * d['share_of_valid_files_in_groups']:.1f}% of valid files)"
    )
    lines.append(
        f"  near-duplicate pairs {m['near_duplicate_pairs']}, across splits "
        f"{len(m['near_duplicates_across_splits'])}; label disagreements csv/folder "
        f"{len(m['label_disagreements'])}"
    )
    n = m.get("near_duplicates")
    if n:
        lines.append(
            f"  near-duplicates ({'grouped' if n['grouped'] else 'NOT grouped'}, distance "
            f"<= {n['distance']}): {n['pairs']} pairs of one aspect, {n['same_image_pairs']} the "
            f"same image by the pixel check; {n['groups_merged']} groups merged "
            f"({n['images_in_merged_groups']} images); label conflicts quarantined "
            f"{n['conflicts_quarantined']} images ({len(n['conflict_pairs'])} pairs)"
        )
    if m.get("user_groups"):
        u = m["user_groups"]
        lines.append(
            f"  --groups {u['file']}: {u['rows']} rows, {u['groups']} groups, "
            f"{u['images_matched']} images matched"
        )
    for split, c in m["splits"].items():
        lines.append(
            f"  {split:5s} fractured {c['fractured']:5d}  normal {c['normal']:5d}  "
            f"shards {len(m['shards'][split])}"
        )
    if m["quarantined"]:
        lines.append(f"  quarantined files ({len(m['quarantined'])}), not written:")
        lines += [f"    {q['file']}: {q['reason']}" for q in m["quarantined"]]
    lines.append(f"  manifest (counts, splits, every quarantined file): {Path(out) / MANIFEST}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tfrecords_builder", description=DESCRIPTION)
    add_arguments(parser)
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show TensorFlow's own log lines"
    )
    args = parser.parse_args(argv)
    from tfrecords_builder.quiet import quiet_tensorflow

    quiet_tensorflow(args.verbose, filter_stderr=argv is None)  # argv None: the command
    try:
        return args.func(args)
    except (ValueError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
