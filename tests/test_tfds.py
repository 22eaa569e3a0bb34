"""The build is a tensorflow-datasets dataset: TFDS reads it as read_split does, and the
registered builders prepare the same dataset offline from the user's copy.

Synthetic phantoms here; the real FracAtlas subset in test_fracatlas_mini.py.
"""

from __future__ import annotations

import json
import shutil
import socket
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import tfrecords_builder.tfds_builders  # noqa: F401  (registers the builders)
from tfrecords_builder import read_split, schema
from tfrecords_builder.build import BuildOptions, build
from tfrecords_builder.datasets import synthetic

OPTS = dict(progress=False, shards=3)
#: TFDS reads the shards one after the other: read_split's order.
IN_ORDER = tfds.ReadConfig(interleave_cycle_length=1)


def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in this test")


@pytest.fixture
def offline(monkeypatch):
    """Any connection attempt from Python fails; TFDS' GCS look-ups are off."""
    from tensorflow_datasets.core.utils import gcs_utils

    for name in ("create_connection", "getaddrinfo"):
        monkeypatch.setattr(socket, name, _no_network)
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    monkeypatch.setattr(gcs_utils, "_is_gcs_disabled", True)
    with pytest.raises(OSError, match="disabled"):
        socket.create_connection(("tensorflow.org", 443), timeout=1)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    src = tmp_path_factory.mktemp("tfds") / "raw"
    synthetic.generate(src, count=60, image_size=48, seed=3)
    return src


@pytest.fixture(scope="module")
def built(phantoms):
    out = phantoms.parent / "built"
    return out, build("synthetic", phantoms, out, BuildOptions(**OPTS))


def records(ds) -> list[dict]:
    return list(tfds.as_numpy(ds))


def assert_same_examples(tfds_examples: list[dict], ours: list[dict]) -> None:
    """TFDS' nested examples against read_split's flat ones, in order, field by field; images
    as pixels, or as bytes where TFDS skipped decoding (read_split's ``encoded``)."""
    assert len(tfds_examples) == len(ours) > 0
    for t, r in zip(tfds_examples, ours, strict=True):
        for key in ("image_id", "file", "source", "sha256", "group", "label", "height", "width"):
            assert t[key] == r[key], key
        assert t["image_format"] == r["format"]
        np.testing.assert_array_equal(t["objects"]["bbox"], r["boxes"])
        if "meta" in t:
            assert t["meta"] == r["meta"]
        if isinstance(t["image"], bytes):
            assert t["image"] == r["encoded"]
            continue
        # TFDS decodes to the feature's channel count; the pixels are the same.
        channels = t["image"].shape[-1]
        expect = r["image"] if r["image"].shape[-1] == channels else r["image"][..., :1]
        np.testing.assert_array_equal(t["image"][..., : expect.shape[-1]], expect)


def test_a_build_leaves_nothing_in_the_temp_folder(phantoms, tmp_path, monkeypatch):
    """TFDS' builder, constructed on a folder not yet prepared, looks for a dataset info on
    GCS (off) after making an empty temporary folder it never removes: one per build, left in
    the user's /tmp. kerasfrac's builders remove it."""
    import tempfile

    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    build("synthetic", phantoms, tmp_path / "out", BuildOptions(**OPTS))
    assert (tmp_path / "out" / "manifest.json").is_file()
    assert tempfile.gettempdir() == str(system_tmp)  # restored
    assert sorted(p.name for p in system_tmp.iterdir()) == []


