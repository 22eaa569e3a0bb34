"""The layouts of a user's own data and of the big public sets: class folders, a CSV, MURA and
GRAZPEDWRI-DX, each generated here by code (tiny random images; FracAtlas-mini re-laid out
where present), built, and compared with its source: images, labels, patients, splits, and
the refusals of bad input."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests import sources
from tfrecords_builder import pixels, read_split
from tfrecords_builder.archive import SourceError
from tfrecords_builder.build import BuildOptions, build

OPTS = dict(progress=False, shards=2)
MINI = Path(
    os.environ.get("KERASFRAC_FRACATLAS_MINI")
    or Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fracatlas-mini"
)


def png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")
    return path


def records(out: Path) -> dict[str, dict]:
    """file -> {split, label, image, boxes, sha256} of every record of a build."""
    got = {}
    for split in ("train", "val", "test"):
        for r in read_split(out, split).as_numpy_iterator():
            got[r["file"].decode()] = {
                "split": split,
                "label": int(r["label"]),
                "image": r["image"],
                "boxes": r["boxes"],
                "sha256": r["sha256"].decode(),
            }
    return got


def table(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def splits_of_patients(out: Path) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for row in table(out / "index.csv"):
        if row["patient"]:
            found.setdefault(row["patient"], set()).add(row["split"])
    return found


def zip_folder(folder: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                z.write(path, Path(folder.name) / path.relative_to(folder))
    return archive


# --- class folders ------------------------------------------------------------------------


def test_folder_build_gives_the_source_images_and_labels(tmp_path):
    rng = np.random.default_rng(1)
    src, expected = tmp_path / "xrays", {}
    for name, label in (("Positive", 1), ("not fractured", 0), ("0", 0)):
        for i in range(5):
            image = sources.random_image(rng)
            expected[png(src / name / f"{i}.png", image).relative_to(src).as_posix()] = (
                label,
                image,
            )
    m = build(
        "folder", zip_folder(src, tmp_path / "xrays.zip"), tmp_path / "out", BuildOptions(**OPTS)
    )
    got = records(tmp_path / "out")
    assert set(got) == set(expected)
    for file, (label, image) in expected.items():
        assert got[file]["label"] == label, file
        np.testing.assert_array_equal(got[file]["image"][..., 0], image)  # PNG: lossless
    assert m["notes"]["class_folders"] == {"0": 0, "Positive": 1, "not fractured": 0}
    assert m["accounting"]["total"]["balanced"] and m["written"]["total"] == 15


def test_folder_split_folders_of_a_download_are_pooled(tmp_path):
    rng = np.random.default_rng(13)
    for split in ("train", "test"):
        for name in ("NORMAL", "FRACTURED"):
            for i in range(3):
                png(tmp_path / "src" / split / name / f"{i}.png", sources.random_image(rng))
    m = build("folder", tmp_path / "src", tmp_path / "out", BuildOptions(**OPTS))
    assert m["notes"]["pooled_split_folders"] == ["test", "train"]
    assert m["written"] == {"fractured": 6, "normal": 6, "total": 12}
    assert {r["label"] for f, r in records(tmp_path / "out").items() if "FRACTURED" in f} == {1}


def test_folder_with_unknown_class_names_is_refused_naming_them(tmp_path):
    rng = np.random.default_rng(2)
    for name in ("fractured", "maybe"):
        png(tmp_path / "src" / name / "a.png", sources.random_image(rng))
    with pytest.raises(SourceError, match=r"\['maybe'\].*folders found: \['fractured', 'maybe'\]"):
        build("folder", tmp_path / "src", tmp_path / "out", BuildOptions(**OPTS))
    assert not (tmp_path / "out").exists()
    # declared by the option, the same folder builds
    m = build(
        "folder", tmp_path / "src", tmp_path / "out", BuildOptions(normal_labels=("maybe",), **OPTS)
    )
    assert m["notes"]["class_folders"] == {"fractured": 1, "maybe": 0}


def test_folder_boxes_from_coco_json_and_yolo_files_reach_the_records(tmp_path):
    from kerasfrac import data
    from kerasfrac.config import DataConfig
    from tfrecords_builder.reader import BuildOutputError

    rng = np.random.default_rng(21)
    for name in ("fractured", "normal"):
        for i in range(4):
            png(tmp_path / "src" / name / f"{name}{i}.png", sources.random_image(rng))
    coco = {  # one image by its path under the source, one by its bare name
        "images": [
            {"id": 1, "file_name": "fractured/fractured0.png", "height": 40, "width": 48},
            {"id": 2, "file_name": "fractured1.png", "height": 40, "width": 48},
        ],
        "annotations": [
            {"id": 7, "image_id": 1, "bbox": [12, 10, 24, 20]},  # x, y, w, h in pixels
            {"id": 8, "image_id": 2, "bbox": [0, 0, 24, 20]},
        ],
    }
    (tmp_path / "boxes.json").write_text(json.dumps(coco))
    (tmp_path / "yolo" / "fractured").mkdir(parents=True)
    (tmp_path / "yolo" / "fractured" / "fractured0.txt").write_text("3 0.5 0.5 0.5 0.5\n")
    (tmp_path / "yolo" / "fractured1.txt").write_text("0 0.25 0.25 0.5 0.5\n")  # by stem
    for fmt, boxes in (("coco", tmp_path / "boxes.json"), ("yolo", tmp_path / "yolo")):
        out = tmp_path / f"out-{fmt}"
        m = build("folder", tmp_path / "src", out, BuildOptions(boxes=str(boxes), **OPTS))
        got = records(out)
        np.testing.assert_allclose(
            got["fractured/fractured0.png"]["boxes"], [[0.25] * 2 + [0.75] * 2]
        )
        np.testing.assert_allclose(got["fractured/fractured1.png"]["boxes"], [[0, 0, 0.5, 0.5]])
        assert sum(len(r["boxes"]) for r in got.values()) == 2
        assert m["notes"]["boxes_format"] == fmt and m["notes"]["images_with_boxes"] == 2
    # the box head trains on a folder build with boxes, and is refused on one without
    data.make_dataset(tmp_path / "out-coco", "train", DataConfig(image_size=16), 2, with_boxes=True)
    m = build("folder", tmp_path / "src", tmp_path / "plain", BuildOptions(**OPTS))
    assert m["notes"]["images_with_boxes"] == 0
    with pytest.raises(BuildOutputError, match=r"'model.box_head'.*records none.*--boxes"):
        data.make_dataset(
            tmp_path / "plain", "train", DataConfig(image_size=16), 2, with_boxes=True
        )
    with pytest.raises(ValueError, match=r"--boxes is for the layouts \['csv', 'folder'\]"):
        build("mura", tmp_path, tmp_path / "x", BuildOptions(boxes="b.json", **OPTS))


# --- a CSV --------------------------------------------------------------------------------


def make_csv_source(root: Path, rng) -> tuple[Path, dict]:
    """Six patients of 3 images each (labels mixed within some patients), a metadata column,
    and five bad rows: missing file, outside the root, listed twice, undeclared label,
    unreadable file."""
    images, rows = root / "images", []
    expected = {}
    for p in range(6):
        for k in range(3):
            label = int((p + k) % 3 == 0)
            rel = f"p{p}/img{k}.png"
            image = sources.random_image(rng)
            png(images / rel, image)
            expected[rel] = (label, image, f"P{p}")
            diagnosis = "yes" if label else "no"  # restates the label: never metadata
            rows.append(
                [
                    rel,
                    "fracture" if label else "negative",
                    f"P{p}",
                    f"S{p}-{k // 2}",
                    "a",
                    diagnosis,
                ]
            )
    (images / "broken.png").write_bytes(b"not a png at all")
    png(root / "outside.png", sources.random_image(rng))
    bad = [
        ["gone.png", "1", "P9", "", "b", ""],  # line 20: missing file
        ["../outside.png", "0", "P9", "", "b", ""],  # line 21: outside the image root
        ["p0/img1.png", "0", "P0", "", "b", ""],  # line 22: listed twice
        ["p1/img1.png", "maybe", "P1", "", "b", ""],  # line 23: label not declared (and twice)
        ["broken.png", "1", "P8", "", "b", ""],  # line 24: unreadable
    ]
    listing = root / "labels.csv"
    with listing.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["path", "label", "patient_id", "study_id", "site", "diagnosis"])
        out.writerows(rows + bad)
    return listing, expected


def test_csv_build_keeps_patients_together_and_quarantines_bad_rows_by_number(tmp_path):
    listing, expected = make_csv_source(tmp_path / "src", np.random.default_rng(3))
    opts = BuildOptions(
        image_root=str(tmp_path / "src" / "images"), split=(0.5, 0.25, 0.25), **OPTS
    )
    m = build("csv", listing, tmp_path / "out", opts)
    got = records(tmp_path / "out")
    assert set(got) == set(expected)
    for file, (label, image, _) in expected.items():
        assert got[file]["label"] == label
        np.testing.assert_array_equal(got[file]["image"][..., 0], image)
    patients = splits_of_patients(tmp_path / "out")
    assert len(patients) == 6 and all(len(s) == 1 for s in patients.values())
    assert len({next(iter(s)) for s in patients.values()}) == 3  # every split has a patient
    assert m["patients"] == {"count": 6, "across_splits": []}
    assert m["studies"]["count"] == 12 and m["studies"]["across_splits"] == []
    assert m["studies"]["mixed_labels"] == 4  # S0-0, S2-0, S3-0, S5-0 hold both labels
    by_row = {q["row"]: q["reason"] for q in m["quarantined"]}
    assert by_row[20].startswith("missing file: row 20")
    assert by_row[21].startswith("outside the image root: row 21")
    assert by_row[22] == "listed twice: row 22 repeats row 3"
    assert by_row[23].startswith("label not declared: row 23 has label 'maybe'")
    assert by_row[24].startswith("not an image")
    assert m["accounting"]["total"] == {
        "found": 23,
        "written": 18,
        "quarantined": 5,
        "dropped_duplicates": 0,
        "balanced": True,
    }
    meta = table(tmp_path / "out" / "metadata.csv")
    assert {r["site"] for r in meta} == {"a"} and len(meta) == 18
    assert "diagnosis" not in meta[0] and m["label_columns"] == ["diagnosis"]
    assert m["metadata_columns"] == ["site"]
    studies = {r["file"]: r["study"] for r in table(tmp_path / "out" / "index.csv")}
    assert studies["p2/img1.png"] == "S2-0"


def test_csv_images_from_a_zip_image_root(tmp_path):
    listing, expected = make_csv_source(tmp_path / "src", np.random.default_rng(4))
    archive = zip_folder(tmp_path / "src" / "images", tmp_path / "images.zip")
    # the zip holds images/ at its top: paths in the CSV are relative to the extracted folder
    rewritten = tmp_path / "list.csv"
    text = listing.read_text().replace("\np", "\nimages/p").replace("\nbroken", "\nimages/broken")
    rewritten.write_text(text)
    m = build("csv", rewritten, tmp_path / "out", BuildOptions(image_root=str(archive), **OPTS))
    assert m["written"]["total"] == len(expected)
    assert set(records(tmp_path / "out")) == {f"images/{f}" for f in expected}


def test_csv_boxes_from_coco_json_and_from_yolo_files(tmp_path):
    listing, expected = make_csv_source(tmp_path / "src", np.random.default_rng(14))
    root = tmp_path / "src" / "images"
    coco = {
        "images": [{"id": 1, "file_name": "p0/img0.png", "height": 40, "width": 48}],
        "annotations": [{"id": 7, "image_id": 1, "bbox": [12, 10, 24, 20]}],  # x, y, w, h
    }
    (tmp_path / "boxes.json").write_text(json.dumps(coco))
    yolo = tmp_path / "yolo" / "p0"
    yolo.mkdir(parents=True)
    (yolo / "img0.txt").write_text("0 0.5 0.5 0.5 0.5\n")  # x, y, w, h as fractions
    for name, boxes in (("coco", tmp_path / "boxes.json"), ("yolo", tmp_path / "yolo")):
        opts = BuildOptions(image_root=str(root), boxes=str(boxes), **OPTS)
        m = build("csv", listing, tmp_path / f"out-{name}", opts)
        got = records(tmp_path / f"out-{name}")
        np.testing.assert_allclose(got["p0/img0.png"]["boxes"], [[0.25, 0.25, 0.75, 0.75]])
        assert sum(len(r["boxes"]) for r in got.values()) == 1
        assert m["notes"]["boxes_format"] == name and m["notes"]["images_with_boxes"] == 1
    with pytest.raises(ValueError, match=r"--boxes is for the layouts .*'mura' finds its boxes"):
        build("mura", tmp_path, tmp_path / "x", BuildOptions(boxes="b.json", **OPTS))


def test_csv_without_its_columns_is_refused_and_nothing_written(tmp_path):
    listing = tmp_path / "list.csv"
    listing.write_text("file,diagnosis\na.png,1\n")
    with pytest.raises(SourceError, match=r"lacks the column\(s\) \['path', 'label'\].*'file'"):
        build("csv", listing, tmp_path / "out", BuildOptions(**OPTS))
    assert not (tmp_path / "out").exists()
    archive = zip_folder(tmp_path, tmp_path.parent / f"{tmp_path.name}.zip")
    with pytest.raises(
        SourceError, match=r"is not a CSV file.*--image-root the folder \(or .zip\)"
    ):
        build("csv", archive, tmp_path / "out", BuildOptions(**OPTS))
    assert not (tmp_path / "out").exists()


def test_csv_study_without_patient_ids_stays_in_one_split(tmp_path):
    rng = np.random.default_rng(15)
    rows = [["path", "label", "study_id"]]
    for i in range(24):
        rows.append(
            [png(tmp_path / "img" / f"{i}.png", sources.random_image(rng)).name, i % 2, i // 4]
        )
    with (tmp_path / "img" / "list.csv").open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    m = build("csv", tmp_path / "img" / "list.csv", tmp_path / "out", BuildOptions(**OPTS))
    assert m["studies"]["count"] == 6 and m["studies"]["across_splits"] == []
    assert m["patients"] is None
    splits = {}
    for row in table(tmp_path / "out" / "index.csv"):
        splits.setdefault(row["study"], set()).add(row["split"])
    assert len(splits) == 6 and all(len(s) == 1 for s in splits.values())


def test_image_root_for_a_layout_without_a_listing_is_refused(tmp_path):
    with pytest.raises(
        ValueError, match=r"--image-root is for layouts whose --source is a listing"
    ):
        build("folder", tmp_path, tmp_path / "out", BuildOptions(image_root="x", **OPTS))


def test_split_file_reproduces_a_given_split_and_lists_the_groups_it_divides(tmp_path):
    listing, expected = make_csv_source(tmp_path / "src", np.random.default_rng(18))
    given = {f: ("train", "val", "test")[n % 3] for n, f in enumerate(sorted(expected))}
    with (tmp_path / "split.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["file", "split"], *given.items(), ["not/there.png", "test"]])
    opts = BuildOptions(
        image_root=str(tmp_path / "src" / "images"), split_file=str(tmp_path / "split.csv"), **OPTS
    )
    m = build("csv", listing, tmp_path / "out", opts)
    assert {f: r["split"] for f, r in records(tmp_path / "out").items()} == given
    sf = m["split_file"]
    assert sf["groups_across_splits"] == 6  # every patient's 3 images went to 3 splits
    assert sorted(p for a in sf["groups_across"] for p in a["patients"]) == [
        f"P{p}" for p in range(6)
    ]
    assert sf["rows_naming_no_file_of_the_source"] == 1
    assert len(m["patients"]["across_splits"]) == 6  # counted, not moved
    # every image must be listed; split names are checked
    (tmp_path / "short.csv").write_text("file,split\np0/img0.png,train\n")
    with pytest.raises(ValueError, match=r"gives no split for 17 image\(s\)"):
        build(
            "csv",
            listing,
            tmp_path / "o2",
            dataclasses.replace(opts, split_file=str(tmp_path / "short.csv")),
        )
    (tmp_path / "bad.csv").write_text("file,split\np0/img0.png,holdout\n")
    with pytest.raises(ValueError, match=r"line 2: split 'holdout'.*expected train, val"):
        build(
            "csv",
            listing,
            tmp_path / "o3",
            dataclasses.replace(opts, split_file=str(tmp_path / "bad.csv")),
        )
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


# --- MURA ---------------------------------------------------------------------------------


def make_mura(top: Path, rng) -> dict:
    """MURA-v1.1/{train,valid}/XR_<REGION>/patientNNNNN/studyN_<label>/imageN.png."""
    root, expected = top / "MURA-v1.1", {}
    patient = 0
    for part, patients in (("train", 10), ("valid", 4)):
        for _ in range(patients):
            patient += 1
            region = ("XR_WRIST", "XR_ELBOW")[patient % 2]
            for study in (1, 2):
                label = (patient + study) % 2
                name = f"study{study}_{'positive' if label else 'negative'}"
                for k in (1, 2):
                    rel = f"{part}/{region}/patient{patient:05d}/{name}/image{k}.png"
                    image = sources.random_image(rng)
                    png(root / rel, image)
                    expected[rel] = (label, image, part, region)
    return expected


def test_mura_official_valid_is_the_test_split_and_patients_never_straddle(tmp_path):
    expected = make_mura(tmp_path / "src", np.random.default_rng(5))
    archive = zip_folder(tmp_path / "src" / "MURA-v1.1", tmp_path / "MURA-v1.1.zip")
    m = build("mura", archive, tmp_path / "out", BuildOptions(**OPTS))
    got = records(tmp_path / "out")
    assert set(got) == set(expected)
    for file, (label, image, part, _) in expected.items():
        assert got[file]["label"] == label
        np.testing.assert_array_equal(got[file]["image"][..., 0], image)
        assert (got[file]["split"] == "test") == (part == "valid"), file
    assert {r["split"] for r in got.values()} == {"train", "val", "test"}
    assert all(len(s) == 1 for s in splits_of_patients(tmp_path / "out").values())
    assert m["given_splits"]["groups_given"] == {"test": 4}
    assert m["given_splits"]["images_moved"] == []
    assert m["patients"]["count"] == 14
    studies = m["studies"]
    assert studies["count"] == 28 and studies["fractured"] == 14 and studies["mixed_labels"] == 0
    assert studies["by_split"]["test"] == 8  # the official valid studies
    assert studies["by_split"]["train"] + studies["by_split"]["val"] == 20
    assert "study_label" in m["label_columns"]
    meta = {r["file"]: r for r in table(tmp_path / "out" / "metadata.csv")}
    assert {meta[f]["region"] for f in expected} == {"wrist", "elbow"}
    assert all(meta[f]["region"] == e[3][3:].lower() for f, e in expected.items())
    index = {r["file"]: r for r in table(tmp_path / "out" / "index.csv")}
    first = "train/XR_ELBOW/patient00001/study1_negative/image1.png"
    assert index[first]["study"] == "train/XR_ELBOW/patient00001/study1_negative"


def test_train_evaluate_explain_audit_and_predict_run_on_a_mura_build(tmp_path):
    """The downstream commands on a MURA-layout build (one short epoch: plumbing, not skill)."""
    from kerasfrac import predict
    from kerasfrac.evaluation import audit, evaluate
    from kerasfrac.explain import explain_run
    from kerasfrac.options import ExplainOptions
    from kerasfrac.training import train
    from tests.conftest import fast_config

    expected = make_mura(tmp_path / "src", np.random.default_rng(12))
    build("mura", tmp_path / "src", tmp_path / "out", BuildOptions(**OPTS))
    cfg = fast_config(tmp_path / "out", tmp_path / "run", epochs=1, steps_per_epoch=3)
    cfg.dataset = "mura"
    metrics = train.train(cfg, verbose=0)
    assert metrics["split"] == "test" and metrics["n"] == 16  # the official valid images
    assert metrics["counts"] == {"fractured": 8, "normal": 8}
    run = tmp_path / "run"
    m = evaluate.evaluate_run(run, n_bootstrap=20, baseline=False, plots=False)
    assert m["n"] == 16 and m["split_given"]["by"] == "official"
    study = m["study_level"]
    assert study["n_studies"] == 8 and study["counts"] == {"fractured": 4, "normal": 4}
    assert set(m["subgroups"]) >= {"region=wrist", "region=elbow"}
    explained = explain_run(run, ExplainOptions(what=("grad-cam", "audit"), n_images=4))
    assert (run / "report.html").is_file() and explained["figures"]
    files = [tmp_path / "src" / "MURA-v1.1" / f for f in sorted(expected)[:3]]
    results, skipped, _, _ = predict.predict_files(tmp_path / "run" / "model.keras", files)
    assert len(results) == 3 and not skipped
    card = audit.audit(tmp_path / "out", tmp_path / "audit", n_bootstrap=50)
    assert card["source"] == "mura" and card["counts"]["test"] == {"fractured": 8, "normal": 8}


def test_box_head_on_a_layout_without_boxes_is_refused_naming_the_key():
    from kerasfrac import config

    with pytest.raises(config.ConfigError, match=r"'model.box_head'.*'mura' records do not carry"):
        config.load_config(
            overrides=["dataset=mura", "model.name=resnet_small", "model.box_head=true"]
        )
    cfg = config.load_config(
        overrides=["dataset=grazpedwri", "model.name=resnet_small", "model.box_head=true"]
    )
    assert cfg.model.box_head


def test_mura_resplit_pools_train_and_valid_by_patient(tmp_path):
    expected = make_mura(tmp_path / "src", np.random.default_rng(6))
    m = build(
        "mura",
        tmp_path / "src",
        tmp_path / "out",
        BuildOptions(official_split=False, split=(0.5, 0.25, 0.25), **OPTS),
    )
    got = records(tmp_path / "out")
    assert m["given_splits"] is None
    in_test = {expected[f][2] for f, r in got.items() if r["split"] == "test"}
    assert "train" in in_test  # official train images now reach the test split
    assert all(len(s) == 1 for s in splits_of_patients(tmp_path / "out").values())


def test_mura_labeled_studies_csv_disagreements_are_listed(tmp_path):
    make_mura(tmp_path / "src", np.random.default_rng(16))
    root = tmp_path / "src" / "MURA-v1.1"
    (root / "valid_labeled_studies.csv").write_text(
        "MURA-v1.1/valid/XR_WRIST/patient00012/study1/,1\n"  # agrees: study1_positive
        "MURA-v1.1/valid/XR_WRIST/patient00012/study2/,1\n"  # the folder says negative
        "MURA-v1.1/valid/XR_WRIST/patient00099/study1/,1\n"  # no such folder
    )
    m = build("mura", tmp_path / "src", tmp_path / "out", BuildOptions(**OPTS))
    assert m["label_disagreements"] == [
        {
            "study": "valid/XR_WRIST/patient00012/study2_negative",
            "csv_label": "1",
            "folder_label": 0,
        },
        {"study": "valid/XR_WRIST/patient00099/study1", "csv_label": "1", "folder_label": None},
    ]


def test_mura_study_folder_without_a_label_is_refused(tmp_path):
    make_mura(tmp_path / "src", np.random.default_rng(7))
    bad = tmp_path / "src" / "MURA-v1.1" / "valid" / "XR_WRIST" / "patient00099" / "study1_unsure"
    png(bad / "image1.png", sources.random_image(np.random.default_rng(8)))
    with pytest.raises(SourceError, match=r"study1_unsure.*studyN_positive or studyN_negative"):
        build("mura", tmp_path / "src", tmp_path / "out", BuildOptions(**OPTS))
    assert not (tmp_path / "out").exists()


# --- GRAZPEDWRI-DX ------------------------------------------------------------------------

GRAZ_COLUMNS = (
    "filestem,patient_id,study_number,timehash,gender,age,laterality,projection,initial_exam,"
    "ao_classification,cast,diagnosis_uncertain,osteopenia,fracture_visible,metal,"
    "pixel_spacing,device_manufacturer"
).split(",")


def make_graz(root: Path, rng) -> dict:
    """dataset.csv, 16-bit PNGs over images_part1..2/, YOLO labels (class 3 = fracture, and
    a class-8 'text' box that is not one)."""
    expected, rows = {}, []
    labels_dir = root / "folder_structure" / "yolov5" / "labels"
    labels_dir.mkdir(parents=True)
    for i in range(16):
        patient, label = f"{1000 + i // 2}", int(i % 3 == 0)
        stem = f"{patient}_0{i % 2}_{i:02d}"
        image = rng.integers(3000 + 100 * i, 9000 + 200 * i, size=(40, 48)).astype(np.uint16)
        path = root / f"images_part{1 + i % 2}" / f"{stem}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)  # uint16 -> a 16-bit grayscale PNG
        boxes = "8 0.1 0.1 0.05 0.05\n" + ("3 0.5 0.25 0.2 0.1\n" if label else "")
        (labels_dir / f"{stem}.txt").write_text(boxes)
        expected[path.relative_to(root).as_posix()] = (label, image, patient)
        row = dict.fromkeys(GRAZ_COLUMNS, "")
        row.update(
            filestem=stem,
            patient_id=patient,
            study_number=str(i % 2),
            age="9.5",
            laterality="L",
            projection="ap",
            ao_classification="23r-M/2.1" if label else "",
            fracture_visible="1" if label else "",
            device_manufacturer="ACME",
        )
        rows.append(row)
    with (root / "dataset.csv").open("w", newline="") as f:
        out = csv.DictWriter(f, GRAZ_COLUMNS)
        out.writeheader()
        out.writerows(rows)
    return expected


def test_grazpedwri_16bit_images_labels_boxes_and_patients(tmp_path):
    expected = make_graz(tmp_path / "src", np.random.default_rng(9))
    m = build("grazpedwri", tmp_path / "src", tmp_path / "out", BuildOptions(**OPTS))
    got = records(tmp_path / "out")
    assert set(got) == set(expected)
    for file, (label, image, _) in expected.items():
        assert got[file]["label"] == label
        # 16-bit -> 8 bits by the image's own min..max, the mapping the README states
        lo, hi = int(image.min()), int(image.max())
        want = np.round((image.astype(float) - lo) / (hi - lo) * 255).astype(np.uint8)
        np.testing.assert_array_equal(got[file]["image"][..., 0], want)
        np.testing.assert_array_equal(got[file]["image"][..., 0], pixels.png16_to_uint8(image))
        if label:  # YOLO (x 0.5, y 0.25, w 0.2, h 0.1) -> (ymin, xmin, ymax, xmax)
            np.testing.assert_allclose(got[file]["boxes"], [[0.2, 0.4, 0.3, 0.6]], atol=1e-6)
        else:
            assert got[file]["boxes"].shape == (0, 4)
    assert m["converted_to_8_bits"] == {"png16": 16}
    # kerasfrac predict maps a 16-bit PNG to the very bytes the build stored
    from kerasfrac import predict

    for file, r in list(got.items())[:3]:
        data = (tmp_path / "src" / file).read_bytes()
        stored = Image.open(io.BytesIO(predict.as_8bit(data, predict.sniff(data))))
        np.testing.assert_array_equal(np.asarray(stored), r["image"][..., 0])
    assert all(len(s) == 1 for s in splits_of_patients(tmp_path / "out").values())
    assert m["patients"]["count"] == 8 and m["studies"]["count"] == 16
    columns = m["metadata_columns"]
    assert "projection" in columns and "age" in columns
    assert not {"fracture_visible", "ao_classification"} & set(columns)
    assert set(m["label_columns"]) == {"fracture_visible", "ao_classification"}


def test_grazpedwri_csv_not_matching_its_images_is_refused(tmp_path):
    make_graz(tmp_path / "src", np.random.default_rng(10))
    victim = next((tmp_path / "src" / "images_part1").glob("*.png"))
    victim.unlink()
    with pytest.raises(SourceError, match=rf"1 row\(s\) name no .*{victim.stem}"):
        build("grazpedwri", tmp_path / "src", tmp_path / "out", BuildOptions(**OPTS))
    text = (tmp_path / "src" / "dataset.csv").read_text().replace("fracture_visible", "fv")
    (tmp_path / "src" / "dataset.csv").write_text(text)
    with pytest.raises(
        SourceError, match=r"dataset.csv.*lacks the column\(s\) \['fracture_visible'\]"
    ):
        build("grazpedwri", tmp_path / "src", tmp_path / "out", BuildOptions(**OPTS))
    assert not (tmp_path / "out").exists()


# --- DICOM in the builder -----------------------------------------------------------------


def voi_lut():
    """A VOI LUT Sequence of one table: 4096 entries from 0, 16 bits, a square-root curve."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    lut = Dataset()
    lut.LUTDescriptor = [4096, 0, 16]
    lut.LUTData = (np.sqrt(np.arange(4096) / 4095) * 65535).astype(np.uint16).tobytes()
    return Sequence([lut])


