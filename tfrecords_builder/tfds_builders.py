"""The registered tensorflow-datasets builders: ``fracatlas``, ``tibia_fibula`` and
``kerasfrac_synthetic``. Importing this module registers them, so that::

    import tfrecords_builder.tfds_builders  # noqa: F401  (registers the builders)
    ds = tfds.load("fracatlas", split="train", data_dir=DATA_DIR,
                   download_and_prepare_kwargs={"download_config":
                       tfds.download.DownloadConfig(manual_dir=FOLDER)})

prepares the dataset offline from the user's copy (a folder holding the dataset, extracted or as
its one .zip) exactly as ``kerasfrac build`` does: ``kerasfrac build`` runs these builders
(``prepare``), and both write through ``tfrecords_builder.build.prepare_into`` (validation,
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

from tfrecords_builder import build, schema
from tfrecords_builder.archive import SourceError

_FRACATLAS_CITATION = """\
@article{abedeen2023fracatlas,
  title   = {FracAtlas: A Dataset for Fracture Classification, Localization and
             Segmentation of Musculoskeletal Radiographs},
  author  = {Abedeen, Iftekharul and Rahman, Md. Ashiqur and Prottyasha, Fatema Zohra and
             Ahmed, Tasnim and Chowdhury, Tareque Mohmud and Shatabda, Swakkhar},
  journal = {Scientific Data},
  volume  = {10},
  pages   = {521},
  year    = {2023},
  doi     = {10.1038/s41597-023-02432-4}
}"""

_TIBIA_CITATION = """\
@misc{tibia_fibula_mendeley,
  title        = {Tibia/Fibula fracture X-rays},
  howpublished = {Mendeley Data, dataset 2h62x9xzyd},
  url          = {https://data.mendeley.com/datasets/2h62x9xzyd},
  note         = {CC BY 4.0}
}"""

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
    DATASET: str = ""  # kerasfrac's dataset name (tfrecords_builder.defaults.DATASETS)
    DESCRIPTION = ""
    HOMEPAGE = ""
    CITATION = ""
    LICENSE = "CC BY 4.0"
    IMAGE_CHANNELS = 3
    ENCODING_FORMAT: str | None = None
    HAS_META = False

    def __init__(self, *, options: build.BuildOptions | None = None, source=None, **kwargs):
        """``options``: how to build (``kerasfrac build``'s defaults when None); ``source``: a
        folder or .zip to build from instead of the download config's ``manual_dir``."""
        self.options = options if options is not None else build.BuildOptions()
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
        self.manifest, written = build.prepare_into(
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


class Fracatlas(_KerasfracBuilder):
    """FracAtlas (Abedeen et al. 2023): 4,083 musculoskeletal X-rays, fracture labels, boxes."""

    name = schema.TFDS_NAMES["fracatlas"]
    DATASET = "fracatlas"
    DESCRIPTION = (
        "FracAtlas: 4,083 musculoskeletal X-rays (hand, leg, hip, shoulder) labelled fractured "
        "or not, with fracture boxes (COCO, here normalised ymin, xmin, ymax, xmax) and the "
        "per-image columns of dataset.csv (meta/*: anatomy, hardware, views; -1 unknown)."
    )
    HOMEPAGE = "https://doi.org/10.6084/m9.figshare.22363012"
    CITATION = _FRACATLAS_CITATION
    ENCODING_FORMAT = "jpeg"
    HAS_META = True
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download FracAtlas from https://doi.org/10.6084/m9.figshare.22363012 and put it in "
        "`manual_dir`: either the zip as downloaded (the folder's only file) or the extracted "
        "folder (dataset.csv, images/Fractured, images/Non_fractured, Annotations/)."
    )


class TibiaFibula(_KerasfracBuilder):
    """Tibia/Fibula fracture X-rays (Mendeley Data 2h62x9xzyd): class folders, no boxes."""

    name = schema.TFDS_NAMES["tibia-fibula"]
    DATASET = "tibia-fibula"
    DESCRIPTION = (
        "Tibia/Fibula fracture X-rays (Mendeley Data 2h62x9xzyd): PNG/JPEG files in class "
        "folders fracture/ and normal/ (mirrors' train/val/test folders are pooled and split "
        "again). No boxes, no metadata columns."
    )
    HOMEPAGE = "https://data.mendeley.com/datasets/2h62x9xzyd"
    CITATION = _TIBIA_CITATION
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download the Tibia/Fibula set from https://data.mendeley.com/datasets/2h62x9xzyd and "
        "put it in `manual_dir`: the zip as downloaded (the folder's only file) or the "
        "extracted class folders fracture/ and normal/ (or Fractured/, 'Not Fractured/')."
    )


class KerasfracSynthetic(_KerasfracBuilder):
    """kerasfrac's synthetic phantoms (``tfrecords_builder.datasets.synthetic``)."""

    name = schema.TFDS_NAMES["synthetic"]
    DATASET = "synthetic"
    DESCRIPTION = (
        "Synthetic grayscale bone phantoms with drawn fractures and boxes, written by "
        "tfrecords_builder.datasets.synthetic in FracAtlas' layout; for tests and demos."
    )
    CITATION = ""
    LICENSE = "Apache-2.0"
    IMAGE_CHANNELS = 1
    HAS_META = True
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Write phantoms with `python -m tfrecords_builder.datasets.synthetic` (or "
        "tfrecords_builder.datasets.synthetic.write) and pass that folder as `manual_dir`."
    )


BUILDERS = {b.DATASET: b for b in (Fracatlas, TibiaFibula, KerasfracSynthetic)}
BUILDERS_BY_NAME = {b.name: b for b in BUILDERS.values()}


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
            f"{BUILDERS_BY_NAME[name].MANUAL_DOWNLOAD_INSTRUCTIONS}"
        )
    return manual_dir


def prepare(dataset: str, source: Path, stage: Path, opts: build.BuildOptions) -> dict:
    """Run ``dataset``'s registered builder on ``source`` into the empty folder ``stage`` (a
    TFDS dataset directory when it returns: dataset_info.json, features.json, shards,
    manifest.json, index.csv); returns the manifest. Offline: no GCS look-up, no download."""
    work = stage / ".tfds"
    builder = BUILDERS[dataset](data_dir=os.fspath(work), options=opts, source=source)
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
