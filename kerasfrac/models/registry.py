"""The architectures kerasfrac builds, by name (``model.name``): one ``Architecture`` spec each.

A spec holds what kerasfrac must know about a network: its builder, a one-line summary, what it
supports (box head, metadata head, classifier heads, box strides, ImageNet weights) and the
``model.*`` keys it reads beyond the common ones. Config validation and ``kerasfrac train
--list-keys`` read the specs, so this module imports no TensorFlow: a built-in builder is
named by its import path and imported only when a model is built. Adding a backbone is one file
and one call (docs/extending.md)::

    from kerasfrac.models import Architecture, register_architecture
    register_architecture(Architecture("tiny_cnn", build_tiny, "a two-layer CNN"))

The builder's contract (``kerasfrac.models.build_model`` checks the names):
``build(cfg_model, input_shape, *, fused_batchnorm, meta_targets) -> keras.Model`` mapping
float32 images in [0, 1] of ``input_shape`` to the outputs ``kerasfrac.models.heads`` names:
``prob`` (float32 sigmoid) through a Dense(1) ``logit``; where the spec supports box,
metadata or cell-reading heads, a last feature map named ``features`` that
``kerasfrac.models.heads.heads`` builds them on.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kerasfrac.names import BOX_STRIDES, CELL_HEADS, HEADS
from tfrecords_builder.defaults import META_TARGETS
from tfrecords_builder.registry import Registry

# The layer and output names evaluation and explain read (the builder's contract above).
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

#: The model.* keys of config.ModelConfig that every architecture reads (or ignores where
#: they do not apply, as VGG16 the BatchNorm ones); any other key is an architecture's own.
COMMON_KEYS = ("name", "weights", "box_head", "meta_head", "head", "bn_momentum", "sync_batchnorm")


@dataclass(frozen=True)
class Architecture:
    #: model.name
    name: str
    #: build(cfg_model, input_shape, *, fused_batchnorm, meta_targets) -> keras.Model, or its
    #: import path "package.module:function" (imported when a model is built)
    builder: str | Callable[..., Any]
    #: one line for ``train --list-keys`` and docs
    summary: str
    #: model.head values it supports (heads other than gap read ``features``)
    heads: tuple[str, ...] = ("gap",)
    #: model.box_head (a box heat map on ``features``)
    box_head: bool = False
    #: model.meta_head (metadata logits from pooled ``features``)
    meta_head: bool = False
    #: model.box_stride values it places the box heat map at (empty: the key does not apply)
    box_strides: tuple[int, ...] = ()
    #: model.weights=imagenet is available
    pretrained: bool = False
    #: model.* keys it reads beyond COMMON_KEYS (config.ModelConfig fields)
    keys: tuple[str, ...] = ()

    def build_function(self) -> Callable[..., Any]:
        """The builder, imported if it is named by path."""
        if callable(self.builder):
            return self.builder
        module, _, attr = self.builder.partition(":")
        return getattr(importlib.import_module(module), attr)


_REGISTRY: Registry[Architecture] = Registry("model")


def register_architecture(spec: Architecture, replace: bool = False) -> Architecture:
    """Add ``spec`` to the registry (``replace=True`` to redefine a name); returns it."""
    if not spec.name.isidentifier():
        raise ValueError(f"an architecture name must be an identifier; got {spec.name!r}")
    unknown = sorted(set(spec.heads) - set(HEADS))
    if unknown or "gap" not in spec.heads:
        raise ValueError(
            f"architecture {spec.name!r}: heads must include 'gap' and be among {HEADS}; "
            f"got {spec.heads!r}"
        )
    return _REGISTRY.add(spec.name, spec, replace)


#: Remove an architecture (tests that register one of their own clean up with it).
unregister_architecture = _REGISTRY.remove
#: The registered model names, in registration order.
names = _REGISTRY.names
#: The spec of a name; an unknown name is an error listing the registered ones.
architecture = _REGISTRY.get


def reading(key: str) -> list[str]:
    """The registered architectures that read the ``model.<key>`` key (their spec's ``keys``)."""
    return [s.name for s in _REGISTRY.specs() if key in s.keys]


def check(cfg_model) -> Architecture:
    """Whether the architecture of ``cfg_model`` (a ``config.ModelConfig``) supports what it
    asks for; a ``ValueError`` naming the key and the fix otherwise. Returns the spec."""
    spec = architecture(cfg_model.name)
    name = spec.name
    cell_reading = [s.name for s in _REGISTRY.specs() if s.box_head]
    for field in dataclasses.fields(cfg_model):
        key = field.name
        if key in COMMON_KEYS or key in spec.keys:
            continue
        if getattr(cfg_model, key) != field.default:
            owners = ", ".join(reading(key)) or "no architecture"
            raise ValueError(
                f"config key 'model.{key}' applies to {owners} only; model.name is {name!r}: "
                f"remove model.{key} or set model.name={owners.split(', ')[0]}"
            )
    if cfg_model.weights == "imagenet" and not spec.pretrained:
        pretrained = ", ".join(s.name for s in _REGISTRY.specs() if s.pretrained)
        raise ValueError(
            f"{name} has no ImageNet weights; use model.weights=none, a weights file, or "
            f"model.name= one of {pretrained}"
        )
    asks = [
        what
        for what, wanted, ok in (
            ("model.box_head", cfg_model.box_head, spec.box_head),
            ("model.meta_head", cfg_model.meta_head, spec.meta_head),
            (f"model.head={cfg_model.head}", cfg_model.head != "gap", cfg_model.head in spec.heads),
        )
        if wanted and not ok
    ]
    if asks:
        raise ValueError(
            f"{' and '.join(asks)} not available: model.name is {name!r}, whose head has no "
            f"feature map named 'features' to supervise or read; use model.name= one of "
            f"{', '.join(cell_reading)}"
        )
    stride = cfg_model.box_stride
    if "box_stride" in spec.keys:
        if stride not in spec.box_strides:
            raise ValueError(
                f"config key 'model.box_stride' must be one of {list(spec.box_strides)} (pixels "
                f"per cell of the box heat map); got {stride!r}"
            )
        default = type(cfg_model).__dataclass_fields__["box_stride"].default
        if stride != default and not (cfg_model.box_head or cfg_model.head in CELL_HEADS):
            raise ValueError(
                "config key 'model.box_stride' sizes the box heat map, which this model does "
                "not have: set model.box_head=true (or model.head=heatmap or attention), or "
                "remove model.box_stride"
            )
    return spec


def build_model(
    cfg_model,
    input_shape: tuple[int, int, int],
    fused_batchnorm: bool = False,
    meta_targets: int | None = None,
):
    """Build ``cfg_model.name`` (a ``config.ModelConfig``) for images of ``input_shape``, after
    ``check``; ``fused_batchnorm`` is set by ``train.fast`` (``layers.FusedBatchNormalization``).
    With ``cfg_model.box_head`` the model has two outputs, ``[prob, box_heatmap]``, with
    ``cfg_model.meta_head`` also ``meta_logits`` (last); ``heads.classifier`` gives the
    one-output model that is saved and evaluated. ``meta_targets``: the build's number of
    metadata targets (``tfrecords_builder.metadata.targets``; default FracAtlas'
    ``META_TARGETS``)."""
    spec = check(cfg_model)
    if meta_targets is None:
        meta_targets = len(META_TARGETS)
    model = spec.build_function()(
        cfg_model,
        tuple(input_shape),
        fused_batchnorm=fused_batchnorm,
        meta_targets=meta_targets if cfg_model.meta_head else 0,
    )
    layers = {layer.name for layer in model.layers}
    needed = [LOGIT, PROB] + ([FEATURES] if cfg_model.box_head or cfg_model.meta_head else [])
    missing = [n for n in needed if n not in layers]
    if missing:
        raise ValueError(
            f"architecture {spec.name!r} built a model without the layer(s) {missing}: a "
            "registered builder must name them as kerasfrac.models.registry says"
        )
    return model


# --------------------------------------------------------------------------- built-ins
_CELL_SUPPORT = {"heads": HEADS, "box_head": True, "meta_head": True}
for _spec in (
    Architecture(
        "paper_cnn",
        "kerasfrac.models.paper_cnn:build",
        "the report's CNN: 3 conv blocks (32/64/128, ReLU, BatchNorm), Flatten, Dense",
    ),
    Architecture(
        "vgg16",
        "kerasfrac.models.vgg16:build",
        "VGG16 convolutional base, global average pooling, Dense",
        pretrained=True,
    ),
    Architecture(
        "resnet_small",
        "kerasfrac.models.resnet_small:build",
        "a compact pre-activation ResNet for CPUs (2.8 M parameters at width 32)",
        box_strides=BOX_STRIDES,
        keys=("width", "blocks_per_stage", "box_stride", "drop_path"),
        **_CELL_SUPPORT,
    ),
    Architecture(
        "resnet50v2",
        "kerasfrac.models.applications:build",
        "keras.applications ResNet50V2 backbone",
        pretrained=True,
        **_CELL_SUPPORT,
    ),
    Architecture(
        "efficientnetv2b0",
        "kerasfrac.models.applications:build",
        "keras.applications EfficientNetV2B0 backbone",
        pretrained=True,
        **_CELL_SUPPORT,
    ),
):
    register_architecture(_spec)
