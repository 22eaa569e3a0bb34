"""`kerasfrac build ...` / `python -m tfrecords_builder ...`: the builder's command line."""

from __future__ import annotations

import argparse
import sys

from tfrecords_builder import clioptions

# Local imports: the builder's parser is built inside `kerasfrac --help`, before TensorFlow.

DESCRIPTION = """Turn a dataset, as its users download it (extracted folder or original .zip),
into a tensorflow-datasets dataset (TFRecord shards, dataset_info.json; readable with
tfds.builder_from_directory) with leakage-safe stratified splits and a manifest.json.
Every image is decoded once: bad files are quarantined with a reason, never written;
byte-identical copies share a split (or are dropped with --drop-duplicates), and so do
near-duplicates (perceptual hash, one aspect); near-duplicates that a pixel-level check calls
the same image but that carry different labels are quarantined, like byte-identical conflicts."""


def reasons(counts: dict | None) -> str:
    """`` (truncated JPEG: 6, ...)`` for a count per reason, or nothing."""
    if not counts:
        return ""
    return " (" + ", ".join(f"{k}: {v}" for k, v in counts.items()) + ")"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The build's options, derived from ``BuildOptions`` and ``SyntheticOptions`` (each
    default written once, there)."""
    from tfrecords_builder import datasets
    from tfrecords_builder.datasets.synthetic import SyntheticOptions
    from tfrecords_builder.options import BuildOptions

    parser.add_argument("dataset", choices=datasets.names(), help="which source layout to read")
    parser.add_argument(
        "--source",
        help="dataset folder or .zip; for 'synthetic': where to write the generated raw images "
        "(default: a temporary folder, deleted afterwards)",
    )
    parser.add_argument("--out", required=True, help="output TFRecord directory")
    clioptions.add_arguments(parser, BuildOptions)
    clioptions.add_arguments(parser.add_argument_group("synthetic source"), SyntheticOptions)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import tempfile
    from pathlib import Path

    from tfrecords_builder.build import build
    from tfrecords_builder.options import BuildOptions

    opts = clioptions.from_args(BuildOptions, args)
    if args.dataset == "synthetic":
        from tfrecords_builder.datasets import synthetic

        with tempfile.TemporaryDirectory(prefix="kerasfrac-synthetic-") as tmp:
            raw = Path(args.source) if args.source else Path(tmp) / "raw"
            phantoms = clioptions.from_args(synthetic.SyntheticOptions, args)
            synthetic.generate(raw, seed=opts.seed, **dataclasses.asdict(phantoms))
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
    f = m["found"]
    unlabelled = f["total"] - f["fractured"] - f["normal"]
    lines.append(
        f"  found {f['total']} files ({f['fractured']} fractured, {f['normal']} normal"
        + (f", {unlabelled} without a declared label" if unlabelled else "")
        + ")"
    )
    lines.append(
        f"  written {m['written']['total']}, quarantined {m['quarantined_count']['total']}"
        f"{reasons(m['quarantine_reasons'])}, dropped duplicates "
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
    if m.get("patients"):
        p = m["patients"]
        lines.append(f"  patients {p['count']} ({len(p['across_splits'])} across splits)")
    if m.get("studies"):
        st = m["studies"]
        lines.append(
            f"  studies {st['count']} ({st['by_split']}; {st['fractured']} with a fractured "
            f"image, {st['mixed_labels']} of mixed labels)"
        )
    if m.get("given_splits"):
        g = m["given_splits"]
        lines.append(
            f"  splits given by the layout: {g['groups_given']} groups; the others split "
            f"{g['ratios_for_the_others']}; images moved with their group: "
            f"{len(g['images_moved'])}"
        )
    if m.get("split_file"):
        sf = m["split_file"]
        lines.append(
            f"  --split-file {sf['file']}: the given split, image by image; "
            f"{sf['groups_across_splits']} groups ({sf['images_in_groups_across_splits']} "
            "images: copies, near-duplicates, patients) straddle splits, listed in the "
            "manifest's split_file.groups_across"
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
    lines.append(
        f"next: kerasfrac audit {out}  (data card, no-anatomy baseline); then train with "
        f"--set data.dir={out}"
    )
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
