"""Train a model from a config into a run directory, with one loop for every strategy.

Keras 3.15's ``model.fit`` fails under MultiWorkerMirroredStrategy ("Attempt to convert a
value (PerReplica...)" with two workers), so the training step is a custom ``strategy.run``
+ Keras optimizer ``apply`` loop that serves the default, mirrored and multi-worker
strategies alike (``TrainingTask``), while the standard Keras callbacks
(progress bar, TensorBoard, CSVLogger, ModelCheckpoint, TerminateOnNaN) are driven through
``keras.callbacks.CallbackList``.

The run directory's layout is in ``kerasfrac.runs``.

Weight decay: Keras 3's ``weight_decay`` is decoupled (AdamW-style: w -= lr * wd * w each
step) and applies to every trainable variable, BatchNorm's gamma/beta and all biases
included, unless ``train.exclude_from_weight_decay`` is set. The report's 0.2 with SGD at
lr 1e-4 shrinks weights by 2e-5 per step.
"""

from __future__ import annotations

import contextlib
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

from kerasfrac import console, data, runs
from kerasfrac.config import Config
from kerasfrac.data import augment
from kerasfrac.evaluation.evaluate import end_of_training_metrics
from kerasfrac.evaluation.metrics import bce_per_example, epoch_metrics
from kerasfrac.models import (
    BOX_HEATMAP,
    META_LOGITS,
    box_model,
    build_model,
    classifier,
    float32_compute,
    has_box_head,
    has_meta_head,
    load_model,
    output_index,
    plain_keras,
    predict_probs,
    uses_fused_batchnorm,
)
from kerasfrac.training import checkpoint as ckpt
from kerasfrac.training import distribute, kernels
from kerasfrac.training.checkpoint import RunDirError, has_unfinished_run, prepare_run_dir
from tfrecords_builder.metadata import targets as meta_targets


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
    # train.ema_momentum: Keras' own weight averaging (the optimizer keeps the average).
    ema = {"use_ema": True, "ema_momentum": t.ema_momentum} if t.ema_momentum else {}
    if t.optimizer == "sgd":
        opt = keras.optimizers.SGD(lr, momentum=t.momentum, weight_decay=wd, **ema)
    elif t.optimizer == "adamw":
        opt = keras.optimizers.AdamW(lr, weight_decay=t.weight_decay, **ema)
    else:
        opt = keras.optimizers.Adam(lr, weight_decay=wd, **ema)
    if wd and t.exclude_from_weight_decay:
        excluded = [
            v
            for layer in model.layers
            for v in layer.trainable_weights
            if isinstance(layer, keras.layers.BatchNormalization) or v.name == "bias"
        ]
        opt.exclude_from_weight_decay(var_list=excluded)
    if model.dtype_policy.name == "mixed_float16":  # built under train.precision's policy
        opt = keras.optimizers.LossScaleOptimizer(opt)
    return opt


def class_weights(cfg: Config, build: data.Build) -> tuple[float, float] | None:
    """(normal, fractured) loss weights n / (2 n_class) of the train split, or None."""
    if cfg.train.class_weight == "none":
        return None
    counts = build.counts("train")
    if not (counts[0] and counts[1]):
        raise data.BuildOutputError(
            f"train.class_weight=balanced needs both classes in the train split; it has "
            f"{counts[1]} fractured and {counts[0]} normal images. Rebuild the TFRecords with "
            "both classes or set train.class_weight=none"
        )
    n = sum(counts.values())
    return (n / (2.0 * counts[0]), n / (2.0 * counts[1]))


def _log_hparams(run_dir: Path, cfg: Config) -> None:
    from tensorboard.plugins.hparams import api as hp

    flat = {}
    for section, values in cfg.to_dict().items():
        if isinstance(values, dict):
            for k, v in values.items():
                flat[f"{section}.{k}"] = v if isinstance(v, int | float | str | bool) else str(v)
        else:
            flat[section] = values
    writer = tf.summary.create_file_writer(str(runs.tensorboard_dir(run_dir, "hparams")))
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


def step_options(t) -> dict:
    """The keyword arguments of ``make_train_step`` for its per-batch augmentations, from the
    ``train`` config section (``loss_options`` has the losses'): one place each, so that
    training and ``kerasfrac bench`` run the same step."""
    return {
        "mixup_alpha": t.mixup,
        "box_paste_rate": t.box_paste,
        "fracture_fill_rate": t.fracture_fill,
        "seed": t.seed,
    }