@pytest.mark.slow
def test_tfds_reads_the_build_as_read_split_does(built):
    out, m = built
    builder = tfds.builder_from_directory(out)
    assert builder.info.features["label"].names == ["normal", "fractured"]
    for split in schema.SPLITS:
        n = sum(m["splits"][split].values())
        assert builder.info.splits[split].num_examples == n
        ours = list(read_split(out, split).as_numpy_iterator())
        assert_same_examples(records(builder.as_dataset(split=split, read_config=IN_ORDER)), ours)
        # TFDS' default read interleaves the shards: the same records, as a set.
        by_id = {ex["image_id"]: ex for ex in records(builder.as_dataset(split=split))}
        assert_same_examples([by_id[r["image_id"]] for r in ours], ours)
    shuffled = builder.as_dataset(split="train", shuffle_files=True)  # not an ordered dataset
    assert len(records(shuffled)) == sum(m["splits"]["train"].values())
    info = json.loads((out / "dataset_info.json").read_text())
    assert info["name"] == "kerasfrac_synthetic"
    assert {s["name"] for s in info["splits"]} == set(schema.SPLITS)
    shards = sorted(p.name for p in out.iterdir() if ".tfrecord-" in p.name)
    assert shards == sorted(n for names in m["shards"].values() for n in names)
    assert "kerasfrac_synthetic-test.tfrecord-00000-of-00003" in shards


def test_image_bytes_are_the_source_files(built, phantoms):
    out, _ = built
    rows = {}
    for ex in tfds.as_numpy(
        tfds.builder_from_directory(out).as_dataset(
            split="train", decoders={"image": tfds.decode.SkipDecoding()}
        )
    ):
        rows[ex["file"].decode()] = ex["image"]
    assert len(rows) > 10
    for rel, encoded in rows.items():
        assert encoded == (phantoms / rel).read_bytes()


def test_split_slicing_and_even_splits_follow_the_stratified_counts(built):
    out, m = built
    builder = tfds.builder_from_directory(out)
    n_train = sum(m["splits"]["train"].values())
    labels = Counter(int(ex["label"]) for ex in records(builder.as_dataset(split="train")))
    assert labels == {1: m["splits"]["train"]["fractured"], 0: m["splits"]["train"]["normal"]}
    tenth = records(builder.as_dataset(split="train[:10%]"))
    assert len(tenth) == round(n_train / 10)
    halves = tfds.even_splits("train", n=2)
    sizes = [len(records(builder.as_dataset(split=s))) for s in halves]
    assert sum(sizes) == n_train and abs(sizes[0] - sizes[1]) <= 1
    # Per-worker sharding: two input contexts see disjoint halves of the files.
    ids = []
    for worker in range(2):
        ctx = tf.distribute.InputContext(2, worker, 1)
        ds = builder.as_dataset(split="train", read_config=tfds.ReadConfig(input_context=ctx))
        ids.append({ex["image_id"] for ex in records(ds)})
    assert ids[0] and ids[1] and not ids[0] & ids[1]
    assert len(ids[0] | ids[1]) == n_train


def test_as_dataframe_shows_the_metadata(built):
    out, _ = built
    builder = tfds.builder_from_directory(out)
    frame = tfds.as_dataframe(builder.as_dataset(split="test[:3]"), builder.info)
    assert len(frame) == 3
    for column in ("image_id", "file", "sha256", "group", "label", "meta/hardware", "height"):
        assert column in frame.columns, column


def test_tfds_load_prepares_the_same_dataset_offline(built, phantoms, tmp_path, offline):
    out, m = built
    ds = tfds.load(
        "kerasfrac_synthetic",
        split="test",
        read_config=IN_ORDER,
        data_dir=tmp_path / "tfds",
        builder_kwargs={"options": BuildOptions(**OPTS)},
        download_and_prepare_kwargs={
            "download_config": tfds.download.DownloadConfig(manual_dir=phantoms)
        },
    )
    assert_same_examples(records(ds), list(read_split(out, "test").as_numpy_iterator()))
    prepared = tmp_path / "tfds" / "kerasfrac_synthetic" / "1.0.0"
    there = json.loads((prepared / "manifest.json").read_text())
    assert there["shards"] == m["shards"] and there["splits"] == m["splits"]
    assert there["accounting"] == m["accounting"]
    for names in m["shards"].values():
        for name in names:
            assert (prepared / name).read_bytes() == (out / name).read_bytes()
    assert (prepared / "features.json").read_bytes() == (out / "features.json").read_bytes()


