"""kerasfrac export: a SavedModel (image bytes in) and a TFLite model that give predict's
numbers in a process that never imports kerasfrac, and refusals that name the fix (issue 34)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kerasfrac import export, predict
from kerasfrac.cli import main
from kerasfrac.evaluation import evaluate
from kerasfrac.training import train
from tests.conftest import fast_config

MINI = Path(
    os.environ.get("KERASFRAC_FRACATLAS_MINI")
    or Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fracatlas-mini"
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, separable_tfrecord_dir):
    """A trained, evaluated (calibrator and operating points on val) and exported run."""
    root = tmp_path_factory.mktemp("export")
    cfg = fast_config(separable_tfrecord_dir, root / "run", epochs=1, steps_per_epoch=5)
    cfg.eval.tta = "flip"  # the exported graph must average the mirror as predict does
    train.train(cfg, verbose=0)
    evaluate.evaluate_run(root / "run", "test", n_bootstrap=0)
    export.export(root / "run", root / "out", log=lambda *a: None)
    return root / "run", root / "out"


def _images(folder: Path, n: int = 6) -> list[Path]:
    """PNGs and JPEGs of several sizes: bright bars (fractured-like) and plain noise."""
    rng = np.random.default_rng(0)
    paths = []
    for k in range(n):
        h, w = 40 + 7 * k, 64 - 5 * k
        a = rng.integers(0, 60, size=(h, w)).astype(np.uint8)
        if k % 2:
            a[:, w // 3 : w // 3 + 4] = 230
        path = folder / (f"i{k}.png" if k < n // 2 else f"i{k}.jpg")
        Image.fromarray(a).save(path, quality=95)
        paths.append(path)
    return paths


_CLIENT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf
    out, files, resized = sys.argv[1], json.loads(sys.argv[2]), np.load(sys.argv[3])
    m = tf.saved_model.load(out + "/saved_model")
    sig = m.signatures["serving_default"]
    got = sig(image_bytes=tf.constant([open(f, "rb").read() for f in files]))
    interp = tf.lite.Interpreter(model_path=out + "/model.tflite")
    runner = interp.get_signature_runner("serve_image")
    lite = [float(runner(image=r[None])["probability"][0]) for r in resized]
    print(json.dumps({
        "probability": got["probability"].numpy().tolist(),
        "model_probability": got["model_probability"].numpy().tolist(),
        "decisions": {k: v.numpy().tolist() for k, v in got.items() if k.startswith("decision_")},
        "tflite": lite,
        "inputs": {k: [v.dtype.name, v.shape.as_list()]
                   for k, v in sig.structured_input_signature[1].items()},
        "outputs": {k: v.dtype.name for k, v in sig.structured_outputs.items()},
        "kerasfrac_imported": any(k.startswith("kerasfrac") for k in sys.modules),
    }))
    """
)