def loss_options(t) -> dict:
    """The ``Losses`` settings from the ``train`` config section (class weights aside, which
    need the build)."""
    return {
        "label_smoothing": t.label_smoothing,
        "box_loss_weight": t.box_loss_weight,
        "box_loss": t.box_loss,
        "meta_loss_weight": t.meta_loss_weight,
    }


def soft_dice_loss(cells, heat) -> tf.Tensor:
    """Per image, the soft Dice loss 1 - (2 sum(p g) + 1) / (sum(p) + sum(g) + 1) between the
    heat map ``heat`` (probabilities, [B, H, W, 1]) and its target ``cells`` (0/1) (Milletari
    et al. 2016, smoothed by 1): 0 where the map equals the target, near 1 where it misses it.
    Counted only on images with target cells (a normal image's empty target has no overlap
    to score; the BCE term covers it): 0 for the others."""
    cells = tf.cast(cells, tf.float32)
    heat = tf.cast(heat, tf.float32)
    overlap = tf.reduce_sum(cells * heat, [1, 2, 3])
    target = tf.reduce_sum(cells, [1, 2, 3])
    dice = 1.0 - (2.0 * overlap + 1.0) / (tf.reduce_sum(heat, [1, 2, 3]) + target + 1.0)
    return tf.where(target > 0.0, dice, 0.0)


def meta_loss(targets, logits) -> tf.Tensor:
    """Per image, the mean sigmoid BCE between metadata ``logits`` and ``targets`` ([B, K],
    0/1, or blended by mixup) over its known columns (targets < 0 are unknown and count
    nothing); 0 for an image with none known."""
    targets = tf.cast(targets, tf.float32)
    known = tf.cast(targets >= 0.0, tf.float32)
    bce = tf.nn.sigmoid_cross_entropy_with_logits(
        labels=tf.maximum(targets, 0.0), logits=tf.cast(logits, tf.float32)
    )
    return tf.reduce_sum(bce * known, -1) / tf.maximum(tf.reduce_sum(known, -1), 1.0)


@dataclasses.dataclass(frozen=True)
class Losses:
    """The per-example training loss of a model with its heads (``TrainingTask.build_losses``).

    The binary cross-entropy of ``prob`` against the (``label_smoothing``) smoothed label, times
    the class weight (``weights`` = (normal, fractured)); for a model with a box head fed
    ``box_mask``/``box_weight``, plus ``box_loss_weight`` x box_weight x the mean BCE between
    the heat map and its cells that a fracture box touches (``box_cells``), plus with
    ``box_loss="bce_dice"`` the soft Dice loss (``soft_dice_loss``) on images with such cells;
    for a model with a metadata head fed ``meta``, plus ``meta_loss_weight`` x ``meta_loss``.
    """

    box_out: int | None = None
    meta_out: int | None = None
    label_smoothing: float = 0.0
    weights: tuple[float, float] | None = None
    box_loss_weight: float = 0.0
    meta_loss_weight: float = 0.0
    box_grid: tuple[int, int] | None = None
    box_loss: str = "bce"

    @classmethod
    def for_model(cls, model: keras.Model, **options) -> Losses:
        box_out = output_index(model, BOX_HEATMAP) if has_box_head(model) else None
        meta_out = output_index(model, META_LOGITS) if has_meta_head(model) else None
        grid = tuple(model.outputs[box_out].shape[1:3]) if box_out is not None else None
        return cls(box_out, meta_out, box_grid=grid, **options)

    def targets(self, batch: dict) -> dict:
        """``batch`` plus what the losses compare against: ``y`` (the label, [B, 1] float32)
        and, for a box head fed masks, ``box_cells`` (heat-map cells a box touches)."""
        out = {**batch, "y": tf.reshape(tf.cast(batch["label"], tf.float32), [-1, 1])}
        if self.box_out is not None and batch.get("box_mask") is not None:
            resized = tf.image.resize(batch["box_mask"], self.box_grid, "area")
            out["box_cells"] = tf.cast(resized > 0.0, tf.float32)
            out["box_weight"] = tf.cast(batch["box_weight"], tf.float32)
        return out

    def __call__(self, batch: dict, outputs) -> tuple[tf.Tensor, tf.Tensor]:
        """``(per-example loss [B], probabilities [B, 1])`` of the model's ``outputs``."""
        several = self.box_out is not None or self.meta_out is not None
        probs = tf.cast(outputs[0] if several else outputs, tf.float32)
        target = batch["y"]
        if self.label_smoothing:
            target = target * (1.0 - self.label_smoothing) + 0.5 * self.label_smoothing
        per_example = keras.losses.binary_crossentropy(target, probs)
        if self.weights is not None:
            normal, fractured = self.weights
            per_example *= tf.where(batch["label"] > 0.5, fractured, normal)
        if batch.get("box_cells") is not None:
            heat = tf.cast(outputs[self.box_out], tf.float32)
            pixel = keras.losses.binary_crossentropy(batch["box_cells"], heat)
            box_loss = tf.reduce_mean(pixel, [1, 2])
            if self.box_loss == "bce_dice":
                box_loss += soft_dice_loss(batch["box_cells"], heat)
            box_loss = batch["box_weight"] * box_loss
            per_example += self.box_loss_weight * box_loss
        if self.meta_out is not None and batch.get("meta") is not None:
            per_example += self.meta_loss_weight * meta_loss(batch["meta"], outputs[self.meta_out])
        return per_example, probs


