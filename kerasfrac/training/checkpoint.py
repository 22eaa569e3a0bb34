"""The run directory's checkpoints, committed as one unit, and what --overwrite may delete.

A checkpoint is the model with its optimizer state (``model.keras``), the in-progress epoch's
per-example results when it is saved mid-epoch (``partial_epoch.npz``), ``history.csv`` as it
stood and ``best.keras`` as it stood. All of it is written into a hidden folder, which is
renamed to ``checkpoints/gen-NNNNNN/``; then ``checkpoints/state.json`` is replaced (one
atomic rename, the commit) by a state that names that folder; only then are older generations
deleted. A kill at any instant therefore leaves a state.json that names a complete
generation, and resuming loads it and puts its history.csv and best.keras back: no epoch is
lost, none is logged twice, and a deterministic run ends with the weights it would have had
uninterrupted (tests/test_crash.py kills training at every commit step and at random
instants to check this).

state.json is written when a run starts, with no checkpoint yet: a run killed before its
first checkpoint is still recognised as a kerasfrac run, and ``--resume``/``--auto-resume``
start it over. ``--overwrite`` deletes a folder only when it holds ``checkpoints/state.json``
and does not contain the training data.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import signal
import tempfile
from pathlib import Path

import numpy as np

from kerasfrac import runs
from kerasfrac.runs import (  # noqa: F401  (the run directory's, used here and re-exported)
    STATE,
    RunDirError,
    fsync_dir,
    fsync_file,
    read_state,
    replace_file,
    state_path,
    write_text,
)

GEN_PREFIX = "gen-"
#: Test-only fault injection: ``KERASFRAC_CRASH_AT=N`` SIGKILLs the process at the Nth
#: crash point (each step of a checkpoint commit and of the final writes).
CRASH_ENV = "KERASFRAC_CRASH_AT"
_crash_points = itertools.count(1)


def crash() -> None:
    """What a crash point does when its turn comes: die as ``kill -9`` would (no cleanup)."""
    os.kill(os.getpid(), signal.SIGKILL)


def crash_point(where: str = "") -> None:
    """A place where a kill must leave a resumable run (see CRASH_ENV); ``where`` names it
    for tests."""
    at = os.environ.get(CRASH_ENV)
    if at and next(_crash_points) == int(at):
        crash()


# --------------------------------------------------------------------------- durable writes


def save_model(model, path: Path) -> None:
    """``model.save(path)`` that a kill or a full disk cannot leave half-written."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp.keras", dir=path.parent)
    os.close(fd)
    try:
        model.save(tmp)
        replace_file(Path(tmp), path)
    finally:
        Path(tmp).unlink(missing_ok=True)


# --------------------------------------------------------------------------- state


def has_checkpoint(state: dict | None, run_dir: Path) -> bool:
    """Whether ``state`` names a checkpoint to resume from (runs of older kerasfrac versions
    kept it in checkpoints/last.keras, without a generation)."""
    if not state:
        return False
    if "checkpoint" in state:
        return state["checkpoint"] is not None
    return (runs.checkpoints_dir(run_dir) / "last.keras").is_file()


def write_state(run_dir, epoch, step, steps, best, finished, digest=None, **extra) -> None:
    """Replace state.json in one rename; the generation fields carry over unless given."""
    previous = read_state(run_dir) or {}
    # ModelCheckpoint.best is None until the first epoch ends, +-inf in some Keras versions.
    value = getattr(best, "best", best)
    value = float(value) if isinstance(value, int | float) and math.isfinite(value) else None
    state = {
        "epoch": epoch,
        "step": step,
        "steps_per_epoch": steps,
        "best_val_auroc": value,
        "finished": finished,
    }
    for key in ("checkpoint", "generation", "best_stat", "precision"):
        state[key] = extra.get(key, previous.get(key))
    if "stopped_early" in extra:  # train.early_stopping_patience ended the run
        state["stopped_early"] = bool(extra["stopped_early"])
    if digest:
        state["weights_sha256"] = digest
    write_text(state_path(run_dir), json.dumps(state) + "\n")


