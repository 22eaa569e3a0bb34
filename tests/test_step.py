"""The training step and what feeds it: the learning-rate schedule, class weights, the losses
(label smoothing, class weights, box loss) and the per-batch augmentations inside the step."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from kerasfrac import config, data, models
from kerasfrac.config import ModelConfig
from kerasfrac.data import augment
from kerasfrac.training import train


def test_cosine_schedule_warms_up_then_decays_to_zero():
    cfg = config.load_config(
        None,
        [
            "train.schedule=cosine",
            "train.warmup_epochs=1",
            "train.learning_rate=0.01",
            "train.epochs=4",
        ],
    )
    lr = train.learning_rate(cfg, steps_per_epoch=10)
    assert float(lr(0)) == pytest.approx(1e-4)
    assert float(lr(10)) == pytest.approx(0.01)
    assert float(lr(25)) == pytest.approx(0.005, rel=1e-3)  # half-way through the decay
    assert float(lr(40)) == pytest.approx(0.0, abs=1e-9)
    assert train.learning_rate(config.Config(), 10) == 1e-4  # constant: the report


def test_class_weights_balance_the_train_split():
    cfg = config.load_config(None, ["train.class_weight=balanced"])
    manifest = data.Build(Path("."), {"splits": {"train": {"fractured": 25, "normal": 75}}})
    w0, w1 = train.class_weights(cfg, manifest)
    assert (w0, w1) == pytest.approx((100 / 150, 100 / 50))
    assert 75 * w0 == pytest.approx(25 * w1)
    assert train.class_weights(config.Config(), manifest) is None
    one_class = data.Build(Path("."), {"splits": {"train": {"fractured": 0, "normal": 75}}})
    with pytest.raises(ValueError, match="needs both classes"):
        train.class_weights(cfg, one_class)


def _compiled(name, box_head=False, size=32):
    if name == "resnet_small":  # no dropout: two forward passes give the same probabilities
        m = models.resnet_small.resnet_small((size, size, 1), dropout=0.0, box_head=box_head)
    else:
        m = models.build_model(ModelConfig(name, box_head=box_head), (size, size, 1))
    m.compile(optimizer=keras.optimizers.SGD(0.0), loss="binary_crossentropy")
    return m


def _bce(y, p):
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


def test_train_step_loss_is_smoothed_and_class_weighted():
    m = _compiled("paper_cnn")
    strategy = tf.distribute.get_strategy()
    rng = np.random.default_rng(0)
    images = rng.random((4, 32, 32, 1), dtype="float32")
    labels = np.array([1, 0, 1, 0], "float32")
    step = train.make_train_step(m, strategy, 4, label_smoothing=0.2, weights=(0.5, 2.0))
    ds = tf.data.Dataset.from_tensors({"image": images, "label": labels}).repeat()
    loss, probs, y, _ = step(iter(ds), tf.constant(0))
    smoothed = labels * 0.8 + 0.1
    want = _bce(smoothed, probs.numpy()) * np.where(labels == 1, 2.0, 0.5)
    np.testing.assert_allclose(loss.numpy(), want, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_train_step_adds_the_box_loss_only_where_weighted():
    m = _compiled("resnet_small", box_head=True, size=64)
    strategy = tf.distribute.get_strategy()
    rng = np.random.default_rng(1)
    images = rng.random((2, 64, 64, 1), dtype="float32")
    labels = np.array([1, 0], "float32")
    masks = np.zeros((2, 64, 64, 1), "float32")
    masks[0, 40:64, 40:64] = 1  # the bottom-right cell of the 2x2 heat map
    plain = train.make_train_step(m, strategy, 2)
    boxed = train.make_train_step(m, strategy, 2, box_loss_weight=3.0)
    loss0, p0, _, _ = plain(
        iter(tf.data.Dataset.from_tensors({"image": images, "label": labels}).repeat()),
        tf.constant(0),
    )
    weights = np.array([1.0, 0.0], "float32")
    batch = tf.data.Dataset.from_tensors(
        {"image": images, "label": labels, "box_mask": masks, "box_weight": weights}
    ).repeat()
    loss1, p1, _, _ = boxed(iter(batch), tf.constant(0))
    np.testing.assert_allclose(p0.numpy(), p1.numpy(), rtol=1e-6)  # lr 0: same weights
    heat = np.asarray(m(images, training=True)[1])[0, ..., 0]
    target = np.array([[0, 0], [0, 1]], "float32")
    want_extra = 3.0 * _bce(target, heat).mean()
    np.testing.assert_allclose(loss1.numpy()[0] - loss0.numpy()[0], want_extra, rtol=1e-3)
    np.testing.assert_allclose(loss1.numpy()[1], loss0.numpy()[1], rtol=1e-5)  # weight 0


def test_train_step_with_mixup_trains_on_blended_targets():
    """train.mixup: the step's loss is the BCE of the model on the blended images against
    the blended labels (the draw of that step: mixup_draw with the run's seed and the
    optimizer's step count), and the reported labels are the dominant images'."""
    m = _compiled("paper_cnn")
    strategy = tf.distribute.get_strategy()
    rng = np.random.default_rng(0)
    images = rng.random((8, 32, 32, 1), dtype="float32")
    labels = np.array([1, 0] * 4, "float32")
    ds = tf.data.Dataset.from_tensors({"image": images, "label": labels}).repeat()
    step = train.make_train_step(m, strategy, 8, mixup_alpha=0.4, seed=1)
    iteration = int(m.optimizer.iterations.numpy())
    loss, probs, y, _ = step(iter(ds), tf.constant(0))
    np.testing.assert_array_equal(y.numpy(), labels)
    lam, partner = augment.mixup_draw(8, 0.4, 1, iteration)
    lam, partner = lam.numpy(), partner.numpy()
    assert np.any(lam < 0.9) and np.any(labels[partner] != labels)  # real blends happened
    blended = lam[:, :, None, None] * images + (1 - lam[:, :, None, None]) * images[partner]
    p = np.asarray(m(blended, training=True)).ravel()  # lr 0: the step's weights
    np.testing.assert_allclose(probs.numpy(), p, rtol=1e-4, atol=1e-6)
    target = lam.ravel() * labels + (1 - lam.ravel()) * labels[partner]
    np.testing.assert_allclose(loss.numpy(), _bce(target, p), rtol=1e-3, atol=1e-5)
    # the next step draws anew
    lam2, _ = augment.mixup_draw(8, 0.4, 1, iteration + 1)
    assert np.abs(lam2.numpy() - lam).max() > 1e-3


def _boxed_batch(seed: int, box) -> tuple:
    """``(images, labels, masks, repeated batch dataset)``: 8 random 64 px images, every other
    one fractured with a box mask over ``box`` (a [rows, cols] slice), box weights 1."""
    images = np.random.default_rng(seed).random((8, 64, 64, 1), dtype="float32")
    labels = np.array([1, 0] * 4, "float32")
    masks = np.zeros((8, 64, 64, 1), "float32")
    masks[(np.s_[0::2], *box)] = 1.0
    weights = np.ones(8, "float32")
    batch = tf.data.Dataset.from_tensors(
        {"image": images, "label": labels, "box_mask": masks, "box_weight": weights}
    ).repeat()
    return images, labels, masks, batch


@pytest.mark.slow
def test_train_step_with_box_paste_trains_on_the_pasted_images_and_labels():
    m = _compiled("resnet_small", box_head=True, size=64)
    strategy = tf.distribute.get_strategy()
    images, labels, masks, batch = _boxed_batch(3, np.s_[8:30, 34:60])
    step = train.make_train_step(m, strategy, 8, box_paste_rate=1.0, seed=3)
    iteration = int(m.optimizer.iterations.numpy())
    loss, probs, y, _ = step(iter(batch), tf.constant(0))
    chosen, partner = augment.box_paste_draw(8, 1.0, 3, iteration)
    px, py, _ = augment.box_paste(
        tf.constant(images), tf.constant(labels), tf.constant(masks), chosen, partner
    )
    want_y = np.maximum(labels, labels[partner.numpy()])  # a donor with a box makes it 1
    assert want_y.sum() > labels.sum()  # some normal images received a fracture
    np.testing.assert_array_equal(y.numpy(), want_y)  # reported labels: the pasted ones
    np.testing.assert_array_equal(py.numpy(), want_y)
    p = np.asarray(m(px, training=True)[0]).ravel()  # lr 0: the step's weights
    np.testing.assert_allclose(probs.numpy(), p, rtol=1e-4, atol=1e-6)
    assert not np.allclose(p, np.asarray(m(images, training=True)[0]).ravel(), atol=1e-6)


@pytest.mark.slow
def test_train_step_with_fracture_fill_trains_on_the_filled_images_and_labels():
    m = _compiled("resnet_small", box_head=True, size=64)
    strategy = tf.distribute.get_strategy()
    images, labels, masks, batch = _boxed_batch(4, np.s_[20:30, 24:40])
    step = train.make_train_step(m, strategy, 8, fracture_fill_rate=1.0, seed=5)
    iteration = int(m.optimizer.iterations.numpy())
    loss, probs, y, _ = step(iter(batch), tf.constant(0))
    drawn = augment.fracture_fill_draw(
        tf.constant(images),
        tf.constant(masks),
        tf.constant(labels),
        1.0,
        augment.step_seed(5, iteration, 0, salt=130_363),
    )
    fx, fy, _ = augment.fracture_fill(tf.constant(images), tf.constant(labels), masks, drawn)
    gone = drawn["fracture"].numpy()
    assert gone.any() and not gone.all()
    np.testing.assert_array_equal(y.numpy(), np.where(gone, 0.0, labels))  # reported labels
    np.testing.assert_array_equal(fy.numpy(), y.numpy())
    p = np.asarray(m(fx, training=True)[0]).ravel()  # lr 0: the step's weights
    np.testing.assert_allclose(probs.numpy(), p, rtol=1e-4, atol=1e-6)
    assert not np.allclose(p, np.asarray(m(images, training=True)[0]).ravel(), atol=1e-6)
