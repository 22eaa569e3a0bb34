"""Choose the tf.distribute strategy a run trains under.

``train.distribute``: ``none`` -> the default (one-device) strategy; ``mirrored`` -> all local
GPUs; ``multi_worker`` -> MultiWorkerMirroredStrategy (cluster from TF_CONFIG, or from Slurm's
srun layout via SlurmClusterResolver); ``auto`` -> multi-worker under srun with more than one
task, mirrored with more than one local GPU, else the default strategy.
The training loop (kerasfrac.training.train) is one custom loop that serves all of them.
"""

from __future__ import annotations

import json
import os
import shutil

import tensorflow as tf


def slurm_tasks() -> int:
    """Number of tasks of the current srun step (1 outside Slurm)."""
    for var in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"):
        if os.environ.get(var, "").isdigit() and os.environ.get("SLURM_PROCID") is not None:
            return int(os.environ[var])
    return 1


def choose(mode: str) -> str:
    """Resolve ``auto`` to a concrete mode."""
    if mode != "auto":
        return mode
    if (
        slurm_tasks() > 1
        or len(json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {}).get("worker", []))
        > 1
    ):
        return "multi_worker"
    if len(tf.config.list_physical_devices("GPU")) > 1:
        return "mirrored"
    return "none"


def make_strategy(mode: str) -> tf.distribute.Strategy:
    mode = choose(mode)
    if mode == "none":
        return tf.distribute.get_strategy()
    if mode == "mirrored":
        return tf.distribute.MirroredStrategy()
    if mode == "multi_worker":
        resolver = None
        if "TF_CONFIG" not in os.environ and slurm_tasks() > 1:
            resolver = slurm_resolver()
        return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
    raise ValueError(f"train.distribute={mode!r}: expected auto|none|mirrored|multi_worker")


def slurm_resolver() -> tf.distribute.cluster_resolver.SlurmClusterResolver:
    """TF's SlurmClusterResolver, also on nodes without GPUs.

    TF pairs every task with GPUs it counts by running nvidia-smi: without it the resolver
    raises (FileNotFoundError), and with zero GPUs it lists no task at all. On a CPU-only node,
    give it one nominal GPU per task and leave CUDA_VISIBLE_DEVICES alone.
    """
    if shutil.which("nvidia-smi"):
        return tf.distribute.cluster_resolver.SlurmClusterResolver()
    per_node = os.environ.get("SLURM_STEP_TASKS_PER_NODE", "1")  # e.g. "2" or "2(x3),1"
    tasks = max(int(part.split("(")[0]) for part in per_node.split(","))
    return tf.distribute.cluster_resolver.SlurmClusterResolver(
        gpus_per_node=tasks, gpus_per_task=1, auto_set_gpu=False
    )


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Only the chief writes checkpoints, TensorBoard logs and metrics."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type in (None, "chief") or (task_type == "worker" and task_id == 0)


def is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
    """Whether ``strategy`` spans a cluster of workers (TF_CONFIG or Slurm), not one process."""
    resolver = getattr(strategy, "cluster_resolver", None)
    return resolver is not None and bool(resolver.cluster_spec().as_dict())


def task_name(strategy: tf.distribute.Strategy) -> str:
    """'worker:1' under a cluster, 'worker:0' alone (printed beside each worker's results)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return "worker:0"
    return f"{resolver.task_type}:{resolver.task_id}"