def make_train_step(
    model: keras.Model,
    strategy: tf.distribute.Strategy,
    global_batch: int,
    *,
    label_smoothing: float = 0.0,
    weights: tuple[float, float] | None = None,
    box_loss_weight: float = 0.0,
    box_loss: str = "bce",
    meta_loss_weight: float = 0.0,
    mixup_alpha: float = 0.0,
    box_paste_rate: float = 0.0,
    fracture_fill_rate: float = 0.0,
    seed: int = 0,
    losses: Losses | None = None,
):
    """The one training step for every strategy: ``step(iterator, stop_flag)`` runs a global
    batch (a dict, ``data.make_dataset``'s) through ``strategy.run`` (batch augmentation,
    forward, ``Losses``, gradients, the compiled Keras optimizer's ``apply``) and returns
    per-example losses, probabilities, labels and the stop flags of all replicas, gathered.
    ``kerasfrac bench`` times this same function.

    The per-batch augmentations (``data.augment.BATCH_OPS``) draw from ``seed``, the
    optimizer's step count and the replica: ``box_paste_rate`` > 0 (``train.box_paste``)
    pastes fracture boxes between the batch's images before the targets are derived (a
    receiving image's label becomes 1); ``fracture_fill_rate`` > 0 (``train.fracture_fill``)
    fills fractures (label 0) or control windows (label kept) there too; ``mixup_alpha`` > 0
    (``train.mixup``) blends each example with a shuffle of the batch after; the class
    weight and the reported label are those of the dominant image (lam >= 0.5). ``losses``
    (``TrainingTask.build_losses``) replaces the one the loss keywords describe.
    """
    optimizer = model.optimizer
    losses = losses or Losses.for_model(
        model,
        label_smoothing=label_smoothing,
        weights=weights,
        box_loss_weight=box_loss_weight,
        box_loss=box_loss,
        meta_loss_weight=meta_loss_weight,
    )
    batch_ops = {
        "box_paste": box_paste_rate,
        "fracture_fill": fracture_fill_rate,
        "mixup": mixup_alpha,
    }

    @tf.function
    def train_step(iterator, stop_flag):
        def step_fn(batch):
            batch = augment.apply_batch_ops(batch, "pixels", batch_ops, seed, optimizer.iterations)
            batch = losses.targets(batch)
            batch = augment.apply_batch_ops(batch, "targets", batch_ops, seed, optimizer.iterations)
            with tf.GradientTape() as tape:
                outputs = model(batch["image"], training=True)
                per_example, probs = losses(batch, outputs)
                loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
                scaled = optimizer.scale_loss(loss)
            grads = tape.gradient(scaled, model.trainable_variables)
            optimizer.apply(grads, model.trainable_variables)
            # Every replica reports whether its worker got SIGTERM, so all stop together.
            flags = tf.reshape(stop_flag, [1])
            return per_example, tf.reshape(probs, [-1]), batch["label"], flags

        results = strategy.run(step_fn, args=(next(iterator),))
        return tuple(strategy.gather(r, axis=0) for r in results)

    return train_step


