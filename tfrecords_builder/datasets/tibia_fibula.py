"""Tibia/Fibula fractures (Mendeley Data 2h62x9xzyd, CC BY 4.0): class folders of X-rays.

Accepted spellings of the class folders, case-insensitively: ``fracture/`` or ``Fractured/``
and ``normal/`` or ``Not Fractured/`` (a popular mirror's names). Every folder below the
source that holds such a pair is read (mirrors that ship train/val/test folders are pooled,
since kerasfrac makes its own leakage-safe split). PNG and JPEG files are accepted.
The dataset has no metadata and no boxes.
"""

from __future__ import annotations

from pathlib import Path

from tfrecords_builder.archive import SourceError, listing
from tfrecords_builder.candidates import Candidate, Found, files_under, norm_name
from tfrecords_builder.datasets.registry import DatasetSpec, register_dataset

FRACTURED = {"fracture", "fractured", "fractures"}
NORMAL = {"normal", "not_fractured", "non_fractured", "nonfractured"}
LAYOUT = "class folders fracture/ and normal/ (or Fractured/ and 'Not Fractured/') of PNG/JPEG"


def class_folders(folder: Path) -> dict[int, Path]:
    found = {}
    for sub in folder.iterdir():
        if sub.is_dir():
            name = norm_name(sub.name)
            if name in FRACTURED:
                found[1] = sub
            elif name in NORMAL:
                found[0] = sub
    return found


def find(top: Path, max_depth: int = 3) -> Found:
    pairs: list[dict[int, Path]] = []
    frontier = [top]
    for _ in range(max_depth + 1):
        next_frontier = []
        for folder in frontier:
            classes = class_folders(folder)
            if set(classes) == {0, 1}:
                pairs.append(classes)
            else:
                next_frontier.extend(sorted(p for p in folder.iterdir() if p.is_dir()))
        frontier = next_frontier
    for classes in pairs:  # FracAtlas' images/ has class folders too: its boxes would be lost
        for folder in {classes[1].parent, classes[1].parent.parent}:
            if (folder / "dataset.csv").is_file() or (folder / "Annotations").is_dir():
                raise SourceError(
                    f"{str(top)!r} looks like FracAtlas ({str(folder / 'dataset.csv')!r} or "
                    "Annotations/ beside its class folders); as tibia-fibula its fracture "
                    f"boxes and metadata would be dropped. Build it with `kerasfrac build "
                    f"fracatlas --source {top} --out OUT`. Nothing was written."
                )
    if not pairs:
        raise SourceError(
            f"{str(top)!r} is not a Tibia/Fibula source: expected {LAYOUT}, at the top or up to "
            f"{max_depth} folders deep, but found: {listing(top)}."
        )
    candidates = []
    for classes in pairs:
        for label in (1, 0):
            for path in files_under(classes[label]):
                rel = path.relative_to(top).as_posix()
                candidates.append(Candidate(path, rel, rel, label))
    notes = {
        "class_folders": [
            {str(k): v.relative_to(top).as_posix()} for p in pairs for k, v in sorted(p.items())
        ]
    }
    return Found(top, candidates, notes)


CITATION = """\
@misc{tibia_fibula_mendeley,
  title        = {Tibia/Fibula fracture X-rays},
  howpublished = {Mendeley Data, dataset 2h62x9xzyd},
  url          = {https://data.mendeley.com/datasets/2h62x9xzyd},
  note         = {CC BY 4.0}
}"""

SPEC = register_dataset(
    DatasetSpec(
        name="tibia-fibula",
        find=find,
        tfds_name="tibia_fibula",
        description=(
            "Tibia/Fibula fracture X-rays (Mendeley Data 2h62x9xzyd): PNG/JPEG files in class "
            "folders fracture/ and normal/ (mirrors' train/val/test folders are pooled and split "
            "again). No boxes, no metadata columns."
        ),
        homepage="https://data.mendeley.com/datasets/2h62x9xzyd",
        citation=CITATION,
        manual_download=(
            "Download the Tibia/Fibula set from https://data.mendeley.com/datasets/2h62x9xzyd and "
            "put it in `manual_dir`: the zip as downloaded (the folder's only file) or the "
            "extracted class folders fracture/ and normal/ (or Fractured/, 'Not Fractured/')."
        ),
    )
)
