"""tf.data pipelines over the builder's TFRecords: the report's three preprocessing variants.

Elements are ``(image, label)`` with ``image`` float32 [S, S, C] in [0, 1] (C = 1 grayscale,
3 otherwise) and ``label`` float32 (1 = fractured, 0 = normal); ``make_eval_dataset(...,
with_ids=True)`` adds the image id for writing predictions.

Training (split "train", ``training=True``), in this order:

    shard files -> interleave -> parse -> [per class: filter] -> decode/grayscale/resize
      (uint8) -> cache -> [flip-expand] -> shuffle -> repeat -> sample_from_datasets (50/50)
      -> draw each image's augmentation -> batch -> float32, [flips, warp, intensity] of the
      whole batch (``augment.augment_batch``) -> prefetch

with ``data.oversample`` on (the report: the minority class is upsampled to the majority's
size); the stream is infinite and an epoch is ``steps_per_epoch`` batches of
2 x majority-count images (x3 with flip-expand). With oversample off it is the plain train
split, shuffled, finite. Evaluation (val/test, or ``training=False``): shards read in order,
no shuffle, no repeat, no augmentation, the same order as ``tfrecords_builder.read_split``.
Images stay uint8 up to the cache (a quarter of float32's memory) and become float32 after
it (training: a batch at a time, in ``augment_batch``), so cached and uncached epochs give the
model the same tensors (``decode_resize``).

The pipeline knows no model; the model knows no files.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from kerasfrac.data.augment import (
    augment_batch_parts,
    box_mask,
    draw_params,
    flip_expand,
    outline_mask,
)
from kerasfrac.data.decode import decode_resize, image_shape, to_float
from kerasfrac.names import FLIPS
from tfrecords_builder import metadata, schema
from tfrecords_builder.defaults import META_TARGETS
from tfrecords_builder.reader import Build, BuildOutputError

AUTOTUNE = tf.data.AUTOTUNE


# --------------------------------------------------------------------------- pure ops


# --------------------------------------------------------------------------- manifest checks


def check_build(
    build: Build | str | Path | None,
    dataset: str | None = None,
    batch_size: int | None = None,
    needs_val: bool = False,
) -> Build:
    """The build (loaded once: a ``Build`` passes through), checked before any heavy work.

    Errors (``BuildOutputError``, a ValueError) name what is wrong and how to fix it: no
    data dir configured, a missing directory or manifest, a manifest of another dataset than
    ``dataset``, a ``batch_size`` larger than the training split, no val split
    (``needs_val``).
    """
    if not isinstance(build, Build):
        build = Build.load(build, dataset)
    elif dataset is not None and build.source != dataset:
        build = Build.load(build.dir, dataset)  # raises the error that names both
    if batch_size is not None:
        build.check_batch(batch_size)
    if needs_val and build.size("val") == 0:
        raise BuildOutputError(
            f"{str(build.dir)!r} has no images in its val split, which training needs (it "
            "reports val AUROC each epoch and keeps the best epoch by it); rebuild with a "
            "val share, e.g. `kerasfrac build ... --split 0.7,0.15,0.15`"
        )
    return build


def _as_build(build: Build | str | Path | None, data_cfg, dataset: str | None) -> Build:
    """``build`` itself, or the build in that directory (``data_cfg.dir`` when None)."""
    if build is None:
        build = data_cfg.dir
    return check_build(build, dataset)


def epoch_images(build: Build, data_cfg) -> int:
    """Training images per epoch before batching: 2 x the majority class with oversampling,
    else the whole train split; x3 with flip-expand (each image and its two flips)."""
    counts = build.counts("train")
    n = 2 * max(counts.values()) if data_cfg.oversample else sum(counts.values())
    return n * (3 if data_cfg.flips == "expand" else 1)


def steps_per_epoch(build: Build, data_cfg, batch_size: int) -> int | None:
    """Batches per training epoch with oversampling: ceil(2 x majority (x3 expand) / batch).

    None without oversampling (the finite train split ends the epoch by itself).
    """
    if not data_cfg.oversample:
        return None
    return math.ceil(epoch_images(build, data_cfg) / batch_size)


@dataclass
class SplitRecords:
    """What a split's records hold besides the image, in read order (the order of
    ``make_eval_dataset``): ids, labels (0/1), duplicate groups, metadata columns
    (``{column: int array}``, -1 = unknown), fracture boxes ([N, 4] ymin, xmin, ymax, xmax,
    normalised), each box's fracture outline (a list per image of [P, 2] (y, x) arrays, one per
    box, empty where a box has none) and the stored image sizes."""

    ids: list[str]
    labels: np.ndarray
    groups: list[str]
    meta: dict[str, np.ndarray]
    boxes: list[np.ndarray]
    heights: np.ndarray
    widths: np.ndarray
    polygons: list[list[np.ndarray]]


def split_records(build: Build | str | Path, split: str) -> SplitRecords:
    """One pass over ``split`` without decoding an image (see ``SplitRecords``)."""
    build = check_build(build)
    ids, labels, groups, boxes, heights, widths, polygons = [], [], [], [], [], [], []
    meta: dict[str, list[int]] = {}
    for ex in build.read(split, decode=False).as_numpy_iterator():
        ids.append(ex["image_id"].decode())
        labels.append(int(ex["label"]))
        groups.append(ex["group"].decode())
        boxes.append(np.asarray(ex["boxes"], dtype=np.float32).reshape(-1, 4))
        polygons.append(_outlines(ex["polygon_points"], ex["polygon_lengths"], len(boxes[-1])))
        heights.append(int(ex["height"]))
        widths.append(int(ex["width"]))
        for column, value in ex["meta"].items():
            meta.setdefault(column, []).append(int(value))
    return SplitRecords(
        ids,
        np.array(labels, dtype=int),
        groups,
        {c: np.array(v, dtype=int) for c, v in meta.items()},
        boxes,
        np.array(heights, dtype=int),
        np.array(widths, dtype=int),
        polygons,
    )


def _outlines(points, lengths, n_boxes: int) -> list[np.ndarray]:
    """One [P, 2] outline per box from a record's flat points and per-box lengths (a record
    written before outlines existed has none: empty outlines)."""
    points = np.asarray(points, np.float32).reshape(-1, 2)
    lengths = [int(n) for n in lengths]
    if len(lengths) != n_boxes:
        return [np.zeros((0, 2), np.float32) for _ in range(n_boxes)]
    ends = np.cumsum(lengths)
    return [points[e - n : e] for n, e in zip(lengths, ends)]


# --------------------------------------------------------------------------- pipelines


def _parse(serialized):
    ex = schema.parse_example(serialized)
    return ex["encoded"], ex["label"], ex["image_id"]


def _parse_with_targets(serialized, meta_of=None):
    """The features of the auxiliary targets beside image, label and id: boxes, the original
    height and width, the ``META_TARGETS`` columns as float32 (-1 = unknown; ``meta_of``:
    the build's own targets by image id, ``_meta_lookup``), and the boxes' outlines (flat
    points, points per box)."""
    ex = schema.parse_example(serialized)
    if meta_of is None:
        meta = tf.stack([tf.cast(ex["meta"][c], tf.float32) for c in META_TARGETS])
    else:
        meta = meta_of(ex["image_id"])
    outline = (ex["polygon_points"], ex["polygon_lengths"])
    return (
        ex["encoded"],
        ex["label"],
        ex["image_id"],
        ex["boxes"],
        ex["height"],
        ex["width"],
        meta,
        outline,
    )


def _check_boxes(build: Build) -> None:
    """``model.box_head`` on a build that records no fracture box (a folder or CSV build
    without ``--boxes``, a GRAZPEDWRI-DX build without its YOLO labels) is refused: the head
    would have nothing to learn. Builds whose manifest does not count boxes pass."""
    notes = build.manifest.get("notes") or {}
    if notes.get("images_with_boxes", 1) == 0:
        raise BuildOutputError(
            f"config key 'model.box_head' learns fracture boxes, but {str(build.dir)!r} "
            f"({build.source}) records none (its manifest.json notes: images_with_boxes 0): "
            "set model.box_head=false, or rebuild with boxes (folder and csv layouts: "
            "--boxes COCO.json or a folder of YOLO .txt files)"
        )


def _meta_lookup(build: Build):
    """``image id -> float32 [T]``: the ``model.meta_head`` targets of a build whose metadata
    lives in metadata.csv (``tfrecords_builder.metadata``; -1 unknown); None where the records
    carry FracAtlas' flags (``META_TARGETS``). A build without targets is refused."""
    if not metadata.targets(build.manifest):
        raise BuildOutputError(
            f"model.meta_head learns a build's metadata columns, but {str(build.dir)!r} records "
            "none it can learn (binary or categorical columns; see its manifest.json "
            "'metadata'): set model.meta_head=false, or rebuild with metadata columns (a CSV: "
            "--meta-columns)"
        )
    table = metadata.read(build.dir, build.manifest)
    if table is None:
        return None
    ids = sorted(table.index, key=table.index.get)
    lookup = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(
            tf.constant(ids, tf.string), tf.range(len(ids), dtype=tf.int64)
        ),
        default_value=len(ids),
    )
    unknown = -np.ones((1, table.targets.shape[1]), np.float32)
    matrix = tf.constant(np.concatenate([table.targets, unknown]), tf.float32)
    return lambda image_id: tf.gather(matrix, lookup.lookup(image_id))


