"""What a dataset reader finds: one Candidate per file in a class folder, plus notes."""

from __future__ import annotations

import dataclasses
from pathlib import Path


def norm_name(name: str) -> str:
    """Folder names compared case-insensitively, with spaces/dashes as underscores."""
    return name.strip().lower().replace(" ", "_").replace("-", "_")


@dataclasses.dataclass
class Candidate:
    path: Path  # absolute path on disk
    rel: str  # path relative to the dataset root, POSIX style (used in the manifest)
    image_id: str
    label: int  # 1 fractured, 0 normal: from the class folder
    boxes: list[tuple[float, float, float, float]] = dataclasses.field(default_factory=list)
    meta: dict[str, int] = dataclasses.field(default_factory=dict)
    box_frame: tuple[int, int] | None = None  # (height, width) the boxes were annotated on
    #: one outline per box: [(y, x), ...] normalised like the boxes; [] where a box has none
    polygons: list[list[tuple[float, float]]] = dataclasses.field(default_factory=list)
    patient: str | None = None  # images of one patient share a split (merged with duplicates)
    study: str | None = None  # the study (exam) the image belongs to, recorded in index.csv
    split: str | None = None  # a split the layout fixes (MURA's official valid -> test)
    #: descriptive columns (region, projection, ...), written to metadata.csv; never a column
    #: that restates the label (the spec's ``label_columns``)
    extra: dict[str, str] = dataclasses.field(default_factory=dict)
    row: int | None = None  # line of the listing (CSV) the image came from, for the quarantine


@dataclasses.dataclass
class Found:
    """Everything a reader found in a source: candidates plus dataset-specific notes."""

    root: Path
    candidates: list[Candidate]
    notes: dict = dataclasses.field(default_factory=dict)
    #: entries the reader refused before any file was read (a listing's bad rows): dicts of
    #: file, label (-1 where unknown), reason and row; quarantined with the others
    rejected: list[dict] = dataclasses.field(default_factory=list)
    #: the metadata columns (``tfrecords_builder.metadata.MetaColumn``) where the source
    #: decides them (a CSV's extra columns); None: the spec's ``metadata``
    metadata: tuple | None = None


def files_under(folder: Path) -> list[Path]:
    """Every regular file and every symbolic link below ``folder`` (recursively), sorted;
    nothing is filtered out here, so that non-images, dangling links and links to folders
    are found and quarantined rather than silently ignored."""
    return sorted(p for p in folder.rglob("*") if p.is_file() or p.is_symlink())
