"""A user's own X-rays listed in a CSV: ``path,label[,patient_id][,study_id][,<other>...]``
with ``--image-root`` the folder (or .zip) the paths are relative to (default: the CSV's
folder).

``label`` is mapped as class folders are (``labels``); ``patient_id`` makes a group (a
patient's images share a split, merged with the duplicate groups); ``study_id`` is recorded
in index.csv; ``--boxes`` reads fracture boxes (COCO JSON or YOLO files, ``boxes``). The
other columns are metadata (metadata.csv; the audit's baseline, ``model.meta_head``, a
``region`` column's subgroups): those ``--meta-columns`` names (``name[:kind]``, kind binary,
categorical or numeric, else inferred from the values), or without it every other column,
except those that restate the label: one named like a label (``metadata.LABEL_LIKE``:
fracture_visible, diagnosis, ...) or whose values read as labels and agree with ``label``
(dropped, and named in the manifest's ``label_columns``; named in ``--meta-columns``, an
error). A row whose file is missing, outside the image root, listed twice, or
whose label is not declared is quarantined with its row (line) number and the reason, like an
unreadable file; a CSV without the ``path`` and ``label`` columns is an error, and nothing is
written.
"""

from __future__ import annotations

import csv
from pathlib import Path

from tfrecords_builder.archive import SourceError
from tfrecords_builder.candidates import Candidate, Found
from tfrecords_builder.datasets import boxes, labels
from tfrecords_builder.datasets.registry import DatasetSpec, register_dataset
from tfrecords_builder.metadata import KINDS, LABEL_LIKE, MetaColumn
from tfrecords_builder.options import BuildOptions

REQUIRED = ("path", "label")
GROUP, STUDY = "patient_id", "study_id"


def read_rows(listing: Path, required=REQUIRED) -> tuple[list[str], list[tuple[int, dict]]]:
    """``(header, [(line, row)])`` of a UTF-8 CSV (header names stripped, lower-case); a
    missing required column is an error naming the file, its header and what is expected."""
    try:
        with listing.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [(h or "").strip().lower() for h in reader.fieldnames or []]
            reader.fieldnames = header
            rows = []
            for row in reader:
                rows.append((reader.line_num, {k: (v or "").strip() for k, v in row.items() if k}))
    except UnicodeDecodeError as err:
        raise SourceError(
            f"{str(listing)!r} is not UTF-8 text ({err}); save it as UTF-8 CSV. Nothing was "
            "written."
        ) from err
    except csv.Error as err:
        raise SourceError(f"{str(listing)!r} is not a readable CSV: {err}") from err
    missing = [c for c in required if c not in header]
    if missing:
        raise SourceError(
            f"{str(listing)!r} lacks the column(s) {missing}: its header is {header}; expected "
            f"{','.join(required)} (then optionally {GROUP}, {STUDY} and any metadata columns), "
            "e.g. the first line 'path,label,patient_id'. Nothing was written."
        )
    return header, rows


#: A metadata column whose values read as labels (``labels``) and agree with the label on at
#: least this share of the rows that fill it restates the label: it is dropped from the
#: metadata and named in the manifest's ``label_columns``.
RESTATES = 0.9


def restates_label(column: str, candidates: list[Candidate], mapping: dict[str, int]) -> bool:
    pairs = [
        (labels.label_of(c.extra[column], mapping), c.label)
        for c in candidates
        if c.extra.get(column)
    ]
    if not pairs or len({label for _, label in pairs}) < 2:
        return False
    return sum(value == label for value, label in pairs) >= RESTATES * len(pairs)


def meta_columns(listing: Path, header: list[str], asked: tuple[str, ...]) -> dict[str, str]:
    """``{column: kind}`` of ``--meta-columns`` (``name[:kind]``; "auto": inferred), each
    checked against the header; a label-like name is refused. Without it: every extra column
    that is not label-like by name."""
    extra = [c for c in header if c not in (*REQUIRED, GROUP, STUDY) and c]
    if not asked:
        return {c: "auto" for c in extra if c not in LABEL_LIKE}
    chosen = {}
    for item in asked:
        name, _, kind = item.strip().lower().partition(":")
        name, kind = name.strip(), kind.strip() or "auto"
        if name not in extra:
            raise SourceError(
                f"--meta-columns names {name!r}, which {str(listing)!r} has not as a metadata "
                f"column; its other columns are {extra}. Name those (e.g. --meta-columns "
                f"{','.join(extra[:2]) or 'site'})."
            )
        if name in LABEL_LIKE:
            raise SourceError(
                f"--meta-columns names {name!r}, a column that restates the label: it is never "
                "metadata (a model would be told the answer). Leave it out of --meta-columns."
            )
        if kind not in (*KINDS, "auto"):
            raise SourceError(
                f"--meta-columns {item!r}: unknown kind {kind!r}; expected name or name:kind "
                f"with kind one of {KINDS}."
            )
        chosen[name] = kind
    return chosen


