"""Read what the builder wrote: the manifest and the shards of one split.

``read_split(DIR, split)`` is the contract every later stage uses. It returns a
``tf.data.Dataset`` of dicts (see ``schema.parse_example``) with ``image`` decoded to uint8
[H, W, C], in a deterministic order (shards in name order, records in file order): the order
of ``tfds.builder_from_directory(DIR).as_dataset(split, read_config=tfds.ReadConfig(
interleave_cycle_length=1))``, which reads the same TFDS shards with the same parse spec (by
default TFDS interleaves 16 shards: the same records, another order).
"""

from __future__ import annotations

import json
from pathlib import Path

import tensorflow as tf

from tfrecords_builder import schema


class BuildOutputError(ValueError):
    """A TFRecord directory that is missing, incomplete or not what the caller expected."""


def load_manifest(directory: str | Path) -> dict:
    """Load ``DIR/manifest.json``; a clear error if DIR is not a finished build."""
    directory = Path(directory)
    if not directory.is_dir():
        raise BuildOutputError(
            f"TFRecord directory {str(directory)!r} does not exist. Build it first with "
            "`kerasfrac build {fracatlas,tibia-fibula,synthetic} --source SRC "
            f"--out {directory}`."
        )
    path = directory / schema.MANIFEST
    if not path.is_file():
        found = sorted(p.name for p in directory.iterdir())[:10]
        raise BuildOutputError(
            f"{str(directory)!r} has no {schema.MANIFEST}, so it is not a finished kerasfrac build "
            f"(found: {found or 'nothing'}). Rebuild it with `kerasfrac build ... --out {directory}"
            " --overwrite`."
        )
    with path.open() as f:
        manifest = json.load(f)
    if manifest.get("format_version") == 1:
        raise BuildOutputError(
            f"{str(directory)!r} was built by an older kerasfrac (format 1: Model Garden-style "
            f"shards; format {schema.FORMAT_VERSION} is a tensorflow-datasets dataset). Rebuild it "
            f"with `kerasfrac build ... --out {directory} --overwrite`."
        )
    return manifest


def shard_files(directory: str | Path, split: str) -> list[str]:
    """The shard files of one split, as listed in the manifest, in order."""
    if split not in schema.SPLITS:
        raise BuildOutputError(f"unknown split {split!r}; expected one of {schema.SPLITS}")
    directory = Path(directory)
    manifest = load_manifest(directory)
    names = manifest.get("shards", {}).get(split)
    if names is None:
        raise BuildOutputError(f"manifest of {str(directory)!r} lists no shards for {split!r}")
    files = [str(directory / n) for n in names]
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise BuildOutputError(
            f"{len(missing)} shard file(s) of split {split!r} listed in the manifest are missing, "
            f"e.g. {missing[0]!r}; rebuild with --overwrite."
        )
    return files


def read_split(directory: str | Path, split: str, decode: bool = True) -> tf.data.Dataset:
    """Dataset of parsed records of ``split``; with ``decode`` each dict also has ``image``."""
    files = shard_files(directory, split)
    ds = tf.data.TFRecordDataset(files).map(schema.parse_example)
    if decode:
        ds = ds.map(lambda ex: {**ex, "image": schema.decode_image(ex["encoded"])})
    return ds
