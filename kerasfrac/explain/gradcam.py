"""Grad-CAM heatmaps and the numbers read off them: border share and the pointing game.

Grad-CAM (Selvaraju et al. 2017) on a convolutional block's output ``A`` [h, w, K]: the
gradient of the pre-sigmoid logit (signed by the target class: + for "fractured", - for
"normal") with respect to ``A``, averaged over positions, weights the channels; the map is
the ReLU of the weighted channel sum, upsampled bilinearly to the input size. ``hirescam``
(Draelos & Carin 2020) multiplies gradient and activation per position instead of averaging
the gradient first; for a Flatten -> Dense head (paper_cnn) it is exactly each position's
contribution to the logit, whereas Grad-CAM's averaged weights forget where the Dense layer
looks. Both are computed with the weights fixed and BatchNorm in inference mode.

The audit numbers are pure numpy on the upsampled maps:

* ``border_share``: the share of a map's mass in the outer band of ``width`` x side on each
  edge (uniform-map baseline ``1 - (1 - 2 width)^2``); ``corner_shares``: mass in each
  ``corner`` x side corner square (where burnt-in markers and letters sit).
* pointing game (Zhang et al. 2016): a hit when the map's maximum lies inside an annotated
  box (optionally grown by ``tolerance`` pixels); chance = the boxes' share of the image;
  ``box_mass_share``: the map's mass inside the boxes.
* localisation: the map cut at half its maximum against the boxes (Dice, IoU), and the
  bounding rectangle of its top-1 connected region (the one holding the peak) counted as
  finding a fracture where its IoU with a box reaches 0.1 or 0.25 (Wilson CIs); where the
  build stores the fractures' outlines (FracAtlas' polygons), Dice and IoU against them too.

The default layer and method follow the head (``default_cam``): where the last feature map
feeds Flatten -> Dense (paper_cnn), Grad-CAM's averaged gradient is the Dense kernel itself,
the same for every image, and the BatchNorm after the ReLU adds a constant offset to every
position; so the map is taken after the activation (``relu3``, before that BatchNorm) with
HiResCAM, which is there exactly each position's contribution to the logit (up to the
BatchNorm's constant). Heads that pool (GlobalAveragePooling) keep Grad-CAM on the last block.

``boxmap`` is not a gradient method: it reads the model's own box heat map (the per-cell
fracture probabilities of ``model.box_head``, trained on FracAtlas' boxes), upsampled the
same way. It shows where the model places fractures, whatever class the target names, so
the pointing game measures the box head itself beside Grad-CAM's view of the classifier.

Maps that are zero everywhere (the ReLU removed all evidence) carry no location: they are
left out of the share averages, and in the pointing game they count as misses (an
explanation that points nowhere did not point at the fracture). The hit rate gets a Wilson
95% CI, beside the chance rate (the boxes' area) and a centre-of-image baseline (a map that
always peaks at the centre).
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf

from kerasfrac.data.decode import letterbox
from kerasfrac.models import (
    BOX_LOGITS,
    block_output_names,
    last_conv_block_name,
    logit_layer_name,
)
from kerasfrac.names import CAM_METHODS, CAM_TARGETS

METHODS = CAM_METHODS
TARGETS = CAM_TARGETS
CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")


def find_layer(model: keras.Model, name: str) -> keras.layers.Layer:
    """``model.get_layer(name)`` with an error that lists the layers there are."""
    names = [layer.name for layer in model.layers]
    if name not in names:
        raise ValueError(
            f"model {model.name!r} has no layer named {name!r}; its layers are: {', '.join(names)}"
        )
    return model.get_layer(name)


def layer_output(model: keras.Model, name: str):
    """The output tensor of layer ``name`` (``model.get_layer(name).output``: models are
    functional graphs, see ``kerasfrac.models.functional``); an unknown name is an error
    listing the layers."""
    return find_layer(model, name).output


def cam_model(model: keras.Model, layer_name: str | None = None) -> keras.Model:
    """Sub-model: input -> (output of ``layer_name``, pre-sigmoid logit).

    ``layer_name`` None: the last convolutional block (``model.last_conv_block_name``). Built
    from ``model.inputs`` so it shares the weights and works on a reloaded model.
    """
    name = layer_name or last_conv_block_name(model)
    layer = find_layer(model, name)
    if len(layer.output.shape) != 4:
        raise ValueError(
            f"layer {name!r} outputs shape {tuple(layer.output.shape)}, not a 4-D feature map; "
            "Grad-CAM needs a convolutional layer such as "
            f"{', '.join(block_output_names(model)) or 'a Conv2D'}"
        )
    logit = layer_output(model, logit_layer_name(model))
    return keras.Model(model.inputs[0], [layer.output, logit], name=f"cam_{name}")


def default_cam(model: keras.Model) -> tuple[str, str]:
    """(layer, method) that measure this model's head (see the module docstring): for a last
    feature map that feeds Flatten, the activation before its BatchNorm (if any) and
    ``hirescam``; otherwise the last conv block and ``gradcam``."""
    name = last_conv_block_name(model)
    layers = list(model.layers)
    k = [layer.name for layer in layers].index(name)
    following = layers[k + 1] if k + 1 < len(layers) else None
    if not isinstance(following, keras.layers.Flatten):
        return name, "gradcam"
    while k > 0 and isinstance(layers[k], keras.layers.BatchNormalization):
        k -= 1
    if isinstance(layers[k], keras.layers.ReLU | keras.layers.Activation):
        name = layers[k].name
    return name, "hirescam"


class GradCam:
    """Heatmaps of one model and layer; call with a batch of images and target signs.
    ``layer_name`` and ``method`` None: ``default_cam``.

    ``cam(images, signs)`` -> float32 numpy [B, H, W], non-negative, not normalised (the
    shares are ratios, so the scale does not matter). ``signs``: +1 explains "fractured",
    -1 explains "normal". Also returns the logits: ``cam.last_logits``.
    """

    def __init__(
        self, model: keras.Model, layer_name: str | None = None, method: str | None = None
    ):
        default_layer, default_method = default_cam(model)
        method = method or default_method
        if method not in METHODS:
            raise ValueError(f"unknown CAM method {method!r}; expected one of {METHODS}")
        if method == "boxmap":
            names = [layer.name for layer in model.layers]
            if BOX_LOGITS not in names:
                raise ValueError(
                    f"CAM method 'boxmap' reads the model's box heat map, and model "
                    f"{model.name!r} has none (no layer {BOX_LOGITS!r}). A run's model.keras "
                    "holds the classifier only; a run trained with model.box_head: true "
                    "saves box_model.keras beside it, which explain reads for boxmap (for a "
                    "run without one, pass --model RUN_DIR/checkpoints/best.keras, the best "
                    "val epoch with its box head), or use gradcam / hirescam"
                )
            if layer_name not in (None, BOX_LOGITS):
                raise ValueError(
                    f"CAM method 'boxmap' reads layer {BOX_LOGITS!r}; got --layer "
                    f"{layer_name!r} (leave --layer out)"
                )
            default_layer = BOX_LOGITS
        self.layer_name = layer_name or default_layer
        self.model = cam_model(model, self.layer_name)
        self.method = method
        self.input_hw = tuple(model.inputs[0].shape[1:3])
        self.last_logits: np.ndarray | None = None
        self._fn = tf.function(self._cam, reduce_retracing=True)

    def _cam(self, images, signs):
        if self.method == "boxmap":  # where the box head places fractures; no gradient
            cells, logit = self.model(images, training=False)
            cam = tf.sigmoid(tf.cast(cells, tf.float32))
            cam = tf.image.resize(cam, self.input_hw, method="bilinear")[..., 0]
            return tf.nn.relu(cam), tf.cast(logit[:, 0], tf.float32)
        with tf.GradientTape() as tape:
            fmap, logit = self.model(images, training=False)
            fmap = tf.cast(fmap, tf.float32)
            tape.watch(fmap)
            logit = tf.cast(logit[:, 0], tf.float32)
            # Examples are independent in inference mode: the gradient of the sum gives each
            # example's own gradient.
            target = tf.reduce_sum(signs * logit)
        grads = tape.gradient(target, fmap)
        if self.method == "gradcam":
            weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
            cam = tf.reduce_sum(weights * fmap, axis=-1)
        else:
            cam = tf.reduce_sum(grads * fmap, axis=-1)
        cam = tf.nn.relu(cam)[..., None]
        cam = tf.image.resize(cam, self.input_hw, method="bilinear")[..., 0]
        return tf.nn.relu(cam), logit  # bilinear keeps >= 0; relu guards rounding

    def __call__(self, images, signs) -> np.ndarray:
        images = tf.convert_to_tensor(images, tf.float32)
        signs = tf.broadcast_to(tf.convert_to_tensor(signs, tf.float32), [tf.shape(images)[0]])
        cam, logit = self._fn(images, signs)
        self.last_logits = logit.numpy()
        return cam.numpy()


#: How figures and summaries name each CAM method's map (the method actually used).
MAP_KINDS = {"gradcam": "Grad-CAM", "hirescam": "HiResCAM", "boxmap": "box heat map"}


def map_kind(method: str) -> str:
    """What a map of CAM ``method`` is, for figure titles and summaries."""
    return MAP_KINDS.get(method, "Grad-CAM")


def target_signs(target: str, labels, logits=None) -> np.ndarray:
    """+1 / -1 per image: explain "fractured" or "normal" (``TARGETS``)."""
    labels = np.asarray(labels)
    if target == "label":
        return np.where(labels == 1, 1.0, -1.0).astype(np.float32)
    if target == "predicted":
        if logits is None:
            raise ValueError("target 'predicted' needs the logits")
        return np.where(np.asarray(logits) >= 0, 1.0, -1.0).astype(np.float32)
    if target == "fractured":
        return np.ones(len(labels), np.float32)
    if target == "normal":
        return -np.ones(len(labels), np.float32)
    raise ValueError(f"unknown Grad-CAM target {target!r}; expected one of {TARGETS}")


# --------------------------------------------------------------------------- pure numbers


def _check_fraction(name: str, value: float, upper: float) -> None:
    if not (isinstance(value, int | float) and 0 < value <= upper):
        raise ValueError(f"{name}={value!r}: expected a fraction of the image side in (0, {upper}]")


def border_mask(shape: tuple[int, int], width: float) -> np.ndarray:
    """bool [H, W]: True in the outer band of ``width`` x side (rounded, at least 1 px)."""
    _check_fraction("border width", width, 0.5)
    h, w = shape
    by, bx = max(1, round(width * h)), max(1, round(width * w))
    mask = np.ones((h, w), bool)
    mask[by : h - by, bx : w - bx] = False
    return mask


def corner_masks(shape: tuple[int, int], size: float) -> dict[str, np.ndarray]:
    """bool [H, W] per corner (``CORNERS``): the square of ``size`` x side in that corner."""
    _check_fraction("corner size", size, 0.5)
    h, w = shape
    cy, cx = max(1, round(size * h)), max(1, round(size * w))
    masks = {}
    for name in CORNERS:
        m = np.zeros((h, w), bool)
        rows = slice(0, cy) if name.startswith("top") else slice(h - cy, h)
        cols = slice(0, cx) if name.endswith("left") else slice(w - cx, w)
        m[rows, cols] = True
        masks[name] = m
    return masks


def mass_share(cam: np.ndarray, mask: np.ndarray) -> float:
    """Share of the map's mass under ``mask`` (nan for an all-zero map)."""
    total = float(cam.sum())
    return float(cam[mask].sum()) / total if total > 0 else math.nan


