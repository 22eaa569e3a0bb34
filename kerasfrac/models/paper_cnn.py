"""``paper_cnn``: the report's network, three conv blocks and a Flatten -> Dense head."""

from __future__ import annotations

import keras

from kerasfrac.config import ModelConfig
from kerasfrac.models.heads import logit_head
from kerasfrac.models.io import weights_file
from kerasfrac.models.layers import FusedBatchNormalization

_DEFAULTS = ModelConfig()  # the BatchNorm keys' defaults, written once there


def paper_cnn(
    input_shape: tuple[int, int, int],
    bn_momentum: float = _DEFAULTS.bn_momentum,
    sync_batchnorm: bool = _DEFAULTS.sync_batchnorm,
    fused_batchnorm: bool = False,
) -> keras.Model:
    """The report's network: 3 x (Conv 3x3 same -> ReLU -> BatchNorm), pools after the first two.

    At 512x512x1 it has exactly 2,190,721 parameters (almost all in the Dense layer:
    128 x 128 x 128 + 1). ``fused_batchnorm`` uses ``FusedBatchNormalization`` (same maths,
    faster training step); it cannot synchronise statistics across replicas, so
    ``sync_batchnorm`` wins where both are asked.
    """
    bn_class = (
        FusedBatchNormalization
        if fused_batchnorm and not sync_batchnorm
        else keras.layers.BatchNormalization
    )

    def block(x, i: int, filters: int, pool: bool):
        x = keras.layers.Conv2D(filters, 3, strides=1, padding="same", name=f"conv{i}")(x)
        x = keras.layers.ReLU(name=f"relu{i}")(x)
        x = bn_class(momentum=bn_momentum, synchronized=sync_batchnorm, name=f"bn{i}")(x)
        return keras.layers.MaxPool2D(2, name=f"pool{i}")(x) if pool else x

    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = block(inputs, 1, 32, pool=True)
    x = block(x, 2, 64, pool=True)
    x = block(x, 3, 128, pool=False)
    x = keras.layers.Flatten(name="flatten")(x)
    _, prob = logit_head(x)
    return keras.Model(inputs, prob, name="paper_cnn")


def build(cfg_model, input_shape, *, fused_batchnorm: bool = False, meta_targets: int = 0):
    """The registry's builder: ``model.weights`` none or a file of this model's weights."""
    model = paper_cnn(input_shape, cfg_model.bn_momentum, cfg_model.sync_batchnorm, fused_batchnorm)
    if cfg_model.weights != "none":
        model.load_weights(str(weights_file(cfg_model.weights)))
    return model
