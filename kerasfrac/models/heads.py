"""The heads every architecture ends in, and the output and layer names the later stages read.

The contract between a model and evaluation/explain: a Dense(1) named ``logit`` and a float32
sigmoid named ``prob``; where box, metadata or cell-reading heads are supported, the last
feature map is named ``features``; feature-map stages are named ``stage1``, ``stage2``, ...
(or found by shape: the last 4-D map before each pooling or flatten). Lookups inspect the model,
so they work on a model loaded from model.keras as well as on a fresh one.
"""

from __future__ import annotations

import re

import keras
import tensorflow as tf

from kerasfrac.models.registry import (  # noqa: F401  (the names, re-exported)
    BOX_HEATMAP,
    BOX_LOGITS,
    FEATURES,
    LOGIT,
    META_LOGITS,
    PROB,
)
from kerasfrac.names import CELL_HEADS, HEADS


def logit_head(x, monotone: bool = False) -> tuple:
    """``logit`` (Dense to one unit) and ``prob``. ``monotone``: the Dense's one weight starts
    at 1 and is kept >= 0 (``keras.constraints.NonNeg``), so the probability rises with its
    input (the heatmap head: an image is as fractured as its most fractured cell)."""
    if monotone:
        dense = keras.layers.Dense(
            1, kernel_initializer="ones", kernel_constraint=keras.constraints.NonNeg(), name=LOGIT
        )
    else:
        dense = keras.layers.Dense(1, name=LOGIT)
    logit = dense(x)
    return logit, keras.layers.Activation("sigmoid", dtype="float32", name=PROB)(logit)


def heads(
    features, box_head: bool, dropout: float, head: str = "gap", fine=None, meta_targets: int = 0
):
    """The heads on the last feature map ``features``.

    ``gap``: global average pooling -> dropout -> ``logit``; the box head (``box_head``) is a
    1x1 conv beside it. ``avgmax``: the average and the maximum of each channel over the
    cells, concatenated (a small finding can dominate a channel's maximum while its average
    over the image barely moves) -> dropout -> ``logit``. ``heatmap``: the classifier reads
    the heat map itself: per-cell fracture logits (1x1 conv, ``box_logits``) -> global max
    pooling -> ``logit`` (a scale, kept >= 0, and a bias): an image is as fractured as its most
    fractured cell, so box supervision of the cells shapes what the classifier looks at
    (multiple-instance pooling). With a free scale, some training seeds learned a negative
    one (an image as fractured as its most fractured cell is *not*), which turned the
    classifier's Grad-CAM away from the cells the box head marks. ``attention``: the cells'
    softmax over the map weighs the features the cells are read from (attention pooling, Ilse
    et al. 2018), concatenated with their global average -> dropout -> ``logit``: where the
    box head places a fracture, the classifier reads that place's features beside the whole
    image's, and a map with no fracture (flat logits, as box supervision teaches on normal
    images) pools to the average. ``presence``: the global average beside the heat map's
    highest cell logit (presence pooling) -> dropout -> ``logit``: the classifier can add the
    evidence of the one most fractured place to that of the whole image.

    ``fine``: a feature map of finer resolution (``model.box_stride: 16``: stage 3, twice
    the resolution; ``8``: the mask decoder's output, four times); the cells are then read
    from it and from ``features`` resized to it, concatenated, so the heat map has 4x (16x) as
    many cells and its gradient reaches both.

    ``meta_targets`` > 0 (``model.meta_head``): a further output, ``meta_logits``, a linear
    layer on the global average of ``features`` (before dropout) giving one logit per metadata
    column: multi-task supervision of the features by what each X-ray shows (region, view,
    hardware). Outputs in order: ``prob``, then ``box_heatmap``, then ``meta_logits``, each
    where present; a single output is returned bare.
    """
    if head not in HEADS:
        raise ValueError(f"model.head must be one of {HEADS}; got {head!r}")
    cells = None
    if box_head or head in CELL_HEADS:
        source = features
        if fine is not None:
            height, width = fine.shape[1], fine.shape[2]
            up = keras.layers.Resizing(height, width, "bilinear", name="box_up")(features)
            source = keras.layers.Concatenate(name="box_features")([up, fine])
        cells = keras.layers.Conv2D(1, 1, name=BOX_LOGITS)(source)
    meta = None
    if head == "heatmap":
        x = keras.layers.GlobalMaxPooling2D(name="gmp")(cells)
        if meta_targets:
            pooled = keras.layers.GlobalAveragePooling2D(name="meta_gap")(features)
            meta = keras.layers.Dense(meta_targets, dtype="float32", name=META_LOGITS)(pooled)
    else:
        x = keras.layers.GlobalAveragePooling2D(name="gap")(features)
        if meta_targets:
            meta = keras.layers.Dense(meta_targets, dtype="float32", name=META_LOGITS)(x)
        if head == "avgmax":
            peak = keras.layers.GlobalMaxPooling2D(name="gmp")(features)
            x = keras.layers.Concatenate(name="avgmax")([x, peak])
        if head == "presence":
            peak = keras.layers.GlobalMaxPooling2D(name="presence")(cells)
            x = keras.layers.Concatenate(name="gap_presence")([x, peak])
        if head == "attention":
            height, width = cells.shape[1], cells.shape[2]
            weights = keras.layers.Reshape((height * width,), name="attention_flat")(cells)
            weights = keras.layers.Softmax(dtype="float32", name="attention_softmax")(weights)
            weights = keras.layers.Reshape((height, width, 1), name="attention")(weights)
            weighted = keras.layers.Multiply(name="attention_weighted")([source, weights])
            # the mean over the cells times their number: the attention-weighted sum
            pooled = keras.layers.GlobalAveragePooling2D(name="attention_mean")(weighted)
            pooled = keras.layers.Rescaling(float(height * width), name="attention_pool")(pooled)
            x = keras.layers.Concatenate(name="gap_attention")([x, pooled])
        x = keras.layers.Dropout(dropout, name="dropout")(x) if dropout else x
    _, prob = logit_head(x, monotone=head == "heatmap")
    outputs = [prob]
    if box_head:
        outputs.append(keras.layers.Activation("sigmoid", dtype="float32", name=BOX_HEATMAP)(cells))
    if meta is not None:
        outputs.append(meta)
    return outputs if len(outputs) > 1 else prob


