"""The builder's flow: find -> validate -> group duplicates -> split -> write shards + manifest.

``prepare_into`` is the one writing path: ``tfrecords_builder.build.build`` (``kerasfrac build``)
and the TFDS builders (``tfrecords_builder.tfds_builders``) both write through it."""

from __future__ import annotations

import csv
import dataclasses
import datetime
import hashlib
import os
import platform
import shutil
import sys
import tempfile
import time
import zipfile
from collections import Counter
from pathlib import Path

import tensorflow as tf

from tfrecords_builder import datasets, duplicates, metadata, schema, splits, validation, writer
from tfrecords_builder.archive import SourceError, open_source
from tfrecords_builder.candidates import Candidate
from tfrecords_builder.defaults import (
    ASPECT_TOLERANCE,
    PIXEL_AGREEMENT,
    PIXEL_CHECK_SIZE,
    PIXEL_TOLERANCE,
    SPLITS,
)
from tfrecords_builder.options import BuildOptions


def _by_label(items, label_of) -> dict[str, int]:
    counts = Counter(label_of(x) for x in items)
    return {"fractured": counts.get(1, 0), "normal": counts.get(0, 0), "total": len(items)}


def _example(
    dataset: str, cand: Candidate, chk: validation.Checked, group: str, with_meta: bool
) -> tf.train.Example:
    if chk.recovered is not None:
        encoded = chk.recovered
    elif chk.data is not None:
        encoded, chk.data = chk.data, None  # the bytes validation hashed; freed once written
    else:
        encoded = cand.path.read_bytes()
        if hashlib.sha256(encoded).hexdigest() != chk.sha256:
            raise SourceError(f"{str(cand.path)!r} changed while the build was running; rerun.")
    return schema.make_example(
        encoded=encoded,
        image_format=chk.image_format,
        height=chk.height,
        width=chk.width,
        channels=chk.channels,
        image_id=cand.image_id,
        source=dataset,
        sha256=chk.sha256,
        group=group,
        label=cand.label,
        boxes=cand.boxes,
        polygons=cand.polygons,
        meta=cand.meta,
        file=cand.rel,
        with_meta=with_meta,
    )


def prepare_into(
    stage: Path, dataset: str, source: Path, opts: BuildOptions, tfds_name: str, with_meta: bool
) -> tuple[dict, dict[str, writer.WrittenSplit]]:
    """The one writing path of ``kerasfrac build`` and the TFDS builders: find -> validate ->
    group -> split -> write the TFDS shards of ``tfds_name``, index.csv and manifest.json into
    ``stage``. Returns the manifest and what each split wrote."""
    started = time.perf_counter()
    source = Path(source)
    scratch = Path(tempfile.mkdtemp(prefix=".extract-", dir=stage))
    try:
        found = find(dataset, source, scratch, opts)
        manifest, written = _build_into(stage, dataset, found, opts, tfds_name, with_meta)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    manifest["source_path"] = str(source.resolve())
    manifest["build_seconds"] = round(time.perf_counter() - started, 3)
    writer.write_manifest(stage, manifest)
    return manifest, written


def find(dataset: str, source: Path, scratch: Path, opts: BuildOptions):
    """What ``dataset``'s spec finds in ``source`` (a folder or .zip, extracted into
    ``scratch``; for a listing layout the listing file, its images under ``--image-root``)."""
    spec = datasets.dataset(dataset)
    if spec.listing:
        if not source.is_file() or zipfile.is_zipfile(source):
            raise SourceError(
                f"{dataset}: --source {str(source)!r} is not a {spec.listing.upper()} file; "
                f"expected the {spec.listing.upper()} file that lists the images as --source, "
                "with --image-root the folder (or .zip) holding them."
            )
        root = open_source(opts.image_root or source.parent, scratch)
        return spec.find(root, opts, source)
    root = open_source(source, scratch)
    return spec.find(root, opts) if spec.takes_options else spec.find(root)


def _source_bytes(paths: list[Path]) -> int:
    total = 0
    for p in paths:
        try:
            total += p.stat().st_size
        except OSError:
            pass  # validation reports it, with the reason
    return total


