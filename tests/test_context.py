"""Issue 37's evaluation: the model beside the no-anatomy baseline inside each subgroup and
within body region, and the occlusion test's pieces (fill, control placement).

Every number is checked against a hand computation on a tiny case.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from kerasfrac.evaluation import audit, evaluate, metrics
from kerasfrac.explain import occlusion


def test_stratified_auroc_counts_pairs_within_a_stratum_only():
    # region a: pairs (0.9 > 0.1) yes, (0.9 > 0.95) no -> 0.5 over 2 pairs
    # region b: pairs (0.2 > 0.1), (0.3 > 0.1) -> 1.0 over 2 pairs
    y = [1, 0, 0, 1, 1, 0]
    s = [0.9, 0.1, 0.95, 0.2, 0.3, 0.1]
    strata = ["a", "a", "a", "b", "b", "b"]
    assert metrics.stratified_auroc(y, s, strata) == pytest.approx((0.5 * 2 + 1.0 * 2) / 4)
    # one stratum: the plain AUROC
    assert metrics.stratified_auroc(y, s, ["a"] * 6) == pytest.approx(metrics.auroc(y, s))
    # a stratum with one class adds no pairs; none with both classes: undefined
    assert metrics.stratified_auroc([1, 0, 1], [0.9, 0.1, 0.0], ["a", "a", "b"]) == 1.0
    assert metrics.stratified_auroc([1, 0], [0.9, 0.1], ["a", "b"]) is None


def test_knowing_the_region_is_worth_nothing_within_region():
    """A score that is only the region's fracture rate ranks well overall and at chance
    within region: what the metadata baseline gets from the region cannot count there."""
    rng = np.random.default_rng(0)
    region = np.array(["hand"] * 200 + ["leg"] * 200)
    y = np.r_[rng.random(200) < 0.5, rng.random(200) < 0.1].astype(int)
    score = np.where(region == "hand", 0.5, 0.1)
    assert metrics.auroc(y, score) > 0.65
    assert metrics.stratified_auroc(y, score, region) == pytest.approx(0.5)
    ci = metrics.auroc_ci(y, score, strata=region, n_resamples=50)
    assert ci["auroc"] == pytest.approx(0.5) and ci["ci95"] == [0.5, 0.5]


def test_body_region_from_the_flags():
    meta = {
        "hand": np.array([1, 0, 1, 0, -1]),
        "leg": np.array([0, 1, 1, 0, -1]),
        "hip": np.array([0, 0, 0, 0, -1]),
        "shoulder": np.array([0, 0, 0, 0, -1]),
        "mixed": np.array([0, 1, 0, 0, -1]),
    }
    assert list(metrics.body_region(meta)) == ["hand", "mixed", "mixed", "unknown", "unknown"]
    assert metrics.body_region({"hand": np.array([-1, -1])}) is None


def _fake_baseline(monkeypatch, n_hand=30, n_leg=30, seed=0):
    """A split whose baseline probabilities and metadata we choose: hands and legs."""
    rng = np.random.default_rng(seed)
    n = n_hand + n_leg
    labels = np.r_[np.arange(n_hand) % 2, (np.arange(n_leg) % 3 == 0)].astype(int)
    meta = {c: np.zeros(n, int) for c in ("hand", "leg", "hip", "shoulder", "mixed")}
    meta["hand"][:n_hand] = 1
    meta["leg"][n_hand:] = 1
    meta["frontal"] = np.ones(n, int)
    meta["hardware"] = np.zeros(n, int)
    base = {
        "ids": [f"img{k}" for k in range(n)],
        "labels": labels,
        "probs": np.clip(labels * 0.3 + rng.random(n) * 0.7, 0, 1),
        "probs_without_metadata": rng.random(n),
        "groups": [f"g{k}" for k in range(n)],
        "meta": meta,
        "height": np.full(n, 100.0),
        "width": np.full(n, 100.0),
    }
    monkeypatch.setattr(audit, "baseline_probabilities", lambda build, split, seed=0: base)
    model = np.clip(labels * 0.5 + rng.random(n) * 0.6, 0, 1)
    return base, labels, model


def test_subgroup_comparison_equals_a_hand_computation(monkeypatch):
    base, labels, model = _fake_baseline(monkeypatch)
    # the model's images in another order than the build's: they are matched by id
    order = np.random.default_rng(1).permutation(len(labels))
    ids = [base["ids"][k] for k in order]
    c = evaluate.baseline_comparison(
        None, "test", ids, labels[order], model[order], n_bootstrap=20, seed=0
    )
    hand = base["meta"]["hand"] == 1
    g = c["subgroups"]["region=hand"]
    assert (g["n"], g["fractured"]) == (30, int(labels[hand].sum()))
    want_model = metrics.auroc(labels[hand], model[hand])
    want_base = metrics.auroc(labels[hand], base["probs"][hand])
    want_plain = metrics.auroc(labels[hand], base["probs_without_metadata"][hand])
    assert g["model"]["auroc"] == pytest.approx(want_model)
    assert g["baseline"]["auroc"] == pytest.approx(want_base)
    assert g["without_metadata"]["auroc"] == pytest.approx(want_plain)
    assert g["difference"]["difference"] == pytest.approx(want_model - want_base)
    assert g["difference_without_metadata"]["difference"] == pytest.approx(want_model - want_plain)
    assert set(c["subgroups"]) == {
        "region=hand",
        "region=leg",
        "frontal=1",
        "hardware=0",
        "size=small",
    }
    # within region: each region's AUROC weighted by its pairs
    region = np.where(hand, "hand", "leg")
    w = c["within_region"]
    assert w["regions"] == {
        "hand": {"n": 30, "fractured": int(labels[hand].sum())},
        "leg": {"n": 30, "fractured": int(labels[~hand].sum())},
    }
    assert w["model"]["auroc"] == pytest.approx(metrics.stratified_auroc(labels, model, region))
    assert w["difference"]["difference"] == pytest.approx(
        metrics.stratified_auroc(labels, model, region)
        - metrics.stratified_auroc(labels, base["probs"], region)
    )
    # the overall verdict is unchanged: the whole split
    assert c["model_auroc"]["auroc"] == pytest.approx(metrics.auroc(labels, model))
    lines = "\n".join(evaluate.baseline_lines({"no_anatomy_baseline": c}))
    assert "within body region (pairs of one region only; hand 30, leg 30)" in lines
    assert "subgroup region=hand: n 30" in lines and "without metadata" in lines


def test_small_subgroups_get_a_note_not_an_auroc(monkeypatch):
    base, labels, model = _fake_baseline(monkeypatch, n_hand=12, n_leg=40)
    c = evaluate.baseline_comparison(
        None, "test", base["ids"], labels, model, n_bootstrap=5, seed=0
    )
    assert "note" in c["subgroups"]["region=hand"] and "model" not in c["subgroups"]["region=hand"]
    assert "model" in c["subgroups"]["region=leg"]


# --------------------------------------------------------------------------- occlusion pieces


def test_coons_fill_is_exact_on_bilinear_images_and_removes_a_line():
    yy, xx = np.mgrid[0:32, 0:40].astype(np.float32)
    ramp = (0.5 + 0.01 * yy + 0.02 * xx + 0.0005 * yy * xx)[..., None]
    np.testing.assert_allclose(occlusion.coons_fill(ramp, 8, 10, 20, 30), ramp, atol=1e-5)
    lined = ramp.copy()
    lined[14, 12:28] = 0.0  # a dark fracture line inside the box
    filled = occlusion.coons_fill(lined, 8, 10, 20, 30)
    np.testing.assert_allclose(filled, ramp, atol=1e-5)
    # outside the rectangle nothing changes
    noise = np.random.default_rng(0).random((16, 16, 1)).astype(np.float32)
    edited = occlusion.coons_fill(noise, 4, 4, 8, 8)
    outside = np.ones((16, 16), bool)
    outside[4:8, 4:8] = False
    assert np.array_equal(edited[outside], noise[outside])
    assert not np.array_equal(edited[4:8, 4:8], noise[4:8, 4:8])


def test_grown_boxes_and_control_window():
    rects = occlusion.grown_boxes([[0.25, 0.25, 0.5, 0.5]], (100, 100))
    # pixels 25..50, grown by 15% of 25 (3.75 px) + 2 px a side: 19.25..55.75, rounded outwards
    assert rects == [(19, 19, 56, 56)]
    gray = np.zeros((100, 100))
    gray[60:90, 60:90] = 0.8  # the only bright place off the box and the border band
    gray[0:10, 0:10] = 0.8  # bright, but in the border band (a burnt-in letter)
    win = occlusion.control_window(gray, (10, 10), 0.8, rects, border=0.1)
    y0, x0, y1, x1 = win
    assert (y1 - y0, x1 - x0) == (10, 10)
    assert 60 <= y0 and y1 <= 90 and 60 <= x0 and x1 <= 90
    # no place free: None
    assert occlusion.control_window(gray, (10, 10), 0.8, [(0, 0, 100, 100)], 0.1) is None


def test_occlusion_test_on_a_model_that_reads_the_box_region():
    """A 'classifier' that is the darkest pixel's depth inside the centre: filling the boxes
    (where the dark line is) takes its AUROC to chance; filling controls does not."""
    rng = np.random.default_rng(0)
    images, labels, boxes = [], [], []
    for k in range(40):
        img = 0.5 + 0.05 * rng.random((32, 32, 1)).astype(np.float32)
        y = k % 2
        b = np.zeros((0, 4))
        if y:
            r, c = rng.integers(10, 18, size=2)
            img[r, c : c + 5] = 0.0
            b = np.array([[r / 32, c / 32, (r + 1) / 32, (c + 5) / 32]])
        images.append(img), labels.append(y), boxes.append(b)

    def model(x, training=False):
        return 1.0 - tf.reduce_min(tf.reshape(x, [tf.shape(x)[0], -1]), axis=1, keepdims=True)

    batches = [(np.stack(images), np.array(labels), [f"i{k}" for k in range(40)], boxes)]
    r = occlusion.occlusion_test(model, batches, border=0.1, n_bootstrap=50)
    assert r["available"] and (r["n_fractured"], r["n_normal"]) == (20, 20)
    assert r["auroc_original"]["auroc"] == 1.0
    assert r["auroc_control_filled"]["auroc"] == 1.0
    assert r["auroc_fracture_filled"]["auroc"] < 0.75
    assert r["reads_the_fracture_region"] and r["difference"]["ci95"][0] > 0
    assert "control minus fracture filled" in occlusion.summary(r)


def test_the_run_page_shows_the_leads_inside_subgroups_and_within_region(monkeypatch, tmp_path):
    import json

    import yaml

    from kerasfrac.evaluation import html as report_html

    base, labels, model = _fake_baseline(monkeypatch)
    c = evaluate.baseline_comparison(None, "test", base["ids"], labels, model, n_bootstrap=20)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"dataset": "synthetic", "data": {}}))
    m = metrics.split_metrics(labels, model, n_bootstrap=0)
    (run / "metrics.json").write_text(
        json.dumps({"split": "test", **m, "no_anatomy_baseline": c}, default=float)
    )
    text = " ".join(report_html.render_run(run).split())
    hand = c["subgroups"]["region=hand"]
    lead = hand["difference"]
    lo, hi = lead["ci95"]
    assert 'region=hand</td><td class="n">30</td>' in text
    assert f"{lead['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}]" in text
    w = c["within_region"]["difference"]
    assert 'within body region (pooled)</td><td class="n">60</td>' in text
    assert f"{w['difference']:+.3f} [{w['ci95'][0]:+.3f}, {w['ci95'][1]:+.3f}]" in text
