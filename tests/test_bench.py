"""`kerasfrac bench` runs and reports sane, positive figures (no timing targets in tests)."""

from __future__ import annotations

import json
import os

import pytest

from kerasfrac import bench, config
from kerasfrac.cli import main
from kerasfrac.training import kernels
from tests import sources


@pytest.mark.slow
def test_bench_reports_positive_figures(tmp_path, separable_tfrecord_dir):
    cfg = config.from_dict(
        {
            "dataset": "synthetic",
            "data": {"dir": str(separable_tfrecord_dir), "image_size": 32, "flips": "expand"},
            "train": {"batch_size": 8},
        }
    )
    result = bench.run(
        cfg, ("input", "train", "fit"), steps=3, repeats=2, precisions=["float32", "mixed_bfloat16"]
    )
    for figure in (*result["input"].values(), *result["train"].values(), result["fit"]):
        assert figure["images_per_second"] > 0
        assert figure["min"] <= figure["images_per_second"] <= figure["max"]
        assert figure["repeats"] == 2
    # Rows: the plain float32 reference, the config's own setting (train.fast, float32),
    # and train.fast with each precision asked; each measured in its own process.
    assert list(result["train"]) == ["plain float32", "fast float32", "fast mixed_bfloat16"]
    plain, fast = result["train"]["plain float32"], result["train"]["fast float32"]
    assert plain["speedup"] == 1.0 and result["train"]["fast mixed_bfloat16"]["speedup"] > 0
    assert plain["fused_batchnorm"] is False and fast["fused_batchnorm"] is True
    if os.environ.get(kernels.ENV) is None:  # the bench asks oneDNN only for the fast rows
        assert fast["onednn"] is True and isinstance(plain["onednn"], bool)  # TF says which
    assert result["config"]["fast"] is True
    assert set(result["input_over_train"]) == {"uncached", "cached", "training"}
    # the stream as training reads it, with its CPU time per image
    assert result["input"]["training"]["images_per_cpu_second"] > 0
    # kerasfrac's uncached input beside the plain keras-io pipeline, same shards, same run
    vs = result["input_vs_plain"]
    for figure in (vs["kerasfrac"], vs["plain keras-io"]):
        assert figure["repeats"] == 2 and figure["images_per_cpu_second"] > 0
        assert figure["min"] <= figure["images_per_second"] <= figure["max"]
    assert (
        vs["ratio"]
        == vs["kerasfrac"]["images_per_second"] / (vs["plain keras-io"]["images_per_second"])
    )
    assert vs["cpu_ratio"] > 0 and vs["images"] == 3 * 8
    # the cache holds uint8: 32 x 32 x 1 bytes per image, a quarter of float32
    assert result["cache"] == {
        "dtype": "uint8",
        "bytes_per_image": 1024,
        "float32_bytes_per_image": 4096,
    }
    # An epoch without oversampling is the whole training split, x3 with flip-expand.
    manifest = json.loads((separable_tfrecord_dir / "manifest.json").read_text())
    train = sum(manifest["splits"]["train"].values())
    fit = result["fit"]
    assert cfg.data.oversample or fit["epoch_images"] == 3 * train
    if cfg.data.oversample:  # 2 x the majority class, x3, in whole batches
        majority = max(manifest["splits"]["train"].values())
        assert fit["epoch_images"] == -(-2 * majority * 3 // 8) * 8
    minutes = fit["epochs"] * fit["epoch_images"] / fit["images_per_second"] / 60
    assert fit["epochs"] == 5 and abs(fit["train_minutes"] - minutes) < 1e-9
    text = bench.table(result)
    assert (
        "input cached" in text and "train fast mixed_bfloat16" in text and "plain float32" in text
    )
    assert f"{fit['epoch_images']} img/epoch" in text and "min for 5 epochs" in text
    assert "input training" in text and "ms of CPU per image" in text
    assert "input plain keras-io" in text and f"{vs['ratio']:.2f}x the plain pipeline" in text
    assert "cache: 1,024 bytes per image (uint8; float32 would be 4,096)" in text


def test_bench_build_against_decode_floor_via_cli(tmp_path, separable_tfrecord_dir):
    sources.make_tibia(tmp_path / "src", "mendeley", n_fractured=10, n_normal=6, copies=0)
    out = tmp_path / "bench.json"
    code = main(
        [
            "bench",
            "--what",
            "build",
            "--repeats",
            "1",
            "--source",
            str(tmp_path / "src"),
            "--source-dataset",
            "tibia-fibula",
            "--set",
            "dataset=synthetic",
            "--set",
            f"data.dir={separable_tfrecord_dir}",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    b = json.loads(out.read_text())["build"]
    assert b["files"] == 16
    assert b["decode_floor"]["images_per_second"] > 0 and b["build"]["images_per_second"] > 0
    assert b["build_over_floor"] > 0


def test_bench_rejects_unknown_measure(separable_tfrecord_dir, capsys):
    code = main(
        [
            "bench",
            "--what",
            "input,speed",
            "--set",
            "dataset=synthetic",
            "--set",
            f"data.dir={separable_tfrecord_dir}",
        ]
    )
    assert code == 2
    assert "speed" in capsys.readouterr().err