def test_dicom_voi_lut_and_monochrome1_by_hand(tmp_path):
    from tests.test_predict import write_dicom

    stored = np.array([[0, 1000], [2000, 4095]])
    path = write_dicom(tmp_path / "a.dcm", stored, "MONOCHROME2", VOILUTSequence=voi_lut())
    # LUT: floor(sqrt(x / 4095) * 65535) -> 0, 32385, 45799, 65535; / 65535 * 255, rounded
    assert pixels.dicom_to_uint8(path.read_bytes()).tolist() == [[0, 126], [178, 255]]
    path = write_dicom(tmp_path / "b.dcm", stored, "MONOCHROME1", VOILUTSequence=voi_lut())
    assert pixels.dicom_to_uint8(path.read_bytes()).tolist() == [[255, 129], [77, 0]]


def test_dicom_files_build_to_predicts_pixels(tmp_path):
    from kerasfrac import predict
    from tests.test_predict import write_dicom

    rng = np.random.default_rng(11)
    src = tmp_path / "src"
    for folder in ("fractured", "normal"):
        for k, photometric in enumerate(("MONOCHROME1", "MONOCHROME2")):
            tags = {"WindowCenter": 1500, "WindowWidth": 2001} if k else {}
            (src / folder).mkdir(parents=True, exist_ok=True)
            write_dicom(
                src / folder / f"{k}.dcm",
                rng.integers(0, 4096, size=(40, 48)),
                photometric=photometric,
                **tags,
            )
        write_dicom(
            src / folder / "lut.dcm",
            rng.integers(0, 4096, size=(40, 48)),
            photometric="MONOCHROME1",
            VOILUTSequence=voi_lut(),
        )
        png(src / folder / "plain.png", sources.random_image(rng))
    (src / "normal" / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\1" * 64)
    m = build("folder", src, tmp_path / "out", BuildOptions(**OPTS))
    got = records(tmp_path / "out")
    assert m["converted_to_8_bits"] == {"dicom": 6}
    assert [(q["file"], q["reason"][:18]) for q in m["quarantined"]] == [
        ("normal/broken.dcm", "undecodable dicom:")
    ]
    assert {f: r["label"] for f, r in got.items()} == {
        f"{folder}/{name}": int(folder == "fractured")
        for folder in ("fractured", "normal")
        for name in ("0.dcm", "1.dcm", "lut.dcm", "plain.png")
    }
    for file, r in got.items():
        if file.endswith(".dcm"):
            want = predict.dicom_to_uint8((src / file).read_bytes())
            np.testing.assert_array_equal(r["image"][..., 0], want)
            assert r["sha256"] == hashlib.sha256((src / file).read_bytes()).hexdigest()


# --- FracAtlas-mini re-laid out -----------------------------------------------------------

needs_mini = pytest.mark.skipif(not MINI.is_dir(), reason=f"FracAtlas-mini not present at {MINI}")


def mini_sample(per_class: int = 6) -> list[tuple[Path, int]]:
    out = []
    for folder, label in (("Fractured", 1), ("Non_fractured", 0)):
        files = sorted(p for p in (MINI / "images" / folder).iterdir() if p.is_file())
        out += [(p, label) for p in files[:per_class]]
    return out


@needs_mini
def test_fracatlas_mini_as_folders_and_as_csv_builds_the_same_images(tmp_path):
    sample = mini_sample()
    rows = []
    atlas = tmp_path / "atlas"
    (atlas / "images").mkdir(parents=True)
    shutil.copy(MINI / "dataset.csv", atlas / "dataset.csv")
    coco = Path("Annotations") / "COCO JSON" / "COCO_fracture_masks.json"
    (atlas / coco).parent.mkdir(parents=True)
    shutil.copy(MINI / coco, atlas / coco)
    for path, label in sample:
        folder = tmp_path / "folders" / ("fracture" if label else "normal")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / path.name)
        (atlas / "images" / path.parent.name).mkdir(exist_ok=True)
        shutil.copy(path, atlas / "images" / path.parent.name / path.name)
        rows.append([f"{folder.name}/{path.name}", label, path.stem])
    listing = tmp_path / "list.csv"
    with listing.open("w", newline="") as f:
        csv.writer(f).writerows([["path", "label", "patient_id"], *rows])
    opts = BuildOptions(recover_truncated=True, **OPTS)
    by_folder = records_or_quarantine(
        build("folder", tmp_path / "folders", tmp_path / "a", opts), tmp_path / "a"
    )
    listed = BuildOptions(
        recover_truncated=True,
        image_root=str(tmp_path / "folders"),
        boxes=str(MINI / coco),
        **OPTS,
    )
    by_csv = records_or_quarantine(build("csv", listing, tmp_path / "b", listed), tmp_path / "b")
    assert by_folder == by_csv
    by_atlas = records_or_quarantine(
        build("fracatlas", atlas, tmp_path / "c", opts), tmp_path / "c"
    )
    assert by_folder == by_atlas
    boxes_csv = {r["sha256"]: r["boxes"].tolist() for r in records(tmp_path / "b").values()}
    boxes_atlas = {r["sha256"]: r["boxes"].tolist() for r in records(tmp_path / "c").values()}
    assert boxes_csv == boxes_atlas and any(boxes_atlas.values())
    truth = {hashlib.sha256(p.read_bytes()).hexdigest(): label for p, label in sample}
    assert {sha: label for sha, (label, _) in by_folder.items()} == truth


