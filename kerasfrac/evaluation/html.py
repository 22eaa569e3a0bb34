"""``report.html``: a run on one self-contained page, and a page comparing runs.

The run page is rendered from the run directory's files alone (config.yaml, metrics.json,
plots/ with the training curves, gallery/, explain/explain.json and explain's figures, the
build's manifest.json and audit/audit.json), so ``kerasfrac evaluate`` writes it and
``kerasfrac explain`` re-renders it with its part added. The HTML comes from the Jinja2 templates in
``templates/`` (autoescaped: run names, paths and ids are escaped); every image is embedded
as a base64 data URI and the page loads nothing else (no script, no external stylesheet or
font; a Content-Security-Policy allows data: images and the inline style only), so it opens
offline from a file browser or a laptop.

The galleries are made once, by evaluate, where the model is at hand (``write_gallery``): the
most confident false positives and false negatives of the test split and a seeded sample of
true positives at the run's decision threshold, each a small JPEG of the image under its
Grad-CAM map for "fractured" (``kerasfrac.explain.gradcam``), fracture boxes in green where
the build has them, listed with probability and label in ``gallery/gallery.json``.

TensorFlow is imported by ``write_gallery`` only.
"""

from __future__ import annotations

import base64
import io
import json
import os
import time
from pathlib import Path
from urllib.parse import quote

import jinja2
import numpy as np
import yaml

from kerasfrac import runs
from kerasfrac.names import SPLITS
from tfrecords_builder.manifest import read_manifest

#: The galleries: (key, heading, what it shows).
GALLERY_GROUPS = (
    (
        "false_positives",
        "Most confident false positives",
        "normal images the model scored highest: what it takes for a fracture",
    ),
    (
        "false_negatives",
        "Most confident false negatives",
        "fractured images the model scored lowest: the fractures it misses",
    ),
    (
        "true_positives",
        "A sample of true positives",
        "fractured images it found, drawn at random (seeded), highest probability first",
    ),
)
GALLERY_SIZE = 6  # images per gallery: the page stays small
THUMB_SIDE = 256  # px, the longer side of a gallery JPEG
JPEG_QUALITY = 80
CAM_ALPHA = 0.4  # the heat map's opacity over the X-ray
#: Evaluate's figures of the test split, in page order: (file in plots/, caption).
FIGURES = (
    ("test_roc.png", "ROC with its 95% bootstrap band"),
    ("test_pr.png", "Precision-recall"),
    ("test_confusion.png", "Confusion matrix"),
    ("test_reliability.png", "Reliability before and after the val calibrator"),
)
#: The page's only allowances: inline style and data: images.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}


# --------------------------------------------------------------------------- the galleries


def select_gallery(
    ids, labels, probs, threshold: float, n: int = GALLERY_SIZE, seed: int = 0
) -> tuple[dict[str, list[int]], dict[str, int]]:
    """``(picks, counts)``: the row indices of each gallery and how many images each kind
    has in all. A positive call is ``prob >= threshold`` (as predict decides). False
    positives: normal images called fractured, highest probability first; false negatives:
    fractured images called normal, lowest first; true positives: ``n`` drawn at random
    (``seed``), highest first. Ties break by image id."""
    if n < 0:
        raise ValueError(f"gallery size must be 0 or more images; got {n}")
    ids = list(ids)
    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    if not len(ids) == labels.size == probs.size:
        raise ValueError(
            f"ids, labels and probabilities differ in length ({len(ids)}, {labels.size}, "
            f"{probs.size}): pass the columns of one predictions file"
        )
    called = probs >= threshold
    kinds = {
        "false_positives": np.flatnonzero((labels == 0) & called),
        "false_negatives": np.flatnonzero((labels == 1) & ~called),
        "true_positives": np.flatnonzero((labels == 1) & called),
    }
    counts = {k: int(v.size) for k, v in kinds.items()}

    def highest(rows) -> list[int]:
        return sorted((int(k) for k in rows), key=lambda k: (-probs[k], ids[k]))

    tp = kinds["true_positives"]
    drawn = np.random.default_rng(seed).choice(tp, size=min(n, tp.size), replace=False)
    picks = {
        "false_positives": highest(kinds["false_positives"])[:n],
        "false_negatives": sorted(
            (int(k) for k in kinds["false_negatives"]), key=lambda k: (probs[k], ids[k])
        )[:n],
        "true_positives": highest(drawn),
    }
    return picks, counts


