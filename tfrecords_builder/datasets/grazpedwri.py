"""GRAZPEDWRI-DX (Nagy et al. 2022, CC BY 4.0): paediatric wrist X-rays from Graz.

Layout (the root may sit one or two folders deep)::

    dataset.csv                         filestem, patient_id, study_number, ..., fracture_visible
    images_part1/ .. images_part4/      <filestem>.png, 16-bit grayscale
    folder_structure/yolov5/labels/     <filestem>.txt, YOLO boxes (class 3 = fracture)

The label is ``fracture_visible`` (1 fractured; empty means no). ``patient_id`` is the group,
``patient_id/study_number`` the study; projection, laterality, age, gender, cast, metal,
osteopenia and device_manufacturer go to metadata.csv. ``fracture_visible`` and
``ao_classification`` restate the label and are never metadata. 16-bit PNGs are mapped to 8
bits by each image's own min..max (``tfrecords_builder.pixels``). A dataset.csv without its
columns, or one that does not match the images (rows without an image, images without a row),
is an error naming both, and nothing is written.
"""

from __future__ import annotations

from pathlib import Path

from tfrecords_builder.archive import SourceError
from tfrecords_builder.archive import find_root as archive_find_root
from tfrecords_builder.candidates import Candidate, Found
from tfrecords_builder.datasets.boxes import yolo_boxes
from tfrecords_builder.datasets.csvlist import read_rows
from tfrecords_builder.datasets.registry import DatasetSpec, register_dataset
from tfrecords_builder.metadata import MetaColumn

REQUIRED = ("filestem", "patient_id", "study_number", "fracture_visible")
METADATA = (
    "projection",
    "laterality",
    "age",
    "gender",
    "cast",
    "metal",
    "osteopenia",
    "device_manufacturer",
)
LABEL_COLUMNS = ("fracture_visible", "ao_classification")
#: What each METADATA column is (``tfrecords_builder.metadata``): what the image shows
#: (projection, side, cast, metal, osteopenia) is a ``model.meta_head`` target; who the
#: patient is and which machine took it only feed the audit's baseline. The flags' empty
#: cells mean no, as fracture_visible's do.
META = (
    MetaColumn("projection", "categorical", target=True),
    MetaColumn("laterality", "categorical", target=True),
    MetaColumn("age", "numeric"),
    MetaColumn("gender", "categorical"),
    MetaColumn("cast", "binary", target=True, empty="0"),
    MetaColumn("metal", "binary", target=True, empty="0"),
    MetaColumn("osteopenia", "binary", target=True, empty="0"),
    MetaColumn("device_manufacturer", "categorical"),
)
FRACTURE_CLASS = 3  # YOLO class ids: boneanomaly, bonelesion, foreignbody, fracture, ...
LABELS_DIR = Path("folder_structure") / "yolov5" / "labels"
LAYOUT = "dataset.csv and images_part1/ .. images_part4/ of <filestem>.png"


def find_root(top: Path) -> Path:
    """The folder holding dataset.csv and images_part*/, at ``top`` or up to two below."""
    return archive_find_root(
        top,
        lambda f: (f / "dataset.csv").is_file() and any(f.glob("images_part*")),
        "GRAZPEDWRI-DX",
        LAYOUT,
    )


def _label(value: str, line: int, csv_path: Path) -> int:
    if value == "":
        return 0
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if number not in (0.0, 1.0):
        raise SourceError(
            f"{str(csv_path)!r} line {line}: fracture_visible is {value!r}; expected 1, 0 or "
            "empty (no). Nothing was written."
        )
    return int(number)


def find(top: Path) -> Found:
    root = find_root(top)
    csv_path = root / "dataset.csv"
    header, rows = read_rows(csv_path, REQUIRED)
    images: dict[str, Path] = {}
    for part in sorted(p for p in root.glob("images_part*") if p.is_dir()):
        for path in sorted(part.rglob("*.png")):
            images.setdefault(path.stem, path)
    stems = [row["filestem"] for _, row in rows]
    missing = [s for s in stems if s not in images]
    unlisted = sorted(set(images) - set(stems))
    if missing or unlisted:
        raise SourceError(
            f"{str(csv_path)!r} does not match its images: {len(missing)} row(s) name no "
            f"images_part*/<filestem>.png (e.g. {missing[:3]}), {len(unlisted)} image(s) have "
            f"no row (e.g. {unlisted[:3]}). Expected every filestem of dataset.csv once as a "
            "PNG in images_part1..4/: extract all four image parts beside dataset.csv. "
            "Nothing was written."
        )
    labels_dir = root / LABELS_DIR
    candidates, seen, disagreements = [], {}, []
    for line, row in rows:
        stem = row["filestem"]
        if stem in seen:
            raise SourceError(
                f"{str(csv_path)!r} line {line}: filestem {stem!r} repeats line {seen[stem]}; "
                "expected one row per image. Nothing was written."
            )
        seen[stem] = line
        label = _label(row["fracture_visible"], line, csv_path)
        box_file = labels_dir / f"{stem}.txt"
        boxes = yolo_boxes(box_file, {FRACTURE_CLASS}) if box_file.is_file() else []
        if bool(boxes) != bool(label):
            disagreements.append({"file": stem, "fracture_visible": label, "boxes": len(boxes)})
        path = images[stem]
        rel = path.relative_to(root).as_posix()
        candidates.append(
            Candidate(
                path,
                rel,
                path.name,
                label,
                boxes,
                patient=row["patient_id"],
                study=f"{row['patient_id']}/{row['study_number']}",
                extra={c: row[c] for c in METADATA if c in header},
                row=line,
            )
        )
    notes = {
        "rows": len(rows),
        "label_file_folder": LABELS_DIR.as_posix() if labels_dir.is_dir() else None,
        "images_with_boxes": sum(1 for c in candidates if c.boxes),
        "boxes": sum(len(c.boxes) for c in candidates),
        "label_box_disagreements": disagreements,
    }
    return Found(root, candidates, notes, metadata=tuple(c for c in META if c.name in header))


CITATION = """\
@article{nagy2022grazpedwri,
  title   = {A pediatric wrist trauma X-ray dataset (GRAZPEDWRI-DX) for machine learning},
  author  = {Nagy, Eszter and Janisch, Marco and Hr{\\v{z}}i{\\'c}, Franko and Sorantin, Erich
             and Tschauner, Sebastian},
  journal = {Scientific Data},
  volume  = {9},
  pages   = {222},
  year    = {2022},
  doi     = {10.1038/s41597-022-01328-z}
}"""

SPEC = register_dataset(
    DatasetSpec(
        name="grazpedwri",
        find=find,
        tfds_name="kerasfrac_grazpedwri",
        description=(
            "GRAZPEDWRI-DX: paediatric wrist X-rays (16-bit PNG, mapped to 8 bits by each "
            "image's min..max), labelled by fracture_visible, with YOLO fracture boxes. "
            "Patients share a split; studies in index.csv; projection, laterality, age, ... "
            "in metadata.csv."
        ),
        homepage="https://doi.org/10.6084/m9.figshare.14825193",
        citation=CITATION,
        image_channels=1,
        manual_download=(
            "Download GRAZPEDWRI-DX from https://doi.org/10.6084/m9.figshare.14825193 and put "
            "dataset.csv, images_part1..4/ and folder_structure/ (or one zip of them) in "
            "`manual_dir`."
        ),
        label_columns=LABEL_COLUMNS,
        metadata=META,
        learnable_meta=True,
        has_boxes=True,
    )
)