def _utf8_name(cand: Candidate) -> bool:
    """Whether the file's name can go into the manifest, index.csv and TFRecords (UTF-8)."""
    try:
        cand.rel.encode("utf-8")
        cand.image_id.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _unread_reason(cand: Candidate, root: Path) -> str | None:
    """Why a file is quarantined without being read: a name that is not UTF-8 (its bytes
    shown), a dangling symbolic link, a link to a folder, a link out of the source."""
    if not _utf8_name(cand):
        raw = os.fsencode(cand.rel)
        return f"file name is not valid UTF-8: {raw!r}; rename the file to include it"
    path = cand.path
    if not path.is_symlink():
        return None
    target = os.readlink(path)
    if not path.exists():
        return f"dangling symbolic link (to {target!r})"
    if path.is_dir():
        return f"symbolic link to a folder ({target!r}): not followed; link or copy the files"
    if root.resolve() not in path.resolve().parents:
        return f"symbolic link to {str(path.resolve())!r}, outside the source: not read"
    return None


def _build_into(
    stage: Path, dataset: str, found, opts: BuildOptions, tfds_name: str, with_meta: bool
) -> tuple[dict, dict[str, writer.WrittenSplit]]:
    """Validate, group duplicates, split and write ``found`` into ``stage`` (TFDS shards named
    for ``tfds_name``); ``(the manifest, what was written per split)``."""
    cands, checks, quarantined, good = _validate(found, opts)
    duplicate_groups, dropped, keep = _exact_duplicates(good, cands, checks, opts, quarantined)
    g = _group(keep, cands, checks, opts, quarantined)
    keep, pairs = g.keep, g.pairs
    split_file = _read_split_file(opts.split_file, cands, keep) if opts.split_file else None
    if split_file is not None:  # the published split, image by image; groups are not moved
        given_split, given = split_file.pop("split_of"), None
        split_of = {i: given_split[i] for i in keep}
        split_file.update(_straddling(g, cands, split_of))
    else:
        split_of_group, given = _assign(g, cands, opts)
        split_of = {i: split_of_group[g.group_of[i]] for i in keep}
    if given is not None:
        given["images_moved"] = sorted(
            cands[i].rel for i in keep if cands[i].split and cands[i].split != split_of[i]
        )
    near_across = _near_across(pairs, g.reps, split_of, cands)
    meta_block = _metadata_block(dataset, found, keep, cands, with_meta)  # before any shard
    for d in duplicate_groups:
        if not d["conflict"]:
            first = next((i for i in keep if cands[i].rel in d["files"]), None)
            d["split"] = split_of[first] if first is not None else None  # None: quarantined
    wrote, split_counts = _write_splits(
        stage, dataset, keep, cands, checks, split_of, g.group_of, opts, tfds_name, with_meta
    )
    found_counts, written, q_counts, accounting = _accounting(
        found, keep, cands, quarantined, dropped
    )
    _write_metadata(stage, keep, cands)
    files_in_groups = sum(len(d["files"]) for d in duplicate_groups)
    reasons = Counter(q["reason"].split(":")[0] for q in quarantined)
    manifest = {
        "format_version": schema.FORMAT_VERSION,
        "source": dataset,
        "tfds_name": tfds_name,
        "root": found.root.name,
        "seed": opts.seed,
        "split_ratios": dict(zip(schema.SPLITS, opts.split)),
        "options": {
            k: v
            for k, v in dataclasses.asdict(opts).items()
            if k
            not in ("progress", "workers", "overwrite", "hold_bytes", "groups_file", "split_file")
        },
        "found": found_counts,
        "written": written,
        "quarantined_count": q_counts,
        "quarantine_reasons": dict(sorted(reasons.items())),
        "quarantined": sorted(quarantined, key=lambda q: q["file"]),
        "recovered_truncated": sorted(
            cands[i].rel for i in keep if checks[i].recovered and checks[i].truncated
        ),
        "converted_to_8_bits": dict(
            sorted(Counter(checks[i].converted for i in keep if checks[i].converted).items())
        ),
        "dropped_duplicates": dropped,
        "duplicate_summary": {
            "groups": len(duplicate_groups),
            "files_in_groups": files_in_groups,
            "share_of_valid_files_in_groups": round(files_in_groups / max(1, len(good)), 4),
            "redundant_copies": files_in_groups - len(duplicate_groups),
        },
        "duplicate_groups": duplicate_groups,
        "near_duplicate_distance": opts.near_duplicate_distance,
        "near_duplicate_pairs": len(pairs),
        "near_duplicates": _near_summary(g, cands, checks, opts, quarantined),
        "near_duplicates_across_splits": near_across,
        "user_groups": _user_summary(g),
        "patients": _patients(keep, cands, split_of),
        "studies": _studies(keep, cands, split_of),
        "given_splits": given,
        "split_file": split_file,
        "metadata_columns": sorted({k for i in keep for k in cands[i].extra}),
        "metadata": meta_block,
        "label_columns": [
            *datasets.dataset(dataset).label_columns,
            *found.notes.get("label_columns", []),
        ],
        "label_disagreements": found.notes.get("label_disagreements", []),
        "notes": {k: v for k, v in found.notes.items() if k != "label_disagreements"},
        "splits": split_counts,
        "shards": {split: w.names for split, w in wrote.items()},
        # checked when a build is loaded (record counts) and by `kerasfrac audit --verify`
        "shard_records": {split: w.lengths for split, w in wrote.items()},
        "shard_sha256": {split: w.sha256 for split, w in wrote.items()},
        "accounting": accounting,
        "index": "index.csv",
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": {
            "python": platform.python_version(),
            "tensorflow": tf.__version__,
            "tensorflow_datasets": _tfds_version(),
            "argv": sys.argv[1:],
        },
    }
    return manifest, wrote


