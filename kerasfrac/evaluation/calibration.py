"""Calibration: do predicted probabilities match observed frequencies, and a calibrator fitted
on val that makes them.

Class-balanced batches and label smoothing (the best recipe uses both) move a model's
probabilities away from the data's prevalence, so "p = 0.79" need not mean 79%. Measured here:

* **Brier score**: the mean squared difference between probability and label.
* **Expected calibration error** (ECE) over equal-mass bins (each bin holds about the same
  number of images, so no bin is nearly empty): the bins' mean |observed share of fractured -
  mean probability|, weighted by their size; a bootstrap CI resamples images, or the build's
  duplicate groups where the split has them (as every other CI here).
* A **reliability diagram**'s points: per bin, its mean probability, the observed share and
  the count.

The **calibrator** is fitted on the val split's predictions and applied to the logit of a
probability: temperature scaling (``sigmoid(logit(p) / T)``; the ranking, so the AUROC, is
unchanged) or Platt scaling (``sigmoid(a * logit(p) + b)``, a > 0: also unchanged ranking), or
none. Which one is used is chosen by 5-fold cross-validated log-loss on val (each method scored
on the folds it was not fitted on): the simplest method within 0.002 of the best, so Platt's
extra parameter must earn its place; it is then refitted on all of val.

The calibrated probability is the probability at val's prevalence; ``deployment_prevalence``
shifts it to another (the prior shift on the logit: ``+ logit(deployment) - logit(val)``;
Saerens et al. 2002), for a clinic whose share of fractured images differs from FracAtlas'.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from kerasfrac.evaluation.metrics import _interval, has_groups, resamples

EPS = 1e-7
N_BINS = 10
#: Simplest first: a method is used only where it beats every simpler one by TOLERANCE.
METHODS = ("none", "temperature", "platt")
#: Cross-validated log-loss a method must gain over a simpler one to be chosen.
TOLERANCE = 0.002


def logit(p) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


def sigmoid(z) -> np.ndarray:
    from scipy.special import expit  # no overflow warning at large |z|

    return expit(np.asarray(z, dtype=np.float64))


def log_loss(labels, probs) -> float:
    y = np.asarray(labels, dtype=np.float64)
    p = np.clip(np.asarray(probs, dtype=np.float64), EPS, 1 - EPS)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def brier(labels, probs) -> float:
    """Mean squared difference between probability and label (0 is perfect; always saying
    the prevalence q scores q(1 - q))."""
    y = np.asarray(labels, dtype=np.float64)
    return float(np.mean((np.asarray(probs, dtype=np.float64) - y) ** 2))


def _bins(probs: np.ndarray, n_bins: int) -> list[np.ndarray]:
    """Indices of ``n_bins`` equal-mass bins (sorted by probability, ties kept in order)."""
    order = np.argsort(probs, kind="stable")
    return [b for b in np.array_split(order, min(n_bins, max(1, probs.size))) if b.size]


def reliability(labels, probs, n_bins: int = N_BINS) -> list[dict]:
    """The reliability diagram's points: per equal-mass bin ``{"p_mean", "observed", "n",
    "p_low", "p_high"}`` (mean probability, share of fractured, count, probability range)."""
    y = np.asarray(labels, dtype=np.float64)
    p = np.asarray(probs, dtype=np.float64)
    return [
        {
            "p_mean": float(p[b].mean()),
            "observed": float(y[b].mean()),
            "n": int(b.size),
            "p_low": float(p[b].min()),
            "p_high": float(p[b].max()),
        }
        for b in _bins(p, n_bins)
    ]


def ece(labels, probs, n_bins: int = N_BINS) -> float:
    """Expected calibration error over equal-mass bins: sum over bins of (bin size / n) x
    |observed share - mean probability|."""
    y = np.asarray(labels, dtype=np.float64)
    p = np.asarray(probs, dtype=np.float64)
    return float(sum(b.size * abs(y[b].mean() - p[b].mean()) for b in _bins(p, n_bins)) / y.size)


def calibration_metrics(
    labels, probs, *, groups=None, n_bootstrap: int = 0, seed: int = 0, n_bins: int = N_BINS
) -> dict:
    """``{"ece", "ece_ci95", "brier", "log_loss", "n_bins", "reliability"}`` of one split; the
    CI resamples groups where ``groups`` has any (None without bootstrap)."""
    y = np.asarray(labels).astype(int)
    p = np.asarray(probs, dtype=np.float64)
    out = {"ece": ece(y, p, n_bins), "brier": brier(y, p), "log_loss": log_loss(y, p)}
    if n_bootstrap:
        values = [ece(y[i], p[i], n_bins) for i in resamples(y.size, groups, n_bootstrap, seed)]
        ci = _interval(values, n_bootstrap, 0.95)["ci95"]
        out["ece_ci95"] = ci
        out["ece_resampled"] = "groups" if has_groups(groups) else "images"
    out["n_bins"] = n_bins
    out["reliability"] = reliability(y, p, n_bins)
    return out


# --------------------------------------------------------------------------- the calibrator


@dataclasses.dataclass
class Calibrator:
    """``sigmoid(a * logit(p) + b)``, then the prior shift to ``deployment_prevalence`` where
    one is set. ``temperature``: b = 0 and a = 1 / T; ``none``: a = 1, b = 0."""

    method: str = "none"
    a: float = 1.0
    b: float = 0.0
    fitted_on: str = "val"
    n: int = 0
    prevalence: float | None = None  # of the split it was fitted on
    deployment_prevalence: float | None = None
    chosen_by: dict | None = None  # method -> cross-validated log-loss on val

    def logits(self, probs) -> np.ndarray:
        z = self.a * logit(probs) + self.b
        if self.deployment_prevalence is not None and self.prevalence is not None:
            z = z + _logit1(self.deployment_prevalence) - _logit1(self.prevalence)
        return z

    def apply(self, probs) -> np.ndarray:
        """Calibrated probabilities of the model's probabilities ``probs`` (any shape)."""
        return sigmoid(self.logits(probs))

    @property
    def temperature(self) -> float | None:
        return 1.0 / self.a if self.method == "temperature" else None

    def describe(self) -> str:
        shift = (
            f", then shifted from val's prevalence {self.prevalence:.3f} to "
            f"{self.deployment_prevalence:.3f}"
            if self.deployment_prevalence is not None
            else ""
        )
        if self.method == "temperature":
            return f"temperature scaling (T = {self.temperature:.3f}, fitted on val){shift}"
        if self.method == "platt":
            return f"Platt scaling (a = {self.a:.3f}, b = {self.b:+.3f}, fitted on val){shift}"
        return f"none (the model's own probabilities were best on val){shift}"

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "description": self.describe()}

    @classmethod
    def from_dict(cls, d: dict) -> Calibrator:
        fields = {f.name for f in dataclasses.fields(cls)}
        c = cls(**{k: v for k, v in d.items() if k in fields})
        _check(c)
        return c

    def with_prevalence(self, deployment: float | None) -> Calibrator:
        if deployment is not None and not 0.0 < deployment < 1.0:
            raise ValueError(
                f"a deployment prevalence is a share of fractured images in (0, 1); got "
                f"{deployment!r}"
            )
        return dataclasses.replace(self, deployment_prevalence=deployment)


