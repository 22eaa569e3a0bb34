"""Models by name: the report's CNN (``paper_cnn``), a compact residual CNN for CPUs
(``resnet_small``) and ``keras.applications`` backbones (``vgg16``, ``resnet50v2``,
``efficientnetv2b0``).

Every model maps float32 images in [0, 1] of shape ``input_shape`` to one fracture
probability, through a layer named ``logit`` (Dense(1)) and a float32 sigmoid named ``prob``
(float32 so that the loss stays stable under mixed precision). Models are functional graphs
that start at a ``keras.Input``, so sub-models from ``model.inputs`` to any
``model.get_layer(name).output`` work, also after ``keras.models.load_model`` (the explain
stage builds feature-map and Grad-CAM models that way). The model knows no files except an
optional weights file.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import keras
import tensorflow as tf

from kerasfrac.names import BOX_STRIDES, CELL_HEADS, HEADS, MODEL_NAMES
from tfrecords_builder.defaults import META_TARGETS

LOGIT = "logit"
PROB = "prob"
#: Optional second output (``model.box_head``): a coarse fracture heat map, sigmoid, trained
#: against the fracture boxes; the classifier saved as model.keras does not carry it.
BOX_HEATMAP = "box_heatmap"
#: The 1x1 conv giving each cell's fracture logit (model.box_head, model.head: heatmap).
BOX_LOGITS = "box_logits"
#: Optional output (``model.meta_head``): logits of FracAtlas' metadata columns
#: (``META_TARGETS``: body region, hardware, view) from the pooled features; training only.
META_LOGITS = "meta_logits"
#: The last feature map of the models with a global-average-pooling head (Grad-CAM's layer).
FEATURES = "features"

# ImageNet channel means (BGR, 0-255) of the Caffe-style VGG16 weights; grayscale input is
# repeated to three identical channels, so the channel order does not matter.
_VGG_MEAN = (103.939, 116.779, 123.68)


@keras.saving.register_keras_serializable(package="kerasfrac")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """Keras' BatchNormalization whose training step runs TensorFlow's fused kernel.

    Same variables, arguments and maths as the parent (batch mean and biased variance,
    ``momentum`` moving averages, ``epsilon``); training runs one ``FusedBatchNormV3`` op
    (oneDNN / cuDNN have fused kernels and gradients for it) instead of Keras' separate
    moments and normalisation ops: a faster training step (README, "Speed"; ``kerasfrac
    bench`` measures it). Inference, masks, renorm, synchronised statistics and other
    layouts than channels-last 4-D use the parent's path. Registered as
    ``kerasfrac>FusedBatchNormalization``: ``load_model`` below (or importing this module)
    loads checkpoints that hold it; the final model.keras holds plain BatchNormalization
    layers instead (``plain_keras``), with the same weights.
    """

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
        x = tf.cast(inputs, "float32")  # as the parent: statistics in float32
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


def plain_keras(model: keras.Model) -> keras.Model:
    """``model`` with each ``FusedBatchNormalization`` replaced by Keras' own
    BatchNormalization (same config and weights, same inference): a file saved from it loads
    with plain ``keras.saving.load_model`` in a process that never imports kerasfrac. A model
    without the fused layer is returned as it is."""
    if not uses_fused_batchnorm(model):
        return model

    def clone(layer):
        cls = (
            keras.layers.BatchNormalization if isinstance(layer, FusedBatchNormalization) else None
        )
        return (cls or type(layer)).from_config(layer.get_config())

    plain = keras.models.clone_model(model, clone_function=clone)
    plain.set_weights(model.get_weights())
    return plain


def functional(model: keras.Model) -> keras.Model:
    """A ``keras.Sequential`` (paper_cnn as kerasfrac saved it before it was functional) as
    the same layers in a functional graph with the same weights, so that
    ``get_layer(name).output`` is a tensor the logit depends on (on a reloaded Sequential it
    is a dead end that Keras creates while rebuilding it). Other models are returned as is."""
    if not isinstance(model, keras.Sequential):
        return model
    inputs = x = keras.Input(shape=model.input_shape[1:], name="image")
    for layer in model.layers:
        x = type(layer).from_config(layer.get_config())(x)
    rebuilt = keras.Model(inputs, x, name=model.name)
    rebuilt.set_weights(model.get_weights())
    return rebuilt


#: Compute dtypes of mixed precision (``train.precision``) that ``float32_compute`` undoes.
_MIXED = {"mixed_float16", "mixed_bfloat16", "float16", "bfloat16"}


def _float32_policies(obj):
    """A serialized model with every mixed-precision dtype (layer policies and the tensor
    dtypes of the graph) replaced by float32."""
    if isinstance(obj, list):
        return [_float32_policies(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    out = {}
    for key, value in obj.items():
        if (
            key == "dtype"
            and isinstance(value, dict)
            and "DTypePolicy" in str(value.get("class_name"))
        ):
            if value.get("config", {}).get("name") in _MIXED:
                value = "float32"
        elif key == "dtype" and value in _MIXED:
            value = "float32"
        out[key] = _float32_policies(value)
    return out


def uses_mixed_precision(model: keras.Model) -> bool:
    """Whether any layer of ``model`` (nested models included) computes in float16/bfloat16."""
    for layer in model.layers:
        if layer.dtype_policy.name in _MIXED:
            return True
        if isinstance(layer, keras.Model) and uses_mixed_precision(layer):
            return True
    return False


def float32_compute(model: keras.Model) -> keras.Model:
    """``model`` (trained under ``train.precision: mixed_*``) with the same weights and every
    layer computing in float32: what inference saves and loads, so that a model trained in
    mixed precision on a GPU or a bfloat16 CPU predicts at full speed on any machine (TensorFlow
    emulates float16/bfloat16 on CPUs without those units, 5x slower here) and in full precision.
    Mixed precision keeps float32 weights, so nothing is lost. A float32 model is returned as is.
    """
    if not uses_mixed_precision(model):
        return model
    config = _float32_policies(keras.saving.serialize_keras_object(model))
    rebuilt = keras.saving.deserialize_keras_object(config)
    rebuilt.set_weights(model.get_weights())
    return rebuilt


def load_model(path: str | Path) -> keras.Model:
    """``keras.saving.load_model`` with kerasfrac's layers registered (this module's import);
    a missing or damaged file is named as such (Keras says "File not found" for both)."""
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"model file {str(path)!r} does not exist")
    if path.suffix == ".keras" and not zipfile.is_zipfile(path):
        raise ValueError(
            f"model file {str(path)!r} is damaged: a .keras file is a zip archive, this one is "
            f"not ({path.stat().st_size:,} bytes; truncated by a full disk or a killed copy?). "
            "Use another checkpoint (checkpoints/best.keras) or retrain."
        )
    return keras.saving.load_model(path)


def _head(x, monotone: bool = False) -> tuple:
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


def paper_cnn(
    input_shape: tuple[int, int, int],
    bn_momentum: float = 0.9,
    sync_batchnorm: bool = True,
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
    _, prob = _head(x)
    return keras.Model(inputs, prob, name="paper_cnn")


def vgg16(input_shape: tuple[int, int, int], weights: str | None = None) -> keras.Model:
    """VGG16 convolutional base (the report's proposed next step) with a small head.

    ``weights``: None, "imagenet" (downloads once into ~/.keras) or a weights file for
    ``keras.applications.VGG16(include_top=False)``. One-channel input is repeated to three
    channels, then scaled to 0-255 and mean-subtracted as the ImageNet weights expect. The
    VGG layers live in the outer graph (not in a nested sub-model), so
    ``get_layer("block5_conv3").output`` works for Grad-CAM sub-models.
    """
    input_shape = tuple(input_shape)
    channels = input_shape[-1]
    if channels not in (1, 3):
        raise ValueError(f"vgg16 expects 1 or 3 input channels; got input_shape {input_shape}")
    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    if channels == 1:
        x = keras.layers.Concatenate(axis=-1, name="gray_to_rgb")([x, x, x])
    x = keras.layers.Rescaling(255.0, name="to_255")(x)
    x = keras.layers.Normalization(mean=_VGG_MEAN, variance=(1.0, 1.0, 1.0), name="vgg_mean")(x)
    # Built on our tensor, so its layers are part of this graph (not a nested model).
    base = keras.applications.VGG16(include_top=False, weights=None, input_tensor=x)
    if weights is not None:
        # Load into a standalone VGG16 (the layout the weights files have), copy by layer name.
        pretrained = keras.applications.VGG16(
            include_top=False, weights=weights, input_shape=(*input_shape[:2], 3)
        )
        for layer in pretrained.layers:
            if layer.weights:
                base.get_layer(layer.name).set_weights(layer.get_weights())
    x = keras.layers.GlobalAveragePooling2D(name="gap")(base.output)
    x = keras.layers.Dropout(0.3, name="dropout")(x)
    _, prob = _head(x)
    return keras.Model(inputs, prob, name="vgg16")


def _bn(bn_momentum: float, sync: bool, fused: bool, name: str):
    cls = FusedBatchNormalization if fused and not sync else keras.layers.BatchNormalization
    return cls(momentum=bn_momentum, synchronized=sync, name=name)


def _outputs(
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
    images) pools to the average.

    ``fine``: a feature map of twice the resolution (``model.box_stride: 16``); the cells are
    then read from it and from ``features`` resized to it, concatenated, so the heat map has
    4x as many cells and its gradient reaches both stages.

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
    _, prob = _head(x, monotone=head == "heatmap")
    outputs = [prob]
    if box_head:
        outputs.append(keras.layers.Activation("sigmoid", dtype="float32", name=BOX_HEATMAP)(cells))
    if meta is not None:
        outputs.append(meta)
    return outputs if len(outputs) > 1 else prob


def resnet_small(
    input_shape: tuple[int, int, int],
    widths: tuple[int, ...] = (32, 64, 128, 256),
    blocks_per_stage: int = 2,
    dropout: float = 0.2,
    bn_momentum: float = 0.9,
    sync_batchnorm: bool = True,
    fused_batchnorm: bool = False,
    box_head: bool = False,
    head: str = "gap",
    box_stride: int = 32,
    drop_path: float = 0.0,
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
    map from stage 3 (BN -> ReLU) and the upsampled ``features`` together (20x20 cells).
    Stage outputs are named ``stage1`` .. ``stage4`` (feature maps). ``drop_path``: stochastic
    depth (Huang et al. 2016): in training, each block's residual branch is dropped for a whole
    image with a probability rising linearly from 0 (first block) to ``drop_path`` (last
    block), the kept ones scaled by 1 / (1 - p); at inference every branch is kept.
    """
    if box_stride not in BOX_STRIDES:
        raise ValueError(f"model.box_stride must be one of {BOX_STRIDES}; got {box_stride!r}")
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
    channels, stage3 = widths[0], None
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
            if s == len(widths) - 1 and last:
                stage3 = x
    x = _bn(bn_momentum, sync, fused, "post_bn")(x)
    features = keras.layers.ReLU(name=FEATURES)(x)
    fine = None
    if box_stride == 16 and (box_head or head in CELL_HEADS):
        fine = _bn(bn_momentum, sync, fused, "box_fine_bn")(stage3)
        fine = keras.layers.ReLU(name="box_fine_relu")(fine)
    outputs = _outputs(features, box_head, dropout, head, fine, meta_targets)
    return keras.Model(inputs, outputs, name="resnet_small")


#: keras.applications backbones: name -> (constructor, input scaling of its ImageNet weights).
#: "caffe" = 0-255 minus channel means, "tf" = [-1, 1], "raw255" = 0-255 (the model rescales
#: inside, EfficientNetV2's include_preprocessing).
_APPLICATIONS = {
    "resnet50v2": ("ResNet50V2", "tf"),
    "efficientnetv2b0": ("EfficientNetV2B0", "raw255"),
}


def application(
    name: str,
    input_shape: tuple[int, int, int],
    weights: str | None = None,
    box_head: bool = False,
    dropout: float = 0.2,
    head: str = "gap",
    meta_targets: int = 0,
) -> keras.Model:
    """A ``keras.applications`` backbone (``resnet50v2`` or ``efficientnetv2b0``) + our head.

    Grayscale input is repeated to three identical channels, then scaled as the backbone's
    ImageNet weights expect (ResNet50V2: [-1, 1]; EfficientNetV2: 0-255, its own
    preprocessing layers inside). ``weights``: None, "imagenet" (downloaded once into
    ~/.keras by Keras) or a weights file of the backbone without its top
    (``keras.applications.<Backbone>(include_top=False).save_weights(...)``). The backbone's
    layers live in this graph (built on our tensor), so every layer is reachable by name.
    """
    if name not in _APPLICATIONS:
        raise ValueError(f"unknown backbone {name!r}; available: {', '.join(_APPLICATIONS)}")
    constructor_name, scaling = _APPLICATIONS[name]
    constructor = getattr(keras.applications, constructor_name)
    input_shape = tuple(input_shape)
    if input_shape[-1] not in (1, 3):
        raise ValueError(f"{name} expects 1 or 3 input channels; got input_shape {input_shape}")
    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    if input_shape[-1] == 1:
        x = keras.layers.Concatenate(axis=-1, name="gray_to_rgb")([x, x, x])
    if scaling == "tf":
        x = keras.layers.Rescaling(2.0, offset=-1.0, name="to_pm1")(x)
    else:
        x = keras.layers.Rescaling(255.0, name="to_255")(x)
    kwargs = {"include_preprocessing": True} if scaling == "raw255" else {}
    base = constructor(include_top=False, weights=None, input_tensor=x, **kwargs)
    if weights is not None:
        pretrained = constructor(
            include_top=False, weights=weights, input_shape=(*input_shape[:2], 3), **kwargs
        )
        for layer in pretrained.layers:
            if layer.weights:
                base.get_layer(layer.name).set_weights(layer.get_weights())
    features = keras.layers.Activation("linear", name=FEATURES)(base.output)
    outputs = _outputs(features, box_head, dropout, head, meta_targets=meta_targets)
    return keras.Model(inputs, outputs, name=name)


def _weights_file(weights: str) -> Path:
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ValueError(
            f"model.weights {weights!r} is neither 'none', 'imagenet' nor an existing file; "
            "pass the path of a weights file or set model.weights=none"
        )
    return path


def _no_box_head(name: str, box_head: bool, head: str = "gap", meta_targets: int = 0) -> None:
    if box_head or head != "gap" or meta_targets:
        raise ValueError(
            f"model.box_head, model.meta_head and model.head other than gap are not available "
            f"for {name} (got box_head={box_head}, meta_head={bool(meta_targets)}, "
            f"head={head!r}; its "
            "Flatten/VGG head has no global-pooling feature map to supervise); use "
            "model.name=resnet_small, resnet50v2 or efficientnetv2b0"
        )


def _build_paper_cnn(
    input_shape,
    weights: str,
    bn_momentum=0.9,
    sync_batchnorm=True,
    fused_batchnorm=False,
    box_head=False,
    head="gap",
    meta_targets=0,
) -> keras.Model:
    _no_box_head("paper_cnn", box_head, head, meta_targets)
    if weights == "imagenet":
        raise ValueError(
            "paper_cnn has no ImageNet weights; use model.weights=none, a weights file, "
            "or model.name=vgg16"
        )
    model = paper_cnn(input_shape, bn_momentum, sync_batchnorm, fused_batchnorm)
    if weights != "none":
        model.load_weights(str(_weights_file(weights)))
    return model


def _build_vgg16(
    input_shape,
    weights: str,
    bn_momentum=0.9,
    sync_batchnorm=True,
    fused_batchnorm=False,
    box_head=False,
    head="gap",
    meta_targets=0,
):
    """VGG16 has no BatchNorm: the three BatchNorm arguments do not apply."""
    _no_box_head("vgg16", box_head, head, meta_targets)
    if weights == "none":
        return vgg16(input_shape, None)
    if weights == "imagenet":
        return vgg16(input_shape, "imagenet")
    return vgg16(input_shape, str(_weights_file(weights)))


def _build_resnet_small(
    input_shape,
    weights: str,
    bn_momentum=0.9,
    sync_batchnorm=True,
    fused_batchnorm=False,
    box_head=False,
    head="gap",
    width=None,
    blocks_per_stage=None,
    box_stride=None,
    drop_path=None,
    meta_targets=0,
) -> keras.Model:
    if weights == "imagenet":
        raise ValueError(
            "resnet_small is trained from scratch and has no ImageNet weights; use "
            "model.weights=none, a weights file, or model.name=resnet50v2/efficientnetv2b0"
        )
    sizes = {}
    if width is not None:
        sizes["widths"] = tuple(width * 2**s for s in range(4))
    if blocks_per_stage is not None:
        sizes["blocks_per_stage"] = blocks_per_stage
    if box_stride is not None:
        sizes["box_stride"] = box_stride
    if drop_path:
        sizes["drop_path"] = drop_path
    model = resnet_small(
        input_shape,
        **sizes,
        bn_momentum=bn_momentum,
        sync_batchnorm=sync_batchnorm,
        fused_batchnorm=fused_batchnorm,
        box_head=box_head,
        head=head,
        meta_targets=meta_targets,
    )
    if weights != "none":
        model.load_weights(str(_weights_file(weights)))
    return model


def _application_builder(name: str):
    def build(
        input_shape,
        weights: str,
        bn_momentum=0.9,
        sync_batchnorm=True,
        fused_batchnorm=False,
        box_head=False,
        head="gap",
        meta_targets=0,
    ) -> keras.Model:
        """The backbone keeps Keras' own BatchNorm layers and momenta."""
        if weights not in ("none", "imagenet"):
            weights = str(_weights_file(weights))
        weights = None if weights == "none" else weights
        return application(
            name, input_shape, weights, box_head, head=head, meta_targets=meta_targets
        )

    return build


_BUILDERS = {
    "paper_cnn": _build_paper_cnn,
    "vgg16": _build_vgg16,
    "resnet_small": _build_resnet_small,
    **{name: _application_builder(name) for name in _APPLICATIONS},
}
#: name -> builder(input_shape, weights, bn_momentum, sync_batchnorm, fused_batchnorm,
#: box_head, head=..., meta_targets=...; resnet_small also width=, blocks_per_stage=, box_stride=,
#: drop_path=), for each of
#: ``names.MODEL_NAMES`` (a name without a builder fails at import).
MODELS: dict[str, Callable[..., keras.Model]] = {name: _BUILDERS[name] for name in MODEL_NAMES}


def build_model(
    cfg_model, input_shape: tuple[int, int, int], fused_batchnorm: bool = False
) -> keras.Model:
    """Build ``cfg_model.name`` (a ``config.ModelConfig``) for images of ``input_shape``;
    ``fused_batchnorm`` is set by ``train.fast`` (see ``FusedBatchNormalization``). With
    ``cfg_model.box_head`` the model has two outputs, ``[prob, box_heatmap]``, with
    ``cfg_model.meta_head`` also ``meta_logits`` (last); ``classifier`` gives the one-output
    model that is saved and evaluated."""
    name = cfg_model.name
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(MODELS)}")
    sizes = {}
    if name == "resnet_small":
        sizes = {
            "width": getattr(cfg_model, "width", None),
            "blocks_per_stage": getattr(cfg_model, "blocks_per_stage", None),
            "box_stride": getattr(cfg_model, "box_stride", None),
            "drop_path": getattr(cfg_model, "drop_path", 0.0),
        }
    return MODELS[name](
        tuple(input_shape),
        getattr(cfg_model, "weights", "none") or "none",
        getattr(cfg_model, "bn_momentum", 0.9),
        getattr(cfg_model, "sync_batchnorm", True),
        fused_batchnorm,
        getattr(cfg_model, "box_head", False),
        head=getattr(cfg_model, "head", "gap"),
        meta_targets=len(META_TARGETS) if getattr(cfg_model, "meta_head", False) else 0,
        **sizes,
    )


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
