"""model.meta_head: multi-task supervision from FracAtlas' metadata columns (body region,
hardware, view), its output, its loss, its data and that a run learns it."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from sklearn.metrics import roc_auc_score

from kerasfrac import config, data, models, runs
from kerasfrac.config import ConfigError, ModelConfig
from kerasfrac.data import augment
from kerasfrac.training import train
from tests.conftest import make_tfrecord_dir
from tfrecords_builder.defaults import META_COLUMNS, META_TARGETS

HAND = META_TARGETS.index("hand")


def test_meta_targets_are_the_metadata_that_does_not_restate_the_label():
    assert "fractured" not in META_TARGETS and "fracture_count" not in META_TARGETS
    assert set(META_TARGETS) == set(META_COLUMNS) - {"fractured", "fracture_count"}
    assert {"hand", "leg", "hip", "shoulder", "hardware", "frontal", "lateral"} <= set(META_TARGETS)


@pytest.mark.slow
def test_meta_head_is_the_last_output_and_stays_out_of_the_saved_models(tmp_path):
    cfg = ModelConfig("resnet_small", box_head=True, meta_head=True)
    m = models.build_model(cfg, (64, 64, 1), fused_batchnorm=True)
    assert m.output_names == [models.PROB, models.BOX_HEATMAP, models.META_LOGITS]
    assert models.has_box_head(m) and models.has_meta_head(m)
    x = np.random.default_rng(0).random((3, 64, 64, 1), dtype="float32")
    m(x, training=True)  # moves BatchNorm statistics away from their initial values
    prob, heat, meta = (np.asarray(t) for t in m(x, training=False))
    assert meta.shape == (3, len(META_TARGETS)) and heat.shape == (3, 2, 2, 1)
    clf, boxed = models.classifier(m), models.box_model(m)
    assert clf.output_names == [models.PROB]
    assert boxed.output_names == [models.PROB, models.BOX_HEATMAP]
    assert not models.has_meta_head(boxed) and models.box_model(boxed) is boxed
    np.testing.assert_array_equal(np.asarray(clf(x)), prob)
    np.testing.assert_array_equal(np.asarray(boxed(x)[1]), heat)
    m.save(tmp_path / "m.keras")
    loaded = models.load_model(tmp_path / "m.keras")
    assert loaded.output_names == m.output_names
    for a, b in zip(keras.tree.flatten(m(x)), keras.tree.flatten(loaded(x))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # without a box head the metadata logits are the second output
    alone = models.build_model(ModelConfig("resnet_small", meta_head=True), (64, 64, 1))
    assert alone.output_names == [models.PROB, models.META_LOGITS] and not models.has_box_head(
        alone
    )


def test_heatmap_head_gets_the_metadata_from_the_average_of_the_features():
    cfg = ModelConfig("resnet_small", box_head=True, head="heatmap", meta_head=True)
    m = models.build_model(cfg, (64, 64, 1))
    assert m.get_layer(models.META_LOGITS).input is m.get_layer("meta_gap").output


def test_meta_loss_is_the_mean_bce_over_the_known_columns():
    targets = np.array([[1.0, 0.0, -1.0], [-1.0, -1.0, -1.0], [0.3, 1.0, 0.0]], "float32")
    logits = np.array([[2.0, -1.0, 5.0], [1.0, 1.0, 1.0], [0.0, 0.5, -3.0]], "float32")
    p = 1 / (1 + np.exp(-logits))
    bce = -(targets * np.log(p) + (1 - targets) * np.log(1 - p))
    want = [bce[0, :2].mean(), 0.0, bce[2].mean()]
    np.testing.assert_allclose(train.meta_loss(targets, logits).numpy(), want, rtol=1e-5)


def _frozen_meta_model() -> keras.Model:
    """resnet_small with a metadata head, no dropout and learning rate 0: a step leaves the
    weights as they are, so the test can recompute the step's loss with the model."""
    m = models.resnet_small.resnet_small((32, 32, 1), dropout=0.0, meta_targets=len(META_TARGETS))
    m.compile(optimizer=keras.optimizers.SGD(0.0), loss="binary_crossentropy")
    return m


