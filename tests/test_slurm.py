"""The real sbatch/ scripts on a real (one-node) Slurm.

Start the cluster first: ``sudo bash tests/slurm_cluster.sh start`` (``.ci/run`` does, and sets
``KERASFRAC_REQUIRE_SLURM=1`` so these tests fail instead of skipping when Slurm is missing).
Jobs are submitted exactly as a user would, from the repository root, with only the resources
overridden for a small CPU-only node (``--gres=none`` removes the scripts' GPU request) and the
environment set to the venv running these tests (``KERASFRAC_ENV=venv``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "sbatch"
SCRIPTS = sorted(SBATCH.glob("*.sbatch"))
# Resources of this CPU-only test node, overriding every script's Greene-sized #SBATCH defaults.
CPU_NODE = ["--gres=none", "--cpus-per-task=1", "--mem=2G", "--time=00:10:00"]
JOB_TIMEOUT_S = 240
LAPTOP_SSH = r"^ssh -L (\d+):localhost:\1 \S+@greene\.hpc\.nyu\.edu$"


def _cluster_problem() -> str | None:
    """None when a Slurm cluster answers and has a usable node, else why not."""
    if shutil.which("sbatch") is None:
        return "sbatch is not on PATH (Debian: sudo bash tests/slurm_cluster.sh start)"
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired:
        return "sinfo did not answer in 30 s (is slurmctld running?)"
    states = out.stdout.split()
    if out.returncode != 0 or not states:
        why = out.stderr.strip() or "no nodes"
        return f"Slurm cluster is not up (sinfo: {why}); sudo bash tests/slurm_cluster.sh start"
    if not any(s.rstrip("*~#") in {"idle", "mixed", "allocated"} for s in states):
        return f"no usable Slurm node (sinfo states: {states})"
    return None


_PROBLEM = _cluster_problem()
_REQUIRED = os.environ.get("KERASFRAC_REQUIRE_SLURM") == "1"
needs_slurm = pytest.mark.skipif(
    _PROBLEM is not None and not _REQUIRED, reason=f"no Slurm: {_PROBLEM}"
)


def _venv() -> str:
    return sys.prefix if sys.prefix != sys.base_prefix else str(REPO / ".venv")


def _log_tail(logs: Path, job_id: str, n: int = 60) -> str:
    parts = []
    for log in sorted(logs.glob(f"*_{job_id}*.out")):
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if "━" not in ln]
        parts.append(f"--- {log.name} (last {n} lines)\n" + "\n".join(lines[-n:]))
    return "\n".join(parts) or f"(no log for job {job_id} in {logs})"


class Cluster:
    """Submits sbatch/ scripts from the repository root and waits for them."""

    def __init__(self, root: Path):
        self.root = root
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)  # Slurm opens --output before the job runs
        self.env = {
            **os.environ,
            "KERASFRAC_ENV": "venv",
            "KERASFRAC_VENV": _venv(),
            "KERASFRAC_DATA": str(root / "data"),
            "KERASFRAC_RUNS": str(root / "runs"),
            "TF_CPP_MIN_LOG_LEVEL": "2",
        }

    def submit(self, script: str, *options: str, **env: str) -> str:
        cmd = ["sbatch", "--parsable", *CPU_NODE, *options]
        if not any(o.startswith("--output") for o in options):
            cmd.append(f"--output={self.logs}/%x_%A_%a.out")
        cmd.append(str(SBATCH / script))
        out = subprocess.run(
            cmd, cwd=REPO, env={**self.env, **env}, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, f"{' '.join(cmd)} failed: {out.stderr}"
        return out.stdout.strip().split(";")[0]

    def wait(self, job_id: str, timeout_s: float = JOB_TIMEOUT_S) -> dict[str, tuple[str, str]]:
        """Wait until job (all array tasks) left the queue; {task: (JobState, ExitCode)}."""
        deadline = time.monotonic() + timeout_s
        while True:
            queued = subprocess.run(
                ["squeue", "-h", "-j", job_id, "-o", "%i"], capture_output=True, text=True
            ).stdout.strip()
            if not queued:
                break
            if time.monotonic() > deadline:
                subprocess.run(["scancel", job_id])
                pytest.fail(
                    f"job {job_id} still queued/running after {timeout_s} s (cancelled)\n"
                    + _log_tail(self.logs, job_id)
                )
            time.sleep(1)
        shown = subprocess.run(
            ["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True
        ).stdout
        result = {}
        for line in shown.splitlines():
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            task = fields.get("ArrayTaskId", "-")
            result[task] = (fields.get("JobState", "?"), fields.get("ExitCode", "?"))
        return result

    def run(self, script: str, *options: str, **env: str) -> str:
        job_id = self.submit(script, *options, **env)
        states = self.wait(job_id)
        failed = {t: s for t, s in states.items() if s != ("COMPLETED", "0:0")}
        assert states and not failed, (
            f"{script} job {job_id}: {states or 'no record'}\n" + _log_tail(self.logs, job_id)
        )
        return job_id

    def log(self, job_id: str) -> str:
        logs = sorted(self.logs.glob(f"*_{job_id}*.out"))
        return "\n".join(p.read_text(errors="replace") for p in logs)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Cluster:
    if _PROBLEM is not None:
        pytest.fail(f"KERASFRAC_REQUIRE_SLURM=1 but {_PROBLEM}")
    return Cluster(tmp_path_factory.mktemp("slurm"))


@pytest.fixture(scope="module")
def synthetic(cluster) -> Path:
    """build.sbatch on synthetic phantoms (120 images, 64 px) -> $KERASFRAC_DATA/synthetic."""
    cluster.built_job = cluster.run(
        "build.sbatch", DATASETS="synthetic", BUILD_ARGS="--count 120 --image-size 64"
    )
    return cluster.root / "data" / "synthetic"


def _tiny_config(path: Path, seed: int) -> Path:
    path.write_text(
        "dataset: synthetic\n"
        "data:\n  dir: $KERASFRAC_DATA/synthetic\n  image_size: 32\n"
        f"train:\n  epochs: 1\n  steps_per_epoch: 5\n  batch_size: 8\n  seed: {seed}\n"
    )
    return path


def _assert_finished(run_dir: Path, log: str) -> dict:
    for name in ("model.keras", "metrics.json", "config.yaml"):
        assert (run_dir / name).is_file(), f"{run_dir}/{name} missing\n{log[-3000:]}"
    state = run_dir / "checkpoints" / "state.json"
    if state.is_file():
        assert json.loads(state.read_text()).get("finished") is True, state.read_text()
    return yaml.safe_load((run_dir / "config.yaml").read_text())


# --- without Slurm: the scripts' shape -------------------------------------------------------


@pytest.mark.parametrize("script", [*SCRIPTS, SBATCH / "env.sh"], ids=lambda p: p.name)
def test_script_parses(script):
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_conventions(script):
    text = script.read_text()
    sbatch = re.findall(r"^#SBATCH (\S+)", text, flags=re.M)
    assert "set -euo pipefail" in text
    assert 'source "${KERASFRAC_REPO:-${SLURM_SUBMIT_DIR:-.}}/sbatch/env.sh"' in text
    assert any(o.startswith("--output=logs/%x_") for o in sbatch), sbatch
    assert "mkdir -p logs" in text  # the header says the log directory must exist
    for option in ("--cpus-per-task", "--mem", "--time"):
        assert any(o.startswith(option + "=") for o in sbatch), (option, sbatch)
    assert not any(o.startswith(("--account", "-A")) for o in sbatch), "account is site-specific"
    if script.name.startswith("train"):
        assert {"--requeue", "--open-mode=append"} <= set(sbatch)
        assert any(o.startswith("--gres=gpu:") for o in sbatch)
        assert "--auto-resume" in text


def test_env_without_configuration_says_what_to_set(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KERASFRAC_")}
    env["SCRATCH"] = str(tmp_path)
    out = subprocess.run(
        ["bash", str(SBATCH / "env.sh"), "true"], env=env, capture_output=True, text=True
    )
    assert out.returncode == 1
    assert "KERASFRAC_ENV is not set" in out.stderr
    for mode in ("singularity", "venv", "conda"):
        assert f"KERASFRAC_ENV={mode}" in out.stderr


def test_env_runs_command_in_venv(tmp_path):
    env = {**os.environ, "KERASFRAC_ENV": "venv", "KERASFRAC_VENV": _venv()}
    env["SCRATCH"] = str(tmp_path)
    probe = 'echo "$KERASFRAC_DATA|$(command -v python)"; exit 7'
    out = subprocess.run(
        ["bash", str(SBATCH / "env.sh"), "bash", "-c", probe],
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 7, out.stderr
    data, python = out.stdout.strip().split("|")
    assert data == f"{tmp_path}/kerasfrac/tfrecords"
    assert python == f"{_venv()}/bin/python"


# --- on Slurm -------------------------------------------------------------------------------


@pytest.mark.slow
@needs_slurm
def test_build_sbatch_builds_synthetic(cluster, synthetic):
    manifest = json.loads((synthetic / "manifest.json").read_text())
    splits = manifest["splits"]
    assert sum(n for split in splits.values() for n in split.values()) == 120, splits
    assert set(splits) == {"train", "val", "test"} and all(
        split["fractured"] > 0 and split["normal"] > 0 for split in splits.values()
    ), splits
    assert manifest["accounting"]["total"]["written"] == 120
    for split, shards in manifest["shards"].items():
        assert shards and all((synthetic / name).is_file() for name in shards), (split, shards)


@pytest.mark.slow
@needs_slurm
def test_train_sbatch_array_two_configs(cluster, synthetic, tmp_path):
    configs = [_tiny_config(tmp_path / f"tiny_{c}.yaml", seed) for c, seed in (("a", 1), ("b", 2))]
    job = cluster.run(
        "train.sbatch",
        "--array=0-1",
        CONFIGS=" ".join(map(str, configs)),
        TRAIN_SET="train.steps_per_epoch=3 train.batch_size=4",
    )
    log = cluster.log(job)
    for c in ("a", "b"):
        config = _assert_finished(cluster.root / "runs" / f"tiny_{c}", log)
        # both TRAIN_SET overrides reached `kerasfrac train`; the YAML's seed too
        assert (config["train"]["steps_per_epoch"], config["train"]["batch_size"]) == (3, 4)
        assert config["train"]["seed"] == (1 if c == "a" else 2)


@pytest.mark.slow
@needs_slurm
def test_bench_sbatch_writes_figures_per_config(cluster, synthetic, tmp_path):
    config = _tiny_config(tmp_path / "tiny_bench.yaml", 3)
    cluster.run(
        "bench.sbatch",
        CONFIGS=str(config),
        BENCH_ARGS="--what input,fit --steps 2 --repeats 1",
        BENCH_SET="train.epochs=2",
    )
    out = cluster.root / "runs" / "bench"
    result = json.loads((out / "tiny_bench.json").read_text())
    fit = result["fit"]
    assert fit["images_per_second"] > 0 and fit["epochs"] == 2  # BENCH_SET reached bench
    assert fit["epoch_images"] == 5 * 8  # the config's steps_per_epoch x batch_size
    assert fit["train_minutes"] > 0 and result["gpus"] == []  # a CPU-only test node
    table = (out / "tiny_bench.txt").read_text()
    assert "GPU: none" in table and "fit (input + train)" in table


def _job_fields(job_id: str) -> dict[str, str]:
    shown = subprocess.run(
        ["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True
    )
    return dict(f.split("=", 1) for f in shown.stdout.split() if "=" in f)


@pytest.mark.slow
@needs_slurm
def test_train_sbatch_sigterm_requeues_and_resumes(cluster, synthetic, tmp_path):
    """Preemption path: SIGTERM to the batch shell (what --signal=B:TERM sends before the time
    limit) -> kf_train forwards it -> training checkpoints mid-epoch and exits 75 -> the script
    requeues the task -> the restarted task (--auto-resume) finishes the same run dir."""
    config = tmp_path / "preempt.yaml"
    config.write_text(
        "dataset: synthetic\n"
        "data:\n  dir: $KERASFRAC_DATA/synthetic\n  image_size: 32\n"
        "train:\n  epochs: 2\n  steps_per_epoch: 150\n  batch_size: 8\n"
    )
    run_dir = cluster.root / "runs" / "preempt"
    state = run_dir / "checkpoints" / "state.json"
    job = cluster.submit("train.sbatch", "--array=0", CONFIGS=str(config))
    deadline = time.monotonic() + JOB_TIMEOUT_S
    # epoch 1 done (state.json exists from the start and names a checkpoint from epoch 1's end;
    # with no checkpoint_every_steps it is the first): the signal lands inside epoch 2
    while not (state.is_file() and json.loads(state.read_text()).get("checkpoint")):
        assert time.monotonic() < deadline, _log_tail(cluster.logs, job)
        job_state = _job_fields(job).get("JobState")
        assert job_state in {"PENDING", "RUNNING"}, f"{job_state}\n{_log_tail(cluster.logs, job)}"
        time.sleep(0.2)
    subprocess.run(["scancel", "--batch", "--signal=TERM", job], check=True)
    while (fields := _job_fields(job)).get("Restarts", "0") == "0" or fields[
        "JobState"
    ] != "PENDING":
        assert time.monotonic() < deadline, f"no requeue: {fields}\n{_log_tail(cluster.logs, job)}"
        time.sleep(0.5)
    # Slurm holds a requeued job for ~2 minutes (EligibleTime); start it in 10 s instead. Not
    # at once: slurmd refuses to relaunch a job id it killed moments ago ("Job N already
    # killed, do not launch batch job"), which failed this test now and then.
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now+10"], check=True)
    states = cluster.wait(job)
    log = cluster.log(job)
    assert states == {"0": ("COMPLETED", "0:0")}, f"{states}\n{_log_tail(cluster.logs, job)}"
    assert "requeueing job" in log and "(restart 1)" in log, log[-3000:]
    _assert_finished(run_dir, log)
    epochs = [line.split(",")[0] for line in (run_dir / "history.csv").read_text().split()[1:]]
    assert epochs == ["1", "2"], f"history not continuous: {epochs}"


@pytest.mark.slow
@needs_slurm
def test_train_multinode_two_tasks_identical_weights(cluster, synthetic, tmp_path):
    config = _tiny_config(tmp_path / "tiny_mw.yaml", seed=3)
    job = cluster.run(
        "train_multinode.sbatch",
        "--nodes=1",
        "--ntasks=2",
        "--ntasks-per-node=2",
        f"--output={cluster.logs}/%x_%j.out",
        CONFIG=str(config),
    )
    log = cluster.log(job)
    final = re.findall(r"final weights sha256: ([0-9a-f]{64}) \(task worker:(\d+)\)", log)
    digests = {task: digest for digest, task in final}
    assert set(digests) == {"0", "1"}, f"expected a line from each worker\n{log[-3000:]}"
    assert digests["0"] == digests["1"], f"workers ended with different weights: {digests}"
    run_dir = cluster.root / "runs" / "tiny_mw_multinode"
    config = _assert_finished(run_dir, log)
    assert config["train"]["distribute"] == "multi_worker"


@pytest.mark.slow
@needs_slurm
def test_tensorboard_sbatch_serves_runs(cluster):
    job = cluster.submit("tensorboard.sbatch", f"--output={cluster.logs}/%x_%j.out", TUNNEL="0")
    try:
        deadline = time.monotonic() + 90
        port = None
        while time.monotonic() < deadline and port is None:
            found = re.search(LAPTOP_SSH, cluster.log(job), re.M)
            port = found and int(found.group(1))
            time.sleep(1)
        assert port, f"no ssh command printed\n{_log_tail(cluster.logs, job)}"
        while True:
            try:
                with urllib.request.urlopen(f"http://localhost:{port}/", timeout=5) as reply:
                    assert reply.status == 200
                    break
            except OSError as error:
                if time.monotonic() > deadline:
                    tail = _log_tail(cluster.logs, job)
                    raise AssertionError(f"TensorBoard never answered on {port}\n{tail}") from error
                time.sleep(1)
    finally:
        subprocess.run(["scancel", job])
        cluster.wait(job, timeout_s=60)
