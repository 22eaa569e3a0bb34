"""Train a model from a config into a run directory, with one loop for every strategy.

Keras 3.15's ``model.fit`` fails under MultiWorkerMirroredStrategy (see DESIGN.md), so the
training step is a custom ``strategy.run`` + Keras optimizer ``apply`` loop that serves the
default, mirrored and multi-worker strategies alike, while the standard Keras callbacks
(progress bar, TensorBoard, CSVLogger, ModelCheckpoint, TerminateOnNaN) are driven through
``keras.callbacks.CallbackList``.

Run directory::

    config.yaml            the resolved configuration
    tensorboard/           scalars per epoch (train/ and validation/) + hyperparameters
    history.csv            one row per epoch: loss, accuracy, auroc, val_*
    checkpoints/last.keras model + optimizer state after the last finished epoch (resume)
    checkpoints/best.keras the epoch with the best validation AUROC
    checkpoints/state.json epochs done, best val AUROC, finished flag
    model.keras            the final model
    predictions.csv        test split: image_id, label, probability
    metrics.json           test split: accuracy, loss, auroc, counts, majority baseline

Weight decay: Keras 3's ``weight_decay`` is decoupled (AdamW-style: w -= lr * wd * w each
step) and applies to every trainable variable, BatchNorm's gamma/beta and all biases
included, unless ``train.exclude_from_weight_decay`` is set. The report's 0.2 with SGD at
lr 1e-4 shrinks weights by 2e-5 per step.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from sklearn.metrics import roc_auc_score

from kerasfrac import data, distribute, evaluate
from kerasfrac.config import Config
from kerasfrac.model import build_model


class RunDirError(ValueError):
    """A run directory that cannot be used as asked (finished, unfinished, not a run)."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


