"""``kerasfrac export``: a run as a model that leaves the project.

``export --run-dir RUN --out DIR`` writes into DIR (whole or not at all: a staging folder
renamed into place):

* ``saved_model/``: a TensorFlow SavedModel (TF Serving, ``tf.saved_model.load``) with two
  signatures, computed by the same ops as ``kerasfrac predict``:

  - ``serving_default``: ``image_bytes`` (a batch of encoded JPEG or PNG files, tf.string
    [N]) -> decode, grayscale, resize exactly as training prepared images
    (``kerasfrac.data.decode.preprocess``), the run's test-time augmentation (flip:
    the mean over the image and its mirror), then
  - ``serve_image``: ``image`` (uint8 [N, S, S, C], already decoded and resized: what a
    client that decodes itself sends) -> the same.

  Both return ``probability`` (calibrated by the run's val calibrator, float32 [N]),
  ``model_probability`` (the model's own), ``decision_<point>`` (bool [N]) at the Youden-J
  threshold and each operating point `kerasfrac evaluate` chose on val, and, for a run with
  a box head, ``box_heatmap`` (float32 [N, h, w], where the model places the fracture).
* ``model.tflite``: ``serve_image`` for TensorFlow Lite (float32 weights);
  ``model_dynamic_range.tflite`` with ``--quantize`` (int8 weights, float activations).
* ``export.json``: the input contract, outputs, thresholds and calibrator in numbers.
* ``MODEL_CARD.md``: data and split, metrics with CIs and baselines, calibration, operating
  points, intended use, known failure modes, the input contract, the command that made it.

A client needs TensorFlow (or TF Serving, or the TFLite runtime) and nothing of kerasfrac.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from kerasfrac import runs
from kerasfrac.options import ExportOptions

SAVED_MODEL = "saved_model"
TFLITE = "model.tflite"
TFLITE_QUANTIZED = "model_dynamic_range.tflite"
CARD = "MODEL_CARD.md"
SPEC = "export.json"
INTENDED_USE = (
    "Research and teaching on bone-fracture classification: not a medical device, not for "
    "clinical decisions."
)


class ExportError(ValueError):
    """A run that cannot be exported as asked; the message names the fix."""


def _check(run_dir: Path, out: Path, overwrite: bool) -> None:
    if not runs.config_path(run_dir).is_file():
        raise ExportError(
            f"{str(run_dir)!r} is not a kerasfrac run (no config.yaml); pass the --run-dir "
            "that `kerasfrac train` wrote"
        )
    if not runs.model_path(run_dir).is_file():
        raise ExportError(
            f"the run {str(run_dir)!r} has no model.keras (it has not finished); finish it "
            f"with `kerasfrac train --resume --run-dir {run_dir}` first"
        )
    if out.exists() and not overwrite:
        raise ExportError(
            f"{str(out)!r} already exists; pass --overwrite to replace it (only an earlier "
            "export is replaced), or choose another --out. Nothing was changed."
        )
    if out.exists() and not (out / SPEC).is_file():
        raise ExportError(
            f"refusing to --overwrite {str(out)!r}: it is not a kerasfrac export (no {SPEC}). "
            "Choose another --out. Nothing was changed."
        )
    if out.resolve() == run_dir.resolve():
        raise ExportError(f"--out {str(out)!r} is the run itself; choose another folder")


def thresholds_of(run_dir: Path, chosen: dict | None) -> dict[str, float]:
    """``{point name: threshold on the model's probability}``: the Youden-J threshold (0.5
    where evaluate has chosen none) and each operating point of calibration.json."""
    youden, _ = runs.youden_threshold(run_dir)
    points = {"youden": youden}
    for name, p in ((chosen or {}).get("operating_points") or {}).items():
        points[name] = float(p["threshold"])
    return points


def build_functions(cfg, model, box_model, calibrator, thresholds: dict[str, float]):
    """``(serve_bytes, serve_image)``: the exported computation as two tf.functions of the
    Keras models (``box_model`` may be None)."""
    import tensorflow as tf

    from kerasfrac.data.decode import preprocess
    from kerasfrac.models import BOX_HEATMAP, PROB, output_index

    size, channels = cfg.data.image_size, 1 if cfg.data.grayscale else 3
    a = float(calibrator.a) if calibrator else 1.0
    b = float(calibrator.logits(np.array([0.5]))[0]) if calibrator else 0.0  # shift included
    tta = cfg.eval.tta

    def prob(outs) -> tf.Tensor:
        if box_model is None:
            return tf.reshape(tf.cast(outs, tf.float32), [-1])
        return tf.reshape(tf.cast(outs[output_index(box_model, PROB)], tf.float32), [-1])

    def outputs(images):
        # One pass gives the probability and, with a box head, the heat map; the flip pass
        # (eval.tta) the mirrored probability: predict_probs' arithmetic.
        net = box_model if box_model is not None else model
        outs = net(images, training=False)
        p = prob(outs)
        if tta == "flip":
            p = (p + prob(net(tf.image.flip_left_right(images), training=False))) / 2.0
        q = tf.clip_by_value(p, 1e-7, 1 - 1e-7)
        z = a * (tf.math.log(q) - tf.math.log1p(-q)) + b
        out = {"probability": tf.sigmoid(z), "model_probability": p}
        for name, t in thresholds.items():
            out[f"decision_{name}"] = p >= tf.constant(t, tf.float32)
        if box_model is not None:
            heat = outs[output_index(box_model, BOX_HEATMAP)]
            out["box_heatmap"] = tf.cast(tf.reshape(heat, tf.shape(heat)[:3]), tf.float32)
        return out

    def serve_image(image):
        return outputs(tf.cast(image, tf.float32) / 255.0)

    def one(encoded):
        head = tf.strings.substr(encoded, 0, 8)
        known = tf.logical_or(
            tf.equal(tf.strings.substr(head, 0, 3), b"\xff\xd8\xff"),
            tf.equal(head, b"\x89PNG\r\n\x1a\n"),
        )
        with tf.control_dependencies(
            [
                tf.debugging.Assert(
                    known, ["image_bytes holds a file that is not a JPEG or PNG; send the file"]
                )
            ]
        ):
            return preprocess(encoded, size, cfg.data.grayscale, cfg.data.resize)

    def serve_bytes(image_bytes):
        images = tf.map_fn(
            one, image_bytes, fn_output_signature=tf.TensorSpec([size, size, channels], tf.float32)
        )
        return outputs(images)

    return serve_bytes, serve_image, (size, channels)


def export(run_dir, out, opts: ExportOptions | None = None, log=print) -> dict:
    """Export ``run_dir`` into ``out`` (see the module docstring); returns export.json."""
    import keras
    import tensorflow as tf

    from kerasfrac.models import box_model as make_box_model
    from kerasfrac.models import has_box_head

    opts = opts or ExportOptions()
    run_dir, out = Path(run_dir), Path(out)
    _check(run_dir, out, opts.overwrite)
    with runs.run_lock(run_dir, exclusive=False, command="export"):
        cfg, model, path = runs.load_model(run_dir)
        box = None
        if runs.box_model_path(run_dir).is_file():
            _, full, _ = runs.load_model(run_dir, box_head=True)
            box = make_box_model(full) if has_box_head(full) else None
        chosen = runs.read_calibration(run_dir)
        calibrator = chosen["calibrator"] if chosen else None
        thresholds = thresholds_of(run_dir, chosen)
        metrics = runs.read_metrics(run_dir)
    serve_bytes, serve_image, (size, channels) = build_functions(
        cfg, model, box, calibrator, thresholds
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.incomplete-", dir=out.parent))
    try:
        archive = keras.export.ExportArchive()
        archive.track(model)
        if box is not None:
            archive.track(box)
        archive.add_endpoint(
            "serving_default",
            serve_bytes,
            input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")],
        )
        archive.add_endpoint(
            "serve_image",
            serve_image,
            input_signature=[tf.TensorSpec([None, size, size, channels], tf.uint8, name="image")],
        )
        archive.write_out(str(stage / SAVED_MODEL), verbose=False)
        files = {"saved_model": SAVED_MODEL}
        tflite = _tflite(stage / SAVED_MODEL, quantize=False)
        (stage / TFLITE).write_bytes(tflite)
        files["tflite"] = TFLITE
        quantized = None
        if opts.quantize:
            (stage / TFLITE_QUANTIZED).write_bytes(_tflite(stage / SAVED_MODEL, quantize=True))
            files["tflite_dynamic_range"] = TFLITE_QUANTIZED
            log("measuring both TFLite models on the val split ...")
            quantized = {
                "val_auroc_float": _tflite_auroc(stage / TFLITE, cfg),
                "val_auroc_dynamic_range": _tflite_auroc(stage / TFLITE_QUANTIZED, cfg),
            }
            quantized["change"] = (
                quantized["val_auroc_dynamic_range"] - quantized["val_auroc_float"]
            )
        spec = _spec(run_dir, cfg, path, calibrator, thresholds, box is not None, files)
        if quantized:
            spec["tflite_dynamic_range"] = quantized
        if opts.bench:
            log(f"timing {opts.bench} val images ...")
            spec["latency"] = latency(stage, cfg, model, opts.bench)
        spec["sizes_bytes"] = {k: _size(stage / v) for k, v in files.items()}
        (stage / SPEC).write_text(json.dumps(spec, indent=2) + "\n")
        (stage / CARD).write_text(model_card(run_dir, cfg, spec, metrics, chosen))
        if out.exists():  # an earlier export (checked): replaced whole
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(old / out.name)
            stage.rename(out)
            shutil.rmtree(old)
        else:
            stage.rename(out)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    log(f"exported {run_dir} -> {out}: {', '.join(files.values())}, {SPEC}, {CARD}")
    return spec


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _tflite(saved_model: Path, quantize: bool) -> bytes:
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(
        str(saved_model), signature_keys=["serve_image"]
    )
    if quantize:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]  # dynamic range: int8 weights
    return converter.convert()


def latency(folder: Path, cfg, model, n: int) -> dict:
    """Seconds per image, after warm-up, on ``n`` val images of the run's build (their stored
    bytes): the SavedModel's serving signature one image per call and 16 per call, the TFLite
    model one decoded image per call (decode and resize not included: the client's), and
    kerasfrac's own path (``preprocess`` + the Keras model, what ``predict`` runs)."""
    import itertools
    import os
    import time

    import tensorflow as tf

    from kerasfrac import data
    from kerasfrac.data.decode import decode_resize, preprocess
    from kerasfrac.models import predict_probs

    build = data.check_build(cfg.data.dir, cfg.dataset)
    encoded = [
        ex["encoded"]
        for ex in itertools.islice(build.read("val", decode=False).as_numpy_iterator(), n)
    ]
    n = len(encoded)
    size, gray, resize = cfg.data.image_size, cfg.data.grayscale, cfg.data.resize
    serve = tf.saved_model.load(str(folder / SAVED_MODEL)).signatures["serving_default"]
    runner = tf.lite.Interpreter(model_path=str(folder / TFLITE)).get_signature_runner(
        "serve_image"
    )
    resized = [decode_resize(e, size, gray, resize).numpy()[None] for e in encoded]

    def per_image(call, items) -> float:
        call(items[0])  # warm-up: tracing, allocation
        started = time.perf_counter()
        for item in items:
            call(item)
        return (time.perf_counter() - started) / len(items)

    batches = [encoded[i : i + 16] for i in range(0, n, 16)]
    out = {
        "images": n,
        "cpu_cores": len(os.sched_getaffinity(0)),
        "saved_model_batch_1": per_image(lambda e: serve(image_bytes=tf.constant([e])), encoded),
        "saved_model_batch_16": per_image(lambda b: serve(image_bytes=tf.constant(b)), batches)
        / 16,
        "tflite_decoded_batch_1": per_image(lambda r: runner(image=r), resized),
        "kerasfrac_predict_batch_1": per_image(
            lambda e: predict_probs(
                model, preprocess(tf.constant(e), size, gray, resize)[None], cfg.eval.tta
            ).numpy(),
            encoded,
        ),
    }
    return out


def _tflite_auroc(path: Path, cfg) -> float:
    """Val AUROC of a TFLite model's ``serve_image`` on the run's build (images as the
    evaluation pipeline prepares them, back to the uint8 they were before / 255)."""
    import tensorflow as tf

    from kerasfrac import data
    from kerasfrac.evaluation.metrics import auroc

    runner = tf.lite.Interpreter(model_path=str(path)).get_signature_runner("serve_image")
    labels, probs = [], []
    for batch in data.make_eval_dataset(None, "val", cfg.data, 32):
        images = np.round(np.asarray(batch["image"]) * 255.0).astype(np.uint8)
        for image in images:
            probs.append(float(runner(image=image[None])["model_probability"][0]))
        labels.extend(np.asarray(batch["label"]).reshape(-1).astype(int).tolist())
    return float(auroc(np.array(labels), np.array(probs)))


def _spec(run_dir, cfg, model_file, calibrator, thresholds, has_box, files) -> dict:
    size, channels = cfg.data.image_size, 1 if cfg.data.grayscale else 3
    return {
        "run_dir": str(Path(run_dir).resolve()),
        "model": str(model_file),
        "files": files,
        "input": {
            "serving_default": "image_bytes: tf.string [N], encoded JPEG or PNG files",
            "serve_image": f"image: uint8 [N, {size}, {size}, {channels}]",
            "preparation": {
                "decode": "JPEG or PNG, to 1 channel (luma, BT.601)"
                if cfg.data.grayscale
                else "JPEG or PNG, to RGB",
                "resize": f"area resize to {size}x{size}, "
                + (
                    "keeping the aspect ratio, padded with black (resize_with_pad)"
                    if cfg.data.resize == "pad"
                    else "stretched to a square"
                ),
                "scale": "uint8 / 255 -> float32 [0, 1] (inside the model)",
                "test_time_augmentation": "mean over the image and its left-right mirror"
                if cfg.eval.tta == "flip"
                else "none",
            },
        },
        "outputs": {
            "probability": "p(fractured), calibrated on val"
            if calibrator
            else "p(fractured), the model's own (no calibrator: run `kerasfrac evaluate`)",
            "model_probability": "p(fractured), the model's own",
            **{f"decision_{k}": f"model_probability >= {v:.6f}" for k, v in thresholds.items()},
            **(
                {"box_heatmap": "where the model places the fracture (box head)"} if has_box else {}
            ),
        },
        "thresholds": thresholds,
        "calibrator": calibrator.to_dict() if calibrator else None,
        "dataset": cfg.dataset,
        "data_dir": str(cfg.data.dir),
    }


def model_card(run_dir, cfg, spec: dict, metrics: dict | None, chosen: dict | None) -> str:
    """MODEL_CARD.md of an export (Markdown)."""
    from kerasfrac.data import check_build
    from kerasfrac.evaluation.evaluate import _ci, _pct, operating_point_text

    lines = [f"# Model card: {runs.run_name(run_dir)}", "", f"_{INTENDED_USE}_", ""]
    lines += ["## Model", ""]
    lines += [
        f"- Architecture `{cfg.model.name}` (head `{cfg.model.head}`"
        + (", box head" if cfg.model.box_head else "")
        + (", metadata head used in training only" if cfg.model.meta_head else "")
        + f"), trained from scratch by kerasfrac for {cfg.train.epochs} epochs "
        f"(`{cfg.train.optimizer}`, learning rate {cfg.train.learning_rate:g}, batch "
        f"{cfg.train.batch_size}); run `{spec['run_dir']}`.",
        f"- Input: {spec['input']['preparation']['decode']}; "
        f"{spec['input']['preparation']['resize']}; {spec['input']['preparation']['scale']}; "
        f"test-time augmentation: {spec['input']['preparation']['test_time_augmentation']}.",
        "",
    ]
    lines += ["## Data", ""]
    try:
        build = check_build(cfg.data.dir, cfg.dataset)
        m = build.manifest
        counts = ", ".join(
            f"{s} {sum(m['splits'][s].values())} ({m['splits'][s].get('fractured', 0)} fractured)"
            for s in ("train", "val", "test")
        )
        lines += [
            f"- Dataset `{cfg.dataset}`, build `{cfg.data.dir}`: split seed {m.get('seed')}, "
            f"{counts}; duplicate groups kept within one split.",
            "",
        ]
    except ValueError as err:
        lines += [f"- Dataset `{cfg.dataset}` (build not readable here: {err})", ""]
    lines += ["## Results on the test split", ""]
    if metrics:
        ci = metrics.get("ci95") or {}
        lines.append(
            f"- {metrics['n']} images: AUROC {metrics['auroc']:.3f}{_ci(ci, 'auroc', False)}; "
            f"majority baseline accuracy {_pct(metrics['majority_baseline_accuracy'])}."
        )
        base = metrics.get("no_anatomy_baseline") or {}
        if base.get("sentence"):
            lines.append(f"- No-anatomy baseline (never sees a bone): {base['sentence']}")
        cal = metrics.get("calibration")
        if cal:
            lines.append(
                f"- Calibration: ECE {cal['before']['ece']:.3f} -> {cal['after']['ece']:.3f}, "
                f"Brier {cal['before']['brier']:.4f} -> {cal['after']['brier']:.4f} after "
                f"{cal['calibrator']['description']}."
            )
        for name, p in (metrics.get("operating_points") or {}).items():
            lines.append(
                f"- Operating point `{name}` (threshold {p['threshold']:.4f}, chosen on val): "
                f"{operating_point_text(p)}."
            )
        for name, g in (metrics.get("subgroups") or {}).items():
            if g.get("auroc") is not None and name.endswith("=1"):
                lines.append(f"- Subgroup `{name}`: {g['n']} images, AUROC {g['auroc']:.3f}.")
    else:
        lines.append(f"- None yet: run `kerasfrac evaluate --run-dir {run_dir}` and export again.")
    lines += [
        "",
        "## Known failure modes",
        "",
        "- Acquisition context can stand in for anatomy: `kerasfrac audit` measures a "
        "classifier that never sees a bone (image size, file, thumbnail statistics, metadata); "
        "compare it with the model above. On FracAtlas hands are the weakest body region.",
        "- Probabilities are calibrated to val's prevalence"
        + (
            f" ({chosen['calibrator'].prevalence:.3f})"
            if chosen and chosen["calibrator"].prevalence
            else ""
        )
        + "; another clinic's share of fractures changes them (`kerasfrac evaluate "
        "--prevalence P`).",
        "- Images unlike the training data (other body regions, other devices, children, "
        "DICOM windowing different from the export's JPEG/PNG input) are outside what was "
        "measured.",
        "",
        "## Use",
        "",
        "```python",
        "import tensorflow as tf",
        f"m = tf.saved_model.load('{SAVED_MODEL}')",
        "out = m.signatures['serving_default'](image_bytes=tf.constant([open('x.jpg', "
        "'rb').read()]))",
        "print(out['probability'].numpy())",
        "```",
        "",
        "Reproduce: `kerasfrac train --config CONFIG` as in the run's config.yaml, then "
        f"`kerasfrac evaluate --run-dir {spec['run_dir']}` and `kerasfrac export --run-dir "
        f"{spec['run_dir']} --out DIR`.",
        "",
    ]
    return "\n".join(lines)


def main(run_dir, out, opts: ExportOptions) -> int:
    """``kerasfrac export``: see ``cli.add_export``."""
    spec = export(run_dir, out, opts)
    for name, n in spec["sizes_bytes"].items():
        print(f"  {name}: {n / 1e6:.2f} MB")
    for name, value in (spec.get("tflite_dynamic_range") or {}).items():
        print(f"  tflite dynamic range, {name}: {value:+.4f}")
    for name, value in (spec.get("latency") or {}).items():
        shown = f"{1000 * value:.1f} ms per image" if isinstance(value, float) else value
        print(f"  latency {name}: {shown}")
    print(f"written: {out}")
    return 0
