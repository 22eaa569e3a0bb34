"""Save/load conversion: what training holds becomes what a plain Keras process loads.

``plain_keras`` swaps the fused BatchNorm for Keras' own, ``float32_compute`` undoes mixed
precision, ``functional`` rebuilds a saved Sequential as a graph; ``load_model`` loads a file
with kerasfrac's layers registered (importing this module registers them).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import keras

from kerasfrac.models.layers import FusedBatchNormalization, uses_fused_batchnorm


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


def weights_file(weights: str) -> Path:
    """``model.weights`` naming a file: its path, or an error that says what else it may be."""
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ValueError(
            f"model.weights {weights!r} is neither 'none', 'imagenet' nor an existing file; "
            "pass the path of a weights file or set model.weights=none"
        )
    return path
