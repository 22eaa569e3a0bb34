"""A build's metadata columns: what a dataset spec declares, what the manifest records, and how
the later stages (``kerasfrac audit``'s no-anatomy baseline, ``model.meta_head``, evaluation's
subgroups) read them. TensorFlow-free.

A spec declares ``MetaColumn``s (name, kind, whether ``model.meta_head`` learns it); a CSV
build declares its extra columns itself (kind inferred from the values where not given). The
build checks every value, and the manifest's ``metadata`` block records the columns with their
kinds, the values of each categorical column, the encoded feature and target names, the region
column and where the values are stored:

* ``"storage": "records"`` (FracAtlas, synthetic): the records' ``meta/<column>`` int64
  flags (``defaults.META_COLUMNS``), read as before; a manifest without a ``metadata`` block
  (a build made before it existed) reads the same way;
* ``"storage": "metadata.csv"`` (MURA, GRAZPEDWRI-DX, a CSV): the build's metadata.csv (raw
  text per image), encoded here: a binary column is one 0/1 feature, a categorical one a 0/1
  feature per value (``column=value``), a numeric one its number; unknown (an empty cell) is
  -1 in the targets and NaN in the features.

Columns that restate the label (the spec's ``label_columns``, a CSV's by name or by value)
are never metadata: the build refuses to declare them.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path

import numpy as np

from tfrecords_builder.defaults import META_COLUMNS, META_TARGETS

KINDS = ("binary", "categorical", "numeric")
RECORDS, TABLE = "records", "metadata.csv"
#: A CSV column inferred as categorical with more distinct values than this is free text (an
#: id, a date, a comment): not metadata, listed in the manifest's ``metadata.skipped``.
MAX_CATEGORIES = 50
TRUE = ("1", "1.0", "true", "yes", "y", "t")
FALSE = ("0", "0.0", "false", "no", "n", "f")
#: Column names a CSV build never takes as metadata: they name the label or restate it.
LABEL_LIKE = (
    "label",
    "labels",
    "class",
    "target",
    "fracture",
    "fractured",
    "fracture_visible",
    "fracture_count",
    "ao_classification",
    "diagnosis",
    "abnormal",
    "abnormality",
    "positive",
    "study_label",
)


class MetadataError(ValueError):
    """A metadata column or value that is not what its declaration says."""


@dataclasses.dataclass(frozen=True)
class MetaColumn:
    #: the column's name in the source (lower case)
    name: str
    #: binary | categorical | numeric ("auto": a CSV column's kind, inferred from its values)
    kind: str = "auto"
    #: ``model.meta_head`` learns it (binary: the flag; categorical: one flag per value;
    #: numeric columns never are targets: the head's loss is a masked BCE)
    target: bool = False
    #: the value an empty cell stands for ("" = unknown); GRAZPEDWRI's flags: empty means 0
    empty: str = ""


def binary(value: str) -> int | None:
    """1, 0, or None (not a binary value); "" is the caller's business."""
    v = value.strip().lower()
    return 1 if v in TRUE else 0 if v in FALSE else None


def number(value: str) -> float | None:
    try:
        x = float(value)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def infer_kind(values: list[str]) -> str | None:
    """A CSV column's kind from its non-empty values; None: free text (not metadata)."""
    filled = [v for v in values if v != ""]
    if filled and all(binary(v) is not None for v in filled):
        return "binary"
    if filled and all(number(v) is not None for v in filled):
        return "numeric"
    if len(set(filled)) > MAX_CATEGORIES:
        return None
    return "categorical"


def describe(
    columns, values: dict[str, list[str]], label_columns=(), region: str = "", where: str = ""
) -> dict:
    """The manifest's ``metadata`` block (storage ``metadata.csv``) of ``columns``
    (``MetaColumn``s) with ``values`` (column -> the kept images' raw cells). Every value is
    checked against its column's kind: one that does not fit is a ``MetadataError`` naming the
    column, the value, ``where`` it came from and the fix. A column that restates the label is
    refused the same way."""
    out, skipped = [], []
    for col in columns:
        if col.name in label_columns:
            raise MetadataError(
                f"{where}: column {col.name!r} restates the label and is never metadata; "
                "drop it from the metadata columns."
            )
        cells = [v if v != "" else col.empty for v in values.get(col.name, [])]
        kind = infer_kind(cells) if col.kind == "auto" else col.kind
        if kind is None:
            skipped.append({"column": col.name, "reason": f"over {MAX_CATEGORIES} text values"})
            continue
        if kind not in KINDS:
            raise MetadataError(
                f"{where}: column {col.name!r} has kind {kind!r}; expected one of {KINDS}."
            )
        check = {"binary": binary, "numeric": number}.get(kind)
        bad = sorted({v for v in cells if v != "" and check is not None and check(v) is None})
        if bad:
            raise MetadataError(
                f"{where}: column {col.name!r} is {kind} but holds {bad[:5]}; expected "
                + ("1/0, yes/no or true/false" if kind == "binary" else "numbers")
                + " (empty = unknown). Fix the values or declare it categorical."
            )
        entry = {"name": col.name, "kind": kind, "target": col.target and kind != "numeric"}
        if col.empty:
            entry["empty"] = col.empty
        if kind == "categorical":
            entry["values"] = sorted({v for v in cells if v != ""})
        out.append(entry)
    has_region = any(c["name"] == region for c in out)
    block = {"storage": TABLE, "columns": out, "region": region if has_region else None}
    block["features"] = [f for c in out for f in _names(c)]
    block["targets"] = [f for c in out if c["target"] for f in _names(c)]
    if skipped:
        block["skipped"] = skipped
    return block


