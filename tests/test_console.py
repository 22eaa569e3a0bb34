"""What the commands print: quiet start-up, the builder's named quarantine, the training
progress on and off a terminal, the end-of-run summary, --version, --list-keys, help texts,
and the figures' titles, bands, colour bars and labels."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import keras
import numpy as np
import pytest
from matplotlib.pyplot import close as matplotlib_close
from PIL import Image

from kerasfrac import config, console, runs
from kerasfrac.cli import build_parser, main
from kerasfrac.evaluation import evaluate, plots
from kerasfrac.evaluation import metrics as km
from kerasfrac.explain import run as explain
from tests import sources
from tests.conftest import make_run
from tfrecords_builder import quiet
from tfrecords_builder.cli import main as build_main

# --------------------------------------------------------------------------- start-up lines

NOISE = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1795792570.563834   21606 port.cc:153] oneDNN custom operations are on. You "
    "may see slightly different numerical results",
    "I0000 00:00:1795792570.564705   21606 cudart_stub.cc:31] Could not find cuda drivers on "
    "your machine, GPU will not be used.",
    "I0000 00:00:1795792570.624307   21606 cpu_feature_guard.cc:227] This TensorFlow binary is "
    "optimized to use available CPU instructions in performance-critical operations.",
    "To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild "
    "TensorFlow with the appropriate compiler flags.",
    "W0000 00:00:1795792570.6 123 some_file.cc:12] a C++ warning",
]
CUINIT = (
    "E0000 00:00:1795792579.215121   21682 cuda_platform.cc:52] failed call to cuInit: "
    "INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)"
)
REAL = [
    "E0000 00:00:1795792579.215121   21682 jpeg_mem.cc:331] some real error",
    "F0000 00:00:1795792579.215121   21682 some_kernel.cc:52] Check failed: x == y",
    "Traceback (most recent call last):",
    "ValueError: something the user must see",
]


def test_startup_noise_is_recognised_and_real_errors_are_not():
    assert all(quiet.is_startup_noise(line) for line in NOISE)
    assert not any(quiet.is_startup_noise(line) for line in REAL)
    # A failed cuInit is noise only where no NVIDIA driver is expected.
    assert quiet.is_startup_noise(CUINIT, gpu_expected=False)
    assert not quiet.is_startup_noise(CUINIT, gpu_expected=True)


def _command_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != quiet.LEVEL_ENV}
    return {**env, **extra}


def _predict(run_dir: Path, image: Path, *flags: str, env=None):
    cmd = [
        sys.executable,
        "-m",
        "kerasfrac.cli",
        *flags,
        "predict",
        "--model",
        str(run_dir / "model.keras"),
        str(image),
    ]
    return subprocess.run(
        cmd, env=env or _command_env(), capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def predict_run(tmp_path_factory, separable_tfrecord_dir):
    base = tmp_path_factory.mktemp("quiet")
    run_dir = make_run(base / "run", separable_tfrecord_dir)
    image = base / "x.png"
    Image.fromarray(np.full((32, 32), 90, np.uint8)).save(image)
    return run_dir, image


@pytest.mark.slow
def test_commands_start_without_tensorflows_noise(predict_run):
    """`kerasfrac predict` (TensorFlow, a model, an image) prints the probability and none of
    TensorFlow's start-up lines; --verbose gives them back (so they do exist here)."""
    run_dir, image = predict_run
    proc = _predict(run_dir, image)
    assert proc.returncode == 0, proc.stderr
    assert "x.png" in proc.stdout
    leaked = [line for line in proc.stderr.splitlines() if quiet.is_startup_noise(line)]
    assert not leaked, proc.stderr
    for text in (
        "absl::InitializeLog",
        "oneDNN custom operations",
        "cudart_stub",
        "cuInit",
        "cpu_feature_guard",
    ):
        assert text not in proc.stderr, proc.stderr
    loud = _predict(run_dir, image, "--verbose")
    assert loud.returncode == 0, loud.stderr
    assert "absl::InitializeLog" in loud.stderr  # TensorFlow 2.21 prints it before any env