def boxes_to_input_frame(
    boxes, height: int, width: int, image_size: int, resize: str = "stretch"
) -> np.ndarray:
    """Boxes [N, 4] (ymin, xmin, ymax, xmax, normalised in the original image) -> the same
    normalised in the model's input frame. ``stretch`` maps them unchanged; ``pad``
    (``tf.image.resize_with_pad``) shrinks them by the scale and shifts them by the padding."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    if resize == "stretch" or len(boxes) == 0:
        return boxes
    if resize != "pad":
        raise ValueError(f"resize must be 'stretch' or 'pad'; got {resize!r}")
    new_h, new_w, off_y, off_x = letterbox(float(height), float(width), image_size)
    ys = (off_y + boxes[:, [0, 2]] * new_h) / image_size
    xs = (off_x + boxes[:, [1, 3]] * new_w) / image_size
    return np.stack([ys[:, 0], xs[:, 0], ys[:, 1], xs[:, 1]], axis=1)


def points_to_input_frame(
    points, height: int, width: int, image_size: int, resize: str = "stretch"
) -> np.ndarray:
    """Outline points [P, 2] ((y, x) normalised in the original image) -> the same in the
    model's input frame, mapped as ``boxes_to_input_frame`` maps box corners."""
    points = np.asarray(points, np.float64).reshape(-1, 2)
    if len(points) == 0:
        return points
    boxes = boxes_to_input_frame(
        np.concatenate([points, points], axis=1), height, width, image_size, resize
    )
    return boxes[:, :2]


