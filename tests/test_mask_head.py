"""The dense mask head (``model.box_stride: 8``): its decoder, the soft Dice loss, and that a
model trained with it marks where the finding is."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from kerasfrac import config, models
from kerasfrac.config import ConfigError
from kerasfrac.training import train


def test_stride_8_gives_a_cell_per_8_pixels_and_its_loss_reaches_stage_2():
    cfg = config.load_config(
        overrides=["model.name=resnet_small", "model.box_head=true", "model.box_stride=8"]
    )
    m = models.build_model(cfg.model, (128, 128, 1))
    x = np.random.default_rng(0).random((2, 128, 128, 1), dtype="float32")
    assert m(x, training=False)[1].shape == (2, 16, 16, 1)
    # the cells read the decoder (64 channels) and the 256 upsampled last features
    assert m.get_layer(models.BOX_LOGITS).kernel.shape == (1, 1, 320, 1)
    # the classifier is the stride-32 model's: the decoder feeds the heat map only
    coarse = models.build_model(config.ModelConfig("resnet_small", box_head=True), (128, 128, 1))
    assert models.classifier(m).count_params() == models.classifier(coarse).count_params()
    # the heat map's gradient reaches stage 2 (stride 8) through the decoder's lateral branch
    with tf.GradientTape(persistent=True) as tape:
        heat = m(x, training=True)[1]
    for name in ("decoder_bn2", "decoder_lateral2", "decoder_lateral1", "decoder_lateral0"):
        grads = tape.gradient(heat, m.get_layer(name).trainable_weights)
        assert all(g is not None and float(tf.reduce_max(tf.abs(g))) > 0 for g in grads), name
    del tape, grads
    # sizes that are not multiples of 32 line up: each level is resized to the next one's
    odd = models.resnet_small.resnet_small((200, 200, 1), box_head=True, box_stride=8)
    assert tuple(odd.outputs[1].shape) == (None, 25, 25, 1)


def test_soft_dice_loss_by_hand():
    cells = np.zeros((3, 4, 4, 1), "float32")
    cells[0, 1:3, 1:3] = 1.0  # 4 target cells
    cells[1, 0, 0] = 1.0
    heat = np.zeros((3, 4, 4, 1), "float32")
    heat[0] = cells[0]  # image 0: the map is its target
    heat[1, 3, 3] = 1.0  # image 1: one cell, the wrong one
    heat[2, 2, 2] = 0.5  # image 2: normal (no target cells)
    loss = np.asarray(train.soft_dice_loss(cells, heat))
    np.testing.assert_allclose(loss[0], 0.0, atol=1e-7)  # (2*4 + 1) / (4 + 4 + 1)
    np.testing.assert_allclose(loss[1], 1.0 - 1.0 / 3.0, rtol=1e-6)  # (0 + 1) / (1 + 1 + 1)
    assert loss[2] == 0.0  # an empty target is not scored by Dice (the BCE covers it)


def test_bce_dice_weighs_the_few_fracture_cells_more_than_bce_alone():
    """On a 16x16 map with a 2x2 fracture and a flat 0.1 prediction, BCE's mean gradient per
    fracture cell is diluted by the 256 cells (-1 / (256 x 0.1)); Dice's adds
    -(2 x 30.6 - 1.8) / 30.6^2 (30.6 = 25.6 + 4 + 1), so the sum is 2.6x BCE's."""
    cells = np.zeros((1, 16, 16, 1), "float32")
    cells[0, 4:6, 4:6] = 1.0
    heat = tf.Variable(np.full((1, 16, 16, 1), 0.1, "float32"))
    batch = {"box_cells": cells, "box_weight": np.ones(1, "float32"), "label": np.ones(1)}
    batch["y"] = np.ones((1, 1), "float32")
    grads = {}
    for kind in ("bce", "bce_dice"):
        losses = train.Losses(box_out=1, box_grid=(16, 16), box_loss_weight=1.0, box_loss=kind)
        with tf.GradientTape() as tape:
            loss, _ = losses(batch, [tf.constant([[0.9]]), heat])
        grads[kind] = np.asarray(tape.gradient(loss, heat))[0, ..., 0]
    # both raise the fracture cells (negative gradient there)
    assert grads["bce"][4, 4] < 0 and grads["bce_dice"][4, 4] < 0
    np.testing.assert_allclose(grads["bce"][4, 4], -1 / 25.6, rtol=1e-4)
    np.testing.assert_allclose(grads["bce_dice"][4, 4], -1 / 25.6 - 59.4 / 30.6**2, rtol=1e-4)
    # and both lower the cells outside it
    assert grads["bce"][10, 10] > 0 and grads["bce_dice"][10, 10] > grads["bce"][10, 10]


