"""Layers kerasfrac adds to Keras: ``FusedBatchNormalization`` and the BatchNorm factory the
architectures share."""

from __future__ import annotations

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="kerasfrac")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """Keras' BatchNormalization whose training step runs TensorFlow's fused kernel.

    Same variables, arguments and maths as the parent (batch mean and biased variance,
    ``momentum`` moving averages, ``epsilon``); training runs one ``FusedBatchNormV3`` op
    (oneDNN / cuDNN have fused kernels and gradients for it) instead of Keras' separate
    moments and normalisation ops: a faster training step (docs/speed.md; ``kerasfrac
    bench`` measures it). Inference, masks, renorm, synchronised statistics and other
    layouts than channels-last 4-D use the parent's path. Registered as
    ``kerasfrac>FusedBatchNormalization``: ``load_model`` below (or importing this module)
    loads checkpoints that hold it; the final model.keras holds plain BatchNormalization
    layers instead (``plain_keras``), with the same weights.

    Under a mixed precision policy (``half_data``, default true) the fused kernel reads and
    writes the 16-bit activations themselves, its statistics, scale and offset in float32
    (``FusedBatchNormV3``'s T=bfloat16/float16, U=float32): no float32 copy of the input and
    no cast back (issue 39: the casts were 18 % of the bf16 step's op time), and TensorFlow's
    remapper can then fuse the following ReLU into the kernel, as it does in float32.
    ``half_data = False`` restores the float32 data path (the A/B reference).
    """

    #: Batch-normalise 16-bit activations in their own dtype (float32 statistics).
    half_data = True

    def _fused_ok(self, inputs, training, mask) -> bool:
        return bool(
            training
            and self.trainable
            and mask is None
            and not self.synchronized
            and not self.renorm
            and len(inputs.shape) == 4
            and self.axis in (-1, 3)
            and self.scale
            and self.center
        )

    def call(self, inputs, training=None, mask=None):
        if not self._fused_ok(inputs, training, mask):
            return super().call(inputs, training=training, mask=mask)
        half = self.half_data and inputs.dtype in (tf.bfloat16, tf.float16)
        # float32 statistics either way: the fused kernel accumulates 16-bit data in float32
        x = inputs if half else tf.cast(inputs, "float32")
        y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            x,
            tf.cast(self.gamma, "float32"),
            tf.cast(self.beta, "float32"),
            epsilon=self.epsilon,
            data_format="NHWC",
            is_training=True,
        )[:3]
        # The fused op returns the Bessel-corrected variance; Keras averages the biased one.
        n = tf.cast(tf.size(x) // tf.shape(x)[-1], "float32")
        variance = variance * (n - 1.0) / n
        self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(
            self.moving_variance * self.momentum + variance * (1.0 - self.momentum)
        )
        return tf.cast(y, self.compute_dtype)


def uses_fused_batchnorm(model: keras.Model) -> bool:
    """Whether ``model`` trains with ``FusedBatchNormalization`` (``train.fast``)."""
    return any(isinstance(layer, FusedBatchNormalization) for layer in model.layers)


def batchnorm(momentum: float, sync: bool, fused: bool, name: str) -> keras.layers.Layer:
    """A BatchNormalization layer: ``FusedBatchNormalization`` where ``fused`` (``train.fast``)
    and statistics need not be synchronised across replicas, Keras' own otherwise."""
    cls = FusedBatchNormalization if fused and not sync else keras.layers.BatchNormalization
    return cls(momentum=momentum, synchronized=sync, name=name)
