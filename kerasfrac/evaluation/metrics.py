"""Exact metrics of (labels, probabilities) with bootstrap CIs that resample what is
independent: numpy/scikit-learn only.

Where a split holds groups (copies of one image, one patient: the builder's ``image/group``),
images of a group are not independent, so the bootstrap resamples groups, not images
(the cluster bootstrap). A resample where a metric is undefined (AUROC of a resample with
one class) is counted and reported as ``undefined_share``, never silently dropped.

``paired_auroc_difference`` compares two scorers on the same images (a model and the
no-anatomy baseline of ``kerasfrac.evaluation.audit``): each resample draws one set of
images (groups) and scores both on it, so the CI is of the difference itself.
"""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

from kerasfrac.names import N_BOOTSTRAP

#: Metrics that get bootstrap confidence intervals.
CI_METRICS = ("accuracy", "auroc", "sensitivity", "specificity", "ppv", "npv")
#: Subgroups of the baseline comparison get AUROCs only with this many images of each class.
MIN_PER_CLASS_FOR_CI = 10
#: FracAtlas metadata subgroups evaluated separately when the records carry them.
SUBGROUP_COLUMNS = ("hand", "leg", "hip", "shoulder", "mixed", "hardware")
#: FracAtlas' body-region flags; ``mixed`` (more than one region in the image) is its own
#: region, as is an image with more than one flag or none (``unknown``).
REGION_COLUMNS = ("hand", "leg", "hip", "shoulder")


def auroc(labels, scores) -> float | None:
    """Exact AUROC (Mann-Whitney, average ranks for ties); None with one class."""
    from scipy.stats import rankdata

    y = np.asarray(labels).astype(int)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(np.asarray(scores, dtype=np.float64))
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def stratified_auroc(labels, scores, strata) -> float | None:
    """AUROC over the (fractured, normal) pairs that share a stratum (e.g. a body region):
    each stratum's AUROC weighted by its number of such pairs. What a score knows about which
    stratum is more often fractured (hands are, in FracAtlas) cannot raise it; None where no
    stratum holds both classes."""
    y = np.asarray(labels).astype(int)
    s = np.asarray(scores, dtype=np.float64)
    strata = np.asarray(strata)
    total, weight = 0.0, 0
    for value in np.unique(strata):
        mask = strata == value
        pos = int(y[mask].sum())
        pairs = pos * (int(mask.sum()) - pos)
        if pairs:
            total += auroc(y[mask], s[mask]) * pairs
            weight += pairs
    return total / weight if weight else None


def _auroc_of(strata):
    """``f(labels, scores, index)``: the AUROC (``stratified_auroc`` where ``strata`` is given)
    of the images at ``index``."""
    if strata is None:
        return lambda y, s, idx: auroc(y[idx], s[idx])
    strata = np.asarray(strata)
    return lambda y, s, idx: stratified_auroc(y[idx], s[idx], strata[idx])


def body_region(meta: dict[str, np.ndarray]) -> np.ndarray | None:
    """One body region per image: the build's region column where it has one (``meta["region"]``,
    text: MURA's elbow ... wrist, a CSV's ``region``; empty = ``unknown``), else from
    FracAtlas' flags (``REGION_COLUMNS``): the one flagged, ``mixed`` where the image holds
    several (or says so), ``unknown`` where none is flagged; None where the records carry no
    region at all."""
    if "region" in meta:
        region = np.asarray(meta["region"], dtype=object)
        return np.where(region == "", "unknown", region).astype(object)
    known = [c for c in REGION_COLUMNS if c in meta and np.any(np.asarray(meta[c]) >= 0)]
    if not known:
        return None
    flags = np.stack([np.asarray(meta[c]) == 1 for c in known], axis=1)
    n = len(flags)
    mixed = np.asarray(meta.get("mixed", np.full(n, -1))) == 1
    names = np.array(known, dtype=object)[np.argmax(flags, axis=1)]
    count = flags.sum(axis=1)
    return np.where(mixed | (count > 1), "mixed", np.where(count == 0, "unknown", names))


def sensitivity_at_specificity(labels, scores, specificity: float = 0.9) -> float | None:
    """The highest sensitivity of any threshold whose specificity is at least
    ``specificity`` (exact, from the ROC curve); None with one class."""
    y = np.asarray(labels).astype(int)
    if y.min() == y.max():
        return None
    fpr = np.array([1.0 - specificity])
    return float(_tpr_at(y, np.asarray(scores, dtype=np.float64), fpr)[0])


