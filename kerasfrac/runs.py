"""The run directory: its paths, its config, its model, its predictions and its metrics.

Every stage that reads or writes a run directory goes through this module (train, evaluate,
explain, predict, report); checkpoint.py commits the checkpoints inside it. Layout::

    config.yaml            the resolved configuration (paths absolute)
    tensorboard/           scalars per epoch (train/ and validation/), hyperparameters, images
    history.csv            one row per epoch: epoch (from 1, as the console and state.json
                           count; older runs' files count from 0, told by a first row of
                           epoch 0: ``read_history`` and a resume renumber them), loss,
                           accuracy, auroc, val_*
    checkpoints/state.json epochs/steps done, best val AUROC, finished flag, and the name of
                           the committed checkpoint (replacing it is the commit: checkpoint.py)
    checkpoints/gen-NNNNNN/ that checkpoint: model.keras (+ optimizer state), partial_epoch.npz
                           (mid-epoch), copies of history.csv and best.keras as they stood
    checkpoints/best.keras the epoch with the best validation AUROC
    model.keras            the final model (the classifier)
    box_model.keras        the same epoch with its box head (model.box_head runs only)
    predictions.csv        test split: image_id, label, probability (predictions_<split>.csv)
    metrics.json           test split metrics (metrics_<split>.json): see ``write_metrics``
    calibration.json       chosen on val by evaluate: the calibrator, operating points
    plots/                 evaluation plots;  explain/  explain's figures and explain.json
    gallery/               test images for error analysis (JPEG overlays + gallery.json): evaluate
    report.html            one self-contained page of all the above (evaluate, explain)

``metrics.json`` has one writer (``write_metrics``) and one schema, whether train or evaluate
wrote it: ``split``, ``epochs``, ``model``, ``dataset``, ``data_dir``, ``predictions`` (computed
or read), then the metrics of ``kerasfrac.evaluation.metrics.split_metrics`` and what evaluate adds
(``youden``, ``subgroups``, ``no_anatomy_baseline``, ``plots``).

TensorFlow is imported only by the functions that load or run a model.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import os
import reprlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# Local imports of the model and data modules: naming and reading run files needs no TensorFlow.

CONFIG = "config.yaml"
MODEL = "model.keras"
#: The same epoch as model.keras with its box head (model.box_head runs only): what
#: ``kerasfrac explain --cam-method boxmap`` reads.
BOX_MODEL = "box_model.keras"
HISTORY = "history.csv"
CHECKPOINTS = "checkpoints"
BEST = "best.keras"
TENSORBOARD = "tensorboard"
PLOTS = "plots"
CALIBRATION = "calibration.json"
EXPLAIN = "explain"
GALLERY = "gallery"
REPORT_HTML = "report.html"


def config_path(run_dir) -> Path:
    return Path(run_dir) / CONFIG


def model_path(run_dir) -> Path:
    return Path(run_dir) / MODEL


def box_model_path(run_dir) -> Path:
    return Path(run_dir) / BOX_MODEL


def history_path(run_dir) -> Path:
    return Path(run_dir) / HISTORY


def checkpoints_dir(run_dir) -> Path:
    return Path(run_dir) / CHECKPOINTS


def best_path(run_dir) -> Path:
    return checkpoints_dir(run_dir) / BEST


def tensorboard_dir(run_dir, part: str = "") -> Path:
    return Path(run_dir) / TENSORBOARD / part if part else Path(run_dir) / TENSORBOARD


def predictions_path(run_dir, split: str) -> Path:
    """``predictions.csv`` for test, ``predictions_<split>.csv`` otherwise."""
    return Path(run_dir) / ("predictions.csv" if split == "test" else f"predictions_{split}.csv")


def metrics_path(run_dir, split: str) -> Path:
    """``metrics.json`` for test, ``metrics_<split>.json`` otherwise."""
    return Path(run_dir) / ("metrics.json" if split == "test" else f"metrics_{split}.json")


def calibration_path(run_dir) -> Path:
    """``calibration.json``: what `kerasfrac evaluate` chose on val for deployment (the
    calibrator and the operating points' thresholds)."""
    return Path(run_dir) / CALIBRATION


def read_calibration(run_dir) -> dict | None:
    """The run's calibration.json (checked), None where evaluate has not written one; a
    ValueError naming the file where it is damaged."""
    from kerasfrac.evaluation.calibration import Calibrator

    path = calibration_path(run_dir)
    if not path.is_file():
        return None
    try:
        chosen = json.loads(path.read_text())
        chosen["calibrator"] = Calibrator.from_dict(chosen["calibrator"])
        for name, point in chosen["operating_points"].items():
            t = point["threshold"]
            if not (isinstance(t, int | float) and 0.0 <= t <= 1.0):
                raise ValueError(f"operating point {name!r} has threshold {t!r}")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(
            f"cannot read the run's calibration {str(path)!r} ({reprlib.repr(str(err))}); rerun "
            f"`kerasfrac evaluate --run-dir {run_dir}` to rewrite it"
        ) from err
    return chosen


def gallery_dir(run_dir) -> Path:
    """The test images ``report.html`` shows for error analysis: ``gallery.json`` and one JPEG
    overlay per image (``kerasfrac.evaluation.html.write_gallery``)."""
    return Path(run_dir) / GALLERY


def report_html_path(run_dir) -> Path:
    """``report.html``: the run on one self-contained page (``kerasfrac.evaluation.html``)."""
    return Path(run_dir) / REPORT_HTML


def run_dir_of(model_file) -> Path:
    """The run directory holding ``model_file`` (RUN/model.keras or RUN/checkpoints/X)."""
    parent = Path(model_file).parent
    return parent.parent if parent.name == CHECKPOINTS else parent


#: Directory names that say nothing of the run (the demo's ``demo-out/run``, the config's
#: default ``runs/default``): figure titles then name the folder above too.
GENERIC_RUN_NAMES = ("run", "default")


def run_name(run_dir) -> str:
    """How figure titles name a run: ``run 'NAME'``, NAME its directory's name, or
    ``PARENT/NAME`` where the name alone is generic (``run 'demo-out/run'``)."""
    path = Path(run_dir).resolve()
    name = path.name
    if name in GENERIC_RUN_NAMES and path.parent.name:
        name = f"{path.parent.name}/{name}"
    return f"run {name!r}"


def log_images(run_dir, part: str, images: list[Path], step: int = 0) -> None:
    """PNG files as TensorBoard images of the run (``tensorboard/<part>``, one tag per file)."""
    import tensorflow as tf

    writer = tf.summary.create_file_writer(str(tensorboard_dir(run_dir, part)))
    with writer.as_default():
        for p in images:
            image = tf.io.decode_png(tf.io.read_file(str(p)), channels=4)
            tf.summary.image(p.stem, image[None], step=step)
    writer.close()


# --------------------------------------------------------------------------- config


def absolute(cfg):
    """A copy of ``cfg`` whose paths (run_dir, data.dir, a data.cache folder, a model.weights
    file) are absolute, so a run's config.yaml works from any folder."""

    def resolve(p: str) -> str:
        return str(Path(p).expanduser().absolute()) if p else p

    data = dataclasses.replace(cfg.data, dir=resolve(cfg.data.dir))
    if cfg.data.cache not in ("memory", "none"):
        data.cache = resolve(cfg.data.cache)
    model = cfg.model
    if model.weights not in ("none", "imagenet"):
        model = dataclasses.replace(model, weights=resolve(model.weights))
    return dataclasses.replace(cfg, run_dir=resolve(cfg.run_dir), data=data, model=model)


def save_config(run_dir, cfg) -> Path:
    """Write ``cfg`` (paths made absolute) as the run's config.yaml."""
    return absolute(cfg).save(config_path(run_dir))


def load_config(run_dir):
    """The run's resolved configuration; a ValueError where ``run_dir`` is no run."""
    from kerasfrac.config import load_config as load

    path = config_path(run_dir)
    if not Path(run_dir).is_dir():
        raise ValueError(
            f"run directory {str(run_dir)!r} does not exist; pass the --run-dir that "
            "`kerasfrac train` wrote"
        )
    if not path.is_file():
        raise ValueError(
            f"no config.yaml next to the model in {str(run_dir)!r}: it is not a kerasfrac run "
            "directory. Pass the --run-dir that `kerasfrac train` wrote, or a model inside its "
            "run directory (its config.yaml tells how images are prepared: image size, "
            "grayscale, resize)"
        )
    return load(path)


# --------------------------------------------------------------------------- model


def check_run(run_dir=None, model_file=None):
    """The run's config, after the checks ``load_model`` makes of its paths (``model_file``
    exists, ``run_dir`` (else the folder holding ``model_file``) is a run): TensorFlow-free,
    so that the commands answer a wrong path before importing TensorFlow."""
    if run_dir is None:
        if model_file is None:
            raise ValueError("pass a run directory or a model file")
        run_dir = run_dir_of(model_file)
    if model_file is not None and not Path(model_file).is_file():
        raise ValueError(f"model file {str(model_file)!r} does not exist")
    return load_config(run_dir)


def load_model(run_dir=None, model_file=None, box_head: bool = False):
    """``(cfg, model, model_file)`` of a run: its model.keras, or ``model_file`` (its run
    directory is then ``run_dir`` or the folder that holds it). The model is the classifier
    (a checkpoint may carry the box head; ``box_head`` keeps it where there is one, and
    reads the run's box_model.keras instead of model.keras where the run saved one),
    computing in float32, and its input is checked against the config."""
    from kerasfrac import data
    from kerasfrac.models import classifier, float32_compute, functional
    from kerasfrac.models import load_model as load

    cfg = check_run(run_dir, model_file)
    run_dir = run_dir_of(model_file) if run_dir is None else run_dir
    path = Path(model_file) if model_file else model_path(run_dir)
    if box_head and model_file is None and box_model_path(run_dir).is_file():
        path = box_model_path(run_dir)
    if not path.is_file():
        best = best_path(run_dir)
        hint = f" (a checkpoint exists: --model {best})" if best.is_file() else ""
        raise ValueError(
            f"no model at {str(path)!r}: the run has not finished or the file was moved; "
            f"pass --model FILE{hint}"
        )
    # An older run's paper_cnn is a Sequential; a checkpoint of a mixed-precision run predicts
    # in float32 like its model.keras.
    model = float32_compute(load(path))
    model = functional(model if box_head else classifier(model))
    check_input_shape(model, data.image_shape(cfg.data), path)
    return cfg, model, path


def check_input_shape(model, expected: tuple[int, int, int], path) -> None:
    got = tuple(model.input_shape[1:])
    if got != tuple(expected):
        raise ValueError(
            f"model {str(path)!r} takes input {got} but the run's config prepares images as "
            f"{tuple(expected)} (data.image_size, data.grayscale); use the model trained with "
            "this config"
        )


def predict(model, dataset, tta: str = "none") -> tuple[list[str], np.ndarray, np.ndarray]:
    """Run ``model`` over dict batches (``image``, ``label``, ``id``); ids, labels, probabilities.

    ``tta="flip"``: each probability is the mean over the image and its left-right mirror.
    """
    from kerasfrac.models import predict_probs

    ids, labels, probs = [], [], []
    for batch in dataset:
        p = predict_probs(model, batch["image"], tta)
        probs.append(np.asarray(p, dtype=np.float64).reshape(-1))
        labels.append(np.asarray(batch["label"]).reshape(-1))
        ids.extend(i.decode() for i in batch["id"].numpy())
    if not ids:
        raise ValueError("the split to evaluate is empty: it has no images")
    return ids, np.concatenate(labels).astype(int), np.concatenate(probs)


# --------------------------------------------------------------------------- predictions


def write_predictions(path, ids, labels, probs) -> None:
    """The predictions CSV, written whole or not at all (``write_text``)."""
    buf = io.StringIO()
    out = csv.writer(buf)
    out.writerow(["image_id", "label", "probability"])
    for i, y, p in zip(ids, labels, probs):
        out.writerow([i, int(y), f"{p:.6f}"])
    write_text(path, buf.getvalue())


def read_predictions(path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``(ids, labels, probabilities)`` from a predictions.csv."""
    with Path(path).open(newline="") as f:
        rows = list(csv.DictReader(f))
    missing = {"image_id", "label", "probability"} - set(rows[0] if rows else {})
    if not rows or missing:
        raise ValueError(
            f"{str(path)!r} is not a predictions file (expected columns image_id, label, "
            f"probability with at least one row); delete it to have it recomputed"
        )
    ids = [r["image_id"] for r in rows]
    return (
        ids,
        np.array([int(r["label"]) for r in rows]),
        np.array([float(r["probability"]) for r in rows]),
    )


# --------------------------------------------------------------------------- history


def read_history(run_dir) -> list[dict[str, float]]:
    """history.csv's rows (one per epoch, numbers as floats; empty cells dropped; ``epoch``
    counted from 1), [] where there is none; a ValueError naming the file where it cannot be
    read. A file of an older run, whose epochs count from 0 (its first row says epoch 0), is
    read with its epochs moved up by one."""
    path = history_path(run_dir)
    if not path.is_file():
        return []
    try:
        with path.open(newline="") as f:
            rows = [{k: float(v) for k, v in row.items() if k and v} for row in csv.DictReader(f)]
    except (OSError, UnicodeDecodeError, ValueError, TypeError) as err:
        raise ValueError(
            f"cannot read the run's training history {str(path)!r} ({str(err)[:200]}): it was "
            "edited or damaged outside kerasfrac. A checkpoint keeps a copy "
            f"(checkpoints/gen-*/{HISTORY}): copy it back, or move the file away (the "
            "training-curves figure and early stopping's memory need it)"
        ) from err
    if rows and rows[0].get("epoch") == 0:  # an older run's file: epochs from 0
        rows = [{**r, "epoch": r["epoch"] + 1} if "epoch" in r else r for r in rows]
    return rows


def renumber_history(run_dir) -> bool:
    """Rewrite an older run's history.csv (epochs from 0) with its epochs counted from 1,
    before a resume appends to it; whether it was rewritten."""
    path = history_path(run_dir)
    if not path.is_file():
        return False
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    if not fields or "epoch" not in fields or not rows or rows[0].get("epoch") != "0":
        return False
    buf = io.StringIO()
    out = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    out.writeheader()
    for row in rows:
        out.writerow({**row, "epoch": str(int(float(row["epoch"])) + 1)})
    write_text(path, buf.getvalue())
    return True


# --------------------------------------------------------------------------- metrics


def write_metrics(
    run_dir, split: str, metrics: dict, *, cfg, model, predictions: str, **extra
) -> dict:
    """The one writer of metrics.json (``metrics_<split>.json``): the run's header, then
    ``metrics`` (``kerasfrac.evaluation.metrics.split_metrics``), then ``extra``; written
    atomically.
    ``epochs`` is the number of epochs the run's checkpoint state records; ``model`` is
    relative to the run directory where it lies inside it. Returns the dict."""
    try:
        state = read_state(run_dir) or {}
    except RunDirError:  # a damaged state.json: the metrics say nothing of the epochs
        state = {}
    model = Path(model)
    inside = model.resolve().is_relative_to(Path(run_dir).resolve())
    record = {
        "split": split,
        "epochs": state.get("epoch"),
        # relative to the run directory where it lies there: the run can be moved
        "model": str(model.resolve().relative_to(Path(run_dir).resolve()) if inside else model),
        "dataset": cfg.dataset,
        "data_dir": str(cfg.data.dir),
        "predictions": predictions,
        **metrics,
        **extra,
    }
    write_text(metrics_path(run_dir, split), json.dumps(record, indent=2) + "\n")
    return record


def read_metrics(run_dir, split: str = "test") -> dict | None:
    """The run's metrics of ``split``, None where there are none; a ValueError naming the
    file where it cannot be read."""
    path = metrics_path(run_dir, split)
    if not path.is_file():
        return None
    try:
        m = json.loads(path.read_text())
        if not isinstance(m, dict):
            raise ValueError(f"expected a JSON object, got {type(m).__name__}")
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(
            f"cannot read the run's metrics {str(path)!r} ({err}); rerun `kerasfrac evaluate "
            f"--run-dir {run_dir}` to rewrite it"
        ) from err
    return m


def youden_threshold(run_dir) -> tuple[float, str]:
    """``(threshold, where it comes from)``: the Youden-J threshold that `kerasfrac evaluate`
    chose on val (in metrics.json), else 0.5."""
    try:
        m = read_metrics(run_dir)
    except ValueError as err:
        raise ValueError(f"{err}, or pass --threshold") from err
    youden = (m or {}).get("youden")
    if youden and youden.get("threshold") is not None:
        path = metrics_path(run_dir, "test")
        threshold = youden["threshold"]
        if not (isinstance(threshold, int | float) and 0.0 <= threshold <= 1.0):  # nan fails
            raise ValueError(
                f"the Youden-J threshold in {str(path)!r} is {threshold!r}, not a probability "
                f"in [0, 1] (the file was edited or damaged); rerun `kerasfrac evaluate "
                f"--run-dir {run_dir}` to rewrite it, or pass --threshold"
            )
        return float(threshold), f"the run's Youden-J threshold chosen on val ({path})"
    return 0.5, "default 0.5 (no Youden-J threshold in the run's metrics.json)"


# --------------------------------------------------------------------------- durable writes


class RunDirError(ValueError):
    """A run directory that cannot be used as asked (finished, unfinished, not a run)."""


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some network file systems cannot fsync a folder; the renames still order it
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def replace_file(tmp: Path, path: Path) -> None:
    """Move the finished ``tmp`` onto ``path`` in one rename, durably (contents, then name)."""
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_text(path: Path, text: str) -> None:
    """``path`` gets ``text`` or keeps its old content, never a truncated mix."""
    write_bytes(path, text.encode("utf-8"))


def write_bytes(path: Path, data: bytes) -> None:
    """``path`` gets ``data`` or keeps its old content, never a truncated mix; its mode is
    what ``open`` would give (0666 less the umask), not mkstemp's owner-only 0600, so that a
    group sharing a cluster folder can read a run's files."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o666 & ~umask)
        f.write(data)
    replace_file(Path(tmp), path)


def check_writable(folder, flag: str = "--out") -> Path:
    """Make ``folder`` and prove it writable (a file made and removed) before any work is
    spent on what goes there; an OSError names the folder and ``flag``."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OSError(
            err.errno,
            f"cannot write into {str(folder)!r} ({err.strerror}); choose a writable folder "
            f"with {flag}. Nothing was computed",
        ) from None
    return folder


# --------------------------------------------------------------------------- the run's lock


class RunLockedError(RunDirError):
    """Another process holds the run directory in a mode that excludes this one."""


#: Locks this process holds: {lock file: (open file, exclusive)}; a nested request (train's
#: own evaluation of the test split) reuses the held lock instead of deadlocking on it.
_HELD: dict[str, tuple] = {}


def lock_path(run_dir) -> Path:
    """The run's lock file, beside the run (``.NAME.lock``, as builds have): --overwrite
    deletes the run folder while the lock is held."""
    run_dir = Path(run_dir).expanduser().resolve()  # one lock whatever path names the run
    return run_dir.parent / f".{run_dir.name}.lock"


def _holders(path: Path) -> str:
    """Who holds ``path`` locked: the processes /proc/locks names (Linux; this machine only),
    else what the exclusive holder wrote into the file."""
    described = []
    try:
        st = os.stat(path)
        inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        with open("/proc/locks") as f:
            pids = sorted({int(p[4]) for p in (line.split() for line in f) if p[5] == inode})
    except (OSError, ValueError, IndexError):
        pids = []
    for pid in pids:
        try:
            parts = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            started = os.stat(f"/proc/{pid}").st_mtime
        except OSError:
            continue
        parts = [p for p in parts.split("\0") if p]
        if len(parts) > 1 and Path(parts[0]).name.startswith("python"):
            parts = parts[1:]  # the interpreter: show the command it runs
        cmd = " ".join([Path(parts[0]).name, *parts[1:]]) if parts else "?"
        cmd = cmd if len(cmd) <= 120 else f"{cmd[:70]} ... {cmd[-45:]}"
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
        described.append(f"pid {pid}, started {when}: `{cmd}`")
    if described:
        return "; ".join(described)
    try:
        return path.read_text().strip() or "another process"
    except OSError:
        return "another process"


@contextlib.contextmanager
def run_lock(run_dir, exclusive: bool, command: str):
    """Hold the run directory: ``exclusive`` for train (one writer), shared for evaluate,
    explain and predict (many readers, no writer). flock, so the kernel drops the lock when
    its process dies; a holder in another mode gets ``RunLockedError`` at once, naming the
    holder. Where the lock file cannot be made (a read-only folder: nobody can train there)
    or the file system has no flock, the command goes on unlocked, saying so."""
    import errno
    import fcntl
    import socket

    path = lock_path(run_dir)
    key = str(path)
    if key in _HELD:  # this process holds it already (train evaluating its own test split)
        held_exclusive = _HELD[key][1]
        if exclusive and not held_exclusive:
            raise RunLockedError(f"{command}: the run {str(run_dir)!r} is held shared here")
        yield
        return
    if not exclusive and not Path(run_dir).is_dir():  # nothing to read: the reader says so
        yield
        return
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            f = open(path, "a+")  # closed below, or in the finally once locked
        except OSError as err:
            if exclusive:
                raise
            print(f"note: {command} reads {run_dir} without its lock ({err})", file=sys.stderr)
            yield
            return
        try:
            fcntl.flock(f, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holders(path)
            f.close()
            doing = "write" if exclusive else "read"
            raise RunLockedError(
                f"the run directory {str(run_dir)!r} is in use ({holder}); `kerasfrac "
                f"{command}` cannot {doing} it until that ends. Wait for it, or use another "
                "--run-dir. Nothing was changed."
            ) from None
        except OSError as err:
            f.close()
            if err.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            print(
                f"note: this file system cannot lock {path} ({err}); {command} goes on without "
                "the run lock: start no other command on this run meanwhile",
                file=sys.stderr,
            )
            yield
            return
        try:
            same = os.fstat(f.fileno()).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        f.close()  # the lock file of a holder that just ended and removed it: take the new one
    _HELD[key] = (f, exclusive)
    try:
        if exclusive:
            f.seek(0)
            f.truncate()
            started = time.strftime("%Y-%m-%d %H:%M:%S")
            f.write(
                f"kerasfrac {command}, pid {os.getpid()} on {socket.gethostname()}, "
                f"started {started}\n"
            )
            f.flush()
        yield
    finally:
        del _HELD[key]
        try:  # the last holder removes the file, still locked: a waiter then sees a new inode
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            path.unlink(missing_ok=True)
        except OSError:
            pass  # another reader holds it: it stays for them
        f.close()


def save_figure(fig, path, **savefig) -> Path:
    """``fig.savefig(path, **savefig)`` through a temporary file renamed onto ``path``: a
    reader (TensorBoard, a browser) or a full disk never sees half a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, **savefig)
        replace_file(Path(tmp), path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


# --------------------------------------------------------------------------- checkpoint state

#: The checkpoint state file (in ``checkpoints/``), which ``training.checkpoint`` commits.
STATE = "state.json"


def state_path(run_dir: Path) -> Path:
    return checkpoints_dir(run_dir) / STATE


def read_state(run_dir: Path) -> dict | None:
    path = state_path(run_dir)
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        state = err
    if not isinstance(state, dict):
        model = model_path(run_dir)
        kept = (
            f"The run's model ({str(model)!r}) is untouched, and evaluate, explain and predict "
            "work without the state. "
            if model.is_file()
            else ""
        )
        raise RunDirError(
            f"{str(path)!r} is not a kerasfrac run state ({reprlib.repr(str(state))}); it was "
            f"edited or damaged outside kerasfrac, so training cannot resume this run. {kept}"
            "To train again, use another --run-dir (--overwrite would delete this run, its "
            "model and checkpoints included)."
        )
    return state
