"""What the training commands print: one line per epoch where no terminal shows a progress
bar, Keras' bar with the epoch's running-mean loss where one does, and the short summary at
the end of ``train``/``demo``. TensorFlow's start-up lines: ``tfrecords_builder.quiet``.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

from kerasfrac import runs

# --------------------------------------------------------------------------- progress


def duration(seconds: float) -> str:
    """``1m05s``, ``2h03m``, ``42s``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _value(v) -> str:
    return "nan" if v is None or not math.isfinite(v) else f"{v:.3f}"


def config_line(cfg) -> str:
    """The resolved config in one line: what the run is (the whole of it goes to the run's
    config.yaml; ``kerasfrac --verbose train`` prints it)."""
    d, m, t = cfg.data, cfg.model, cfg.train
    head = f", {m.head} head" if m.head != "gap" else ""
    return (
        f"config: {cfg.dataset} from {d.dir or '(no data.dir)'}, {m.name}{head}, "
        f"{d.image_size} px, {t.epochs} epochs x batch {t.batch_size}, {t.optimizer} lr "
        f"{t.learning_rate:g}, seed {t.seed} -> {Path(cfg.run_dir) / 'config.yaml'} "
        "(every setting; `kerasfrac --verbose train` prints them)"
    )


def epoch_line(epoch: int, epochs: int, logs: dict, seconds: float) -> str:
    """``epoch 3/24  loss 0.512  auroc 0.771  val_loss 0.6  val_auroc 0.7  62 img/s  1m05s``."""
    parts = [f"epoch {epoch + 1}/{epochs}"]
    for key in ("loss", "accuracy", "auroc", "val_loss", "val_accuracy", "val_auroc"):
        if key in logs:
            parts.append(f"{key} {_value(logs[key])}")
    if logs.get("images_per_second"):
        parts.append(f"{logs['images_per_second']:.0f} img/s")
    parts.append(duration(seconds))
    return "  ".join(parts)