def _assign(g: _Grouping, cands, opts: BuildOptions) -> tuple[dict[str, str], dict | None]:
    """``(split of each group, what the layout gave)``. Groups holding an image whose split
    the layout fixes (MURA's official valid -> test) go to that split (a group given several
    goes to the last of train, val, test); the other groups are split by ``opts.split`` over
    the splits no image was given, stratified and group-aware (``splits.assign``)."""
    given_of = {}
    for group, members in g.members_of.items():
        given = {cands[i].split for i in members if cands[i].split}
        if given:
            given_of[group] = max(given, key=SPLITS.index)
    if not given_of:
        return splits.assign(g.groups, opts.split, opts.seed), None
    taken = set(given_of.values())
    ratios = tuple(0.0 if s in taken else r for s, r in zip(SPLITS, opts.split))
    if sum(ratios) == 0:
        ratios = opts.split
    ratios = tuple(r / sum(ratios) for r in ratios)
    free = {k: v for k, v in g.groups.items() if k not in given_of}
    out = {**splits.assign(free, ratios, opts.seed), **given_of}
    counts = Counter(given_of.values())
    return out, {
        "groups_given": dict(sorted(counts.items())),
        "ratios_for_the_others": dict(zip(SPLITS, (round(r, 6) for r in ratios))),
    }


