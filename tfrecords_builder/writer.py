"""Write shards and the manifest into a directory that appears complete or not at all.

Everything is written into a hidden staging folder beside the output
(``.NAME.incomplete-XXXX``) and renamed into place at the end: an interrupted build leaves only
that staging folder, which has no manifest at the output path and never looks complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import tensorflow as tf

from tfrecords_builder import schema


class OutputExistsError(FileExistsError):
    pass


def check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise OutputExistsError(
            f"output {str(out)!r} already exists; pass --overwrite to replace it, or choose "
            "another --out. Nothing was changed."
        )
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output {str(out)!r} exists and is not a folder; remove it.")


@contextlib.contextmanager
def staging(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a fresh staging folder; on success, move it to ``out`` atomically."""
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.incomplete-", dir=out.parent))
    try:
        yield stage
        if out.exists():  # overwrite: swap, then delete the old build
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / out.name)
            os.rename(stage, out)
            shutil.rmtree(old)
        else:
            os.rename(stage, out)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def shard_count(requested: int, records: int) -> int:
    """``requested`` shards, but no empty ones: a split of 3 images gets 3 shards."""
    return max(1, min(requested, records))


def write_split(
    stage: Path, split: str, examples: Iterable[tf.train.Example], count: int, shards: int
) -> list[str]:
    """Round-robin ``count`` streamed ``examples`` over shard files (Model Garden's
    tfrecord_lib pattern), so a split never has to be held in memory."""
    if count == 0:
        return []
    n = shard_count(shards, count)
    names = [schema.shard_name(split, i, n) for i in range(n)]
    writers = [tf.io.TFRecordWriter(str(stage / name)) for name in names]
    try:
        for i, example in enumerate(examples):
            # Deterministic: map entries sorted by key, so that the same source gives the
            # same shard bytes in every run (checksums of a build can be compared).
            writers[i % n].write(example.SerializeToString(deterministic=True))
    finally:
        for w in writers:
            w.close()
    return names


def write_manifest(stage: Path, manifest: dict) -> None:
    with (stage / schema.MANIFEST).open("w") as f:
        json.dump(manifest, f, indent=2, sort_keys=False)
        f.write("\n")
