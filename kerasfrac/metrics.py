"""Exact metrics of (labels, probabilities) with bootstrap CIs that resample what is
independent: numpy/scikit-learn only.

Where a split holds groups (copies of one image, one patient: the builder's ``image/group``),
images of a group are not independent, so the bootstrap resamples groups, not images
(the cluster bootstrap). A resample where a metric is undefined (AUROC of a resample with
one class) is counted and reported as ``undefined_share``, never silently dropped.

``paired_auroc_difference`` compares two scorers on the same images (a model and the
no-anatomy baseline of ``kerasfrac.audit``): each resample draws one set of images (groups)
and scores both on it, so the CI is of the difference itself.
"""

from __future__ import annotations

import numpy as np


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


def sensitivity_at_specificity(labels, scores, specificity: float = 0.9) -> float | None:
    """The highest sensitivity of any threshold whose specificity is at least
    ``specificity`` (exact, from the ROC curve); None with one class."""
    from sklearn.metrics import roc_curve

    y = np.asarray(labels).astype(int)
    if y.min() == y.max():
        return None
    fpr, tpr, _ = roc_curve(y, np.asarray(scores, dtype=np.float64))
    ok = fpr <= 1.0 - specificity + 1e-12
    return float(tpr[ok].max())


def has_groups(groups) -> bool:
    """Whether ``groups`` (one id per image) puts any two images together."""
    return groups is not None and len(set(groups)) < len(groups)


def resamples(n: int, groups=None, n_resamples: int = 1000, seed: int = 0):
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
    if v.size >= n_resamples / 2:
        lo, hi = np.percentile(v, [tail, 100 - tail])
        ci = [float(lo), float(hi)]
    return {"ci95": ci, "undefined_share": round(float(undefined), 4)}


def auroc_ci(
    labels, scores, *, groups=None, n_resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> dict:
    """``{"auroc", "ci95", "undefined_share", "resampled", "n_resamples", "seed"}``; ``ci95``
    is None when fewer than half of the resamples define the AUROC."""
    y = np.asarray(labels).astype(int)
    s = np.asarray(scores, dtype=np.float64)
    values = [auroc(y[idx], s[idx]) for idx in resamples(y.size, groups, n_resamples, seed)]
    return {
        "auroc": auroc(y, s),
        **_interval(values, n_resamples, level),
        "resampled": "groups" if has_groups(groups) else "images",
        "n_resamples": n_resamples,
        "seed": seed,
    }


def paired_auroc_difference(
    labels, scores_a, scores_b, *, groups=None, n_resamples: int = 1000, seed: int = 0,
    level: float = 0.95,
) -> dict:  # fmt: skip
    """AUROC of ``scores_a`` minus AUROC of ``scores_b`` on the same images, with a paired
    percentile-bootstrap CI (both scored on each resample) and the share of resamples above
    0 (``share_above_zero``: how often a beats b)."""
    y = np.asarray(labels).astype(int)
    a = np.asarray(scores_a, dtype=np.float64)
    b = np.asarray(scores_b, dtype=np.float64)
    if not (y.shape == a.shape == b.shape):
        raise ValueError(
            f"labels {y.shape}, scores {a.shape} and {b.shape}: expected one score of each "
            "scorer per image"
        )
    auc_a, auc_b = auroc(y, a), auroc(y, b)
    diffs = []
    for idx in resamples(y.size, groups, n_resamples, seed):
        da, db = auroc(y[idx], a[idx]), auroc(y[idx], b[idx])
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


def _tpr_at(labels: np.ndarray, scores: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """The ROC curve's sensitivity at each false-positive rate of ``grid``: the highest
    sensitivity of any threshold whose false-positive rate is at most the grid value (as
    ``sensitivity_at_specificity``)."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(labels, scores)
    return tpr[np.searchsorted(fpr, grid + 1e-12, side="right") - 1]


def roc_band(
    labels, scores, *, groups=None, n_resamples: int = 1000, seed: int = 0,
    level: float = 0.95, points: int = 101,
) -> dict | None:  # fmt: skip
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
