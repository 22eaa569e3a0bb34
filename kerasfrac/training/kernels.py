"""Which TensorFlow CPU kernels a kerasfrac process runs (part of ``train.fast``).

TensorFlow reads ``TF_ENABLE_ONEDNN_OPTS`` once, when it is first imported, and turns its
oneDNN kernels on by default only on x86 CPUs with the newest vector extensions (AVX512
VNNI/BF16, AMX). On other CPUs, such as this project's 2-core AVX machines, the default is
TensorFlow's own Eigen kernels, and oneDNN makes the paper CNN's float32 training step
faster (docs/speed.md; ``kerasfrac bench`` measures it): same float32 maths, only the
summation order differs (TensorFlow says so when it starts: "slightly different numerical
results").

So the ``kerasfrac`` command calls ``request_onednn(cfg.train.fast)`` before anything
imports TensorFlow. A value the user exported always wins (``TF_ENABLE_ONEDNN_OPTS=0``
switches it off); a Python session that imported TensorFlow already keeps what it has, and
``onednn_enabled`` tells which it is. GPUs are unaffected: the flag picks CPU kernels only.
"""

from __future__ import annotations

import os
import sys

ENV = "TF_ENABLE_ONEDNN_OPTS"


def request_onednn(fast: bool) -> str:
    """Ask for oneDNN kernels when ``fast``; returns what happened, for the log."""
    if ENV in os.environ:
        return f"{ENV}={os.environ[ENV]} (set by the environment)"
    if not fast:
        return "TensorFlow's default CPU kernels (train.fast=false)"
    if "tensorflow" in sys.modules:
        return f"TensorFlow already imported: its kernels stay as they are ({ENV} unset)"
    os.environ[ENV] = "1"
    return f"{ENV}=1 (train.fast)"


def onednn_enabled() -> bool | None:
    """Whether this process' TensorFlow runs oneDNN kernels (None: cannot tell)."""
    try:
        from tensorflow.python.util import _pywrap_util_port

        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):  # a TensorFlow without this private function
        return None


#: CPU flags (Linux /proc/cpuinfo names) of native bfloat16 arithmetic; without them
#: TensorFlow emulates bfloat16 and ``mixed_bfloat16`` ran at 0.2x float32 here.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where it cannot be read)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def native_bfloat16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX)."""
    return bool(cpu_flags(cpuinfo) & set(BF16_CPU_FLAGS))


def resolve_precision(precision: str, gpu: bool | None = None) -> str:
    """``train.precision`` as the Keras policy to run: ``auto`` is ``mixed_float16`` on a GPU,
    ``mixed_bfloat16`` on a CPU with bfloat16 units (faster there, emulated and slower
    elsewhere: docs/speed.md), ``float32`` elsewhere; other names are returned as
    they are. ``gpu``: whether a GPU is used (default: whether TensorFlow sees one)."""
    if precision != "auto":
        return precision
    if gpu is None:
        import tensorflow as tf

        gpu = bool(tf.config.list_physical_devices("GPU"))
    if gpu:
        return "mixed_float16"
    return "mixed_bfloat16" if native_bfloat16() else "float32"
