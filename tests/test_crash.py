"""Crash consistency: a run killed at any point resumes to the weights and history of an
uninterrupted deterministic run; a run killed before its first checkpoint starts over.

In-process, every crash point of the checkpoint commit and the final writes is hit once
(``checkpoint.crash`` raises instead of SIGKILL, which leaves the files exactly as a kill
there would, since every file is closed before its rename). In subprocesses, the same hook
SIGKILLs the real CLI at a commit rename, and plain SIGKILLs land at random instants.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kerasfrac import config
from kerasfrac.training import checkpoint, train

SETTINGS = {
    "dataset": "synthetic",
    "data": {"image_size": 16, "cache": "memory"},
    "model": {"name": "paper_cnn"},
    "train": {
        "epochs": 2,
        "batch_size": 8,
        "steps_per_epoch": 4,
        "checkpoint_every_steps": 2,
        "optimizer": "adam",
        "learning_rate": 1e-3,
        "weight_decay": 0.0,
        "deterministic": True,
        "fast": False,
    },
}


class SimulatedCrash(BaseException):
    """Raised at a crash point: nothing in kerasfrac catches a BaseException."""


def make_config(build_dir: Path, run_dir: Path) -> config.Config:
    values = json.loads(json.dumps(SETTINGS))
    values["data"]["dir"] = str(build_dir)
    values["run_dir"] = str(run_dir)
    return config.from_dict(values)


def outcome(run_dir: Path) -> tuple[str, list[dict], dict]:
    """(final weights digest, history without timings, the test metrics)."""
    state = json.loads((run_dir / "checkpoints" / "state.json").read_text())
    assert state["finished"]
    with (run_dir / "history.csv").open() as f:
        rows = [{k: v for k, v in r.items() if k != "images_per_second"} for r in csv.DictReader(f)]
    return state["weights_sha256"], rows, json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, separable_tfrecord_dir) -> tuple[Path, list[str]]:
    """The uninterrupted run's directory (tests copy it, never change it), and the crash
    points it passes, in order."""
    run_dir = tmp_path_factory.mktemp("crash") / "reference"
    points: list[str] = []
    mp = pytest.MonkeyPatch()
    mp.setattr(checkpoint, "crash_point", points.append)
    try:
        train.train(make_config(separable_tfrecord_dir, run_dir), verbose=0)
    finally:
        mp.undo()
    return run_dir, points


@pytest.fixture(scope="module")
def reference(reference_run):
    """The uninterrupted run's outcome, and the crash points it passes, in order."""
    run_dir, points = reference_run
    return outcome(run_dir), points


def crash_at(n: int):
    counter = itertools.count(1)

    def point(where: str = "") -> None:
        if next(counter) == n:
            raise SimulatedCrash(where)

    return point


@pytest.mark.slow
def test_reference_passes_every_kind_of_crash_point(reference):
    (_, rows, _), points = reference
    assert [r["epoch"] for r in rows] == ["1", "2"]
    # begin, 4 commits (2 mid-epoch, 2 at epoch ends) of 4 steps each, model.keras, metrics
    assert len(points) == len(set(points)) == 1 + 4 * 4 + 2
    assert points[:3] == ["begin", "gen-000001 written", "gen-000001 renamed"]


@pytest.mark.slow
def test_kill_at_every_crash_point_resumes_to_the_uninterrupted_run(
    reference, tmp_path, separable_tfrecord_dir, monkeypatch
):
    """A run killed again and again, each time at the first crash point not killed at yet
    (inside resumed runs too), requeued with --auto-resume until it finishes; a kill at a
    commit's last steps skips them in the resumed run, so a second run takes those."""
    expected, points = reference
    killed: list[str] = []

    def point(where: str = "") -> None:
        if where not in killed:
            killed.append(where)
            raise SimulatedCrash(where)

    monkeypatch.setattr(checkpoint, "crash_point", point)
    for run in range(3):
        if set(killed) == set(points):
            break
        run_dir = tmp_path / f"run{run}"
        cfg = make_config(separable_tfrecord_dir, run_dir)
        for _attempt in range(len(points) + 1):
            try:
                train.train(cfg, auto_resume=True, verbose=0)  # what a requeued job runs
                break
            except SimulatedCrash:
                pass
        assert outcome(run_dir) == expected, f"killed at {killed}"
        gens = [p.name for p in (run_dir / "checkpoints").iterdir() if "gen-" in p.name]
        assert gens == ["gen-000004"]  # what killed commits left behind was cleaned
    assert sorted(killed) == sorted(points)


@pytest.mark.slow
def test_auto_resume_of_a_finished_run_has_nothing_to_do(
    reference, reference_run, tmp_path, separable_tfrecord_dir
):
    (_, _, metrics), _ = reference
    run_dir = tmp_path / "finished"
    # the finished reference run, copied (its config.yaml names its new folder), stands for a
    # run trained here with the same settings
    shutil.copytree(reference_run[0], run_dir)
    config.load_config(run_dir / "config.yaml", [f"run_dir={run_dir}"]).save(
        run_dir / "config.yaml"
    )
    cfg = make_config(separable_tfrecord_dir, run_dir)
    before = (run_dir / "checkpoints" / "state.json").read_text()
    assert train.train(cfg, auto_resume=True, verbose=0) == metrics  # a requeued job: exit 0
    assert (run_dir / "checkpoints" / "state.json").read_text() == before
    longer = make_config(separable_tfrecord_dir, run_dir)
    longer.train.epochs = 3
    with pytest.raises(train.RunDirError, match="finished run"):
        train.train(longer, auto_resume=True, verbose=0)  # more epochs: the user must decide