def _state_path(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "state.json"


def read_state(run_dir: Path) -> dict | None:
    path = _state_path(run_dir)
    return json.loads(path.read_text()) if path.is_file() else None


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> dict | None:
    """Check what ``run_dir`` holds against --resume/--overwrite; return the state to resume."""
    state = read_state(run_dir)
    looks_like_run = (run_dir / "config.yaml").is_file() or state is not None
    occupied = run_dir.is_dir() and any(run_dir.iterdir())
    if resume:
        if state is None or not (run_dir / "checkpoints" / "last.keras").is_file():
            raise RunDirError(
                f"--resume: {str(run_dir)!r} has no checkpoint to resume from "
                "(checkpoints/last.keras and checkpoints/state.json are written after each "
                "epoch); start it without --resume."
            )
        if state.get("finished"):
            raise RunDirError(
                f"--resume: the run in {str(run_dir)!r} already finished all its "
                f"{state['epoch']} epochs; raise train.epochs to continue it, or use --overwrite."
            )
        return state
    if occupied and not overwrite:
        what = (
            "a finished run"
            if state and state.get("finished")
            else "an unfinished run (continue it with --resume)"
            if looks_like_run
            else "files that are not a kerasfrac run"
        )
        raise RunDirError(
            f"run directory {str(run_dir)!r} already holds {what}; pass --overwrite to replace "
            "it or choose another --run-dir. Nothing was changed."
        )
    if occupied and overwrite:
        if not looks_like_run:
            raise RunDirError(
                f"refusing to --overwrite {str(run_dir)!r}: it is not a kerasfrac run "
                "directory (no config.yaml). Choose an empty or new --run-dir."
            )
        shutil.rmtree(run_dir)
    return None


def make_optimizer(cfg: Config, model: keras.Model) -> keras.optimizers.Optimizer:
    t = cfg.train
    wd = t.weight_decay or None
    if t.optimizer == "sgd":
        opt = keras.optimizers.SGD(t.learning_rate, momentum=t.momentum, weight_decay=wd)
    else:
        opt = keras.optimizers.Adam(t.learning_rate, weight_decay=wd)
    if wd and t.exclude_from_weight_decay:
        excluded = [
            v
            for layer in model.layers
            for v in layer.trainable_weights
            if isinstance(layer, keras.layers.BatchNormalization) or v.name == "bias"
        ]
        opt.exclude_from_weight_decay(var_list=excluded)
    if t.precision == "mixed_float16":
        opt = keras.optimizers.LossScaleOptimizer(opt)
    return opt


def _epoch_metrics(per_example_loss, probs, labels, prefix: str = "") -> dict:
    loss = np.concatenate(per_example_loss) if per_example_loss else np.array([np.nan])
    p, y = np.concatenate(probs), np.concatenate(labels).astype(int)
    auroc = float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan")
    return {
        f"{prefix}loss": float(np.mean(loss)),
        f"{prefix}accuracy": float(np.mean((p >= 0.5) == y)),
        f"{prefix}auroc": auroc,
    }


def _log_hparams(run_dir: Path, cfg: Config) -> None:
    from tensorboard.plugins.hparams import api as hp

    flat = {}
    for section, values in cfg.to_dict().items():
        if isinstance(values, dict):
            for k, v in values.items():
                flat[f"{section}.{k}"] = v if isinstance(v, int | float | str | bool) else str(v)
        else:
            flat[section] = values
    writer = tf.summary.create_file_writer(str(run_dir / "tensorboard" / "hparams"))
    with writer.as_default():
        hp.hparams(flat)
        tf.summary.text("config", "```\n" + json.dumps(cfg.to_dict(), indent=2) + "\n```", 0)
    writer.close()


def train(cfg: Config, resume: bool = False, overwrite: bool = False, verbose: int = 1) -> dict:
    """Train ``cfg`` into ``cfg.run_dir``; returns the test metrics (also in metrics.json)."""
    run_dir = Path(cfg.run_dir)
    t = cfg.train
    # Cheap checks first: the data and the run dir, before TensorFlow builds anything.
    manifest = data.check_build(cfg.data.dir, cfg.dataset, t.batch_size)
    state = prepare_run_dir(run_dir, resume, overwrite)

    keras.utils.set_random_seed(t.seed)
    if t.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_global_policy(t.precision)
    strategy = distribute.make_strategy(t.distribute)
    chief = distribute.is_chief(strategy)
    global_batch = t.batch_size * strategy.num_replicas_in_sync
    data.check_build(cfg.data.dir, cfg.dataset, global_batch)

    train_ds, steps = data.make_dataset(
        cfg.data.dir, "train", cfg.data, global_batch, t.seed, training=True, dataset=cfg.dataset
    )
    if steps is None:  # no oversampling: one pass over the (expanded) split per epoch
        n = sum(manifest["splits"]["train"].values())
        steps = math.ceil(n * (3 if cfg.data.flips == "expand" else 1) / global_batch)
        train_ds = train_ds.repeat()
    steps = t.steps_per_epoch or steps
    val_ds = data.make_eval_dataset(
        cfg.data.dir, "val", cfg.data, global_batch, dataset=cfg.dataset
    )

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    initial_epoch = 0
    with strategy.scope():
        if state is not None:
            model = keras.saving.load_model(run_dir / "checkpoints" / "last.keras")
            initial_epoch = int(state["epoch"])
        else:
            model = build_model(cfg.model, data.image_shape(cfg.data))
            model.compile(optimizer=make_optimizer(cfg, model), loss="binary_crossentropy")
    optimizer = model.optimizer
    if chief:
        cfg.save(run_dir / "config.yaml")
        if state is None:
            _log_hparams(run_dir, cfg)

    train_iter = iter(strategy.experimental_distribute_dataset(train_ds))
    dist_val = strategy.experimental_distribute_dataset(val_ds)

    def gathered(results):
        return tuple(strategy.gather(r, axis=0) for r in results)

    @tf.function
    def train_step(iterator):
        def step_fn(images, labels):
            with tf.GradientTape() as tape:
                probs = tf.cast(model(images, training=True), tf.float32)
                per_example = keras.losses.binary_crossentropy(tf.reshape(labels, [-1, 1]), probs)
                loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
                scaled = optimizer.scale_loss(loss)
            grads = tape.gradient(scaled, model.trainable_variables)
            optimizer.apply(grads, model.trainable_variables)
            return per_example, tf.reshape(probs, [-1]), labels

        return gathered(strategy.run(step_fn, args=next(iterator)))

    @tf.function
    def eval_step(images, labels):
        def step_fn(images, labels):
            probs = tf.cast(model(images, training=False), tf.float32)
            per_example = keras.losses.binary_crossentropy(tf.reshape(labels, [-1, 1]), probs)
            return per_example, tf.reshape(probs, [-1]), labels

        return gathered(strategy.run(step_fn, args=(images, labels)))

    cbs: list[keras.callbacks.Callback] = [keras.callbacks.TerminateOnNaN()]
    best = None
    if chief:
        best = keras.callbacks.ModelCheckpoint(
            run_dir / "checkpoints" / "best.keras", monitor="val_auroc", mode="max",
            save_best_only=True,
        )  # fmt: skip
        if state is not None and state.get("best_val_auroc") is not None:
            best.best = state["best_val_auroc"]
        cbs += [
            keras.callbacks.TensorBoard(run_dir / "tensorboard", write_graph=False),
            keras.callbacks.CSVLogger(run_dir / "history.csv", append=state is not None),
            best,
        ]
    callbacks = keras.callbacks.CallbackList(
        cbs, add_history=True, add_progbar=verbose > 0 and chief, model=model,
        verbose=verbose, epochs=t.epochs, steps=steps,
    )  # fmt: skip

    model.stop_training = False
    callbacks.on_train_begin()
    logs: dict = {}
    for epoch in range(initial_epoch, t.epochs):
        callbacks.on_epoch_begin(epoch)
        started = time.perf_counter()
        losses, probs, labels = [], [], []
        for step in range(steps):
            callbacks.on_train_batch_begin(step)
            per_example, p, y = (r.numpy() for r in train_step(train_iter))
            losses.append(per_example)
            probs.append(p)
            labels.append(y)
            callbacks.on_train_batch_end(step, {"loss": float(np.mean(per_example))})
            if model.stop_training:
                break
        if model.stop_training:  # TerminateOnNaN: keep the last good checkpoint untouched
            raise TrainingDiverged(
                f"loss became NaN/inf in epoch {epoch + 1}, step {step + 1}; training stopped. "
                f"The last good checkpoint (epoch {epoch}) is in {run_dir / 'checkpoints'}. "
                "Lower train.learning_rate or check the data."
            )
        logs = _epoch_metrics(losses, probs, labels)
        val = [[], [], []]
        for images, y in dist_val:
            for acc, r in zip(val, eval_step(images, y)):
                acc.append(r.numpy())
        logs.update(_epoch_metrics(*val, prefix="val_"))
        logs["images_per_second"] = sum(len(y) for y in labels) / (time.perf_counter() - started)
        callbacks.on_epoch_end(epoch, logs)
        if chief:
            model.save(run_dir / "checkpoints" / "last.keras")
            _write_state(run_dir, epoch + 1, best, finished=False)
    callbacks.on_train_end(logs)

    result = {}
    if chief:
        model.save(run_dir / "model.keras")
        test_ds = data.make_eval_dataset(
            cfg.data.dir, "test", cfg.data, global_batch, with_ids=True, dataset=cfg.dataset
        )
        ids, y, p = evaluate.predict(model, test_ds)
        evaluate.write_predictions(run_dir / "predictions.csv", ids, y, p)
        result = {"split": "test", **evaluate.metrics(y, p)}
        (run_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
        _write_state(run_dir, t.epochs, best, finished=True)
    return result


def _write_state(run_dir: Path, epoch: int, best, finished: bool) -> None:
    value = None if best is None or not np.isfinite(best.best) else float(best.best)
    state = {"epoch": epoch, "best_val_auroc": value, "finished": finished}
    path = _state_path(run_dir)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state) + "\n")
    tmp.replace(path)  # atomic: a preempted write never leaves a half state file
