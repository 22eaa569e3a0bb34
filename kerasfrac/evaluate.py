"""Evaluate a model on a split: predictions (image_id, label, probability) and exact metrics.

Metrics come from exact computations (scikit-learn and numpy) on the saved predictions, not
from Keras' streaming approximations. Label 1 = fractured = positive class; an image is
called fractured when ``probability >= threshold``.

``metrics(labels, probs)`` gives, at a threshold (0.5 by default): accuracy, mean binary
cross-entropy, AUROC, average precision, sensitivity, specificity, balanced accuracy, F1,
precision, the confusion matrix ``[[tn, fp], [fn, tp]]``, the majority baseline and the class
counts, plus seeded percentile-bootstrap 95% confidence intervals (resampling the build's
duplicate groups where a split holds any, with the share of resamples where a metric was
undefined). Metrics a split cannot
define (AUROC with one class, sensitivity without fractured images, ...) are ``None`` and
listed in ``undefined`` with the reason. ``val=(labels, probs)`` adds a second operating
point at the Youden-J threshold chosen on those validation predictions (``youden``).

``evaluate_run(run_dir)`` does the whole job for a training run directory: predictions for
the split (and for val, to choose the threshold), metrics.json, plots, TensorBoard images, and
the no-anatomy baseline of ``kerasfrac.audit`` beside the model (``baseline_comparison``).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
from sklearn import metrics as skm

from kerasfrac.metrics import sensitivity_at_specificity

#: Metrics that get bootstrap confidence intervals.
CI_METRICS = ("accuracy", "auroc", "sensitivity", "specificity")
#: Subgroups of the baseline comparison get AUROCs only with this many images of each class.
MIN_PER_CLASS_FOR_CI = 10
#: FracAtlas metadata subgroups evaluated separately when the records carry them.
SUBGROUP_COLUMNS = ("hand", "leg", "hip", "shoulder", "mixed", "hardware")


def predict(model, dataset, tta: str = "none") -> tuple[list[str], np.ndarray, np.ndarray]:
    """Run ``model`` over batches of ``(image, label, image_id)``; ids, labels, probabilities.

    ``tta="flip"``: each probability is the mean over the image and its left-right mirror.
    """
    from kerasfrac.model import predict_probs

    ids, labels, probs = [], [], []
    for images, y, image_ids in dataset:
        p = predict_probs(model, images, tta)
        probs.append(np.asarray(p, dtype=np.float64).reshape(-1))
        labels.append(np.asarray(y).reshape(-1))
        ids.extend(i.decode() for i in image_ids.numpy())
    if not ids:
        raise ValueError("the split to evaluate is empty: it has no images")
    return ids, np.concatenate(labels).astype(int), np.concatenate(probs)


# --------------------------------------------------------------------------- exact metrics


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den else None


def threshold_metrics(labels, probs, threshold: float = 0.5) -> dict:
    """Metrics of the decisions ``probs >= threshold``; ``None`` where a ratio is 0/0."""
    labels = np.asarray(labels).astype(int)
    pred = np.asarray(probs, dtype=np.float64) >= threshold
    pos = labels == 1
    tp = int(np.sum(pred & pos))
    fn = int(np.sum(~pred & pos))
    fp = int(np.sum(pred & ~pos))
    tn = int(np.sum(~pred & ~pos))
    sens = _ratio(tp, tp + fn)
    spec = _ratio(tn, tn + fp)
    return {
        "threshold": float(threshold),
        "accuracy": _ratio(tp + tn, labels.size),
        "sensitivity": sens,
        "specificity": spec,
        "balanced_accuracy": None if sens is None or spec is None else (sens + spec) / 2,
        "precision": _ratio(tp, tp + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        # rows = true class (normal, fractured), columns = predicted class (normal, fractured)
        "confusion_matrix": [[tn, fp], [fn, tp]],
    }


def bce_per_example(labels, probs, eps: float = 1e-7) -> np.ndarray:
    """Binary cross-entropy per example, probabilities clipped to [eps, 1 - eps] (as Keras)."""
    labels = np.asarray(labels).astype(int)
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1 - eps)
    return -(labels * np.log(p) + (1 - labels) * np.log(1 - p))


def bce_loss(labels, probs, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy (the report's test loss)."""
    return float(np.mean(bce_per_example(labels, probs, eps)))