def begin(run_dir: Path, precision: str | None = None) -> None:
    """Mark ``run_dir`` as a run that started and has no checkpoint yet; ``precision`` is
    the Keras policy it trains in (a resume of ``train.precision: auto`` keeps it)."""
    runs.checkpoints_dir(run_dir).mkdir(parents=True, exist_ok=True)
    write_state(
        run_dir,
        0,
        0,
        None,
        None,
        finished=False,
        checkpoint=None,
        generation=0,
        precision=precision,
    )
    crash_point("begin")


# --------------------------------------------------------------------------- checkpoints


def _stat(path: Path) -> list[int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def save(run_dir: Path, model, epoch: int, step: int, steps: int, best, accum=None) -> None:
    """Commit a checkpoint after ``step`` steps of epoch ``epoch`` (step 0: epoch finished)."""
    run_dir = Path(run_dir)
    ckpt = runs.checkpoints_dir(run_dir)
    previous = read_state(run_dir) or {}
    generation = int(previous.get("generation") or 0) + 1
    name = f"{GEN_PREFIX}{generation:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=ckpt))
    model.save(tmp / runs.MODEL)
    if step:
        arrays = {
            f"{key}_{i}": a
            for key, parts in zip(("loss", "prob", "label"), accum)
            for i, a in enumerate(parts)
        }
        with open(tmp / "partial_epoch.npz", "wb") as f:
            np.savez(f, **arrays)
    if runs.history_path(run_dir).is_file():
        shutil.copyfile(runs.history_path(run_dir), tmp / runs.HISTORY)
    best_file, best_stat = runs.best_path(run_dir), _stat(runs.best_path(run_dir))
    if best_stat is not None:
        kept = ckpt / str(previous.get("checkpoint")) / runs.BEST
        try:  # unchanged since the last generation: link it (generations are never rewritten)
            if best_stat != previous.get("best_stat") or not kept.is_file():
                raise FileNotFoundError(kept)
            os.link(kept, tmp / runs.BEST)
        except OSError:  # changed, or a file system without hard links
            shutil.copyfile(best_file, tmp / runs.BEST)
    for f in tmp.iterdir():
        fsync_file(f)
    fsync_dir(tmp)
    crash_point(f"{name} written")
    if (ckpt / name).exists():  # written by a run killed before it committed it
        shutil.rmtree(ckpt / name)
    os.rename(tmp, ckpt / name)
    fsync_dir(ckpt)
    crash_point(f"{name} renamed")
    write_state(
        run_dir,
        epoch,
        step,
        steps,
        best,
        finished=False,
        checkpoint=name,
        generation=generation,
        best_stat=best_stat,
    )
    crash_point(f"{name} committed")
    remove_stale(ckpt, keep=name)
    crash_point(f"{name} cleaned")


def remove_stale(ckpt: Path, keep: str | None) -> None:
    """Delete generations other than ``keep`` and unfinished ones (``.gen-*``)."""
    for p in ckpt.iterdir():
        if p.is_dir() and p.name != keep and p.name.lstrip(".").startswith(GEN_PREFIX):
            shutil.rmtree(p, ignore_errors=True)
        elif p.is_file() and p.name.startswith(".") and p.name.endswith(".tmp"):
            p.unlink(missing_ok=True)


def _folder(run_dir: Path, state: dict) -> Path:
    ckpt = runs.checkpoints_dir(run_dir)
    if "checkpoint" not in state:  # older kerasfrac: checkpoints/last.keras
        return ckpt
    folder = ckpt / state["checkpoint"]
    if not (folder / runs.MODEL).is_file():
        raise RunDirError(
            f"{str(state_path(run_dir))!r} names the checkpoint {str(folder)!r}, which is "
            "missing or incomplete (removed outside kerasfrac?); pass --overwrite to start "
            "this run over."
        )
    return folder


def load(run_dir: Path, state: dict):
    """``(model, partial)`` of the checkpoint ``state`` names; read-only (every worker)."""
    from kerasfrac.models import load_model

    folder = _folder(run_dir, state)
    legacy = "checkpoint" not in state
    model = load_model(folder / ("last.keras" if legacy else runs.MODEL))
    partial = None
    if state.get("step"):
        with np.load(folder / "partial_epoch.npz") as z:
            parts = {key: [] for key in ("loss", "prob", "label")}
            for key in sorted(z.files, key=lambda k: (k.split("_")[0], int(k.split("_")[1]))):
                parts[key.split("_")[0]].append(z[key])
        partial = parts["loss"], parts["prob"], parts["label"]
    return model, partial


def rewind(run_dir: Path, state: dict) -> None:
    """Put the run directory back to the committed checkpoint (chief only): its history.csv
    and best.keras replace what an interrupted epoch may have written after the commit."""
    if "checkpoint" not in state:
        return  # older kerasfrac: nothing was kept to rewind to
    folder = _folder(run_dir, state)
    for name, target in (
        (runs.HISTORY, runs.history_path(run_dir)),
        (runs.BEST, runs.best_path(run_dir)),
    ):
        if (folder / name).is_file():
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=target.parent)
            os.close(fd)
            shutil.copyfile(folder / name, tmp)
            replace_file(Path(tmp), target)
        else:
            target.unlink(missing_ok=True)
    stat = _stat(runs.best_path(run_dir))
    if stat is not None:  # the copy is a new file: record it, so the next save may link it
        write_state(
            run_dir,
            state["epoch"],
            state["step"],
            state["steps_per_epoch"],
            state["best_val_auroc"],
            state["finished"],
            best_stat=stat,
        )
    remove_stale(runs.checkpoints_dir(run_dir), keep=state["checkpoint"])
    # what a kill left of model.keras, metrics.json, history.csv, config.yaml being replaced
    for pattern in (
        ".model.*.tmp.keras",
        ".metrics.json.*.tmp",
        ".history.csv.*.tmp",
        ".config.yaml.tmp",
    ):
        for p in run_dir.glob(pattern):
            p.unlink(missing_ok=True)