def _restore_early_stopping(stopper, run_dir: Path) -> None:
    """Best val AUROC and epochs without improvement so far, from history.csv (resume)."""
    if stopper is None:
        return
    values = [row["val_auroc"] for row in runs.read_history(run_dir) if "val_auroc" in row]
    values = [v for v in values if math.isfinite(v)]
    if values:
        best = int(np.argmax(values))
        stopper.best, stopper.best_epoch, stopper.wait = values[best], best, len(values) - 1 - best


def _print_kernels(model: keras.Model, fast: bool, verbose: int = 2) -> None:
    """Which BatchNorm and CPU kernels this run got (``train.fast``; ``verbose`` 2, i.e.
    `kerasfrac --verbose`), and why not if not (always: it tells the fix)."""
    fused = uses_fused_batchnorm(model)
    onednn = kernels.onednn_enabled()
    onednn_text = {True: "on", False: "off", None: "unknown"}[onednn]
    if verbose >= 2:
        print(
            f"kernels: {'fused' if fused else 'Keras'} BatchNorm, oneDNN {onednn_text}",
            flush=True,
        )
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
    """Train ``cfg`` into ``cfg.run_dir``; returns the test metrics (also in metrics.json;
    val's, in metrics_val.json, with ``eval.test_at_end: false``).

    ``resume`` continues an unfinished run (error if there is none), or a finished one whose
    ``train.epochs`` was raised; ``auto_resume`` continues one if there is one and starts
    fresh otherwise (for requeued Slurm jobs). On SIGTERM the loop saves a checkpoint after
    the current step and raises ``Preempted``. ``verbose``: 0 quiet, 1 the epoch lines, 2
    (`kerasfrac --verbose`) also the kernels and the final weights' digest (always printed
    by each worker of a cluster: equal digests mean the workers stayed in sync).
    """
    task = TrainingTask(cfg)
    task.verbose = verbose
    policy = keras.mixed_precision.dtype_policy()  # train.precision sets it for the run only
    try:
        with contextlib.ExitStack() as task.held:  # the run's lock (chief), until train ends
            finished = task.setup(resume, overwrite, auto_resume)
            if finished is not None:  # e.g. a job requeued after its run finished: nothing to do
                return finished
            epochs_done = task.loop(verbose)
            return task.finish(epochs_done)
    finally:
        keras.mixed_precision.set_dtype_policy(policy)


class HistoryLogger(keras.callbacks.CSVLogger):
    """Keras' CSVLogger with the epoch counted from 1, as the console and state.json count
    (Keras passes the 0-based index)."""

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch + 1, logs)


class BestModel(keras.callbacks.Callback):
    """Keras' ``ModelCheckpoint(save_best_only=True, mode="max")``, written atomically: the
    epoch whose ``monitor`` beats ``best`` is saved to a temporary file and renamed onto
    ``path``, so a kill or a full disk leaves the previous best.keras, never a truncated one
    (Keras' callback writes the file in place)."""

    def __init__(self, path: Path, monitor: str = "val_auroc") -> None:
        super().__init__()
        self.path, self.monitor = Path(path), monitor
        self.best = -math.inf

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None:
            raise KeyError(f"BestModel: no {self.monitor!r} in the epoch's logs {list(logs)}")
        if float(value) > self.best:  # NaN never is
            self.best = float(value)
            ckpt.save_model(self.model, self.path)