def outline_mask(outlines, boxes, shape: tuple[int, int]) -> np.ndarray:
    """bool [H, W]: pixels whose centre lies inside any fracture outline ([P, 2] (y, x)
    normalised); a box without an outline (fewer than three points) counts as its rectangle."""
    from matplotlib.path import Path as Outline

    h, w = shape
    ys, xs = np.mgrid[0:h, 0:w]
    centres = np.stack([(xs.ravel() + 0.5) / w, (ys.ravel() + 0.5) / h], axis=1)
    mask = np.zeros(h * w, bool)
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    for k, box in enumerate(boxes):
        points = np.asarray(outlines[k] if k < len(outlines) else [], np.float64).reshape(-1, 2)
        if len(points) >= 3:
            mask |= Outline(points[:, ::-1]).contains_points(centres)
        else:
            mask |= box_region_mask(box[None], shape).ravel()
    return mask.reshape(h, w)


def box_region_mask(boxes, shape: tuple[int, int], tolerance: float = 0.0) -> np.ndarray:
    """bool [H, W]: pixels whose centre lies in any box (normalised ymin, xmin, ymax, xmax),
    each box grown by ``tolerance`` pixels on every side."""
    h, w = shape
    ys = (np.arange(h) + 0.5)[:, None]
    xs = (np.arange(w) + 0.5)[None, :]
    mask = np.zeros((h, w), bool)
    for ymin, xmin, ymax, xmax in np.asarray(boxes, np.float64).reshape(-1, 4):
        mask |= (
            (ys >= ymin * h - tolerance)
            & (ys <= ymax * h + tolerance)
            & (xs >= xmin * w - tolerance)
            & (xs <= xmax * w + tolerance)
        )
    return mask