def test_a_users_log_level_is_kept(monkeypatch):
    monkeypatch.setenv(quiet.LEVEL_ENV, "0")
    assert "(set by the environment) kept" in quiet.quiet_tensorflow()
    assert os.environ[quiet.LEVEL_ENV] == "0"
    monkeypatch.delenv(quiet.LEVEL_ENV)
    assert "verbose" in quiet.quiet_tensorflow(verbose=True)
    assert quiet.LEVEL_ENV not in os.environ
    quiet.quiet_tensorflow()  # in-process (tests): the level only, no fork
    assert os.environ[quiet.LEVEL_ENV] == "2"


def test_startup_noise_by_level():
    """The start-up lines go at every level; other C++ lines below the level in force go
    (as TensorFlow hides them once absl is up); FATAL lines always pass."""
    other_info = "I0000 00:00:1795792570.6 123 some_op.cc:12] an INFO line asked for"
    for level in range(4):
        assert all(quiet.is_startup_noise(line, level=level) for line in NOISE[:5])
        assert not quiet.is_startup_noise(REAL[1], level=level)  # FATAL
    assert not quiet.is_startup_noise(other_info, level=0)
    assert quiet.is_startup_noise(other_info, level=1)
    assert not quiet.is_startup_noise(REAL[0], level=2)
    assert quiet.is_startup_noise(REAL[0], level=3)
    assert quiet.log_level("3") == 3 and quiet.log_level("x") == quiet.DEFAULT_LEVEL


_FAKE_STARTUP = r"""
import os, sys
from tfrecords_builder.quiet import quiet_tensorflow
print(quiet_tensorflow(filter_stderr=True), flush=True)
lines = sys.argv[1:]
os.write(2, ("\n".join(lines + lines) + "\n").encode())  # TensorFlow 2.21 prints them twice
"""


