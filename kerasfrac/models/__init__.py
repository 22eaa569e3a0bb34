"""Models: a registry of architectures (one module each), their heads and layers, and the
save/load conversion.

``build_model(cfg.model, input_shape)`` builds a registered architecture
(``registry.register_architecture`` adds one); the output and layer names that evaluation
and explanations read are the constants of ``registry``. The names below are imported on first use
(PEP 562), so ``kerasfrac.models.registry`` and config validation stay TensorFlow-free;
``load_model`` registers kerasfrac's layers with Keras.
"""

import importlib

#: public name -> the module of this package that defines it
_EXPORTS = {
    "Architecture": "registry",
    "BOX_HEATMAP": "registry",
    "BOX_LOGITS": "registry",
    "FEATURES": "registry",
    "FusedBatchNormalization": "layers",
    "LOGIT": "registry",
    "META_LOGITS": "registry",
    "PROB": "registry",
    "application": "applications",
    "architecture": "registry",
    "block_output_names": "heads",
    "box_model": "heads",
    "build_model": "registry",
    "classifier": "heads",
    "conv_layer_names": "heads",
    "float32_compute": "io",
    "functional": "io",
    "has_box_head": "heads",
    "has_meta_head": "heads",
    "last_conv_block_name": "heads",
    "load_model": "io",
    "logit_layer_name": "heads",
    "names": "registry",
    "output_index": "heads",
    "plain_keras": "io",
    "predict_probs": "heads",
    "register_architecture": "registry",
    "unregister_architecture": "registry",
    "uses_fused_batchnorm": "layers",
    "uses_mixed_precision": "io",
}

#: the architecture modules and the rest, reachable as attributes too
_MODULES = (
    "applications",
    "heads",
    "io",
    "layers",
    "paper_cnn",
    "registry",
    "resnet_small",
    "vgg16",
)

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"kerasfrac.models.{_EXPORTS[name]}"), name)
    if name in _MODULES:
        return importlib.import_module(f"kerasfrac.models.{name}")
    raise AttributeError(f"module 'kerasfrac.models' has no attribute {name!r}")
