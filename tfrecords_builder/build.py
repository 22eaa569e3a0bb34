"""``kerasfrac build``: a dataset as downloaded -> a finished build folder, or nothing.

``build`` checks the output, takes its lock, and has the dataset's TFDS builder
(``tfrecords_builder.tfds_builders``) prepare it in a staging folder that is renamed into place
when complete; the writing itself is ``tfrecords_builder.prepare.prepare_into``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tfrecords_builder import datasets, tfds_builders, writer
from tfrecords_builder.prepare import BuildOptions

__all__ = ["BuildOptions", "build"]


def build(dataset: str, source: str | Path, out: str | Path, opts: BuildOptions) -> dict:
    """Build ``dataset`` from ``source`` (folder or .zip) into ``out``; returns the manifest.

    ``out`` becomes a tensorflow-datasets dataset directory: the dataset's registered TFDS
    builder (``tfrecords_builder.tfds_builders``) prepares it, writing through
    ``prepare_into``, in a staging folder renamed into place when complete."""
    spec = datasets.dataset(dataset)  # an unknown name fails here, naming the registered ones
    if opts.boxes and not spec.boxes_option:
        takers = [n for n in datasets.names() if datasets.dataset(n).boxes_option]
        raise ValueError(
            f"--boxes is for the layouts {takers}; {dataset!r} finds its boxes (or has none) in "
            "--source itself. Leave --boxes out."
        )
    for flag, value in (
        ("--image-root", opts.image_root),
        ("--meta-columns", opts.meta_columns),
    ):
        if value and not spec.listing:
            raise ValueError(
                f"{flag} is for layouts whose --source is a listing (csv); {dataset!r} "
                f"finds its images in --source itself. Leave {flag} out."
            )
    if opts.shards < 1:
        raise ValueError(f"--shards {opts.shards}: expected a positive number of shards per split")
    out = Path(out).expanduser()
    source = Path(source).expanduser()
    writer.check_output(out, opts.overwrite, source)  # refuse before any heavy work
    if spec.listing and opts.image_root:  # nor may it replace the images a listing names
        writer.check_output(out, opts.overwrite, Path(opts.image_root))
    _parent(out)
    with writer.locked(out):  # a second build of the same --out fails here, at once
        for line in writer.clean_stale(out):
            print(f"note: {line}", file=sys.stderr)
        writer.check_output(out, opts.overwrite, source)  # a restored build counts too
        with writer.staging(out, opts.overwrite, source) as stage:
            manifest = tfds_builders.prepare(dataset, source, stage, opts)
    return manifest


def _parent(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.parent