def _read_listing(path, option: str, column: str, cands, hint: str = ""):
    """A CSV naming images of the source (``--groups``, ``--split-file``): ``column`` and a
    ``file`` (path under the dataset root, or file name) or ``image_id`` column. Returns
    ``(path, key, rows, by_name)``: the key column used, the rows (cells stripped) and
    name -> candidate indices."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(
            f"{option} {str(path)!r}: no such file; expected a CSV of file,{column}"
            + (f" {hint}" if hint else "")
        )
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        key = next((k for k in ("file", "image_id") if k in header), None)
        if column not in header or key is None:
            raise ValueError(
                f"{option} {str(path)!r} has columns {header}; expected a {column!r} column "
                "and a 'file' (path under the dataset root, e.g. images/Fractured/"
                f"IMG0000019.jpg, or file name) or 'image_id' column, e.g. the header "
                f"'file,{column}'"
            )
        rows = [{k.strip(): (v or "").strip() for k, v in r.items() if k} for r in reader]
    by_name: dict[str, list[int]] = {}
    for i, c in enumerate(cands):
        for name in {c.image_id} if key == "image_id" else {c.rel, c.path.name}:
            by_name.setdefault(name, []).append(i)
    return path, key, rows, by_name


SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def _read_split_file(path, cands, keep) -> dict:
    """``--split-file FILE``: a CSV with a ``split`` column and a ``file`` (path under the
    dataset root, or file name) or ``image_id`` column. Every written image must be listed;
    returns ``{"file", "rows", "split_of": {candidate index: split}}``."""
    path, key, rows, by_name = _read_listing(
        path, "--split-file", "split", cands, "(split one of train, val, test)"
    )
    split_of: dict[int, str] = {}
    unknown = []
    for line, row in enumerate(rows, start=2):
        name, split = row.get(key, ""), SPLIT_NAMES.get(row.get("split", "").lower())
        if name not in by_name:
            unknown.append(name)
        if split is None:
            raise ValueError(
                f"--split-file {str(path)!r} line {line}: split {row.get('split')!r} for "
                f"{name!r}; expected train, val (or valid) or test"
            )
        for i in by_name.get(name, []):
            if split_of.setdefault(i, split) != split:
                raise ValueError(
                    f"--split-file {str(path)!r} line {line}: {name!r} is given two splits "
                    f"({split_of[i]!r} and {split!r})"
                )
    missing = [cands[i].rel for i in keep if i not in split_of]
    if missing:
        raise ValueError(
            f"--split-file {str(path)!r} gives no split for {len(missing)} image(s) of the "
            f"source, e.g. {missing[:3]}; a given split must list every image (its {key!r} "
            f"column matching e.g. {cands[keep[0]].rel!r}). Nothing was written."
        )
    return {
        "file": str(path),
        "rows": len(rows),
        "rows_naming_no_file_of_the_source": len(unknown),
        "examples_of_rows_naming_no_file": unknown[:10],
        "split_of": split_of,
    }


def _straddling(g: _Grouping, cands, split_of) -> dict:
    """Groups (byte-identical copies, near-duplicates, patients, studies, --groups) that a
    given split puts into more than one split: counted and listed, not moved."""
    across = []
    for members in g.members_of.values():
        splits_ = sorted({split_of[i] for i in members}, key=SPLITS.index)
        if len(splits_) > 1:
            across.append(
                {
                    "files": sorted(cands[i].rel for i in members),
                    "splits": splits_,
                    "patients": sorted({cands[i].patient for i in members if cands[i].patient}),
                }
            )
    return {
        "groups_across_splits": len(across),
        "images_in_groups_across_splits": sum(len(a["files"]) for a in across),
        "groups_across": sorted(across, key=lambda a: a["files"]),
    }


def _patients(keep, cands, split_of) -> dict | None:
    """The manifest's ``patients``: how many, and any that straddle splits (none, by
    construction: patients are groups)."""
    splits_of: dict[str, set[str]] = {}
    for i in keep:
        if cands[i].patient is not None:
            splits_of.setdefault(cands[i].patient, set()).add(split_of[i])
    if not splits_of:
        return None
    across = sorted(p for p, s in splits_of.items() if len(s) > 1)
    return {"count": len(splits_of), "across_splits": across}


def _studies(keep, cands, split_of) -> dict | None:
    """The manifest's ``studies`` (index.csv names each image's): how many, per split, how
    many hold a fractured image or images of both labels, and any that straddle splits (none,
    by construction: a study's images are grouped)."""
    labels: dict[str, set[int]] = {}
    splits_of: dict[str, set[str]] = {}
    for i in keep:
        if cands[i].study is not None:
            labels.setdefault(cands[i].study, set()).add(cands[i].label)
            splits_of.setdefault(cands[i].study, set()).add(split_of[i])
    if not labels:
        return None
    by_split = Counter(s for splits_ in splits_of.values() for s in splits_)
    return {
        "count": len(labels),
        "by_split": {s: by_split.get(s, 0) for s in SPLITS},
        "fractured": sum(1 for v in labels.values() if 1 in v),
        "mixed_labels": sum(1 for v in labels.values() if len(v) > 1),
        "across_splits": sorted(k for k, v in splits_of.items() if len(v) > 1),
    }


def _metadata_block(dataset: str, found, keep, cands, with_meta: bool) -> dict | None:
    """The manifest's ``metadata`` block (``tfrecords_builder.metadata``): FracAtlas' record
    flags where the records carry them, else the spec's (or the source's) metadata columns
    with their kinds and values, every value checked (a ``SourceError`` naming the column and
    the fix; nothing is written); None where the layout has none."""
    spec = datasets.dataset(dataset)
    if with_meta:
        return metadata.records_block()
    columns = found.metadata if found.metadata is not None else spec.metadata
    if not columns:
        return None
    values = {c.name: [cands[i].extra.get(c.name, "") for i in keep] for c in columns}
    where = f"{dataset}: the metadata of {found.notes.get('listing') or str(found.root)!r}"
    try:
        return metadata.describe(
            columns,
            values,
            (*spec.label_columns, *found.notes.get("label_columns", [])),
            spec.region_column,
            where,
        )
    except metadata.MetadataError as err:
        raise SourceError(f"{err} Nothing was written.") from None


def _write_metadata(stage: Path, keep, cands) -> None:
    """metadata.csv: the layout's descriptive columns (region, projection, ...) per written
    image, where it has any; columns that restate the label are never among them."""
    columns = sorted({k for i in keep for k in cands[i].extra})
    if not columns:
        return
    with (stage / "metadata.csv").open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["image_id", "file", *columns])
        for i in keep:
            out.writerow(
                [cands[i].image_id, cands[i].rel, *(cands[i].extra.get(c, "") for c in columns)]
            )