@pytest.mark.slow
def test_killed_before_first_checkpoint_restarts_under_resume(
    reference, tmp_path, separable_tfrecord_dir, monkeypatch
):
    run_dir = tmp_path / "early"
    cfg = make_config(separable_tfrecord_dir, run_dir)
    monkeypatch.setattr(checkpoint, "crash_point", crash_at(2))  # the first commit, unfinished
    with pytest.raises(SimulatedCrash):
        train.train(cfg, verbose=0)
    monkeypatch.undo()
    state = json.loads((run_dir / "checkpoints" / "state.json").read_text())
    assert state["checkpoint"] is None and not state["finished"]
    with pytest.raises(train.RunDirError, match="unfinished run.*--auto-resume"):
        train.train(cfg, verbose=0)  # neither fresh over it ...
    train.train(cfg, resume=True, verbose=0)  # ... but --resume starts it over
    assert outcome(run_dir) == reference[0]


def test_overwrite_refuses_what_is_not_a_run(tmp_path, separable_tfrecord_dir):
    precious = tmp_path / "P"
    precious.mkdir()
    (precious / "config.yaml").write_text("x: 1\n")
    (precious / "important.txt").write_text("precious\n")
    cfg = make_config(separable_tfrecord_dir, precious)
    with pytest.raises(train.RunDirError, match="not a kerasfrac run directory"):
        train.train(cfg, overwrite=True, verbose=0)
    assert (precious / "important.txt").read_text() == "precious\n"
    # A run directory that holds the training data is never deleted either.
    holder = tmp_path / "holder"
    (holder / "checkpoints").mkdir(parents=True)
    (holder / "checkpoints" / "state.json").write_text('{"finished": true, "epoch": 1}')
    (holder / "data-copy").mkdir()
    with pytest.raises(train.RunDirError, match="holds .*training data"):
        checkpoint.prepare_run_dir(holder, False, True, protect=[holder / "data-copy"])
    assert (holder / "checkpoints" / "state.json").is_file()


def test_corrupt_state_is_named(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "state.json").write_text("{not json")
    with pytest.raises(train.RunDirError, match="state.json.*not a kerasfrac run state"):
        checkpoint.prepare_run_dir(run_dir, resume=True, overwrite=False)


# --------------------------------------------------------------------------- real SIGKILLs


def _cli(build_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    main = "import sys; from kerasfrac.cli import main; sys.exit(main())"
    args = [sys.executable, "-c", main, "train", "--run-dir", str(run_dir), *extra]
    for section, values in SETTINGS.items():
        if isinstance(values, dict):
            args += [x for k, v in values.items() for x in ("--set", f"{section}.{k}={v}")]
        else:
            args += ["--set", f"{section}={values}"]
    return [*args, "--set", f"data.dir={build_dir}"]


def _run(cmd, env=None, kill_after: float | None = None) -> tuple[int, str]:
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    if kill_after is not None:
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=600)
    return proc.returncode, err


def _kill_after_a_checkpoint(cmd, run_dir: Path, delay: float) -> tuple[int, str]:
    """Start ``cmd``; once its state names a checkpoint, wait ``delay`` seconds and SIGKILL
    it if it still runs. ``(return code, stderr)``: -9 where the kill landed, 0 where the run
    finished first."""
    from kerasfrac import runs as run_files

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        state = run_files.read_state(run_dir) if run_dir.exists() else None
        if checkpoint.has_checkpoint(state, run_dir):
            break
        time.sleep(0.02)
    if proc.poll() is None:
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=600)
    return proc.returncode, err


def _requeue_until_done(build_dir: Path, run_dir: Path, code: int, err: str) -> None:
    while code != 0:  # requeued until done, as Slurm would
        assert code == -signal.SIGKILL, err  # anything else: it could not be resumed
        code, err = _run(_cli(build_dir, run_dir, "--auto-resume"))


@pytest.mark.slow
def test_sigkill_at_a_commit_rename_and_at_random_instants(tmp_path, separable_tfrecord_dir):
    ref = tmp_path / "ref"
    started = time.perf_counter()
    code, err = _run(_cli(separable_tfrecord_dir, ref))
    duration = time.perf_counter() - started
    assert code == 0, err
    expected = outcome(ref)
    # The 3rd commit's crash points are 10-13: 11 is after its folder rename, before state.json.
    renamed = tmp_path / "rename"
    env = {**os.environ, checkpoint.CRASH_ENV: "11"}
    code, err = _run(_cli(separable_tfrecord_dir, renamed), env=env)
    assert code == -signal.SIGKILL, err
    _requeue_until_done(separable_tfrecord_dir, renamed, code, err)
    assert outcome(renamed) == expected, "rename"
    # A plain SIGKILL at a random instant after the first checkpoint; a run that finished
    # first is tried again with a shorter delay, and the kill must land once.
    rng = random.Random(0)
    for attempt in range(4):
        run_dir = tmp_path / f"random{attempt}"
        delay = rng.uniform(0.0, 0.5) * duration / 2**attempt
        code, err = _kill_after_a_checkpoint(_cli(separable_tfrecord_dir, run_dir), run_dir, delay)
        if code == -signal.SIGKILL:
            break
        assert code == 0, err
    assert code == -signal.SIGKILL, "every run finished before its random kill landed"
    _requeue_until_done(separable_tfrecord_dir, run_dir, code, err)
    assert outcome(run_dir) == expected, "random"