def records_or_quarantine(m: dict, out: Path) -> dict[str, tuple[int, str]]:
    """sha256 of the source file -> (label, digest of the stored pixels)."""
    assert m["quarantined"] == [], m["quarantined"]
    return {
        r["sha256"]: (r["label"], hashlib.sha256(r["image"].tobytes()).hexdigest())
        for r in records(out).values()
    }


def test_png16_mapping_by_hand():
    image = np.array([[1000, 2000], [3000, 5000]], np.uint16)
    # (x - 1000) / 4000 * 255: 0, 63.75, 127.5, 255 -> rounded half to even by numpy
    assert pixels.png16_to_uint8(image).tolist() == [[0, 64], [128, 255]]
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    assert pixels.png_bit_depth(buf.getvalue()) == 16


# --- scale: the near-duplicate search -----------------------------------------------------


def test_near_duplicate_search_by_fields_equals_all_pairs():
    """Multi-index hashing finds exactly the blocked all-pairs result: random hashes, clusters
    a few bits apart, and one field value crowded past BIG_RUN (searched within by blocks)."""
    from tfrecords_builder import duplicates

    rng = np.random.default_rng(17)
    codes = rng.integers(0, 2**63, 5000, dtype=np.int64).astype(np.uint64)
    codes[4000:4200] = codes[:200] ^ (np.uint64(1) << rng.integers(0, 64, 200).astype(np.uint64))
    crowded = np.uint64(0xABCD)  # the low 16 bits shared by 2,100 hashes
    low16 = np.uint64(0xFFFF)
    codes[1000:3100] = (codes[1000:3100] & ~low16) | crowded
    hashes = [int(c) for c in codes]
    for d in (0, 2, 3, 5):
        got = duplicates.near_duplicate_pairs(hashes, d)
        assert got == duplicates.all_pairs(codes, d), d
        assert len(got) >= (200 if d else 0)  # the planted pairs, 1 bit apart