@pytest.mark.slow
def test_train_step_adds_the_weighted_meta_loss():
    m = _frozen_meta_model()
    strategy = tf.distribute.get_strategy()
    rng = np.random.default_rng(1)
    images = rng.random((2, 32, 32, 1), dtype="float32")
    labels = np.array([1, 0], "float32")
    meta = rng.integers(-1, 2, (2, len(META_TARGETS))).astype("float32")
    plain = train.make_train_step(m, strategy, 2)
    with_meta = train.make_train_step(m, strategy, 2, meta_loss_weight=0.5)
    loss0, p0, _, _ = plain(
        iter(tf.data.Dataset.from_tensors({"image": images, "label": labels}).repeat()),
        tf.constant(0),
    )
    batch = tf.data.Dataset.from_tensors({"image": images, "label": labels, "meta": meta}).repeat()
    loss1, p1, _, _ = with_meta(iter(batch), tf.constant(0))
    np.testing.assert_allclose(p0.numpy(), p1.numpy(), rtol=1e-6)  # lr 0: same weights
    logits = m(images, training=True)[1]
    want = 0.5 * train.meta_loss(meta, logits).numpy()
    np.testing.assert_allclose(loss1.numpy() - loss0.numpy(), want, rtol=1e-3, atol=1e-6)
    assert np.all(want > 0)


def _hand_bar(rng, image):
    """Metadata planted in the pixels: "hand" X-rays carry a bright horizontal bar (the label's
    bar is vertical, so region and label are independent)."""
    hand = int(rng.integers(0, 2))
    if hand:
        h = image.shape[0]
        y0 = int(rng.integers(0, h - h // 8 + 1))
        image[y0 : y0 + h // 8, :] = 200
    return {"hand": hand, "leg": 1 - hand}


@pytest.fixture(scope="module")
def meta_build(tmp_path_factory):
    return make_tfrecord_dir(
        tmp_path_factory.mktemp("meta"),
        {"train": 24, "val": 12, "test": 12},
        size=32,
        source="fracatlas",
        meta=_hand_bar,
    )


def _has_bar(images) -> np.ndarray:
    """Whether each image [B, H, W, 1] has a full bright row (the planted horizontal bar)."""
    return (np.asarray(images)[..., 0] > 0.7).all(axis=2).any(axis=1)


@pytest.mark.parametrize("with_boxes", [False, True])
def test_training_stream_ends_with_the_records_metadata(meta_build, with_boxes):
    cfg = config.DataConfig(dir=str(meta_build), image_size=32, flips="none")
    ds, _ = data.make_dataset(None, "train", cfg, 16, seed=0, with_boxes=with_boxes, with_meta=True)
    batch = next(iter(ds))
    boxes = ["box_mask", "box_weight"] if with_boxes else []
    assert sorted(batch) == sorted(["image", "label", "meta", *boxes])
    images, meta = batch["image"].numpy(), batch["meta"].numpy()
    assert meta.shape == (16, len(META_TARGETS)) and meta.dtype == np.float32
    np.testing.assert_array_equal(meta[:, HAND], _has_bar(images).astype("float32"))
    np.testing.assert_array_equal(meta[:, META_TARGETS.index("leg")], 1 - meta[:, HAND])
    unknown = [i for i, c in enumerate(META_TARGETS) if c not in ("hand", "leg")]
    assert np.all(meta[:, unknown] == -1.0)  # columns the record does not carry


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["dataset=synthetic"], "'synthetic' records do not carry"),
        (["model.name=paper_cnn"], "model.name is 'paper_cnn'"),
        (["train.meta_loss_weight=-1"], "'train.meta_loss_weight' must be >= 0"),
    ],
)
def test_meta_head_is_refused_where_it_cannot_learn(overrides, match):
    base = ["model.name=resnet_small", "model.meta_head=true"]
    with pytest.raises(ConfigError, match=match):
        config.load_config(None, [*base, *overrides])