def test_box_loss_needs_the_box_head_and_a_known_name():
    with pytest.raises(ConfigError, match=r"'train.box_loss'.*model.box_head=true"):
        config.load_config(overrides=["model.name=resnet_small", "train.box_loss=bce_dice"])
    with pytest.raises(ConfigError, match=r"train.box_loss.*bce_dice"):
        config.load_config(
            overrides=["model.name=resnet_small", "model.box_head=true", "train.box_loss=dice"]
        )
    cfg = config.load_config(
        overrides=["model.name=resnet_small", "model.box_head=true", "train.box_loss=bce_dice"]
    )
    assert train.loss_options(cfg.train)["box_loss"] == "bce_dice"


def _squares(n: int, seed: int, size: int = 64):
    """Noisy flat images; every other one holds a brighter 10x10 square (the 'fracture', its
    mask the target) at a random place."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.4, 0.08, (n, size, size, 1)).astype("float32")
    masks = np.zeros((n, size, size, 1), "float32")
    labels = np.zeros(n, "float32")
    for i in range(0, n, 2):
        r, c = rng.integers(2, size - 12, 2)
        x[i, r : r + 10, c : c + 10] += 0.3
        masks[i, r : r + 10, c : c + 10] = 1.0
        labels[i] = 1.0
    return np.clip(x, 0.0, 1.0), masks, labels


@pytest.mark.slow
def test_a_model_trained_with_the_mask_head_marks_the_finding():
    """resnet_small (width 8) with the stride-8 head and BCE + Dice on squares: after 60
    steps its heat map peaks inside the square on held-out fractured images far above the
    chance of a random cell (25 of 64 cells touch a 10x10 square at most)."""
    tf.keras.utils.set_random_seed(3)
    model = models.resnet_small.resnet_small(
        (64, 64, 1), widths=(8, 16, 32, 64), blocks_per_stage=1, box_head=True, box_stride=8
    )
    losses = train.Losses.for_model(model, box_loss_weight=1.0, box_loss="bce_dice")
    assert losses.box_grid == (8, 8)
    optimizer = tf.keras.optimizers.Adam(3e-3)
    x, masks, labels = _squares(512, seed=1)

    @tf.function
    def step(images, mask, label):
        batch = losses.targets(
            {"label": label, "box_mask": mask, "box_weight": tf.ones_like(label)}
        )
        with tf.GradientTape() as tape:
            loss, _ = losses(batch, model(images, training=True))
            loss = tf.reduce_mean(loss)
        grads = tape.gradient(loss, model.trainable_weights)
        optimizer.apply_gradients(zip(grads, model.trainable_weights))
        return loss

    rng = np.random.default_rng(2)
    for _ in range(60):
        i = rng.choice(len(x), 32, replace=False)
        step(x[i], masks[i], labels[i])
    tx, tmasks, tlabels = _squares(64, seed=9)
    _, heat = model(tx, training=False)
    heat = np.asarray(heat)[..., 0]
    cells = np.asarray(tf.image.resize(tmasks, (8, 8), "area"))[..., 0] > 0
    hits = [cells[i].flat[heat[i].argmax()] for i in range(len(tx)) if tlabels[i] == 1]
    assert np.mean(hits) >= 0.8, np.mean(hits)
    # and it is flat-ish on the normal images: their peak is below the fractured ones'
    peaks = heat.reshape(len(tx), -1).max(1)
    assert peaks[tlabels == 1].mean() > peaks[tlabels == 0].mean() + 0.2
