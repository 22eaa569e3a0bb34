"""The occlusion test: does the classifier's answer rest on the annotated fracture?

Each fractured image with fracture boxes is scored three ways: as it is; with its fracture
regions filled in; and with equal-size regions elsewhere filled in the same way (the
control). A fill replaces a region (the box grown by ``MARGIN``) by the Coons patch of the
region's border: the smooth surface that meets the surrounding pixels on all four sides and
holds nothing of what was inside (no fracture line, no step in the cortex). A control region
has the box's size, overlaps no box, stays out of the image's border band (where burnt-in
letters and markers sit), and of the free places has the mean intensity closest to the
fracture region's (bone, not background). Normal images get one control fill each, the same
in both conditions, so that a fill's own trace is in both classes.

A classifier that reads the fracture loses AUROC when the fractures are filled and not when
the controls are: the paired difference (control minus fracture filled, with a bootstrap CI)
is above 0. One that reads the acquisition context (or a letter in a corner) loses neither.
"""

from __future__ import annotations

import numpy as np

from kerasfrac.data.augment import FILL_MARGIN, FILL_MARGIN_PX

#: Each box is grown by this fraction of its side (and MARGIN_PX) before it is filled, so that
#: the fracture's ends lie inside the fill, not on the border it is interpolated from: the
#: margins of training's counterfactual fills (``train.fracture_fill``), one setting for both.
MARGIN = FILL_MARGIN
MARGIN_PX = FILL_MARGIN_PX
#: Control windows are searched on a grid of this many pixels.
STRIDE = 2


