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

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

import tensorflow as tf

from tfrecords_builder import schema
from tfrecords_builder.manifest import (  # noqa: F401  (re-exported: the reader's contract)
    BuildOutputError,
    check_data_dir,
    load_manifest,
    require_data_dir,
)


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
        require_data_dir(directory)
        build = cls(Path(directory), load_manifest(directory))
        build.check_counts()
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

    def rebuild_command(self) -> str:
        """The command that writes this build again (its source, seed and options as the
        manifest records them)."""
        m, o = self.manifest, self.manifest.get("options") or {}
        parts = [f"kerasfrac build {m.get('source', '...')}"]
        parts.append(f"--source {m.get('source_path', 'SRC')} --out {self.dir}")
        if "seed" in m:
            parts.append(f"--seed {m['seed']}")
        if o.get("split"):
            parts.append("--split " + ",".join(f"{x:g}" for x in o["split"]))
        if o.get("shards"):
            parts.append(f"--shards {o['shards']}")
        return " ".join(parts + ["--overwrite"])

    def check_counts(self) -> None:
        """Cheap (record headers only): each split's shards hold the records the manifest
        counts, per shard where it lists them (``shard_records``) and per split; a shard that
        ends inside a record is named."""
        for split in schema.SPLITS:
            if split not in (self.manifest.get("shards") or {}):
                continue
            files = self.shard_files(split)
            found = [count_records(f) for f in files]
            listed = (self.manifest.get("shard_records") or {}).get(split)
            if listed is not None and list(listed) != found:
                bad = next(i for i, (a, b) in enumerate(zip(listed, found)) if a != b)
                raise BuildOutputError(
                    f"shard {Path(files[bad]).name!r} of split {split!r} in {str(self.dir)!r} "
                    f"holds {found[bad]} records, but its manifest.json says {listed[bad]}: "
                    f"the build was edited or damaged. Rebuild it: `{self.rebuild_command()}`"
                )
            if sum(found) != self.size(split):
                raise BuildOutputError(
                    f"split {split!r} of {str(self.dir)!r} holds {sum(found)} records, but its "
                    f"manifest.json counts {self.size(split)} ({self.manifest['splits'][split]}):"
                    f" the build was edited or damaged. Rebuild it: `{self.rebuild_command()}`"
                )

    def verify(self, splits=schema.SPLITS, hashes: bool = False) -> dict[str, int]:
        """Read every record of ``splits`` (their checksums: TFRecord's CRCs), and with
        ``hashes`` compare each shard's sha256 with the manifest's (``shard_sha256``; builds
        from before it have none). A damaged shard raises one ``BuildOutputError`` naming the
        split, the shard and the rebuild command. Returns ``{split: records}``."""
        done = {}
        sums = self.manifest.get("shard_sha256") or {}
        for split in splits:
            if split not in (self.manifest.get("shards") or {}):
                continue
            total = 0
            for i, name in enumerate(self.shard_files(split)):
                total += self._read_shard(split, name)
                want = (sums.get(split) or [None] * (i + 1))[i] if hashes else None
                if want is not None and sha256(name) != want:
                    raise BuildOutputError(
                        f"shard {Path(name).name!r} of split {split!r} in {str(self.dir)!r} does"
                        " not match the sha256 its manifest.json records: it was changed after "
                        f"the build. Rebuild it: `{self.rebuild_command()}`"
                    )
            done[split] = total
        return done

    def _read_shard(self, split: str, name: str) -> int:
        n = 0
        try:
            for _ in tf.data.TFRecordDataset(name).as_numpy_iterator():
                n += 1
        except tf.errors.OpError as err:
            first = (err.message or str(err)).splitlines()[0][:200]
            raise BuildOutputError(
                f"shard {Path(name).name!r} of split {split!r} in {str(self.dir)!r} is damaged "
                f"after record {n} ({type(err).__name__}: {first}). Rebuild it: "
                f"`{self.rebuild_command()}`"
            ) from None
        return n

    def read(self, split: str, decode: bool = True) -> tf.data.Dataset:
        """Parsed records of ``split``; with ``decode`` each dict also has ``image``."""
        ds = tf.data.TFRecordDataset(self.shard_files(split)).map(schema.parse_example)
        if decode:
            ds = ds.map(lambda ex: {**ex, "image": schema.decode_image(ex["encoded"])})
        return ds


def count_records(path: str | Path) -> int:
    """The records in a TFRecord file, from its record headers alone (length, CRC of the
    length, data, CRC of the data: the data is skipped, not read); a ``BuildOutputError``
    where the file ends inside a record (truncated)."""
    n = 0
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        at = 0
        while at < size:
            f.seek(at)
            header = f.read(8)
            if len(header) < 8:
                break
            at += 8 + 4 + struct.unpack("<Q", header)[0] + 4
            if at > size:
                break
            n += 1
        if at != size:
            raise BuildOutputError(
                f"shard {str(path)!r} ends inside its record {n + 1} (truncated: {size} bytes); "
                "the build was damaged. Rebuild it with `kerasfrac build ... --overwrite`."
            )
    return n


def sha256(path: str | Path) -> str:
    """The file's sha256 (hex), read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def shard_files(directory: str | Path, split: str) -> list[str]:
    """The shard files of one split, as listed in the manifest, in order."""
    return Build.load(directory).shard_files(split)


def read_split(directory: str | Path, split: str, decode: bool = True) -> tf.data.Dataset:
    """Dataset of parsed records of ``split``; with ``decode`` each dict also has ``image``."""
    return Build.load(directory).read(split, decode)