def _logit1(q: float) -> float:
    return math.log(q) - math.log1p(-q)


def _check(c: Calibrator) -> None:
    """A calibrator read from a file: finite, increasing (a > 0), a known method."""
    ok = (
        c.method in METHODS
        and all(isinstance(v, int | float) and math.isfinite(v) for v in (c.a, c.b))
        and c.a > 0
        and (c.prevalence is None or 0 < c.prevalence < 1)
        and (c.deployment_prevalence is None or 0 < c.deployment_prevalence < 1)
    )
    if not ok:
        raise ValueError(
            f"calibration {c.method!r} a={c.a!r} b={c.b!r} is not a valid calibrator (a "
            "known method, finite, a > 0, prevalences in (0, 1))"
        )


def fit_temperature(labels, probs) -> float:
    """The temperature T > 0 minimising the log-loss of ``sigmoid(logit(p) / T)``."""
    from scipy.optimize import minimize_scalar

    y, z = np.asarray(labels, dtype=np.float64), logit(probs)

    def nll(log_t: float) -> float:
        return log_loss(y, sigmoid(z / math.exp(log_t)))

    found = minimize_scalar(nll, bounds=(-4.0, 4.0), method="bounded", options={"xatol": 1e-6})
    return float(math.exp(found.x))


def fit_platt(labels, probs) -> tuple[float, float]:
    """``(a, b)`` of the logistic regression of the label on ``logit(p)`` (unpenalised)."""
    from sklearn.linear_model import LogisticRegression

    z = logit(probs).reshape(-1, 1)
    model = LogisticRegression(C=np.inf, max_iter=1000).fit(z, np.asarray(labels).astype(int))
    return float(model.coef_[0, 0]), float(model.intercept_[0])


def _fitted(method: str, labels, probs) -> Calibrator:
    if method == "temperature":
        return Calibrator("temperature", a=1.0 / fit_temperature(labels, probs))
    if method == "platt":
        a, b = fit_platt(labels, probs)
        if a <= 0:  # a decreasing map would reverse the ranking: not a calibration
            return Calibrator("none")
        return Calibrator("platt", a=a, b=b)
    return Calibrator("none")


def fit(labels, probs, *, folds: int = 5, seed: int = 0) -> Calibrator:
    """The calibrator of val's ``(labels, probs)``: each method's log-loss cross-validated
    over ``folds`` stratified folds of val (fitted on the others), the best one refitted on all
    of val. A ValueError where val has one class or fewer images per class than folds."""
    from sklearn.model_selection import StratifiedKFold

    y = np.asarray(labels).astype(int)
    p = np.asarray(probs, dtype=np.float64)
    per_class = min(int(y.sum()), int((1 - y).sum()))
    if per_class < folds:
        raise ValueError(
            f"calibration needs at least {folds} images of each class in val; it has "
            f"{per_class} of the rarer class"
        )
    scores: dict[str, float] = {}
    for method in METHODS:
        held_out = np.empty_like(p)
        for fit_idx, test_idx in StratifiedKFold(folds, shuffle=True, random_state=seed).split(
            p, y
        ):
            held_out[test_idx] = _fitted(method, y[fit_idx], p[fit_idx]).apply(p[test_idx])
        scores[method] = round(log_loss(y, held_out), 6)
    best = min(scores.values())
    best = next(m for m in METHODS if scores[m] <= best + TOLERANCE)  # the simplest near it
    chosen = _fitted(best, y, p)
    return dataclasses.replace(chosen, n=int(y.size), prevalence=float(y.mean()), chosen_by=scores)