def records_block(label_columns=("fractured", "fracture_count")) -> dict:
    """The ``metadata`` block of a build whose records carry FracAtlas' flags."""
    kept = [c for c in META_COLUMNS if c not in label_columns]
    return {
        "storage": RECORDS,
        "columns": [{"name": c, "kind": "binary", "target": c in META_TARGETS} for c in kept],
        "region": None,
        "features": kept,
        "targets": list(META_TARGETS),
    }


def _names(col: dict) -> list[str]:
    if col["kind"] == "categorical":
        return [f"{col['name']}={v}" for v in col["values"]]
    return [col["name"]]


def block(manifest: dict) -> dict | None:
    """The manifest's ``metadata`` block where the values live in metadata.csv, else None
    (the records carry FracAtlas' flags, or a build from before the block: read as always)."""
    b = manifest.get("metadata")
    return b if isinstance(b, dict) and b.get("storage") == TABLE else None


def targets(manifest: dict) -> tuple[str, ...]:
    """The names of what ``model.meta_head`` learns on this build (``META_TARGETS`` for
    FracAtlas-style records and older builds; none for a build recorded without metadata)."""
    if "metadata" in manifest and manifest["metadata"] is None:
        return ()
    b = block(manifest)
    return META_TARGETS if b is None else tuple(b["targets"])


@dataclasses.dataclass
class Table:
    """A build's metadata.csv encoded: one row per image (``index``: image id -> row)."""

    index: dict[str, int]
    names: list[str]
    features: np.ndarray  # [n, len(names)] float64, NaN unknown
    target_names: list[str]
    targets: np.ndarray  # [n, len(target_names)] float32 0/1, -1 unknown
    region: np.ndarray | None  # [n] object: the region column's text ("" unknown)

    def rows(self, ids) -> np.ndarray:
        """Rows of ``ids`` (-1 where an id has no row)."""
        return np.array([self.index.get(i, -1) for i in ids], dtype=int)

    def take(self, array: np.ndarray, ids, fill) -> np.ndarray:
        rows = self.rows(ids)
        extra = np.full((1, *array.shape[1:]), fill, dtype=array.dtype)
        return np.concatenate([array, extra])[rows] if len(rows) else array[:0]


def read(directory: str | Path, manifest: dict) -> Table | None:
    """The encoded metadata.csv of a build (None where its metadata lives in the records).
    A missing or edited metadata.csv is an error naming the file and the fix."""
    b = block(manifest)
    if b is None:
        return None
    path = Path(directory) / TABLE
    if not path.is_file():
        raise MetadataError(
            f"{str(path)!r} is missing, but the build's manifest.json records metadata columns "
            f"there: the build was damaged. Rebuild it with `kerasfrac build ... --out "
            f"{directory} --overwrite`."
        )
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    columns = b["columns"]
    absent = [c["name"] for c in columns if rows and c["name"] not in rows[0]]
    if absent:
        raise MetadataError(
            f"{str(path)!r} lacks the column(s) {absent} its manifest.json records: the build "
            f"was edited. Rebuild it with `kerasfrac build ... --out {directory} --overwrite`."
        )
    index = {r["image_id"]: i for i, r in enumerate(rows)}
    feats = [_encode(c, [r[c["name"]] for r in rows]) for c in columns]
    names = [n for c in columns for n in _names(c)]
    x = np.concatenate([f for f in feats], axis=1) if feats else np.zeros((len(rows), 0))
    pick = [names.index(t) for t in b["targets"]]
    t = np.nan_to_num(x[:, pick], nan=-1.0).astype(np.float32)
    region = None
    if b.get("region"):
        region = np.array([r.get(b["region"], "") for r in rows], dtype=object)
    return Table(index, names, x, list(b["targets"]), t, region)


def _encode(col: dict, cells: list[str]) -> np.ndarray:
    cells = [v if v != "" else col.get("empty", "") for v in cells]
    if col["kind"] == "categorical":
        values = col["values"]
        x = np.array([[float(v == w) for w in values] for v in cells], dtype=np.float64)
        x = x.reshape(len(cells), len(values))
        x[[v == "" for v in cells]] = np.nan
        return x
    parse = binary if col["kind"] == "binary" else number
    out = [parse(v) if v != "" else None for v in cells]
    return np.array([np.nan if v is None else float(v) for v in out]).reshape(-1, 1)
