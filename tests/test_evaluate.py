"""Evaluation: exact metrics against hand-computed cases, bootstrap, thresholds, run dirs."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from kerasfrac import runs
from kerasfrac.cli import main
from kerasfrac.evaluation import calibration, evaluate, metrics
from tests.conftest import make_run, make_tfrecord_dir

# Six images with a tie between a fractured and a normal one at 0.4.
LABELS = np.array([0, 0, 0, 1, 1, 1])
PROBS = np.array([0.1, 0.4, 0.6, 0.4, 0.8, 0.9])


def test_hand_computed_metrics_with_ties():
    m = metrics.split_metrics(LABELS, PROBS, n_bootstrap=0)
    # at 0.5: predicted [0, 0, 1, 0, 1, 1] -> TN 2, FP 1, FN 1, TP 2
    assert m["confusion_matrix"] == [[2, 1], [1, 2]]
    for key in ("accuracy", "sensitivity", "specificity", "balanced_accuracy", "precision", "f1"):
        assert m[key] == pytest.approx(2 / 3), key
    # AUROC: 9 pairs; fractured 0.4 beats 0.1, ties 0.4 (1/2), loses to 0.6; 0.8/0.9 win all
    assert m["auroc"] == pytest.approx(7.5 / 9)
    # AP = sum over thresholds of (recall step) x precision: 1/3*1 + 1/3*1 + 1/3*3/5
    assert m["average_precision"] == pytest.approx(1 / 3 + 1 / 3 + 1 / 5)
    assert m["counts"] == {"fractured": 3, "normal": 3} and m["n"] == 6
    assert m["majority_baseline_accuracy"] == 0.5
    assert m["undefined"] == {}
    expected_loss = -np.mean(np.log([0.9, 0.6, 0.4, 0.4, 0.8, 0.9]))
    assert m["loss"] == pytest.approx(expected_loss)


def test_loss_by_hand():
    assert metrics.bce_loss([1, 0], [0.8, 0.4]) == pytest.approx(
        -(math.log(0.8) + math.log(0.6)) / 2
    )


def test_youden_threshold_chosen_on_val_applied_to_test():
    # J per candidate on LABELS/PROBS: 0.9 -> 1/3, 0.8 -> 2/3, 0.6 -> 1/3, 0.4 -> 1/3, 0.1 -> 0
    assert metrics.youden_threshold(LABELS, PROBS) == pytest.approx(0.8)
    test_labels = np.array([0, 1, 1, 0])
    test_probs = np.array([0.7, 0.85, 0.5, 0.3])
    m = metrics.split_metrics(test_labels, test_probs, val=(LABELS, PROBS), n_bootstrap=0)
    # at 0.5: predicted [1, 1, 1, 0]
    assert m["confusion_matrix"] == [[1, 1], [0, 2]]
    assert (m["sensitivity"], m["specificity"]) == (1.0, 0.5)
    # at 0.8 (chosen on val): predicted [0, 1, 0, 0]
    y = m["youden"]
    assert y["threshold"] == pytest.approx(0.8) and y["chosen_on"] == "val"
    assert y["confusion_matrix"] == [[2, 0], [1, 1]]
    assert (y["sensitivity"], y["specificity"], y["accuracy"]) == (0.5, 1.0, 0.75)


def test_tied_j_prefers_the_higher_threshold():
    # both 0.7 and 0.3 give J = 0.5
    assert metrics.youden_threshold([0, 1, 0, 1], [0.2, 0.7, 0.5, 0.3]) == pytest.approx(0.7)


def test_single_class_split_defined_metrics_and_undefined_list():
    m = metrics.split_metrics([1, 1, 1], [0.2, 0.7, 0.9], val=([1, 1], [0.3, 0.6]), n_bootstrap=200)
    assert m["accuracy"] == pytest.approx(2 / 3) and m["sensitivity"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(4 / 5)  # 2TP / (2TP + FP + FN) = 4 / 5
    assert m["average_precision"] == pytest.approx(1.0)
    assert m["auroc"] is None and m["specificity"] is None and m["balanced_accuracy"] is None
    assert {"auroc", "specificity", "balanced_accuracy", "youden"} <= set(m["undefined"])
    assert "no normal" in m["undefined"]["auroc"]
    assert m["youden"] is None
    assert m["ci95"]["auroc"] is None and m["ci95"]["specificity"] is None
    assert m["ci95"]["accuracy"] is not None
    assert m["majority_baseline_accuracy"] == 1.0 and m["majority_class"] == "fractured"
    json.dumps(m)  # serialisable
    text = evaluate.summary({**m, "split": "test"})
    assert "undefined: auroc" in text


def test_bootstrap_reproducible_and_exact_auroc():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 60)
    probs = np.round(np.clip(labels * 0.3 + rng.random(60) * 0.7, 0, 1), 1)  # many ties
    a = metrics.bootstrap_ci(labels, probs, n_resamples=1000, seed=7)
    b = metrics.bootstrap_ci(labels, probs, n_resamples=1000, seed=7)
    c = metrics.bootstrap_ci(labels, probs, n_resamples=1000, seed=8)
    assert a == b and a != c
    assert a["n_resamples"] == 1000 and a["valid"]["accuracy"] == 1000
    point = roc_auc_score(labels, probs)
    lo, hi = a["auroc"]
    assert lo < point < hi and 0 < hi - lo < 0.5
    # the vectorised AUROC equals scikit-learn's on resampled rows with ties
    idx = rng.integers(0, 60, size=(5, 60))
    rows = metrics._auroc_rows(labels[idx], probs[idx])
    for k in range(5):
        assert rows[k] == pytest.approx(roc_auc_score(labels[idx[k]], probs[idx[k]]))


def test_subgroups_by_hand():
    meta = {
        "hand": np.array([1, 1, 0, 1, 0, -1]),
        "hardware": np.array([0, 0, 0, 0, 1, 1]),
        "leg": np.full(6, -1),
    }
    g = metrics.subgroup_metrics(LABELS, PROBS, meta)
    # hand=1: labels [0, 0, 1], probs [0.1, 0.4, 0.4] -> AUROC (1 + 0.5) / 2
    assert g["hand=1"]["n"] == 3 and g["hand=1"]["auroc"] == pytest.approx(0.75)
    assert g["hand=unknown"] == {"n": 1}
    # hardware=1: both fractured -> AUROC undefined, accuracy 1
    assert g["hardware=1"]["counts"] == {"fractured": 2, "normal": 0}
    assert g["hardware=1"]["auroc"] is None and g["hardware=1"]["accuracy"] == 1.0
    assert not any(k.startswith("leg") for k in g)


# --------------------------------------------------------------------------- run directories


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, separable_tfrecord_dir):
    return make_run(tmp_path_factory.mktemp("eval") / "run", separable_tfrecord_dir)


@pytest.mark.slow
def test_evaluate_run_writes_everything(run_dir, capsys):
    assert main(["evaluate", "--run-dir", str(run_dir), "--bootstrap", "1000"]) == 0
    out = capsys.readouterr().out
    assert "majority baseline" in out and "AUROC" in out and "Youden-J" in out
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["split"] == "test" and m["n"] == 16 and m["predictions"] == "computed"
    ids, labels, probs = runs.read_predictions(run_dir / "predictions.csv")
    _, vl, vp = runs.read_predictions(run_dir / "predictions_val.csv")
    assert len(ids) == 16 and len(vl) == 16
    # metrics are those of the saved predictions; threshold from val applied to test
    again = metrics.split_metrics(labels, probs, val=(vl, vp), n_bootstrap=1000, seed=0)
    for key in ("accuracy", "auroc", "average_precision", "confusion_matrix", "ci95", "youden"):
        assert m[key] == again[key], key
    assert m["youden"]["threshold"] == pytest.approx(metrics.youden_threshold(vl, vp))
    assert "subgroups" not in m  # the fixture records carry no FracAtlas metadata
    # a drawn split of a build without studies: no split note, no study level, no error
    assert m["split_given"] is None and "study_level" not in m and "study level" not in out
    # the no-anatomy baseline on the same test images, with a paired difference
    base = m["no_anatomy_baseline"]
    assert base["model_auroc"]["auroc"] == pytest.approx(m["auroc"])
    assert base["difference"]["difference"] == pytest.approx(
        m["auroc"] - base["baseline_auroc"]["auroc"]
    )
    assert base["sentence"] in out and "no-anatomy baseline AUROC" in out
    assert set(base["subgroups"]) == {"size=small"}  # 32x32 fixture images, no metadata
    for rel in m["plots"]:
        data = (run_dir / rel).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, rel
    assert {Path(p).name for p in m["plots"]} == {
        "test_roc.png",
        "test_pr.png",
        "test_confusion.png",
        "test_reliability.png",
        "training_curves.png",
    }
    # What was chosen on val (calibration.json) is applied to test in metrics.json.
    chosen = json.loads((run_dir / "calibration.json").read_text())
    assert chosen["chosen_on"] == "val" and chosen["n_val"] == 16
    assert set(m["operating_points"]) == {"sensitivity_0.90", "sensitivity_0.95"}
    for name, point in m["operating_points"].items():
        t = chosen["operating_points"][name]["threshold"]
        assert point["threshold"] == t
        assert t == metrics.threshold_for(vl, vp, "sensitivity", point["value"])
        at = metrics.threshold_metrics(labels, probs, t)
        assert (point["sensitivity"], point["npv"]) == (at["sensitivity"], at["npv"])
    assert m["calibration"]["calibrator"] == chosen["calibrator"]
    assert m["calibration"]["before"]["ece"] == pytest.approx(calibration.ece(labels, probs))
    assert list((run_dir / "tensorboard" / "evaluation").glob("events.out.tfevents.*"))
    # second time: predictions are read back, same numbers
    m2 = evaluate.evaluate_run(run_dir, plots=False, n_bootstrap=1000)
    assert m2["predictions"] == "read" and m2["ci95"] == m["ci95"]


@pytest.mark.slow
def test_evaluate_val_split_and_tensorboard_images(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    m = evaluate.evaluate_run(run_dir, split="val", n_bootstrap=0)
    assert (run_dir / "metrics_val.json").is_file() and m["split"] == "val"
    assert m["youden"] is None or "optimistic" in m["youden"]["chosen_on"]
    acc = EventAccumulator(
        str(run_dir / "tensorboard" / "evaluation"), size_guidance={"tensors": 0}
    )
    acc.Reload()
    assert {"val_roc", "val_confusion"} <= set(acc.Tags()["tensors"])


@pytest.mark.slow
def test_evaluate_train_split_is_the_clean_training_images(run_dir, capsys):
    """--split train: every training image once, as val and test see them (no augmentation,
    no oversampling), scored against the val threshold; no baseline (fitted on train)."""
    from kerasfrac import data

    cfg, model, _ = runs.load_model(run_dir)
    assert (
        main(["evaluate", "--run-dir", str(run_dir), "--split", "train", "--bootstrap", "0"]) == 0
    )
    out = capsys.readouterr().out
    assert "split train: 48 images (24 fractured, 24 normal)" in out
    assert "a measure of fit, not of generalisation" in out
    m = json.loads((run_dir / "metrics_train.json").read_text())
    assert m["split"] == "train" and m["n"] == 48
    assert "fitted on the train split" in m["no_anatomy_baseline"]["unavailable"]
    ids, labels, probs = runs.read_predictions(run_dir / "predictions_train.csv")
    order = data.split_records(data.check_build(cfg.data.dir), "train").ids
    assert sorted(ids) == sorted(order)
    # the model's own inference-mode output on the un-augmented images, nothing else
    images = np.concatenate(
        [b["image"].numpy() for b in data.make_eval_dataset(cfg.data.dir, "train", cfg.data, 8)]
    )
    direct = model.predict(images, verbose=0).ravel()  # the fixture's one-output paper CNN
    by_id = dict(zip(ids, probs))
    assert np.ptp(direct) > 1e-3  # the images are told apart: equality below means something
    np.testing.assert_allclose([by_id[i] for i in order], direct, atol=2e-6)
    assert m["auroc"] == pytest.approx(roc_auc_score(labels, probs))
    _, vl, vp = runs.read_predictions(run_dir / "predictions_val.csv")
    assert m["youden"]["threshold"] == pytest.approx(metrics.youden_threshold(vl, vp))


@pytest.mark.slow
def test_bad_input(tmp_path, run_dir, separable_tfrecord_dir, capsys):
    with pytest.raises(ValueError, match="no config.yaml"):
        evaluate.evaluate_run(tmp_path)
    no_model = tmp_path / "no_model"
    no_model.mkdir()
    shutil.copy(run_dir / "config.yaml", no_model / "config.yaml")
    with pytest.raises(ValueError, match="no model at"):
        evaluate.evaluate_run(no_model)
    assert main(["evaluate", "--run-dir", str(no_model)]) == 2
    assert "no model at" in capsys.readouterr().err
    wrong = make_run(tmp_path / "wrong", separable_tfrecord_dir, model_size=40)
    with pytest.raises(ValueError, match=r"input \(40, 40, 1\).*\(32, 32, 1\)"):
        evaluate.evaluate_run(wrong)
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    shutil.copy(other / "predictions_val.csv", other / "predictions.csv")
    with pytest.raises(ValueError, match="not hold predictions of the 'test' split"):
        evaluate.evaluate_run(other, plots=False, n_bootstrap=0)
    m = evaluate.evaluate_run(other, plots=False, n_bootstrap=0, recompute=True)
    assert m["n"] == 16
    empty_build = make_tfrecord_dir(tmp_path / "empty_build", {"train": 4, "val": 2, "test": 0})
    empty = make_run(tmp_path / "empty", empty_build)
    with pytest.raises(ValueError, match="'test' split .* is empty"):
        evaluate.evaluate_run(empty)


def make_meta_build(path: Path) -> Path:
    """A build whose test records carry FracAtlas metadata (hand / hardware flags)."""
    import hashlib

    import tensorflow as tf

    from tests.conftest import encode_png, fixture_image
    from tfrecords_builder import schema

    make_tfrecord_dir(path, {"train": 4, "val": 4, "test": 0})
    rng = np.random.default_rng(5)
    # (label, hand, hardware) for six test images
    rows = [(1, 1, 1), (1, 1, 0), (0, 1, 0), (0, 0, 0), (1, 0, -1), (0, 0, -1)]
    with tf.io.TFRecordWriter(str(path / schema.shard_name("test", 0, 1))) as w:
        for k, (label, hand, hardware) in enumerate(rows):
            encoded = encode_png(fixture_image(rng, label, 32))
            w.write(
                schema.make_example(
                    encoded=encoded,
                    image_format="png",
                    height=32,
                    width=32,
                    channels=1,
                    image_id=f"t{k}.png",
                    source="synthetic",
                    group=f"t{k}",
                    sha256=hashlib.sha256(encoded).hexdigest(),
                    label=label,
                    meta={"hand": hand, "hardware": hardware},
                ).SerializeToString()
            )
    manifest = json.loads((path / schema.MANIFEST).read_text())
    manifest["splits"]["test"] = {"fractured": 3, "normal": 3}
    manifest["shards"]["test"] = [schema.shard_name("test", 0, 1)]
    (path / schema.MANIFEST).write_text(json.dumps(manifest))
    return path


def test_evaluate_run_subgroups_from_record_metadata(tmp_path):
    run = make_run(tmp_path / "run", make_meta_build(tmp_path / "build"))
    m = evaluate.evaluate_run(run, n_bootstrap=0, plots=False)
    ids, labels, probs = runs.read_predictions(run / "predictions.csv")
    p = dict(zip(ids, probs))
    g = m["subgroups"]
    assert g["hand=1"]["n"] == 3 and g["hand=1"]["counts"] == {"fractured": 2, "normal": 1}
    expected = roc_auc_score([1, 1, 0], [p["t0.png"], p["t1.png"], p["t2.png"]])
    assert g["hand=1"]["auroc"] == pytest.approx(expected)
    assert g["hardware=1"]["n"] == 1 and g["hardware=1"]["auroc"] is None
    assert g["hardware=0"]["n"] == 3 and g["hardware=unknown"] == {"n": 2}
    assert "subgroup hand=1: n 3" in evaluate.summary(m)


@pytest.mark.slow
def test_evaluate_a_trained_run_beats_the_trivial_answers(trained_run, tmp_path):
    """On the separable build the shared trained run ranks the test images (AUROC > 0.9, its
    CI's lower end above 0.5) and beats the majority baseline's accuracy; untrained models of
    the same architecture (make_run, seeds 0-3) reached AUROC 0.22-0.83 there."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run[0], run)
    m = evaluate.evaluate_run(run, n_bootstrap=200, plots=False, baseline=False)
    assert m["auroc"] > 0.9 and m["ci95"]["auroc"][0] > 0.5
    assert m["accuracy"] > m["majority_baseline_accuracy"]


def test_beats_baseline_only_where_the_difference_ci_is_above_zero():
    """The rule behind `beats_baseline` and its sentence, on controlled predictions through
    the real code: a clearly better model beats, an equal one does not (its CI reaches 0)."""
    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 60)
    noise = rng.uniform(0, 1, y.size)
    better = metrics.paired_auroc_difference(y, 0.6 * y + 0.4 * noise, noise, n_resamples=500)
    assert better["ci95"][0] > 0
    beats, sentence = evaluate._verdict(better)
    assert beats and sentence.startswith("The model beats a model that never sees a bone by +")
    jitter = noise + rng.normal(0, 0.05, y.size)  # the same information, a little noise
    equal = metrics.paired_auroc_difference(y, jitter, noise, n_resamples=500)
    # ahead by a hair (+0.009) with a CI reaching 0: not a win (a rule ignoring the CI says it is)
    assert equal["difference"] > 0 and equal["ci95"][0] <= 0 <= equal["ci95"][1]
    beats, sentence = evaluate._verdict(equal)
    assert not beats and "does NOT clearly beat" in sentence and "reaches 0" in sentence
    one_class = metrics.paired_auroc_difference(np.ones(10, int), noise[:10], noise[:10])
    assert evaluate._verdict(one_class) == (
        False,
        "AUROC undefined on this split (one class): no comparison.",
    )