# --------------------------------------------------------------------------- the run directory


def _occupied(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds anything (an empty checkpoints/ of a start is nothing)."""
    if not run_dir.is_dir():
        return False
    return any(
        not (p.name == runs.CHECKPOINTS and p.is_dir() and not any(p.iterdir()))
        for p in run_dir.iterdir()
    )


def _refuse_if_holds(run_dir: Path, protect) -> None:
    here = run_dir.resolve()
    for p in protect:
        if p is None or str(p) == "":
            continue
        other = Path(p).expanduser().resolve()
        if other == here or here in other.parents:
            raise RunDirError(
                f"refusing to delete {str(run_dir)!r}: it holds {str(p)!r}, which this run "
                "needs (the training data). Choose a --run-dir outside it. Nothing was changed."
            )


def _delete_run(run_dir: Path, protect) -> None:
    _refuse_if_holds(run_dir, protect)
    shutil.rmtree(run_dir)


def _continue_needs(state: dict, epochs: int | None, patience: int | None) -> list[str]:
    """What --resume still lacks to continue the finished run ``state`` (empty: nothing):
    more epochs than it trained, and, for a run that stopped early, early stopping off (with
    a patience it would stop again before its first step)."""
    done = int(state.get("epoch") or 0)
    needs = []
    if epochs is None or epochs <= done:
        needs.append(f"more epochs (--set train.epochs=N, N > {done})")
    if state.get("stopped_early") and patience is not None:
        needs.append("early stopping off (--set train.early_stopping_patience=null)")
    return needs


def can_continue(state: dict | None, epochs: int | None, patience: int | None = None) -> bool:
    """Whether a finished run (``state``) has a checkpoint and --resume with ``epochs`` and
    ``patience`` continues it (``_continue_needs``)."""
    return bool(
        state
        and state.get("finished")
        and state.get("checkpoint")
        and not _continue_needs(state, epochs, patience)
    )


def prepare_run_dir(
    run_dir: Path,
    resume: bool,
    overwrite: bool,
    protect=(),
    epochs: int | None = None,
    patience: int | None = None,
) -> dict | None:
    """Check what ``run_dir`` holds against --resume/--overwrite; return the state to resume
    (None: start fresh). ``protect``: paths (the data) that must not be deleted with it.
    ``epochs``: the epochs asked for; a finished run with fewer is continued by --resume
    (one that stopped early only with ``patience`` None: see ``can_continue``)."""
    run_dir = Path(run_dir)
    is_run = state_path(run_dir).is_file()
    occupied = _occupied(run_dir)
    if occupied and overwrite and not resume:
        if not is_run:
            raise RunDirError(
                f"refusing to --overwrite {str(run_dir)!r}: it is not a kerasfrac run directory "
                "(no checkpoints/state.json), and --overwrite deletes only runs. Choose an empty "
                "or new --run-dir, or delete it yourself. Nothing was changed."
            )
        _delete_run(run_dir, protect)
        return None
    state = read_state(run_dir)
    if resume:
        if state is None:
            raise RunDirError(
                f"--resume: {str(run_dir)!r} holds no kerasfrac run to resume (no "
                "checkpoints/state.json); start it without --resume."
            )
        if state.get("finished") and not can_continue(state, epochs, patience):
            done = int(state.get("epoch") or 0)
            why = (
                f"stopped early after epoch {done} (val AUROC stopped improving)"
                if state.get("stopped_early")
                else f"already finished all its {done} epochs"
            )
            needs = _continue_needs(state, epochs, patience)
            if not needs:  # only the checkpoint is missing: nothing to continue from
                why += ", and its state names no checkpoint"
            fix = f"resume with {' and '.join(needs)}, or " if needs else ""
            raise RunDirError(
                f"--resume: the run in {str(run_dir)!r} {why}; to continue it, {fix}use "
                "--overwrite."
            )
        if not has_checkpoint(state, run_dir):
            print(
                f"note: the run in {run_dir} stopped before its first checkpoint; starting it "
                "over.",
                flush=True,
            )
            _delete_run(run_dir, protect)
            return None
        rewind(run_dir, state)
        return read_state(run_dir)
    if occupied and state is None:  # --overwrite would refuse it: do not offer it
        raise RunDirError(
            f"run directory {str(run_dir)!r} holds files that are not a kerasfrac run (no "
            "checkpoints/state.json); choose an empty or new --run-dir. Nothing was changed."
        )
    if occupied:
        what = (
            "a finished run"
            if state and state.get("finished")
            else "an unfinished run (continue it with --resume or --auto-resume)"
        )
        raise RunDirError(
            f"run directory {str(run_dir)!r} already holds {what}; pass --overwrite to replace "
            "it or choose another --run-dir. Nothing was changed."
        )
    return None


def has_unfinished_run(run_dir: Path) -> bool:
    state = read_state(run_dir)
    return bool(state and not state.get("finished"))


def finished_metrics(run_dir: Path, epochs: int) -> dict | None:
    """The metrics a run that finished ``epochs`` epochs or stopped early wrote at its end
    (test's; val's where it held test back), for a requeued job that has nothing left to do;
    else None."""
    state = read_state(run_dir)
    done = state and (state.get("epoch") == epochs or state.get("stopped_early"))
    if not (done and state.get("finished")):
        return None
    try:
        return runs.read_metrics(run_dir) or runs.read_metrics(run_dir, "val")
    except ValueError:
        return None  # then the usual refusal names the run


def resumable_state(run_dir: Path) -> dict | None:
    """The state to resume from on a worker (read-only), None where there is no checkpoint."""
    state = read_state(run_dir)
    return state if has_checkpoint(state, run_dir) else None
