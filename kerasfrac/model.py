"""Models by name: the report's CNN (``paper_cnn``) and a VGG16 backbone (``vgg16``).

Every model maps float32 images in [0, 1] of shape ``input_shape`` to one fracture
probability, through a layer named ``logit`` (Dense(1)) and a float32 sigmoid named ``prob``
(float32 so that the loss stays stable under mixed precision). Models are functional graphs
that start at a ``keras.Input``, so sub-models from ``model.inputs`` to any
``model.get_layer(name).output`` work, also after ``keras.models.load_model`` (the explain
stage builds feature-map and Grad-CAM models that way). The model knows no files except an
optional weights file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import keras
import tensorflow as tf

LOGIT = "logit"
PROB = "prob"

# ImageNet channel means (BGR, 0-255) of the Caffe-style VGG16 weights; grayscale input is
# repeated to three identical channels, so the channel order does not matter.
_VGG_MEAN = (103.939, 116.779, 123.68)


@keras.saving.register_keras_serializable(package="kerasfrac")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """Keras' BatchNormalization whose training step runs TensorFlow's fused kernel.

    Same variables, arguments and maths as the parent (batch mean and biased variance,
    ``momentum`` moving averages, ``epsilon``); training runs one ``FusedBatchNormV3`` op
    (oneDNN / cuDNN have fused kernels and gradients for it) instead of Keras' separate
    moments and normalisation ops: about 1.2x the paper CNN's training step on its own
    (``kerasfrac bench``). Inference, masks, renorm, synchronised statistics and other
    layouts than channels-last 4-D use the parent's path. Registered as
    ``kerasfrac>FusedBatchNormalization``: ``load_model`` below (or importing this module)
    makes saved models loadable; the weights are interchangeable with a plain
    BatchNormalization's.
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
            x, tf.cast(self.gamma, "float32"), tf.cast(self.beta, "float32"),
            epsilon=self.epsilon, data_format="NHWC", is_training=True,
        )[:3]  # fmt: skip
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


def _head(x) -> tuple:
    logit = keras.layers.Dense(1, name=LOGIT)(x)
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

    def block(i: int, filters: int, pool: bool) -> list:
        layers = [
            keras.layers.Conv2D(filters, 3, strides=1, padding="same", name=f"conv{i}"),
            keras.layers.ReLU(name=f"relu{i}"),
            bn_class(momentum=bn_momentum, synchronized=sync_batchnorm, name=f"bn{i}"),
        ]
        if pool:
            layers.append(keras.layers.MaxPool2D(2, name=f"pool{i}"))
        return layers

    return keras.Sequential(
        [
            keras.Input(shape=tuple(input_shape), name="image"),
            *block(1, 32, pool=True),
            *block(2, 64, pool=True),
            *block(3, 128, pool=False),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(1, name=LOGIT),
            keras.layers.Activation("sigmoid", dtype="float32", name=PROB),
        ],
        name="paper_cnn",
    )


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


def _weights_file(weights: str) -> Path:
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ValueError(
            f"model.weights {weights!r} is neither 'none', 'imagenet' nor an existing file; "
            "pass the path of a weights file or set model.weights=none"
        )
    return path


def _build_paper_cnn(
    input_shape,
    weights: str,
    bn_momentum: float = 0.9,
    sync_batchnorm: bool = True,
    fused_batchnorm: bool = False,
) -> keras.Model:
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
    bn_momentum: float = 0.9,
    sync_batchnorm: bool = True,
    fused_batchnorm: bool = False,
):
    """VGG16 has no BatchNorm: the three BatchNorm arguments do not apply."""
    if weights == "none":
        return vgg16(input_shape, None)
    if weights == "imagenet":
        return vgg16(input_shape, "imagenet")
    return vgg16(input_shape, str(_weights_file(weights)))


#: name -> builder(input_shape, weights) ; config.MODEL_NAMES lists the same names.
MODELS: dict[str, Callable[..., keras.Model]] = {
    "paper_cnn": _build_paper_cnn,
    "vgg16": _build_vgg16,
}


def build_model(
    cfg_model, input_shape: tuple[int, int, int], fused_batchnorm: bool = False
) -> keras.Model:
    """Build ``cfg_model.name`` (a ``config.ModelConfig``) for images of ``input_shape``;
    ``fused_batchnorm`` is set by ``train.fast`` (see ``FusedBatchNormalization``)."""
    name = cfg_model.name
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(MODELS)}")
    return MODELS[name](
        tuple(input_shape),
        getattr(cfg_model, "weights", "none") or "none",
        getattr(cfg_model, "bn_momentum", 0.9),
        getattr(cfg_model, "sync_batchnorm", True),
        fused_batchnorm,
    )


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
    block1_conv2 .. block5_conv3 for vgg16 (the last conv layer of each block)."""
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
