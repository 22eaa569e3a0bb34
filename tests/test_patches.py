"""kerasfrac.explain.patches: the patch study's crops (fracture against control, from the same
images) and its probe, which must learn a fracture that is drawn and not one that is not."""

from __future__ import annotations

import numpy as np
import pytest

from kerasfrac.explain import patches


@pytest.fixture(scope="module")
def phantom_builds(tmp_path_factory):
    from tfrecords_builder.build import BuildOptions, build
    from tfrecords_builder.datasets import synthetic

    out = {}
    for name, strength in (("drawn", 1.0), ("faint", 0.05)):
        root = tmp_path_factory.mktemp(f"patches-{name}")
        synthetic.generate(
            root / "raw",
            count=120,
            fractured_fraction=0.5,
            image_size=64,
            seed=5,
            line_strength=strength,
        )
        build("synthetic", root / "raw", root / "tfr", BuildOptions(progress=False, shards=1))
        out[name] = root / "tfr"
    return out


def test_crops_pair_each_fracture_with_a_control_from_the_same_image(phantom_builds):
    c = patches.crops(phantom_builds["drawn"], "train", 64)
    p = patches.patch_size(64)
    assert c["x"].shape[1:] == (p, p, 1) and c["x"].dtype == np.float32
    assert set(np.unique(c["y"])) == {0, 1}
    assert len(c["region"]) == len(c["y"])
    for image_id in np.unique(c["group"]):  # as many controls as fractures, image by image
        y = c["y"][c["group"] == image_id]
        assert (y == 1).sum() == (y == 0).sum() >= 1


def test_a_train_fraction_keeps_that_share_of_fractured_images_whole_and_every_normal_crop(
    phantom_builds,
):
    c = patches.crops(phantom_builds["drawn"], "train", 64, normals=1, seed=3)
    fractured = np.unique(c["group"][c["y"] == 1])
    normal = np.setdiff1d(np.unique(c["group"]), fractured)
    half = patches.keep_fractured_images(c, 0.5, seed=1)
    kept = np.unique(half["group"][half["y"] == 1])
    assert kept.size == round(0.5 * fractured.size) and set(kept) <= set(fractured)
    for image_id in fractured:  # a kept image keeps its fracture crops and its controls
        n = (c["group"] == image_id).sum()
        assert (half["group"] == image_id).sum() == (n if image_id in kept else 0)
    assert set(normal) <= set(half["group"]) and normal.size > 0  # every normal crop stays
    assert (half["group"][np.isin(half["group"], normal)].size) == np.isin(c["group"], normal).sum()
    assert all(v.shape[0] == half["y"].shape[0] for v in half.values())
    assert patches.keep_fractured_images(c, 1.0)["y"].size == c["y"].size
    with pytest.raises(ValueError, match="train fraction"):
        patches.keep_fractured_images(c, 0.0)


@pytest.mark.slow
def test_the_probe_learns_a_drawn_fracture_and_not_a_faint_one(phantom_builds):
    drawn = patches.study(phantom_builds["drawn"], 64, epochs=10, seed=0)
    faint = patches.study(phantom_builds["faint"], 64, epochs=10, seed=0)
    assert drawn["auroc"] >= 0.8, drawn
    assert drawn["auroc"] - faint["auroc"] >= 0.15, (drawn, faint)
    assert drawn["eval_split"] == "val" and drawn["eval_crops"] > 0 and drawn["ci95"] is not None


def test_crop_maps_score_each_crop_as_cut_out():
    model = patches.probe(12, seed=1)
    images = np.random.default_rng(2).random((2, 40, 40, 1)).astype("float32")
    maps = patches.crop_maps(model, images, stride=8)
    assert maps.shape == (2, 4, 4)  # (40 - 12) // 8 + 1 places a side
    for b, i, j in ((0, 0, 0), (1, 2, 3), (0, 3, 1)):
        crop = images[b : b + 1, 8 * i : 8 * i + 12, 8 * j : 8 * j + 12]
        want = float(model.predict(crop, verbose=0)[0, 0])
        assert maps[b, i, j] == pytest.approx(want, abs=1e-5)


def test_the_command_trains_on_a_train_fraction_and_writes_its_json(phantom_builds, tmp_path):
    out = tmp_path / "study.json"
    argv = ["--data-dir", str(phantom_builds["drawn"]), "--image-size", "64", "--epochs", "1"]
    assert patches.main([*argv, "--train-fraction", "0.5", "--json", str(out)]) == 0
    import json

    (row,) = json.loads(out.read_text())
    whole = patches.crops(phantom_builds["drawn"], "train", 64)
    assert row["train_fraction"] == 0.5 and row["image_size"] == 64
    assert row["train_fractures"] == len(patches.keep_fractured_images(whole, 0.5)["y"]) // 2
    assert 0.0 <= row["auroc"] <= 1.0
