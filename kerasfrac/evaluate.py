"""Evaluate a model on a split: predictions (image_id, label, probability) and exact metrics.

Metrics come from scikit-learn on the saved predictions, not from Keras' streaming
approximations. The evaluation issue extends ``metrics`` (CIs, thresholds, subgroups).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
from sklearn import metrics as skm


def predict(model, dataset) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Run ``model`` over batches of ``(image, label, image_id)``; ids, labels, probabilities."""
    ids, labels, probs = [], [], []
    for images, y, image_ids in dataset:
        p = model(images, training=False)
        probs.append(np.asarray(p, dtype=np.float64).reshape(-1))
        labels.append(np.asarray(y).reshape(-1))
        ids.extend(i.decode() for i in image_ids.numpy())
    if not ids:
        raise ValueError("the split to evaluate is empty: it has no images")
    return ids, np.concatenate(labels).astype(int), np.concatenate(probs)


def metrics(labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> dict:
    """accuracy, mean BCE loss and AUROC (None where one class is missing), with counts."""
    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    eps = 1e-7
    clipped = np.clip(probs, eps, 1 - eps)
    loss = float(-np.mean(labels * np.log(clipped) + (1 - labels) * np.log(1 - clipped)))
    both = len(np.unique(labels)) == 2
    counts = {"fractured": int(labels.sum()), "normal": int((labels == 0).sum())}
    return {
        "n": int(labels.size),
        "counts": counts,
        "accuracy": float(np.mean((probs >= threshold) == labels)),
        "loss": loss,
        "auroc": float(skm.roc_auc_score(labels, probs)) if both else None,
        "majority_baseline_accuracy": max(counts.values()) / max(1, labels.size),
        "threshold": threshold,
    }


def write_predictions(path: Path, ids, labels, probs) -> None:
    with Path(path).open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["image_id", "label", "probability"])
        for i, y, p in zip(ids, labels, probs):
            out.writerow([i, int(y), f"{p:.6f}"])


def finite(x) -> bool:
    return x is not None and math.isfinite(x)
