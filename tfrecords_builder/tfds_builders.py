"""The tensorflow-datasets builders of the registered datasets (``tfrecords_builder.datasets``):
``fracatlas``, ``tibia_fibula`` and ``kerasfrac_synthetic`` built in, one class made from each
``DatasetSpec`` (``builder_class``). Importing this module registers the built-in ones, so that::

    import tfrecords_builder.tfds_builders  # noqa: F401  (registers the builders)
    ds = tfds.load("fracatlas", split="train", data_dir=DATA_DIR,
                   download_and_prepare_kwargs={"download_config":
                       tfds.download.DownloadConfig(manual_dir=FOLDER)})

prepares the dataset offline from the user's copy (a folder holding the dataset, extracted or as
its one .zip) exactly as ``kerasfrac build`` does: ``kerasfrac build`` runs these builders
(``prepare``), and both write through ``tfrecords_builder.prepare.prepare_into`` (validation,
quarantine, duplicate groups, stratified seeded splits, deterministic shards, the manifest).
Builder options (seed, split ratios, shards, ...) go in as ``options=BuildOptions(...)``
(``tfds.load(..., builder_kwargs={"options": ...})``); the defaults are ``kerasfrac build``'s.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from pathlib import Path

import tensorflow_datasets as tfds

from tfrecords_builder import datasets, schema
from tfrecords_builder.archive import SourceError
from tfrecords_builder.prepare import BuildOptions, prepare_into

_SPLITS_NOTE = (
    " kerasfrac's builder validates every file (corrupt, truncated or oversized images are "
    "quarantined and listed in manifest.json beside the dataset), groups byte-identical and "
    "pixel-confirmed near-duplicate images, and splits the groups train/val/test, stratified "
    "by label with a seed, so that no image has a copy in another split. The image bytes are "
    "the original files (never re-encoded). Label 1 = fractured, from the class folder."
)


class _KerasfracBuilder(tfds.core.dataset_builder.FileReaderBuilder):
    """One kerasfrac dataset as a TFDS builder; subclasses name the dataset and its info."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "kerasfrac's first TFDS release (build format 2)."}
    DATASET: str = ""  # kerasfrac's dataset name (tfrecords_builder.datasets.names())
    DESCRIPTION = ""
    HOMEPAGE = ""
    CITATION = ""
    LICENSE = "CC BY 4.0"
    IMAGE_CHANNELS = 3
    ENCODING_FORMAT: str | None = None
    HAS_META = False

    def __init__(self, *, options: BuildOptions | None = None, source=None, **kwargs):
        """``options``: how to build (``kerasfrac build``'s defaults when None); ``source``: a
        folder or .zip to build from instead of the download config's ``manual_dir``."""
        self.options = options if options is not None else BuildOptions()
        self.source = source
        self.manifest: dict | None = None
        # TFDS' constructor, on a folder not yet prepared, makes an empty temporary folder for
        # a GCS look-up (off here) and never removes it: one per build left in /tmp. It is
        # made inside a temporary folder of ours, removed on the way out.
        with tempfile.TemporaryDirectory(prefix="kerasfrac-tfds-") as scratch:
            system_tmp = tempfile.tempdir
            tempfile.tempdir = scratch
            try:
                super().__init__(**kwargs)
            finally:
                tempfile.tempdir = system_tmp

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION + _SPLITS_NOTE,
            features=schema.features(self.IMAGE_CHANNELS, self.ENCODING_FORMAT, self.HAS_META),
            supervised_keys=(schema.ENCODED, schema.LABEL),
            # Not an ordered dataset: TFDS users may shuffle files (shuffle_files=True). Read
            # with ReadConfig(interleave_cycle_length=1), TFDS gives read_split's order.
            disable_shuffling=False,
            homepage=self.HOMEPAGE,
            citation=self.CITATION,
            license=self.LICENSE,
        )

    def _download_and_prepare(self, dl_manager, download_config) -> None:
        source = self.source
        if source is None:
            source = manual_source(Path(dl_manager.manual_dir), self.name)
        stage = Path(os.fspath(self.data_dir))  # TFDS' incomplete.* folder while preparing
        self.manifest, written = prepare_into(
            stage, self.DATASET, source, self.options, self.name, self.HAS_META
        )
        self.info.set_splits(
            tfds.core.SplitDict(
                [
                    tfds.core.SplitInfo(
                        name=split,
                        shard_lengths=w.lengths,
                        num_bytes=w.num_bytes,
                        filename_template=schema._template(self.name, split, os.fspath(stage)),
                    )
                    for split, w in written.items()
                    if w.lengths  # TFDS has no empty splits; the manifest lists them
                ]
            )
        )