def _tfds_version() -> str:
    import tensorflow_datasets as tfds

    return tfds.__version__


def _entry(cand: Candidate, reason: str) -> dict:
    """A quarantine entry: file, label, reason, and the listing's row where there is one."""
    entry = {"file": cand.rel, "label": cand.label, "reason": reason}
    if cand.row is not None:
        entry["row"] = cand.row
    return entry


def _validate(found, opts: BuildOptions):
    """``(candidates, their checks, quarantined, indices of the valid ones)``: files that
    cannot be read as named (not UTF-8, dangling links, links out of the source) and files
    that fail validation are quarantined with their reason."""
    # Quarantined unread: names that are not UTF-8, dangling links, links out of the source.
    unread = [(c, _unread_reason(c, found.root)) for c in found.candidates]
    bad_names = [
        {
            **_entry(c, reason),
            "file": os.fsencode(c.rel).decode("utf-8", "backslashreplace"),
        }
        for c, reason in unread
        if reason
    ]
    cands = [c for c, reason in unread if not reason]
    paths = [c.path for c in cands]
    checks = validation.check_all(
        paths,
        opts.recover_truncated,
        opts.max_pixels,
        opts.workers,
        opts.progress,
        # The validated bytes go on to the writer when they fit the budget (FracAtlas: ~0.2
        # GB); above it each file is read again and its sha256 checked against validation's.
        keep_bytes=_source_bytes(paths) <= opts.hold_bytes,
    )
    quarantined = (
        list(found.rejected)
        + bad_names
        + [_entry(c, k.reason) for c, k in zip(cands, checks) if k.reason]
    )
    good = [i for i, k in enumerate(checks) if not k.reason]
    return cands, checks, quarantined, good


def _exact_duplicates(good, cands, checks, opts: BuildOptions, quarantined: list):
    """``(duplicate groups, dropped copies, kept indices)``: one group per sha256; copies of
    different labels are quarantined as conflicts (appended to ``quarantined``)."""
    by_hash: dict[str, list[int]] = {}
    for i in good:
        by_hash.setdefault(checks[i].sha256, []).append(i)
    duplicate_groups, dropped, keep = [], [], []
    for sha, members in sorted(by_hash.items()):
        members.sort(key=lambda i: cands[i].rel)
        labels = {cands[i].label for i in members}
        files = [cands[i].rel for i in members]
        if len(labels) > 1:
            for i in members:
                quarantined.append(
                    _entry(
                        cands[i],
                        f"conflict: byte-identical copies carry different labels ({files})",
                    )
                )
            duplicate_groups.append(
                {"sha256": sha, "files": files, "label": None, "conflict": True}
            )
            continue
        if len(members) > 1:
            duplicate_groups.append(
                {"sha256": sha, "files": files, "label": labels.pop(), "conflict": False}
            )
        if opts.drop_duplicates:
            keep.append(members[0])
            dropped += [
                {
                    "file": cands[i].rel,
                    "label": cands[i].label,
                    "duplicate_of": cands[members[0]].rel,
                }
                for i in members[1:]
            ]
        else:
            keep.extend(members)
    keep.sort(key=lambda i: cands[i].rel)
    return duplicate_groups, dropped, keep


