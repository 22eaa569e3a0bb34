"""kerasfrac audit and kerasfrac.evaluation.metrics: the no-anatomy baseline finds a planted
shortcut and nothing where there is none; group bootstrap, paired differences, undefined shares."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from kerasfrac.cli import main
from kerasfrac.evaluation import audit, metrics

COUNTS = {"train": 60, "val": 4, "test": 40}


@pytest.mark.slow
def test_planted_size_shortcut_is_found(tfrecord_dir_factory, tmp_path, capsys):
    """Fractured images 40x32, normal 32x40, pixels carrying nothing: the baseline on size
    alone separates them, and the audit says so in all three files."""
    build = tfrecord_dir_factory(COUNTS, separable=False, size_by_label={1: (40, 32), 0: (32, 40)})
    out = tmp_path / "card"
    assert main(["audit", str(build), "--out", str(out), "--bootstrap", "200"]) == 0
    assert "no-anatomy baseline" in capsys.readouterr().out
    r = json.loads((out / "audit.json").read_text())
    assert r["counts"]["test"] == {"fractured": 40, "normal": 40}
    auc = r["baseline"]["auroc"]
    assert auc["all"]["auroc"] >= 0.95 and auc["all"]["ci95"][0] > 0.8
    assert auc["size"]["auroc"] >= 0.95
    assert "metadata" not in auc  # the fixture records carry none
    top = r["feature_auroc_test"][0]
    assert top["feature"] in ("size.height", "size.width", "size.aspect")
    assert {s["size"]: s["fractured_share"] for s in r["image_sizes"]}["40x32"] == 1.0
    assert (out / "audit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| size |" in (out / "audit.md").read_text()


@pytest.mark.slow
def test_no_shortcut_scores_near_chance(tfrecord_dir_factory, tmp_path):
    build = tfrecord_dir_factory(COUNTS, size=32, separable=False, seed=3)
    r = audit.audit(build, tmp_path / "card", n_bootstrap=200)
    all_ = r["baseline"]["auroc"]["all"]
    assert abs(all_["auroc"] - 0.5) < 0.15, all_
    assert all_["ci95"][0] < 0.5 < all_["ci95"][1]


def test_baseline_needs_both_classes_in_train(tfrecord_dir_factory):
    build = tfrecord_dir_factory(
        {"train": {"fractured": 5, "normal": 0}, "val": 2, "test": 2}, separable=False
    )
    with pytest.raises(ValueError, match="both classes in the train split"):
        audit.baseline_probabilities(build)


def _jpeg(**kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16), 100, np.uint8)).save(buf, format="JPEG", **kw)
    return buf.getvalue()


def test_jpeg_flags_read_the_encoder_not_the_picture():
    plain = audit.jpeg_flags(_jpeg(quality=95))
    progressive = audit.jpeg_flags(_jpeg(quality=50, progressive=True))
    assert plain["progressive"] == 0 and progressive["progressive"] == 1
    assert plain["jfif"] == 1 and plain["app_segments"] >= 1
    assert progressive["quant0"] > plain["quant0"] > 0  # coarser quantisation at quality 50
    assert audit.jpeg_flags(b"\x89PNG\r\n\x1a\n")["app_segments"] == 0


def test_group_bootstrap_is_wider_and_counts_undefined_resamples():
    rng = np.random.default_rng(0)
    # 12 groups of 15 copies each: 12 independent images, not 180.
    y1 = np.array([0] * 6 + [1] * 6)
    s1 = y1 * 0.3 + rng.random(12)
    y, s = np.repeat(y1, 15), np.repeat(s1, 15)
    groups = np.repeat(np.arange(12), 15).tolist()
    by_image = metrics.auroc_ci(y, s, n_resamples=400)
    by_group = metrics.auroc_ci(y, s, groups=groups, n_resamples=400)
    assert by_image["resampled"] == "images" and by_group["resampled"] == "groups"
    assert by_group["auroc"] == by_image["auroc"] == metrics.auroc(y1, s1)
    width = lambda r: r["ci95"][1] - r["ci95"][0]  # noqa: E731
    assert width(by_group) > 2 * width(by_image)
    # one fractured image in 20: about (19/20)^20 = 36% of resamples have none
    y = np.array([1] + [0] * 19)
    r = metrics.auroc_ci(y, rng.random(20), n_resamples=2000)
    assert 0.3 < r["undefined_share"] < 0.42


def test_evaluate_bootstrap_resamples_groups_and_reports_undefined():
    y = np.repeat(np.array([0, 1] * 5), 10)
    p = np.repeat(np.linspace(0.1, 0.9, 10), 10)
    groups = np.repeat(np.arange(10), 10).tolist()
    ci = metrics.bootstrap_ci(y, p, n_resamples=300, groups=groups)
    assert ci["resampled"] == "groups" and set(ci["undefined_share"]) == set(ci["valid"])
    assert metrics.bootstrap_ci(y, p, n_resamples=300)["resampled"] == "images"
    one = metrics.bootstrap_ci(np.array([1] + [0] * 19), np.linspace(0, 1, 20), n_resamples=500)
    assert one["undefined_share"]["sensitivity"] > 0.25
    assert one["undefined_share"]["specificity"] == 0


def test_paired_difference():
    rng = np.random.default_rng(1)
    y = np.array([0] * 50 + [1] * 50)
    good = y + rng.normal(0, 0.5, 100)
    noise = rng.random(100)
    d = metrics.paired_auroc_difference(y, good, noise, n_resamples=500)
    assert d["difference"] == pytest.approx(metrics.auroc(y, good) - metrics.auroc(y, noise))
    assert d["ci95"][0] > 0 and d["share_above_zero"] > 0.97
    same = metrics.paired_auroc_difference(y, good, good, n_resamples=100)
    assert same["difference"] == 0 and same["ci95"] == [0.0, 0.0]
    with pytest.raises(ValueError, match="one score of each scorer per image"):
        metrics.paired_auroc_difference(y, good[:10], noise)


def test_size_bands():
    assert list(metrics.size_band([454, 2140, 2880], [373, 1760, 2304])) == [
        "small",
        "medium",
        "large",
    ]
