"""Training: learning on separable data, run-dir artifacts, TensorBoard, resume, bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from kerasfrac import config, runs
from kerasfrac.cli import main
from kerasfrac.training import kernels, train
from tests.conftest import FAST, fast_config, history


def test_learns_separable_data(trained_run):
    """Over train.seed 42 / 1 / 2 / 3 this run reached test accuracy 1.00 and AUROC 1.00 each
    time; untrained models of the same architecture (conftest.make_run, seeds 0-3) scored
    accuracy 0.38-0.50 and AUROC 0.22-0.83 on the same test images (2026-12-07)."""
    run_dir, metrics = trained_run
    rows = history(run_dir)
    assert len(rows) == 4
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert max(r["val_auroc"] for r in rows) > 0.9
    assert metrics["auroc"] > 0.95
    assert metrics["accuracy"] > 0.9


def test_run_dir_artifacts(trained_run):
    run_dir, metrics = trained_run
    for name in (
        "config.yaml",
        "model.keras",
        "history.csv",
        "predictions.csv",
        "metrics.json",
        "checkpoints/gen-000004/model.keras",
        "checkpoints/best.keras",
        "checkpoints/state.json",
    ):
        assert (run_dir / name).is_file(), name
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["auroc"] == pytest.approx(metrics["auroc"])
    with (run_dir / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 16 == saved["n"]
    probs = np.array([float(r["probability"]) for r in rows])
    labels = np.array([int(r["label"]) for r in rows])
    assert ((probs >= 0.5) == labels).mean() == pytest.approx(saved["accuracy"])
    reloaded = config.load_config(run_dir / "config.yaml")
    assert reloaded.train.epochs == 4 and reloaded.data.image_size == 32
    assert json.loads((run_dir / "checkpoints" / "state.json").read_text())["finished"]


@pytest.mark.slow
def test_test_at_end_false_holds_test_back_until_evaluate(tmp_path, separable_tfrecord_dir):
    from kerasfrac import console
    from kerasfrac.evaluation import evaluate

    run_dir = tmp_path / "tuning"
    cfg = fast_config(separable_tfrecord_dir, run_dir, epochs=2)
    cfg.eval.test_at_end = False
    metrics = train.train(cfg, verbose=0)
    # The run ends with the final model's val metrics; nothing of test was computed.
    assert metrics["split"] == "val" and metrics["auroc"] > 0.9
    assert not (run_dir / "metrics.json").exists()
    assert not (run_dir / "predictions.csv").exists()
    saved = json.loads((run_dir / "metrics_val.json").read_text())
    assert saved["auroc"] == pytest.approx(metrics["auroc"])
    assert saved["n"] == 16 == len((run_dir / "predictions_val.csv").read_text().splitlines()) - 1
    text = console.run_summary(metrics, run_dir)
    assert text.startswith("val split: 16 images") and "test: held out" in text
    assert str(run_dir / "metrics_val.json") in text
    assert f"kerasfrac explain --run-dir {run_dir} --split val" in text
    # A requeued job finds the run done and returns the same val metrics.
    assert train.train(cfg, auto_resume=True, verbose=0) == metrics
    # Test is read when asked, once the settings are final.
    m = evaluate.evaluate_run(run_dir, plots=False, n_bootstrap=0)
    assert m["split"] == "test" and m["n"] == 16 and m["auroc"] > 0.9
    assert (run_dir / "metrics.json").is_file() and (run_dir / "predictions.csv").is_file()


def test_tensorboard_scalars_readable(trained_run):
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    run_dir, _ = trained_run
    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(str(run_dir / "tensorboard"))
    mux.Reload()
    tags = {run: set(mux.GetAccumulator(run).Tags()["tensors"]) for run in mux.Runs()}
    assert {"epoch_loss", "epoch_auroc", "epoch_accuracy"} <= tags["train"]
    assert {"epoch_loss", "epoch_auroc"} <= tags["validation"]
    assert len(mux.Tensors("validation", "epoch_auroc")) == 4
    assert "hparams" in tags


def test_refuses_finished_run_then_resume_continues(trained_run, separable_tfrecord_dir):
    run_dir, _ = trained_run
    cfg = fast_config(separable_tfrecord_dir, run_dir)
    with pytest.raises(train.RunDirError, match="finished run.*--overwrite"):
        train.train(cfg, verbose=0)
    with pytest.raises(train.RunDirError, match="already finished"):
        train.train(cfg, resume=True, verbose=0)


@pytest.mark.slow
def test_resume_continues_where_it_stopped(tmp_path, separable_tfrecord_dir):
    run_dir = tmp_path / "run"
    # 3 steps an epoch: what is checked is the bookkeeping of epochs, not learning
    train.train(
        fast_config(separable_tfrecord_dir, run_dir, epochs=2, steps_per_epoch=3), verbose=0
    )
    first = history(run_dir)
    assert [r["epoch"] for r in first] == [1, 2]  # from 1, as the console counts
    # Pretend the job was preempted after epoch 2 of 3: state says unfinished.
    state_file = run_dir / "checkpoints" / "state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "finished": False}))
    # ... and was written by an older kerasfrac, whose history.csv counted epochs from 0
    for path in run_dir.rglob("history.csv"):  # the run's and its checkpoints' copies
        lines = path.read_text().splitlines()
        renumbered = [f"{int(x.split(',')[0]) - 1},{x.split(',', 1)[1]}" for x in lines[1:]]
        path.write_text("\n".join([lines[0], *renumbered]) + "\n")
    assert [r["epoch"] for r in runs.read_history(run_dir)] == [1, 2]  # read from 1 all the same
    cfg = fast_config(separable_tfrecord_dir, run_dir, epochs=3, steps_per_epoch=3)
    with pytest.raises(train.RunDirError, match="--resume"):
        train.train(cfg, verbose=0)
    train.train(cfg, resume=True, verbose=0)
    rows = history(run_dir)
    assert [r["epoch"] for r in rows] == [1, 2, 3]  # renumbered, then appended from 1
    assert rows[:2] == first  # history continues, nothing rewritten
    assert json.loads(state_file.read_text())["epoch"] == 3


@pytest.mark.slow
def test_nan_loss_stops_with_clear_error_and_keeps_checkpoint(tmp_path, separable_tfrecord_dir):
    cfg = fast_config(
        separable_tfrecord_dir, tmp_path / "run", epochs=2, learning_rate=1e12, optimizer="sgd"
    )
    with pytest.raises(train.TrainingDiverged, match="NaN"):
        train.train(cfg, verbose=0)
    assert not (tmp_path / "run" / "model.keras").exists()


def test_bad_input_errors_before_training(tmp_path, separable_tfrecord_dir, capsys):
    with pytest.raises(ValueError, match="does not exist"):
        train.train(fast_config(tmp_path / "missing", tmp_path / "r1"), verbose=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="manifest.json"):
        train.train(fast_config(tmp_path / "empty", tmp_path / "r2"), verbose=0)
    values = json.loads(json.dumps(FAST))
    values.update(dataset="fracatlas", run_dir=str(tmp_path / "r3"))
    values["data"]["dir"] = str(separable_tfrecord_dir)
    with pytest.raises(ValueError, match="synthetic"):
        train.train(config.from_dict(values), verbose=0)
    with pytest.raises(ValueError, match="batch_size=500"):
        train.train(fast_config(separable_tfrecord_dir, tmp_path / "r4", batch_size=500), verbose=0)
    assert not any((tmp_path / r).exists() for r in ("r1", "r2", "r3", "r4"))
    # The CLI turns them into one-line errors and exit code 2.
    code = main(["train", "--set", "data.image_size=-3", "--run-dir", str(tmp_path / "r5")])
    assert code == 2
    assert "data.image_size" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_train_end_to_end(tmp_path, separable_tfrecord_dir, capsys):
    run_dir = tmp_path / "cli-run"
    args = [
        "train",
        "--set",
        "dataset=synthetic",
        "--set",
        f"data.dir={separable_tfrecord_dir}",
        "--set",
        "data.image_size=32",
        "--set",
        "train.epochs=1",
        "--set",
        "train.batch_size=8",
        "--run-dir",
        str(run_dir),
    ]
    assert main(args) == 0
    assert (run_dir / "model.keras").is_file() and (run_dir / "metrics.json").is_file()
    out = capsys.readouterr().out
    # what means nothing to a user (kernels, the weights' digest) only with --verbose
    assert not [x for x in out.splitlines() if x.startswith(("kernels:", "CPU kernels:"))], out
    assert "final weights sha256" not in out
    if kernels.onednn_enabled() is False:  # TensorFlow came up in this process before the CLI
        assert "note: train.fast asks for oneDNN" in out
    assert main(args) == 2  # finished run: refused without --overwrite
    assert main(["--verbose", *args, "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert "kernels: fused BatchNorm" in out and "CPU kernels: " in out  # train.fast's default
    assert "final weights sha256: " in out and "(task worker:0)" in out


def test_configs_demo_yaml_is_the_packages_demo_config():
    """One file: the demo reads the config that ships in the package, which configs/ links."""
    from kerasfrac import demo

    root = Path(__file__).resolve().parents[1]
    assert (root / "configs" / "demo.yaml").resolve() == demo.DEMO_CONFIG.resolve()
    assert demo.DEMO_CONFIG.is_file()


@pytest.mark.slow
def test_checkpoint_selection_and_stopping_never_see_the_test_split(
    tmp_path, separable_tfrecord_dir, monkeypatch
):
    """The best checkpoint is chosen (and any early stopping decided) on val metrics; the
    test split is read once, after the last epoch. Reading test for selection fails here.
    The same run checks that the build is loaded once (data.Build) and passed down to every
    pipeline: the manifest is read once."""
    import keras

    from kerasfrac import data
    from tfrecords_builder import reader

    manifest_reads = []
    real_manifest = reader.load_manifest

    def counting(directory):
        manifest_reads.append(str(directory))
        return real_manifest(directory)

    monkeypatch.setattr(reader, "load_manifest", counting)
    events: list[tuple] = []
    real_eval = data.make_eval_dataset

    def spy_eval(build_dir, split, *args, **kwargs):
        events.append(("read", split))
        return real_eval(build_dir, split, *args, **kwargs)

    monitors = []
    for cls in (train.BestModel, keras.callbacks.EarlyStopping):
        real_init, real_end = cls.__init__, cls.on_epoch_end

        def init(self, *args, _init=real_init, _cls=cls, **kwargs):
            _init(self, *args, **kwargs)
            monitors.append((_cls.__name__, self.monitor))

        def end(self, epoch, logs=None, _end=real_end):
            events.append(("epoch_end", epoch, sorted(logs or {})))
            return _end(self, epoch, logs)

        monkeypatch.setattr(cls, "__init__", init)
        monkeypatch.setattr(cls, "on_epoch_end", end)
    monkeypatch.setattr(data, "make_eval_dataset", spy_eval)
    cfg = fast_config(separable_tfrecord_dir, tmp_path / "run", epochs=2, steps_per_epoch=3)
    train.train(cfg, verbose=0)

    assert monitors and all(m.startswith("val_") for _, m in monitors), monitors
    reads = [e[1] for e in events if e[0] == "read"]
    assert reads.count("test") == 1 and "val" in reads
    ends = [k for k, e in enumerate(events) if e[0] == "epoch_end"]
    assert len(ends) == 2
    assert events.index(("read", "test")) > ends[-1], events
    assert events.index(("read", "val")) < ends[0]
    for e in events:
        if e[0] == "epoch_end":
            assert "val_auroc" in e[2] and not any(k.startswith("test") for k in e[2])
    assert manifest_reads == [str(separable_tfrecord_dir)]


@pytest.mark.slow
def test_model_keras_loads_with_plain_keras_without_kerasfrac(trained_run):
    """train.fast trains with the fused BatchNorm layer; model.keras holds plain Keras layers,
    so a process that never imports kerasfrac loads it and gives the run's probabilities."""
    import subprocess
    import sys

    run_dir, _ = trained_run
    with (run_dir / "predictions.csv").open() as f:
        n = len(list(csv.DictReader(f)))
    code = (
        "import sys, keras, numpy as np\n"
        f"m = keras.saving.load_model({str(run_dir / 'model.keras')!r})\n"
        "assert not any(k.startswith('kerasfrac') for k in sys.modules), 'kerasfrac imported'\n"
        "p = m.predict(np.zeros((2,) + tuple(m.input_shape[1:]), 'float32'), verbose=0)\n"
        "print('ok', p.shape, [type(layer).__name__ for layer in m.layers if 'bn' in layer.name])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=False,
        cwd=run_dir.parent,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ok (2, 1)" in proc.stdout and "BatchNormalization" in proc.stdout
    assert "Fused" not in proc.stdout and n == 16


@pytest.mark.slow
def test_run_config_paths_are_absolute_and_evaluate_works_from_another_folder(
    tmp_path, separable_tfrecord_dir, monkeypatch, capsys
):
    """A run started with relative paths stores them absolute; `evaluate --run-dir` from
    another folder then finds the data. The same (finished) run then checks `train --resume`:
    refused with the same epochs, continued with more."""
    import os
    import shutil

    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(separable_tfrecord_dir, work / "tfr")
    monkeypatch.chdir(work)
    cfg = fast_config(Path("tfr"), Path("runs/rel"), epochs=1, steps_per_epoch=3)
    train.train(cfg, verbose=0)
    saved = config.load_config(work / "runs" / "rel" / "config.yaml")
    assert saved.data.dir == str(work / "tfr") and saved.run_dir == str(work / "runs" / "rel")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert os.getcwd() == str(elsewhere)
    code = main(
        [
            "evaluate",
            "--run-dir",
            str(work / "runs" / "rel"),
            "--no-plots",
            "--no-baseline",
            "--bootstrap",
            "0",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert json.loads((work / "runs" / "rel" / "metrics.json").read_text())["n"] == 16

    # A finished run resumed with more epochs continues it (formerly its own test, which
    # trained the same 1 epoch x 3 steps run).
    run_dir = work / "runs" / "rel"
    first = history(run_dir)
    capsys.readouterr()
    # the same epochs: nothing to continue, and the error says how
    assert main(["train", "--run-dir", str(run_dir), "--resume"]) == 2
    assert "--set train.epochs=N, N > 1" in capsys.readouterr().err
    assert main(["train", "--run-dir", str(run_dir), "--resume", "--set", "train.epochs=2"]) == 0
    rows = history(run_dir)
    assert [r["epoch"] for r in rows] == [1, 2] and rows[:1] == first
    state = json.loads((run_dir / "checkpoints" / "state.json").read_text())
    assert state["epoch"] == 2 and state["finished"]
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 2


@pytest.mark.slow
def test_mixed_bfloat16_run_learns_and_saves_a_float32_model(tmp_path, separable_tfrecord_dir):
    """train.precision=mixed_bfloat16 trains in bfloat16, yet model.keras computes in float32
    (full speed on CPUs without bfloat16 units) and gives the run's own test predictions; the
    process's dtype policy is float32 again afterwards."""
    import keras

    from kerasfrac import models, runs
    from kerasfrac.evaluation import evaluate

    run_dir = tmp_path / "bf16"
    metrics = train.train(
        fast_config(separable_tfrecord_dir, run_dir, precision="mixed_bfloat16"), verbose=0
    )
    assert keras.mixed_precision.dtype_policy().name == "float32"
    assert metrics["auroc"] > 0.9
    best = models.load_model(run_dir / "checkpoints" / "best.keras")
    assert models.uses_mixed_precision(best)  # training itself ran in bfloat16
    saved = models.load_model(run_dir / "model.keras")
    assert not models.uses_mixed_precision(saved)
    assert {layer.dtype_policy.name for layer in saved.layers} == {"float32"}
    path = runs.predictions_path(run_dir, "test")
    ids, labels, probs = runs.read_predictions(path)
    assert len(ids) == 16 and set(labels) == {0, 1}
    # evaluate predicts again with model.keras (float32): the probabilities the run wrote.
    again = evaluate.evaluate_run(
        run_dir, recompute=True, plots=False, n_bootstrap=0, baseline=False
    )
    ids2, _, probs2 = runs.read_predictions(path)
    assert ids2 == ids and again["auroc"] == pytest.approx(metrics["auroc"], abs=1e-6)
    np.testing.assert_allclose(probs2, probs, atol=2e-6)


@pytest.mark.slow
def test_float32_compute_is_the_same_network_in_float32():
    """A mixed-precision resnet_small with a box head, rebuilt by float32_compute, equals a
    float32 model of the same weights exactly, and its bfloat16 original to bfloat16 precision."""
    import keras

    from kerasfrac import models

    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    try:
        mixed = models.resnet_small.resnet_small((64, 64, 1), box_head=True)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    reference = models.resnet_small.resnet_small((64, 64, 1), box_head=True)
    reference.set_weights(mixed.get_weights())
    converted = models.float32_compute(mixed)
    assert models.uses_mixed_precision(mixed) and not models.uses_mixed_precision(converted)
    assert models.float32_compute(reference) is reference
    x = np.random.default_rng(0).uniform(0, 1, (4, 64, 64, 1)).astype("float32")
    got = converted.predict(x, verbose=0)
    want = reference.predict(x, verbose=0)
    approx = mixed.predict(x, verbose=0)
    for g, w, a in zip(got, want, approx, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-6)
        assert np.abs(a - w).max() < 0.05  # bfloat16 keeps 8 bits of mantissa


def test_precision_auto_resolves_by_the_hardware(monkeypatch):
    assert kernels.resolve_precision("float32", gpu=True) == "float32"
    assert kernels.resolve_precision("auto", gpu=True) == "mixed_float16"
    monkeypatch.setattr(kernels, "native_bfloat16", lambda cpuinfo=None: True)
    assert kernels.resolve_precision("auto", gpu=False) == "mixed_bfloat16"
    monkeypatch.setattr(kernels, "native_bfloat16", lambda cpuinfo=None: False)
    assert kernels.resolve_precision("auto", gpu=False) == "float32"
    assert config.from_dict({"train": {"precision": "auto"}}).train.precision == "auto"


@pytest.mark.slow
def test_precision_auto_resumes_in_the_precision_the_run_started_in(
    tmp_path, separable_tfrecord_dir, monkeypatch, capsys
):
    """A run begun with train.precision=auto on a CPU with bfloat16 units and resumed on one
    without goes on in bfloat16 (its checkpoint's numerics), and says so."""
    from kerasfrac import models

    run_dir = tmp_path / "auto"
    monkeypatch.setattr(kernels, "native_bfloat16", lambda cpuinfo=None: True)
    # 3 steps an epoch: what is checked is the precision each part ran in, not learning
    cfg = fast_config(
        separable_tfrecord_dir, run_dir, epochs=1, steps_per_epoch=3, precision="auto"
    )
    train.train(cfg, verbose=0)
    state = json.loads((run_dir / "checkpoints" / "state.json").read_text())
    assert state["precision"] == "mixed_bfloat16" and state["finished"]
    monkeypatch.setattr(kernels, "native_bfloat16", lambda cpuinfo=None: False)
    capsys.readouterr()
    cfg.train.epochs = 2
    train.train(cfg, resume=True, verbose=0)
    out = capsys.readouterr().out
    assert "auto -> mixed_bfloat16, the precision this run started in" in out
    assert "would pick float32" in out
    state = json.loads((run_dir / "checkpoints" / "state.json").read_text())
    assert state["epoch"] == 2 and state["precision"] == "mixed_bfloat16"
    trained = models.load_model(run_dir / "checkpoints" / state["checkpoint"] / "model.keras")
    assert models.uses_mixed_precision(trained)  # epoch 2 trained in bfloat16
    # A fresh run on this machine resolves auto by the hardware.
    train.train(
        fast_config(
            separable_tfrecord_dir,
            tmp_path / "fresh",
            epochs=1,
            steps_per_epoch=3,
            precision="auto",
        ),
        verbose=0,
    )
    fresh = json.loads((tmp_path / "fresh" / "checkpoints" / "state.json").read_text())
    assert fresh["precision"] == "float32"


def test_float32_compute_reaches_nested_models():
    """keras.applications backbones sit in our models as nested models: their layers count."""
    import keras

    from kerasfrac import models

    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    try:
        inner_in = keras.Input((16, 16, 1))
        inner = keras.Model(inner_in, keras.layers.Conv2D(4, 3, name="c")(inner_in), name="inner")
        outer_in = keras.Input((16, 16, 1))
        pooled = keras.layers.GlobalAveragePooling2D()(inner(outer_in))
        outer = keras.Model(outer_in, keras.layers.Dense(1, dtype="float32")(pooled))
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    assert outer.get_layer("inner").get_layer("c").compute_dtype == "bfloat16"
    assert models.uses_mixed_precision(outer)
    converted = models.float32_compute(outer)
    assert not models.uses_mixed_precision(converted)
    assert converted.get_layer("inner").get_layer("c").compute_dtype == "float32"
    x = np.random.default_rng(1).uniform(0, 1, (2, 16, 16, 1)).astype("float32")
    want = outer.predict(x, verbose=0)
    np.testing.assert_allclose(converted.predict(x, verbose=0), want, atol=0.05)


def test_loss_scaling_follows_the_models_float16_policy():
    """make_optimizer wraps the optimizer in loss scaling exactly when the model computes in
    float16 (train.precision mixed_float16, or auto on a GPU); bfloat16 needs none."""
    import keras

    from kerasfrac import models

    cfg = config.from_dict({"train": {"precision": "auto", "optimizer": "adamw"}})
    built = {}
    for policy in ("mixed_float16", "mixed_bfloat16", "float32"):
        keras.mixed_precision.set_dtype_policy(policy)
        try:
            built[policy] = models.resnet_small.resnet_small((32, 32, 1))
        finally:
            keras.mixed_precision.set_dtype_policy("float32")
    scaled = {p: type(train.make_optimizer(cfg, m)).__name__ for p, m in built.items()}
    assert scaled == {
        "mixed_float16": "LossScaleOptimizer",
        "mixed_bfloat16": "AdamW",
        "float32": "AdamW",
    }
