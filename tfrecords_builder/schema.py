"""The TFRecord contract: feature keys, how to write them and how to parse them.

This is the ONE module that both the writer (tfrecords_builder.writer) and every reader
(tfrecords_builder.read_split, kerasfrac.data) import, so the two sides cannot drift apart
(the pattern of TF Model Garden's tfrecord_lib / decoders).

One tf.train.Example per image:

    image/encoded        bytes   the original file bytes (JPEG or PNG); a truncated JPEG kept
                                 with --recover-truncated is stored as a lossless PNG re-encode
    image/format         bytes   b"jpeg" or b"png" (format of image/encoded)
    image/height, image/width, image/channels   int64, of the decoded image
    image/id             bytes   the file name as the dataset names it (e.g. IMG0000025.jpg)
    image/source         bytes   dataset name: fracatlas | tibia-fibula | synthetic
    image/sha256         bytes   hex sha256 of the ORIGINAL file bytes (duplicate detection)
    image/group          bytes   split group: images of one group always land in one split
    label                int64   1 = fractured, 0 = normal (from the class folder)
    image/object/bbox/{ymin,xmin,ymax,xmax}  float lists, fracture boxes normalised to [0, 1]
    meta/<column>        int64   FracAtlas dataset.csv columns (META_COLUMNS); -1 = unknown
"""

from __future__ import annotations

import tensorflow as tf

# The split and metadata names live in the TensorFlow-free defaults; schema.SPLITS and
# schema.META_COLUMNS stay part of the record contract that writer and reader import.
from tfrecords_builder.defaults import META_COLUMNS, SPLITS  # noqa: F401

ENCODED = "image/encoded"
FORMAT = "image/format"
HEIGHT = "image/height"
WIDTH = "image/width"
CHANNELS = "image/channels"
IMAGE_ID = "image/id"
SOURCE = "image/source"
SHA256 = "image/sha256"
GROUP = "image/group"
LABEL = "label"
BBOX_YMIN = "image/object/bbox/ymin"
BBOX_XMIN = "image/object/bbox/xmin"
BBOX_YMAX = "image/object/bbox/ymax"
BBOX_XMAX = "image/object/bbox/xmax"
BBOX_KEYS = (BBOX_YMIN, BBOX_XMIN, BBOX_YMAX, BBOX_XMAX)

META_UNKNOWN = -1

LABEL_NAMES = {0: "normal", 1: "fractured"}


def meta_key(column: str) -> str:
    return f"meta/{column}"


def make_example(
    *,
    encoded: bytes,
    image_format: str,
    height: int,
    width: int,
    channels: int,
    image_id: str,
    source: str,
    sha256: str,
    group: str,
    label: int,
    boxes: list[tuple[float, float, float, float]] = (),
    meta: dict[str, int] | None = None,
) -> tf.train.Example:
    """Build one record. ``boxes`` are (ymin, xmin, ymax, xmax) normalised to [0, 1]."""
    meta = meta or {}
    unknown = set(meta) - set(META_COLUMNS)
    if unknown:
        raise ValueError(f"unknown metadata columns {sorted(unknown)}; allowed: {META_COLUMNS}")
    # Filled in place: half the time of building a Feature message per key (the builder
    # writes every image through here).
    example = tf.train.Example()
    feature = example.features.feature
    for key, value in (
        (ENCODED, encoded),
        (FORMAT, image_format.encode()),
        (IMAGE_ID, image_id.encode()),
        (SOURCE, source.encode()),
        (SHA256, sha256.encode()),
        (GROUP, group.encode()),
    ):
        feature[key].bytes_list.value.append(value)
    for key, value in ((HEIGHT, height), (WIDTH, width), (CHANNELS, channels), (LABEL, label)):
        feature[key].int64_list.value.append(int(value))
    for i, key in enumerate(BBOX_KEYS):
        feature[key].float_list.value.extend(float(b[i]) for b in boxes)
    for column in META_COLUMNS:
        feature[meta_key(column)].int64_list.value.append(int(meta.get(column, META_UNKNOWN)))
    return example


def feature_spec() -> dict:
    """Parse spec for tf.io.parse_single_example, built from the keys above with defaults."""
    spec = {
        ENCODED: tf.io.FixedLenFeature([], tf.string),
        FORMAT: tf.io.FixedLenFeature([], tf.string, default_value=b"jpeg"),
        HEIGHT: tf.io.FixedLenFeature([], tf.int64),
        WIDTH: tf.io.FixedLenFeature([], tf.int64),
        CHANNELS: tf.io.FixedLenFeature([], tf.int64),
        IMAGE_ID: tf.io.FixedLenFeature([], tf.string),
        SOURCE: tf.io.FixedLenFeature([], tf.string, default_value=b""),
        SHA256: tf.io.FixedLenFeature([], tf.string, default_value=b""),
        GROUP: tf.io.FixedLenFeature([], tf.string, default_value=b""),
        LABEL: tf.io.FixedLenFeature([], tf.int64),
    }
    for key in BBOX_KEYS:
        spec[key] = tf.io.VarLenFeature(tf.float32)
    for column in META_COLUMNS:
        spec[meta_key(column)] = tf.io.FixedLenFeature([], tf.int64, default_value=META_UNKNOWN)
    return spec


def parse_example(serialized: tf.Tensor) -> dict:
    """Parse one serialized record into a flat dict WITHOUT decoding the image.

    Keys: ``encoded`` (string), ``format``, ``height``, ``width``, ``channels``, ``image_id``,
    ``source``, ``sha256``, ``group``, ``label`` (int64), ``boxes`` (float32 [N, 4] as
    ymin, xmin, ymax, xmax), and ``meta`` (dict column -> int64).
    Decoding is left to the caller so that a pipeline can decode, convert and resize in one map.
    """
    parsed = tf.io.parse_single_example(serialized, feature_spec())
    boxes = tf.stack([tf.sparse.to_dense(parsed[k]) for k in BBOX_KEYS], axis=-1)
    return {
        "encoded": parsed[ENCODED],
        "format": parsed[FORMAT],
        "height": parsed[HEIGHT],
        "width": parsed[WIDTH],
        "channels": parsed[CHANNELS],
        "image_id": parsed[IMAGE_ID],
        "source": parsed[SOURCE],
        "sha256": parsed[SHA256],
        "group": parsed[GROUP],
        "label": parsed[LABEL],
        "boxes": tf.reshape(boxes, [-1, 4]),
        "meta": {c: parsed[meta_key(c)] for c in META_COLUMNS},
    }


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
    """Decode stored bytes to uint8 [H, W, C] exactly as the builder validated them."""
    return tf.io.decode_image(encoded, channels=0, expand_animations=False, dtype=tf.uint8)


def shard_name(split: str, index: int, count: int) -> str:
    """Model Garden's naming: ``{split}-{i:05d}-of-{n:05d}.tfrecord``."""
    return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


MANIFEST = "manifest.json"
