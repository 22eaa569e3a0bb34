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
    checkpoints/state.json epochs/steps done, best val AUROC, finished flag, and the name of
                           the committed checkpoint (replacing it is the commit: checkpoint.py)
    checkpoints/gen-NNNNNN/ that checkpoint: model.keras (+ optimizer state), partial_epoch.npz
                           (mid-epoch), copies of history.csv and best.keras as they stood
    checkpoints/best.keras the epoch with the best validation AUROC
    model.keras            the final model
    predictions.csv        test split: image_id, label, probability
    metrics.json           test split: accuracy, loss, auroc, counts, majority baseline

Weight decay: Keras 3's ``weight_decay`` is decoupled (AdamW-style: w -= lr * wd * w each
step) and applies to every trainable variable, BatchNorm's gamma/beta and all biases
included, unless ``train.exclude_from_weight_decay`` is set. The report's 0.2 with SGD at
lr 1e-4 shrinks weights by 2e-5 per step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import signal
import threading
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from sklearn.metrics import roc_auc_score

from kerasfrac import checkpoint as ckpt
from kerasfrac import console, data, distribute, evaluate, kernels
from kerasfrac.checkpoint import RunDirError, has_unfinished_run, prepare_run_dir
from kerasfrac.config import Config
from kerasfrac.model import (
    build_model,
    classifier,
    has_box_head,
    load_model,
    predict_probs,
    uses_fused_batchnorm,
)


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


def learning_rate(cfg: Config, steps_per_epoch: int):
    """``train.learning_rate``, or the cosine schedule with linear warm-up over the run."""
    t = cfg.train
    if t.schedule == "constant":
        return t.learning_rate
    total = max(1, t.epochs * steps_per_epoch)
    warmup = min(int(round(t.warmup_epochs * steps_per_epoch)), total - 1)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=t.learning_rate / 100.0 if warmup else t.learning_rate,
        decay_steps=total - warmup,
        warmup_target=t.learning_rate if warmup else None,
        warmup_steps=warmup,
    )


def make_optimizer(
    cfg: Config, model: keras.Model, steps_per_epoch: int = 1
) -> keras.optimizers.Optimizer:
    t = cfg.train
    wd = t.weight_decay or None
    lr = learning_rate(cfg, steps_per_epoch)
    if t.optimizer == "sgd":
        opt = keras.optimizers.SGD(lr, momentum=t.momentum, weight_decay=wd)
    elif t.optimizer == "adamw":
        opt = keras.optimizers.AdamW(lr, weight_decay=t.weight_decay)
    else:
        opt = keras.optimizers.Adam(lr, weight_decay=wd)
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


def class_weights(cfg: Config, manifest: dict) -> tuple[float, float] | None:
    """(normal, fractured) loss weights n / (2 n_class) of the train split, or None."""
    if cfg.train.class_weight == "none":
        return None
    counts = data.class_counts(manifest, "train")
    if not (counts[0] and counts[1]):
        raise data.BuildOutputError(
            f"train.class_weight=balanced needs both classes in the train split; it has "
            f"{counts[1]} fractured and {counts[0]} normal images. Rebuild the TFRecords with "
            "both classes or set train.class_weight=none"
        )
    n = sum(counts.values())
    return (n / (2.0 * counts[0]), n / (2.0 * counts[1]))


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


class Preempted(RuntimeError):
    """SIGTERM arrived (Slurm preemption or time limit): a checkpoint was saved first."""

    exit_code = 75  # EX_TEMPFAIL: try again (requeue + --auto-resume continues)


class _SigtermFlag:
    """Turn SIGTERM into a flag that the loop checks after each step (main thread only)."""

    def __init__(self) -> None:
        self.raised = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.raised = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def weights_digest(model: keras.Model) -> str:
    """sha256 over all weights: equal digests = bit-identical models (workers in sync)."""
    h = hashlib.sha256()
    for w in model.get_weights():
        h.update(np.ascontiguousarray(w).tobytes())
    return h.hexdigest()


