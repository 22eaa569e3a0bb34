"""``kerasfrac.load``: a trained run (or an export) as one object for a notebook.

::

    import kerasfrac
    model = kerasfrac.load("runs/fracatlas_best")       # a run directory, or an export
    for r in model.predict(["a.jpg", "b.png"]):          # file paths, or uint8 arrays
        print(r.path, r.probability, r.fractured)       # calibrated where evaluate fitted one
    figure = model.explain("a.jpg", out="explained")     # Grad-CAM overlay PNG (runs only)

A run predicts exactly as ``kerasfrac predict`` does (the same function); an export
(``kerasfrac export``) through its SavedModel, which needs TensorFlow only.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Result:
    """One image: ``probability`` of fractured (calibrated where the run has a calibrator;
    ``model_probability`` is the model's own) and the decision at ``threshold``."""

    path: str
    probability: float
    model_probability: float
    fractured: bool
    threshold: float


def _as_files(images, folder: Path) -> list[Path]:
    """Paths as given; arrays (uint8 [H, W] or [H, W, C]) written as lossless PNGs."""
    from PIL import Image

    files = []
    for k, item in enumerate(images):
        if isinstance(item, str | Path):
            files.append(Path(item))
            continue
        a = np.asarray(item)
        if a.dtype != np.uint8 or a.ndim not in (2, 3):
            raise ValueError(
                f"image {k}: expected a file path or a uint8 array [H, W] or [H, W, C]; got "
                f"{a.dtype} {list(a.shape)}"
            )
        path = folder / f"array_{k:05d}.png"
        Image.fromarray(a[..., 0] if a.ndim == 3 and a.shape[2] == 1 else a).save(path)
        files.append(path)
    return files


class RunModel:
    """A run directory: ``predict`` (= ``kerasfrac predict``) and ``explain`` (Grad-CAM)."""

    def __init__(self, run_dir: Path, operating_point: str | None = None) -> None:
        from kerasfrac import runs

        self.run_dir = Path(run_dir)
        self.config = runs.load_config(self.run_dir)
        self.operating_point = operating_point

    def predict(self, images, threshold: float | None = None) -> list[Result]:
        from kerasfrac import predict

        with tempfile.TemporaryDirectory() as tmp:
            files = _as_files(images, Path(tmp))
            results, skipped, t, _ = predict.predict_files(
                self.run_dir, files, threshold, operating_point=self.operating_point
            )
        if skipped:
            raise ValueError("; ".join(f"{p}: {why}" for p, why in skipped))
        return [Result(r.path, r.shown, r.probability, r.fractured, t) for r in results]

    def explain(self, image, out=None) -> Path:
        """A Grad-CAM overlay of ``image`` (a path) in ``out`` (default: a temporary
        folder); needs the run's build (its config) for the figure's settings."""
        from kerasfrac.explain import explain_run
        from kerasfrac.options import ExplainOptions

        out = Path(out) if out else Path(tempfile.mkdtemp(prefix="kerasfrac-explain-"))
        result = explain_run(
            self.run_dir, ExplainOptions(what=("grad-cam",)), [str(image)], out, log=lambda m: None
        )
        return Path(result["figures"][0])


class ExportedModel:
    """An export (``kerasfrac export``): its SavedModel's serving signature."""

    def __init__(self, folder: Path) -> None:
        import tensorflow as tf

        self.folder = Path(folder)
        self.spec = json.loads((self.folder / "export.json").read_text())
        self._serve = tf.saved_model.load(str(self.folder / "saved_model")).signatures[
            "serving_default"
        ]

    def predict(self, images, operating_point: str = "youden") -> list[Result]:
        import tensorflow as tf

        if operating_point not in self.spec["thresholds"]:
            raise ValueError(
                f"operating point {operating_point!r} is not one of "
                f"{sorted(self.spec['thresholds'])}"
            )
        with tempfile.TemporaryDirectory() as tmp:
            files = _as_files(images, Path(tmp))
            data = [f.read_bytes() for f in files]
        out = self._serve(image_bytes=tf.constant(data))
        p = out["probability"].numpy()
        raw = out["model_probability"].numpy()
        t = float(self.spec["thresholds"][operating_point])
        return [
            Result(str(f), float(a), float(b), bool(b >= t), t) for f, a, b in zip(files, p, raw)
        ]

    def explain(self, image, out=None) -> Path:
        raise ValueError(
            "explain needs the Keras model of a run directory (Grad-CAM reads its layers): "
            f"load {self.spec['run_dir']!r} instead of the export"
        )


def load(path, operating_point: str | None = None) -> RunModel | ExportedModel:
    """A run directory (``kerasfrac train``) or an export folder (``kerasfrac export``)."""
    path = Path(path)
    if (path / "export.json").is_file():
        return ExportedModel(path)
    if (path / "config.yaml").is_file():
        return RunModel(path, operating_point)
    raise ValueError(
        f"{str(path)!r} is neither a run directory (config.yaml) nor an export (export.json); "
        "pass the --run-dir of `kerasfrac train` or the --out of `kerasfrac export`"
    )
