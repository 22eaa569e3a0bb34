"""Extending kerasfrac from outside the package (docs/extending.md shows this code).

A backbone registered in this file, editing no package file, is validated by the config,
listed by ``train --list-keys``, and trains, evaluates, explains and predicts through the
normal entry points; on separable data it must actually learn.
"""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from kerasfrac import config
from kerasfrac.cli import main
from kerasfrac.models import FEATURES, Architecture, register_architecture, unregister_architecture
from kerasfrac.models.heads import heads

from .conftest import fixture_image


def build_tiny(cfg_model, input_shape, *, fused_batchnorm=False, meta_targets=0):
    """Two strided convs, then kerasfrac's heads on a map named ``features``."""
    inputs = keras.Input(shape=input_shape, name="image")
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="stage1")(
        inputs
    )
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", name="conv2")(x)
    features = keras.layers.ReLU(name=FEATURES)(x)
    outputs = heads(features, cfg_model.box_head, 0.0, cfg_model.head, meta_targets=meta_targets)
    return keras.Model(inputs, outputs, name="tiny_cnn")


@pytest.fixture
def tiny():
    spec = register_architecture(
        Architecture("tiny_cnn", build_tiny, "two convs", heads=("gap", "avgmax"), box_head=True)
    )
    yield spec
    unregister_architecture("tiny_cnn")


def test_a_registered_backbone_is_validated_and_listed(tiny, capsys):
    cfg = config.load_config(overrides=["model.name=tiny_cnn", "model.head=avgmax"])
    assert cfg.model.name == "tiny_cnn"
    with pytest.raises(config.ConfigError, match="model.head=attention not available"):
        config.load_config(overrides=["model.name=tiny_cnn", "model.head=attention"])
    with pytest.raises(config.ConfigError, match="'model.width' applies to resnet_small only"):
        config.load_config(overrides=["model.name=tiny_cnn", "model.width=16"])
    assert main(["train", "--list-keys"]) == 0
    assert "tiny_cnn" in capsys.readouterr().out
    with pytest.raises(ValueError, match="registered already"):
        register_architecture(tiny)


def test_an_unregistered_name_is_refused_with_the_registered_ones():
    with pytest.raises(
        config.ConfigError, match="'model.name' must be one of .*resnet_small.*tiny"
    ):
        config.load_config(overrides=["model.name=tiny_cnn"])


@pytest.mark.slow
def test_a_registered_backbone_trains_evaluates_explains_and_predicts(
    tiny, tmp_path, separable_tfrecord_dir, capsys
):
    run = tmp_path / "run"
    common = ["--set", f"data.dir={separable_tfrecord_dir}", "--set", "dataset=synthetic"]
    sets = ["data.image_size=32", "model.name=tiny_cnn", "train.epochs=6", "train.batch_size=8"]
    sets += ["train.optimizer=adam", "train.learning_rate=3e-3", "train.weight_decay=0"]
    args = ["train", "--run-dir", str(run), *common]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0
    assert main(["evaluate", "--run-dir", str(run)]) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["n"] == 16
    assert m["auroc"] > 0.9  # the bar is plain to see: 6 epochs separate it (1.0 here)
    assert main(["explain", "--run-dir", str(run), "--what", "grad-cam,feature-maps"]) == 0
    figures = sorted(p.name for p in (run / "explain").glob("*.png"))
    assert any("grad" in f for f in figures) and any("feature" in f for f in figures), figures
    rng = np.random.default_rng(0)
    paths = []
    for label in (1, 0):
        path = tmp_path / f"img{label}.png"
        Image.fromarray(fixture_image(rng, label, 32)[..., 0]).save(path)
        paths.append(str(path))
    capsys.readouterr()
    assert main(["predict", "--model", str(run / "model.keras"), *paths]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines() if "\t" in line]
    calls = {path: label for path, _, label in rows}
    assert calls == {paths[0]: "fractured", paths[1]: "normal"}


# --------------------------------------------------------------------------- a dataset


def find_listed(root):
    """A layout of our own: ``labels.csv`` (file,label) beside the images."""
    import csv

    from tfrecords_builder.candidates import Candidate, Found

    with (root / "labels.csv").open() as f:
        rows = list(csv.DictReader(f))
    cands = [
        Candidate(root / r["file"], r["file"], Path(r["file"]).stem, int(r["label"])) for r in rows
    ]
    return Found(root, cands, {"rows": len(rows)})


@pytest.fixture
def listed():
    from tfrecords_builder.datasets import DatasetSpec, register_dataset, unregister_dataset

    spec = register_dataset(
        DatasetSpec("listed", find_listed, "kerasfrac_listed", "PNGs listed in labels.csv")
    )
    yield spec
    unregister_dataset("listed")


def test_a_registered_dataset_builds_and_tfds_reads_it(listed, tmp_path):
    import tensorflow_datasets as tfds

    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(1)
    lines = ["file,label"]
    for i in range(40):
        label = i % 2
        Image.fromarray(fixture_image(rng, label, 24)[..., 0]).save(src / f"x{i:02d}.png")
        lines.append(f"x{i:02d}.png,{label}")
    (src / "labels.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "build"
    args = ["build", "listed", "--source", str(src), "--out", str(out), "--shards", "1"]
    assert main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == "listed" and manifest["notes"] == {"rows": 40}
    assert manifest["written"] == {"fractured": 20, "normal": 20, "total": 40}
    builder = tfds.builder_from_directory(str(out))
    assert builder.info.name == "kerasfrac_listed"
    sizes = {split: info.num_examples for split, info in builder.info.splits.items()}
    assert sum(sizes.values()) == 40 and set(sizes) == {"train", "val", "test"}
    labels = [int(x["label"]) for x in builder.as_dataset(split="train")]
    assert 0 < sum(labels) < len(labels)  # stratified: both classes in train
    assert config.load_config(overrides=["dataset=listed"]).dataset == "listed"