class TrainingTask:
    """One training run in three parts: ``setup`` (run directory, strategy, inputs, model,
    step functions), ``loop`` (epochs of ``train_epoch`` then ``validation_step``, with the
    callbacks and checkpoints) and ``finish`` (model.keras, test predictions and metrics)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = runs.absolute(cfg)  # config.yaml then works from any folder
        self.run_dir = Path(self.cfg.run_dir)
        self.best = None  # BestModel: checkpoints/best.keras, written atomically (chief only)
        self.held = contextlib.ExitStack()  # train() passes the one it closes at the end
        self.verbose = 1  # train() sets it: 2 adds the kernels and the weights' digest

    # ----------------------------------------------------------------------- setup

    def setup(self, resume: bool, overwrite: bool, auto_resume: bool) -> dict | None:
        """Everything before the first step; the metrics of a finished run that
        ``auto_resume`` has nothing left to do for, else None."""
        cfg, t, run_dir = self.cfg, self.cfg.train, self.run_dir
        # Cheap checks first: the data, before TensorFlow builds anything.
        self.build = data.check_build(cfg.data.dir, cfg.dataset, t.batch_size, needs_val=True)
        # The strategy next: MultiWorkerMirroredStrategy must exist before other TF ops run.
        self.strategy = distribute.make_strategy(t.distribute)
        self.chief = distribute.is_chief(self.strategy)
        self.task = distribute.task_name(self.strategy)
        if self.chief:  # before anything reads or rewrites the run: one writer at a time
            self.held.enter_context(runs.run_lock(run_dir, exclusive=True, command="train"))
        # Every record of val and test read once (their CRCs): a damaged shard is named now,
        # not after an epoch or after the whole training (train's own shards are read first).
        self.build.verify(("val", "test"))
        if auto_resume:
            done = ckpt.finished_metrics(run_dir, t.epochs)
            if done is not None:
                print(f"{run_dir}: this run already finished its {t.epochs} epochs.", flush=True)
                return done
            resume = has_unfinished_run(run_dir)
        if self.chief:
            self.state = prepare_run_dir(
                run_dir,
                resume,
                overwrite,
                protect=[cfg.data.dir],
                epochs=t.epochs,
                patience=t.early_stopping_patience,
            )
            if self.state is not None:  # an older run's history.csv: epochs from 1, as appended
                runs.renumber_history(run_dir)
        else:  # workers only read: the chief owns the run directory
            self.state = ckpt.resumable_state(run_dir) if resume else None
        self.global_batch = t.batch_size * self.strategy.num_replicas_in_sync
        if self.global_batch != t.batch_size:  # several replicas: the global batch must fit
            self.build.check_batch(self.global_batch)

        keras.utils.set_random_seed(t.seed)
        if t.deterministic:
            tf.config.experimental.enable_op_determinism()
        precision = kernels.resolve_precision(t.precision)
        started = (self.state or {}).get("precision")
        if t.precision == "auto" and started and started != precision:
            # A resume on another kind of machine: the run goes on as it began (the same
            # numerics, and the optimizer's loss scaling its checkpoint holds).
            print(
                f"precision: auto -> {started}, the precision this run started in (this "
                f"machine alone would pick {precision}; set train.precision to change it)",
                flush=True,
            )
            precision = started
        elif precision != t.precision:
            print(f"precision: {t.precision} -> {precision}", flush=True)
        keras.mixed_precision.set_global_policy(precision)

        stream = self.build_inputs()
        self.model, self.partial = self.build_model()
        if self.chief:
            if self.state is None:  # state.json first: from here on a kill leaves a resumable run
                ckpt.begin(run_dir, precision)
            runs.save_config(run_dir, cfg)
            if self.state is None:
                _log_hparams(run_dir, cfg)
            _print_kernels(self.model, t.fast, self.verbose)
        self.train_iter = self.distribute_inputs(stream)
        self.train_step = make_train_step(
            self.model,
            self.strategy,
            self.global_batch,
            **step_options(t),
            losses=self.build_losses(),
        )
        self.scorer = classifier(self.model)
        scorer, tta = self.scorer, cfg.eval.tta

        @tf.function
        def eval_step(images):
            # Evaluation runs locally on every worker over the whole split (no collectives,
            # so uneven last batches cannot deadlock workers); it is small next to training.
            return predict_probs(scorer, images, tta)

        self.eval_step = eval_step
        return None

    def build_losses(self) -> Losses:
        """The per-example loss of ``self.model`` with its heads, from the train section
        (label smoothing, class weights of the build, box and metadata loss weights)."""
        weights = class_weights(self.cfg, self.build)
        return Losses.for_model(self.model, weights=weights, **loss_options(self.cfg.train))

    def build_inputs(self):
        """``stream(skip_batches) -> the infinite training stream from that batch on``
        (returned), ``self.steps`` per epoch and the validation batches ``self.val_ds``."""
        cfg, t = self.cfg, self.cfg.train
        steps = data.steps_per_epoch(self.build, cfg.data, self.global_batch)
        if steps is None:  # no oversampling: one pass over the (expanded) split per epoch
            steps = math.ceil(data.epoch_images(self.build, cfg.data) / self.global_batch)
        self.steps = t.steps_per_epoch or steps

        def stream(skip_batches: int = 0) -> tf.data.Dataset:
            return data.make_dataset(
                self.build,
                "train",
                cfg.data,
                self.global_batch,
                t.seed,
                training=True,
                with_boxes=cfg.model.box_head,
                with_meta=cfg.model.meta_head,
                box_target=cfg.train.box_target,
                repeat=True,
                skip_batches=skip_batches,
            )[0]

        stream(0)  # the build's checks (boxes, metadata, batch size) before any model is built
        self.val_ds = data.make_eval_dataset(self.build, "val", cfg.data, self.global_batch)
        return stream

    def build_model(self):
        """``(model, partial epoch)``: the checkpoint's model to resume, or a new compiled
        one; sets ``initial_epoch`` and ``initial_step``."""
        cfg, t, state = self.cfg, self.cfg.train, self.state
        self.initial_epoch, self.initial_step, partial = 0, 0, None
        if self.chief:
            runs.checkpoints_dir(self.run_dir).mkdir(parents=True, exist_ok=True)
        with self.strategy.scope():
            if state is not None:
                if state.get("steps_per_epoch", self.steps) != self.steps:
                    raise RunDirError(
                        f"--resume: the run in {str(self.run_dir)!r} has "
                        f"{state['steps_per_epoch']} steps per epoch, this config "
                        f"{self.steps}; resume with the run's own config."
                    )
                model, partial = ckpt.load(self.run_dir, state)
                self.initial_epoch = int(state["epoch"])
                self.initial_step = int(state.get("step", 0))
                return model, partial
            # Synchronized BatchNorm only where there is something to synchronise: on one
            # replica Keras' sync path still computes a ones-tensor the size of each input.
            sync = cfg.model.sync_batchnorm and self.strategy.num_replicas_in_sync > 1
            model_cfg = dataclasses.replace(cfg.model, sync_batchnorm=sync)
            # train.fast: TensorFlow's fused BatchNorm kernel (paper_cnn keeps Keras' layer
            # where statistics are synchronised).
            model = build_model(
                model_cfg,
                data.image_shape(cfg.data),
                fused_batchnorm=t.fast,
                meta_targets=len(meta_targets(self.build.manifest)),  # the build's own columns
            )
            optimizer = make_optimizer(cfg, model, self.steps)
            model.compile(optimizer=optimizer, loss="binary_crossentropy")
            # Its variables now, not in the step's first call: the step is traced once, not
            # twice (a tf.function that creates variables is traced again).
            optimizer.build(model.trainable_variables)
        return model, partial

    def distribute_inputs(self, stream):
        """An iterator over global batches of the training stream (``stream(skip_batches)``,
        ``build_inputs``), from where it stopped.

        The training stream is a pure function of the seed: a resumed run skips the batches
        the interrupted one consumed (drawn, not augmented: ``data.make_dataset``'s
        ``skip_batches``) and then sees exactly the batches it would have seen.
        DATA sharding: every worker reads the (cached) stream and keeps its share of each
        global batch; file sharding could leave a worker without one class in a small split.
        """
        train_ds = stream(self.initial_epoch * self.steps + self.initial_step)
        options = tf.data.Options()
        policy = tf.data.experimental.AutoShardPolicy.DATA
        options.experimental_distribute.auto_shard_policy = policy
        dist = self.strategy.experimental_distribute_dataset(train_ds.with_options(options))
        return iter(dist)

    def build_callbacks(self, verbose: int) -> keras.callbacks.CallbackList:
        """TerminateOnNaN, and on the chief TensorBoard, CSVLogger and ModelCheckpoint of the
        best val AUROC; EarlyStopping on val AUROC where asked (``self.stopper``)."""
        t, run_dir, state = self.cfg.train, self.run_dir, self.state
        cbs: list[keras.callbacks.Callback] = [keras.callbacks.TerminateOnNaN()]
        if self.chief:
            self.best = BestModel(runs.best_path(run_dir), monitor="val_auroc")
            if state is not None and state.get("best_val_auroc") is not None:
                self.best.best = state["best_val_auroc"]
            cbs += [
                keras.callbacks.TensorBoard(runs.tensorboard_dir(run_dir), write_graph=False),
                HistoryLogger(runs.history_path(run_dir), append=state is not None),
                self.best,
            ]
        self.stopper = None
        if t.early_stopping_patience:
            # val AUROC only (the test split is never looked at before training ends).
            self.stopper = keras.callbacks.EarlyStopping(
                monitor="val_auroc", mode="max", patience=t.early_stopping_patience
            )
            cbs.append(self.stopper)
        if verbose > 0 and self.chief:  # a bar on a terminal, one line per epoch in a log file
            cbs.append(console.progress_callback(t.epochs, self.steps))
        return keras.callbacks.CallbackList(
            cbs,
            add_history=True,
            add_progbar=False,
            model=self.model,
            verbose=verbose,
            epochs=t.epochs,
            steps=self.steps,
        )

    # ----------------------------------------------------------------------- loop

    def checkpoint(self, epoch: int, step: int, accum=None) -> None:
        if self.chief:
            ckpt.save(self.run_dir, self.model, epoch, step, self.steps, self.best, accum)

    def loop(self, verbose: int) -> int:
        """Train the epochs left; returns the number of epochs done."""
        callbacks = self.build_callbacks(verbose)
        model, stopper = self.model, self.stopper
        model.stop_training = False
        callbacks.on_train_begin()
        if self.state is not None:
            _restore_early_stopping(stopper, self.run_dir)
        logs: dict = {}
        epochs_done = self.initial_epoch
        with _SigtermFlag() as sigterm:
            for epoch in range(self.initial_epoch, self.cfg.train.epochs):
                if stopper is not None and stopper.wait >= stopper.patience:
                    break  # stopped early before an interruption: nothing left to train
                callbacks.on_epoch_begin(epoch)
                started = time.perf_counter()
                accum, seen = self.train_epoch(epoch, callbacks, sigterm)
                logs = epoch_metrics(*accum)
                # Validation and the best checkpoint see the averaged weights (ema_momentum);
                # the epoch's checkpoint keeps the raw ones that training continues from.
                with self.averaged_weights():
                    logs.update(self.validation_step())
                    logs["images_per_second"] = seen / (time.perf_counter() - started)
                    callbacks.on_epoch_end(epoch, logs)
                self.checkpoint(epoch + 1, 0)
                epochs_done = epoch + 1
                if model.stop_training:  # EarlyStopping: val AUROC stopped improving
                    print(
                        f"early stopping after epoch {epoch + 1}: val AUROC best at epoch "
                        f"{stopper.best_epoch + 1} ({stopper.best:.4f})",
                        flush=True,
                    )
                    break
        callbacks.on_train_end(logs)
        return epochs_done

    def _ema_swap(self) -> keras.callbacks.SwapEMAWeights | None:
        """Keras' SwapEMAWeights on this model (``train.ema_momentum``), or None."""
        if not self.cfg.train.ema_momentum:
            return None
        swap = keras.callbacks.SwapEMAWeights()
        swap.set_model(self.model)
        return swap

    @contextlib.contextmanager
    def averaged_weights(self):
        """With ``train.ema_momentum``, the optimizer's moving average of the weights is in
        the model for the block (swapped in place), the raw weights after it."""
        swap = self._ema_swap()
        if swap is None:
            yield
            return
        swap.on_test_begin()
        try:
            yield
        finally:
            swap.on_test_end()

    def train_epoch(self, epoch: int, callbacks, sigterm) -> tuple[tuple, int]:
        """The steps of one epoch (from where a resumed run stopped); returns the epoch's
        per-example ``(losses, probabilities, labels)`` and the number of images seen."""
        run_dir, steps, model = self.run_dir, self.steps, self.model
        resumed = self.partial is not None and epoch == self.initial_epoch
        accum = self.partial if resumed else ([], [], [])
        first = self.initial_step if epoch == self.initial_epoch else 0
        seen = 0
        for step in range(first, steps):
            callbacks.on_train_batch_begin(step)
            flag = tf.constant(1 if sigterm.raised else 0, tf.int32)
            per_example, p, y, stop = (r.numpy() for r in self.train_step(self.train_iter, flag))
            for acc, r in zip(accum, (per_example, p, y)):
                acc.append(r)
            seen += len(y)
            callbacks.on_train_batch_end(
                step, {"loss": float(np.mean(per_example)), "size": len(per_example)}
            )
            if model.stop_training:  # TerminateOnNaN: the last good checkpoint stays
                raise TrainingDiverged(
                    f"loss became NaN/inf in epoch {epoch + 1}, step {step + 1}; training "
                    f"stopped. The last good checkpoint is in {runs.checkpoints_dir(run_dir)}. "
                    "Lower train.learning_rate or check the data."
                )
            if stop.any():
                self.checkpoint(epoch, step + 1, accum)
                raise Preempted(
                    f"SIGTERM received: stopped after epoch {epoch + 1}, step {step + 1} "
                    f"and saved a checkpoint in {runs.checkpoints_dir(run_dir)}; continue with "
                    "--resume (or --auto-resume)."
                )
            every = self.cfg.train.checkpoint_every_steps
            if every and (epoch * steps + step + 1) % every == 0 and step + 1 < steps:
                self.checkpoint(epoch, step + 1, accum)
        return accum, seen

    def validation_step(self) -> dict:
        """``val_loss``, ``val_accuracy`` and ``val_auroc`` of the model on the val split."""
        val = [[], [], []]
        for batch in self.val_ds:
            probs = self.eval_step(batch["image"]).numpy()
            y = batch["label"].numpy()
            val[0].append(bce_per_example(y, probs))
            val[1].append(probs)
            val[2].append(y)
        return epoch_metrics(*val, prefix="val_")

    # ----------------------------------------------------------------------- finish

    def finish(self, epochs_done: int) -> dict:
        """model.keras (the last or the best epoch), the test predictions and metrics (val's
        with ``eval.test_at_end: false``), and the finished state (chief only); returns those
        metrics ({} on other workers)."""
        cfg, t, run_dir = self.cfg, self.cfg.train, self.run_dir
        digest = weights_digest(self.model)
        if self.verbose >= 2 or distribute.is_multi_worker(self.strategy):  # workers in sync?
            print(f"final weights sha256: {digest} (task {self.task})", flush=True)
        if not self.chief:
            return {}
        swap = self._ema_swap()
        if swap is not None:  # training is over: the average stays in the model (select last)
            swap.on_test_begin()

        full = self.model
        best_path = runs.best_path(run_dir)
        if t.select == "best" and best_path.is_file():
            # The epoch with the best val AUROC (chosen on val, before test is looked at).
            full = load_model(best_path)
            print(f"model.keras = the best epoch on val AUROC ({best_path})", flush=True)
        # Plain Keras layers computing in float32: model.keras loads with
        # keras.saving.load_model anywhere and predicts at full speed on any machine.
        full = float32_compute(full)
        if has_box_head(full):  # the same epoch with its box head, for explain's boxmap
            ckpt.save_model(plain_keras(box_model(full)), runs.box_model_path(run_dir))
            ckpt.crash_point("box_model.keras")
        final = classifier(full)
        ckpt.save_model(plain_keras(final), runs.model_path(run_dir))
        ckpt.crash_point("model.keras")
        # eval.test_at_end: false holds test back while settings are chosen; the final
        # model is then scored on val, and `kerasfrac evaluate` reads test when asked.
        split = "test" if cfg.eval.test_at_end else "val"
        ds = data.make_eval_dataset(self.build, split, cfg.data, self.global_batch, with_ids=True)
        ids, y, p = runs.predict(final, ds, cfg.eval.tta)
        runs.write_predictions(runs.predictions_path(run_dir, split), ids, y, p)
        result = runs.write_metrics(
            run_dir,
            split,
            # evaluate's metrics of these predictions: the same CI (duplicate groups resampled)
            end_of_training_metrics(self.build, split, ids, y, p),
            cfg=cfg,
            model=runs.model_path(run_dir),
            predictions="computed",
        )
        ckpt.crash_point("metrics.json")
        ckpt.write_state(
            run_dir,
            epochs_done,
            0,
            self.steps,
            self.best,
            finished=True,
            digest=digest,
            stopped_early=epochs_done < t.epochs,
        )
        return result
