"""Error messages whose advice works (issue 35): each wrong input of a new user gets a
message, and doing what it says succeeds (or at least is not refused in turn)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from kerasfrac.cli import main
from tests import sources
from tests.conftest import make_run
from tfrecords_builder.archive import SourceError
from tfrecords_builder.build import BuildOptions, build
from tfrecords_builder.reader import BuildOutputError, load_manifest


def test_a_raw_dataset_given_as_a_build_is_told_to_build_into_another_folder(tmp_path):
    raw = tmp_path / "FracAtlas"
    sources.make_fracatlas(raw, n_fractured=6, n_normal=10, defects=False)
    with pytest.raises(BuildOutputError) as err:
        load_manifest(raw)
    message = str(err.value)
    assert "looks like a dataset as downloaded" in message
    command = re.search(r"`(kerasfrac build [^`]*)`", message).group(1)
    out = command.split("--out ")[1].strip()
    assert out == str(tmp_path / "FracAtlas-tfr") and f"--source {raw}" in command
    build("fracatlas", raw, tmp_path / "FracAtlas-tfr", BuildOptions(progress=False, shards=1))
    assert load_manifest(out)["source"] == "fracatlas"  # the advice, followed, works


def test_tibia_fibula_refuses_a_fracatlas_folder_instead_of_dropping_its_boxes(tmp_path):
    raw = tmp_path / "FracAtlas"
    sources.make_fracatlas(raw, n_fractured=4, n_normal=4, defects=False)
    with pytest.raises(SourceError, match="looks like FracAtlas.*kerasfrac build fracatlas"):
        build("tibia-fibula", raw, tmp_path / "out", BuildOptions(progress=False))
    assert not (tmp_path / "out").exists()


def _train_into_a_folder_of_notes(tmp_path, build_dir) -> tuple[Path, list[str]]:
    """A folder holding a user's file (not a run) and the train arguments pointing at it."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep")
    args = ["train", "--run-dir", str(folder), "--set", f"data.dir={build_dir}"]
    args += ["--set", "dataset=synthetic", "--set", "data.image_size=32"]
    return folder, args


def test_train_into_a_folder_that_is_not_a_run_does_not_offer_overwrite(
    tmp_path, separable_tfrecord_dir, capsys
):
    folder, args = _train_into_a_folder_of_notes(tmp_path, separable_tfrecord_dir)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "not a kerasfrac run" in err and "choose an empty or new --run-dir" in err
    assert "--overwrite" not in err
    assert (folder / "notes.txt").read_text() == "keep"


def test_a_missing_run_directory_is_called_missing(tmp_path, capsys):
    assert main(["evaluate", "--run-dir", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert f"run directory '{tmp_path / 'nope'}' does not exist" in err
    assert "no config.yaml next to the model" not in err


def test_report_on_a_folder_of_runs_names_the_glob_that_works(
    tmp_path, separable_tfrecord_dir, capsys
):
    parent = tmp_path / "runs"
    run = make_run(parent / "a", separable_tfrecord_dir)
    (run / "metrics.json").write_text(
        json.dumps(
            {
                "split": "test",
                "n": 4,
                "accuracy": 0.5,
                "loss": 0.7,
                "auroc": 0.5,
                "majority_baseline_accuracy": 0.5,
            }
        )
    )
    assert main(["report", str(parent)]) == 2
    err = capsys.readouterr().err
    assert "is a folder of runs" in err and f"kerasfrac report {parent}/*" in err
    assert main(["report", *map(str, sorted(parent.glob("*")))]) == 0  # what it advises
    assert "| a |" in capsys.readouterr().out


_WITHOUT_TENSORFLOW = r"""
import contextlib, io, json, sys
from importlib.abc import MetaPathFinder


class NoTensorFlow(MetaPathFinder):  # an import of TensorFlow on these paths is the bug
    tried = []

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "keras"):
            NoTensorFlow.tried.append(name)
            raise ImportError(f"{name} imported on an error path")
        return None


sys.meta_path.insert(0, NoTensorFlow())
from kerasfrac.cli import main

results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    results.append({"rc": rc, "err": err.getvalue(), "tried": NoTensorFlow.tried[:]})
print(json.dumps(results))
"""


def test_path_errors_answer_before_tensorflow_is_imported(tmp_path):
    """A wrong run directory, config, build or model is named without importing TensorFlow
    (whose import takes seconds): each command checks its paths first."""
    import subprocess
    import sys
    from pathlib import Path

    nope, not_a_run = tmp_path / "nope", tmp_path / "mine"
    not_a_run.mkdir()
    cases = {
        "evaluate": (["evaluate", "--run-dir", str(nope)], f"run directory '{nope}' does not"),
        "evaluate, not a run": (["evaluate", "--run-dir", str(not_a_run)], "no config.yaml"),
        "train --config": (
            ["train", "--config", str(tmp_path / "missing.yaml")],
            f"config file '{tmp_path / 'missing.yaml'}' does not exist",
        ),
        "train data.dir": (
            ["train", "--set", f"data.dir={nope}"],
            f"TFRecord directory '{nope}' does not exist",
        ),
        "audit": (["audit", str(nope)], f"TFRecord directory '{nope}' does not exist"),
        "explain": (["explain", "--run-dir", str(nope)], f"run directory '{nope}' does not"),
        "export": (
            ["export", "--run-dir", str(nope), "--out", str(tmp_path / "x")],
            f"run directory '{nope}' does not",
        ),
        "predict": (
            ["predict", "--model", str(nope), str(tmp_path / "x.png")],
            f"model file '{nope}' does not exist",
        ),
    }
    proc = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TENSORFLOW, json.dumps([a for a, _ in cases.values()])],
        env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for (name, (_, message)), result in zip(cases.items(), results, strict=True):
        assert result["rc"] == 2, (name, result)
        assert message in result["err"], (name, result)
        assert not result["tried"], (name, result)
    assert not (tmp_path / "x").exists()


def test_train_summarises_its_config_in_one_line_and_errors_follow(
    tmp_path, separable_tfrecord_dir, capsys
):
    """The resolved config is one line on the terminal (config.yaml holds it all), so an
    error comes right after it; --verbose prints the whole config."""
    folder, args = _train_into_a_folder_of_notes(tmp_path, separable_tfrecord_dir)
    assert main(args) == 2
    out, err = capsys.readouterr()
    config_lines = [line for line in out.splitlines() if line.startswith("config: ")]
    assert len(config_lines) == 1, out
    line = config_lines[0]
    assert "synthetic" in line and "32 px" in line and str(folder / "config.yaml") in line
    assert "resolved config" not in out and "learning_rate:" not in out
    assert len(out.splitlines()) == 1, out  # the config line, nothing else
    assert "not a kerasfrac run" in err
    assert main(["--verbose", *args]) == 2
    out = capsys.readouterr().out
    assert "resolved config:" in out and "learning_rate:" in out and "config: " not in out