@pytest.mark.parametrize("level", [None, "0", "3"])
def test_startup_lines_hidden_whatever_the_exported_level(level):
    """`export TF_CPP_MIN_LOG_LEVEL=3` (or 0) must not bring TensorFlow's start-up lines back:
    the command's stderr filter runs whatever the level (here fed the lines TensorFlow 2.21
    prints, twice, as it does with TF_CPP_MIN_LOG_LEVEL=3); a real error still passes."""
    env = _command_env() if level is None else _command_env(**{quiet.LEVEL_ENV: level})
    proc = subprocess.run(
        [sys.executable, "-c", _FAKE_STARTUP, *NOISE[:5], CUINIT, REAL[3]],
        env={**env, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "start-up lines filtered" in proc.stdout
    if level is not None:
        assert f"{quiet.LEVEL_ENV}={level} (set by the environment) kept" in proc.stdout
    kept = proc.stderr.splitlines()
    if not quiet.nvidia_driver_present():
        assert kept == [REAL[3], REAL[3]], proc.stderr
    for text in ("absl::InitializeLog", "oneDNN custom operations", "cudart_stub"):
        assert text not in proc.stderr


def test_help_texts_version_and_list_keys(capsys):
    parser = build_parser()
    import argparse

    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    texts = [parser.format_help()] + [p.format_help() for p in sub.choices.values()]
    assert all("%%" not in t for t in texts)
    assert any("95% CIs" in t for t in texts)
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"kerasfrac {metadata.version('kerasfrac')}"
    # `python -m kerasfrac` is the same command
    as_module = subprocess.run(
        [sys.executable, "-m", "kerasfrac", "--version"], capture_output=True, text=True
    )
    assert as_module.returncode == 0
    assert as_module.stdout.strip() == f"kerasfrac {metadata.version('kerasfrac')}"
    assert main(["train", "--list-keys"]) == 0
    listed = capsys.readouterr().out
    rows = config.describe_keys()
    assert len(rows) > 40
    for row in rows:  # every key, with its type and default
        assert f"{row.key}  ({row.type}, default " in listed, row.key
    assert "data.flips  (str, default 'none')  one of: none, expand, random" in listed
    assert "train.epochs  (int, default 5)" in listed
    # the list is read from the dataclasses: a key's default is the Config() default
    defaults = config.Config()
    assert next(r for r in rows if r.key == "train.learning_rate").default == (
        defaults.train.learning_rate
    )
    leaves = sum(
        1
        for section in dataclasses.fields(defaults)
        for _ in (
            dataclasses.fields(getattr(defaults, section.name))
            if dataclasses.is_dataclass(getattr(defaults, section.name))
            else [0]
        )
    )
    assert len(rows) == leaves


# --------------------------------------------------------------------------- builder


def test_builder_names_quarantined_files_and_keeps_libjpeg_quiet(tmp_path, capfd):
    expect = sources.make_fracatlas(tmp_path / "src")
    out = tmp_path / "out"
    code = build_main(
        [
            "fracatlas",
            "--source",
            str(tmp_path / "src"),
            "--out",
            str(out),
            "--shards",
            "2",
            "--no-progress",
        ]
    )
    assert code == 0
    printed = capfd.readouterr()
    for file, reason in expect["quarantined"].items():
        assert f"    {file}: {reason}" in printed.out
    assert f"manifest (counts, splits, every quarantined file): {out / 'manifest.json'}" in (
        printed.out
    )
    assert "Premature end of JPEG" not in printed.err


def test_captured_lines_other_than_the_dropped_ones_reach_stderr(capfd):
    with quiet.without_lines(lambda line: line.startswith("drop")) as real:
        os.write(2, b"drop me\nkeep me\n")
        real.write("progress\n")
    err = capfd.readouterr().err
    assert "keep me" in err and "progress" in err and "drop me" not in err


# --------------------------------------------------------------------------- training progress


def _drive(cb, epochs=2, steps=3, losses=(1.0, 3.0, 5.0)):
    callbacks = keras.callbacks.CallbackList(
        [cb], add_history=False, add_progbar=False, verbose=1, epochs=epochs, steps=steps
    )
    callbacks.on_train_begin()
    for epoch in range(epochs):
        callbacks.on_epoch_begin(epoch)
        for step in range(steps):
            callbacks.on_train_batch_begin(step)
            callbacks.on_train_batch_end(step, {"loss": losses[step], "size": 2 + 2 * step})
            time.sleep(0.06)  # past Progbar's update interval
        logs = {
            "loss": 0.5,
            "auroc": 0.77,
            "val_loss": 0.6,
            "val_auroc": 0.7,
            "images_per_second": 62.0,
        }
        callbacks.on_epoch_end(epoch, logs)
    callbacks.on_train_end()


def test_one_plain_line_per_epoch_without_a_terminal(capsys):
    _drive(console.progress_callback(epochs=2, steps=3, tty=False))
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("epoch 1/2  loss 0.500  auroc 0.770  val_loss 0.600  ")
    assert "val_auroc 0.700  62 img/s  0s" in lines[1]
    assert "\x1b" not in out and "\r" not in out and "step" not in out


def test_the_bar_shows_the_epochs_running_mean_loss(capsys, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    _drive(console.progress_callback(epochs=1, steps=3, tty=True), epochs=1)
    out = capsys.readouterr().out
    # batches of 2, 4 and 6 examples with mean losses 1, 3, 5: the bar shows the running
    # mean over examples (1, then 7/3, then 11/3), never the last batch's 3 or 5.
    assert "loss: 1.0000" in out and "loss: 2.3333" in out and "loss: 3.6667" in out
    assert "loss: 3.0000" not in out and "loss: 5.0000" not in out
    assert "loss: 0.5000" in out  # the epoch's own logs at its end


# --------------------------------------------------------------------------- summaries


def _metrics(labels, probs):
    return km.split_metrics(np.asarray(labels), np.asarray(probs), n_bootstrap=200)


def test_summary_says_where_the_files_are_and_what_next(tmp_path):
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(60), np.ones(40)].astype(int)
    good = _metrics(y, np.clip(y * 0.6 + rng.uniform(0, 0.4, y.size), 0, 1))
    text = console.run_summary(good, tmp_path / "run")
    assert "AUROC     1.000 [95% CI 1.000, 1.000; resampling 100 images]" in text
    grouped = km.split_metrics(
        y, y * 0.5 + 0.25, n_bootstrap=50, groups=[f"g{i // 2}" for i in range(y.size)]
    )
    assert "; resampling 50 duplicate groups]" in console.run_summary(grouped, tmp_path / "run")
    assert "majority baseline 60.0%" in text
    assert str(tmp_path / "run" / "model.keras") in text
    assert str(tmp_path / "run" / "metrics.json") in text
    assert f"kerasfrac evaluate --run-dir {tmp_path / 'run'}" in text
    assert f"kerasfrac explain --run-dir {tmp_path / 'run'}" in text
    assert "WARNING" not in text and console.warnings_of(good) == []
    assert "boxmap" not in text and "box_model.keras" not in text
    # a box-supervised run: its box model and the box heat map audit are named too
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "box_model.keras").write_bytes(b"")
    text = console.run_summary(good, tmp_path / "run")
    assert str(tmp_path / "run" / "box_model.keras") in text
    assert f"explain --run-dir {tmp_path / 'run'} --what audit --cam-method boxmap" in text


def test_summary_warns_below_the_majority_baseline_or_at_chance(tmp_path):
    rng = np.random.default_rng(1)
    y = np.r_[np.zeros(60), np.ones(40)].astype(int)
    coin = _metrics(y, rng.uniform(0, 1, y.size))  # AUROC ~0.5, accuracy ~50% < 60%
    warnings = console.warnings_of(coin)
    assert any("BELOW the majority baseline" in w for w in warnings)
    assert any("includes 0.5" in w for w in warnings)
    assert "WARNING: accuracy" in console.run_summary(coin, tmp_path)


@pytest.mark.slow
def test_cli_train_prints_the_summary_and_epoch_lines(tmp_path, separable_tfrecord_dir, capsys):
    run_dir = tmp_path / "run"
    args = [
        "train",
        "--set",
        "dataset=synthetic",
        "--set",
        f"data.dir={separable_tfrecord_dir}",
        "--set",
        "data.image_size=32",
        "--set",
        "train.epochs=2",
        "--set",
        "train.batch_size=8",
        "--run-dir",
        str(run_dir),
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    epoch_lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in epoch_lines] == ["1/2", "2/2"]
    assert "\x1b" not in out and "test metrics: {" not in out
    assert "test split: 16 images (8 fractured, 8 normal)" in out
    assert f"kerasfrac evaluate --run-dir {run_dir}" in out


def test_train_end_and_evaluate_print_one_ci_resampling_duplicate_groups(tmp_path, capsys):
    """The same predictions got [0.464, 0.726] at train's end (images resampled) and
    [0.457, 0.721] from evaluate (duplicate groups): now both resample the build's groups
    and say so, with the same numbers."""
    from tests.conftest import make_tfrecord_dir

    build_dir = make_tfrecord_dir(
        tmp_path / "tfr",
        {"train": 16, "val": 12, "test": 24},
        size=32,
        separable=False,
        group_size=3,
    )
    run_dir = tmp_path / "run"
    args = ["train", "--set", "dataset=synthetic", "--set", f"data.dir={build_dir}"]
    args += ["--set", "data.image_size=32", "--set", "train.epochs=1"]
    args += ["--set", "train.batch_size=8", "--run-dir", str(run_dir)]
    assert main(args) == 0
    trained = runs.read_metrics(run_dir, "test")
    printed_train = capsys.readouterr().out
    assert main(["evaluate", "--run-dir", str(run_dir)]) == 0
    printed_eval = capsys.readouterr().out
    ci_train, ci_eval = trained["ci95"], runs.read_metrics(run_dir, "test")["ci95"]
    assert ci_train["resampled"] == ci_eval["resampled"] == "groups"
    assert ci_train["n_units"] == ci_eval["n_units"] == 16  # 48 test images, groups of 3
    assert ci_train["auroc"] == ci_eval["auroc"] and ci_train["auroc"][0] < ci_train["auroc"][1]
    low, high = ci_eval["auroc"]
    shown = f"[95% CI {low:.3f}, {high:.3f}; resampling 16 duplicate groups]"
    assert shown in printed_train, printed_train
    assert "95% CI, resampling 16 duplicate groups" in printed_eval, printed_eval


# --------------------------------------------------------------------------- figures


@pytest.fixture
def figures(monkeypatch):
    """The figures plots/explain save, kept open (not closed) for inspection."""
    import matplotlib.pyplot as plt

    kept = []
    monkeypatch.setattr(plt, "close", kept.append)
    yield kept
    for fig in kept:
        matplotlib_close(fig)


def test_run_plots_name_run_and_split_with_a_roc_band_and_labels(tmp_path, figures, monkeypatch):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = np.clip(0.3 * y + rng.uniform(0, 0.7, y.size), 0, 1)
    m = km.split_metrics(y, p, val=(y, p), n_bootstrap=200)
    run_dir = tmp_path / "my-run"
    run_dir.mkdir()
    (run_dir / "history.csv").write_text("epoch,loss,val_loss\n0,0.7,0.72\n1,0.6,0.69\n")
    monkeypatch.setattr(runs, "log_images", lambda *a, **k: None)
    evaluate.write_run_plots(run_dir, "test", y, p, m)
    roc, pr, confusion, history = figures
    for fig in (roc, pr, confusion):
        ax = fig.axes[0]
        assert "run 'my-run', test split (n=200)" in ax.get_title()
        assert ax.get_xlabel() and ax.get_ylabel()
    assert "run 'my-run'" in history._suptitle.get_text()
    assert all(ax.get_xlabel() and ax.get_ylabel() for ax in history.axes)
    assert len(confusion.axes) == 2  # the matrix and its colour bar
    # The ROC band: drawn, and around the curve it is the band of.
    band = plots.roc_band(y, p, n_resamples=200)
    assert np.all(band["low"] <= band["tpr"]) and np.all(band["tpr"] <= band["high"])
    assert np.any(band["high"] - band["low"] > 0.05)
    fills = [c for c in roc.axes[0].collections if "95% CI" in str(c.get_label())]
    assert len(fills) == 1
    ys = fills[0].get_paths()[0].vertices[:, 1]
    assert ys.min() == pytest.approx(band["low"].min()) and ys.max() == pytest.approx(
        band["high"].max()
    )


def test_explain_figures_have_colour_bars_and_say_label_vs_prediction(tmp_path, figures):
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (2, 16, 16, 1)).astype(np.float32)
    examples = [explain.Example(images[0], "IMG1", 1), explain.Example(images[1], "IMG2", 0)]
    titles = [explain._title(e, p) for e, p in zip(examples, (0.31, 0.12))]
    assert titles[0].endswith("label fractured, predicted normal\np(fractured) 0.31")
    assert "label normal, predicted normal" in titles[1]
    cams = rng.uniform(0, 1, (2, 16, 16))
    explain.grad_cam_figure(tmp_path / "g.png", images, cams, titles, name="run r, test split")
    (fig,) = figures
    labels = [ax.get_ylabel() for ax in fig.axes]
    assert any("Grad-CAM" in label for label in labels)  # the colour bar
    assert fig._suptitle.get_text() == "run r, test split"
    maps = rng.uniform(0, 1, (2, 8, 8, 4))
    explain.feature_maps_figure(tmp_path / "f.png", "block1", images, maps, titles, 4, "run r")
    assert sum("activation" in ax.get_ylabel() for ax in figures[1].axes) == 2  # one per row
    explain.mean_cam_figure(tmp_path / "m.png", {"fractured": cams[0]}, 0.1, "run r, val split")
    assert any("share of the map's mass" in ax.get_ylabel() for ax in figures[2].axes)
    assert figures[2]._suptitle.get_text() == "run r, val split"
    vis = explain.ClassVis("fractured", images[0], images[1], np.array([0.1, 0.5, 0.9]))
    explain.class_vis_figure(tmp_path / "c.png", [("noise", vis)], "run r, test split")
    assert any("pixel change" in ax.get_ylabel() for ax in figures[3].axes)
    assert figures[3]._suptitle.get_text() == "run r, test split"


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_cam_figure_names_the_method_and_has_a_legend(tmp_path, figures):
    """The explain panels name the method used (HiResCAM, not "Grad-CAM"), and a legend says
    what the green outlines and the peak marker are, clear of every title."""
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (3, 16, 16, 1)).astype(np.float32)
    cams = rng.uniform(0, 1, (3, 16, 16))
    boxes = [np.array([[0.2, 0.2, 0.6, 0.5]]), None, np.array([[0.1, 0.5, 0.4, 0.9]])]
    titles = [f"IMG{i}\nlabel fractured" for i in range(3)]
    explain.grad_cam_figure(
        tmp_path / "g.png", images, cams, titles, boxes, name="run 'r', test split", what="HiResCAM"
    )
    (fig,) = figures
    panel_titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert panel_titles.count("HiResCAM") == 3 and not any("Grad-CAM" in t for t in panel_titles)
    assert any(ax.get_ylabel() == "HiResCAM (share of peak)" for ax in fig.axes)
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["HiResCAM peak", "fracture box"]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box = legend.get_window_extent(renderer)
    texts = [ax.title for ax in fig.axes if ax.get_title()] + [fig._suptitle]
    assert not [t.get_text() for t in texts if _overlaps(box, t.get_window_extent(renderer))]
    for ax in fig.axes:  # the legend sits below the images, not on them
        assert not _overlaps(box, ax.get_window_extent(renderer))
    from kerasfrac.explain import gradcam

    assert gradcam.map_kind("hirescam") == "HiResCAM" and gradcam.map_kind("gradcam") == "Grad-CAM"