def _parse_image_label_id(serialized):
    """Only the three features evaluation needs (the full record also parses boxes and 12
    metadata columns, 40 % more parse time)."""
    spec = schema.feature_spec()
    keys = (schema.ENCODED, schema.LABEL, schema.IMAGE_ID)
    ex = tf.io.parse_single_example(serialized, {k: spec[k] for k in keys})
    return tuple(ex[k] for k in keys)


def _records(files: list[str], training: bool) -> tf.data.Dataset:
    """Serialized records of ``files``.

    Training reads several shards in parallel (I/O bound on network file systems); the
    interleave is still deterministic because, with caching, the read order is frozen after
    the first epoch anyway and randomness comes from the seeded shuffles after the cache.
    Evaluation reads the shards one after the other (cycle_length=1): the order of
    ``read_split``, so predictions line up with it.
    """
    files_ds = tf.data.Dataset.from_tensor_slices(files)
    cycle = min(len(files), 8) if training else 1
    if cycle == 1:
        return files_ds.interleave(tf.data.TFRecordDataset, cycle_length=1)
    return files_ds.interleave(
        tf.data.TFRecordDataset, cycle_length=cycle, num_parallel_calls=AUTOTUNE, deterministic=True
    )


def _decode(data_cfg):
    def fn(encoded, label, image_id):
        image = decode_resize(encoded, data_cfg.image_size, data_cfg.grayscale, data_cfg.resize)
        return image, tf.cast(label, tf.float32), image_id

    return fn


