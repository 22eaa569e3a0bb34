"""Read what the builder wrote: a build (its manifest, counts and shard files) and its splits.

``Build.load(DIR)`` reads ``manifest.json`` once; the stages pass the ``Build`` down.
``Build.read(split)`` (and ``read_split(DIR, split)``) is the contract every later stage
uses: a ``tf.data.Dataset`` of dicts (see ``schema.parse_example``), with ``image`` decoded
to uint8 [H, W, C] when asked, in a deterministic order (shards in name order, records in
file order): the order of ``tfds.builder_from_directory(DIR).as_dataset(split,
read_config=tfds.ReadConfig(interleave_cycle_length=1))``, which reads the same TFDS shards
with the same parse spec (by default TFDS interleaves 16 shards: the same records, another
order).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import tensorflow as tf

from tfrecords_builder import datasets, schema


class BuildOutputError(ValueError):
    """A TFRecord directory that is missing, incomplete or not what the caller expected."""


def load_manifest(directory: str | Path) -> dict:
    """Load ``DIR/manifest.json``; a clear error if DIR is not a finished build."""
    directory = Path(directory)
    if not directory.is_dir():
        raise BuildOutputError(
            f"TFRecord directory {str(directory)!r} does not exist. Build it first with "
            f"`kerasfrac build {{{','.join(datasets.names())}}} --source SRC "
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


@dataclass(frozen=True)
class Build:
    """A build loaded once: its directory and manifest (counts per split and class, shard
    files). ``Build.load`` checks what the caller needs; errors name the fix."""

    dir: Path
    manifest: dict

    @classmethod
    def load(cls, directory: str | Path, dataset: str | None = None) -> Build:
        """The build in ``directory``; ``dataset`` (the config's dataset name), when given,
        must be the manifest's source."""
        if directory is None or str(directory) == "":
            raise BuildOutputError(
                "no TFRecord directory configured: set data.dir in the config or pass "
                "--set data.dir=DIR (a directory written by `kerasfrac build`)"
            )
        build = cls(Path(directory), load_manifest(directory))
        if dataset is not None and build.source != dataset:
            raise BuildOutputError(
                f"{str(directory)!r} holds the {build.source!r} dataset but the config says "
                f"dataset={dataset!r}; point data.dir at a {dataset} build or set "
                f"dataset={build.source}"
            )
        return build

    @property
    def source(self) -> str | None:
        return self.manifest.get("source")

    def counts(self, split: str) -> dict[int, int]:
        """``{label: count}`` of ``split`` (0 = normal, 1 = fractured)."""
        try:
            counts = self.manifest["splits"][split]
            return {label: int(counts.get(name, 0)) for label, name in schema.LABEL_NAMES.items()}
        except (KeyError, TypeError, AttributeError) as e:
            raise BuildOutputError(
                f"manifest has no per-class counts for split {split!r} (expected "
                f'"splits": {{"{split}": {{"fractured": n, "normal": n}}}}); rebuild the '
                "TFRecords"
            ) from e

    def size(self, split: str) -> int:
        return sum(self.counts(split).values())

    def check_batch(self, batch_size: int, split: str = "train") -> None:
        """A batch must fit in the split it is drawn from."""
        n = self.size(split)
        if batch_size > n:
            raise BuildOutputError(
                f"train.batch_size={batch_size} is larger than the {split!r} split of "
                f"{str(self.dir)!r} ({n} images); use a smaller batch size"
            )

    def shard_files(self, split: str) -> list[str]:
        """The shard files of one split, as listed in the manifest, in order."""
        if split not in schema.SPLITS:
            raise BuildOutputError(f"unknown split {split!r}; expected one of {schema.SPLITS}")
        names = self.manifest.get("shards", {}).get(split)
        if names is None:
            raise BuildOutputError(f"manifest of {str(self.dir)!r} lists no shards for {split!r}")
        files = [str(self.dir / n) for n in names]
        missing = [f for f in files if not Path(f).is_file()]
        if missing:
            raise BuildOutputError(
                f"{len(missing)} shard file(s) of split {split!r} listed in the manifest are "
                f"missing, e.g. {missing[0]!r}; rebuild with --overwrite."
            )
        return files

    def read(self, split: str, decode: bool = True) -> tf.data.Dataset:
        """Parsed records of ``split``; with ``decode`` each dict also has ``image``."""
        ds = tf.data.TFRecordDataset(self.shard_files(split)).map(schema.parse_example)
        if decode:
            ds = ds.map(lambda ex: {**ex, "image": schema.decode_image(ex["encoded"])})
        return ds


def shard_files(directory: str | Path, split: str) -> list[str]:
    """The shard files of one split, as listed in the manifest, in order."""
    return Build.load(directory).shard_files(split)


def read_split(directory: str | Path, split: str, decode: bool = True) -> tf.data.Dataset:
    """Dataset of parsed records of ``split``; with ``decode`` each dict also has ``image``."""
    return Build.load(directory).read(split, decode)
