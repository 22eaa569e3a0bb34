"""The record contract: a tensorflow-datasets feature dict, how to write it, how to parse it.

This is the ONE module that both the writer (tfrecords_builder.prepare) and every reader
(tfrecords_builder.read_split, kerasfrac.data) import, so the two sides cannot drift apart.
The features are a ``tfds.features.FeaturesDict`` (``features()``): the build directory is a
tensorflow-datasets dataset (``dataset_info.json``, ``features.json``, TFDS shard names), and
records are encoded and parsed by TFDS' own serializer and parse spec.

One tf.train.Example per image; its keys (TFDS flattens nested features with ``/``):

    image            bytes   the original file bytes (JPEG or PNG), never re-encoded; a
                             truncated JPEG kept with --recover-truncated is stored as a lossless
                             PNG re-encode (TFDS' Image feature decodes both)
    image_format     text    "jpeg" or "png" (format of ``image``)
    height, width, channels  int64, of the decoded image
    image_id         text    the file name as the dataset names it (e.g. IMG0000025.jpg)
    file             text    the source path under the dataset root
                             (e.g. images/Fractured/IMG0000025.jpg)
    source           text    dataset name: fracatlas | tibia-fibula | synthetic
    sha256           text    hex sha256 of the ORIGINAL file bytes (duplicate detection)
    group            text    split group: images of one group always land in one split
    label            ClassLabel(names=["normal", "fractured"]): 0 normal, 1 fractured
    objects/bbox     float   Sequence of BBoxFeature: fracture boxes (ymin, xmin, ymax, xmax)
                             normalised to [0, 1] (converted from FracAtlas' COCO x, y, w, h)
    objects/polygon  float   the outline of each box's fracture: a ragged Sequence of (y, x)
                             points normalised like the boxes (FracAtlas' COCO segmentation);
                             empty for a box without one (and in builds made before it existed)
    meta/<column>    int64   FracAtlas dataset.csv columns (META_COLUMNS); -1 = unknown. Only
                             in datasets that have them; the parse spec defaults them to -1
"""

from __future__ import annotations

import functools

import numpy as np
import tensorflow as tf

# The split and metadata names live in the TensorFlow-free defaults; schema.SPLITS and
# schema.META_COLUMNS stay part of the record contract that writer and reader import.
from tfrecords_builder.defaults import META_COLUMNS, SPLITS  # noqa: F401

ENCODED = "image"
FORMAT = "image_format"
HEIGHT = "height"
WIDTH = "width"
CHANNELS = "channels"
IMAGE_ID = "image_id"
FILE = "file"
SOURCE = "source"
SHA256 = "sha256"
GROUP = "group"
LABEL = "label"
OBJECTS = "objects"
BBOX = "bbox"
BOXES = f"{OBJECTS}/{BBOX}"
POLYGON = "polygon"
POLYGON_POINTS = f"{OBJECTS}/{POLYGON}/ragged_flat_values"
POLYGON_LENGTHS = f"{OBJECTS}/{POLYGON}/ragged_row_lengths_0"

META_UNKNOWN = -1

LABEL_NAMES = {0: "normal", 1: "fractured"}


def meta_key(column: str) -> str:
    return f"meta/{column}"


@functools.cache
def features(image_channels: int = 3, encoding_format: str | None = None, meta: bool = True):
    """The TFDS feature dict of a build. ``image_channels``/``encoding_format`` only say how
    TFDS decodes ``image`` for its users (kerasfrac decodes the bytes itself); ``meta``: with
    the FracAtlas metadata columns. Every combination parses with ``feature_spec()``."""
    import tensorflow_datasets as tfds

    feats = {
        ENCODED: tfds.features.Image(
            shape=(None, None, image_channels), encoding_format=encoding_format
        ),
        FORMAT: tfds.features.Text(),
        HEIGHT: tfds.features.Scalar(np.int64),
        WIDTH: tfds.features.Scalar(np.int64),
        CHANNELS: tfds.features.Scalar(np.int64),
        IMAGE_ID: tfds.features.Text(),
        FILE: tfds.features.Text(),
        SOURCE: tfds.features.Text(),
        SHA256: tfds.features.Text(),
        GROUP: tfds.features.Text(),
        LABEL: tfds.features.ClassLabel(names=[LABEL_NAMES[0], LABEL_NAMES[1]]),
        OBJECTS: tfds.features.Sequence(
            {
                BBOX: tfds.features.BBoxFeature(),
                POLYGON: tfds.features.Sequence(tfds.features.Tensor(shape=(2,), dtype=np.float32)),
            }
        ),
    }
    if meta:
        feats["meta"] = {c: tfds.features.Scalar(np.int64) for c in META_COLUMNS}
    return tfds.features.FeaturesDict(feats)