def pointing(cam: np.ndarray, mask: np.ndarray) -> dict:
    """One image of the pointing game: hit (an all-zero map points nowhere: a miss, flagged
    ``empty``), chance (the mask's area share), mass in the mask, and whether the image's
    centre pixel lies in the mask (the centre baseline)."""
    h, w = mask.shape
    centre = bool(mask[h // 2, w // 2])
    if float(cam.max()) <= 0:
        return {
            "hit": False,
            "empty": True,
            "chance": float(mask.mean()),
            "mass_share": math.nan,
            "centre_hit": centre,
        }
    peak = np.unravel_index(int(np.argmax(cam)), cam.shape)
    return {
        "hit": bool(mask[peak]),
        "empty": False,
        "chance": float(mask.mean()),
        "mass_share": mass_share(cam, mask),
        "centre_hit": centre,
    }


#: Localisation: a map is cut at this fraction of its maximum (its "region") for Dice and IoU
#: against the boxes, and for the top-1 connected region (the one holding the peak).
REGION_THRESHOLD = 0.5
#: IoU levels at which the top-1 region's bounding box counts as finding a fracture box.
IOU_LEVELS = (0.1, 0.25)


def box_iou(a, b) -> float:
    """IoU of two pixel rectangles (y0, x0, y1, x1), ends exclusive."""
    dy = min(a[2], b[2]) - max(a[0], b[0])
    dx = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(dy, 0) * max(dx, 0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def localisation(cam: np.ndarray, mask: np.ndarray, boxes, threshold: float = REGION_THRESHOLD):
    """How well the map's region matches the fracture: ``dice`` and ``iou`` of the map cut at
    ``threshold`` x its maximum against ``mask`` (pixels), and ``top1_iou``: the best IoU of
    the bounding rectangle of the connected region holding the map's peak with any box
    (normalised ymin, xmin, ymax, xmax). All 0 for an all-zero map (it locates nothing)."""
    from scipy import ndimage

    if float(cam.max()) <= 0:
        return {"dice": 0.0, "iou": 0.0, "top1_iou": 0.0}
    region = cam >= threshold * float(cam.max())
    inter = float(np.logical_and(region, mask).sum())
    total = float(region.sum() + mask.sum())
    union = float(np.logical_or(region, mask).sum())
    components, _ = ndimage.label(region)
    peak = np.unravel_index(int(np.argmax(cam)), cam.shape)
    ys, xs = np.nonzero(components == components[peak])
    top1 = (int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1)
    h, w = cam.shape
    rects = [
        (ymin * h, xmin * w, ymax * h, xmax * w)
        for ymin, xmin, ymax, xmax in np.asarray(boxes, np.float64).reshape(-1, 4)
    ]
    return {
        "dice": 2 * inter / total if total else 0.0,
        "iou": inter / union if union else 0.0,
        "top1_iou": max((box_iou(top1, r) for r in rects), default=0.0),
    }


def mean_ci(values, n_resamples: int = 1000, seed: int = 0) -> dict:
    """Mean of per-image values with a percentile-bootstrap 95% CI (images resampled)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {"mean": None, "ci95": None}
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_resamples, v.size))].mean(axis=1)
    return {"mean": float(v.mean()), "ci95": [float(x) for x in np.percentile(means, [2.5, 97.5])]}


def wilson_ci(hits: int, n: int, level: float = 0.95) -> list[float] | None:
    """Wilson score interval of a rate (scipy's ``binomtest``); None for n = 0."""
    if n == 0:
        return None
    from scipy.stats import binomtest

    ci = binomtest(int(hits), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return [float(ci.low), float(ci.high)]


def _rate(hits: int, n: int) -> dict:
    return {"rate": hits / n if n else None, "ci95": wilson_ci(hits, n), "hits": int(hits)}


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(values)) if values else None


class Audit:
    """Accumulates per-image numbers over a split; ``result()`` is the explain.json block.

    ``add(cam, label, boxes)``: one map [H, W], its true label (1 fractured, 0 normal) and
    its boxes in the input frame ([N, 4] normalised; None when the dataset has none).
    """

    def __init__(self, shape, border: float = 0.1, corner: float = 0.25, tolerance: float = 0.0):
        self.shape = tuple(shape)
        self.border, self.corner, self.tolerance = border, corner, tolerance
        self.border_mask = border_mask(self.shape, border)
        self.corner_masks = corner_masks(self.shape, corner)
        self.rows: list[dict] = []

    def add(
        self, cam: np.ndarray, label: int, boxes=None, image_id: str = "", outlines=None
    ) -> dict:
        row = {"image_id": image_id, "label": int(label), "zero": float(cam.max()) <= 0}
        row["border_share"] = mass_share(cam, self.border_mask)
        for name, m in self.corner_masks.items():
            row[name] = mass_share(cam, m)
        if label == 1 and boxes is not None and len(boxes):
            mask = box_region_mask(boxes, self.shape, self.tolerance)
            row.update(pointing(cam, mask))
            row.update(localisation(cam, mask, boxes))
            if outlines is not None and any(len(o) >= 3 for o in outlines):
                traced = localisation(cam, outline_mask(outlines, boxes, self.shape), boxes)
                row.update(outline_dice=traced["dice"], outline_iou=traced["iou"])
        self.rows.append(row)
        return row

    def result(self, has_boxes: bool) -> dict:
        h, w = self.shape
        uniform_border = float(self.border_mask.mean())
        out = {
            "n_images": len(self.rows),
            "n_zero_maps": sum(r["zero"] for r in self.rows),
            "border_width": self.border,
            "border_share_uniform": uniform_border,
            "corner_size": self.corner,
            "corner_share_uniform": float(self.corner_masks["top_left"].mean()),
            "per_class": {},
        }
        for label, name in ((1, "fractured"), (0, "normal")):
            rows = [r for r in self.rows if r["label"] == label and not r["zero"]]
            out["per_class"][name] = {
                "n": sum(r["label"] == label for r in self.rows),
                "n_zero_maps": sum(r["label"] == label and r["zero"] for r in self.rows),
                "border_share": _mean(r["border_share"] for r in rows),
                "corner_shares": {c: _mean(r[c] for r in rows) for c in CORNERS},
            }
        valid = [r for r in self.rows if not r["zero"]]
        out["border_share"] = _mean(r["border_share"] for r in valid)
        out["corner_shares"] = {c: _mean(r[c] for r in valid) for c in CORNERS}
        if not has_boxes:
            out["pointing_game"] = {
                "available": False,
                "reason": "the dataset has no fracture boxes (only FracAtlas and synthetic "
                "builds carry them), so the pointing game cannot be played",
            }
            return out
        played = [r for r in self.rows if "hit" in r]  # every fractured image with boxes
        hits = sum(r["hit"] for r in played)
        centre = sum(r["centre_hit"] for r in played)
        out["pointing_game"] = {
            "available": True,
            "n_fractured_with_boxes": len(played),
            "n_played": len(played),
            "n_empty_maps_counted_as_misses": sum(r["empty"] for r in played),
            "tolerance_px": self.tolerance,
            "hit_rate": hits / len(played) if played else None,
            "hit_rate_ci95": wilson_ci(hits, len(played)),
            "chance_rate": _mean(r["chance"] for r in played),
            "centre_baseline_hit_rate": centre / len(played) if played else None,
            "centre_baseline_ci95": wilson_ci(centre, len(played)),
            "box_mass_share": _mean(r["mass_share"] for r in played),
            "localisation": {
                "threshold": REGION_THRESHOLD,
                "dice": mean_ci([r["dice"] for r in played]),
                "iou": mean_ci([r["iou"] for r in played]),
                **{
                    f"top1_hit_iou_{level:g}": _rate(
                        sum(r["top1_iou"] >= level for r in played), len(played)
                    )
                    for level in IOU_LEVELS
                },
            },
        }
        traced = [r for r in played if "outline_dice" in r]
        out["pointing_game"]["localisation"]["outlines"] = {
            "n": len(traced),
            "dice": mean_ci([r["outline_dice"] for r in traced]),
            "iou": mean_ci([r["outline_iou"] for r in traced]),
        }
        if not played:
            out["pointing_game"]["note"] = "no fractured image of this split has a box"
        return out
