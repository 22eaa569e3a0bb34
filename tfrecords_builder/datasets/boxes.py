"""Fracture boxes from YOLO text files and COCO JSON, as (ymin, xmin, ymax, xmax) in [0, 1]:
GRAZPEDWRI-DX's YOLO labels and a CSV layout's ``--boxes``. TensorFlow-free."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from tfrecords_builder.archive import SourceError
from tfrecords_builder.candidates import Candidate
from tfrecords_builder.datasets.fracatlas import read_coco_boxes


def _clip(v: float) -> float:
    return min(1.0, max(0.0, v))


def yolo_boxes(path: Path, classes: set[int] | None = None) -> list[tuple]:
    """The boxes of a YOLO label file (``class x_center y_center width height`` per line,
    normalised) whose class is in ``classes`` (None: every class)."""
    boxes = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        try:
            cls, xc, yc, w, h = int(parts[0]), *(float(v) for v in parts[1:5])
        except (ValueError, TypeError) as err:
            raise SourceError(
                f"{str(path)!r} line {number}: expected 'class x_center y_center width "
                f"height' (YOLO, normalised), got {line!r}. Nothing was written."
            ) from err
        if (classes is None or cls in classes) and w > 0 and h > 0:
            boxes.append(
                (_clip(yc - h / 2), _clip(xc - w / 2), _clip(yc + h / 2), _clip(xc + w / 2))
            )
    return boxes


def attach(candidates: list[Candidate], source: Path) -> dict:
    """Give each candidate its boxes from ``source``: a COCO JSON file (``file_name`` = the
    image's path under the root, or the file name of one listed file) or a folder of YOLO
    .txt files (the image's path, or its stem, with .txt; every class a fracture box).
    Returns notes for the manifest."""
    source = Path(source).expanduser()
    if source.is_dir():
        for cand in candidates:
            rel = Path(cand.rel)
            for txt in (source / rel.with_suffix(".txt"), source / f"{rel.stem}.txt"):
                if txt.is_file():
                    cand.boxes = yolo_boxes(txt)
                    break
        return {"boxes_file": str(source), "boxes_format": "yolo"}
    if not source.is_file():
        raise SourceError(
            f"--boxes {str(source)!r} does not exist; expected a COCO JSON file or a folder of "
            "YOLO .txt files named like the images. Nothing was written."
        )
    skipped: list[dict] = []
    coco = read_coco_boxes(source, skipped)
    # a bare file name in the JSON (FracAtlas' style) names the one listed file of that name
    names = Counter(cand.path.name for cand in candidates)
    used = set()
    for cand in candidates:
        key = cand.rel if cand.rel in coco else None
        if key is None and cand.path.name in coco and names[cand.path.name] == 1:
            key = cand.path.name
        if key is not None:
            cand.box_frame, cand.boxes = coco[key][0], list(coco[key][1])
            used.add(key)
    return {
        "boxes_file": str(source),
        "boxes_format": "coco",
        "boxes_skipped": skipped,
        "coco_images_without_a_listed_file": sorted(set(coco) - used),
    }