def _decode_with_targets(data_cfg, with_boxes: bool, with_meta: bool, box_target: str = "box"):
    """(image, label, id, *targets): with boxes, the image carries the box mask as an extra
    last channel and the targets begin with the box-loss weight; with meta, they end with the
    ``META_TARGETS`` vector.

    The mask rides along as a channel so that every geometric step after the cache (flips,
    flip-expand, the affine warp) moves image and boxes together. The weight is 0 for a
    fractured image without boxes (its mask would wrongly say "no fracture"), else 1.
    ``box_target="outline"``: the mask is the fractures' outlines (``augment.outline_mask``;
    a box without one counts whole), not their boxes.
    """

    decode = _decode(data_cfg)

    def fn(encoded, label, image_id, boxes, height, width, meta, outline):
        image, y, image_id = decode(encoded, label, image_id)
        targets = ()
        if with_boxes and box_target == "outline":
            mask = outline_mask(
                boxes, *outline, height, width, data_cfg.image_size, data_cfg.resize
            )
        elif with_boxes:
            mask = box_mask(boxes, height, width, data_cfg.image_size, data_cfg.resize)
        if with_boxes:
            mask = tf.cast(mask * 255.0, tf.uint8)  # 0/255: exactly 0/1 again after to_float
            image = tf.concat([image, mask], -1)
            has_boxes = tf.shape(boxes)[0] > 0
            targets += (tf.cast(tf.logical_or(tf.equal(label, 0), has_boxes), tf.float32),)
        if with_meta:
            targets += (meta,)
        return (image, y, image_id, *targets)

    return fn


