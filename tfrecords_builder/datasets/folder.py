"""A user's own X-rays in class folders: ``DIR/<label>/*.{jpg,jpeg,png,dcm}`` (the layout
Keras' ``image_dataset_from_directory`` reads).

Each folder directly under the source is a class; its name is the label (``labels``: the
common spellings such as fractured/positive/abnormal/1 and normal/negative/not fractured/0,
plus ``--fractured-labels`` / ``--normal-labels``). Files are read recursively below each
class folder; DICOM files are mapped to 8 bits (``tfrecords_builder.pixels``). A folder
whose name is no declared label is an error naming the folders found. Files beside the
class folders are listed in the manifest's notes and not read. ``--boxes`` reads fracture
boxes as a CSV build does (``boxes.attach``: a COCO JSON whose ``file_name`` is the image's
path under the class folders' folder, e.g. ``fractured/a.png``, or the name of one file; or a
folder of YOLO .txt files named by that path or by the image's stem). No metadata.
"""

from __future__ import annotations

from pathlib import Path

from tfrecords_builder.archive import SourceError, listing
from tfrecords_builder.candidates import Candidate, Found, files_under, norm_name
from tfrecords_builder.datasets import boxes, labels
from tfrecords_builder.datasets.registry import DatasetSpec, register_dataset
from tfrecords_builder.options import BuildOptions

LAYOUT = "class folders DIR/<label>/ of JPEG, PNG or DICOM files, e.g. fractured/ and normal/"


def find_root(top: Path) -> Path:
    """``top``, or its one folder when that is all it holds (a .zip of the folder)."""
    entries = [p for p in top.iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir():
        inner = [p for p in entries[0].iterdir() if p.is_dir()]
        if inner and labels_of_folders(inner, labels.label_map())[1] == []:
            return entries[0]
    return top


def labels_of_folders(folders: list[Path], mapping: dict[str, int]):
    """``({folder: label}, [folders no label names])``."""
    known, unknown = {}, []
    for folder in folders:
        label = labels.label_of(folder.name, mapping)
        if label is None:
            unknown.append(folder)
        else:
            known[folder] = label
    return known, unknown


#: Folder names of a split a download may ship (train/, val/, test/): their class folders are
#: pooled, since the build makes its own group-aware split.
SPLIT_FOLDERS = {"train", "training", "val", "valid", "validation", "test", "testing"}


def _dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def find(top: Path, opts: BuildOptions) -> Found:
    mapping = labels.label_map(opts.fractured_labels, opts.normal_labels)
    root = find_root(top)
    folders = _dirs(root)
    known, unknown = labels_of_folders(folders, mapping)
    pooled = []
    if unknown and all(norm_name(p.name) in SPLIT_FOLDERS for p in folders):
        pooled = [p.name for p in folders]
        folders = [q for p in folders for q in _dirs(p)]
        known, unknown = labels_of_folders(folders, mapping)
    if unknown:
        raise SourceError(
            f"{str(root)!r}: class folder(s) {[_rel(p, root) for p in unknown]} name no known "
            f"label (folders found: {[_rel(p, root) for p in folders]}); expected {LAYOUT}. "
            f"Rename them or {labels.HINT}. Nothing was written."
        )
    if set(known.values()) != {0, 1}:
        raise SourceError(
            f"{str(root)!r} holds class folders {[_rel(p, root) for p in folders]}: expected at "
            "least "
            f"one fractured and one normal folder ({LAYOUT}); found: {listing(root)}. Nothing "
            "was written."
        )
    candidates = []
    for folder, label in sorted(known.items(), key=lambda kv: (-kv[1], _rel(kv[0], root))):
        for path in files_under(folder):
            rel = path.relative_to(root).as_posix()
            candidates.append(Candidate(path, rel, rel, label))
    box_notes = boxes.attach(candidates, Path(opts.boxes)) if opts.boxes else {}
    loose = sorted(p.name for p in root.iterdir() if not p.is_dir() and not p.name.startswith("."))
    notes = {
        "class_folders": {_rel(p, root): label for p, label in sorted(known.items())},
        "pooled_split_folders": pooled,
        "files_outside_class_folders": loose,
        "images_with_boxes": sum(1 for c in candidates if c.boxes),
        "boxes": sum(len(c.boxes) for c in candidates),
        **box_notes,
    }
    return Found(root, candidates, notes)


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


SPEC = register_dataset(
    DatasetSpec(
        name="folder",
        find=find,
        tfds_name="kerasfrac_folder",
        description=(
            "A user's X-rays in class folders (DIR/<label>/*.jpg|png|dcm), labels mapped to "
            "fractured/normal by the folder names; boxes from --boxes (COCO JSON or YOLO "
            "files). No metadata columns."
        ),
        license="the user's own",
        manual_download="Put the class folders (or a .zip of them) in `manual_dir`.",
        takes_options=True,
        has_boxes=True,
        boxes_option=True,
    )
)
