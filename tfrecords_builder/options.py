"""How to build: ``BuildOptions``, whose fields are also ``kerasfrac build``'s options (the
command line is derived from them, ``tfrecords_builder.clioptions``). TensorFlow-free."""

from __future__ import annotations

from dataclasses import dataclass

from tfrecords_builder.clioptions import option
from tfrecords_builder.defaults import DEFAULT_MAX_PIXELS, DEFAULT_NEAR_DISTANCE
from tfrecords_builder.splits import parse_ratios


@dataclass
class BuildOptions:
    seed: int = option(42, "split seed")
    split: tuple[float, float, float] = option(
        (0.7, 0.15, 0.15), "train,val,test fractions", parse=parse_ratios
    )
    shards: int = option(8, "shards per split")
    drop_duplicates: bool = option(False, "keep one file of each byte-identical group")
    recover_truncated: bool = option(
        False, "keep truncated JPEGs, decoded with recovery, as lossless PNG"
    )
    overwrite: bool = option(False, "replace an existing --out")
    near_duplicate_distance: int = option(
        DEFAULT_NEAR_DISTANCE, "max perceptual-hash Hamming distance of near-duplicates (-1 off)"
    )
    group_near_duplicates: bool = option(
        True,
        "keep near-duplicates in one split whatever their labels, and quarantine those the "
        "pixel check calls one image with two labels; --no-group-near-duplicates only reports "
        "them (they may then straddle splits)",
        negatable=True,
    )
    groups_file: str | None = option(
        None,
        "CSV with columns file (or image_id) and group, e.g. patient ids: images of one "
        "group share a split (merged with the duplicate groups)",
        flag="--groups",
        metavar="FILE",
    )
    split_file: str | None = option(
        None,
        "CSV with columns file (or image_id) and split (train, val or test): every image "
        "goes to the split it names, reproducing a published split exactly; duplicate, "
        "near-duplicate and patient groups that then straddle splits are counted and listed "
        "in the manifest, not moved",
        flag="--split-file",
        metavar="FILE",
    )
    image_root: str | None = option(
        None,
        "csv: the folder (or .zip) the CSV's paths are relative to",
        default_text="the CSV's folder",
        metavar="DIR",
    )
    boxes: str | None = option(
        None,
        "csv, folder: fracture boxes, a COCO JSON (file_name = the image's path under "
        "--image-root or the class folders' folder, or its name) or a folder of YOLO .txt "
        "files named like the images (path or stem; every box a fracture)",
        metavar="FILE",
    )
    meta_columns: tuple[str, ...] = option(
        (),
        "csv: the columns kept as metadata (the audit's baseline, model.meta_head, a region "
        "column's subgroups), comma-separated, each name or name:kind (binary, categorical, "
        "numeric; else inferred); columns that restate the label are refused",
        default_text="every other column except label-like ones",
        metavar="COLUMNS",
    )
    fractured_labels: tuple[str, ...] = option(
        (),
        "folder/csv: label values (class folder names) meaning fractured, comma-separated, "
        "beside the common ones (fractured, fracture, positive, abnormal, 1, ...)",
        metavar="NAMES",
    )
    normal_labels: tuple[str, ...] = option(
        (),
        "folder/csv: label values meaning normal, beside the common ones (normal, negative, "
        "not fractured, 0, ...)",
        metavar="NAMES",
    )
    official_split: bool = option(
        True,
        "mura: its official valid set becomes the test split (val carved from train by "
        "patient); --no-official-split pools train and valid and splits them by patient",
        negatable=True,
    )
    max_pixels: int = option(DEFAULT_MAX_PIXELS, "quarantine larger images (decompression bombs)")
    workers: int | None = option(None, "validation threads", default_text="one per CPU")
    progress: bool = option(True, "show a progress bar (--no-progress: none, for logs)")
    #: source bytes kept in memory from validation to writing (not a command-line option);
    #: a larger source (MURA: ~3 GB) is read again, so RSS stays bounded
    hold_bytes: int = 1 << 30
