"""``resnet_small``: a compact pre-activation ResNet for X-rays on CPUs (the recipe's model)."""

from __future__ import annotations

import keras

from kerasfrac.config import ModelConfig
from kerasfrac.models.heads import FEATURES, heads
from kerasfrac.models.io import weights_file
from kerasfrac.models.layers import batchnorm as _bn
from kerasfrac.names import CELL_HEADS

#: Its own model.* keys' defaults are ``config.ModelConfig``'s (written once, there); the
#: allowed box strides are its registry spec's (``names.BOX_STRIDES``).
_DEFAULTS = ModelConfig()


def resnet_small(
    input_shape: tuple[int, int, int],
    widths: tuple[int, ...] = tuple(_DEFAULTS.width * 2**s for s in range(4)),
    blocks_per_stage: int = _DEFAULTS.blocks_per_stage,
    dropout: float = 0.2,
    bn_momentum: float = _DEFAULTS.bn_momentum,
    sync_batchnorm: bool = _DEFAULTS.sync_batchnorm,
    fused_batchnorm: bool = False,
    box_head: bool = False,
    head: str = _DEFAULTS.head,
    box_stride: int = _DEFAULTS.box_stride,
    drop_path: float = _DEFAULTS.drop_path,
    meta_targets: int = 0,
) -> keras.Model:
    """A compact pre-activation ResNet (He et al. 2016, "Identity mappings") for X-rays.

    One-channel (or three-channel) stem: 5x5 conv stride 2 + 3x3 max-pool (a 320 px image
    becomes 80x80), then four stages of ``blocks_per_stage`` basic pre-activation blocks
    (BN -> ReLU -> 3x3 conv, twice, plus identity or 1x1 projection), halving the resolution
    at each new stage, then BN -> ReLU (``features``, stride 32) -> global average pooling ->
    dropout -> ``logit``/``prob``. About 2.8 M parameters with the default widths; sized for a
    2-core CPU at 320-384 px. ``box_head`` adds the heat-map output ``box_heatmap`` on
    ``features`` (``box_stride`` 32: 10x10 cells at 320 px); ``box_stride`` 16 reads the heat
    map from stage 3 (BN -> ReLU) and the upsampled ``features`` together (20x20 cells);
    ``box_stride`` 8 from ``mask_decoder`` over stages 3 and 2 and the upsampled
    ``features`` (40x40 cells: the dense mask head).
    Stage outputs are named ``stage1`` .. ``stage4`` (feature maps). ``drop_path``: stochastic
    depth (Huang et al. 2016): in training, each block's residual branch is dropped for a whole
    image with a probability rising linearly from 0 (first block) to ``drop_path`` (last
    block), the kept ones scaled by 1 / (1 - p); at inference every branch is kept.
    """
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    sync, fused = sync_batchnorm, fused_batchnorm
    # [0, 1] -> [-1, 1]: centred inputs for the first conv (no per-dataset statistics needed).
    x = keras.layers.Rescaling(2.0, offset=-1.0, name="centre")(inputs)
    x = keras.layers.Conv2D(
        widths[0], 5, strides=2, padding="same", use_bias=False, name="stem_conv"
    )(x)
    x = _bn(bn_momentum, sync, fused, "stem_bn")(x)
    x = keras.layers.ReLU(name="stem_relu")(x)
    x = keras.layers.MaxPool2D(3, strides=2, padding="same", name="stem_pool")(x)
    channels, stages = widths[0], {}
    n_blocks = len(widths) * blocks_per_stage
    for s, width in enumerate(widths, start=1):
        for b in range(1, blocks_per_stage + 1):
            name = f"s{s}b{b}"
            stride = 2 if (s > 1 and b == 1) else 1
            pre = _bn(bn_momentum, sync, fused, f"{name}_bn1")(x)
            pre = keras.layers.ReLU(name=f"{name}_relu1")(pre)
            if stride == 1 and channels == width:
                shortcut = x
            else:
                shortcut = keras.layers.Conv2D(
                    width, 1, strides=stride, use_bias=False, name=f"{name}_proj"
                )(pre)
            y = keras.layers.Conv2D(
                width, 3, strides=stride, padding="same", use_bias=False, name=f"{name}_conv1"
            )(pre)
            y = _bn(bn_momentum, sync, fused, f"{name}_bn2")(y)
            y = keras.layers.ReLU(name=f"{name}_relu2")(y)
            y = keras.layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"{name}_conv2")(
                y
            )
            index = (s - 1) * blocks_per_stage + b - 1
            rate = drop_path * index / max(n_blocks - 1, 1)
            if rate > 0:
                # noise_shape (batch, 1, 1, 1): one keep-or-drop draw per image for the branch
                y = keras.layers.Dropout(rate, noise_shape=(None, 1, 1, 1), name=f"{name}_drop")(y)
            last = b == blocks_per_stage
            x = keras.layers.Add(name=f"stage{s}" if last else f"{name}_add")([shortcut, y])
            channels = width
            if last:
                stages[s] = x
    x = _bn(bn_momentum, sync, fused, "post_bn")(x)
    features = keras.layers.ReLU(name=FEATURES)(x)
    fine = None
    if box_stride == 16 and (box_head or head in CELL_HEADS):
        fine = _bn(bn_momentum, sync, fused, "box_fine_bn")(stages[len(widths) - 1])
        fine = keras.layers.ReLU(name="box_fine_relu")(fine)
    elif box_stride == 8 and (box_head or head in CELL_HEADS):
        fine = mask_decoder(
            features, [stages[len(widths) - 1], stages[len(widths) - 2]], bn_momentum, sync, fused
        )
    outputs = heads(features, box_head, dropout, head, fine, meta_targets)
    return keras.Model(inputs, outputs, name="resnet_small")