def make_train_step(
    model: keras.Model,
    strategy: tf.distribute.Strategy,
    global_batch: int,
    *,
    label_smoothing: float = 0.0,
    weights: tuple[float, float] | None = None,
    box_loss_weight: float = 0.0,
):
    """The one training step for every strategy: ``step(iterator, stop_flag)`` runs a global
    batch through ``strategy.run`` (forward, loss, gradients, the compiled Keras optimizer's
    ``apply``) and returns per-example losses, probabilities, labels and the stop flags of
    all replicas, gathered. ``kerasfrac bench`` times this same function.

    The per-example loss is the binary cross-entropy against the (``label_smoothing``)
    smoothed label, times the class weight (``weights`` = (normal, fractured)), plus, for a
    model with a box head fed batches of ``(image, label, box_mask, box_weight)``,
    ``box_loss_weight`` x box_weight x the mean pixel BCE between the heat map and the
    cells of the heat-map grid that a fracture box touches.
    """
    optimizer = model.optimizer
    box_head = has_box_head(model)

    @tf.function
    def train_step(iterator, stop_flag):
        def step_fn(images, labels, masks=None, box_weights=None):
            with tf.GradientTape() as tape:
                outputs = model(images, training=True)
                probs = tf.cast(outputs[0] if box_head else outputs, tf.float32)
                y = tf.reshape(labels, [-1, 1])
                if label_smoothing:
                    y = y * (1.0 - label_smoothing) + 0.5 * label_smoothing
                per_example = keras.losses.binary_crossentropy(y, probs)
                if weights is not None:
                    per_example *= tf.where(labels > 0.5, weights[1], weights[0])
                if box_head and masks is not None:
                    heat = tf.cast(outputs[1], tf.float32)
                    cells = tf.image.resize(masks, heat.shape[1:3], "area") > 0.0
                    pixel = keras.losses.binary_crossentropy(tf.cast(cells, tf.float32), heat)
                    per_example += box_loss_weight * box_weights * tf.reduce_mean(pixel, [1, 2])
                loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
                scaled = optimizer.scale_loss(loss)
            grads = tape.gradient(scaled, model.trainable_variables)
            optimizer.apply(grads, model.trainable_variables)
            # Every replica reports whether its worker got SIGTERM, so all stop together.
            return per_example, tf.reshape(probs, [-1]), labels, tf.reshape(stop_flag, [1])

        results = strategy.run(step_fn, args=next(iterator))
        return tuple(strategy.gather(r, axis=0) for r in results)

    return train_step


def _restore_early_stopping(stopper, run_dir: Path) -> None:
    """Best val AUROC and epochs without improvement so far, from history.csv (resume)."""
    path = run_dir / "history.csv"
    if stopper is None or not path.is_file():
        return
    import csv

    with path.open(newline="") as f:
        values = [float(row["val_auroc"]) for row in csv.DictReader(f) if row.get("val_auroc")]
    values = [v for v in values if math.isfinite(v)]
    if values:
        best = int(np.argmax(values))
        stopper.best, stopper.best_epoch, stopper.wait = values[best], best, len(values) - 1 - best


def _print_kernels(model: keras.Model, fast: bool) -> None:
    """Which BatchNorm and CPU kernels this run got (``train.fast``), and why not if not."""
    fused = uses_fused_batchnorm(model)
    onednn = kernels.onednn_enabled()
    onednn_text = {True: "on", False: "off", None: "unknown"}[onednn]
    print(f"kernels: {'fused' if fused else 'Keras'} BatchNorm, oneDNN {onednn_text}", flush=True)
    if fast and onednn is False:
        print(
            f"note: train.fast asks for oneDNN CPU kernels, but this process imported "
            f"TensorFlow without them; set {kernels.ENV}=1 before importing TensorFlow "
            "(the kerasfrac command does) for about 1.8x on CPUs without AVX-512.",
            flush=True,
        )