@dataclasses.dataclass
class _Grouping:
    """What near-duplicate and user grouping decided (see ``_group``)."""

    keep: list[int]
    reps: list[int]
    pairs: list[dict]
    other_aspect: int
    conflict_pairs: list[dict]
    conflict_reps: set[int]
    near_roots: list[int]
    user: dict | None
    group_of: dict[int, str]
    members_of: dict[str, list[int]]
    groups: dict[str, tuple[int, int]]


def _group(keep, cands, checks, opts: BuildOptions, quarantined: list) -> _Grouping:
    """Near-duplicates between distinct files (different sha256): perceptual hash within the
    distance, one aspect, then a pixel-level check of each pair (is it the same X-ray?);
    with ``group_near_duplicates`` same-image pairs of different labels are quarantined and
    the others grouped; a user's groups (``--groups``) join whatever they link. Each group
    is stratified by its majority label."""
    reps = sorted({checks[i].sha256: i for i in keep}.values(), key=lambda i: cands[i].rel)
    pairs, other_aspect = _near_duplicate_pairs(reps, cands, checks, opts)
    conflict_pairs = [
        p
        for p in pairs
        if p["same_image"] and cands[reps[p["k"]]].label != cands[reps[p["m"]]].label
    ]
    conflict_reps: set[int] = set()
    if opts.group_near_duplicates:
        conflict_reps = {k for p in conflict_pairs for k in (p["k"], p["m"])}
        conflict_shas = {checks[reps[k]].sha256: k for k in conflict_reps}
        for i in keep:
            if checks[i].sha256 in conflict_shas:
                other = [
                    cands[reps[p["m"] if p["k"] == conflict_shas[checks[i].sha256] else p["k"]]].rel
                    for p in conflict_pairs
                    if conflict_shas[checks[i].sha256] in (p["k"], p["m"])
                ]
                quarantined.append(
                    _entry(
                        cands[i],
                        "conflict: near-duplicate (the same image re-encoded, pixel "
                        f"check) of {other} with a different label",
                    )
                )
        keep = [i for i in keep if checks[i].sha256 not in conflict_shas]
    linked = [
        (p["k"], p["m"], p["distance"])
        for p in pairs
        if opts.group_near_duplicates
        and p["k"] not in conflict_reps
        and p["m"] not in conflict_reps
    ]
    near_roots = duplicates.connected_components(len(reps), linked)
    user = _read_groups(opts.groups_file, cands) if opts.groups_file else None
    # The layout's patients and studies and a user's groups (--groups) join what they link.
    rep_of_sha = {checks[i].sha256: k for k, i in enumerate(reps)}
    first_of: dict[tuple[str, str], int] = {}
    for i in keep:
        k = rep_of_sha[checks[i].sha256]
        for kind in ("patient", "study"):  # a study's images stay together even without ids
            value = getattr(cands[i], kind)
            if value is not None:
                linked.append((first_of.setdefault((kind, value), k), k, -1))
        g = user["group_of"].get(i) if user is not None else None
        if g is not None:
            linked.append((first_of.setdefault(("user", g), k), k, -1))
    roots = duplicates.connected_components(len(reps), linked)
    group_of_hash = {checks[i].sha256: checks[reps[roots[k]]].sha256 for k, i in enumerate(reps)}
    group_of = {i: group_of_hash[checks[i].sha256] for i in keep}
    members_of: dict[str, list[int]] = {}
    for i in keep:
        members_of.setdefault(group_of[i], []).append(i)
    groups: dict[str, tuple[int, int]] = {}
    for g, members in members_of.items():
        n_fractured = sum(cands[i].label for i in members)
        # A group of mixed labels (similar images the pixel check calls distinct, or one
        # patient's images) is stratified by its majority label, ties as fractured.
        groups[g] = (int(2 * n_fractured >= len(members)), len(members))
    return _Grouping(
        keep,
        reps,
        pairs,
        other_aspect,
        conflict_pairs,
        conflict_reps,
        near_roots,
        user,
        group_of,
        members_of,
        groups,
    )


