"""``vgg16``: the VGG16 convolutional base (the report's proposed next step) with a small head."""

from __future__ import annotations

import keras

from kerasfrac.models.heads import logit_head
from kerasfrac.models.io import weights_file

# ImageNet channel means (BGR, 0-255) of the Caffe-style VGG16 weights; grayscale input is
# repeated to three identical channels, so the channel order does not matter.
_VGG_MEAN = (103.939, 116.779, 123.68)


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
    _, prob = logit_head(x)
    return keras.Model(inputs, prob, name="vgg16")


def build(cfg_model, input_shape, *, fused_batchnorm: bool = False, meta_targets: int = 0):
    """The registry's builder. VGG16 has no BatchNorm: the BatchNorm keys do not apply."""
    weights = cfg_model.weights
    if weights not in ("none", "imagenet"):
        weights = str(weights_file(weights))
    return vgg16(input_shape, None if weights == "none" else weights)