def _texts(fig) -> list:
    """Every drawn, non-empty text of ``fig``: titles, the labels and tick labels of the
    axes that show theirs, legends and the figure's title."""
    texts = [fig._suptitle] if fig._suptitle else []
    for ax in fig.axes:
        texts += [ax.title, ax._left_title, ax._right_title]
        if ax.axison:
            texts += [ax.xaxis.label, ax.yaxis.label]
            texts += ax.get_xticklabels() + ax.get_yticklabels()
        if ax.get_legend():
            texts += ax.get_legend().get_texts()
    for legend in fig.legends:
        texts += legend.get_texts()
    return [t for t in texts if t.get_visible() and t.get_text().strip()]


def _assert_readable(fig, min_size: float = 7.0) -> None:
    """Every text of ``fig`` at least ``min_size`` points, inside the figure (nothing clipped)
    and clear of every other text."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    whole = fig.bbox
    texts = _texts(fig)
    boxes = [t.get_window_extent(renderer) for t in texts]
    for t, b in zip(texts, boxes):
        assert t.get_fontsize() >= min_size, (t.get_text(), t.get_fontsize())
        inside = b.x0 >= whole.x0 - 1 and b.x1 <= whole.x1 + 1
        assert inside and b.y0 >= whole.y0 - 1 and b.y1 <= whole.y1 + 1, (t.get_text(), b)
    for i, (t, a) in enumerate(zip(texts, boxes)):
        for u, b in zip(texts[i + 1 :], boxes[i + 1 :]):
            assert not _overlaps(a, b), (t.get_text(), u.get_text())


@pytest.mark.parametrize("channels", [16, 24])
def test_feature_map_figure_wraps_channels_and_stays_readable(tmp_path, figures, channels):
    """feature_maps_*.png: the channels of each image wrap onto rows of 8 (it was one row of
    16 or more channels, 1,989 px wide with 6 pt labels), so the PNG stays about 1,000 px
    wide whatever --max-channels is, and every label is legible, inside and apart."""
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (4, 32, 32, 1)).astype(np.float32)
    maps = rng.uniform(0, 1, (4, 8, 8, 96))
    maps[..., 5] += 2.0  # the most active channel comes first
    titles = [f"IMG{i:04d}_long_name\nlabel fractured" for i in range(4)]
    png = explain.feature_maps_figure(
        tmp_path / "f.png", "block2", images, maps, titles, channels, "run 'r': block2"
    )
    (fig,) = figures
    width, height = Image.open(png).size
    rows = 4 * channels // explain.FEATURE_COLUMNS
    assert 800 <= width <= 1200, width
    assert height <= 1.4 * 90 * rows + 150, height  # about 1.3 in per row at 90 dpi
    maps_shown = [ax for ax in fig.axes if ax.get_title().startswith("channel")]
    assert len(maps_shown) == 4 * channels  # max_channels per image, all of them drawn
    assert [ax.get_title() for ax in maps_shown[:2]] == ["channel 5", maps_shown[1].get_title()]
    assert sum(ax.get_ylabel() == "activation" for ax in fig.axes) == 4  # a bar per image
    _assert_readable(fig, min_size=7)


def test_cam_figure_of_one_users_file_is_not_clipped_and_says_unlabelled(tmp_path, figures):
    """``explain --images one.jpg``: one image, no label. Its panel says "unlabelled" (it
    said "label ?") beside the prediction, and no title, colour bar label or legend is cut
    off by the figure's edge (the colour bar's label and the 3-line title were)."""
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 1, (1, 32, 32, 1)).astype(np.float32)
    example = explain.Example(image[0], "my_own_xray_of_a_wrist.jpg", -1)
    title = explain._title(example, 0.73)
    assert title == "my_own_xray_of_a_w\nunlabelled, predicted fractured\np(fractured) 0.73"
    assert "?" not in explain._title(example)
    explain.grad_cam_figure(
        tmp_path / "g.png",
        image,
        rng.uniform(0, 1, (1, 32, 32)),
        [title],
        [None],
        "run 'r', image files: HiResCAM (label class)",
        "HiResCAM",
    )
    (fig,) = figures
    assert [ax.get_title() for ax in fig.axes if ax.get_title()] == [title, "HiResCAM"]
    _assert_readable(fig, min_size=7)


def test_training_curves_have_whole_epoch_ticks_and_no_colliding_text(tmp_path, figures):
    """training_curves.png: the figure title clear of the panels' titles, each y label clear
    of its neighbour's tick labels, and only whole epochs on the x axis of a short run."""
    rows = [
        {"epoch": 1.0, "loss": 0.7, "val_loss": 0.72, "accuracy": 0.5, "val_accuracy": 0.55},
        {"epoch": 2.0, "loss": 0.6, "val_loss": 0.69, "accuracy": 0.6, "val_accuracy": 0.58},
    ]
    for r in rows:
        r |= {"auroc": 0.6 + r["epoch"] / 10, "val_auroc": 0.55 + r["epoch"] / 10}
    plots.history_plot(tmp_path / "curves.png", rows, "run 'my-run'")
    (fig,) = figures
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    assert [ax.get_title() for ax in fig.axes] == ["loss", "accuracy", "auroc"]
    suptitle = fig._suptitle.get_window_extent(renderer)
    for ax in fig.axes:
        assert not _overlaps(suptitle, ax.title.get_window_extent(renderer))
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
        labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
        assert labels and all("." not in t for t in labels), labels
        assert [line.get_xdata().tolist() for line in ax.get_lines()] == [[1, 2], [1, 2]]
    for left, right in zip(fig.axes, fig.axes[1:]):
        ylabel = right.yaxis.label.get_window_extent(renderer)
        for tick in left.get_yticklabels() + left.get_xticklabels():
            if tick.get_text():
                assert not _overlaps(ylabel, tick.get_window_extent(renderer)), tick.get_text()
        assert not _overlaps(ylabel, left.get_window_extent(renderer))


def test_a_run_in_a_generic_folder_is_named_with_its_parent(tmp_path):
    """The demo's run lives in demo-out/run: its titles say "run 'demo-out/run'", not
    "run 'run'"; a run with a name of its own keeps it."""
    assert runs.run_name(tmp_path / "demo-out" / "run") == "run 'demo-out/run'"
    assert runs.run_name(tmp_path / "runs" / "default") == "run 'runs/default'"
    assert runs.run_name(tmp_path / "my-run") == "run 'my-run'"