def coons_fill(image: np.ndarray, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
    """``image`` [H, W, C] (a copy) with rows y0..y1-1 and columns x0..x1-1 replaced by the
    Coons patch of the pixels just outside that rectangle (clamped to the image)."""
    out = np.array(image, dtype=np.float32, copy=True)
    h, w = out.shape[:2]
    y0, x0, y1, x1 = max(y0, 0), max(x0, 0), min(y1, h), min(x1, w)
    if y1 <= y0 or x1 <= x0:
        return out
    top, bottom = max(y0 - 1, 0), min(y1, h - 1)
    left, right = max(x0 - 1, 0), min(x1, w - 1)
    # The four border lines, each spanning the rectangle plus its corners.
    cols = np.arange(left, right + 1)
    rows = np.arange(top, bottom + 1)
    t, b = out[top, cols], out[bottom, cols]  # [nx, C]
    lft, rgt = out[rows, left], out[rows, right]  # [ny, C]
    u = ((np.arange(x0, x1) - left) / max(right - left, 1))[None, :, None]  # [1, w, 1]
    v = ((np.arange(y0, y1) - top) / max(bottom - top, 1))[:, None, None]  # [h, 1, 1]
    ti, bi = t[x0 - left : x1 - left][None], b[x0 - left : x1 - left][None]  # [1, w, C]
    li, ri = lft[y0 - top : y1 - top][:, None], rgt[y0 - top : y1 - top][:, None]  # [h, 1, C]
    corners = (1 - u) * (1 - v) * t[0] + u * (1 - v) * t[-1] + (1 - u) * v * b[0] + u * v * b[-1]
    out[y0:y1, x0:x1] = (1 - v) * ti + v * bi + (1 - u) * li + u * ri - corners
    return out


def grown_boxes(boxes, shape: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """Boxes (normalised ymin, xmin, ymax, xmax in the input frame) -> pixel rectangles
    (y0, x0, y1, x1), each grown by ``MARGIN`` of its side plus ``MARGIN_PX``, clamped."""
    h, w = shape
    out = []
    for ymin, xmin, ymax, xmax in np.asarray(boxes, np.float64).reshape(-1, 4):
        dy = MARGIN * (ymax - ymin) * h + MARGIN_PX
        dx = MARGIN * (xmax - xmin) * w + MARGIN_PX
        y0, y1 = int(np.floor(ymin * h - dy)), int(np.ceil(ymax * h + dy))
        x0, x1 = int(np.floor(xmin * w - dx)), int(np.ceil(xmax * w + dx))
        out.append((max(y0, 0), max(x0, 0), min(y1, h), min(x1, w)))
    return out


def _overlaps(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def control_window(
    gray: np.ndarray, size: tuple[int, int], target: float, taken, border: float
) -> tuple[int, int, int, int] | None:
    """A ``size`` (h, w) window of ``gray`` [H, W] that overlaps none of ``taken`` and stays
    out of the ``border`` band (a fraction of the side; dropped where nothing else fits),
    whose mean intensity is closest to ``target``; None where no place is free."""
    hh, ww = gray.shape
    bh, bw = size
    integral = np.pad(gray.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    for band in (border, 0.0):
        lo_y, lo_x = int(round(band * hh)), int(round(band * ww))
        ys = np.arange(lo_y, hh - lo_y - bh + 1, STRIDE)
        xs = np.arange(lo_x, ww - lo_x - bw + 1, STRIDE)
        best, best_cost = None, np.inf
        for y in ys:
            sums = integral[y + bh, xs + bw] - integral[y, xs + bw] - integral[y + bh, xs]
            means = (sums + integral[y, xs]) / (bh * bw)
            for k in np.argsort(np.abs(means - target)):
                cost = abs(means[k] - target)
                if cost >= best_cost:
                    break
                win = (int(y), int(xs[k]), int(y) + bh, int(xs[k]) + bw)
                if not any(_overlaps(win, t) for t in taken):
                    best, best_cost = win, cost
                    break
        if best is not None:
            return best
    return None


def _mean(gray: np.ndarray, r) -> float:
    return float(gray[r[0] : r[2], r[1] : r[3]].mean())


def occlude(image: np.ndarray, rects) -> np.ndarray:
    """``image`` with every rectangle of ``rects`` Coons-filled (in order)."""
    for r in rects:
        image = coons_fill(image, *r)
    return image


def fractured_pair(image: np.ndarray, boxes, border: float):
    """``(fracture filled, control filled)`` versions of one fractured image, or None where
    no control place is free. ``image`` [H, W, C] in the model's input frame."""
    gray = np.asarray(image, np.float32).mean(axis=-1)
    rects = grown_boxes(boxes, gray.shape)
    taken = list(rects)
    controls = []
    for r in rects:
        win = control_window(gray, (r[2] - r[0], r[3] - r[1]), _mean(gray, r), taken, border)
        if win is None:
            return None
        controls.append(win)
        taken.append(win)
    return occlude(image, rects), occlude(image, controls)


def normal_filled(image: np.ndarray, like, border: float):
    """A normal image with one control fill of the size and intensity of ``like`` (a
    fractured image's (rectangle, mean intensity)); None where no place is free."""
    gray = np.asarray(image, np.float32).mean(axis=-1)
    (y0, x0, y1, x1), target = like
    win = control_window(gray, (y1 - y0, x1 - x0), target, [], border)
    return None if win is None else occlude(image, [win])


def _add(lists, values) -> None:
    for target, value in zip(lists, values):
        target.append(value)


def occlusion_test(
    model,
    batches,
    *,
    border: float = 0.1,
    groups: dict | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    batch_size: int = 32,
) -> dict:
    """The explain.json ``occlusion`` block over ``batches`` of ``(images, labels, ids,
    boxes, ...)`` (``explain.run.split_batches``): AUROC of the classifier ``model`` (input ->
    P(fractured)) on the images as they are, with the fractures filled and with the controls
    filled, each with a CI, and the paired differences. ``groups`` (image id -> duplicate
    group) makes the bootstrap resample groups."""
    import tensorflow as tf

    from kerasfrac.evaluation.metrics import auroc_ci, paired_auroc_difference
    from kerasfrac.models import predict_probs

    rng = np.random.default_rng(seed)
    fractured, normals, skipped = [], [], {"no_box": 0, "no_room": 0}
    for images, labels, ids, boxes, *_ in batches:
        for img, y, i, b in zip(images, labels, ids, boxes):
            if y == 1 and not len(b):
                skipped["no_box"] += 1
            elif y == 1:
                fractured.append((img, i, b))
            else:
                normals.append((img, i))
    if not fractured or not normals:
        return {
            "available": False,
            "reason": "the occlusion test needs fractured images with boxes and normal images; "
            f"this split has {len(fractured)} and {len(normals)}",
        }
    originals, filled, control, labels, ids, likes = [], [], [], [], [], []
    for img, i, b in fractured:
        pair = fractured_pair(img, b, border)
        if pair is None:
            skipped["no_room"] += 1
            continue
        gray = np.asarray(img, np.float32).mean(axis=-1)
        likes += [(r, _mean(gray, r)) for r in grown_boxes(b, gray.shape)]
        _add((originals, filled, control, labels, ids), (img, *pair, 1, i))
    for img, i in normals:
        out = normal_filled(img, likes[int(rng.integers(len(likes)))], border) if likes else None
        if out is None:
            skipped["no_room"] += 1
            continue
        _add((originals, filled, control, labels, ids), (img, out, out, 0, i))
    y = np.array(labels)

    def score(images) -> np.ndarray:
        x = np.stack(images).astype(np.float32)
        p = [
            np.asarray(predict_probs(model, tf.convert_to_tensor(x[k : k + batch_size])))
            for k in range(0, len(x), batch_size)
        ]
        return np.concatenate(p).reshape(-1).astype(np.float64)

    p_orig, p_frac, p_ctrl = score(originals), score(filled), score(control)
    g = None if groups is None else [groups[i] for i in ids]
    kw = dict(groups=g, n_resamples=max(n_bootstrap, 1), seed=seed)
    diff = paired_auroc_difference(y, p_ctrl, p_frac, **kw)
    lo = (diff["ci95"] or [None])[0]
    reads = lo is not None and lo > 0
    return {
        "available": True,
        "fill": f"Coons patch of the border of each box grown by {MARGIN:.0%} + {MARGIN_PX} px; "
        "controls: the same size elsewhere, off the boxes and the border band, closest in mean "
        "intensity; one control fill on each normal image (the same in both conditions)",
        "n_fractured": int(y.sum()),
        "n_normal": int((y == 0).sum()),
        "skipped": skipped,
        "fracture_area_share": float(
            np.mean(
                [np.mean(np.any(f != o, axis=-1)) for f, o, t in zip(filled, originals, y) if t]
            )
        ),
        "auroc_original": auroc_ci(y, p_orig, **kw),
        "auroc_fracture_filled": auroc_ci(y, p_frac, **kw),
        "auroc_control_filled": auroc_ci(y, p_ctrl, **kw),
        "difference": diff,
        "drop_fracture_filled": paired_auroc_difference(y, p_orig, p_frac, **kw),
        "reads_the_fracture_region": reads,
        "mean_probability_fractured": {
            "original": float(p_orig[y == 1].mean()),
            "fracture_filled": float(p_frac[y == 1].mean()),
            "control_filled": float(p_ctrl[y == 1].mean()),
        },
    }


def summary(r: dict) -> str:
    """Lines of the occlusion block for a person."""
    if not r.get("available"):
        return f"occlusion test: not available: {r.get('reason')}"

    def auc(d: dict) -> str:
        ci = d.get("ci95")
        a = d.get("auroc")
        return ("n/a" if a is None else f"{a:.3f}") + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")

    d = r["difference"]
    ci = d.get("ci95")
    shown = f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else ""
    verdict = (
        "the classifier relies on the annotated fracture region"
        if r["reads_the_fracture_region"]
        else "NOT shown that the classifier relies on the fracture region (interval reaches 0)"
    )
    skipped = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in r["skipped"].items() if v)
    return "\n".join(
        [
            f"occlusion test ({r['n_fractured']} fractured images with boxes, {r['n_normal']} "
            f"normal{'; skipped: ' + skipped if skipped else ''}):",
            f"  AUROC as is {auc(r['auroc_original'])}, fractures filled "
            f"{auc(r['auroc_fracture_filled'])}, equal-size controls filled "
            f"{auc(r['auroc_control_filled'])}",
            f"  control minus fracture filled {d['difference']:+.3f}{shown}: {verdict}",
        ]
    )