def builder_class(dataset: str) -> type[_KerasfracBuilder]:
    """The TFDS builder class of the registered ``dataset`` (made from its ``DatasetSpec`` the
    first time it is asked for; TFDS registers it under the spec's ``tfds_name``)."""
    if dataset not in _CLASSES:
        spec = datasets.dataset(dataset)
        attrs = {
            "__module__": __name__,
            "__doc__": spec.description,
            "name": spec.tfds_name,
            "DATASET": spec.name,
            "DESCRIPTION": spec.description,
            "HOMEPAGE": spec.homepage,
            "CITATION": spec.citation,
            "LICENSE": spec.license,
            "IMAGE_CHANNELS": spec.image_channels,
            "ENCODING_FORMAT": spec.encoding_format,
            "HAS_META": spec.with_meta,
            "MANUAL_DOWNLOAD_INSTRUCTIONS": spec.manual_download,
        }
        class_name = "".join(part.title() for part in spec.tfds_name.split("_"))
        _CLASSES[dataset] = type(class_name, (_KerasfracBuilder,), attrs)
    return _CLASSES[dataset]


_CLASSES: dict[str, type[_KerasfracBuilder]] = {}
#: The built-in datasets' builders, registered with TFDS on import (``tfds.load("fracatlas")``).
BUILDERS = {name: builder_class(name) for name in datasets.names()}


def manual_source(manual_dir: Path, name: str) -> Path:
    """The source in a ``manual_dir``: its only file when that is a .zip, else the folder."""
    entries = [p for p in manual_dir.iterdir() if not p.name.startswith(".")]
    zips = [p for p in entries if p.suffix.lower() == ".zip" and p.is_file()]
    if len(zips) == 1 and len(entries) == 1:
        return zips[0]
    if zips:
        raise SourceError(
            f"manual_dir {str(manual_dir)!r} of {name!r} holds {len(zips)} zip file(s) among "
            f"{len(entries)} entries; expected either one zip alone or the extracted dataset. "
            f"{datasets.by_tfds_name(name).manual_download}"
        )
    return manual_dir


def prepare(dataset: str, source: Path, stage: Path, opts: BuildOptions) -> dict:
    """Run ``dataset``'s registered builder on ``source`` into the empty folder ``stage`` (a
    TFDS dataset directory when it returns: dataset_info.json, features.json, shards,
    manifest.json, index.csv); returns the manifest. Offline: no GCS look-up, no download."""
    work = stage / ".tfds"
    builder = builder_class(dataset)(data_dir=os.fspath(work), options=opts, source=source)
    config = tfds.download.DownloadConfig(try_download_gcs=False)
    # TFDS prints "Downloading and preparing ... to <staging path>" and "Subsequent calls will
    # reuse this data" on stdout: wrong here (kerasfrac build reports its own summary).
    with contextlib.redirect_stdout(io.StringIO()):
        builder.download_and_prepare(download_config=config)
    prepared = Path(os.fspath(builder.data_dir))
    for path in sorted(prepared.iterdir()):
        os.rename(path, stage / path.name)
    shutil.rmtree(work)
    return builder.manifest
