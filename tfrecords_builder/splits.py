"""Stratified, group-aware, seeded train/val/test splits.

Stratified: each class is allocated on its own, so every split gets its share of each class.
Group-aware: a group (copies of one image) is never divided. Exact: per class, the image quota of
each split is the largest-remainder rounding of count x ratio, and groups are placed in a seeded
random order into the split furthest below its quota *relative to that quota* (so groups of
several images spread over the splits in proportion; by absolute deficit they all went to
train, which then held every duplicated image and val/test none), and with singleton groups
every split is within one image of its ideal share. (scikit-learn's StratifiedGroupKFold
only makes equal 1/k folds and balances class ratios approximately; StratifiedShuffleSplit
ignores groups.)
Deterministic on any machine: groups are sorted by id before a NumPy PCG64 permutation.
"""

from __future__ import annotations

import math

import numpy as np

from tfrecords_builder.defaults import SPLITS


def parse_ratios(text: str | tuple | list) -> tuple[float, float, float]:
    """'0.7,0.15,0.15' -> (0.7, 0.15, 0.15); must be three non-negative numbers summing to 1."""
    parts = text.split(",") if isinstance(text, str) else list(text)
    try:
        ratios = tuple(float(p) for p in parts)
    except ValueError as err:
        raise ValueError(
            f"--split {text!r}: expected three numbers train,val,test such as 0.7,0.15,0.15"
        ) from err
    if len(ratios) != 3 or min(ratios) < 0 or not math.isclose(sum(ratios), 1.0, abs_tol=1e-6):
        raise ValueError(
            f"--split {text!r}: expected three non-negative fractions train,val,test summing to 1 "
            "(e.g. 0.7,0.15,0.15)"
        )
    if ratios[0] == 0:
        raise ValueError(f"--split {text!r}: the training share must be above 0")
    return ratios


def quotas(count: int, ratios: tuple[float, ...]) -> list[int]:
    """Largest-remainder rounding of count x ratios (sums to count)."""
    ideal = [count * r for r in ratios]
    base = [math.floor(x) for x in ideal]
    order = sorted(range(len(ratios)), key=lambda i: (base[i] - ideal[i], i))
    for i in order[: count - sum(base)]:
        base[i] += 1
    return base


def assign(
    groups: dict[str, tuple[int, int]], ratios: tuple[float, float, float], seed: int
) -> dict[str, str]:
    """groups: group id -> (label, size). Returns group id -> split name."""
    rng = np.random.Generator(np.random.PCG64(seed))
    out: dict[str, str] = {}
    for label in sorted({lab for lab, _ in groups.values()}):
        ids = sorted(g for g, (lab, _) in groups.items() if lab == label)
        total = sum(groups[g][1] for g in ids)
        target = quotas(total, ratios)
        filled = [0, 0, 0]
        # Big groups first (in random order within a size) so that they cannot overshoot at
        # the end; singletons then fill the quotas exactly.
        order = [ids[i] for i in rng.permutation(len(ids))]
        order.sort(key=lambda g: -groups[g][1])
        open_splits = [s for s in range(3) if ratios[s] > 0]
        for g in order:
            s = max(
                open_splits,
                key=lambda k: (
                    (target[k] - filled[k]) / max(target[k], 1),
                    target[k] - filled[k],
                    -k,
                ),
            )
            filled[s] += groups[g][1]
            out[g] = SPLITS[s]
    return out
