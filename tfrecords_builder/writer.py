"""Write shards and the manifest into a directory that appears complete or not at all.

Everything is written into a hidden staging folder beside the output
(``.NAME.incomplete-XXXX``) and renamed into place at the end: an interrupted build leaves only
that staging folder, which has no manifest at the output path and never looks complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
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


class BuildLockedError(OutputExistsError):
    """Another build is writing the same --out right now."""


def check_output(out: Path, overwrite: bool, source: Path | None = None) -> None:
    """Refuse an ``out`` that exists (without --overwrite), that is not a kerasfrac build
    (with it: --overwrite replaces builds only), or that is the source or holds it."""
    if source is not None:
        src, dst = Path(source).expanduser().resolve(), out.expanduser().resolve()
        if dst == src or dst in src.parents:
            raise OutputExistsError(
                f"output {str(out)!r} is the source {str(source)!r} or a folder holding it; "
                "writing there would replace the source. Choose an --out outside the source. "
                "Nothing was changed."
            )
    if not out.exists():
        return
    if not overwrite:
        raise OutputExistsError(
            f"output {str(out)!r} already exists; pass --overwrite to replace it, or choose "
            "another --out. Nothing was changed."
        )
    if not out.is_dir():
        raise OutputExistsError(f"output {str(out)!r} exists and is not a folder; remove it.")
    if any(out.iterdir()) and not (out / schema.MANIFEST).is_file():
        raise OutputExistsError(
            f"refusing to --overwrite {str(out)!r}: it is not a kerasfrac build (no "
            f"{schema.MANIFEST}), and --overwrite replaces only builds. Choose another --out, "
            "or delete it yourself. Nothing was changed."
        )


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``out`` for a build: ``.NAME.lock`` beside it, locked with
    flock (the kernel drops the lock when its process dies, so a killed build never leaves
    ``out`` locked) and deleted when the build ends."""
    import fcntl

    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.parent / f".{out.name}.lock"
    while True:
        f = open(path, "a+")  # closed below, or in the finally once locked
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise BuildLockedError(
                f"another build is writing {str(out)!r} right now ({holder} holds {str(path)!r});"
                " wait for it to finish, or choose another --out. Nothing was changed."
            ) from None
        try:
            same = os.fstat(f.fileno()).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        f.close()  # the lock file of a build that just ended: take the new one
    try:
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}\n")
        f.flush()
        yield
    finally:
        path.unlink(missing_ok=True)  # while still locked: a waiter then sees another inode
        f.close()


def clean_stale(out: Path) -> list[str]:
    """Remove what killed builds of ``out`` left beside it (call with the lock held, so none
    of it belongs to a live build); a previous build caught between the two renames of an
    overwrite is put back first. Returns one line per thing done."""
    done = []
    parent = out.parent
    if not parent.is_dir():
        return done
    for old in sorted(parent.glob(f".{glob.escape(out.name)}.old-*")):
        kept = old / out.name
        if not out.exists() and (kept / schema.MANIFEST).is_file():
            os.rename(kept, out)
            done.append(f"restored the previous build {str(out)!r} from {str(old)!r}")
        shutil.rmtree(old, ignore_errors=True)
        done.append(f"removed {str(old)!r} (left by a killed build)")
    for kind in ("incomplete", "extract"):  # extract-*: from builds before format 2
        for stale in sorted(parent.glob(f".{glob.escape(out.name)}.{kind}-*")):
            shutil.rmtree(stale, ignore_errors=True)
            done.append(f"removed {str(stale)!r} (left by a killed build)")
    return done


@contextlib.contextmanager
def staging(out: Path, overwrite: bool, source: Path | None = None) -> Iterator[Path]:
    """Yield a fresh staging folder; on success, move it to ``out`` atomically."""
    check_output(out, overwrite, source)
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


@dataclasses.dataclass
class WrittenSplit:
    """What ``write_split`` wrote: shard file names, records per shard (in name order, as
    TFDS' ``SplitInfo.shard_lengths``) and serialized record bytes (``SplitInfo.num_bytes``)."""

    names: list[str]
    lengths: list[int]
    num_bytes: int
    sha256: list[str] = dataclasses.field(default_factory=list)


def write_split(
    stage: Path,
    split: str,
    examples: Iterable[tf.train.Example],
    count: int,
    shards: int,
    name: str,
) -> WrittenSplit:
    """Round-robin ``count`` streamed ``examples`` over TFDS-named shard files of dataset
    ``name`` (Model Garden's tfrecord_lib pattern), so a split never has to be held in memory."""
    if count == 0:
        return WrittenSplit([], [], 0)
    n = shard_count(shards, count)
    names = [schema.shard_name(split, i, n, name) for i in range(n)]
    lengths, num_bytes = [0] * n, 0
    writers = [tf.io.TFRecordWriter(str(stage / name)) for name in names]
    try:
        for i, example in enumerate(examples):
            record = schema.serialize(example)
            writers[i % n].write(record)
            lengths[i % n] += 1
            num_bytes += len(record)
    finally:
        for w in writers:
            w.close()
    from tfrecords_builder.reader import sha256

    return WrittenSplit(names, lengths, num_bytes, [sha256(stage / name) for name in names])


def write_manifest(stage: Path, manifest: dict) -> None:
    with (stage / schema.MANIFEST).open("w") as f:
        json.dump(manifest, f, indent=2, sort_keys=False)
        f.write("\n")