#: Part of the disk cache's file name: a cache written by another preprocessing (float32
#: images before this version) is never read back as uint8.
CACHE_FORMAT = "uint8-area-v2"


def cache_bytes_per_image(data_cfg) -> int:
    """Bytes of image data the cache holds per image: uint8 S x S x C (a quarter of float32)."""
    return math.prod(image_shape(data_cfg))


def _cache(ds: tf.data.Dataset, data_cfg, build: Build, name: str, as_float=True):
    """Cache decoded, resized uint8 images, then convert to float32 (``to_float``) after it.

    Before augmentation, so flips stay fresh and cheap. uint8 is what the JPEG held, so the
    cache costs a quarter of float32 (224 px grayscale: 49 KiB per image; 512 px: 256 KiB)
    and cached and uncached epochs give the same tensors. ``memory``: in RAM; ``none``:
    decode every epoch; otherwise a directory of cache files whose names carry a hash of the
    manifest and the preprocessing settings, so a rebuilt dataset or another image size never
    reuses a stale cache. Two runs must not fill the same cache files at once (tf.data locks
    them). ``as_float=False`` leaves the images uint8 (``_finish`` converts whole batches).
    """
    if data_cfg.cache == "memory":
        ds = ds.cache()
    elif data_cfg.cache != "none":
        directory = Path(data_cfg.cache).expanduser()
        directory.mkdir(parents=True, exist_ok=True)
        key = json.dumps(
            [
                str(build.dir.resolve()),
                build.manifest,
                data_cfg.image_size,
                data_cfg.grayscale,
                data_cfg.resize,
                CACHE_FORMAT,
            ],
            sort_keys=True,
        )
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        ds = ds.cache(str(directory / f"{name}-{data_cfg.image_size}-{digest}"))
    if not as_float:
        return ds
    return ds.map(lambda image, *rest: (to_float(image), *rest), num_parallel_calls=AUTOTUNE)


def _finish(
    ds: tf.data.Dataset, batch_size: int, with_ids: bool, uint8: bool = False
) -> tf.data.Dataset:
    def as_dict(image, label, image_id):
        return {"image": image, "label": label, **({"id": image_id} if with_ids else {})}

    ds = ds.map(as_dict)
    # drop_remainder=False: every image counts in evaluation. Prefetch last so the model
    # never waits for the next batch.
    ds = ds.batch(batch_size, drop_remainder=False)
    if uint8:  # uint8 images to float32 a batch at a time (``to_float``, as after any cache)
        ds = ds.map(lambda b: {**b, "image": to_float(b["image"])}, num_parallel_calls=AUTOTUNE)
    return ds.prefetch(AUTOTUNE)


def make_eval_dataset(
    build: Build | str | Path | None,
    split: str,
    data_cfg,
    batch_size: int,
    with_ids: bool = False,
    *,
    dataset: str | None = None,
) -> tf.data.Dataset:
    """Deterministic batches of ``split``: dicts ``{"image", "label"}``, plus ``"id"`` (the
    image ids) ``with_ids``.

    Same decode/grayscale/resize as training; no oversampling, augmentation, shuffle or
    repeat; order = ``Build.read`` order. ``build``: a ``Build`` or its directory (None:
    ``data_cfg.dir``).
    """
    build = _as_build(build, data_cfg, dataset)
    files = build.shard_files(split)
    n = build.size(split)
    decode = _decode(data_cfg)
    # Parse and decode in one parallel map, order kept (deterministic=True), so predictions
    # line up with ids.
    ds = _records(files, training=False).map(
        lambda record: decode(*_parse_image_label_id(record)),
        num_parallel_calls=AUTOTUNE,
        deterministic=True,
    )
    # Tells Keras the epoch length (progress bar) and fails loudly if the manifest lies.
    ds = ds.apply(tf.data.experimental.assert_cardinality(n))
    ds = _cache(ds, data_cfg, build, split, as_float=False)
    return _finish(ds, batch_size, with_ids, uint8=True)


