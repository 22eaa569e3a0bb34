"""Issue 39's faster training paths give the losses and gradients of the plain ones (speed is
measured by ``kerasfrac bench`` / ``python -m kerasfrac.abstep``, never asserted here)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from kerasfrac import bench, config
from kerasfrac.models import build_model
from kerasfrac.models.layers import FusedBatchNormalization
from kerasfrac.training import train


def _cfg(precision: str):
    return config.from_dict(
        {
            "dataset": "fracatlas",
            "data": {"image_size": 64},
            "model": {
                "name": "resnet_small",
                "box_head": True,
                "meta_head": True,
                "sync_batchnorm": False,
            },
            "train": {
                "batch_size": 8,
                "precision": precision,
                "label_smoothing": 0.1,
                "box_loss_weight": 1.0,
                "meta_loss_weight": 0.5,
            },
        }
    )


def _losses_and_grads(cfg, half_data: bool, weights=None):
    """Per-example losses and gradients of one forward/backward pass (traced, so that
    TensorFlow's graph rewrites, e.g. BatchNorm + ReLU fusion, apply as in training)."""
    keras.mixed_precision.set_global_policy(cfg.train.precision)
    try:
        keras.utils.set_random_seed(0)  # the same dropout masks in both models
        model = build_model(cfg.model, (64, 64, 1), fused_batchnorm=True)
        if weights is not None:
            model.set_weights(weights)
        for layer in model.layers:
            if isinstance(layer, FusedBatchNormalization):
                layer.half_data = half_data
        losses = train.Losses.for_model(model, **train.loss_options(cfg.train))
        batch = losses.targets(bench.synthetic_batch(cfg))

        @tf.function
        def run():
            with tf.GradientTape() as tape:
                per_example, _ = losses(batch, model(batch["image"], training=True))
                loss = tf.reduce_mean(per_example)
            return per_example, tape.gradient(loss, model.trainable_variables)

        per_example, grads = run()
        return model, per_example.numpy(), [g.numpy() for g in grads]
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _assert_grads_close(grads, ref, rel: float):
    """Every gradient array within ``rel`` of its reference's largest magnitude."""
    for g, r in zip(grads, ref, strict=True):
        scale = np.abs(r).max() + 1e-8
        np.testing.assert_allclose(g, r, rtol=0, atol=rel * scale)


def test_batchnorm_on_bfloat16_data_matches_the_float32_data_path():
    """``FusedBatchNormalization.half_data`` (bfloat16 activations, float32 statistics)
    against the float32 copy it replaced, in the recipe's mixed_bfloat16 model: the input is
    the same bfloat16 tensor and the kernel accumulates in float32 either way, so only the
    rounding of the output to bfloat16 (done once either way) and summation order differ.
    Tolerance: per-example losses within 1e-3 relative; every gradient array within 2% of
    its largest magnitude (two bfloat16 roundings, 2^-8 each, through 20 layers; on the
    AMX Xeon of issue 39 both came out bit-identical)."""
    cfg = _cfg("mixed_bfloat16")
    model, ref_loss, ref_grads = _losses_and_grads(cfg, half_data=False)
    layer = model.get_layer("s1b1_bn1")
    assert isinstance(layer, FusedBatchNormalization) and layer.compute_dtype == "bfloat16"
    _, loss, grads = _losses_and_grads(cfg, half_data=True, weights=model.get_weights())
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-3)
    _assert_grads_close(grads, ref_grads, 0.02)


def test_batchnorm_half_data_leaves_float32_models_alone():
    cfg = _cfg("float32")
    model, ref_loss, ref_grads = _losses_and_grads(cfg, half_data=False)
    _, loss, grads = _losses_and_grads(cfg, half_data=True, weights=model.get_weights())
    np.testing.assert_array_equal(loss, ref_loss)
    _assert_grads_close(grads, ref_grads, 1e-5)


@pytest.mark.parametrize("half_data", [True, False])
def test_batchnorm_half_data_keeps_float32_statistics(half_data):
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        layer = FusedBatchNormalization(momentum=0.5)
        layer.half_data = half_data
        x = tf.constant(np.random.default_rng(1).normal(3, 2, (4, 5, 5, 3)), tf.bfloat16)
        y = layer(x, training=True)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert y.dtype == tf.bfloat16 and layer.moving_mean.dtype == "float32"
    mean = tf.reduce_mean(tf.cast(x, tf.float32), [0, 1, 2]).numpy()
    var = tf.math.reduce_variance(tf.cast(x, tf.float32), [0, 1, 2]).numpy()
    np.testing.assert_allclose(layer.moving_mean.numpy(), 0.5 * mean, rtol=1e-5)
    np.testing.assert_allclose(layer.moving_variance.numpy(), 0.5 + 0.5 * var, rtol=1e-5)