def _near_summary(g: _Grouping, cands, checks, opts: BuildOptions, quarantined) -> dict:
    """The manifest's ``near_duplicates`` section."""
    pairs, reps, keep = g.pairs, g.reps, g.keep
    kept_reps = {k for k, i in enumerate(reps) if k not in g.conflict_reps}
    merged = Counter(g.near_roots[k] for k in kept_reps)
    merged_roots = {r for r, n in merged.items() if n > 1}
    rep_root = {checks[i].sha256: g.near_roots[k] for k, i in enumerate(reps)}
    return {
        "grouped": opts.group_near_duplicates,
        "distance": opts.near_duplicate_distance,
        "pixel_check": {
            "size": PIXEL_CHECK_SIZE,
            "tolerance_grey_levels": PIXEL_TOLERANCE,
            "min_agreement": PIXEL_AGREEMENT,
        },
        "pairs": len(pairs),
        "pairs_left_out_for_aspect": g.other_aspect,
        "same_image_pairs": sum(p["same_image"] for p in pairs),
        "groups_merged": len(merged_roots),
        "images_in_merged_groups": sum(
            1 for i in keep if rep_root[checks[i].sha256] in merged_roots
        ),
        "mixed_label_groups": sum(
            1 for m in g.members_of.values() if len({cands[i].label for i in m}) > 1
        ),
        "conflicts_quarantined": sum(
            1 for q in quarantined if q["reason"].startswith("conflict: near-duplicate")
        ),
        "conflict_pairs": [
            {
                "a": cands[reps[p["k"]]].rel,
                "b": cands[reps[p["m"]]].rel,
                "labels": [cands[reps[p["k"]]].label, cands[reps[p["m"]]].label],
                "distance": p["distance"],
                "agreement": p["agreement"],
                "quarantined": opts.group_near_duplicates,
            }
            for p in g.conflict_pairs
        ],
        "pair_list": [
            {
                "a": cands[reps[p["k"]]].rel,
                "b": cands[reps[p["m"]]].rel,
                "labels": [cands[reps[p["k"]]].label, cands[reps[p["m"]]].label],
                "distance": p["distance"],
                "agreement": p["agreement"],
                "same_image": p["same_image"],
            }
            for p in pairs
        ],
    }


def _user_summary(g: _Grouping) -> dict | None:
    """The manifest's ``user_groups`` section (``--groups``), None without."""
    if g.user is None:
        return None
    summary = {k: v for k, v in g.user.items() if k != "group_of"}
    summary["groups_holding_several_images"] = sum(1 for m in g.members_of.values() if len(m) > 1)
    return summary


def _near_across(pairs, reps, split_of, cands) -> list[dict]:
    """Near-duplicate pairs that the split put into different splits."""
    near_across = []
    for p in pairs:
        a, b = reps[p["k"]], reps[p["m"]]
        if a not in split_of or b not in split_of:
            continue  # quarantined as a conflict
        if split_of[a] != split_of[b]:
            near_across.append(
                {
                    "a": cands[a].rel,
                    "b": cands[b].rel,
                    "distance": p["distance"],
                    "agreement": p["agreement"],
                    "splits": [split_of[a], split_of[b]],
                }
            )
    return near_across


def _write_splits(
    stage,
    dataset,
    keep,
    cands,
    checks,
    split_of,
    group_of,
    opts: BuildOptions,
    tfds_name,
    with_meta,
):
    """Shards of each split and index.csv; ``(what was written per split, counts per split
    and class)``."""
    wrote, split_counts = {}, {}
    for split in schema.SPLITS:
        members = [i for i in keep if split_of[i] == split]
        split_counts[split] = {
            k: v for k, v in _by_label(members, lambda i: cands[i].label).items() if k != "total"
        }
        examples = (_example(dataset, cands[i], checks[i], group_of[i], with_meta) for i in members)
        wrote[split] = writer.write_split(
            stage, split, examples, len(members), opts.shards, tfds_name
        )
    _write_index(stage, keep, cands, checks, split_of, group_of)
    return wrote, split_counts