def _tpr_at(labels: np.ndarray, scores: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """The ROC curve's sensitivity at each false-positive rate of ``grid``: the highest
    sensitivity of any threshold whose false-positive rate is at most the grid value (the
    curve's points are in increasing order of both)."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(labels, scores)
    return tpr[np.searchsorted(fpr, grid + 1e-12, side="right") - 1]


def has_groups(groups) -> bool:
    """Whether ``groups`` (one id per image) puts any two images together."""
    return groups is not None and len(set(groups)) < len(groups)


def resamples(n: int, groups=None, n_resamples: int = N_BOOTSTRAP, seed: int = 0):
    """Yield ``n_resamples`` index arrays: images drawn with replacement, or, where ``groups``
    puts images together, whole groups drawn with replacement (as many groups as there are)."""
    rng = np.random.default_rng(seed)
    if not has_groups(groups):
        for _ in range(n_resamples):
            yield rng.integers(0, n, size=n)
        return
    members: dict = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    blocks = [np.array(m) for m in members.values()]
    for _ in range(n_resamples):
        picked = rng.integers(0, len(blocks), size=len(blocks))
        yield np.concatenate([blocks[k] for k in picked])


def _interval(values: list[float | None], n_resamples: int, level: float) -> dict:
    v = np.array([x for x in values if x is not None], dtype=np.float64)
    undefined = 1 - v.size / max(1, n_resamples)
    tail = (1 - level) / 2 * 100
    ci = None
    if v.size and v.size >= n_resamples / 2:  # none with n_resamples 0 (--bootstrap 0)
        lo, hi = np.percentile(v, [tail, 100 - tail])
        ci = [float(lo), float(hi)]
    return {"ci95": ci, "undefined_share": round(float(undefined), 4)}


def auroc_ci(
    labels,
    scores,
    *,
    groups=None,
    n_resamples: int = N_BOOTSTRAP,
    seed: int = 0,
    level: float = 0.95,
    strata=None,
) -> dict:
    """``{"auroc", "ci95", "undefined_share", "resampled", "n_resamples", "seed"}``; ``ci95``
    is None when fewer than half of the resamples define the AUROC. With ``strata`` (one
    label per image, e.g. the body region) the AUROC is ``stratified_auroc``: pairs within a
    stratum only."""
    y = np.asarray(labels).astype(int)
    s = np.asarray(scores, dtype=np.float64)
    auc = _auroc_of(strata)
    values = [auc(y, s, idx) for idx in resamples(y.size, groups, n_resamples, seed)]
    return {
        "auroc": auc(y, s, slice(None)),
        **_interval(values, n_resamples, level),
        "resampled": "groups" if has_groups(groups) else "images",
        "n_units": n_units(y.size, groups),
        "n_resamples": n_resamples,
        "seed": seed,
    }


def paired_auroc_difference(
    labels,
    scores_a,
    scores_b,
    *,
    groups=None,
    n_resamples: int = N_BOOTSTRAP,
    seed: int = 0,
    level: float = 0.95,
    strata=None,
) -> dict:
    """AUROC of ``scores_a`` minus AUROC of ``scores_b`` on the same images, with a paired
    percentile-bootstrap CI (both scored on each resample) and the share of resamples above
    0 (``share_above_zero``: how often a beats b). ``strata``: as in ``auroc_ci``."""
    y = np.asarray(labels).astype(int)
    a = np.asarray(scores_a, dtype=np.float64)
    b = np.asarray(scores_b, dtype=np.float64)
    if not (y.shape == a.shape == b.shape):
        raise ValueError(
            f"labels {y.shape}, scores {a.shape} and {b.shape}: expected one score of each "
            "scorer per image"
        )
    auc = _auroc_of(strata)
    auc_a, auc_b = auc(y, a, slice(None)), auc(y, b, slice(None))
    diffs = []
    for idx in resamples(y.size, groups, n_resamples, seed):
        da, db = auc(y, a, idx), auc(y, b, idx)
        diffs.append(None if da is None or db is None else da - db)
    defined = [d for d in diffs if d is not None]
    return {
        "auroc_a": auc_a,
        "auroc_b": auc_b,
        "difference": None if auc_a is None or auc_b is None else auc_a - auc_b,
        **_interval(diffs, n_resamples, level),
        "share_above_zero": round(float(np.mean(np.array(defined) > 0)), 4) if defined else None,
        "resampled": "groups" if has_groups(groups) else "images",
        "n_resamples": n_resamples,
        "seed": seed,
    }


def size_band(height, width) -> np.ndarray:
    """Image-size bands for subgroup metrics: ``small`` (< 0.5 MP), ``medium`` (< 4 MP),
    ``large`` (>= 4 MP; FracAtlas' 2304x2880 and 2880x2304 images)."""
    pixels = np.asarray(height, dtype=np.float64) * np.asarray(width, dtype=np.float64)
    return np.where(pixels < 0.5e6, "small", np.where(pixels < 4e6, "medium", "large"))


# --------------------------------------------------------------------------- one split


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
        "precision": _ratio(tp, tp + fp),  # the positive predictive value (PPV)
        "npv": _ratio(tn, tn + fn),
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


def threshold_for(labels, probs, target: str, value: float) -> float | None:
    """The threshold (``probs >= t`` is fractured) of an operating point chosen on these
    predictions (val's): ``target`` "sensitivity": the highest t whose sensitivity is at least
    ``value`` (the fewest positive calls that reach it); "specificity": the lowest t whose
    specificity is at least ``value`` (the most sensitive that keeps it). None with one
    class."""
    labels = np.asarray(labels).astype(int)
    if len(np.unique(labels)) < 2:
        return None
    fpr, tpr, thresholds = skm.roc_curve(labels, probs, drop_intermediate=False)
    keep = np.isfinite(thresholds)  # the first is +inf: nothing called
    fpr, tpr, thresholds = fpr[keep], tpr[keep], thresholds[keep]
    if target == "sensitivity":
        return float(thresholds[int(np.argmax(tpr >= value - 1e-12))])
    if target == "specificity":
        ok = np.flatnonzero(1.0 - fpr >= value - 1e-12)
        # none reaches it: the highest threshold (the fewest false positives possible)
        return float(thresholds[ok[-1]] if ok.size else thresholds[0])
    raise ValueError(f"an operating point targets sensitivity or specificity; got {target!r}")


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
    labels,
    probs,
    threshold: float = 0.5,
    n_resamples: int = N_BOOTSTRAP,
    seed: int = 0,
    level: float = 0.95,
    groups=None,
) -> dict:
    """Percentile bootstrap CIs of CI_METRICS: resample images with replacement, or, where
    ``groups`` (one id per image) puts images together, whole groups (``resampled``).

    Returns ``{metric: [low, high] or None, "n_resamples", "seed", "level", "valid",
    "undefined_share", "resampled"}``; ``valid[metric]`` counts the resamples where the
    metric was defined (a resample without fractured images has no sensitivity and no
    AUROC) and ``undefined_share[metric]`` the share where it was not; fewer than half valid
    gives None. The same ``seed`` gives the same intervals.
    """
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
        called = pred.sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            values["accuracy"].append((tp + tn) / n)
            values["sensitivity"].append(np.where(pos > 0, tp / pos, np.nan))
            values["specificity"].append(np.where(neg > 0, tn / neg, np.nan))
            values["ppv"].append(np.where(called > 0, tp / called, np.nan))
            values["npv"].append(np.where(n - called > 0, tn / (n - called), np.nan))
        values["auroc"].append(_auroc_rows(y, p))
        done += b
    return _percentiles(
        {m: np.concatenate(values[m]) for m in CI_METRICS}, n_resamples, seed, level, "images", n
    )


def n_units(n: int, groups=None) -> int:
    """How many units the bootstrap draws: the distinct groups, or the ``n`` images."""
    return len(set(groups)) if has_groups(groups) else int(n)


def resampling(ci: dict) -> str:
    """What a CI's bootstrap resampled, in words: "resampling 512 duplicate groups" or
    "resampling 600 images" (``ci``: a ``bootstrap_ci``, ``auroc_ci`` or a metrics dict's
    ``ci95``; one written before ``n_units`` was recorded: "groups resampled")."""
    unit = ci.get("resampled") or "images"
    if ci.get("n_units") is None:
        return f"{unit} resampled"
    return f"resampling {ci['n_units']} " + ("duplicate groups" if unit == "groups" else unit)


def _percentiles(
    values: dict, n_resamples: int, seed: int, level: float, resampled: str, units: int
):
    tail = (1 - level) / 2 * 100
    out: dict = {
        "n_resamples": int(n_resamples),
        "seed": int(seed),
        "level": level,
        "valid": {},
        "undefined_share": {},
        "resampled": resampled,
        "n_units": int(units),
    }
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
    values: dict[str, list[float]] = {m: [] for m in CI_METRICS}
    for idx in resamples(labels.size, groups, n_resamples, seed):
        y, p = labels[idx], probs[idx]
        pred = p >= threshold
        pos, neg = int((y == 1).sum()), int((y == 0).sum())
        tp, tn = int((pred & (y == 1)).sum()), int((~pred & (y == 0)).sum())
        values["accuracy"].append((tp + tn) / y.size)
        values["sensitivity"].append(tp / pos if pos else np.nan)
        values["specificity"].append(tn / neg if neg else np.nan)
        called = int(pred.sum())
        values["ppv"].append(tp / called if called else np.nan)
        values["npv"].append(tn / (y.size - called) if y.size - called else np.nan)
        a = auroc(y, p)
        values["auroc"].append(np.nan if a is None else a)
    return _percentiles(values, n_resamples, seed, level, "groups", n_units(len(groups), groups))


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


def split_metrics(
    labels,
    probs,
    threshold: float = 0.5,
    *,
    val=None,
    n_bootstrap: int = N_BOOTSTRAP,
    seed: int = 0,
    meta: dict[str, np.ndarray] | None = None,
    groups=None,
) -> dict:
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


def _subgroup(y: np.ndarray, p: np.ndarray, threshold: float) -> dict:
    """One subgroup's block of ``subgroup_metrics``: size, class counts, accuracy at
    ``threshold`` and AUROC (None with one class)."""
    return {
        "n": int(len(y)),
        "counts": {"fractured": int(y.sum()), "normal": int((y == 0).sum())},
        "accuracy": float(np.mean((p >= threshold) == y)),
        "auroc": float(skm.roc_auc_score(y, p)) if len(np.unique(y)) == 2 else None,
    }


def subgroup_metrics(labels, probs, meta: dict[str, np.ndarray], threshold: float = 0.5) -> dict:
    """Per FracAtlas subgroup (``column=1`` and ``column=0``) and per value of the build's
    region column (``region=wrist``, where ``meta`` has ``region``): counts, accuracy, AUROC.

    Columns whose values are all unknown (-1) are left out; {} when none is known.
    """
    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    out: dict = {}
    if "region" in meta:  # the build's region column (MURA's region, a CSV's)
        regions = body_region(meta)
        for value in sorted(set(regions)):
            mask = regions == value
            out[f"region={value}"] = _subgroup(labels[mask], probs[mask], threshold)
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
            out[f"{column}={v}"] = _subgroup(labels[mask], probs[mask], threshold)
        unknown = int(np.sum(values < 0))
        if unknown:
            out[f"{column}=unknown"] = {"n": unknown}
    return out


def epoch_metrics(per_example_loss, probs, labels, prefix: str = "") -> dict:
    """Loss (mean of the per-example losses), accuracy at 0.5 and AUROC (NaN with one class)
    of one epoch's batches (lists of arrays), keys prefixed (``val_``) for Keras' logs."""
    loss = np.concatenate(per_example_loss) if per_example_loss else np.array([np.nan])
    p, y = np.concatenate(probs), np.concatenate(labels).astype(int)
    a = float(skm.roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan")
    return {
        f"{prefix}loss": float(np.mean(loss)),
        f"{prefix}accuracy": float(np.mean((p >= 0.5) == y)),
        f"{prefix}auroc": a,
    }


def roc_band(
    labels,
    scores,
    *,
    groups=None,
    n_resamples: int = N_BOOTSTRAP,
    seed: int = 0,
    level: float = 0.95,
    points: int = 101,
) -> dict | None:
    """The ROC curve on a grid of false-positive rates with a pointwise percentile-bootstrap
    band (``resamples``: groups where ``groups`` puts images together): ``{"fpr", "tpr",
    "low", "high", "undefined_share"}`` (arrays), or None with one class."""
    y = np.asarray(labels).astype(int)
    s = np.asarray(scores, dtype=np.float64)
    if y.min() == y.max():
        return None
    grid = np.linspace(0.0, 1.0, points)
    curves = [
        _tpr_at(y[idx], s[idx], grid)
        for idx in resamples(y.size, groups, n_resamples, seed)
        if 0 < y[idx].sum() < idx.size
    ]
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(np.array(curves), [tail, 100 - tail], axis=0)
    return {
        "fpr": grid,
        "tpr": _tpr_at(y, s, grid),
        "low": low,
        "high": high,
        "undefined_share": round(1 - len(curves) / max(1, n_resamples), 4),
    }


# --------------------------------------------------------------------------- studies


#: How images become studies (MURA's official metric, and what metrics.json says).
STUDY_RULE = (
    "a study's probability is the mean of its images' probabilities; its label is its images' "
    "label, the highest where they disagree (fractured if any image is)"
)


def study_table(studies, labels, probs, groups=None) -> dict:
    """Images -> studies: ``{"ids", "labels", "probs", "groups", "n_images",
    "mixed_label_studies", "images_without_study"}``, studies in order of first appearance.
    ``studies``: one study id per image ("" or None: the image has none and is left out);
    a study's probability is the mean of its images', its label their maximum (``STUDY_RULE``),
    its group (the bootstrap's unit: its patient) the smallest of its images' ``groups``
    (the builder puts a study's images in one group) or the study itself without ``groups``."""
    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    members: dict[str, list[int]] = {}
    for i, s in enumerate(studies):
        if s:
            members.setdefault(str(s), []).append(i)
    ids = list(members)
    idx = [np.array(members[s]) for s in ids]
    return {
        "ids": ids,
        "labels": np.array([labels[k].max() for k in idx], dtype=int),
        "probs": np.array([probs[k].mean() for k in idx], dtype=np.float64),
        "groups": [
            min(str(groups[j]) for j in k) if groups is not None else s for s, k in zip(ids, idx)
        ],
        "n_images": int(sum(k.size for k in idx)),
        "mixed_label_studies": sorted(s for s, k in zip(ids, idx) if len(set(labels[k])) > 1),
        "images_without_study": int(labels.size - sum(k.size for k in idx)),
    }


def binary_kappa(labels, called) -> float | None:
    """Cohen's kappa of two binary raters (the label and the call), from the 2x2 table (equal
    to ``sklearn.metrics.cohen_kappa_score``); None where chance agreement is 1 (both raters
    constant and equal)."""
    y = np.asarray(labels).astype(bool)
    c = np.asarray(called).astype(bool)
    n = y.size
    agree = float(np.mean(y == c))
    chance = (y.sum() * c.sum() + (n - y.sum()) * (n - c.sum())) / (n * n)
    return None if chance >= 1 else float((agree - chance) / (1 - chance))


def study_metrics(
    studies,
    labels,
    probs,
    *,
    groups=None,
    val=None,
    n_bootstrap: int = N_BOOTSTRAP,
    seed: int = 0,
    level: float = 0.95,
) -> dict | None:
    """Study-level metrics (MURA's official way; ``study_table`` for the rule): AUROC of the
    studies with a CI that resamples ``groups`` (patients: all studies of a drawn patient come
    along), and at the Youden-J threshold chosen on val's studies (``val``: ``(studies,
    labels, probs)`` of the val split, aggregated the same way) sensitivity, specificity and
    Cohen's kappa, each with a CI. None where no image has a study."""
    t = study_table(studies, labels, probs, groups)
    if not t["ids"]:
        return None
    y, p, g = t["labels"], t["probs"], t["groups"]
    out = {
        "rule": STUDY_RULE,
        "n_studies": len(t["ids"]),
        "n_images": t["n_images"],
        # the CI's resampling units: patients (the build joins copies to them), else studies
        "n_groups": len(set(g)),
        "counts": {"fractured": int(y.sum()), "normal": int((y == 0).sum())},
        "mixed_label_studies": len(t["mixed_label_studies"]),
        "examples_of_mixed_label_studies": t["mixed_label_studies"][:10],
        "images_without_study": t["images_without_study"],
        "auroc": auroc_ci(y, p, groups=g, n_resamples=n_bootstrap, seed=seed, level=level),
        # a drawn group is a patient (with its studies), or a study where there are no groups
        "resampling_unit": "patients" if groups is not None else "studies",
    }
    if val is None:
        out["at_val_threshold"] = {"undefined": "no validation predictions to choose it on"}
        return out
    v = study_table(*val)
    threshold = youden_threshold(v["labels"], v["probs"]) if v["ids"] else None
    if threshold is None:
        out["at_val_threshold"] = {
            "undefined": "the validation split's studies hold one class (or none): no threshold"
        }
        return out
    at = threshold_metrics(y, p, threshold)
    called = p >= threshold
    # undefined (sklearn: NaN) where label and call are one and the same constant
    both = len(np.unique(np.concatenate([y, called.astype(int)]))) > 1
    kappa = float(skm.cohen_kappa_score(y, called.astype(int))) if both else None
    row = {
        "chosen_on": "val studies",
        "n_val_studies": len(v["ids"]),
        **{k: at[k] for k in ("threshold", "sensitivity", "specificity", "confusion_matrix")},
        "kappa": kappa,
    }
    if n_bootstrap:
        ci = bootstrap_ci(y, p, threshold, n_bootstrap, seed, level, groups=g)
        kappas = [
            binary_kappa(y[idx], called[idx]) for idx in resamples(y.size, g, n_bootstrap, seed)
        ]
        row["ci95"] = {
            "sensitivity": ci["sensitivity"],
            "specificity": ci["specificity"],
            "kappa": _interval(kappas, n_bootstrap, level)["ci95"],
            "resampled": ci["resampled"],
        }
    out["at_val_threshold"] = row
    return out
