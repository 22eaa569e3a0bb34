"""Calibration (ECE, Brier, a calibrator fitted on val, prior shift) and operating points
chosen on val (issue 34)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from kerasfrac import predict, runs
from kerasfrac.cli import main
from kerasfrac.evaluation import calibration, evaluate, metrics
from kerasfrac.evaluation.calibration import Calibrator, sigmoid
from tests.conftest import make_run


def test_ece_and_brier_equal_a_hand_computation():
    y = np.array([0, 0, 1, 1, 0, 1])
    p = np.array([0.1, 0.3, 0.35, 0.8, 0.9, 0.95])
    # Brier: mean of (p - y)^2
    want = (0.01 + 0.09 + 0.4225 + 0.04 + 0.81 + 0.0025) / 6
    assert calibration.brier(y, p) == pytest.approx(want)
    # 3 equal-mass bins of 2 (sorted): {0.1, 0.3}: mean 0.2, observed 0 -> 0.2;
    # {0.35, 0.8}: mean 0.575, observed 1 -> 0.425; {0.9, 0.95}: 0.925 vs 0.5 -> 0.425
    assert calibration.ece(y, p, n_bins=3) == pytest.approx((0.2 + 0.425 + 0.425) / 3)
    bins = calibration.reliability(y, p, n_bins=3)
    assert [b["n"] for b in bins] == [2, 2, 2]
    assert [b["observed"] for b in bins] == [0.0, 1.0, 0.5]
    assert bins[1]["p_mean"] == pytest.approx(0.575)


def _miscalibrated(n: int, temperature: float, seed: int, shift: float = 0.0):
    """Labels drawn from sigmoid(z); the model reports sigmoid(z * T + shift)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(-1.0, 1.5, size=n)
    y = (rng.random(n) < sigmoid(z)).astype(int)
    return y, sigmoid(z * temperature + shift)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_temperature_scaling_recovers_the_temperature_and_lowers_ece(seed):
    y, p = _miscalibrated(20000, 2.5, seed)  # overconfident by a factor 2.5 on the logit
    t = calibration.fit_temperature(y, p)
    assert t == pytest.approx(2.5, rel=0.08)
    cal = calibration.fit(y, p, seed=seed)
    assert cal.method in ("temperature", "platt")  # both are the right family here
    before, after = calibration.ece(y, p), calibration.ece(y, cal.apply(p))
    assert before > 0.08 and after < 0.02, (before, after)
    assert calibration.brier(y, cal.apply(p)) < calibration.brier(y, p)
    # a monotone map: the ranking (so the AUROC) is unchanged
    assert metrics.auroc(y, cal.apply(p)) == pytest.approx(metrics.auroc(y, p), abs=1e-12)


def test_the_simplest_method_that_is_not_worse_is_chosen():
    y, p = _miscalibrated(4000, 1.0, 0)  # calibrated already
    assert calibration.fit(y, p).method == "none"
    y, p = _miscalibrated(4000, 1.0, 0, shift=1.5)  # a shifted logit: only Platt has b
    cal = calibration.fit(y, p)
    assert cal.method == "platt" and cal.b == pytest.approx(-1.5, abs=0.2)
    assert cal.chosen_by["platt"] < cal.chosen_by["temperature"] - calibration.TOLERANCE


def test_prior_shift_moves_probabilities_to_the_deployment_prevalence():
    y, p = _miscalibrated(20000, 1.0, 0)
    cal = calibration.fit(y, p)
    assert cal.with_prevalence(cal.prevalence).apply(p) == pytest.approx(cal.apply(p))
    shifted = cal.with_prevalence(0.05).apply(p)
    # Bayes' rule on the odds: odds x (0.05 / 0.95) / (q / (1 - q)) for val's prevalence q
    q = cal.prevalence
    odds = cal.apply(p) / (1 - cal.apply(p)) * (0.05 / 0.95) / (q / (1 - q))
    assert shifted == pytest.approx(odds / (1 + odds))
    assert abs(shifted.mean() - 0.05) < abs(cal.apply(p).mean() - 0.05)
    with pytest.raises(ValueError, match=r"share of fractured images in \(0, 1\)"):
        cal.with_prevalence(1.0)


def test_a_damaged_calibrator_is_refused():
    for bad in ({"method": "platt", "a": -1.0, "b": 0.0}, {"method": "platt", "a": math.nan}):
        with pytest.raises(ValueError, match="not a valid calibrator"):
            Calibrator.from_dict(bad)


def test_operating_point_thresholds_are_exact():
    y = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.4, 0.7, 0.35, 0.5, 0.6, 0.8, 0.9])
    # sensitivity >= 0.8: 4 of 5 fractured at t = 0.5 (the highest such t)
    assert metrics.threshold_for(y, p, "sensitivity", 0.8) == 0.5
    assert metrics.threshold_for(y, p, "sensitivity", 1.0) == 0.35
    # specificity >= 0.8: at most one normal called; the lowest such t is 0.5
    assert metrics.threshold_for(y, p, "specificity", 0.8) == 0.5
    assert metrics.threshold_for(y, p, "specificity", 1.0) == 0.8
    at = metrics.threshold_metrics(y, p, 0.5)
    assert (at["precision"], at["npv"]) == (4 / 5, 4 / 5)


