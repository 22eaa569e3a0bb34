"""kerasfrac predict: same probability as the test pipeline; JPEG, PNG, MONOCHROME1 DICOM."""

from __future__ import annotations

import csv
import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from kerasfrac import data, predict, runs
from kerasfrac.cli import main
from kerasfrac.config import load_config
from tests.conftest import make_run
from tfrecords_builder import read_split


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, separable_tfrecord_dir):
    return make_run(tmp_path_factory.mktemp("pred") / "run", separable_tfrecord_dir, seed=3)


def write_dicom(path, pixels: np.ndarray, photometric="MONOCHROME1", **tags):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "PID-98765"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_dicom_rescale_window_and_monochrome1_by_hand(tmp_path):
    pixels = np.array([[0, 50], [100, 150]])
    path = write_dicom(
        tmp_path / "a.dcm",
        pixels,
        RescaleSlope=2,
        RescaleIntercept=-100,
        WindowCenter=50,
        WindowWidth=201,
    )
    # rescale: [[-100, 0], [100, 200]]; window: (x - 49.5) / 200 + 0.5, clipped to [0, 1]:
    # [[0, 0.2525], [0.7525, 1]]; MONOCHROME1 inverts: [[1, 0.7475], [0.2475, 0]]; x 255
    got = predict.dicom_to_uint8(path.read_bytes())
    assert got.tolist() == [[255, 191], [63, 0]]
    # no window: min-max over the rescaled values; MONOCHROME2 not inverted
    plain = write_dicom(tmp_path / "b.dcm", pixels, photometric="MONOCHROME2")
    assert predict.dicom_to_uint8(plain.read_bytes()).tolist() == [[0, 85], [170, 255]]


def test_same_probability_as_the_test_pipeline(run_dir, separable_tfrecord_dir, tmp_path):
    cfg = load_config(run_dir / "config.yaml")
    model = keras.saving.load_model(run_dir / "model.keras")
    ds = data.make_eval_dataset(separable_tfrecord_dir, "test", cfg.data, 8, with_ids=True)
    ids, _, probs = runs.predict(model, ds)
    folder = tmp_path / "images"
    folder.mkdir()
    for ex in read_split(separable_tfrecord_dir, "test", decode=False):
        (folder / ex["image_id"].numpy().decode()).write_bytes(ex["encoded"].numpy())
    (folder / "notes.txt").write_text("not an image")
    results, skipped, threshold, _ = predict.predict_files(run_dir / "model.keras", [folder])
    assert skipped == [(str(folder / "notes.txt"), "not an image (JPEG, PNG or DICOM)")]
    got = {r.path.split("/")[-1]: r.probability for r in results}
    assert len(got) == 16 and len(set(probs.round(6))) > 1  # the probabilities vary
    for i, p in zip(ids, probs):
        assert got[i] == pytest.approx(p, abs=1e-6), i
    assert all(r.fractured == (r.probability >= threshold) for r in results)


def test_jpeg_png_dicom_via_cli(run_dir, tmp_path, capsys):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (48, 40), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "x.png")
    Image.fromarray(np.stack([gray] * 3, -1)).save(tmp_path / "x.jpg", quality=95)
    pixels = rng.integers(0, 4096, (48, 40))
    write_dicom(tmp_path / "x.dcm", pixels, WindowCenter=2048, WindowWidth=4096)
    # the DICOM as the 8-bit image it becomes: its probability must equal that PNG's
    Image.fromarray(predict.dicom_to_uint8((tmp_path / "x.dcm").read_bytes())).save(
        tmp_path / "dicom_as.png"
    )
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated nonsense")
    jpeg = (tmp_path / "x.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(jpeg[: int(len(jpeg) * 0.8)])  # truncated, recoverable
    recovered = tf.io.decode_jpeg(jpeg[: int(len(jpeg) * 0.8)], try_recover_truncated=True)
    (tmp_path / "cut_as.png").write_bytes(tf.io.encode_png(recovered).numpy())
    out_csv = tmp_path / "p.csv"
    args = [
        "predict",
        "--model",
        str(run_dir / "model.keras"),
        "--threshold",
        "0.5",
        "--csv",
        str(out_csv),
    ]
    names = [
        "x.png",
        "x.jpg",
        "x.dcm",
        "dicom_as.png",
        "bad.jpg",
        "missing.png",
        "cut.jpg",
        "cut_as.png",
    ]
    assert main([*args, *(str(tmp_path / n) for n in names)]) == 0
    captured = capsys.readouterr()
    assert "skipped" in captured.err and "bad.jpg" in captured.err and "missing.png" in captured.err
    for secret in ("Doe", "Jane", "PID-98765"):
        assert secret not in captured.out and secret not in out_csv.read_text()
    with out_csv.open() as f:
        rows = {r["path"].split("/")[-1]: r for r in csv.DictReader(f)}
    assert set(rows) == {"x.png", "x.jpg", "x.dcm", "dicom_as.png", "cut.jpg", "cut_as.png"}
    assert rows["cut.jpg"]["probability"] == rows["cut_as.png"]["probability"]
    assert "cut.jpg: truncated JPEG, recovered" in captured.err
    assert rows["x.dcm"]["probability"] == rows["dicom_as.png"]["probability"]
    for r in rows.values():
        p = float(r["probability"])
        assert 0 <= p <= 1 and r["class"] == ("fractured" if p >= 0.5 else "normal")
    # the JPEG goes through the same preprocess as the pipeline
    model = keras.saving.load_model(run_dir / "model.keras")
    image = data.preprocess(tf.io.read_file(str(tmp_path / "x.jpg")), 32, True, "stretch")
    expected = float(model(image[None], training=False)[0, 0])
    assert float(rows["x.jpg"]["probability"]) == pytest.approx(expected, abs=1e-6)


def test_threshold_from_run_metrics_and_errors(run_dir, tmp_path, capsys):
    metrics = run_dir / "metrics.json"
    metrics.write_text(json.dumps({"youden": {"threshold": 0.123}}))
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "z.png")
    try:
        results, _, threshold, source = predict.predict_files(
            run_dir / "model.keras", [tmp_path / "z.png"]
        )
        assert threshold == 0.123 and "Youden" in source
    finally:
        metrics.unlink()
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "model.keras").write_bytes((run_dir / "model.keras").read_bytes())
    with pytest.raises(ValueError, match="no config.yaml next to"):
        predict.predict_files(lone / "model.keras", [tmp_path / "z.png"])
    assert main(["predict", "--model", str(run_dir / "model.keras"), str(tmp_path / "none")]) == 2
    assert "no image could be read" in capsys.readouterr().err
    assert predict.sniff(b"hello", "x.txt") is None
    assert predict.sniff(b"\x00" * 128 + b"DICM", "scan") == "dicom"
