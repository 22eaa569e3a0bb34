"""Preemption-safe resume and multi-worker training, each in real `kerasfrac train` processes.

- SIGTERM mid-run: the process saves a checkpoint and exits 75; `--resume` finishes the run
  with bit-identical weights and history to an uninterrupted run (op determinism on).
- Two workers on 127.0.0.1 through TF_CONFIG (MultiWorkerMirroredStrategy, the custom loop):
  both end with identical weights and only the chief writes the run directory.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

KERASFRAC = [sys.executable, "-m", "kerasfrac.cli"]


def train_args(build_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    settings = {
        "dataset": "synthetic",
        "data.dir": str(build_dir),
        "data.image_size": 32,
        "data.flips": "random",
        "train.epochs": 2,
        "train.steps_per_epoch": 40,
        "train.batch_size": 8,
        "train.optimizer": "adam",
        "train.learning_rate": 1e-3,
        "train.weight_decay": 0.0,
        "train.deterministic": "true",
    }
    args = [*KERASFRAC, "train", "--run-dir", str(run_dir)]
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    for item in extra:
        args += ["--set", item]
    return args


def env(**extra: str) -> dict:
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **extra}


def state(run_dir: Path) -> dict:
    return json.loads((run_dir / "checkpoints" / "state.json").read_text())


def has_checkpoint(run_dir: Path) -> bool:
    path = run_dir / "checkpoints" / "state.json"
    return path.is_file() and json.loads(path.read_text()).get("checkpoint") is not None


def history(run_dir: Path) -> list[dict]:
    with (run_dir / "history.csv").open() as f:
        return [
            {k: v for k, v in row.items() if k != "images_per_second"} for row in csv.DictReader(f)
        ]


@pytest.mark.slow
def test_sigterm_checkpoint_then_resume_gives_identical_weights(tmp_path, separable_tfrecord_dir):
    ref, cut = tmp_path / "reference", tmp_path / "interrupted"
    done = subprocess.run(
        train_args(separable_tfrecord_dir, ref),
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    proc = subprocess.Popen(
        train_args(separable_tfrecord_dir, cut, "train.checkpoint_every_steps=5"),
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 240
    while not has_checkpoint(cut):  # state.json exists from the start; a checkpoint later
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    assert "SIGTERM received" in err
    interrupted = state(cut)
    steps_done = interrupted["epoch"] * 40 + interrupted["step"]
    assert not interrupted["finished"] and 5 <= steps_done < 80
    assert not (cut / "model.keras").exists()

    resumed = subprocess.run(
        [*train_args(separable_tfrecord_dir, cut), "--resume"],
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert state(cut)["finished"]
    assert state(cut)["weights_sha256"] == state(ref)["weights_sha256"]
    assert history(cut) == history(ref)  # the history continues as if never interrupted


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_workers_on_localhost_end_identical(tmp_path, separable_tfrecord_dir):
    workers = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    run_dir = tmp_path / "mw"
    procs = []
    for index in range(2):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        args = train_args(
            separable_tfrecord_dir,
            run_dir,
            "train.distribute=multi_worker",
            "train.epochs=1",
            "train.steps_per_epoch=10",
            "data.flips=none",
        )
        procs.append(
            subprocess.Popen(
                args,
                env=env(TF_CONFIG=json.dumps(tf_config)),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    digests = [
        line.split()[3]
        for out, _ in outs
        for line in out.splitlines()
        if line.startswith("final weights sha256:")
    ]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert "(task worker:1)" in outs[1][0]
    assert state(run_dir)["finished"] and state(run_dir)["weights_sha256"] == digests[0]
    assert (run_dir / "model.keras").is_file()


@pytest.mark.parametrize("mode", ["none", "auto"])
def test_single_process_strategy_choice(mode, monkeypatch):
    from kerasfrac.training import distribute

    monkeypatch.delenv("TF_CONFIG", raising=False)
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    assert distribute.choose(mode) == "none"
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    assert distribute.choose("auto") == "multi_worker"
    assert distribute.choose("none") == "none"