def youden_threshold(labels, probs) -> float | None:
    """The threshold maximising sensitivity + specificity - 1 on these predictions.

    The candidates are the predicted probabilities themselves (``probs >= t`` is positive);
    on a tie in J the highest threshold wins (fewest positive calls). None with one class.
    """
    labels = np.asarray(labels).astype(int)
    if len(np.unique(labels)) < 2:
        return None
    fpr, tpr, thresholds = skm.roc_curve(labels, probs, drop_intermediate=False)
    j = tpr - fpr
    finite = np.isfinite(thresholds)
    best = int(np.argmax(np.where(finite, j, -np.inf)))  # first max = highest threshold
    return float(thresholds[best])


def _auroc_rows(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Exact AUROC per row (Mann-Whitney with average ranks for ties); NaN for one class."""
    from scipy.stats import rankdata

    ranks = rankdata(p, axis=1)
    n_pos = y.sum(axis=1)
    n_neg = y.shape[1] - n_pos
    rank_sum = np.where(y == 1, ranks, 0.0).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def bootstrap_ci(
    labels, probs, threshold: float = 0.5, n_resamples: int = 1000, seed: int = 0,
    level: float = 0.95, groups=None,
) -> dict:  # fmt: skip
    """Percentile bootstrap CIs of CI_METRICS: resample images with replacement, or, where
    ``groups`` (one id per image) puts images together, whole groups (``resampled``).

    Returns ``{metric: [low, high] or None, "n_resamples", "seed", "level", "valid",
    "undefined_share", "resampled"}``; ``valid[metric]`` counts the resamples where the
    metric was defined (a resample without fractured images has no sensitivity and no
    AUROC) and ``undefined_share[metric]`` the share where it was not; fewer than half valid
    gives None. The same ``seed`` gives the same intervals.
    """
    from kerasfrac.metrics import has_groups

    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    if has_groups(groups):
        return _group_bootstrap_ci(labels, probs, threshold, n_resamples, seed, level, groups)
    n = labels.size
    rng = np.random.default_rng(seed)
    values: dict[str, list[np.ndarray]] = {m: [] for m in CI_METRICS}
    chunk = max(1, min(n_resamples, 4_000_000 // max(n, 1)))
    done = 0
    while done < n_resamples:
        b = min(chunk, n_resamples - done)
        idx = rng.integers(0, n, size=(b, n))
        y, p = labels[idx], probs[idx]
        pred = p >= threshold
        pos = (y == 1).sum(axis=1)
        neg = n - pos
        tp = (pred & (y == 1)).sum(axis=1)
        tn = (~pred & (y == 0)).sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            values["accuracy"].append((tp + tn) / n)
            values["sensitivity"].append(np.where(pos > 0, tp / pos, np.nan))
            values["specificity"].append(np.where(neg > 0, tn / neg, np.nan))
        values["auroc"].append(_auroc_rows(y, p))
        done += b
    return _percentiles({m: np.concatenate(values[m]) for m in CI_METRICS}, n_resamples, seed,
                        level, "images")  # fmt: skip


def _percentiles(values: dict, n_resamples: int, seed: int, level: float, resampled: str):
    tail = (1 - level) / 2 * 100
    out: dict = {
        "n_resamples": int(n_resamples), "seed": int(seed), "level": level, "valid": {},
        "undefined_share": {}, "resampled": resampled,
    }  # fmt: skip
    for m in CI_METRICS:
        v = np.asarray(values[m], dtype=np.float64)
        v = v[np.isfinite(v)]
        out["valid"][m] = int(v.size)
        out["undefined_share"][m] = round(1 - v.size / max(1, n_resamples), 4)
        if v.size < n_resamples / 2:
            out[m] = None
        else:
            lo, hi = np.percentile(v, [tail, 100 - tail])
            out[m] = [float(lo), float(hi)]
    return out


def _group_bootstrap_ci(labels, probs, threshold, n_resamples, seed, level, groups) -> dict:
    """``bootstrap_ci`` resampling whole groups (duplicate groups, patients): a resample
    draws as many groups as there are, with replacement, and keeps all their images."""
    from kerasfrac.metrics import auroc, resamples

    values: dict[str, list[float]] = {m: [] for m in CI_METRICS}
    for idx in resamples(labels.size, groups, n_resamples, seed):
        y, p = labels[idx], probs[idx]
        pred = p >= threshold
        pos, neg = int((y == 1).sum()), int((y == 0).sum())
        tp, tn = int((pred & (y == 1)).sum()), int((~pred & (y == 0)).sum())
        values["accuracy"].append((tp + tn) / y.size)
        values["sensitivity"].append(tp / pos if pos else np.nan)
        values["specificity"].append(tn / neg if neg else np.nan)
        a = auroc(y, p)
        values["auroc"].append(np.nan if a is None else a)
    return _percentiles(values, n_resamples, seed, level, "groups")


def _undefined(labels: np.ndarray, at: dict, prefix: str = "") -> dict[str, str]:
    n_pos = int(labels.sum())
    n_neg = int(labels.size - n_pos)
    why: dict[str, str] = {}
    if n_pos == 0 or n_neg == 0:
        missing = "fractured" if n_pos == 0 else "normal"
        why[f"{prefix}auroc"] = f"needs both classes; the split has no {missing} images"
    if n_pos == 0:
        why[f"{prefix}average_precision"] = "needs fractured images; the split has none"
    for name, reason in (
        ("sensitivity", "no fractured images"),
        ("specificity", "no normal images"),
        ("balanced_accuracy", "needs both sensitivity and specificity"),
        ("precision", "no image was called fractured"),
        ("f1", "no fractured images and none called fractured"),
    ):
        if at[name] is None:
            why[f"{prefix}{name}"] = reason
    return why


def metrics(
    labels, probs, threshold: float = 0.5, *, val=None, n_bootstrap: int = 1000,
    seed: int = 0, meta: dict[str, np.ndarray] | None = None, groups=None,
) -> dict:  # fmt: skip
    """All metrics of one split's predictions (see the module docstring).

    ``val``: ``(labels, probs)`` of the validation split; adds ``youden`` (the threshold
    chosen there, and every threshold metric plus CIs at it, applied to THESE predictions).
    ``n_bootstrap`` 0 skips the CIs. ``meta``: ``{column: array}`` aligned with ``labels``
    (FracAtlas metadata, -1 = unknown) adds ``subgroups``. ``groups``: one group id per image
    (the build's duplicate groups): the bootstrap then resamples groups.
    """
    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    if labels.size == 0:
        raise ValueError("no predictions to evaluate: the split is empty")
    if labels.shape != probs.shape:
        raise ValueError(f"labels {labels.shape} and probabilities {probs.shape} differ in shape")
    both = len(np.unique(labels)) == 2
    has_pos = bool(labels.sum() > 0)
    counts = {"fractured": int(labels.sum()), "normal": int((labels == 0).sum())}
    at = threshold_metrics(labels, probs, threshold)
    result = {
        "n": int(labels.size),
        "counts": counts,
        "loss": bce_loss(labels, probs),
        "auroc": float(skm.roc_auc_score(labels, probs)) if both else None,
        "average_precision": float(skm.average_precision_score(labels, probs)) if has_pos else None,
        "sensitivity_at_90_specificity": sensitivity_at_specificity(labels, probs, 0.9),
        **at,
        "majority_class": "normal" if counts["normal"] >= counts["fractured"] else "fractured",
        "majority_baseline_accuracy": max(counts.values()) / labels.size,
    }
    undefined = _undefined(labels, at)
    if n_bootstrap:
        result["ci95"] = bootstrap_ci(labels, probs, threshold, n_bootstrap, seed, groups=groups)
    if val is not None:
        val_labels, val_probs = (np.asarray(v) for v in val)
        t = youden_threshold(val_labels, val_probs)
        if t is None:
            undefined["youden"] = "the validation split has one class; no threshold chosen"
            result["youden"] = None
        else:
            yj = {"chosen_on": "val", **threshold_metrics(labels, probs, t)}
            if n_bootstrap:
                ci = bootstrap_ci(labels, probs, t, n_bootstrap, seed, groups=groups)
                yj["ci95"] = {k: v for k, v in ci.items() if k != "auroc"}
            undefined.update(_undefined(labels, {**at, **yj}, prefix="youden."))
            undefined.pop("youden.auroc", None)
            undefined.pop("youden.average_precision", None)
            result["youden"] = yj
    if meta is not None:
        result["subgroups"] = subgroup_metrics(labels, probs, meta, threshold)
    result["undefined"] = undefined
    return result


def subgroup_metrics(labels, probs, meta: dict[str, np.ndarray], threshold: float = 0.5) -> dict:
    """Per FracAtlas subgroup (``column=1`` and ``column=0``): counts, accuracy, AUROC.

    Columns whose values are all unknown (-1) are left out; {} when none is known.
    """
    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    out: dict = {}
    for column in SUBGROUP_COLUMNS:
        values = meta.get(column)
        if values is None:
            continue
        values = np.asarray(values)
        if not np.any(values >= 0):
            continue
        for v in (1, 0):
            mask = values == v
            if not mask.any():
                continue
            y, p = labels[mask], probs[mask]
            out[f"{column}={v}"] = {
                "n": int(mask.sum()),
                "counts": {"fractured": int(y.sum()), "normal": int((y == 0).sum())},
                "accuracy": float(np.mean((p >= threshold) == y)),
                "auroc": float(skm.roc_auc_score(y, p)) if len(np.unique(y)) == 2 else None,
            }
        unknown = int(np.sum(values < 0))
        if unknown:
            out[f"{column}=unknown"] = {"n": unknown}
    return out


# --------------------------------------------------------------------------- files


def write_predictions(path: Path, ids, labels, probs) -> None:
    with Path(path).open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["image_id", "label", "probability"])
        for i, y, p in zip(ids, labels, probs):
            out.writerow([i, int(y), f"{p:.6f}"])


def read_predictions(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``(ids, labels, probabilities)`` from a predictions.csv."""
    with Path(path).open(newline="") as f:
        rows = list(csv.DictReader(f))
    missing = {"image_id", "label", "probability"} - set(rows[0] if rows else {})
    if not rows or missing:
        raise ValueError(
            f"{str(path)!r} is not a predictions file (expected columns image_id, label, "
            f"probability with at least one row); delete it to have it recomputed"
        )
    ids = [r["image_id"] for r in rows]
    return (
        ids,
        np.array([int(r["label"]) for r in rows]),
        np.array([float(r["probability"]) for r in rows]),
    )


def finite(x) -> bool:
    return x is not None and math.isfinite(x)


# --------------------------------------------------------------------------- a run directory


def predictions_path(run_dir: Path, split: str) -> Path:
    """``predictions.csv`` for test (train.py's name), ``predictions_<split>.csv`` otherwise."""
    return Path(run_dir) / ("predictions.csv" if split == "test" else f"predictions_{split}.csv")


def metrics_path(run_dir: Path, split: str) -> Path:
    """``metrics.json`` for test (train.py's name), ``metrics_<split>.json`` otherwise."""
    return Path(run_dir) / ("metrics.json" if split == "test" else f"metrics_{split}.json")


def split_records(build_dir, split: str) -> tuple[list[str], np.ndarray, dict[str, np.ndarray]]:
    """Ids, labels and metadata columns of a split, in read order, without decoding images."""
    from tfrecords_builder.reader import read_split

    ids, labels, meta = [], [], {c: [] for c in SUBGROUP_COLUMNS}
    for ex in read_split(build_dir, split, decode=False):
        ids.append(ex["image_id"].numpy().decode())
        labels.append(int(ex["label"].numpy()))
        for c in SUBGROUP_COLUMNS:
            meta[c].append(int(ex["meta"][c].numpy()))
    return ids, np.array(labels, dtype=int), {c: np.array(v, dtype=int) for c, v in meta.items()}


def _check_matches(path: Path, split: str, ids, labels, want_ids, want_labels) -> None:
    if sorted(ids) != sorted(want_ids):
        extra = sorted(set(ids) - set(want_ids))
        lacking = sorted(set(want_ids) - set(ids))
        example = (extra or lacking or ["(duplicates)"])[0]
        raise ValueError(
            f"{str(path)!r} does not hold predictions of the {split!r} split "
            f"({len(ids)} rows vs {len(want_ids)} images; e.g. {example!r} differs): it is from "
            "another split or another build. Delete it or pass --recompute."
        )
    want = dict(zip(want_ids, want_labels))
    wrong = [i for i, y in zip(ids, labels) if want[i] != int(y)]
    if wrong:
        raise ValueError(
            f"{str(path)!r}: labels of {len(wrong)} images (e.g. {wrong[0]!r}) differ from the "
            f"{split!r} split; it is from another build. Delete it or pass --recompute."
        )


def load_run_model(run_dir: Path, model_path: str | Path | None = None):
    """``(cfg, model, model_path)`` of a run, checking the model's input against the config."""
    from kerasfrac import data
    from kerasfrac.config import load_config
    from kerasfrac.model import classifier, load_model

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ValueError(
            f"{str(run_dir)!r} is not a kerasfrac run directory (no config.yaml); pass the "
            "--run-dir that `kerasfrac train` wrote"
        )
    cfg = load_config(run_dir / "config.yaml")
    path = Path(model_path) if model_path else run_dir / "model.keras"
    if not path.is_file():
        best = run_dir / "checkpoints" / "best.keras"
        hint = f" (a checkpoint exists: --model {best})" if best.is_file() else ""
        raise ValueError(
            f"no model at {str(path)!r}: the run has not finished or the file was moved; "
            f"pass --model FILE{hint}"
        )
    model = classifier(load_model(path))  # a checkpoint may carry the box head
    check_input_shape(model, data.image_shape(cfg.data), path)
    return cfg, model, path


def check_input_shape(model, expected: tuple[int, int, int], path) -> None:
    got = tuple(model.input_shape[1:])
    if got != tuple(expected):
        raise ValueError(
            f"model {str(path)!r} takes input {got} but the run's config prepares images as "
            f"{tuple(expected)} (data.image_size, data.grayscale); use the model trained with "
            "this config"
        )


def _split_predictions(run_dir, cfg, model, split, batch_size, recompute, write):
    from kerasfrac import data

    want_ids, want_labels, meta = split_records(cfg.data.dir, split)
    if not want_ids:
        raise ValueError(f"the {split!r} split of {cfg.data.dir!r} is empty: nothing to evaluate")
    path = predictions_path(run_dir, split)
    if path.is_file() and not recompute:
        ids, labels, probs = read_predictions(path)
        _check_matches(path, split, ids, labels, want_ids, want_labels)
        source = "read"
    else:
        ds = data.make_eval_dataset(
            cfg.data.dir, split, cfg.data, batch_size, with_ids=True, dataset=cfg.dataset
        )
        ids, labels, probs = predict(model, ds, cfg.eval.tta)
        # Metrics of exactly what predictions.csv holds (6 decimals), computed or read back.
        probs = np.round(probs, 6)
        if write:
            write_predictions(path, ids, labels, probs)
        source = "computed"
    order = {i: k for k, i in enumerate(want_ids)}
    aligned = {c: v[[order[i] for i in ids]] for c, v in meta.items()}
    return ids, labels, probs, aligned, source


def evaluate_run(
    run_dir: str | Path, split: str = "test", model_path: str | Path | None = None, *,
    n_bootstrap: int = 1000, seed: int = 0, recompute: bool = False, plots: bool = True,
    batch_size: int | None = None, baseline: bool = True,
) -> dict:  # fmt: skip
    """Evaluate a training run on ``split`` (test or val); write metrics, plots, predictions.

    Predictions of the split and of val (whose Youden-J threshold is applied to the split)
    are read from the run's predictions files when present and matching the split, else
    computed with the model and written. ``model_path`` (another model than the run's
    model.keras) always recomputes and writes no predictions files. Writes
    ``metrics.json`` (test) or ``metrics_<split>.json`` and ``plots/<split>_*.png``, and logs
    the plots to ``tensorboard/evaluation``. Bootstrap CIs resample the build's duplicate
    groups where the split holds any. ``baseline`` adds ``no_anatomy_baseline`` (see
    ``baseline_comparison``). Returns the metrics dict.
    """
    if split not in ("test", "val"):
        raise ValueError(f"split must be 'test' or 'val'; got {split!r}")
    run_dir = Path(run_dir)
    cfg, model, path = load_run_model(run_dir, model_path)
    own_model = (
        model_path is None or Path(model_path).resolve() == (run_dir / "model.keras").resolve()
    )
    recompute = recompute or not own_model
    batch = batch_size or cfg.train.batch_size
    ids, labels, probs, meta, source = _split_predictions(
        run_dir, cfg, model, split, batch, recompute, write=own_model
    )
    if split == "val":
        val = (labels, probs)
    else:
        _, vl, vp, _, _ = _split_predictions(
            run_dir, cfg, model, "val", batch, recompute, own_model
        )
        val = (vl, vp)
    has_meta = any(np.any(v >= 0) for v in meta.values())
    groups = split_groups(cfg.data.dir, split, ids)
    result = {
        "split": split,
        "model": str(path),
        "dataset": cfg.dataset,
        "data_dir": str(cfg.data.dir),
        "predictions": source,
        **metrics(labels, probs, 0.5, val=val, n_bootstrap=n_bootstrap, seed=seed,
                  meta=meta if has_meta else None, groups=groups),
    }  # fmt: skip
    if baseline:
        result["no_anatomy_baseline"] = baseline_comparison(
            cfg.data.dir, split, ids, labels, probs, groups=groups, n_bootstrap=n_bootstrap,
            seed=seed,
        )  # fmt: skip
    if split == "val" and result.get("youden"):
        result["youden"]["chosen_on"] = "val (the same split: optimistic)"
    if plots:
        from kerasfrac import plots as plotting

        result["plots"] = [
            str(p.relative_to(run_dir))
            for p in plotting.write_run_plots(run_dir, split, labels, probs, result, groups)
        ]
    metrics_path(run_dir, split).write_text(json.dumps(result, indent=2) + "\n")
    return result


def split_groups(build_dir, split: str, ids) -> list[str]:
    """The build's group (``image/group``) of each of ``ids`` in ``split``, in that order."""
    from tfrecords_builder.reader import read_split

    group_of = {
        ex["image_id"].decode(): ex["group"].decode()
        for ex in read_split(build_dir, split, decode=False).as_numpy_iterator()
    }
    return [group_of.get(i, i) for i in ids]


def baseline_comparison(
    build_dir, split: str, ids, labels, probs, *, groups=None, n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict:  # fmt: skip
    """The model beside the no-anatomy baseline of ``kerasfrac.audit`` on the same images.

    ``{"model_auroc", "baseline_auroc" (each with ci95), "difference" with a paired bootstrap
    ci95 (groups resampled where the split holds them), "beats_baseline", "sentence",
    "subgroups": {"size=small|medium|large", "hardware=0": model and baseline AUROC with
    CIs}}``, or ``{"unavailable": reason}`` where the baseline cannot be fitted.
    """
    from kerasfrac import audit
    from kerasfrac.metrics import auroc_ci, paired_auroc_difference, size_band

    try:
        base = audit.baseline_probabilities(build_dir, split, seed=seed)
    except ValueError as err:
        return {"unavailable": str(err)}
    order = {i: k for k, i in enumerate(base["ids"])}
    missing = [i for i in ids if i not in order]
    if missing:
        return {"unavailable": f"{len(missing)} images (e.g. {missing[0]!r}) not in the build"}
    pick = np.array([order[i] for i in ids])
    b = base["probs"][pick]
    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    n = max(n_bootstrap, 1)
    diff = paired_auroc_difference(labels, probs, b, groups=groups, n_resamples=n, seed=seed)
    m_ci = auroc_ci(labels, probs, groups=groups, n_resamples=n, seed=seed)
    b_ci = auroc_ci(labels, b, groups=groups, n_resamples=n, seed=seed)
    lo = (diff["ci95"] or [None, None])[0]
    beats = lo is not None and lo > 0
    if diff["difference"] is None:
        sentence = "AUROC undefined on this split (one class): no comparison."
    elif beats:
        sentence = (
            f"The model beats a model that never sees a bone by {diff['difference']:+.3f} "
            f"[{diff['ci95'][0]:+.3f}, {diff['ci95'][1]:+.3f}] AUROC."
        )
    else:
        ci = diff["ci95"]
        shown = f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else ""
        sentence = (
            f"The model does NOT clearly beat a model that never sees a bone: AUROC difference "
            f"{diff['difference']:+.3f}{shown}, an interval that reaches 0 or below."
        )
    without = None
    if base["probs_without_metadata"] is not None:
        w = base["probs_without_metadata"][pick]
        without = {
            "baseline_auroc": auroc_ci(labels, w, groups=groups, n_resamples=n, seed=seed),
            "difference": paired_auroc_difference(
                labels, probs, w, groups=groups, n_resamples=n, seed=seed
            ),
        }
    subgroups = {}
    bands = size_band(base["height"][pick], base["width"][pick])
    masks = {f"size={band}": bands == band for band in ("small", "medium", "large")}
    hardware = base["meta"]["hardware"][pick]
    if np.any(hardware >= 0):
        masks["hardware=0"] = hardware == 0
    group_arr = None if groups is None else np.asarray(groups, dtype=object)
    for name, mask in masks.items():
        if not mask.any():
            continue
        g = None if group_arr is None else list(group_arr[mask])
        y = labels[mask]
        row = {"n": int(mask.sum()), "fractured": int(y.sum())}
        if min(int(y.sum()), int((y == 0).sum())) < MIN_PER_CLASS_FOR_CI:
            row["note"] = f"fewer than {MIN_PER_CLASS_FOR_CI} images of a class: no AUROC reported"
        else:
            row["model"] = auroc_ci(y, probs[mask], groups=g, n_resamples=n, seed=seed)
            row["baseline"] = auroc_ci(y, b[mask], groups=g, n_resamples=n, seed=seed)
        subgroups[name] = row
    return {
        "features": "size, file bytes and JPEG flags, thumbnail intensity statistics, metadata "
        "columns (kerasfrac audit); fitted on train",
        "model_auroc": m_ci,
        "baseline_auroc": b_ci,
        "difference": diff,
        "beats_baseline": beats,
        "sentence": sentence,
        "without_metadata": without,
        "subgroups": subgroups,
    }


def _signed(x) -> str:
    return "n/a" if x is None else f"{x:+.3f}"


def baseline_lines(m: dict) -> list[str]:
    """Summary lines of ``no_anatomy_baseline`` (none where absent)."""
    c = m.get("no_anatomy_baseline")
    if not c:
        return []
    if "unavailable" in c:
        return [f"  no-anatomy baseline: unavailable ({c['unavailable']})"]

    def auc(d: dict) -> str:
        ci = d.get("ci95")
        return _num(d.get("auroc")) + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")

    lines = [
        f"  no-anatomy baseline AUROC {auc(c['baseline_auroc'])} vs model {auc(c['model_auroc'])}"
        f" (same images; CIs resample {c['difference']['resampled']})",
        f"  {c['sentence']}",
    ]
    w = c.get("without_metadata")
    if w:
        d = w["difference"]
        shown = f" [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]" if d.get("ci95") else ""
        lines.append(
            f"  the baseline without the metadata columns (image and file statistics only): "
            f"AUROC {auc(w['baseline_auroc'])}; the model's lead over it "
            f"{_signed(d['difference'])}{shown}"
        )
    for name, g in c["subgroups"].items():
        if "model" not in g:
            lines.append(f"  subgroup {name}: n {g['n']} ({g['fractured']} fractured): {g['note']}")
            continue
        lines.append(
            f"  subgroup {name}: n {g['n']} ({g['fractured']} fractured), model AUROC "
            f"{auc(g['model'])}, baseline {auc(g['baseline'])}"
        )
    share = c["difference"].get("undefined_share")
    if share:
        lines.append(f"  ({100 * share:.1f}% of resamples left the difference undefined)")
    return lines


# --------------------------------------------------------------------------- summary


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _ci(ci: dict | None, key: str, pct: bool) -> str:
    if not ci or not ci.get(key):
        return ""
    lo, hi = ci[key]
    f = _pct if pct else _num
    return f" [{f(lo)}, {f(hi)}]"


def summary(m: dict) -> str:
    """A readable multi-line summary of a metrics dict."""
    c = m["counts"]
    ci = m.get("ci95")
    lines = [
        f"split {m.get('split', '?')}: {m['n']} images ({c['fractured']} fractured, "
        f"{c['normal']} normal)",
        f"  majority baseline (always '{m.get('majority_class', 'normal')}'): "
        f"accuracy {_pct(m['majority_baseline_accuracy'])}",
        f"  AUROC {_num(m['auroc'])}{_ci(ci, 'auroc', False)}   "
        f"average precision {_num(m.get('average_precision'))}   sensitivity at 90% "
        f"specificity {_pct(m.get('sensitivity_at_90_specificity'))}   loss {m['loss']:.4f}",
    ]

    def point(name: str, d: dict, ci) -> str:
        tn, fp = d["confusion_matrix"][0]
        fn, tp = d["confusion_matrix"][1]
        return (
            f"  at {name} {d['threshold']:.3f}: accuracy {_pct(d['accuracy'])}"
            f"{_ci(ci, 'accuracy', True)}, sensitivity {_pct(d['sensitivity'])}"
            f"{_ci(ci, 'sensitivity', True)}, specificity {_pct(d['specificity'])}"
            f"{_ci(ci, 'specificity', True)}, balanced accuracy {_pct(d['balanced_accuracy'])}, "
            f"F1 {_num(d['f1'])}; TN {tn} FP {fp} FN {fn} TP {tp}"
        )

    lines.append(point("threshold", m, ci))
    if m.get("youden"):
        y = m["youden"]
        lines.append(point(f"Youden-J threshold (chosen on {y['chosen_on']})", y, y.get("ci95")))
    acc, base = m["accuracy"], m["majority_baseline_accuracy"]
    verdict = "BELOW" if acc < base else "not above" if acc == base else "above"
    lines.append(
        f"  accuracy at 0.5 is {verdict} the majority baseline ({_pct(acc)} vs {_pct(base)})"
    )
    if ci:
        lines.append(
            f"  (95% CIs: percentile bootstrap, {ci['n_resamples']} resamples of "
            f"{ci.get('resampled', 'images')}, seed {ci['seed']})"
        )
    for name, g in (m.get("subgroups") or {}).items():
        if "counts" in g:
            lines.append(
                f"  subgroup {name}: n {g['n']} ({g['counts']['fractured']} fractured), "
                f"accuracy {_pct(g['accuracy'])}, AUROC {_num(g['auroc'])}"
            )
        else:
            lines.append(f"  subgroup {name}: n {g['n']}")
    lines += baseline_lines(m)
    shares = (ci or {}).get("undefined_share") or {}
    undefined = {k: v for k, v in shares.items() if v}
    if undefined:
        lines.append(f"  bootstrap resamples where a metric was undefined: {undefined}")
    for name, why in (m.get("undefined") or {}).items():
        lines.append(f"  undefined: {name} ({why})")
    for p in m.get("plots", []):
        lines.append(f"  plot: {p}")
    return "\n".join(lines)