def test_manual_dir_may_hold_the_zip_as_downloaded(built, phantoms, tmp_path, offline):
    out, m = built
    manual = tmp_path / "manual"
    manual.mkdir()
    with zipfile.ZipFile(manual / "phantoms.zip", "w") as z:
        for path in sorted(phantoms.rglob("*")):
            z.write(path, Path("raw") / path.relative_to(phantoms))
    builder = tfds.builder(
        "kerasfrac_synthetic", data_dir=tmp_path / "tfds", options=BuildOptions(**OPTS)
    )
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual, try_download_gcs=False)
    )
    for split in schema.SPLITS:
        got = [
            ex["sha256"] for ex in records(builder.as_dataset(split=split, read_config=IN_ORDER))
        ]
        assert got == [r["sha256"] for r in read_split(out, split).as_numpy_iterator()]
    (manual / "notes.txt").write_text("a second entry beside the zip")
    other = tfds.builder("kerasfrac_synthetic", data_dir=tmp_path / "tfds2")
    with pytest.raises(ValueError, match="holds 1 zip file"):
        other.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
    shutil.rmtree(manual)


def test_tibia_fibula_build_has_no_metadata_columns_and_round_trips(tmp_path):
    from tests import sources

    sources.make_tibia(tmp_path / "src", "mirror", copies=2)
    out = tmp_path / "out"
    m = build("tibia-fibula", tmp_path / "src", out, BuildOptions(**OPTS))
    builder = tfds.builder_from_directory(out)
    assert builder.info.name == "tibia_fibula" and "meta" not in builder.info.features
    assert "2h62x9xzyd" in builder.info.citation
    for split in schema.SPLITS:
        ours = list(read_split(out, split).as_numpy_iterator())
        assert all(r["meta"]["hand"] == schema.META_UNKNOWN for r in ours)  # parse default
        assert_same_examples(records(builder.as_dataset(split=split, read_config=IN_ORDER)), ours)
    # Copies of one file share a group, and TFDS carries it.
    assert m["duplicate_summary"]["groups"] == 2
    groups = Counter(
        ex["group"] for split in schema.SPLITS for ex in records(builder.as_dataset(split=split))
    )
    assert sorted(groups.values())[-2:] == [2, 2]


def test_an_old_format_build_is_refused_with_the_fix(built, tmp_path):
    out, _ = built
    old = tmp_path / "old"
    shutil.copytree(out, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["format_version"] = 1
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="older kerasfrac.*--overwrite"):
        read_split(old, "test")


def _can_unshare_network() -> bool:
    import subprocess

    try:
        return subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode == 0
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _can_unshare_network(), reason="no `unshare -rn` (network namespace)")
def test_tfds_load_in_a_process_without_any_network(phantoms, tmp_path):
    """Below Python too (TensorFlow's C++ file systems): an empty network namespace."""
    import subprocess
    import sys

    code = f"""
import socket, tensorflow_datasets as tfds, tfrecords_builder.tfds_builders
from tfrecords_builder.build import BuildOptions
try:
    socket.create_connection(("8.8.8.8", 53), timeout=2)
    raise SystemExit("the network is reachable: the test would prove nothing")
except OSError:
    pass
ds = tfds.load("kerasfrac_synthetic", split="train[:50%]", data_dir={str(tmp_path)!r},
               builder_kwargs={{"options": BuildOptions(progress=False, shards=3)}},
               download_and_prepare_kwargs={{"download_config":
                   tfds.download.DownloadConfig(manual_dir={str(phantoms)!r})}})
print("examples", len(list(ds)))
"""
    run = subprocess.run(
        ["unshare", "-rn", sys.executable, "-c", code], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    manifest = json.loads(
        (tmp_path / "kerasfrac_synthetic" / "1.0.0" / "manifest.json").read_text()
    )
    n_train = sum(manifest["splits"]["train"].values())
    assert f"examples {round(n_train / 2)}" in run.stdout