def overlay_jpeg(
    image, cam, boxes=None, side: int = THUMB_SIDE, quality: int = JPEG_QUALITY
) -> bytes:
    """A JPEG (longer side ``side`` px) of ``image`` ([H, W, C] in [0, 1]) under ``cam``
    ([H, W], the jet colour map scaled to its peak, the peak marked with a white +) with
    ``boxes`` ([N, 4] normalised ymin, xmin, ymax, xmax in the image's frame) in green."""
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    x = np.clip(np.asarray(image, np.float32), 0.0, 1.0)
    base = np.repeat(x[..., :1], 3, axis=-1) if x.shape[-1] == 1 else x[..., :3]
    m = np.asarray(cam, np.float32)
    peak = float(m.max()) if m.size else 0.0
    if peak > 0:
        heat = colormaps["jet"](m / peak)[..., :3].astype(np.float32)
        base = (1 - CAM_ALPHA) * base + CAM_ALPHA * heat
    h, w = base.shape[:2]
    scale = side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    pil = Image.fromarray((base * 255).round().astype(np.uint8)).resize(size, Image.BILINEAR)
    draw = ImageDraw.Draw(pil)
    W, H = size
    for ymin, xmin, ymax, xmax in np.asarray(boxes if boxes is not None else []).reshape(-1, 4):
        draw.rectangle([xmin * W, ymin * H, xmax * W, ymax * H], outline=(0, 255, 0), width=2)
    if peak > 0:
        y, x0 = np.unravel_index(int(np.argmax(m)), m.shape)
        cx, cy, r = (x0 + 0.5) * scale, (y + 0.5) * scale, max(4, side // 32)
        draw.line([cx - r, cy, cx + r, cy], fill=(255, 255, 255), width=2)
        draw.line([cx, cy - r, cx, cy + r], fill=(255, 255, 255), width=2)
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_gallery(
    run_dir,
    model,
    cfg,
    build,
    ids,
    labels,
    probs,
    threshold: float,
    threshold_source: str,
    n: int = GALLERY_SIZE,
    seed: int = 0,
    batch_size: int = 16,
) -> dict:
    """The test split's galleries (``select_gallery``) as JPEG overlays in the run's
    ``gallery/`` with ``gallery.json`` describing them; returns that dict. ``ids``, ``labels``,
    ``probs``: the test predictions evaluate scored (the probabilities shown are those)."""
    import tensorflow as tf

    from kerasfrac.data import check_build, preprocess
    from kerasfrac.explain import gradcam

    picks, counts = select_gallery(ids, labels, probs, threshold, n, seed)
    wanted = {ids[k] for rows in picks.values() for k in rows}
    found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    has_boxes = False
    size, data_cfg = cfg.data.image_size, cfg.data
    # One pass over the records without decoding; only the gallery's images are decoded,
    # prepared as the evaluation pipeline prepares them (``preprocess``).
    for ex in check_build(build).read("test", decode=False).as_numpy_iterator():
        boxes = np.asarray(ex["boxes"], np.float32).reshape(-1, 4)
        has_boxes |= len(boxes) > 0
        image_id = ex["image_id"].decode()
        if image_id in wanted:
            image = preprocess(
                tf.constant(ex["encoded"]), size, data_cfg.grayscale, data_cfg.resize
            )
            frame = gradcam.boxes_to_input_frame(
                boxes, int(ex["height"]), int(ex["width"]), size, data_cfg.resize
            )
            found[image_id] = (image.numpy(), frame)
    missing = sorted(wanted - set(found))
    if missing:
        raise ValueError(
            f"{len(missing)} predicted test images (e.g. {missing[0]!r}) are not in the build "
            f"{cfg.data.dir!r}: the predictions are of another build; rerun `kerasfrac "
            f"evaluate --run-dir {run_dir} --recompute`"
        )
    cam = gradcam.GradCam(model)
    order = sorted(found)
    maps: dict[str, np.ndarray] = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        out = cam(np.stack([found[i][0] for i in chunk]), 1.0)  # +1: evidence for "fractured"
        maps.update(zip(chunk, out))
    folder = runs.gallery_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[dict]] = {}
    written = set()
    for key, _, _ in GALLERY_GROUPS:
        groups[key] = []
        for rank, k in enumerate(picks[key], start=1):
            image_id = ids[k]
            image, boxes = found[image_id]
            name = f"{key}_{rank:02d}.jpg"
            runs.write_bytes(folder / name, overlay_jpeg(image, maps[image_id], boxes))
            written.add(name)
            groups[key].append(
                {
                    "id": image_id,
                    "label": int(labels[k]),
                    "probability": float(probs[k]),
                    "file": name,
                    "n_boxes": int(len(boxes)),
                }
            )
    record = {
        "split": "test",
        "threshold": float(threshold),
        "threshold_source": threshold_source,
        "n_per_group": n,
        "seed": seed,
        "counts": counts,
        "has_boxes": bool(has_boxes),
        "cam": {
            "kind": gradcam.map_kind(cam.method),
            "method": cam.method,
            "layer": cam.layer_name,
            "target": "fractured",
        },
        "groups": groups,
    }
    runs.write_text(folder / "gallery.json", json.dumps(record, indent=2) + "\n")
    for old in folder.glob("*.jpg"):  # a larger gallery of an earlier evaluation
        if old.name not in written:
            old.unlink()
    return record


