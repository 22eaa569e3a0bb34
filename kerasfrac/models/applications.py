"""``keras.applications`` backbones (resnet50v2, efficientnetv2b0) with kerasfrac's heads."""

from __future__ import annotations

import keras

from kerasfrac.config import ModelConfig
from kerasfrac.models.heads import FEATURES, heads
from kerasfrac.models.io import weights_file

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
    head: str = ModelConfig.head,
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
    outputs = heads(features, box_head, dropout, head, meta_targets=meta_targets)
    return keras.Model(inputs, outputs, name=name)


def build(cfg_model, input_shape, *, fused_batchnorm: bool = False, meta_targets: int = 0):
    """The registry's builder for each backbone above. The backbone keeps Keras' own BatchNorm
    layers and momenta (the BatchNorm keys do not apply); ``model.weights`` none, imagenet or a
    weights file of the backbone without its top."""
    weights = cfg_model.weights
    if weights not in ("none", "imagenet"):
        weights = str(weights_file(weights))
    return application(
        cfg_model.name,
        input_shape,
        None if weights == "none" else weights,
        cfg_model.box_head,
        head=cfg_model.head,
        meta_targets=meta_targets,
    )
