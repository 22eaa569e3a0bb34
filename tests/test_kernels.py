"""kerasfrac.training.kernels: train.fast asks for oneDNN before TensorFlow is imported; the
user wins."""

import os
import sys

from kerasfrac.training import kernels


def test_request_onednn_sets_the_flag_only_before_tensorflow_and_never_over_the_user(monkeypatch):
    monkeypatch.delenv(kernels.ENV, raising=False)
    monkeypatch.delitem(sys.modules, "tensorflow", raising=False)
    assert "train.fast=false" in kernels.request_onednn(False)
    assert kernels.ENV not in os.environ
    assert kernels.request_onednn(True) == f"{kernels.ENV}=1 (train.fast)"
    assert os.environ[kernels.ENV] == "1"

    monkeypatch.setenv(kernels.ENV, "0")  # the user's choice is kept, fast or not
    assert "set by the environment" in kernels.request_onednn(True)
    assert os.environ[kernels.ENV] == "0"


def test_request_onednn_leaves_an_imported_tensorflow_alone(monkeypatch):
    import tensorflow  # noqa: F401

    monkeypatch.delenv(kernels.ENV, raising=False)
    assert "already imported" in kernels.request_onednn(True)
    assert kernels.ENV not in os.environ
    assert isinstance(kernels.onednn_enabled(), bool)  # this TensorFlow can tell


def test_native_bfloat16_from_cpu_flags():
    avx = "processor\t: 0\nflags\t\t: fpu sse2 avx fma\n"
    sapphire = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
    assert kernels.cpu_flags(avx) == {"fpu", "sse2", "avx", "fma"}
    assert not kernels.native_bfloat16(avx)
    assert kernels.native_bfloat16(sapphire)
    assert kernels.cpu_flags("no flags here") == set()