def make_dataset(
    build: Build | str | Path | None,
    split: str,
    data_cfg,
    batch_size: int,
    seed: int = 0,
    training: bool | None = None,
    *,
    dataset: str | None = None,
    with_boxes: bool = False,
    with_meta: bool = False,
    box_target: str = "box",
    repeat: bool = False,
    skip_batches: int = 0,
) -> tuple[tf.data.Dataset, int | None]:
    """``(dataset of batches, steps_per_epoch or None)``; a training batch is a dict
    ``{"image", "label"}``.

    ``with_boxes`` (training only, for ``model.box_head``): plus ``box_mask`` [B, S, S, 1]
    (transformed with the image, ``augment.box_mask``) and ``box_weight`` [B] (0 for a
    fractured image without boxes; ``box_target="outline"``: the fractures' outlines instead of
    their boxes, ``augment.outline_mask``). ``with_meta`` (training only, for ``model.meta_head``):
    plus ``meta``, the ``META_TARGETS`` columns, float32 [B, len(META_TARGETS)], -1 where
    unknown (a build whose metadata lives in metadata.csv: its own targets,
    ``tfrecords_builder.metadata.targets``).

    ``repeat``: the finite stream (no oversampling) repeated, epoch after epoch, each
    reshuffled (the oversampled stream is infinite already). ``skip_batches``: the stream from
    its batch ``skip_batches`` on, exactly as it would have gone on (a resumed run); the
    skipped batches are drawn but not augmented, so skipping costs a fraction of training.

    ``training`` defaults to ``split == "train"``. Training with ``data_cfg.oversample``
    gives an infinite, class-balanced stream and its steps per epoch; without, the finite
    shuffled split and None. ``training=False`` gives ``make_eval_dataset`` and None.
    ``dataset`` (the config's dataset name) is checked against the manifest's source.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive; got {batch_size}")
    if training is None:
        training = split == "train"
    if not training:
        return make_eval_dataset(build, split, data_cfg, batch_size, dataset=dataset), None
    if data_cfg.flips not in FLIPS:
        raise ValueError(f"data.flips must be one of {FLIPS}; got {data_cfg.flips!r}")
    build = _as_build(build, data_cfg, dataset)
    build.check_batch(batch_size, split)
    channels = image_shape(data_cfg)[-1]
    if with_boxes:
        _check_boxes(build)
    targets = with_boxes or with_meta
    meta_of = _meta_lookup(build) if with_meta else None
    records = _Records(
        build,
        split,
        data_cfg,
        parse=functools.partial(_parse_with_targets, meta_of=meta_of) if targets else _parse,
        decode=_decode_with_targets(data_cfg, with_boxes, with_meta, box_target)
        if targets
        else _decode(data_cfg),
        tag=("-outlines" if with_boxes and box_target == "outline" else "")
        + ("-boxes" if with_boxes else "")
        + ("-meta" if with_meta else ""),
    )
    if data_cfg.oversample:
        ds = _balanced_stream(records, seed)
        steps = steps_per_epoch(build, data_cfg, batch_size)
    else:
        ds, steps = _shuffled_split(records, seed), None
    # Each image's augmentation is drawn after shuffle/repeat (each pass draws anew) and
    # applied a batch at a time (one op per batch, not one per image: a third of the CPU time).
    ds = draw_params(ds, data_cfg, seed).batch(batch_size)
    if repeat and not data_cfg.oversample:
        ds = ds.repeat()  # after batching: each epoch ends on its own last batch, as before
    if skip_batches:
        ds = ds.skip(skip_batches)  # before the augmentation, a pure function of its draws
    ds = ds.map(
        _as_training_dict(data_cfg, channels, with_boxes, with_meta), num_parallel_calls=AUTOTUNE
    )
    # The infinite training stream has no remainder; prefetch last so the model never waits.
    return ds.prefetch(AUTOTUNE), steps


@dataclass
class _Records:
    """A training split's decoded elements, before the class streams and augmentation."""

    build: Build
    split: str
    data_cfg: object
    parse: object
    decode: object
    tag: str

    def decoded(self, label: int | None = None) -> tf.data.Dataset:
        """Parsed, decoded and cached elements (of one class where ``label`` is given);
        flip-expanded after the cache (3x the images for 1x the memory) where asked."""
        ds = _records(self.build.shard_files(self.split), training=True).map(self.parse)
        name = f"{self.split}{self.tag}"
        if label is not None:
            # Filter on the parsed label BEFORE decoding: each class decodes only its images,
            # and each class stream gets its own cache (two streams filling one file cache
            # at once would collide on its lock).
            ds = ds.filter(lambda *el: tf.equal(el[1], label))
            name = f"{self.split}-class{label}{self.tag}"
        ds = ds.map(self.decode, num_parallel_calls=AUTOTUNE)
        ds = _cache(ds, self.data_cfg, self.build, name, as_float=False)  # augment_batch converts
        return flip_expand(ds) if self.data_cfg.flips == "expand" else ds


