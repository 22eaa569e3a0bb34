"""Apply a saved model to new images, prepared exactly as the evaluation pipeline does.

Settings (image size, grayscale, resize) come from the ``config.yaml`` next to the model
(a run directory), and every image goes through ``kerasfrac.data.preprocess``, the function
the test pipeline maps over the TFRecords, so a file gives the same probability here as in
``kerasfrac evaluate``. JPEG and PNG (also BMP/GIF, which ``tf.io.decode_image`` reads) are
passed as their bytes; a truncated JPEG (FracAtlas has some) is recovered and re-encoded as
PNG exactly as the builder's --recover-truncated stores it. DICOM is converted to an 8-bit
grayscale PNG first (the form of the training images): modality LUT (rescale
slope/intercept), the first VOI window (DICOM PS3.3 C.11.2.1.2 linear function; min-max when
none), MONOCHROME1 inverted so bone is bright. Only pixels are read from a DICOM: no patient
metadata reaches any output. Files that are not images are reported and skipped.

The default threshold is the run's Youden-J threshold from metrics.json (``kerasfrac
evaluate``), else 0.5.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kerasfrac.options import PredictOptions
from tfrecords_builder.pixels import dicom_to_uint8, png_bit_depth  # the builder's mapping

# Local imports of TensorFlow-based modules: path and option errors come before TensorFlow.

_MAGIC = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"BM", "bmp"),
    (b"GIF8", "gif"),
)


@dataclass
class Prediction:
    """One image's result: ``probability`` is the model's own; ``calibrated`` the run's val
    calibrator applied to it (None where `kerasfrac evaluate` has fitted none); ``fractured``
    the decision at the threshold (compared with the model's own probability)."""

    path: str
    probability: float
    fractured: bool
    calibrated: float | None = None

    @property
    def shown(self) -> float:
        """What is reported: the calibrated probability where there is one."""
        return self.probability if self.calibrated is None else self.calibrated


def sniff(data: bytes, path: str | Path = "") -> str | None:
    """The image format of ``data`` by its magic bytes (dicom by its preamble), or None."""
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    if data[128:132] == b"DICM" or Path(path).suffix.lower() in (".dcm", ".dicom"):
        return "dicom"
    return None


def as_8bit(data: bytes, kind: str) -> bytes:
    """The bytes the builder stores for a file: DICOM and 16-bit PNG as 8-bit PNG (the one
    mapping, ``tfrecords_builder.pixels``), anything else as it is."""
    if kind == "dicom":
        return dicom_to_png(data)
    if kind == "png" and png_bit_depth(data) == 16:
        from tfrecords_builder.validation import png16_to_png8  # TensorFlow: imported late

        return png16_to_png8(data)
    return data


def dicom_to_png(data: bytes) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(dicom_to_uint8(data)).save(buf, format="PNG")
    return buf.getvalue()


def expand_paths(paths) -> list[Path]:
    """Files as given, directories walked recursively (sorted, hidden files left out)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        else:
            out.append(p)
    return out


def pixel_limit_problem(data: bytes, kind: str, max_pixels: int) -> str | None:
    """Why an image is too large to decode (the builder's decompression-bomb guard, read
    from its header, before any pixel), or None."""
    if kind == "dicom":
        import pydicom

        try:
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
            width, height = int(ds.get("Columns", 0) or 0), int(ds.get("Rows", 0) or 0)
        except Exception:  # noqa: BLE001 - the decode step names what is wrong with it
            return None
    else:
        from tfrecords_builder.validation import image_size

        size = image_size(data, kind) if kind in ("jpeg", "png") else None
        if size is None:
            from PIL import Image

            try:
                with Image.open(io.BytesIO(data)) as im:
                    size = im.size
            except Image.DecompressionBombError as err:
                return f"too large (decompression-bomb guard): {err}"
            except Exception:  # noqa: BLE001 - the decode step names what is wrong with it
                return None
        width, height = size
    if width * height > max_pixels:
        return (
            f"too large: {width}x{height} = {width * height:,} pixels exceeds the limit of "
            f"{max_pixels:,} (decompression-bomb guard, as the builder's --max-pixels)"
        )
    return None


def predict_files(
    model_path,
    paths,
    threshold: float | None = PredictOptions.threshold,
    batch_size: int = PredictOptions.batch_size,
    max_pixels: int = PredictOptions.max_pixels,
    operating_point: str | None = PredictOptions.operating_point,
    cam: str | Path | None = None,
) -> tuple[list[Prediction], list[tuple[str, str]], float, str]:
    """``(predictions, skipped [(path, reason)], threshold, threshold source)``.
    ``model_path``: a model file, or a run directory (its model.keras). ``cam``: a folder
    that gets one overlay PNG per image (``write_overlays``)."""
    from kerasfrac import runs

    if threshold is not None and not 0.0 <= threshold <= 1.0:  # also catches nan
        raise ValueError(f"--threshold must be a probability in [0, 1]; got {threshold!r}")
    if threshold is not None and operating_point is not None:
        raise ValueError("pass --threshold or --operating-point, not both")
    if (Path(model_path) / "export.json").is_file():  # kerasfrac export's folder
        if cam is not None:
            raise ValueError(
                "--cam needs the Keras model of a run directory (Grad-CAM reads its layers); "
                "pass the run instead of its export"
            )
        return predict_export(
            Path(model_path), paths, threshold, batch_size, max_pixels, operating_point
        )
    if Path(model_path).is_dir():  # a run directory
        model_path = runs.model_path(model_path)
    run_dir = runs.run_dir_of(model_path)
    with runs.run_lock(run_dir, exclusive=False, command="predict"):  # no train meanwhile
        return _predict_files(
            model_path, paths, threshold, batch_size, max_pixels, operating_point, cam
        )


def _readable(paths, max_pixels, skipped):
    """``(path, file bytes, kind)`` of each image file under ``paths`` (kind from ``sniff``),
    one at a time; missing files, non-images and images above ``max_pixels`` go to
    ``skipped`` with the reason. Decoding (and its failures) is the caller's."""
    for path in expand_paths(paths):
        if not path.is_file():
            skipped.append((str(path), "no such file"))
            continue
        data = path.read_bytes()
        kind = sniff(data, path)
        if kind is None:
            skipped.append((str(path), "not an image (JPEG, PNG or DICOM)"))
            continue
        too_large = pixel_limit_problem(data, kind, max_pixels)
        if too_large:
            skipped.append((str(path), too_large))
            continue
        yield path, data, kind


def _first_line(err: Exception):
    """The first line of an error's message (120 characters at most), else its type."""
    text = str(getattr(err, "message", None) or err).strip()
    return text.splitlines()[0][:120] if text else type(err)


def predict_export(folder: Path, paths, threshold, batch_size, max_pixels, operating_point):
    """``predict_files`` through an export's SavedModel (``kerasfrac export``): the same
    outputs, with the export's thresholds and calibrator."""
    import tensorflow as tf

    spec = json.loads((folder / "export.json").read_text())
    if threshold is not None:
        source = "--threshold"
    else:
        name = operating_point or "youden"
        if name not in spec["thresholds"]:
            raise ValueError(
                f"--operating-point {name!r} is not one of the export's "
                f"{sorted(spec['thresholds'])}"
            )
        threshold, source = float(spec["thresholds"][name]), f"{name}, {folder / 'export.json'}"
    serve = tf.saved_model.load(str(folder / "saved_model")).signatures["serving_default"]
    skipped: list[tuple[str, str]] = []
    results = []
    for path, data, kind in _readable(paths, max_pixels, skipped):
        try:
            encoded = as_8bit(data, kind)
            out = serve(image_bytes=tf.constant([encoded]))
        except Exception as err:  # noqa: BLE001 - any undecodable file is reported, not fatal
            skipped.append((str(path), f"cannot decode {kind}: {_first_line(err)}"))
            continue
        p = float(out["model_probability"][0])
        calibrated = float(out["probability"][0]) if spec.get("calibrator") else None
        results.append(Prediction(str(path), p, p >= threshold, calibrated))
    return results, skipped, threshold, source


def probability_note(model_path) -> str:
    """The output's line saying whether probabilities are calibrated, and how."""
    from kerasfrac import runs

    folder = Path(model_path)
    if (folder / "export.json").is_file():
        cal = json.loads((folder / "export.json").read_text()).get("calibrator")
        description = cal["description"] if cal else None
    else:
        run_dir = runs.run_dir_of(runs.model_path(folder) if folder.is_dir() else folder)
        chosen = runs.read_calibration(run_dir)
        description = chosen["calibrator"].describe() if chosen else None
    if description:
        return f"# probability: calibrated, {description}"
    return (
        "# probability: the model's own, NOT calibrated (`kerasfrac evaluate` fits a "
        "calibrator on val)"
    )


def decision_threshold(run_dir, threshold, operating_point, chosen) -> tuple[float, str]:
    """The threshold on the model's probability and where it comes from: ``threshold``
    (--threshold), an operating point of the run's calibration.json, or its Youden-J one."""
    from kerasfrac import runs

    if threshold is not None:
        return threshold, "--threshold"
    if operating_point is None:  # the run's own, checked as --threshold is
        return runs.youden_threshold(run_dir)
    if chosen is None:
        raise ValueError(
            f"--operating-point {operating_point}: the run {str(run_dir)!r} has no "
            f"calibration.json; run `kerasfrac evaluate --run-dir {run_dir}` first (it chooses "
            "the operating points on val)"
        )
    points = chosen["operating_points"]
    if operating_point not in points:
        raise ValueError(
            f"--operating-point {operating_point!r} is not one of the run's "
            f"{sorted(points) or 'none'}; add it with `kerasfrac evaluate --run-dir {run_dir} "
            "--sensitivity S` (or --specificity S)"
        )
    point = points[operating_point]
    return float(point["threshold"]), (
        f"operating point {operating_point}: {point['target']} {point['value']:.2f} on val "
        f"(val {point['target']} {point['val'][point['target']]:.3f}); "
        f"{runs.calibration_path(run_dir)}"
    )


def _predict_files(model_path, paths, threshold, batch_size, max_pixels, operating_point, cam):
    import tensorflow as tf

    from kerasfrac import runs
    from kerasfrac.data import preprocess
    from kerasfrac.models import predict_probs

    cfg, model, _ = runs.load_model(model_file=model_path)
    run_dir = runs.run_dir_of(model_path)
    chosen = runs.read_calibration(run_dir)
    threshold, source = decision_threshold(run_dir, threshold, operating_point, chosen)
    calibrator = chosen["calibrator"] if chosen else None
    prepared, kept, skipped, warnings = [], [], [], []
    for path, data, kind in _readable(paths, max_pixels, skipped):
        try:
            encoded = as_8bit(data, kind)
            if kind == "jpeg":
                encoded = _recover_truncated(data, path, warnings)
            image = preprocess(
                tf.constant(encoded), cfg.data.image_size, cfg.data.grayscale, cfg.data.resize
            )
        except Exception as err:  # noqa: BLE001 - any undecodable file is reported, not fatal
            skipped.append((str(path), f"cannot decode {kind}: {_first_line(err)}"))
            continue
        prepared.append(image)
        kept.append(str(path))
    results = []
    for start in range(0, len(prepared), batch_size):
        batch = tf.stack(prepared[start : start + batch_size])
        # the run's test-time augmentation (eval.tta), as in evaluate
        probs = np.asarray(predict_probs(model, batch, cfg.eval.tta), dtype=np.float64)
        calibrated = calibrator.apply(probs) if calibrator else [None] * len(probs)
        for path, p, c in zip(kept[start : start + batch_size], probs, calibrated):
            results.append(
                Prediction(path, float(p), bool(p >= threshold), None if c is None else float(c))
            )
    for w in warnings:
        print(w, file=sys.stderr)
    if cam is not None and results:
        write_overlays(run_dir, model, prepared, results, Path(cam), threshold, batch_size)
    return results, skipped, threshold, source


def write_overlays(run_dir, model, prepared, results, out: Path, threshold, batch_size):
    """One PNG per image in ``out`` (named after the file): the X-ray under the classifier's
    Grad-CAM ("fractured"), the box head's peak where the run has one, and the probability
    and decision in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import tensorflow as tf

    from kerasfrac import runs
    from kerasfrac.explain import gradcam
    from kerasfrac.models import BOX_HEATMAP, has_box_head, output_index

    runs.check_writable(out, "--cam")
    cam = gradcam.GradCam(model)
    box = None
    if runs.box_model_path(run_dir).is_file():
        _, full, _ = runs.load_model(run_dir, box_head=True)
        box = full if has_box_head(full) else None
    kind = f"{gradcam.map_kind(cam.method)} ({cam.method})"
    used = set()
    for start in range(0, len(prepared), batch_size):
        images = tf.stack(prepared[start : start + batch_size])
        maps = cam(images, 1.0)
        heat = None
        if box is not None:
            heat = np.asarray(box(images, training=False)[output_index(box, BOX_HEATMAP)])
        for k, (image, m) in enumerate(zip(images.numpy(), maps)):
            r = results[start + k]
            name = Path(r.path).stem
            while name in used:  # the same file name in two folders
                name += "_"
            used.add(name)
            fig, ax = plt.subplots(figsize=(5, 5.6))
            ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray")
            peak = float(m.max())
            ax.imshow(m / peak if peak > 0 else m, cmap="jet", alpha=0.4, vmin=0, vmax=1)
            handles = []
            if peak > 0:
                y, x = np.unravel_index(int(np.argmax(m)), m.shape)
                handles += ax.plot([x], [y], "w+", ms=12, mew=2, label=f"{kind} peak")
            if heat is not None:
                h = heat[k].reshape(heat.shape[1], heat.shape[2])
                cy, cx = np.unravel_index(int(np.argmax(h)), h.shape)
                sy, sx = image.shape[0] / h.shape[0], image.shape[1] / h.shape[1]
                handles += ax.plot(
                    [(cx + 0.5) * sx],
                    [(cy + 0.5) * sy],
                    "cx",
                    ms=12,
                    mew=2,
                    label="box head's peak (where it places the fracture)",
                )
            if handles:
                ax.legend(handles=handles, loc="lower center", fontsize=7, framealpha=0.8)
            ax.axis("off")
            shown = "calibrated; " if r.calibrated is not None else ""
            decision = "FRACTURED" if r.fractured else "normal"
            ax.set_title(
                f"{Path(r.path).name}\np(fractured) {r.shown:.3f} ({shown}model "
                f"{r.probability:.3f})\n{decision} at threshold {threshold:.3f}",
                fontsize=8,
            )
            runs.save_figure(fig, out / f"{name}.png", dpi=100, bbox_inches="tight")
            plt.close(fig)


def _recover_truncated(data: bytes, path, warnings: list[str]) -> bytes:
    """A truncated JPEG as the builder stores it with --recover-truncated: decoded with
    ``try_recover_truncated`` (at least RECOVER_FRACTION of its lines) and re-encoded as PNG.
    Intact JPEGs are returned unchanged."""
    import tensorflow as tf

    from tfrecords_builder.validation import RECOVER_FRACTION

    try:
        tf.io.decode_jpeg(data)
        return data
    except tf.errors.InvalidArgumentError:
        pixels = tf.io.decode_jpeg(
            data, try_recover_truncated=True, acceptable_fraction=RECOVER_FRACTION
        )
    warnings.append(f"warning: {path}: truncated JPEG, recovered as the builder does")
    return tf.io.encode_png(pixels).numpy()


def main(model_path, paths, opts: PredictOptions) -> int:
    """``kerasfrac predict``: see ``cli.add_predict``."""
    from kerasfrac import runs

    results, skipped, threshold, source = predict_files(
        model_path,
        paths,
        opts.threshold,
        opts.batch_size,
        opts.max_pixels,
        opts.operating_point,
        opts.cam,
    )
    for path, reason in skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    print(probability_note(model_path))
    print(f"# threshold {threshold:.4f} on the model's own probability ({source})")
    for r in results:
        label = "fractured" if r.fractured else "normal"
        print(f"{r.path}\t{r.shown:.6f}\t{label}")
    if opts.csv:
        buf = io.StringIO()
        out = csv.writer(buf)
        out.writerow(["path", "probability", "model_probability", "class", "threshold"])
        for r in results:
            label = "fractured" if r.fractured else "normal"
            out.writerow(
                [r.path, f"{r.shown:.6f}", f"{r.probability:.6f}", label, f"{threshold:.6f}"]
            )
        runs.write_text(Path(opts.csv), buf.getvalue())
        print(f"written: {opts.csv}")
    if opts.cam and results:
        print(f"overlays: {opts.cam} (one PNG per image)")
    n_pos = sum(r.fractured for r in results)
    print(f"# {len(results)} images, {len(skipped)} skipped, {n_pos} called fractured")
    if not results:
        raise ValueError("no image could be read from the given paths")
    return 0