# --------------------------------------------------------------------------- reading the run


def _data_uri(path: Path) -> str:
    mime = _MIME.get(path.suffix.lower())
    if mime is None:
        raise ValueError(f"cannot embed {str(path)!r}: expected a PNG or JPEG file")
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _read_json(path: Path) -> dict | None:
    """A JSON object file, None where it is absent or not readable as one (the page then
    says what is missing instead of failing)."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _config_rows(cfg: dict, metrics: dict | None, manifest: dict | None, run_dir: Path):
    data, model, train = cfg.get("data") or {}, cfg.get("model") or {}, cfg.get("train") or {}
    arch = str(model.get("name", "paper_cnn"))
    if model.get("head") not in (None, "gap"):  # gap: the default, or no choice (paper_cnn)
        arch += f", head {model['head']}"
    if model.get("box_head"):
        arch += ", box head"
    if model.get("weights") not in (None, "none"):
        arch += f", weights {model['weights']}"
    try:
        done = (runs.read_state(run_dir) or {}).get("epoch")
    except runs.RunDirError:
        done = None
    if done is None and metrics:
        done = metrics.get("epochs")
    epochs = f"{train.get('epochs', '?')} configured"
    if done is not None:
        epochs = f"{done} done of {epochs}"
    colour = "grayscale" if data.get("grayscale", True) else "RGB"
    seed = (manifest or {}).get("seed")
    return [
        ("dataset", cfg.get("dataset", "?")),
        ("architecture", arch),
        ("image size", f"{data.get('image_size', '?')} px, {colour}, {data.get('resize', '?')}"),
        ("epochs", epochs),
        (
            "training",
            f"batch {train.get('batch_size', '?')}, {train.get('optimizer', '?')} learning rate "
            f"{train.get('learning_rate', '?')}, seed {train.get('seed', '?')}",
        ),
        ("test-time augmentation", (cfg.get("eval") or {}).get("tta", "none")),
        ("data dir", data.get("dir", "?")),
        ("split seed", "not recorded in the build's manifest" if seed is None else seed),
    ]


def _split_rows(manifest: dict | None) -> list[dict]:
    rows = []
    for split in SPLITS:
        c = ((manifest or {}).get("splits") or {}).get(split)
        if isinstance(c, dict):
            f, n = int(c.get("fractured", 0)), int(c.get("normal", 0))
            rows.append({"split": split, "fractured": f, "normal": n, "total": f + n})
    return rows


def _figure(path: Path, caption: str) -> dict | None:
    return {"caption": caption, "src": _data_uri(path)} if path.is_file() else None


def _audit_baseline(data_dir: Path) -> dict | None:
    """The no-anatomy baseline of the build's ``kerasfrac audit`` (audit/audit.json): its
    test AUROC with CI, for a page whose evaluation ran without the baseline."""
    audit = _read_json(data_dir / "audit" / "audit.json")
    block = (((audit or {}).get("baseline") or {}).get("auroc") or {}).get("all")
    if not isinstance(block, dict) or block.get("auroc") is None:
        return None
    return {"auroc": block.get("auroc"), "ci95": block.get("ci95"), "file": "audit/audit.json"}


def _gallery(run_dir: Path) -> tuple[dict | None, str | None]:
    """``(the galleries to show, None)``, ``(None, None)`` where evaluate has made none, or
    ``(None, what is wrong)`` where gallery.json cannot be used (edited or damaged)."""
    folder = runs.gallery_dir(run_dir)
    if not (folder / "gallery.json").is_file():
        return None, None
    record = _read_json(folder / "gallery.json")
    try:
        if record is None:
            raise ValueError("not a JSON object")
        threshold = float(record["threshold"])
        groups = []
        for key, heading, what in GALLERY_GROUPS:
            items = []
            for item in record["groups"].get(key, []):
                path = folder / str(item["file"])
                if path.name != str(item["file"]) or not path.is_file():
                    continue  # only the gallery's own files are embedded
                p = float(item["probability"])
                items.append(
                    {
                        **item,
                        "probability": p,
                        "src": _data_uri(path),
                        "label_name": "fractured" if item["label"] == 1 else "normal",
                        "called": "fractured" if p >= threshold else "normal",
                    }
                )
            total = (record.get("counts") or {}).get(key, len(items))
            groups.append(
                {"key": key, "heading": heading, "what": what, "entries": items, "total": total}
            )
        missing = [k for k in ("threshold_source", "has_boxes", "cam") if k not in record]
        if missing:  # the page shows them
            raise KeyError(missing[0])
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        return None, (
            f"{folder / 'gallery.json'} cannot be read ({type(err).__name__}: {err}); it was "
            f"edited or damaged: rerun `kerasfrac evaluate --run-dir {run_dir}` to remake it"
        )
    return {**record, "threshold": threshold, "sections": groups}, None


def _explain_caption(stem: str) -> str:
    """What one of explain's figures shows, from its file name."""
    known = {
        "class_vis": "Class visualisation: gradient ascent on the input towards each class",
        "grad_cam": "CAM overlays of the explained images (boxes in green where there are)",
        "grad_cam_mean": "Mean CAM per class over the split (dashed: the border band)",
        "boxmap_mean": "Mean box heat map per class over the split (dashed: the border band)",
    }
    if stem.startswith("feature_maps_"):
        return f"Feature maps of layer {stem[len('feature_maps_') :]}, most active channels"
    return known.get(stem, stem.replace("_", " "))


