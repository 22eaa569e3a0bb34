"""A build's manifest.json, read without TensorFlow: the commands check the path they were
given (``kerasfrac audit DIR``, a config's ``data.dir``) before TensorFlow's seconds-long
import, so a wrong path fails at once with the fix. ``tfrecords_builder.reader`` re-exports
these names.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from tfrecords_builder import datasets
from tfrecords_builder.defaults import FORMAT_VERSION, MANIFEST


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
    path = directory / MANIFEST
    if not path.is_file():
        found = sorted(p.name for p in directory.iterdir())[:10]
        names = ",".join(datasets.names())
        if not found:
            fix = f"Build into it: `kerasfrac build {{{names}}} --source SRC --out {directory}`."
        elif {"dataset.csv", "images", "Annotations"} & set(found) or any(
            p.suffix.lower() in (".jpg", ".jpeg", ".png", ".dcm")
            for p in itertools.islice(directory.rglob("*"), 5000)  # a look, not a crawl
        ):
            fix = (
                "It looks like a dataset as downloaded (images, not shards): build it first, "
                f"into another folder: `kerasfrac build {{{names}}} --source {directory} --out "
                f"{directory.parent / (directory.name + '-tfr')}`, then use that folder."
            )
        else:
            fix = (
                "Point it at the --out folder of `kerasfrac build`, or rebuild that folder with "
                f"`kerasfrac build ... --out {directory} --overwrite` if it held a build."
            )
        raise BuildOutputError(
            f"{str(directory)!r} has no {MANIFEST}, so it is not a finished kerasfrac build "
            f"(found: {found or 'nothing'}). {fix}"
        )
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict):
            raise ValueError(f"expected a JSON object, got {type(manifest).__name__}")
    except (UnicodeDecodeError, ValueError) as err:
        raise BuildOutputError(
            f"{str(path)!r} cannot be read ({str(err)[:200]}): the build was edited or damaged. "
            f"Rebuild it with `kerasfrac build ... --out {directory} --overwrite`."
        ) from err
    if manifest.get("format_version") == 1:
        raise BuildOutputError(
            f"{str(directory)!r} was built by an older kerasfrac (format 1: Model Garden-style "
            f"shards; format {FORMAT_VERSION} is a tensorflow-datasets dataset). Rebuild it "
            f"with `kerasfrac build ... --out {directory} --overwrite`."
        )
    return manifest


def read_manifest(directory: str | Path | None) -> dict | None:
    """``DIR/manifest.json`` where it can be read as a JSON object, else None (no directory
    given, the build moved or deleted, the file damaged): for the pages and tables that
    describe a run beside its build. ``load_manifest`` is the strict reader for the commands
    that need the build."""
    if directory is None or str(directory) == "":
        return None
    try:
        manifest = json.loads((Path(directory) / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def require_data_dir(directory: str | Path | None) -> None:
    """``BuildOutputError`` where no TFRecord directory is configured (``data.dir`` empty)."""
    if directory is None or str(directory) == "":
        raise BuildOutputError(
            "no TFRecord directory configured: set data.dir in the config or pass "
            "--set data.dir=DIR (a directory written by `kerasfrac build`)"
        )


def check_data_dir(directory: str | Path | None) -> dict:
    """The manifest of the build a config's ``data.dir`` names; ``BuildOutputError`` where
    none is configured or it is not a finished build (see ``load_manifest``)."""
    require_data_dir(directory)
    return load_manifest(directory)