def test_bootstrap_gives_ppv_and_npv_intervals_around_the_estimate():
    rng = np.random.default_rng(0)
    y = (rng.random(400) < 0.3).astype(int)
    p = np.clip(0.3 * y + 0.5 * rng.random(400), 0, 1)
    at = metrics.threshold_metrics(y, p, 0.4)
    for groups in (None, [f"g{i // 2}" for i in range(400)]):
        ci = metrics.bootstrap_ci(y, p, 0.4, 500, 0, groups=groups)
        for key, value in (("ppv", at["precision"]), ("npv", at["npv"])):
            lo, hi = ci[key]
            assert lo < value < hi and hi - lo < 0.2, (key, lo, value, hi)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, separable_tfrecord_dir):
    return make_run(tmp_path_factory.mktemp("calibration") / "run", separable_tfrecord_dir)


def test_calibrator_and_thresholds_read_val_only(run_dir, monkeypatch):
    """Everything chosen is chosen on val: the fitting functions see val's labels only."""
    evaluate.evaluate_run(run_dir, "test", n_bootstrap=0)  # writes predictions_val.csv
    _, val_labels, val_probs = runs.read_predictions(run_dir / "predictions_val.csv")
    seen = []
    real_fit, real_threshold = calibration.fit, metrics.threshold_for

    def fit(labels, probs, **kw):
        seen.append(("fit", np.asarray(labels).tolist(), np.asarray(probs).tolist()))
        return real_fit(labels, probs, **kw)

    def threshold_for(labels, probs, *args):
        seen.append(("threshold", np.asarray(labels).tolist(), np.asarray(probs).tolist()))
        return real_threshold(labels, probs, *args)

    monkeypatch.setattr(calibration, "fit", fit)
    monkeypatch.setattr(metrics, "threshold_for", threshold_for)
    m = evaluate.evaluate_run(run_dir, "test", n_bootstrap=0, specificity=(0.8,))
    assert {s[0] for s in seen} == {"fit", "threshold"} and len(seen) == 4
    for _, labels, probs in seen:
        assert (labels, probs) == (val_labels.tolist(), val_probs.tolist())
    assert set(m["operating_points"]) == {
        "sensitivity_0.90",
        "sensitivity_0.95",
        "specificity_0.80",
    }


def test_predict_uses_the_calibrator_and_an_operating_point(run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "calibration.json").unlink(missing_ok=True)
    from PIL import Image

    image = tmp_path / "x.png"
    Image.fromarray((np.arange(32 * 32).reshape(32, 32) % 255).astype(np.uint8)).save(image)
    with pytest.raises(ValueError, match="has no calibration.json; run `kerasfrac evaluate"):
        predict.predict_files(run, [image], operating_point="sensitivity_0.90")
    plain, _, _, _ = predict.predict_files(run, [image])  # a run directory is accepted
    assert plain[0].calibrated is None
    chosen = {
        "chosen_on": "val",
        "n_val": 16,
        "calibrator": Calibrator("temperature", a=0.5, n=16, prevalence=0.5).to_dict(),
        "operating_points": {
            "sensitivity_0.90": {
                "target": "sensitivity",
                "value": 0.9,
                "threshold": 0.0,  # everything called fractured
                "threshold_calibrated": 0.0,
                "val": {"sensitivity": 1.0, "specificity": 0.0, "precision": 0.5, "npv": None},
            }
        },
    }
    (run / "calibration.json").write_text(json.dumps(chosen))
    with pytest.raises(ValueError, match=r"not one of the run's \['sensitivity_0.90'\]"):
        predict.predict_files(run, [image], operating_point="triage")
    results, _, threshold, source = predict.predict_files(
        run, [image], operating_point="sensitivity_0.90"
    )
    r = results[0]
    assert threshold == 0.0 and "operating point sensitivity_0.90" in source and r.fractured
    assert r.probability == pytest.approx(plain[0].probability)
    z = math.log(r.probability / (1 - r.probability))
    assert r.calibrated == pytest.approx(1 / (1 + math.exp(-0.5 * z)))
    assert main(["predict", "--model", str(run), str(image), "--csv", str(tmp_path / "p.csv")]) == 0
    out = capsys.readouterr().out
    assert "# probability: calibrated, temperature scaling (T = 2.000" in out
    assert f"{r.calibrated:.6f}" in out and "# 1 images, 0 skipped" in out
    header = (tmp_path / "p.csv").read_text().splitlines()[0]
    assert header == "path,probability,model_probability,class,threshold"


def test_operating_point_options_are_checked(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--run-dir", "x", "--sensitivity", "0.9,1.5"])
    assert "--sensitivity takes shares in [0, 1], e.g. 0.9; got '1.5'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["evaluate", "--run-dir", "x", "--prevalence", "0"])
    assert "--prevalence takes shares in (0, 1)" in capsys.readouterr().err