def _client(out: Path, files: list[Path], cfg, tmp_path: Path) -> dict:
    """Run the exported models in a fresh process that imports TensorFlow only; the TFLite
    model gets each image decoded and resized as training did."""
    from kerasfrac.data.decode import decode_resize

    resized = np.stack(
        [
            decode_resize(f.read_bytes(), cfg.data.image_size, cfg.data.grayscale, cfg.data.resize)
            for f in files
        ]
    )
    np.save(tmp_path / "resized.npy", resized)
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _CLIENT,
            str(out),
            json.dumps([str(f) for f in files]),
            str(tmp_path / "resized.npy"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # not the repository: kerasfrac is not importable from the folder
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check_against_predict(run_dir, out, files, tmp_path):
    from kerasfrac import runs

    cfg = runs.load_config(run_dir)
    results, skipped, _, _ = predict.predict_files(run_dir, files)
    assert not skipped
    got = _client(out, files, cfg, tmp_path)
    assert got["kerasfrac_imported"] is False
    want = np.array([r.calibrated for r in results])
    raw = np.array([r.probability for r in results])
    np.testing.assert_allclose(got["model_probability"], raw, atol=1e-4)
    np.testing.assert_allclose(got["probability"], want, atol=1e-4)
    np.testing.assert_allclose(got["tflite"], want, atol=1e-3)
    spec = json.loads((out / "export.json").read_text())
    for name, t in spec["thresholds"].items():
        assert got["decisions"][f"decision_{name}"] == [bool(p >= t) for p in raw]
    return got


def test_saved_model_and_tflite_give_predicts_numbers_without_kerasfrac(exported, tmp_path):
    run_dir, out = exported
    got = _check_against_predict(run_dir, out, _images(tmp_path), tmp_path)
    assert got["inputs"] == {"image_bytes": ["string", [None]]}
    assert got["outputs"]["probability"] == "float32"
    assert got["outputs"]["decision_youden"] == "bool"
    assert {"decision_sensitivity_0.90", "decision_sensitivity_0.95"} <= set(got["outputs"])
    card = (out / "MODEL_CARD.md").read_text()
    assert "not for clinical decisions" in card and "Operating point `sensitivity_0.90`" in card


@pytest.mark.skipif(not MINI.is_dir(), reason=f"real FracAtlas subset not present at {MINI}")
def test_real_fracatlas_jpegs_through_the_exported_graph(exported, tmp_path):
    """Real X-rays (large JPEGs, decoded in libjpeg's DCT domain inside the graph)."""
    run_dir, out = exported
    files = sorted((MINI / "images" / "Fractured").glob("*.jpg"))[:3]
    files += sorted((MINI / "images" / "Non_fractured").glob("*.jpg"))[:3]
    _check_against_predict(run_dir, out, files, tmp_path)


def test_a_file_that_is_not_an_image_gets_a_clear_error(exported):
    import tensorflow as tf

    _, out = exported
    serve = tf.saved_model.load(str(out / "saved_model")).signatures["serving_default"]
    with pytest.raises(tf.errors.InvalidArgumentError, match="not a JPEG or PNG"):
        serve(image_bytes=tf.constant([b"%PDF-1.4 not an image"]))


def test_export_refusals_name_the_fix(exported, tmp_path, capsys):
    run_dir, out = exported
    assert main(["export", "--run-dir", str(run_dir), "--out", str(out)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert main(["export", "--run-dir", str(run_dir), "--out", str(other), "--overwrite"]) == 2
    assert "not a kerasfrac export" in capsys.readouterr().err
    assert (other / "notes.txt").read_text() == "keep me"
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_bytes((run_dir / "config.yaml").read_bytes())
    assert main(["export", "--run-dir", str(unfinished), "--out", str(tmp_path / "x")]) == 2
    assert "has no model.keras" in capsys.readouterr().err


def test_kerasfrac_load_predicts_as_predict_does_from_a_run_and_an_export(exported, tmp_path):
    import kerasfrac

    run_dir, out = exported
    files = _images(tmp_path, 4)
    want, _, _, _ = predict.predict_files(run_dir, files)
    run = kerasfrac.load(run_dir)
    got = run.predict([str(f) for f in files])
    assert [g.probability for g in got] == [w.shown for w in want]
    assert [g.fractured for g in got] == [w.fractured for w in want]
    arrays = [np.asarray(Image.open(f)) for f in files[:2]]  # PNGs: lossless, same pixels
    from_arrays = run.predict(arrays)
    np.testing.assert_allclose(
        [g.probability for g in from_arrays], [w.shown for w in want[:2]], atol=1e-7
    )
    exp = kerasfrac.load(out)
    np.testing.assert_allclose(
        [g.probability for g in exp.predict(files)], [w.shown for w in want], atol=1e-4
    )
    results, _, _, _ = predict.predict_files(run_dir, files, cam=tmp_path / "cams")
    assert sorted(p.name for p in (tmp_path / "cams").iterdir()) == sorted(
        f.stem + ".png" for f in files
    )
    figure = run.explain(files[1], out=tmp_path / "fig")
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="neither a run directory"):
        kerasfrac.load(tmp_path)
    with pytest.raises(ValueError, match="uint8 array"):
        run.predict([np.zeros((4, 4), np.float32)])


def test_overwrite_with_quantize_records_the_val_auroc_change(exported, tmp_path, capsys):
    run_dir, out = exported
    copy = tmp_path / "again"
    assert main(["export", "--run-dir", str(run_dir), "--out", str(copy)]) == 0
    before = json.loads((copy / "export.json").read_text())
    assert "tflite_dynamic_range" not in before
    rc = main(
        ["export", "--run-dir", str(run_dir), "--out", str(copy), "--overwrite", "--quantize"]
        + ["--bench", "4"]
    )
    assert rc == 0
    spec = json.loads((copy / "export.json").read_text())
    q = spec["tflite_dynamic_range"]
    assert q["change"] == pytest.approx(q["val_auroc_dynamic_range"] - q["val_auroc_float"])
    assert q["val_auroc_float"] > 0.9  # the separable fixture, through the float TFLite model
    assert abs(q["change"]) < 0.05
    assert spec["sizes_bytes"]["tflite_dynamic_range"] < spec["sizes_bytes"]["tflite"]
    assert not list(tmp_path.glob(".again.*"))  # no staging or old folder left
    timed = spec["latency"]
    assert timed["images"] == 4
    for key in ("saved_model_batch_1", "saved_model_batch_16", "tflite_decoded_batch_1"):
        assert 0 < timed[key] < 5, (key, timed)
    assert "latency saved_model_batch_1:" in capsys.readouterr().out


def test_predict_takes_an_export_folder(exported, tmp_path, capsys):
    run_dir, out = exported
    files = _images(tmp_path, 4)
    (tmp_path / "notes.txt").write_text("not an image")
    want, _, _, _ = predict.predict_files(run_dir, files)
    got, skipped, threshold, source = predict.predict_files(
        out, [*files, tmp_path / "notes.txt"], operating_point="sensitivity_0.95"
    )
    assert skipped == [(str(tmp_path / "notes.txt"), "not an image (JPEG, PNG or DICOM)")]
    np.testing.assert_allclose([g.shown for g in got], [w.shown for w in want], atol=1e-4)
    assert [g.fractured for g in got] == [g.probability >= threshold for g in got]
    assert "sensitivity_0.95" in source
    assert main(["predict", "--model", str(out), str(files[0])]) == 0
    assert "# probability: calibrated" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--cam needs the Keras model of a run directory"):
        predict.predict_files(out, files, cam=tmp_path / "cams")
