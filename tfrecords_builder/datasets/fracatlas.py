"""FracAtlas (Abedeen et al. 2023, CC BY 4.0): find its images, labels, metadata and boxes.

Official layout (the root may sit one or two folders deep inside the archive)::

    dataset.csv
    images/Fractured/IMGnnnnnnn.jpg
    images/Non_fractured/IMGnnnnnnn.jpg
    Annotations/COCO JSON/COCO_fracture_masks.json

The label comes from the class folder. ``dataset.csv``'s ``fractured`` column is kept as
metadata, and rows where it disagrees with the folder are listed (the folder wins).
The synthetic source writes the same layout and is read by this module too.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from tfrecords_builder.archive import SourceError, listing
from tfrecords_builder.archive import find_root as archive_find_root
from tfrecords_builder.candidates import Candidate, Found, files_under, norm_name
from tfrecords_builder.datasets.registry import DatasetSpec, register_dataset
from tfrecords_builder.defaults import META_COLUMNS

CLASS_FOLDERS = {"fractured": 1, "non_fractured": 0}
COCO_PATH = Path("Annotations") / "COCO JSON" / "COCO_fracture_masks.json"
LAYOUT = (
    "dataset.csv, images/Fractured/*.jpg, images/Non_fractured/*.jpg and optionally "
    "'Annotations/COCO JSON/COCO_fracture_masks.json'"
)


def find_root(top: Path) -> Path:
    """The folder holding dataset.csv and images/, at ``top`` or up to two levels below."""
    return archive_find_root(
        top,
        lambda f: (f / "dataset.csv").is_file() and (f / "images").is_dir(),
        "FracAtlas",
        LAYOUT,
    )


def read_csv(path: Path) -> dict[str, dict[str, int]]:
    try:
        return _read_csv(path)
    except UnicodeDecodeError as err:
        raise SourceError(
            f"{str(path)!r} is not UTF-8 text ({err}); save it as UTF-8 (FracAtlas' own "
            "dataset.csv is ASCII)."
        ) from err


def _read_csv(path: Path) -> dict[str, dict[str, int]]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in ("image_id", *META_COLUMNS) if c not in header]
        if missing:
            raise SourceError(
                f"{str(path)!r} lacks the FracAtlas columns {missing}; its header is {header}."
            )
        rows = {}
        for line, row in enumerate(reader, start=2):
            try:
                rows[row["image_id"].strip()] = {c: int(row[c]) for c in META_COLUMNS}
            except (TypeError, ValueError) as err:
                raise SourceError(
                    f"{str(path)!r} line {line}: expected integer flags in {META_COLUMNS},"
                    f" got {row}: {err}"
                ) from err
    return rows


def read_coco_boxes(
    path: Path, skipped: list | None = None
) -> dict[str, tuple[tuple[int, int], list[tuple], list[list]]]:
    """file_name -> ((height, width), [(ymin, xmin, ymax, xmax) normalised, clipped to [0,1]],
    [polygon of each box: [(y, x), ...] normalised and clipped, [] where the annotation has no
    usable ``segmentation``]).

    Annotations without a usable box (no ``bbox``, zero or negative width or height, an image
    without a positive size) are left out and listed in ``skipped``. FracAtlas' segmentations
    are one polygon per annotation; where one has several parts, the largest is kept."""
    skipped = [] if skipped is None else skipped
    try:
        with path.open(encoding="utf-8") as f:
            coco = json.load(f)
        images = {im["id"]: im for im in coco.get("images", [])}
        out: dict[str, tuple[tuple[int, int], list[tuple], list[list]]] = {
            im["file_name"]: ((int(im["height"]), int(im["width"])), [], [])
            for im in images.values()
        }
        annotations = list(coco.get("annotations", []))
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise SourceError(
            f"{str(path)!r} is not a COCO annotation file this builder can read "
            f"({type(err).__name__}: {err}); expected JSON with 'images' (id, file_name, "
            "height, width) and 'annotations' (image_id, bbox). Fix or remove the file (boxes "
            "are optional)."
        ) from err
    for ann in annotations:
        im = images.get(ann.get("image_id")) if isinstance(ann, dict) else None
        if im is None:
            continue
        try:
            x, y, w, h = (float(v) for v in ann["bbox"])
            height, width = float(im["height"]), float(im["width"])
        except (KeyError, TypeError, ValueError) as err:
            skipped.append(
                {
                    "file": im["file_name"],
                    "annotation": ann.get("id"),
                    "reason": f"no usable bbox ({type(err).__name__}: {err})",
                }
            )
            continue
        if not (w > 0 and h > 0 and height > 0 and width > 0):
            skipped.append(
                {
                    "file": im["file_name"],
                    "annotation": ann.get("id"),
                    "reason": f"empty box: bbox {ann['bbox']} on a {width:g}x{height:g} image",
                }
            )
            continue

        def clip(v: float) -> float:
            return min(1.0, max(0.0, v))

        out[im["file_name"]][1].append(
            (clip(y / height), clip(x / width), clip((y + h) / height), clip((x + w) / width))
        )
        polygon = _polygon(ann.get("segmentation"))
        out[im["file_name"]][2].append(
            [(clip(py / height), clip(px / width)) for px, py in polygon]
        )
    return out


def _polygon(segmentation) -> list[tuple[float, float]]:
    """The (x, y) points of a COCO polygon segmentation (its largest part; [] where it has
    none with three points or more, e.g. RLE)."""
    if not isinstance(segmentation, list):
        return []
    parts = []
    for part in segmentation:
        try:
            values = [float(v) for v in part]
        except (TypeError, ValueError):
            continue
        if len(values) >= 6 and len(values) % 2 == 0:
            parts.append(list(zip(values[0::2], values[1::2])))
    return max(parts, key=len) if parts else []


def find(top: Path) -> Found:
    root = find_root(top)
    class_dirs = {}
    for folder in sorted(p for p in (root / "images").iterdir() if p.is_dir()):
        label = CLASS_FOLDERS.get(norm_name(folder.name))
        if label is not None:
            class_dirs[label] = folder
    if set(class_dirs) != {0, 1}:
        raise SourceError(
            f"{str(root / 'images')!r} must hold the class folders Fractured/ and Non_fractured/ "
            f"(any case); found: {listing(root / 'images')}."
        )
    rows = read_csv(root / "dataset.csv")
    coco_file = root / COCO_PATH
    skipped_boxes: list[dict] = []
    boxes = read_coco_boxes(coco_file, skipped_boxes) if coco_file.is_file() else {}

    candidates, disagreements, missing_from_csv = [], [], []
    seen_ids: set[str] = set()
    for label, folder in sorted(class_dirs.items(), reverse=True):
        for path in files_under(folder):
            rel = path.relative_to(root).as_posix()
            image_id = path.name if path.name not in seen_ids else rel
            seen_ids.add(image_id)
            meta = rows.get(path.name, {})
            if not meta:
                missing_from_csv.append(rel)
            elif meta["fractured"] != label:
                disagreements.append(
                    {"file": rel, "folder_label": label, "csv_fractured": meta["fractured"]}
                )
            frame, image_boxes, polygons = boxes.get(path.name, (None, [], []))
            candidates.append(
                Candidate(path, rel, image_id, label, image_boxes, meta, frame, polygons)
            )

    on_disk = {c.path.name for c in candidates}
    notes = {
        "label_disagreements": disagreements,
        "missing_from_csv": missing_from_csv,
        "csv_rows_without_file": sorted(set(rows) - on_disk),
        "coco_file": str(COCO_PATH) if coco_file.is_file() else None,
        "images_with_boxes": sum(1 for c in candidates if c.boxes),
        "boxes": sum(len(c.boxes) for c in candidates),
        "boxes_with_polygons": sum(sum(1 for p in c.polygons if p) for c in candidates),
        "boxes_skipped": skipped_boxes,
    }
    return Found(root, candidates, notes)


CITATION = """\
@article{abedeen2023fracatlas,
  title   = {FracAtlas: A Dataset for Fracture Classification, Localization and
             Segmentation of Musculoskeletal Radiographs},
  author  = {Abedeen, Iftekharul and Rahman, Md. Ashiqur and Prottyasha, Fatema Zohra and
             Ahmed, Tasnim and Chowdhury, Tareque Mohmud and Shatabda, Swakkhar},
  journal = {Scientific Data},
  volume  = {10},
  pages   = {521},
  year    = {2023},
  doi     = {10.1038/s41597-023-02432-4}
}"""

SPEC = register_dataset(
    DatasetSpec(
        name="fracatlas",
        find=find,
        tfds_name="fracatlas",
        description=(
            "FracAtlas: 4,083 musculoskeletal X-rays (hand, leg, hip, shoulder) labelled fractured "
            "or not, with fracture boxes (COCO, here normalised ymin, xmin, ymax, xmax) and the "
            "per-image columns of dataset.csv (meta/*: anatomy, hardware, views; -1 unknown)."
        ),
        homepage="https://doi.org/10.6084/m9.figshare.22363012",
        citation=CITATION,
        encoding_format="jpeg",
        with_meta=True,
        has_boxes=True,
        learnable_meta=True,
        manual_download=(
            "Download FracAtlas from https://doi.org/10.6084/m9.figshare.22363012 and put it in "
            "`manual_dir`: either the zip as downloaded (the folder's only file) or the extracted "
            "folder (dataset.csv, images/Fractured, images/Non_fractured, Annotations/)."
        ),
    )
)
