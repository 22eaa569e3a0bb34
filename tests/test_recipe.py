"""The recipe end to end: its config keys, early stopping with best-epoch selection, weight
averaging, mixup and box-supervised runs, test-time augmentation. The parts have their own
modules: test_architectures, test_augment, test_step."""

from __future__ import annotations

import csv
from pathlib import Path

import keras
import numpy as np
import pytest

from kerasfrac import config, data, models
from kerasfrac.config import ConfigError, ModelConfig
from kerasfrac.options import ExplainOptions
from kerasfrac.training import train


def test_recipe_keys_default_to_the_reports_recipe():
    cfg = config.Config()
    t, d = cfg.train, cfg.data
    assert (t.optimizer, t.schedule, t.label_smoothing, t.class_weight) == (
        "sgd",
        "constant",
        0.0,
        "none",
    )
    assert (t.early_stopping_patience, t.select, cfg.eval.tta) == (None, "last", "none")
    assert (d.rotation, d.zoom, d.translate, d.gamma, d.contrast, d.brightness) == (0,) * 6
    assert not data.augments(d) and cfg.model.box_head is False and cfg.model.head == "gap"


def test_best_config_loads(monkeypatch):
    monkeypatch.setenv("KERASFRAC_DATA", "/data")
    cfg = config.load_config("configs/fracatlas_best.yaml")
    assert cfg.model.name == "resnet_small" and cfg.model.box_head
    assert cfg.model.head == "gap"
    # the dense mask head (docs/recipe.md): 8-px cells learning the outlines, BCE + Dice
    assert (cfg.model.box_stride, cfg.train.box_target, cfg.train.box_loss) == (
        8,
        "outline",
        "bce_dice",
    )
    assert (cfg.train.select, cfg.eval.tta, cfg.train.optimizer) == ("best", "flip", "adamw")


@pytest.mark.parametrize(
    "override,key",
    [
        ("train.schedule=linear", "train.schedule"),
        ("data.rotation=-5", "data.rotation"),
        ("data.zoom=.nan", "data.zoom"),
        ("train.label_smoothing=1.0", "train.label_smoothing"),
        ("train.warmup_epochs=5", "train.warmup_epochs"),  # default epochs: 5
        ("train.class_weight=inverse", "train.class_weight"),
        ("train.select=test", "train.select"),
        ("train.early_stopping_patience=0", "train.early_stopping_patience"),
        ("eval.tta=rotate", "eval.tta"),
        ("model.name=resnet18", "model.name"),
        ("model.head=transformer", "model.head"),
        ("train.box_loss_weight=-1", "train.box_loss_weight"),
        ("train.mixup=-0.2", "train.mixup"),
        ("train.mixup=.nan", "train.mixup"),
        ("train.box_paste=1.5", "train.box_paste"),
        ("train.box_paste=.nan", "train.box_paste"),
    ],
)
def test_bad_recipe_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config.load_config(None, [override])


def test_flip_tta_averages_the_image_and_its_mirror():
    m = models.build_model(ModelConfig("paper_cnn"), (16, 16, 1))
    x = np.random.default_rng(3).random((3, 16, 16, 1), dtype="float32")
    plain = np.asarray(m(x)).reshape(-1)
    mirrored = np.asarray(m(x[:, :, ::-1])).reshape(-1)
    np.testing.assert_allclose(models.predict_probs(m, x, "none").numpy(), plain, rtol=1e-6)
    np.testing.assert_allclose(
        models.predict_probs(m, x, "flip").numpy(), (plain + mirrored) / 2, rtol=1e-5
    )


