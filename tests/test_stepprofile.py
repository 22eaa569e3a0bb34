"""``kerasfrac bench --profile``: the training step's time per op kind (stepprofile)."""

from __future__ import annotations

import pytest

from kerasfrac import bench, config, stepprofile


def test_classify_op_kinds():
    c = stepprofile.classify
    assert c("m/stem_conv/convolution", "_MklNativeConv2D") == "conv forward"
    assert c("m/x/Conv2D", "_MklNativeFusedConv2D") == "conv forward"
    assert c("gradient_tape/m/c/Conv2DBackpropInput", "Conv2DBackpropInput") == (
        "conv backward-data"
    )
    assert c("g/m/c/Conv2DBackpropFilter", "_MklNativeConv2DBackpropFilter") == (
        "conv backward-weights"
    )
    assert c("m/bn/FusedBatchNormV3", "_MklNativeFusedBatchNormV3") == "batchnorm forward"
    assert c("m/bn/FusedBatchNormV3", "_MklNativeFusedBatchNormEx") == "batchnorm forward"
    assert c("g/m/bn/FusedBatchNormGradV3", "FusedBatchNormGradV3") == "batchnorm backward"
    assert c("m/bn/Cast", "Cast") == "casts"
    assert c("m/relu/Relu", "Relu") == "element-wise"
    assert c("adam_w/Mul_3", "Mul", "adam_w") == "optimizer"
    assert c("sgd_1/AssignSubVariableOp", "AssignSubVariableOp", "sgd") == "optimizer"
    assert c("m/relu/Mul_3", "Mul", "adam_w") == "element-wise"
    assert c("m/pool/MaxPool", "MaxPool") == "other"


def test_exclusive_time_counts_nested_events_once():
    ps = 10**9  # one millisecond in picoseconds
    events = [(0, 10 * ps, "f", "PartitionedCall"), (2 * ps, 5 * ps, "c", "Conv2D")]
    events.append((20 * ps, 21 * ps, "r", "Relu"))
    got = {name: ms for name, _, ms in stepprofile._exclusive(events)}
    assert got == {"f": 7.0, "c": 3.0, "r": 1.0}


@pytest.mark.slow
def test_profile_of_a_small_train_step_sums_to_its_total():
    cfg = config.from_dict(
        {
            "dataset": "synthetic",
            "data": {"image_size": 64},
            "model": {"name": "resnet_small", "box_head": True},
            "train": {"batch_size": 8, "fast": True, "precision": "float32"},
        }
    )
    out = bench.measure_train_step(cfg, steps=1, repeats=1, profile=2)
    prof = out["profile"]
    kinds = prof["kinds_ms_per_step"]
    assert list(kinds) == list(stepprofile.KINDS)
    assert sum(kinds.values()) == pytest.approx(prof["op_ms_per_step"], rel=1e-9)
    # the ops' time is a real share of the step's wall time (two inter-op threads may overlap)
    assert 0.1 * prof["wall_ms_per_step"] < prof["op_ms_per_step"]
    assert prof["op_ms_per_step"] < 4 * prof["wall_ms_per_step"]
    for kind in ("conv forward", "conv backward-weights", "batchnorm forward"):
        assert kinds[kind] > 0, kind
    assert kinds["batchnorm backward"] > 0 and kinds["optimizer"] > 0
    prof["setting"] = "fast float32"
    text = stepprofile.format_table(prof)
    assert "conv backward-weights" in text and "batchnorm forward" in text
    assert "total op time" in text


@pytest.mark.slow
def test_abstep_interleaves_variants_in_one_process(separable_tfrecord_dir):
    from kerasfrac import abstep

    cfg = config.from_dict(
        {
            "dataset": "synthetic",
            "data": {"dir": str(separable_tfrecord_dir), "image_size": 32},
            "model": {"name": "resnet_small", "sync_batchnorm": False},
            "train": {"batch_size": 4, "precision": "mixed_bfloat16"},
        }
    )
    out = abstep.run(cfg, ["fast", "bn-f32-data"], steps=1, repeats=2, profile=1, fit=True)
    # the process's dtype policy is float32 again (a later test in this worker trains)
    import keras

    assert keras.mixed_precision.dtype_policy().name == "float32"
    got = out["variants"]
    assert list(got) == ["fast", "bn-f32-data", "fast fit", "bn-f32-data fit"]
    assert got["fast"]["ratio"] == 1.0
    for figure in got.values():
        assert figure["repeats"] == 2 and figure["images_per_second"] > 0
    assert "profile" in got["fast"] and "profile" not in got["fast fit"]
    assert got["fast"]["profile"]["kinds_ms_per_step"]["casts"] >= 0
    assert len(out["load_average_1min"]["seen"]) == 3