@pytest.mark.slow
def test_meta_head_run_learns_the_metadata_and_the_label(tmp_path, meta_build):
    """A run with model.meta_head on a build whose "hand" flag is drawn in the pixels: the
    classifier separates the label and the trained metadata output separates "hand" (the same
    run with train.meta_loss_weight=0 left "hand" at 0.45). Over train.seed 42 / 1 / 2 / 3:
    test AUROC 1.00 each time on 12 + 12 test images (on 4 + 4, seed 3 gave 0.625), "hand"
    AUROC 0.99-1.00 on val (2026-12-07)."""
    run_dir = tmp_path / "run"
    cfg = config.from_dict(
        {
            "dataset": "fracatlas",
            "run_dir": str(run_dir),
            "data": {"dir": str(meta_build), "image_size": 32, "flips": "none"},
            "model": {"name": "resnet_small", "meta_head": True, "box_head": True},
            "train": {
                "epochs": 20,
                "batch_size": 8,
                "optimizer": "adamw",
                "learning_rate": 3e-3,
                "weight_decay": 0.01,
                "steps_per_epoch": 6,
                "meta_loss_weight": 3.0,
            },
        }
    )
    result = train.train(cfg, verbose=0)
    assert result["auroc"] > 0.9  # the classifier, on val (eval.test_at_end default: test)
    # the last committed checkpoint: the trained model with all its outputs
    full = models.load_model(sorted(run_dir.glob("checkpoints/gen-*/model.keras"))[-1])
    assert models.has_meta_head(full)
    saved = models.load_model(runs.model_path(run_dir))
    assert saved.output_names == [models.PROB]
    assert models.load_model(runs.box_model_path(run_dir)).output_names == [
        models.PROB,
        models.BOX_HEATMAP,
    ]
    ds = data.make_eval_dataset(meta_build, "val", cfg.data, 24)
    images = np.concatenate([b["image"].numpy() for b in ds])
    logits = np.asarray(full(images, training=False)[2])[:, HAND]
    hand = _has_bar(images)
    assert 0 < hand.sum() < len(hand)
    assert roc_auc_score(hand, logits) > 0.9


@pytest.mark.slow
def test_bench_times_the_step_with_the_meta_loss(monkeypatch):
    """`kerasfrac bench` feeds the metadata targets to the training step it times, so that the
    timed step computes the same loss terms as training."""
    from kerasfrac import bench

    seen = []
    real = train.meta_loss
    monkeypatch.setattr(train, "meta_loss", lambda t, lg: seen.append(t.shape) or real(t, lg))
    cfg = config.load_config(
        None,
        [
            "model.name=resnet_small",
            "model.box_head=true",
            "model.meta_head=true",
            "data.image_size=32",
            "train.batch_size=4",
        ],
    )
    figure = bench.measure_train_step(cfg, steps=2, repeats=1)
    assert figure["images_per_second"] > 0
    assert seen and tuple(seen[0]) == (4, len(META_TARGETS))  # traced with the targets


@pytest.mark.slow
def test_train_step_with_mixup_blends_the_metadata_where_both_images_know_it():
    m = _frozen_meta_model()
    strategy = tf.distribute.get_strategy()
    rng = np.random.default_rng(3)
    images = rng.random((8, 32, 32, 1), dtype="float32")
    labels = np.array([1, 0] * 4, "float32")
    meta = rng.integers(0, 2, (8, len(META_TARGETS))).astype("float32")
    meta[0, :3] = -1.0  # unknown: stays unknown in every blend with image 0
    ds = tf.data.Dataset.from_tensors({"image": images, "label": labels, "meta": meta}).repeat()
    step = train.make_train_step(m, strategy, 8, meta_loss_weight=0.5, mixup_alpha=0.4, seed=1)
    iteration = int(m.optimizer.iterations.numpy())
    loss, _, _, _ = step(iter(ds), tf.constant(0))
    lam, partner = (t.numpy() for t in augment.mixup_draw(8, 0.4, 1, iteration))
    assert np.any(lam < 0.9) and np.any(partner != np.arange(8))  # real blends happened
    w = lam[:, :, None, None]
    prob, logits = m(w * images + (1 - w) * images[partner], training=True)  # lr 0
    target = lam.ravel() * labels + (1 - lam.ravel()) * labels[partner]
    blended = lam * meta + (1 - lam) * meta[partner]
    blended[np.minimum(meta, meta[partner]) < 0] = -1.0
    p = np.clip(np.asarray(prob).ravel(), 1e-7, 1 - 1e-7)
    bce = -(target * np.log(p) + (1 - target) * np.log(1 - p))
    want = bce + 0.5 * train.meta_loss(blended, logits).numpy()
    np.testing.assert_allclose(loss.numpy(), want, rtol=1e-3, atol=1e-5)