def _accounting(found, keep, cands, quarantined, dropped):
    """``(found, written, quarantined counts, accounting)`` per class; every image found is
    written, quarantined or dropped as a duplicate, or the build stops."""
    found_counts = _by_label(
        [c.label for c in found.candidates] + [r["label"] for r in found.rejected], int
    )
    written = _by_label(keep, lambda i: cands[i].label)
    q_counts = _by_label(quarantined, lambda q: q["label"])
    d_counts = _by_label(dropped, lambda d: d["label"])
    accounting = {
        name: {
            "found": found_counts[name],
            "written": written[name],
            "quarantined": q_counts[name],
            "dropped_duplicates": d_counts[name],
            "balanced": found_counts[name] == written[name] + q_counts[name] + d_counts[name],
        }
        for name in ("fractured", "normal", "total")
    }
    if not all(a["balanced"] for a in accounting.values()):
        raise RuntimeError(f"internal error: images lost in the build: {accounting}")
    return found_counts, written, q_counts, accounting


def _near_duplicate_pairs(reps, cands, checks, opts: BuildOptions) -> tuple[list[dict], int]:
    """Pairs of distinct images (indices ``k < m`` into ``reps``) within the hash distance and of
    one aspect, each with its pixel agreement and whether that makes it the same image; plus
    how many hash pairs were left out for their aspect."""
    hash_pairs = duplicates.near_duplicate_pairs(
        [checks[i].phash for i in reps], opts.near_duplicate_distance
    )
    samples: dict[int, object] = {}

    def sample(k: int):
        if k not in samples:
            chk = checks[reps[k]]
            data = chk.recovered or chk.data or cands[reps[k]].path.read_bytes()
            samples[k] = validation.pixel_sample(data, PIXEL_CHECK_SIZE)
        return samples[k]

    pairs, other_aspect = [], 0
    for k, m, dist in hash_pairs:
        a, b = checks[reps[k]], checks[reps[m]]
        if not duplicates.same_aspect((a.height, a.width), (b.height, b.width), ASPECT_TOLERANCE):
            other_aspect += 1
            continue
        agreement = duplicates.pixel_agreement(sample(k), sample(m), PIXEL_TOLERANCE)
        pairs.append(
            {
                "k": k,
                "m": m,
                "distance": dist,
                "agreement": round(agreement, 4),
                "same_image": agreement >= PIXEL_AGREEMENT,
            }
        )
    return pairs, other_aspect


def _read_groups(path, cands) -> dict:
    """``--groups FILE``: a CSV with a ``group`` column and a ``file`` (path under the dataset
    root, or file name) or ``image_id`` column. Returns ``{"file", "rows", "groups",
    "images_matched", "group_of": {candidate index: group}}``; images it does not list keep
    their own groups."""
    path, key, rows, by_name = _read_listing(path, "--groups", "group", cands)
    group_of: dict[int, str] = {}
    unknown = []
    for line, row in enumerate(rows, start=2):
        name, group = row.get(key, ""), row.get("group", "")
        if not group:
            raise ValueError(f"--groups {str(path)!r} line {line}: empty group for {name!r}")
        if name not in by_name:
            unknown.append(name)
            continue
        for i in by_name[name]:
            if group_of.setdefault(i, group) != group:
                raise ValueError(
                    f"--groups {str(path)!r} line {line}: {name!r} is given two groups "
                    f"({group_of[i]!r} and {group!r}); an image belongs to one group"
                )
    if unknown:
        raise ValueError(
            f"--groups {str(path)!r} names {len(unknown)} image(s) the source does not hold, "
            f"e.g. {unknown[:3]}; its {key!r} column must match the dataset's "
            + ("image ids (file names)" if key == "image_id" else f"files (e.g. {cands[0].rel!r})")
        )
    return {
        "file": str(path),
        "rows": len(rows),
        "groups": len(set(group_of.values())),
        "images_matched": len(group_of),
        "group_of": group_of,
    }


def _write_index(stage, keep, cands, checks, split_of, group_of) -> None:
    """index.csv: one line per written image (split, label, id, file, sha256, group)."""
    with (stage / "index.csv").open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["split", "label", "image_id", "file", "sha256", "group", "patient", "study"])
        for i in keep:
            out.writerow(
                [
                    split_of[i],
                    cands[i].label,
                    cands[i].image_id,
                    cands[i].rel,
                    checks[i].sha256,
                    group_of[i],
                    cands[i].patient or "",
                    cands[i].study or "",
                ]
            )