def find(root: Path, opts: BuildOptions, listing: Path) -> Found:
    mapping = labels.label_map(opts.fractured_labels, opts.normal_labels)
    header, rows = read_rows(listing)
    kinds = meta_columns(listing, header, tuple(opts.meta_columns))
    extra_columns = list(kinds)
    by_name = [c for c in header if c in LABEL_LIKE and c not in (*REQUIRED, GROUP, STUDY) and c]
    resolved_root = root.resolve()
    candidates, rejected, first_row = [], [], {}
    undeclared: dict[str, int] = {}

    def reject(line: int, file: str, label: int, reason: str) -> None:
        rejected.append({"file": file, "label": label, "reason": reason, "row": line})

    for line, row in rows:
        text, value = row.get("path", "").replace("\\", "/"), row.get("label", "")
        label = labels.label_of(value, mapping) if value else None
        shown = -1 if label is None else label
        if not text:
            reject(line, f"(row {line})", shown, f"row {line}: empty path")
            continue
        if label is None:
            undeclared[value] = undeclared.get(value, 0) + 1
            reject(
                line,
                text,
                -1,
                f"label not declared: row {line} has label {value!r}; {labels.HINT}",
            )
            continue
        path = root / text
        try:
            rel = path.resolve().relative_to(resolved_root).as_posix()
        except ValueError:
            reject(line, text, label, f"outside the image root: row {line} path {text!r}")
            continue
        if rel in first_row:
            reject(line, text, label, f"listed twice: row {line} repeats row {first_row[rel]}")
            continue
        first_row[rel] = line
        if not (path.is_file() or path.is_symlink()):
            reject(line, text, label, f"missing file: row {line}: no file {text!r} in {root}")
            continue
        candidates.append(
            Candidate(
                path,
                rel,
                rel,
                label,
                patient=row.get(GROUP) or None,
                study=row.get(STUDY) or None,
                extra={c: row.get(c, "") for c in extra_columns},
                row=line,
            )
        )
    box_notes = boxes.attach(candidates, Path(opts.boxes)) if opts.boxes else {}
    restating = [c for c in extra_columns if restates_label(c, candidates, mapping)]
    if restating and opts.meta_columns:
        raise SourceError(
            f"--meta-columns names {restating}, whose values in {str(listing)!r} agree with "
            f"the label on at least {RESTATES:.0%} of the rows: they restate the label and are "
            "never metadata. Leave them out of --meta-columns."
        )
    for cand in candidates:
        for column in restating:
            cand.extra.pop(column, None)
    kept = [c for c in extra_columns if c not in restating]
    notes = {
        "listing": listing.name,
        "rows": len(rows),
        "metadata_columns": kept,
        "label_columns": [*by_name, *restating],
        "undeclared_labels": undeclared,
        "images_with_boxes": sum(1 for c in candidates if c.boxes),
        "boxes": sum(len(c.boxes) for c in candidates),
        **box_notes,
    }
    declared = tuple(MetaColumn(c, kinds[c], target=True) for c in kept)
    return Found(root, candidates, notes, rejected, metadata=declared)


SPEC = register_dataset(
    DatasetSpec(
        name="csv",
        find=find,
        tfds_name="kerasfrac_csv",
        description=(
            "A user's X-rays listed in a CSV (path,label[,patient_id][,study_id][,metadata]): "
            "patients share a split; other columns are kept in metadata.csv; boxes from --boxes "
            "(COCO JSON or YOLO files)."
        ),
        license="the user's own",
        listing="csv",
        takes_options=True,
        learnable_meta=True,
        region_column="region",
        has_boxes=True,
        boxes_option=True,
    )
)
