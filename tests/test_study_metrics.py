"""Study-level metrics (issue 38, item 3: MURA's official way) and the note that a split was
given (item 9): a hand computation on a tiny case, patients resampled, no study_level where a
build has no studies, and evaluate end to end on a tiny CSV build with studies and a given
split."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import yaml
from PIL import Image
from sklearn.metrics import cohen_kappa_score

from kerasfrac.evaluation import evaluate, metrics, report
from tests import sources
from tests.conftest import make_run

# Three patients, five studies, nine images:
#
#   patient study label(s)  probabilities   study mean  study label
#   A       s1    1 1       0.9 0.7         0.8         1
#   A       s2    0 0       0.2 0.4         0.3         0
#   B       s3    1 0       0.5 0.3         0.4         1  (images disagree: max label)
#   B       s4    0         0.5             0.5         0
#   C       s5    0 0       0.1 0.3         0.2         0
STUDIES = ["s1", "s1", "s2", "s2", "s3", "s3", "s4", "s5", "s5"]
PATIENTS = ["A", "A", "A", "A", "B", "B", "B", "C", "C"]
LABELS = [1, 1, 0, 0, 1, 0, 0, 0, 0]
PROBS = [0.9, 0.7, 0.2, 0.4, 0.5, 0.3, 0.5, 0.1, 0.3]
# Val: four studies (mean, label) (0.45, 1), (0.1, 0), (0.9, 1), (0.35, 0) (v1's mean is
# (0.5 + 0.4) / 2); at 0.9 sensitivity is 1/2, at 0.45 it is 2/2 with no false positive
# (Youden's J = 1), so the threshold chosen on val is 0.45.
VAL = (["v1", "v1", "v2", "v3", "v4", "v4"], [1, 1, 0, 1, 0, 0], [0.5, 0.4, 0.1, 0.9, 0.3, 0.4])


def test_study_metrics_equal_a_hand_computation():
    m = metrics.study_metrics(
        STUDIES, LABELS, PROBS, groups=PATIENTS, val=VAL, n_bootstrap=200, seed=1
    )
    assert (m["n_studies"], m["n_images"], m["n_groups"]) == (5, 9, 3)
    assert m["counts"] == {"fractured": 2, "normal": 3}
    assert m["mixed_label_studies"] == 1 and m["examples_of_mixed_label_studies"] == ["s3"]
    # AUROC: fractured studies 0.8 and 0.4 against normal 0.3, 0.5, 0.2: 0.8 beats all three,
    # 0.4 beats 0.3 and 0.2 but not 0.5 -> 5 of 6 pairs.
    assert m["auroc"]["auroc"] == pytest.approx(5 / 6)
    at = m["at_val_threshold"]
    assert at["threshold"] == pytest.approx(0.45) and at["n_val_studies"] == 4
    # Calls at 0.45: s1 0.8 yes (TP), s2 0.3 no (TN), s3 0.4 no (FN), s4 0.5 yes (FP), s5 0.2
    # no (TN): sensitivity 1/2, specificity 2/3.
    assert at["confusion_matrix"] == [[2, 1], [1, 1]]
    assert at["sensitivity"] == pytest.approx(1 / 2)
    assert at["specificity"] == pytest.approx(2 / 3)
    # Kappa: observed agreement 3/5; label and call each say fractured for 2 of 5, so chance
    # agreement (2*2 + 3*3) / 25 = 13/25; kappa = (15/25 - 13/25) / (12/25) = 1/6.
    assert at["kappa"] == pytest.approx(1 / 6)
    called = [1, 0, 0, 1, 0]
    assert metrics.binary_kappa([1, 0, 1, 0, 0], called) == pytest.approx(
        cohen_kappa_score([1, 0, 1, 0, 0], called)
    )
    assert set(at["ci95"]) == {"sensitivity", "specificity", "kappa", "resampled"}


def test_the_study_ci_resamples_patients():
    m = metrics.study_metrics(STUDIES, LABELS, PROBS, groups=PATIENTS, n_bootstrap=300, seed=4)
    assert m["auroc"]["resampled"] == "groups" and m["resampling_unit"] == "patients"
    # the same as the AUROC CI of the five studies with their patients as groups ...
    by_hand = metrics.auroc_ci(
        [1, 0, 1, 0, 0], [0.8, 0.3, 0.4, 0.5, 0.2], groups=list("AABBC"), n_resamples=300, seed=4
    )
    assert m["auroc"] == by_hand
    # ... and not the CI of the studies drawn one by one
    alone = metrics.auroc_ci([1, 0, 1, 0, 0], [0.8, 0.3, 0.4, 0.5, 0.2], n_resamples=300, seed=4)
    assert alone["resampled"] == "images" and alone["ci95"] != m["auroc"]["ci95"]
    # a whole patient is drawn: the index sets are unions of patients' studies
    for idx in metrics.resamples(5, list("AABBC"), n_resamples=20, seed=0):
        drawn = list(idx)
        assert drawn.count(0) == drawn.count(1) and drawn.count(2) == drawn.count(3)
    assert m["at_val_threshold"] == {"undefined": "no validation predictions to choose it on"}


def test_no_studies_gives_no_study_level():
    assert metrics.study_metrics(["", None, ""], [0, 1, 1], [0.2, 0.3, 0.9]) is None
    # partly studied: the images without a study are left out and counted
    m = metrics.study_metrics(["a", "", "b"], [0, 1, 1], [0.2, 0.3, 0.9], n_bootstrap=0)
    assert m["n_studies"] == 2 and m["images_without_study"] == 1
    assert m["auroc"]["auroc"] == 1.0 and m["auroc"]["ci95"] is None


class _Build:
    def __init__(self, manifest):
        self.manifest = manifest


def test_a_build_without_studies_has_no_study_level_and_a_drawn_split_no_note():
    assert evaluate.read_studies(_Build({"studies": None})) is None
    assert evaluate.read_studies(_Build({})) is None  # built before studies were recorded
    assert evaluate.split_given({"split_file": None, "given_splits": None}) is None
    official = evaluate.split_given({"given_splits": {"groups_given": {"test": 4}}})
    assert official["by"] == "official" and "4 groups to test" in official["note"]


# --------------------------------------------------------------------------- end to end


def _csv_build(tmp_path):
    """12 patients, each a fractured and a normal study of 2 images (48 images), split by a
    --split-file per patient: 0-5 train, 6-8 val, 9-11 test."""
    from tfrecords_builder.build import BuildOptions, build

    rng = np.random.default_rng(38)
    img = tmp_path / "img"
    img.mkdir()
    rows, split_rows = [["path", "label", "patient_id", "study_id"]], [["file", "split"]]
    for p in range(12):
        split = "train" if p < 6 else "val" if p < 9 else "test"
        for s, label in enumerate((1, 0)):
            for k in range(2):
                name = f"p{p}s{s}i{k}.png"
                Image.fromarray(sources.random_image(rng)).save(img / name)
                rows.append([name, label, f"P{p}", f"P{p}-S{s}"])
                split_rows.append([name, split])
    for path, data in ((img / "list.csv", rows), (tmp_path / "split.csv", split_rows)):
        with path.open("w", newline="") as f:
            csv.writer(f).writerows(data)
    opts = BuildOptions(progress=False, shards=1, split_file=str(tmp_path / "split.csv"))
    build("csv", img / "list.csv", tmp_path / "tfr", opts)
    return tmp_path / "tfr"


def test_evaluate_and_report_on_a_csv_build_with_studies_and_a_given_split(tmp_path, capsys):
    run = make_run(tmp_path / "run", _csv_build(tmp_path))
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**cfg, "dataset": "csv"}))
    m = evaluate.evaluate_run(run, plots=False, html=True, n_bootstrap=50, baseline=False)
    s = m["study_level"]
    assert (s["n_studies"], s["n_images"], s["counts"]) == (6, 12, {"fractured": 3, "normal": 3})
    assert s["resampling_unit"].startswith("patients") and s["mixed_label_studies"] == 0
    # the study figures follow from the image predictions the run wrote
    with (tmp_path / "tfr" / "index.csv").open(newline="") as f:
        study_of = {r["image_id"]: r["study"] for r in csv.DictReader(f)}
    means = {}
    with (run / "predictions.csv").open(newline="") as f:
        for r in csv.DictReader(f):
            means.setdefault(study_of[r["image_id"]], []).append(float(r["probability"]))
    assert len(means) == 6 and all(len(v) == 2 for v in means.values())
    truth = [int(k.endswith("S0")) for k in means]  # study 0 of each patient is fractured
    want = metrics.auroc(truth, [np.mean(v) for v in means.values()])
    assert s["auroc"]["auroc"] == pytest.approx(want)
    at = s["at_val_threshold"]  # val: patients 6-8, three studies of each class
    assert at["n_val_studies"] == 6 and at["chosen_on"] == "val studies"
    assert set(at["ci95"]) == {"sensitivity", "specificity", "kappa", "resampled"}
    assert m["split_given"]["by"] == "--split-file"
    assert m["split_given"]["groups_across_splits"] == 0
    assert json.loads((run / "metrics.json").read_text())["study_level"]["n_studies"] == 6
    text = evaluate.summary(m)
    assert "split given: the split was given by --split-file" in text
    assert "no group (copies, near-duplicates, patients, studies) straddles splits" in text
    assert "(Youden J, chosen on val studies): sensitivity" in text
    assert "(CI resamples 3 patients)" in text  # the test split's patients 9, 10, 11
    assert "study level: 6 studies (3 fractured, 3 normal) of 12 images: AUROC" in text
    page = (run / "report.html").read_text()
    assert "Study level" in page and "Split given" in page
    row = report.run_row(run)
    assert report.format_cell("split_given", row) == "--split-file"
    assert "given, not drawn" in report.markdown([row])