def test_early_stopping_state_is_restored_from_history(tmp_path):
    with (tmp_path / "history.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "val_auroc"])
        for e, v in enumerate([0.6, 0.8, 0.7, 0.75]):
            w.writerow([e, v])
    stopper = keras.callbacks.EarlyStopping(monitor="val_auroc", mode="max", patience=3)
    train._restore_early_stopping(stopper, tmp_path)
    assert (stopper.best, stopper.best_epoch, stopper.wait) == (0.8, 1, 2)


def _resnet_run(run_dir, data_dir, train_keys: dict, **sections):
    """A resnet_small run on a 32 px synthetic build: AdamW 3e-3, batch 8, 6 steps/epoch,
    plus ``train_keys`` and other config ``sections``."""
    base = {
        "batch_size": 8,
        "optimizer": "adamw",
        "learning_rate": 3e-3,
        "weight_decay": 0.01,
        "steps_per_epoch": 6,
    }
    return config.from_dict(
        {
            "dataset": "synthetic",
            "run_dir": str(run_dir),
            "data": {"dir": str(data_dir), "image_size": 32},
            "model": {"name": "resnet_small"},
            "train": {**base, **train_keys},
            **sections,
        }
    )


@pytest.mark.slow
def test_early_stopping_and_best_epoch_selection(tmp_path, separable_tfrecord_dir):
    run_dir = tmp_path / "run"
    cfg = _resnet_run(
        run_dir,
        separable_tfrecord_dir,
        {
            "epochs": 12,
            "early_stopping_patience": 2,
            "select": "best",
            "schedule": "cosine",
            "warmup_epochs": 1,
        },
        eval={"tta": "flip"},
    )
    result = train.train(cfg, verbose=0)
    with (run_dir / "history.csv").open() as f:
        rows = list(csv.DictReader(f))
    val = [float(r["val_auroc"]) for r in rows]
    assert len(rows) == result["epochs"]
    best_epoch = int(np.argmax(val))
    # stopped exactly `patience` epochs after the best one (or ran out of epochs)
    assert result["epochs"] == min(12, best_epoch + 1 + 2)
    saved = models.load_model(run_dir / "model.keras")
    assert not (run_dir / "box_model.keras").exists()  # no box head, no box model
    best = models.load_model(run_dir / "checkpoints" / "best.keras")
    for a, b in zip(saved.get_weights(), best.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert result["auroc"] > 0.9  # separable data: the model separates it
    state = train.ckpt.read_state(run_dir)
    assert state["finished"] and state["stopped_early"] == (result["epochs"] < 12)
    # A requeued job (--auto-resume) finds an early-stopped run done: same metrics, no training
    again = train.train(cfg, verbose=0, auto_resume=True)
    assert again["auroc"] == result["auroc"] and again["epochs"] == result["epochs"]
    if not state["stopped_early"]:
        return
    # --resume with the same patience would stop again at once: refused, naming the way out
    with pytest.raises(train.RunDirError, match="early_stopping_patience=null"):
        train.train(cfg, verbose=0, resume=True)
    # without early stopping it trains the epochs left of the same schedule
    cfg.train.early_stopping_patience = None
    resumed = train.train(cfg, verbose=0, resume=True)
    assert resumed["epochs"] == 12
    with (run_dir / "history.csv").open() as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == list(range(1, 13))
    assert not train.ckpt.read_state(run_dir)["stopped_early"]


@pytest.mark.slow
def test_box_run_saves_its_selected_epoch_with_the_box_head(tmp_path, synthetic_build):
    """model.keras is the classifier; box_model.keras is the same (best val) epoch with its
    box head, and explain's boxmap reads it from the run directory without --model."""
    from kerasfrac import explain, runs

    run_dir = tmp_path / "run"
    cfg = _resnet_run(
        run_dir,
        synthetic_build,
        {"epochs": 3, "select": "best"},
        model={"name": "resnet_small", "box_head": True, "box_stride": 16},
        data={"dir": str(synthetic_build), "image_size": 64},
    )
    train.train(cfg, verbose=0)
    boxed = models.load_model(runs.box_model_path(run_dir))
    assert models.has_box_head(boxed) and boxed.outputs[1].shape[1:3] == (4, 4)  # 16 px cells
    best = models.load_model(runs.best_path(run_dir))
    assert len(boxed.get_weights()) == len(best.get_weights())
    for a, b in zip(boxed.get_weights(), best.get_weights()):
        np.testing.assert_array_equal(a, b)
    clf = models.load_model(runs.model_path(run_dir))
    assert not models.has_box_head(clf)
    x = np.random.default_rng(7).random((2, 64, 64, 1), dtype="float32")
    np.testing.assert_allclose(
        np.asarray(models.classifier(boxed)(x)), np.asarray(clf(x)), rtol=1e-6
    )
    opts = ExplainOptions(what=("audit",), cam_method="boxmap", tolerance=8.0)
    result = explain.explain_run(run_dir, opts, log=lambda *a: None)
    assert result["model"] == str(runs.box_model_path(run_dir))  # no --model needed
    game = result["audit"]["pointing_game"]
    assert game["n_played"] > 0 and game["hit_rate"] is not None
    assert (run_dir / "explain" / "boxmap_mean.png").is_file()
    # the default audit (the classifier's own map) localises the box map too, on the same
    # images, and its numbers are the boxmap audit's
    both = explain.explain_run(
        run_dir, ExplainOptions(what=("audit",), tolerance=8.0), log=lambda *a: None
    )
    assert both["audit"]["cam_method"] != "boxmap"
    assert both["box_map_audit"]["cam_method"] == "boxmap"
    assert both["box_map_audit"]["pointing_game"] == game
    # the Grad-CAM figure of a run with a box head shows the box map beside it
    explain.explain_run(run_dir, ExplainOptions(what=("grad-cam",)), log=lambda *a: None)
    assert (run_dir / "explain" / "grad_cam.png").is_file()
    assert (run_dir / "explain" / "boxmap.png").is_file()
    from kerasfrac.explain.run import verdict

    assert "box heat map" in verdict(both)
    # predict's overlays and the export carry the box head (its peak, its heat map output).
    import tensorflow as tf
    from PIL import Image

    from kerasfrac import export, predict

    image = tmp_path / "x.png"
    Image.fromarray((np.random.default_rng(3).random((80, 70)) * 255).astype(np.uint8)).save(image)
    results, _, _, _ = predict.predict_files(run_dir, [image], cam=tmp_path / "cams")
    assert (tmp_path / "cams" / "x.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    export.export(run_dir, tmp_path / "exported", log=lambda *a: None)
    serve = tf.saved_model.load(str(tmp_path / "exported" / "saved_model"))
    out = serve.signatures["serving_default"](image_bytes=tf.constant([image.read_bytes()]))
    assert out["box_heatmap"].shape == (1, 4, 4)
    np.testing.assert_allclose(
        out["model_probability"].numpy(), [results[0].probability], atol=1e-4
    )


@pytest.mark.slow
def test_weight_averaging_validates_and_saves_the_average_and_trains_on(
    tmp_path, separable_tfrecord_dir
):
    """train.ema_momentum: validation and model.keras use the optimizer's moving average of
    the weights, while the epoch checkpoint keeps the raw weights training continues from."""
    run_dir = tmp_path / "run"
    cfg = _resnet_run(
        run_dir, separable_tfrecord_dir, {"epochs": 8, "ema_momentum": 0.8, "fast": False}
    )
    result = train.train(cfg, verbose=0)
    assert result["auroc"] > 0.9  # separable data: the averaged model separates it
    saved = models.load_model(run_dir / "model.keras")
    last, _ = train.ckpt.load(run_dir, train.ckpt.read_state(run_dir))
    opt = last.optimizer
    assert opt.use_ema and opt.ema_momentum == pytest.approx(0.8)
    average = [v.numpy() for v in opt._model_variables_moving_average]
    raw = [v.numpy() for v in last.trainable_variables]
    # model.keras holds the average, the checkpoint the raw weights, and they differ
    saved_by_name = {v.path: v.numpy() for v in saved.trainable_variables}
    for var, avg in zip(last.trainable_variables, average):
        np.testing.assert_allclose(saved_by_name[var.path], avg, rtol=1e-6, atol=1e-7)
    assert max(float(np.abs(a - r).max()) for a, r in zip(average, raw)) > 1e-4
    # the last epoch's val AUROC is that of the averaged weights (model.keras)
    with (run_dir / "history.csv").open() as f:
        val_auroc = float(list(csv.DictReader(f))[-1]["val_auroc"])
    build = data.Build.load(separable_tfrecord_dir)
    val_ds = data.make_eval_dataset(build, "val", cfg.data, 8, with_ids=True)
    from kerasfrac import runs
    from kerasfrac.evaluation.metrics import split_metrics

    _, y, p = runs.predict(saved, val_ds)
    assert split_metrics(y, p)["auroc"] == pytest.approx(val_auroc, abs=1e-6)


@pytest.mark.slow
def test_mixup_run_learns_separable_data(tmp_path, separable_tfrecord_dir):
    """train.mixup on: a whole run still separates separable data."""
    cfg = _resnet_run(tmp_path / "run", separable_tfrecord_dir, {"epochs": 8, "mixup": 0.4})
    assert cfg.train.mixup == 0.4
    result = train.train(cfg, verbose=0)
    assert result["auroc"] > 0.9


def test_weight_averaging_off_by_default_and_checked():
    assert config.TrainConfig().ema_momentum == 0.0
    with pytest.raises(ConfigError, match="train.ema_momentum"):
        config.from_dict({"train": {"ema_momentum": 1.0}})


def _pointing_after_training(phantoms: Path, root: Path, box_head: bool) -> dict:
    from kerasfrac import explain
    from kerasfrac.runs import load_model as load_run_model

    run_dir = root / f"run_box{int(box_head)}"
    cfg = config.from_dict(
        {
            "dataset": "synthetic",
            "run_dir": str(run_dir),
            "data": {"dir": str(phantoms / "tfr"), "image_size": 128, "flips": "random"},
            "model": {"name": "resnet_small", "box_head": box_head, "head": "heatmap"},
            "train": {
                "epochs": 1,
                "batch_size": 16,
                "steps_per_epoch": 250,
                "optimizer": "adamw",
                "learning_rate": 2e-3,
                "weight_decay": 0.01,
            },
        }
    )
    result = train.train(cfg, verbose=0)
    cfg, m, _ = load_run_model(run_dir)
    # Grad-CAM on the default layer (`features`, 4x4 cells at 128 px); the pointing game with
    # the 15-pixel tolerance of its original definition (Zhang et al. 2016).
    opts = ExplainOptions(tolerance=15.0)
    audit, _ = explain.audit_split(m, cfg.data, cfg.data.dir, "test", opts)
    out = {"auroc": result["auroc"], **audit["pointing_game"]}
    if box_head:  # the box head's own map, read from the run's box_model.keras
        opts = ExplainOptions(what=("audit",), cam_method="boxmap", tolerance=15.0)
        boxmap = explain.explain_run(run_dir, opts, log=lambda *a: None)
        out["boxmap"] = boxmap["audit"]["pointing_game"]
        assert (run_dir / "explain" / "boxmap_mean.png").is_file()
    return out


# Phantoms with a corner letter that agrees with the label 90% of the time (the report's
# shortcut), the same network (heat-map head) and recipe without and with box supervision;
# the pointing game with a 15 px tolerance. Measured at 250 steps over training seeds
# 42 / 1 / 2 / 3 (chance 0.15): hit rate 1.00 / 1.00 / 1.00 / 0.93 with boxes against
# 0.03 / 0.07 / 0.10 / 0.00 without; box-map hit rate 1.00 / 1.00 / 1.00 / 0.97; AUROC 1.00
# with boxes, 0.95-1.00 without. At 150 steps the margins were seed-dependent (hit rate with
# boxes 0.45-0.90), hence 250. The two runs are two tests (they run side by side under
# pytest-xdist); their bounds (with boxes > 0.75, without <= 0.15) imply the gap of 0.6.


@pytest.fixture(scope="module")
def letter_phantoms(tmp_path_factory) -> Path:
    """The phantoms of both box-supervision tests, generated and built once per module (a
    worker that runs both shares them): the folder that holds ``tfr``."""
    from tfrecords_builder.build import BuildOptions, build
    from tfrecords_builder.datasets import synthetic

    root = tmp_path_factory.mktemp("letters")
    synthetic.generate(
        root / "raw",
        count=400,
        fractured_fraction=0.5,
        image_size=128,
        seed=1,
        marker=True,
        marker_correlation=0.9,
    )
    build("synthetic", root / "raw", root / "tfr", BuildOptions(progress=False, shards=2))
    return root


@pytest.mark.slow
def test_without_box_supervision_grad_cam_misses_the_fracture(tmp_path, letter_phantoms):
    """The shortcut is real: trained on label alone, the classifier's Grad-CAM peak lands
    within 15 px of a fracture box no more often than chance (0.15)."""
    plain = _pointing_after_training(letter_phantoms, tmp_path, box_head=False)
    assert plain["n_played"] >= 25
    assert plain["hit_rate"] <= 0.15, plain


@pytest.mark.slow
def test_box_supervision_moves_grad_cam_onto_the_fracture(tmp_path, letter_phantoms):
    """With box supervision the classifier's Grad-CAM peak lands on the fracture on nearly
    every fractured test image, the box head's own map too, and the classifier ranks above
    the letter's 0.9 ceiling."""
    boxed = _pointing_after_training(letter_phantoms, tmp_path, box_head=True)
    assert boxed["n_played"] >= 25
    assert boxed["auroc"] > 0.95, boxed  # above what the letter alone gives
    assert boxed["hit_rate"] > max(0.75, 4 * boxed["chance_rate"]), boxed
    # The box head's heat map itself peaks at the fracture (cam method boxmap).
    assert boxed["boxmap"]["hit_rate"] > max(0.75, 4 * boxed["chance_rate"]), boxed


def test_sensitivity_at_90_specificity_is_exact():
    from kerasfrac.evaluation.metrics import sensitivity_at_specificity

    y = np.array([0] * 10 + [1] * 5)
    p = np.array([*np.linspace(0, 0.5, 10), 0.45, 0.6, 0.7, 0.2, 0.9])
    # at most one of the ten normals above the threshold: 0.45, 0.6, 0.7, 0.9 found
    assert sensitivity_at_specificity(y, p, 0.9) == pytest.approx(0.8)
    assert sensitivity_at_specificity(y, p, 1.0) == pytest.approx(0.6)  # above 0.5 only
    assert sensitivity_at_specificity(np.zeros(4), np.arange(4)) is None
    from kerasfrac.evaluation.metrics import split_metrics as metrics

    assert metrics(y, p, n_bootstrap=0)["sensitivity_at_90_specificity"] == pytest.approx(0.8)


def test_evaluate_predict_with_flip_tta(separable_tfrecord_dir):
    from kerasfrac.runs import predict

    cfg = config.DataConfig(dir=str(separable_tfrecord_dir), image_size=32)
    m = models.build_model(ModelConfig("paper_cnn"), (32, 32, 1))
    ds = data.make_eval_dataset(None, "test", cfg, 4, with_ids=True)
    ids, y, plain = predict(m, ds)
    ids2, y2, flipped = predict(m, ds, "flip")
    images = np.concatenate([b["image"].numpy() for b in ds])
    mirrored = np.asarray(m(images[:, :, ::-1])).reshape(-1)
    assert ids == ids2 and np.array_equal(y, y2)
    np.testing.assert_allclose(flipped, (plain + mirrored) / 2, rtol=1e-5)