def _explain(run_dir: Path) -> dict | None:
    folder = run_dir / runs.EXPLAIN
    result = _read_json(folder / "explain.json")
    if result is None:
        return None
    figures = []
    for f in result.get("figures") or []:
        path = Path(f)
        path = path if path.is_absolute() else folder / path.name
        if path.parent.resolve() == folder.resolve() and path.is_file():
            figures.append({"caption": _explain_caption(path.stem), "src": _data_uri(path)})
    audits = [a for a in (result.get("audit"), result.get("box_map_audit")) if a]
    return {
        "audits": audits,
        "occlusion": result.get("occlusion"),
        "figures": figures,
        "images": result.get("images"),
    }


def run_context(run_dir) -> dict:
    """Everything the run page shows, read from the run directory (see the module doc)."""
    run_dir = Path(run_dir)
    config_file = runs.config_path(run_dir)
    if not config_file.is_file():
        raise ValueError(
            f"{str(run_dir)!r} has no config.yaml: it is not a kerasfrac run directory. Pass "
            "the --run-dir that `kerasfrac train` wrote"
        )
    cfg = yaml.safe_load(config_file.read_text()) or {}
    try:
        metrics, metrics_problem = runs.read_metrics(run_dir), None
    except ValueError as err:  # damaged: the rest of the page still shows
        metrics, metrics_problem = None, str(err)
    configured = str((cfg.get("data") or {}).get("dir") or "")
    data_dir = Path(configured)
    manifest = read_manifest(configured)
    m = metrics or {}
    base = m.get("no_anatomy_baseline") or {}
    figures = [_figure(run_dir / runs.PLOTS / name, caption) for name, caption in FIGURES]
    curves = _figure(run_dir / runs.PLOTS / "training_curves.png", "Training curves")
    gallery, gallery_problem = _gallery(run_dir)
    return {
        "title": f"kerasfrac run {run_dir.resolve().name}",
        "run_name": run_dir.resolve().name,
        "run_dir": str(run_dir.resolve()),
        "generated": _now(),
        "csp": CSP,
        "config": _config_rows(cfg, metrics, manifest, run_dir),
        "manifest_found": manifest is not None,
        "data_dir": configured,
        "splits": _split_rows(manifest),
        "quarantined": (manifest or {}).get("quarantined_count"),
        "m": metrics,
        "metrics_problem": metrics_problem,
        "baseline": base if base and "unavailable" not in base else None,
        "baseline_unavailable": base.get("unavailable"),
        "audit_baseline": None if base or not configured else _audit_baseline(data_dir),
        "figures": [f for f in figures if f],
        "training_curves": curves,
        "gallery": gallery,
        "gallery_problem": gallery_problem,
        "explain": _explain(run_dir),
    }