def predict_probs(model: keras.Model, images, tta: str = "none") -> tf.Tensor:
    """Probabilities [B] of the one-output ``model``; ``tta="flip"`` averages the image and
    its left-right mirror (test-time augmentation, ``eval.tta``)."""
    p = tf.reshape(tf.cast(model(images, training=False), tf.float32), [-1])
    if tta == "flip":
        mirrored = model(tf.image.flip_left_right(images), training=False)
        p = (p + tf.reshape(tf.cast(mirrored, tf.float32), [-1])) / 2.0
    return p


def has_box_head(model: keras.Model) -> bool:
    """Whether ``model`` outputs the box heat map beside the probability."""
    return BOX_HEATMAP in model.output_names


def has_meta_head(model: keras.Model) -> bool:
    """Whether ``model`` outputs metadata logits (``model.meta_head``)."""
    return META_LOGITS in model.output_names


def output_index(model: keras.Model, name: str) -> int:
    """The position of output ``name`` (``PROB``, ``BOX_HEATMAP``, ``META_LOGITS``)."""
    return model.output_names.index(name)


def classifier(model: keras.Model) -> keras.Model:
    """The one-output model (image -> ``prob``): ``model`` itself, or, for a model with a box
    or metadata head, a model of the same layers (shared weights) without those outputs."""
    if len(model.outputs) == 1:
        return model
    return keras.Model(model.inputs, model.get_layer(PROB).output, name=model.name)


def box_model(model: keras.Model) -> keras.Model:
    """The ``[prob, box_heatmap]`` model of a model with a box head (box_model.keras, which
    explain's boxmap reads): ``model`` without its training-only metadata output."""
    if not has_meta_head(model):
        return model
    outputs = [model.get_layer(PROB).output, model.get_layer(BOX_HEATMAP).output]
    return keras.Model(model.inputs, outputs, name=model.name)


# --------------------------------------------------------------------------- layer lookups
# For the explain stage (feature maps, Grad-CAM): found by inspecting the model, so they work
# on a model loaded from model.keras as well as on a fresh one.


def logit_layer_name(model: keras.Model) -> str:
    """The pre-sigmoid Dense(1) layer (Grad-CAM and class visualization maximise its output)."""
    try:
        model.get_layer(LOGIT)
    except ValueError as e:
        raise ValueError(f"model {model.name!r} has no layer named {LOGIT!r}") from e
    return LOGIT


def conv_layer_names(model: keras.Model) -> list[str]:
    """Names of the Conv2D layers, input to output (conv1..conv3 for paper_cnn)."""
    return [layer.name for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]


def block_output_names(model: keras.Model) -> list[str]:
    """Output layer of each convolutional block, before pooling: bn1, bn2, bn3 for paper_cnn,
    block1_conv2 .. block5_conv3 for vgg16 (the last conv layer of each block), stage1 ..
    stage4 and ``features`` for resnet_small, ``features`` for the other backbones."""
    stages = [layer.name for layer in model.layers if re.fullmatch(r"stage\d+", layer.name)]
    if stages or any(layer.name == FEATURES for layer in model.layers):
        return stages + [FEATURES]
    names = []
    layers = model.layers
    for i, layer in enumerate(layers):
        if len(layer.output.shape) != 4 or isinstance(layer, keras.layers.MaxPooling2D):
            continue
        following = layers[i + 1] if i + 1 < len(layers) else None
        if following is None or isinstance(
            following, keras.layers.MaxPooling2D | keras.layers.Flatten
        ):
            names.append(layer.name)
        elif isinstance(following, keras.layers.GlobalAveragePooling2D):
            names.append(layer.name)
    return names


def last_conv_block_name(model: keras.Model) -> str:
    """The layer Grad-CAM uses: the last 4-D feature map before pooling/flattening."""
    names = block_output_names(model)
    if not names:
        raise ValueError(f"model {model.name!r} has no convolutional feature maps")
    return names[-1]