def progress_callback(epochs: int, steps: int, tty: bool | None = None):
    """The progress display of the training loop: Keras' progress bar (whose loss is the
    epoch's running mean, as ``model.fit`` shows it) on a terminal, one plain line per epoch
    (``epoch_line``) otherwise, e.g. in a Slurm log."""
    import keras

    if tty is None:
        tty = sys.stdout.isatty()

    class EpochLog(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self._started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            line = epoch_line(epoch, epochs, logs or {}, time.perf_counter() - self._started)
            print(line, flush=True)

    class RunningMeanBar(keras.callbacks.ProgbarLogger):
        """Keras' ProgbarLogger, which shows each value as it is given (``fit`` gives it
        running means); the loop gives each batch's mean loss and size, so the mean over the
        epoch so far, weighted by batch size, is computed here."""

        def on_epoch_begin(self, epoch, logs=None):
            self._sum, self._n = 0.0, 0
            super().on_epoch_begin(epoch, logs)

        def on_train_batch_end(self, batch, logs=None):
            logs = dict(logs or {})
            n = int(logs.pop("size", 1))
            self._sum += float(logs.get("loss", 0.0)) * n
            self._n += n
            logs["loss"] = self._sum / max(self._n, 1)
            super().on_train_batch_end(batch, logs)

    if not tty:
        return EpochLog()
    bar = RunningMeanBar()
    bar.set_params({"epochs": epochs, "steps": steps, "verbose": 1})
    return bar


# --------------------------------------------------------------------------- summaries


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _auroc(m: dict) -> str:
    """``m``: a metrics dict (``ci95`` maps metrics to CIs) or ``metrics.auroc_ci``'s."""
    if m.get("auroc") is None:
        return "n/a"
    ci = m.get("ci95")
    # What the bootstrap resampled (train's end and evaluate alike: the build's duplicate
    # groups where the split holds any, else images), and how many of them.
    from kerasfrac.evaluation.metrics import resampling

    unit = resampling(ci if isinstance(ci, dict) else m) if (ci or m.get("resampled")) else ""
    ci = ci.get("auroc") if isinstance(ci, dict) else ci
    unit = f"; {unit}" if unit else ""
    return f"{m['auroc']:.3f}" + (f" [95% CI {ci[0]:.3f}, {ci[1]:.3f}{unit}]" if ci else "")


def warnings_of(m: dict) -> list[str]:
    """What makes a test result worthless: accuracy below the majority baseline, an AUROC
    whose 95% CI reaches 0.5 (chance), a model that does not beat the no-anatomy baseline."""
    out = []
    acc, base = m.get("accuracy"), m.get("majority_baseline_accuracy")
    if acc is not None and base is not None and acc < base:
        out.append(
            f"accuracy {_pct(acc)} at threshold {m.get('threshold', 0.5):.2f} is BELOW the "
            f"majority baseline {_pct(base)} (always '{m.get('majority_class', 'normal')}'): "
            "at this threshold the model's decisions are worse than a constant guess (after "
            "class weighting or oversampling, `kerasfrac evaluate` picks a threshold on val)."
        )
    ci = (m.get("ci95") or {}).get("auroc")
    if ci and ci[0] <= 0.5:
        out.append(
            f"the AUROC's 95% CI [{ci[0]:.3f}, {ci[1]:.3f}] includes 0.5: not clearly better "
            "than chance."
        )
    c = m.get("no_anatomy_baseline") or {}
    if c and "unavailable" not in c and not c.get("beats_baseline"):
        out.append(c["sentence"])
    return out


def run_summary(m: dict, run_dir, title: str | None = None) -> str:
    """The short human summary of a finished run (``m``: its metrics.json, or its
    metrics_val.json where it held test back)."""
    run_dir = Path(run_dir)
    split = m.get("split", "test")
    title = title or f"{split} split"
    c = m.get("counts") or {}
    lines = [
        f"{title}: {m.get('n', '?')} images ({c.get('fractured', '?')} fractured, "
        f"{c.get('normal', '?')} normal)",
        f"  AUROC     {_auroc(m)}   (chance 0.5)",
        f"  accuracy  {_pct(m.get('accuracy'))} at threshold {m.get('threshold', 0.5):.2f}   "
        f"(majority baseline {_pct(m.get('majority_baseline_accuracy'))}: always "
        f"'{m.get('majority_class', 'normal')}')",
    ]
    b = m.get("no_anatomy_baseline") or {}
    if b and "unavailable" not in b:
        lines.append(f"  no-anatomy baseline AUROC {_auroc(b['baseline_auroc'])}")
    lines += [f"  WARNING: {w}" for w in warnings_of(m)]
    if split == "val":
        lines.append(
            "  test: held out (eval.test_at_end: false); `kerasfrac evaluate --run-dir "
            f"{run_dir}` scores it, once the settings are final"
        )
    lines += [
        "files:",
        f"  run directory  {run_dir}",
        f"  model          {runs.model_path(run_dir)}",
    ]
    box = runs.box_model_path(run_dir).is_file()
    if box:
        lines.append(f"  box model      {runs.box_model_path(run_dir)} (with the box head)")
    lines += [f"  metrics        {runs.metrics_path(run_dir, split)}"]
    if m.get("plots"):
        names = ", ".join(Path(p).name for p in m["plots"])
        lines.append(f"  plots          {run_dir / 'plots'} ({names})")
    # Test held out: the next looks stay on val until the settings are final.
    on = " --split val" if split == "val" else ""
    lines += [
        "next:",
        f"  kerasfrac evaluate --run-dir {run_dir}{on}   (CIs, thresholds, no-anatomy baseline, "
        "plots)",
        f"  kerasfrac explain --run-dir {run_dir}{on}    (Grad-CAM, feature maps, shortcut audit)",
    ]
    if box:
        lines.append(
            f"  kerasfrac explain --run-dir {run_dir}{on} --what audit --cam-method boxmap    "
            "(where the box head places fractures)"
        )
    return "\n".join(lines)