def _balanced_stream(records: _Records, seed: int) -> tf.data.Dataset:
    """The infinite, class-balanced training stream (``data.oversample``)."""
    counts = records.build.counts(records.split)
    empty = [schema.LABEL_NAMES[c] for c, k in counts.items() if k == 0]
    if empty:
        raise BuildOutputError(
            f"cannot oversample: the {records.split!r} split of {str(records.build.dir)!r} has "
            f"no {empty[0]!r} images; rebuild with both classes or set data.oversample=false"
        )
    streams = []
    for label in sorted(counts):
        # Flip-expanded (in ``decoded``) before the shuffle, so the three versions of an
        # image are spread out. Shuffle within the class before repeating: a fresh order every
        # pass, and the minority class (repeated several times per epoch) is not replayed in
        # one order.
        s = records.decoded(label)
        s = s.shuffle(
            records.data_cfg.shuffle_buffer, seed=seed + 1 + label, reshuffle_each_iteration=True
        )
        streams.append(s.repeat())
    # 50/50 draws from the two infinite class streams: balanced in expectation, the report's
    # upsampling of the minority class without storing copies. Infinite, so the epoch length
    # is explicit: 2 x majority count (x3 with flip-expand) images.
    return tf.data.Dataset.sample_from_datasets(streams, weights=[0.5, 0.5], seed=seed)


def _shuffled_split(records: _Records, seed: int) -> tf.data.Dataset:
    """The training split once (flip-expanded where asked), seeded and reshuffled every
    epoch (each epoch iterates the dataset anew)."""
    n = records.build.size(records.split) * (3 if records.data_cfg.flips == "expand" else 1)
    ds = records.decoded().apply(tf.data.experimental.assert_cardinality(n))
    return ds.shuffle(records.data_cfg.shuffle_buffer, seed=seed, reshuffle_each_iteration=True)


def _as_training_dict(data_cfg, channels: int, with_boxes: bool, with_meta: bool):
    """Batch ``(uint8 image[+ mask channel], label, id, [box weight], [meta], augmentation
    parameters)`` -> the augmented float32 batch (``augment_batch_parts``) as the dict the
    training step reads by name (the box mask rode along as the image's last channel up to
    here, and moves with it in the warp)."""

    def as_dict(x, label, image_id, *rest):
        rest = list(rest)
        image, mask = augment_batch_parts(x, rest.pop(), data_cfg, channels)
        batch = {"image": image, "label": label}
        if with_boxes:
            batch["box_mask"], batch["box_weight"] = mask, rest.pop(0)
        if with_meta:
            batch["meta"] = rest.pop(0)
        return batch

    return as_dict
