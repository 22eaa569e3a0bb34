"""Shared fixtures: small TFRecord build directories written through the schema contract.

``make_tfrecord_dir`` writes what ``kerasfrac build`` writes (shards named by
``schema.shard_name`` plus ``manifest.json``) without needing the builder, so the data, model
and training tests run on their own. With ``separable=True`` a fractured image has a bright
vertical bar on a dark noisy background and a normal one has none: a model that learns
anything separates them (learning checks rely on this).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from kerasfrac import config
from tfrecords_builder import schema

Counts = int | dict[str, int | dict[str, int]]


def _split_counts(n_per_class_per_split: Counts) -> dict[str, dict[str, int]]:
    """int -> same count everywhere; {split: n} or {split: {"fractured": n, "normal": m}}."""
    if isinstance(n_per_class_per_split, int):
        n_per_class_per_split = {s: n_per_class_per_split for s in schema.SPLITS}
    counts = {}
    for split in schema.SPLITS:
        value = n_per_class_per_split.get(split, 0)
        if isinstance(value, int):
            value = {"fractured": value, "normal": value}
        counts[split] = {"fractured": int(value["fractured"]), "normal": int(value["normal"])}
    return counts


def fixture_image(
    rng: np.random.Generator,
    label: int,
    size: int | tuple[int, int],
    channels: int = 1,
    separable: bool = True,
) -> np.ndarray:
    """uint8 [H, W, C]: dark noise; fractured (label 1, separable) adds a bright vertical bar."""
    h, w = (size, size) if isinstance(size, int) else size
    image = rng.integers(0, 90, size=(h, w), dtype=np.uint8)
    if separable and label == 1:
        bar = max(1, w // 8)
        x0 = int(rng.integers(0, w - bar + 1))
        image[:, x0 : x0 + bar] = 255
    if channels == 1:
        return image[..., None]
    tint = rng.integers(0, 30, size=(h, w, channels), dtype=np.uint8)  # unequal channels
    out = np.clip(image[..., None].astype(int) + tint, 0, 255).astype(np.uint8)
    if channels == 4:
        out[..., 3] = 255
    return out


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


def make_tfrecord_dir(
    path: str | Path,
    n_per_class_per_split: Counts = 8,
    size: int | tuple[int, int] = 32,
    source: str = "synthetic",
    separable: bool = True,
    *,
    num_shards: int = 2,
    channels: int = 1,
    seed: int = 0,
    size_by_label: dict[int, int | tuple[int, int]] | None = None,
    meta=None,
    boxes=None,
    group_size: int = 1,
) -> Path:
    """Write a small build directory at ``path`` and return it.

    ``n_per_class_per_split``: an int (that many fractured and normal images in each of
    train/val/test), or ``{split: n}``, or ``{split: {"fractured": n, "normal": m}}``.
    ``size``: side or (height, width); ``size_by_label`` ({label: size}) overrides it per
    class (a planted size shortcut). ``meta(rng, image) -> {column: value}``, where given, may
    draw on ``image`` in place and gives the record's metadata columns; ``boxes(rng, image,
    label) -> [(ymin, xmin, ymax, xmax), ...]`` likewise gives its fracture boxes (normalised).
    Records are written in a seeded shuffled order, round-robin over ``num_shards`` shards per
    split, with ids like ``train_fractured_0003.png``; ``group_size`` consecutive records of
    that order share a duplicate group (1: each image its own group).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    counts = _split_counts(n_per_class_per_split)
    manifest = {"source": source, "splits": counts, "shards": {}, "fixture": True}
    for split in schema.SPLITS:
        items = [
            (label, i)
            for label, name in schema.LABEL_NAMES.items()
            for i in range(counts[split][name])
        ]
        order = rng.permutation(len(items))
        shards = max(1, min(num_shards, len(items)))
        names = [schema.shard_name(split, i, shards) for i in range(shards)]
        writers = [tf.io.TFRecordWriter(str(path / n)) for n in names]
        for k, idx in enumerate(order):
            label, i = items[idx]
            h, w = _hw((size_by_label or {}).get(label, size))
            image = fixture_image(rng, label, (h, w), channels, separable)
            columns = meta(rng, image) if meta is not None else None
            image_boxes = boxes(rng, image, label) if boxes is not None else []
            encoded = encode_png(image)
            image_id = f"{split}_{schema.LABEL_NAMES[label]}_{i:04d}.png"
            example = schema.make_example(
                encoded=encoded,
                image_format="png",
                height=h,
                width=w,
                channels=channels,
                image_id=image_id,
                source=source,
                sha256=hashlib.sha256(encoded).hexdigest(),
                group=image_id if group_size == 1 else f"{split}_group{k // group_size:03d}",
                label=label,
                boxes=image_boxes,
                meta=columns,
            )
            writers[k % shards].write(example.SerializeToString())
        for writer in writers:
            writer.close()
        manifest["shards"][split] = names
    (path / schema.MANIFEST).write_text(json.dumps(manifest, indent=2))
    return path


