"""No silent wrong results (issue 40): a lock on every run directory, builds that check
themselves, outputs written whole or not at all, and damaged files named with a fix that works.
Each test reproduces a fault found by probing and checks what happens now."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from kerasfrac import config, runs
from kerasfrac.cli import main, os_error
from kerasfrac.evaluation import evaluate
from kerasfrac.training import train
from tests.conftest import fast_config, make_tfrecord_dir
from tfrecords_builder.reader import Build, BuildOutputError, count_records

REPO = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, separable_tfrecord_dir) -> Path:
    """A finished run (1 epoch of 3 steps), copied by the tests that change it."""
    run_dir = tmp_path_factory.mktemp("integrity") / "run"
    cfg = fast_config(separable_tfrecord_dir, run_dir, epochs=1, steps_per_epoch=3)
    train.train(cfg, verbose=0)
    return run_dir


def copy_run(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest)
    cfg = config.load_config(dest / "config.yaml", [f"run_dir={dest}"])
    cfg.save(dest / "config.yaml")
    return dest


class Holder:
    """Another process that holds a run's lock (``exclusive`` or shared) until stopped."""

    def __init__(self, run_dir: Path, exclusive: bool) -> None:
        code = textwrap.dedent(
            f"""
            import sys, time
            from kerasfrac import runs
            with runs.run_lock({str(run_dir)!r}, exclusive={exclusive}, command="train"):
                print("held", flush=True)
                sys.stdin.readline()
            """
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        assert self.proc.stdout.readline().strip() == "held"

    def stop(self) -> None:
        self.proc.communicate("\n", timeout=60)
        assert self.proc.returncode == 0


# --------------------------------------------------------------------------- the run lock


def test_a_second_writer_is_refused_at_once_naming_the_holder(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = Holder(run_dir, exclusive=True)
    try:
        started = time.perf_counter()
        with pytest.raises(runs.RunLockedError) as err:
            with runs.run_lock(run_dir, exclusive=True, command="train"):
                pass
        assert time.perf_counter() - started < 5  # at once, no waiting
        assert f"pid {holder.proc.pid}" in str(err.value)
        assert "started" in str(err.value) and "Nothing was changed" in str(err.value)
        with pytest.raises(runs.RunLockedError, match="cannot read it"):  # readers wait too
            with runs.run_lock(run_dir, exclusive=False, command="evaluate"):
                pass
    finally:
        holder.stop()
    with runs.run_lock(run_dir, exclusive=True, command="train"):  # released when it ended
        assert runs.lock_path(run_dir).is_file()
    assert not runs.lock_path(run_dir).exists()  # the last holder removes the lock file


def test_readers_share_the_lock_and_keep_a_writer_out(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    reader = Holder(run_dir, exclusive=False)
    try:
        with runs.run_lock(run_dir, exclusive=False, command="predict"):  # two readers: fine
            pass
        with pytest.raises(runs.RunLockedError, match=f"pid {reader.proc.pid}"):
            with runs.run_lock(run_dir, exclusive=True, command="train"):
                pass
    finally:
        reader.stop()
    with runs.run_lock(run_dir, exclusive=True, command="train"):
        with runs.run_lock(run_dir, exclusive=False, command="evaluate"):  # nested: reused
            pass


def test_train_resume_on_a_held_run_changes_nothing(small_run, tmp_path):
    """The fault: a second --resume restored the old history.csv before failing. Now the lock
    comes first: the run's files are byte for byte as they were."""
    run_dir = copy_run(small_run, tmp_path / "run")
    cfg = config.load_config(run_dir / "config.yaml", ["train.epochs=2"])
    before = snapshot(run_dir)
    holder = Holder(run_dir, exclusive=True)
    try:
        with pytest.raises(runs.RunLockedError, match="is in use"):
            train.train(cfg, resume=True, verbose=0)
        with pytest.raises(runs.RunLockedError):
            train.train(cfg, overwrite=True, verbose=0)
        with pytest.raises(runs.RunLockedError):
            evaluate.evaluate_run(run_dir, "val", n_bootstrap=0)
    finally:
        holder.stop()
    assert snapshot(run_dir) == before


# --------------------------------------------------------------------------- builds


def _corrupt(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_build_records_and_checks_each_shards_count_and_hash(synthetic_build, tmp_path):
    build_dir = tmp_path / "tfr"
    shutil.copytree(synthetic_build, build_dir)
    manifest = json.loads((build_dir / "manifest.json").read_text())
    b = Build.load(build_dir)
    for split, names in manifest["shards"].items():
        lengths = [count_records(build_dir / n) for n in names]
        assert manifest["shard_records"][split] == lengths
        assert sum(lengths) == b.size(split)
        assert all(len(h) == 64 for h in manifest["shard_sha256"][split])
    assert b.verify(hashes=True) == {s: b.size(s) for s in manifest["shards"]}

    # The fault: train normals edited 287 -> 100 trained with 15 steps per epoch, silently.
    edited = json.loads(json.dumps(manifest))
    edited["splits"]["train"]["normal"] -= 7
    (build_dir / "manifest.json").write_text(json.dumps(edited))
    with pytest.raises(BuildOutputError, match=r"split 'train' .* manifest.json counts"):
        Build.load(build_dir)
    assert "kerasfrac build synthetic --source" in _message(Build.load, build_dir)

    # A shard cut short is named from its record headers alone.
    (build_dir / "manifest.json").write_text(json.dumps(manifest))
    shard = build_dir / manifest["shards"]["val"][0]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(BuildOutputError, match=r"ends inside its record"):
        Build.load(build_dir)


def _message(fn, *args) -> str:
    with pytest.raises(BuildOutputError) as err:
        fn(*args)
    return str(err.value)


def test_damaged_shards_are_named_with_the_split_and_the_rebuild(synthetic_build, tmp_path):
    build_dir = tmp_path / "tfr"
    shutil.copytree(synthetic_build, build_dir)
    manifest = json.loads((build_dir / "manifest.json").read_text())
    shard = build_dir / manifest["shards"]["test"][1]
    _corrupt(shard, 12 + 20)  # inside the first record's data (after its 12-byte header)
    b = Build.load(build_dir)  # the cheap check reads headers only: counts still agree
    msg = _message(b.verify)
    assert f"shard '{shard.name}' of split 'test'" in msg and "is damaged after record" in msg
    assert f"--out {build_dir}" in msg and "--overwrite" in msg
    # `train` reads val and test once before its first step: the fault is named at once.
    cfg = fast_config(build_dir, tmp_path / "run", epochs=1)
    with pytest.raises(BuildOutputError, match=f"shard '{shard.name}' of split 'test'"):
        train.train(cfg, verbose=0)
    assert not (tmp_path / "run" / "history.csv").exists()


def test_audit_verify_catches_a_shard_rewritten_with_valid_records(
    synthetic_build, tmp_path, capsys
):
    """Records reordered inside a shard keep every CRC and count; only the hash differs."""
    import tensorflow as tf

    build_dir = tmp_path / "tfr"
    shutil.copytree(synthetic_build, build_dir)
    manifest = json.loads((build_dir / "manifest.json").read_text())
    shard = build_dir / manifest["shards"]["train"][0]
    records = list(tf.data.TFRecordDataset(str(shard)).as_numpy_iterator())
    with tf.io.TFRecordWriter(str(shard)) as w:
        for r in reversed(records):
            w.write(r)
    Build.load(build_dir).verify()  # CRCs and counts: fine
    rc = main(["audit", str(build_dir), "--verify", "--bootstrap", "0"])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"shard '{shard.name}' of split 'train'" in err and "sha256" in err
    assert not list((build_dir / "audit").iterdir())  # nothing written (checked writable)


def test_audit_verify_passes_and_says_so(synthetic_build, tmp_path, capsys):
    out = tmp_path / "card"
    rc = main(["audit", str(synthetic_build), "--verify", "--bootstrap", "0", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    total = sum(Build.load(synthetic_build).size(s) for s in ("train", "val", "test"))
    assert f"verified: {total} records read without error; each shard's sha256 matches" in printed
    assert json.loads((out / "audit.json").read_text())["verified"]["sha256_checked"] is True


def test_audit_flags_class_counts_that_differ_from_the_records(synthetic_build, tmp_path):
    """Counts swapped between classes keep every total: only the labels tell."""
    from kerasfrac.evaluation import audit

    build_dir = tmp_path / "tfr"
    shutil.copytree(synthetic_build, build_dir)
    manifest = json.loads((build_dir / "manifest.json").read_text())
    c = manifest["splits"]["val"]
    c["fractured"], c["normal"] = c["fractured"] + 1, c["normal"] - 1
    (build_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BuildOutputError, match=r"'val' split .* by its records' labels"):
        audit.audit(build_dir, tmp_path / "card", n_bootstrap=0)


def test_audit_checks_its_output_folder_before_any_work(synthetic_build, tmp_path, monkeypatch):
    from kerasfrac.evaluation import audit

    def never(*args, **kwargs):
        raise AssertionError("features computed before the output folder was checked")

    monkeypatch.setattr(audit, "features", never)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(OSError, match=r"cannot write into .*a-file/card.* choose a writable"):
        audit.audit(synthetic_build, blocker / "card", n_bootstrap=0)


# --------------------------------------------------------------------------- outputs


def test_best_keras_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """The fault: Keras' ModelCheckpoint wrote best.keras in place; a full disk left it
    truncated. BestModel writes a temporary file and renames it."""
    import keras

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    best = train.BestModel(tmp_path / "best.keras")
    best.set_model(model)
    best.on_epoch_end(0, {"val_auroc": 0.6})
    saved = (tmp_path / "best.keras").read_bytes()
    best.on_epoch_end(1, {"val_auroc": 0.5})  # not better: not saved
    best.on_epoch_end(2, {"val_auroc": float("nan")})
    assert best.best == 0.6 and (tmp_path / "best.keras").read_bytes() == saved

    def disk_full(path, *args, **kwargs):
        Path(path).write_bytes(b"PK\x03\x04 half a zip")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(model, "save", disk_full)
    with pytest.raises(OSError):
        best.on_epoch_end(3, {"val_auroc": 0.9})
    assert (tmp_path / "best.keras").read_bytes() == saved
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.keras"]  # no temporary left


def test_figures_and_predictions_are_replaced_whole(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    fig = plt.figure()
    path = runs.save_figure(fig, tmp_path / "roc.png")
    first = path.read_bytes()
    assert first.startswith(b"\x89PNG")

    def disk_full(target, **kwargs):
        Path(target).write_bytes(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    monkeypatch.setattr(fig, "savefig", disk_full)
    with pytest.raises(OSError):
        runs.save_figure(fig, path)
    assert path.read_bytes() == first and len(list(tmp_path.iterdir())) == 1
    plt.close(fig)

    csv_path = tmp_path / "predictions_val.csv"
    runs.write_predictions(csv_path, ["a", "b"], [0, 1], np.array([0.25, 0.75]))
    assert csv_path.read_text().splitlines() == [
        "image_id,label,probability",
        "a,0,0.250000",
        "b,1,0.750000",
    ]


def test_an_empty_or_cut_predictions_file_is_computed_again(small_run, tmp_path, capsys):
    """The fault: a 0-byte predictions_val.csv (a full disk) blocked every retry."""
    run_dir = copy_run(small_run, tmp_path / "run")
    want = evaluate.evaluate_run(run_dir, "val", n_bootstrap=0)
    full = runs.predictions_path(run_dir, "val").read_text()
    for damaged in ("", full[: len(full) // 2]):
        runs.predictions_path(run_dir, "val").write_text(damaged)
        got = evaluate.evaluate_run(run_dir, "val", n_bootstrap=0)
        assert (
            "is empty or incomplete; the predictions are computed again" in capsys.readouterr().out
        )
        assert got["auroc"] == want["auroc"] and got["predictions"] == "computed"
        assert runs.predictions_path(run_dir, "val").read_text() == full


def test_explain_with_out_elsewhere_leaves_the_run_unchanged(small_run, tmp_path):
    from kerasfrac.explain import explain_run
    from kerasfrac.options import ExplainOptions

    before = snapshot(small_run)
    result = explain_run(
        small_run, ExplainOptions(what=("feature-maps",), n_images=1), out=tmp_path / "x"
    )
    assert result["figures"] and all(Path(f).is_relative_to(tmp_path) for f in result["figures"])
    assert snapshot(small_run) == before


# --------------------------------------------------------------------------- damaged files named


def test_damaged_run_files_are_named_and_the_advice_keeps_the_model(small_run, tmp_path):
    run_dir = copy_run(small_run, tmp_path / "run")
    (run_dir / "history.csv").write_text("epoch,loss,val_auroc\n0,0.5,not-a-number\n")
    with pytest.raises(ValueError, match=r"training history .*history.csv.*checkpoints/gen-"):
        evaluate.evaluate_run(run_dir, "val", n_bootstrap=0)
    shutil.copy(small_run / "history.csv", run_dir / "history.csv")

    runs.state_path(run_dir).write_text("{half")
    with pytest.raises(runs.RunDirError) as err:
        train.train(config.load_config(run_dir / "config.yaml"), resume=True, verbose=0)
    assert "model" in str(err.value) and "is untouched" in str(err.value)
    assert "--overwrite would delete this run" in str(err.value)
    assert evaluate.evaluate_run(run_dir, "val", n_bootstrap=0)["epochs"] is None  # still works

    (run_dir / "config.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    with pytest.raises(config.ConfigError, match=r"config.yaml' is not text"):
        config.load_config(run_dir / "config.yaml")


def test_os_and_tensorflow_errors_end_in_one_line_naming_the_fix(tmp_path, capsys):
    full = os_error(OSError(errno.ENOSPC, "No space left on device", "/runs/x/model.keras"))
    assert "'/runs/x/model.keras'" in full and "the disk is full" in full
    assert "--run-dir/--out" in os_error(OSError(errno.EROFS, "Read-only file system", "/ro"))

    build_dir = make_tfrecord_dir(tmp_path / "tfr", {"train": 8, "val": 4, "test": 4}, size=16)
    manifest = json.loads((build_dir / "manifest.json").read_text())
    for name in manifest["shards"]["train"]:  # the train split is not checked before step 1
        _corrupt(build_dir / name, 12 + 20)  # the first record's data: its CRC fails
    rc = main(
        [
            "train",
            "--run-dir",
            str(tmp_path / "run"),
            "--set",
            f"data.dir={build_dir}",
            "--set",
            "dataset=synthetic",
            "--set",
            "data.image_size=16",
            "--set",
            "train.epochs=1",
            "--set",
            "train.batch_size=4",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert err[-1].startswith("kerasfrac train: error: a TFRecord shard is damaged")
    assert "kerasfrac audit DATA_DIR --verify" in err[-1]
    assert "Traceback" not in "\n".join(err)


def test_lock_file_lives_beside_the_run_whatever_path_names_it(tmp_path):
    (tmp_path / "runs").mkdir()
    os.symlink(tmp_path / "runs", tmp_path / "link")
    assert runs.lock_path(tmp_path / "link" / "r") == runs.lock_path(tmp_path / "runs" / "r/")
    assert runs.lock_path(tmp_path / "runs" / "r").name == ".r.lock"


def test_reading_a_run_that_does_not_exist_creates_nothing(tmp_path, capsys):
    assert main(["evaluate", "--run-dir", str(tmp_path / "a" / "b" / "run")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()  # no parent folder, no lock file made for it


def test_run_files_are_readable_by_the_group_as_open_would_make_them(tmp_path):
    """Atomic writes go through mkstemp (owner-only 0600); the file they leave has the mode
    a plain open gives, so colleagues sharing a cluster folder can read report.html."""
    import os

    from kerasfrac import runs

    old = os.umask(0o022)
    try:
        runs.write_text(tmp_path / "report.html", "<p>ok</p>")
        runs.write_bytes(tmp_path / "a.bin", b"\x00")
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(old)
    for name in ("report.html", "a.bin"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "plain.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "report.html").read_text() == "<p>ok</p>"