@functools.cache
def _serializer(meta: bool):
    from tensorflow_datasets.core import example_serializer

    return example_serializer.ExampleSerializer(features(meta=meta).get_serialized_info())


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
    polygons: list[list[tuple[float, float]]] = (),
    meta: dict[str, int] | None = None,
    file: str = "",
    with_meta: bool = True,
) -> tf.train.Example:
    """Build one record through TFDS' encoder and serializer. ``boxes`` are (ymin, xmin, ymax,
    xmax) normalised to [0, 1]; ``polygons``: one outline per box ((y, x) points normalised
    the same way; [] for a box without one; none at all: every box without);
    ``with_meta``: write the metadata columns (unknown ones -1)."""
    meta = meta or {}
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    polygons = list(polygons) or [[] for _ in range(len(boxes))]
    if len(polygons) != len(boxes):
        raise ValueError(f"{len(polygons)} polygons for {len(boxes)} boxes: expected one per box")
    unknown = set(meta) - set(META_COLUMNS)
    if unknown:
        raise ValueError(f"unknown metadata columns {sorted(unknown)}; allowed: {META_COLUMNS}")
    example = {
        ENCODED: encoded,  # bytes: TFDS' Image stores them as they are (no re-encode)
        FORMAT: image_format,
        HEIGHT: height,
        WIDTH: width,
        CHANNELS: channels,
        IMAGE_ID: image_id,
        FILE: file,
        SOURCE: source,
        SHA256: sha256,
        GROUP: group,
        LABEL: int(label),
        OBJECTS: {
            BBOX: boxes,
            POLYGON: [np.asarray(p, np.float32).reshape(-1, 2) for p in polygons],
        },
    }
    if with_meta:
        example["meta"] = {c: int(meta.get(c, META_UNKNOWN)) for c in META_COLUMNS}
    feats = features(meta=with_meta)
    return _serializer(with_meta).get_tf_example(feats.encode_example(example))


def serialize(example: tf.train.Example) -> bytes:
    """Deterministic bytes: map entries sorted by key, so that the same source gives the same
    shard bytes in every run (checksums of a build can be compared)."""
    return example.SerializeToString(deterministic=True)


def feature_spec() -> dict:
    """Parse spec for tf.io.parse_single_example: TFDS' own spec of ``features()`` (what
    ``tfds.builder_from_directory(...).as_dataset`` parses with), the metadata columns
    defaulting to -1 (datasets without them). A fresh dict per call."""
    return dict(_feature_spec())


@functools.cache
def _feature_spec() -> dict:
    from tensorflow_datasets.core import example_parser

    spec = dict(example_parser.ExampleParser(features().get_serialized_info()).flat_feature_specs)
    for column in META_COLUMNS:
        spec[meta_key(column)] = spec[meta_key(column)]._replace(default_value=META_UNKNOWN)
    return spec


def parse_example(serialized: tf.Tensor) -> dict:
    """Parse one serialized record into a flat dict WITHOUT decoding the image.

    Keys: ``encoded`` (string), ``format``, ``height``, ``width``, ``channels``, ``image_id``,
    ``file``, ``source``, ``sha256``, ``group``, ``label`` (int64), ``boxes`` (float32 [N, 4] as
    ymin, xmin, ymax, xmax), ``polygon_points`` (float32 [P, 2], (y, x), every box's outline
    one after the other) with ``polygon_lengths`` (int64 [N]: the points of each box; a record
    written before outlines existed: [0]), and ``meta`` (dict column -> int64).
    Decoding is left to the caller so that a pipeline can decode, convert and resize in one map.
    """
    parsed = tf.io.parse_single_example(serialized, feature_spec())
    return {
        "encoded": parsed[ENCODED],
        "format": parsed[FORMAT],
        "height": parsed[HEIGHT],
        "width": parsed[WIDTH],
        "channels": parsed[CHANNELS],
        "image_id": parsed[IMAGE_ID],
        "file": parsed[FILE],
        "source": parsed[SOURCE],
        "sha256": parsed[SHA256],
        "group": parsed[GROUP],
        "label": parsed[LABEL],
        "boxes": tf.reshape(parsed[BOXES], [-1, 4]),
        "polygon_points": tf.reshape(parsed[POLYGON_POINTS], [-1, 2]),
        "polygon_lengths": parsed[POLYGON_LENGTHS],
        "meta": {c: parsed[meta_key(c)] for c in META_COLUMNS},
    }


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
    """Decode stored bytes to uint8 [H, W, C] exactly as the builder validated them."""
    return tf.io.decode_image(encoded, channels=0, expand_animations=False, dtype=tf.uint8)


def shard_name(split: str, index: int, count: int, name: str = "kerasfrac_synthetic") -> str:
    """TFDS' naming (``tfds.core.naming``): ``{name}-{split}.tfrecord-{i:05d}-of-{n:05d}``,
    ``name`` the TFDS dataset name (the dataset spec's ``tfds_name``)."""
    return _template(name, split).sharded_filepath(shard_index=index, num_shards=count).name


def _template(name: str, split: str, data_dir: str = "."):
    from tensorflow_datasets.core import naming

    return naming.ShardedFileTemplate(
        data_dir=data_dir, dataset_name=name, split=split, filetype_suffix="tfrecord"
    )


from tfrecords_builder.defaults import FORMAT_VERSION, MANIFEST  # noqa: E402,F401