#: Channels of the mask decoder (model.box_stride: 8).
DECODER_WIDTH = 64


def mask_decoder(features, skips, bn_momentum, sync, fused, width: int = DECODER_WIDTH):
    """A light FPN-style top-down decoder (Lin et al. 2017) for the dense mask head: a 1x1
    conv of ``features`` (stride 32), then for each skip (the pre-activation stage outputs
    at stride 16, then 8): bilinear upsampling to the skip's size plus a 1x1 conv of the
    skip's BN -> ReLU, and at the end a 3x3 conv -> BN -> ReLU (``mask_decoder``, stride 8,
    ``width`` channels). About 0.1 M parameters at width 32; the box head's 1x1 conv reads it
    beside the upsampled ``features``."""
    x = keras.layers.Conv2D(width, 1, name="decoder_lateral0")(features)
    for i, skip in enumerate(skips, start=1):
        height, w = skip.shape[1], skip.shape[2]
        up = keras.layers.Resizing(height, w, "bilinear", name=f"decoder_up{i}")(x)
        lateral = _bn(bn_momentum, sync, fused, f"decoder_bn{i}")(skip)
        lateral = keras.layers.ReLU(name=f"decoder_relu{i}")(lateral)
        lateral = keras.layers.Conv2D(width, 1, name=f"decoder_lateral{i}")(lateral)
        x = keras.layers.Add(name=f"decoder_add{i}")([up, lateral])
    x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False, name="decoder_conv")(x)
    x = _bn(bn_momentum, sync, fused, "decoder_bn")(x)
    return keras.layers.ReLU(name="mask_decoder")(x)


def build(cfg_model, input_shape, *, fused_batchnorm: bool = False, meta_targets: int = 0):
    """The registry's builder: its own keys (``model.width``, ``blocks_per_stage``,
    ``box_stride``, ``drop_path``); ``model.weights`` none or a file of this model's weights."""
    model = resnet_small(
        input_shape,
        widths=tuple(cfg_model.width * 2**s for s in range(4)),
        blocks_per_stage=cfg_model.blocks_per_stage,
        box_stride=cfg_model.box_stride,
        drop_path=cfg_model.drop_path,
        bn_momentum=cfg_model.bn_momentum,
        sync_batchnorm=cfg_model.sync_batchnorm,
        fused_batchnorm=fused_batchnorm,
        box_head=cfg_model.box_head,
        head=cfg_model.head,
        meta_targets=meta_targets,
    )
    if cfg_model.weights != "none":
        model.load_weights(str(weights_file(cfg_model.weights)))
    return model
