"""MURA v1.1 (Rajpurkar et al. 2017; Stanford AIMI, research use after registration):
upper-extremity X-rays labelled per study.

Layout (the root may sit one or two folders deep inside the archive)::

    MURA-v1.1/{train,valid}/XR_<REGION>/patientNNNNN/studyN_{positive,negative}/imageN.png

(plus train_image_paths.csv, train_labeled_studies.csv and the valid_ pair, which restate the
folders: the labelled-studies files, where present, are compared with the folders and any
disagreement listed in the manifest's ``label_disagreements``; the folder wins). Every
image takes its study's label; its patient (the folder name) is its group, so a patient's
images share a split; its study (region/patient/study) is recorded in index.csv and the
region in metadata.csv. The study label never is metadata.

By default the official ``valid`` set is the test split (MURA's test set is not public) and
val is carved from ``train`` by patient (``--split``'s train and val shares);
``--no-official-split`` pools both and splits them by ``--split``. A study folder that is
neither positive nor negative is an error, and nothing is written.
"""

from __future__ import annotations

import re
from pathlib import Path

from tfrecords_builder.archive import SourceError, listing
from tfrecords_builder.archive import find_root as archive_find_root
from tfrecords_builder.candidates import Candidate, Found, files_under
from tfrecords_builder.datasets.registry import DatasetSpec, register_dataset
from tfrecords_builder.metadata import MetaColumn
from tfrecords_builder.options import BuildOptions

PARTS = {"train": None, "valid": "test"}  # the official part -> its fixed split (official)
STUDY = re.compile(r"^study(\d+)_(positive|negative)$")
LAYOUT = "train/ and valid/ holding XR_<REGION>/patientNNNNN/studyN_{positive,negative}/*.png"


def find_root(top: Path) -> Path:
    """The folder holding train/ and valid/ (MURA-v1.1/), at ``top`` or up to two below."""
    return archive_find_root(
        top,
        lambda f: (f / "train").is_dir() and (f / "valid").is_dir(),
        "MURA",
        f"MURA-v1.1/ with {LAYOUT}",
    )


def _dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def find(top: Path, opts: BuildOptions) -> Found:
    root = find_root(top)
    candidates, loose = [], []
    for part, fixed in PARTS.items():
        for region_dir in _dirs(root / part):
            if not region_dir.name.upper().startswith("XR_"):
                raise SourceError(
                    f"{str(region_dir)!r}: expected a region folder XR_<REGION> (e.g. "
                    f"XR_WRIST) in {part}/; found {listing(root / part)}. Nothing was written."
                )
            region = region_dir.name[3:].lower()
            for patient_dir in _dirs(region_dir):
                for study_dir in _dirs(patient_dir):
                    match = STUDY.match(study_dir.name.lower())
                    if match is None:
                        raise SourceError(
                            f"{str(study_dir)!r}: a MURA study folder must be named "
                            "studyN_positive or studyN_negative (its label); fix or remove it. "
                            "Nothing was written."
                        )
                    label = int(match.group(2) == "positive")
                    study = study_dir.relative_to(root).as_posix()
                    for path in files_under(study_dir):
                        rel = path.relative_to(root).as_posix()
                        candidates.append(
                            Candidate(
                                path,
                                rel,
                                rel,
                                label,
                                patient=patient_dir.name,
                                study=study,
                                split=fixed if opts.official_split else None,
                                extra={"region": region},
                            )
                        )
                loose += [
                    f.relative_to(root).as_posix() for f in patient_dir.iterdir() if f.is_file()
                ]
    studies = {c.study: c.label for c in candidates}
    notes = {
        "official_split": opts.official_split,
        "files_outside_study_folders": sorted(loose),
        "label_disagreements": _listed_labels(root, studies),
    }
    return Found(root, candidates, notes)


def _listed_labels(root: Path, studies: dict[str, int]) -> list[dict]:
    """Studies whose label in ``{part}_labeled_studies.csv`` (lines like
    ``MURA-v1.1/train/XR_WRIST/patient00001/study1/,1``; read where present) differs from
    their folder's; the folder wins. A listed study without a folder is reported too."""
    by_prefix = {}
    for study, label in studies.items():
        by_prefix[study.rsplit("_", 1)[0]] = (study, label)  # train/XR_WRIST/patient1/study1
    out = []
    for part in PARTS:
        listed = root / f"{part}_labeled_studies.csv"
        if not listed.is_file():
            continue
        for line in listed.read_text(encoding="utf-8").splitlines():
            path, _, value = line.strip().rpartition(",")
            if not path:
                continue
            key = path.strip("/").split("/", 1)[-1] if path.startswith("MURA") else path.strip("/")
            study, label = by_prefix.get(key, (None, None))
            if study is None:
                out.append({"study": key, "csv_label": value, "folder_label": None})
            elif value.strip() != str(label):
                out.append({"study": study, "csv_label": value, "folder_label": label})
    return out


CITATION = """\
@article{rajpurkar2017mura,
  title   = {MURA: Large Dataset for Abnormality Detection in Musculoskeletal Radiographs},
  author  = {Rajpurkar, Pranav and Irvin, Jeremy and Bagul, Aarti and Ding, Daisy and
             Duan, Tony and Mehta, Hershel and Yang, Brandon and Zhu, Kaylie and
             Laird, Dillon and Ball, Robyn L. and Langlotz, Curtis and Shpanskaya, Katie and
             Lungren, Matthew P. and Ng, Andrew Y.},
  journal = {arXiv preprint arXiv:1712.06957},
  year    = {2017}
}"""

SPEC = register_dataset(
    DatasetSpec(
        name="mura",
        find=find,
        tfds_name="kerasfrac_mura",
        description=(
            "MURA v1.1: upper-extremity X-rays (7 regions), each image labelled by its study "
            "(positive = abnormal, counted as fractured). Patients share a split; studies in "
            "index.csv; region in metadata.csv. Official valid -> test by default."
        ),
        homepage="https://stanfordmlgroup.github.io/competitions/mura/",
        citation=CITATION,
        license="Stanford University School of Medicine MURA Dataset Research Use Agreement",
        manual_download=(
            "Register and download MURA-v1.1 from "
            "https://stanfordmlgroup.github.io/competitions/mura/ and put the zip (the "
            "folder's only file) or the extracted MURA-v1.1/ folder in `manual_dir`."
        ),
        takes_options=True,
        label_columns=("study_label",),
        # the region (elbow ... wrist): the audit's baseline, a model.meta_head target (one
        # flag per region) and evaluation's region= subgroups
        metadata=(MetaColumn("region", "categorical", target=True),),
        region_column="region",
        learnable_meta=True,
    )
)