# --------------------------------------------------------------------------- rendering


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _num(x, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _signed(x) -> str:
    return "n/a" if x is None else f"{x:+.3f}"


def _ci(pair, how: str = "num") -> str:
    """`` [lo, hi]`` of a CI pair in the style ``how`` (num, pct, signed); empty without."""
    if not pair or pair[0] is None:
        return ""
    f = {"num": _num, "pct": _pct, "signed": _signed}[how]
    return f" [{f(pair[0])}, {f(pair[1])}]"


def environment() -> jinja2.Environment:
    """The templates (package data of kerasfrac.evaluation), autoescaped, strict about names."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("kerasfrac.evaluation", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(pct=_pct, num=_num, signed=_signed, ci=_ci)
    return env


def render_run(run_dir) -> str:
    """The run page's HTML (``run_context`` through templates/run.html.j2)."""
    return environment().get_template("run.html.j2").render(**run_context(run_dir))


def write_run_report(run_dir) -> Path:
    """Write (atomically) the run's ``report.html``; returns its path."""
    path = runs.report_html_path(run_dir)
    runs.write_text(path, render_run(run_dir))
    return path


def compare_context(run_dirs, out: Path) -> dict:
    """The comparison page: ``report.rows`` of each run (with image size, epochs and the
    architecture beside), its report.html linked relative to ``out``, and the runs' test ROC
    curves (their predictions.csv) overlaid in one figure."""
    from kerasfrac.evaluation import plots, report

    table = report.rows(run_dirs)
    curves, without = [], []
    for row in table:
        d = Path(row["dir"])
        cfg = yaml.safe_load(runs.config_path(d).read_text()) or {}
        data, train = cfg.get("data") or {}, cfg.get("train") or {}
        m = runs.read_metrics(d) or {}
        row["architecture"] = (cfg.get("model") or {}).get("name", "paper_cnn")
        row["image_size"] = data.get("image_size", "?")
        done = "?" if m.get("epochs") is None else m["epochs"]
        row["epochs"] = f"{done} of {train.get('epochs', '?')}"
        row["name"] = name = _curve_name(row, table)
        row["cells"] = [
            (key, name if key == "run" else report.format_cell(key, row))
            for key, _ in report.COLUMNS
        ]
        page = runs.report_html_path(d)
        row["link"] = relative_href(page, out.resolve().parent) if page.is_file() else None
        preds = runs.predictions_path(d, "test")
        if preds.is_file():
            _, labels, probs = runs.read_predictions(preds)
            curves.append((name, labels, probs))
        else:
            without.append(name)
    roc = plots.roc_overlay_png(curves, "ROC on each run's test split") if curves else None
    return {
        "title": f"kerasfrac: {len(table)} runs compared",
        "generated": _now(),
        "csp": CSP,
        "columns": report.COLUMNS,
        "table": table,
        "roc": _png_uri(roc) if roc else None,
        "without_predictions": without,
        "below": [r["name"] for r in table if report.below_majority(r)],
        "not_beating": [r["name"] for r in table if r.get("beats_baseline") is False],
        "given": [
            f"{r['name']} ({r['split_given_note']})" for r in table if r.get("split_given_note")
        ],
    }


def relative_href(target: Path, base: Path) -> str:
    """A link from a page in folder ``base`` to the file ``target``: relative (the pages can
    move together), percent-encoded (``#``, ``?``, spaces and ``:`` in folder names stay
    part of the path) and starting with ``./`` or ``../`` (never read as a URL scheme)."""
    rel = Path(os.path.relpath(Path(target).resolve(), Path(base).resolve())).as_posix()
    rel = quote(rel)
    return rel if rel.startswith("../") else f"./{rel}"


def _curve_name(row: dict, table: list[dict]) -> str:
    """A run's name in the table and the ROC legend: its folder's name, with its parent's
    where another run has the same name."""
    if sum(r["run"] == row["run"] for r in table) == 1:
        return row["run"]
    d = Path(row["dir"]).resolve()
    return f"{d.parent.name}/{d.name}"


def check_out(out) -> Path:
    """``--html OUT``: a file name ending in .html in a writable folder (checked before any
    work is spent)."""
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise ValueError(
            f"--html {str(out)!r}: expected a file name ending in .html, e.g. --html runs.html"
        )
    runs.check_writable(out.parent, "--html")
    return out


def write_compare(out, run_dirs) -> Path:
    """``kerasfrac report --html OUT RUNS...``: the comparison page, written atomically."""
    out = check_out(out)
    text = environment().get_template("compare.html.j2").render(**compare_context(run_dirs, out))
    runs.write_text(out, text)
    return out