def train(
    cfg: Config,
    resume: bool = False,
    overwrite: bool = False,
    verbose: int = 1,
    auto_resume: bool = False,
) -> dict:
    """Train ``cfg`` into ``cfg.run_dir``; returns the test metrics (also in metrics.json).

    ``resume`` continues an unfinished run (error if there is none); ``auto_resume`` continues
    one if there is one and starts fresh otherwise (for requeued Slurm jobs). On SIGTERM the
    loop saves a checkpoint after the current step and raises ``Preempted``.
    """
    run_dir = Path(cfg.run_dir)
    t = cfg.train
    # Cheap checks first: the data, before TensorFlow builds anything.
    manifest = data.check_build(cfg.data.dir, cfg.dataset, t.batch_size, needs_val=True)
    # The strategy next: MultiWorkerMirroredStrategy must exist before other TF ops run.
    strategy = distribute.make_strategy(t.distribute)
    chief = distribute.is_chief(strategy)
    task = distribute.task_name(strategy)
    if auto_resume:
        done = ckpt.finished_metrics(run_dir, t.epochs)
        if done is not None:  # e.g. a job requeued after its run finished: nothing to do
            print(f"{run_dir}: this run already finished its {t.epochs} epochs.", flush=True)
            return done
        resume = has_unfinished_run(run_dir)
    if chief:
        state = prepare_run_dir(run_dir, resume, overwrite, protect=[cfg.data.dir])
    else:  # workers only read: the chief owns the run directory
        state = ckpt.resumable_state(run_dir) if resume else None
    global_batch = t.batch_size * strategy.num_replicas_in_sync
    if global_batch != t.batch_size:  # several replicas: the global batch must fit too
        data.check_build(cfg.data.dir, cfg.dataset, global_batch)

    keras.utils.set_random_seed(t.seed)
    if t.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_global_policy(t.precision)

    train_ds, steps = data.make_dataset(
        cfg.data.dir, "train", cfg.data, global_batch, t.seed, training=True,
        dataset=cfg.dataset, with_boxes=cfg.model.box_head,
    )  # fmt: skip
    if steps is None:  # no oversampling: one pass over the (expanded) split per epoch
        steps = math.ceil(data.epoch_images(manifest, cfg.data) / global_batch)
        train_ds = train_ds.repeat()
    steps = t.steps_per_epoch or steps
    val_ds = data.make_eval_dataset(
        cfg.data.dir, "val", cfg.data, global_batch, dataset=cfg.dataset
    )

    initial_epoch, initial_step, partial = 0, 0, None
    if chief:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    with strategy.scope():
        if state is not None:
            if state.get("steps_per_epoch", steps) != steps:
                raise RunDirError(
                    f"--resume: the run in {str(run_dir)!r} has {state['steps_per_epoch']} "
                    f"steps per epoch, this config {steps}; resume with the run's own config."
                )
            model, partial = ckpt.load(run_dir, state)
            initial_epoch, initial_step = int(state["epoch"]), int(state.get("step", 0))
        else:
            # Synchronized BatchNorm only where there is something to synchronise: on one
            # replica Keras' sync path still computes a ones-tensor the size of each input.
            sync = cfg.model.sync_batchnorm and strategy.num_replicas_in_sync > 1
            model_cfg = dataclasses.replace(cfg.model, sync_batchnorm=sync)
            # train.fast: TensorFlow's fused BatchNorm kernel (paper_cnn keeps Keras' layer
            # where statistics are synchronised).
            model = build_model(model_cfg, data.image_shape(cfg.data), fused_batchnorm=t.fast)
            model.compile(optimizer=make_optimizer(cfg, model, steps), loss="binary_crossentropy")
    if chief:
        if state is None:  # state.json first: from here on a kill leaves a resumable run
            ckpt.begin(run_dir)
        cfg.save(run_dir / "config.yaml")
        if state is None:
            _log_hparams(run_dir, cfg)
        _print_kernels(model, t.fast)

    # The training stream is a pure function of the seed: a resumed run skips the batches
    # the interrupted one consumed and then sees exactly the batches it would have seen.
    # DATA sharding: every worker reads the (cached) stream and keeps its share of each
    # global batch; file sharding could leave a worker without one class in a small split.
    done = initial_epoch * steps + initial_step
    train_ds = train_ds.skip(done) if done else train_ds
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    train_iter = iter(strategy.experimental_distribute_dataset(train_ds.with_options(options)))

    train_step = make_train_step(
        model, strategy, global_batch, label_smoothing=t.label_smoothing,
        weights=class_weights(cfg, manifest), box_loss_weight=t.box_loss_weight,
    )  # fmt: skip
    scorer = classifier(model)

    @tf.function
    def eval_step(images):
        # Evaluation runs locally on every worker over the whole split (no collectives, so
        # uneven last batches cannot deadlock workers); it is small next to training.
        return predict_probs(scorer, images, cfg.eval.tta)

    cbs: list[keras.callbacks.Callback] = [keras.callbacks.TerminateOnNaN()]
    best = None
    best_path = run_dir / "checkpoints" / "best.keras"
    if chief:
        best = keras.callbacks.ModelCheckpoint(
            best_path, monitor="val_auroc", mode="max", save_best_only=True
        )
        if state is not None and state.get("best_val_auroc") is not None:
            best.best = state["best_val_auroc"]
        cbs += [
            keras.callbacks.TensorBoard(run_dir / "tensorboard", write_graph=False),
            keras.callbacks.CSVLogger(run_dir / "history.csv", append=state is not None),
            best,
        ]
    stopper = None
    if t.early_stopping_patience:
        # val AUROC only (the test split is never looked at before training ends).
        stopper = keras.callbacks.EarlyStopping(
            monitor="val_auroc", mode="max", patience=t.early_stopping_patience
        )
        cbs.append(stopper)
    if verbose > 0 and chief:  # a bar on a terminal, one line per epoch in a log file
        cbs.append(console.progress_callback(t.epochs, steps))
    callbacks = keras.callbacks.CallbackList(
        cbs, add_history=True, add_progbar=False, model=model,
        verbose=verbose, epochs=t.epochs, steps=steps,
    )  # fmt: skip

    def checkpoint(epoch: int, step: int, accum=None) -> None:
        if chief:
            ckpt.save(run_dir, model, epoch, step, steps, best, accum)

    model.stop_training = False
    callbacks.on_train_begin()
    if state is not None:
        _restore_early_stopping(stopper, run_dir)
    logs: dict = {}
    epochs_done = initial_epoch
    with _SigtermFlag() as sigterm:
        for epoch in range(initial_epoch, t.epochs):
            if stopper is not None and stopper.wait >= stopper.patience:
                break  # stopped early before an interruption: nothing left to train
            callbacks.on_epoch_begin(epoch)
            started = time.perf_counter()
            accum = partial if (partial is not None and epoch == initial_epoch) else ([], [], [])
            first = initial_step if epoch == initial_epoch else 0
            seen = 0
            for step in range(first, steps):
                callbacks.on_train_batch_begin(step)
                flag = tf.constant(1 if sigterm.raised else 0, tf.int32)
                per_example, p, y, stop = (r.numpy() for r in train_step(train_iter, flag))
                for acc, r in zip(accum, (per_example, p, y)):
                    acc.append(r)
                seen += len(y)
                callbacks.on_train_batch_end(
                    step, {"loss": float(np.mean(per_example)), "size": len(per_example)}
                )
                if model.stop_training:  # TerminateOnNaN: the last good checkpoint stays
                    raise TrainingDiverged(
                        f"loss became NaN/inf in epoch {epoch + 1}, step {step + 1}; training "
                        f"stopped. The last good checkpoint is in {run_dir / 'checkpoints'}. "
                        "Lower train.learning_rate or check the data."
                    )
                if stop.any():
                    checkpoint(epoch, step + 1, accum)
                    raise Preempted(
                        f"SIGTERM received: stopped after epoch {epoch + 1}, step {step + 1} "
                        f"and saved a checkpoint in {run_dir / 'checkpoints'}; continue with "
                        "--resume (or --auto-resume)."
                    )
                every = t.checkpoint_every_steps
                if every and (epoch * steps + step + 1) % every == 0 and step + 1 < steps:
                    checkpoint(epoch, step + 1, accum)
            logs = _epoch_metrics(*accum)
            val = [[], [], []]
            for images, y in val_ds:
                probs = eval_step(images).numpy()
                val[0].append(evaluate.bce_per_example(y.numpy(), probs))
                val[1].append(probs)
                val[2].append(y.numpy())
            logs.update(_epoch_metrics(*val, prefix="val_"))
            logs["images_per_second"] = seen / (time.perf_counter() - started)
            callbacks.on_epoch_end(epoch, logs)
            checkpoint(epoch + 1, 0)
            epochs_done = epoch + 1
            if model.stop_training:  # EarlyStopping: val AUROC stopped improving
                print(f"early stopping after epoch {epoch + 1}: val AUROC best at epoch "
                      f"{stopper.best_epoch + 1} ({stopper.best:.4f})", flush=True)  # fmt: skip
                break
    callbacks.on_train_end(logs)

    digest = weights_digest(model)
    print(f"final weights sha256: {digest} (task {task})", flush=True)
    result = {}
    if chief:
        final = scorer
        if t.select == "best" and best_path.is_file():
            # The epoch with the best val AUROC (chosen on val, before test is looked at).
            final = classifier(load_model(best_path))
            print(f"model.keras = the best epoch on val AUROC ({best_path})", flush=True)
        ckpt.save_model(final, run_dir / "model.keras")
        ckpt.crash_point("model.keras")
        test_ds = data.make_eval_dataset(
            cfg.data.dir, "test", cfg.data, global_batch, with_ids=True, dataset=cfg.dataset
        )
        ids, y, p = evaluate.predict(final, test_ds, cfg.eval.tta)
        evaluate.write_predictions(run_dir / "predictions.csv", ids, y, p)
        result = {"split": "test", "epochs": epochs_done, **evaluate.metrics(y, p)}
        ckpt.write_text(run_dir / "metrics.json", json.dumps(result, indent=2) + "\n")
        ckpt.crash_point("metrics.json")
        ckpt.write_state(
            run_dir, epochs_done, 0, steps, best, finished=True, digest=digest,
            stopped_early=epochs_done < t.epochs,
        )  # fmt: skip
    return result