@pytest.fixture
def tfrecord_dir_factory(tmp_path_factory):
    """``factory(n_per_class_per_split=8, size=32, source="synthetic", separable=True, **kw)``
    -> a fresh build directory under pytest's tmp dir."""

    def factory(*args, **kwargs) -> Path:
        return make_tfrecord_dir(tmp_path_factory.mktemp("tfrecords"), *args, **kwargs)

    return factory


@pytest.fixture(scope="session")
def separable_tfrecord_dir(tmp_path_factory) -> Path:
    """A balanced, clearly separable synthetic build: 24 + 24 train, 8 + 8 val/test, 32 px."""
    return make_tfrecord_dir(
        tmp_path_factory.mktemp("separable"),
        {"train": 24, "val": 8, "test": 8},
        size=32,
        separable=True,
    )


@pytest.fixture(scope="module")
def synthetic_build(tmp_path_factory):
    from tfrecords_builder.build import BuildOptions, build
    from tfrecords_builder.datasets import synthetic

    root = tmp_path_factory.mktemp("boxes")
    synthetic.generate(root / "raw", count=60, fractured_fraction=0.5, image_size=64, seed=3)
    build("synthetic", root / "raw", root / "tfr", BuildOptions(progress=False, shards=2))
    return root / "tfr"


def make_run(run_dir: Path, build_dir: Path, model_size: int = 32, seed: int = 0) -> Path:
    """A run dir with an untrained (seeded) paper CNN: enough to test the plumbing (evaluate,
    predict, report, the console)."""
    import keras

    from kerasfrac.models import build_model

    cfg = config.from_dict(
        {
            "dataset": "synthetic",
            "run_dir": str(run_dir),
            "data": {"dir": str(build_dir), "image_size": 32},
            "train": {"batch_size": 8},
        }
    )
    run_dir.mkdir(parents=True)
    cfg.save(run_dir / "config.yaml")
    keras.utils.set_random_seed(seed)
    build_model(cfg.model, (model_size, model_size, 1)).save(run_dir / "model.keras")
    (run_dir / "history.csv").write_text(
        "epoch,accuracy,auroc,loss,val_accuracy,val_auroc,val_loss\n"
        "0,0.5,0.5,0.7,0.5,0.5,0.7\n1,0.6,0.7,0.6,0.55,0.6,0.65\n"
    )
    return run_dir


# --------------------------------------------------------------------------- a trained run

#: A short, reliable training configuration for the separable builds.
FAST = {
    "dataset": "synthetic",
    "data": {"image_size": 32, "cache": "memory"},
    "train": {
        "epochs": 4,
        "batch_size": 8,
        "steps_per_epoch": 25,
        "optimizer": "adam",
        "learning_rate": 1e-3,
        "weight_decay": 0.0,
    },
}


def fast_config(build_dir: Path, run_dir: Path, **train_overrides) -> config.Config:
    values = json.loads(json.dumps(FAST))
    values["data"]["dir"] = str(build_dir)
    values["run_dir"] = str(run_dir)
    values["train"].update(train_overrides)
    return config.from_dict(values)


def history(run_dir: Path) -> list[dict]:
    with (run_dir / "history.csv").open() as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, separable_tfrecord_dir):
    """A paper-CNN run trained briefly on the separable build, shared by the session: ``(run
    directory, the metrics train returned)``; tests read it and never change it."""
    from kerasfrac.training import train

    run_dir = tmp_path_factory.mktemp("runs") / "run"
    metrics = train.train(fast_config(separable_tfrecord_dir, run_dir), verbose=0)
    return run_dir, metrics


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto`` (setup.cfg): one worker per core, at most four. Each worker is a TensorFlow
    process of 1-2 GB that trains on its own threads, so more workers buy little and cost
    memory; PYTEST_XDIST_AUTO_NUM_WORKERS overrides, ``-n 0`` runs in one process."""
    override = os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS")
    if override:
        return int(override)
    return max(1, min(len(os.sched_getaffinity(0)), 4))
