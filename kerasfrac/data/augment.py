"""Augmentation, per image and per batch, seeded and stateless (a resumed run replays it).

Per image (``IMAGE_OPS``, drawn in tf.data after the cache): each op's ``enabled(data_cfg)``
says whether the config asks for it, and it draws its parameters (``PARAMS``) from its own
seeded stream, so turning one on leaves the others' draws unchanged; ``augment_batch`` applies
every image's draws a batch at a time. A box mask rides along as the image's last channel, so
every geometric op moves image and boxes together.

Per batch (``BATCH_OPS``, in the training step, where a batch's images meet): box paste acts on
pixels and box masks (``stage="pixels"``), mixup on the training targets (``stage="targets"``:
label, box cells, metadata). Batches are dicts: ``image``, ``label``, ``box_mask``,
``box_weight``, ``meta`` (where the model has the head that needs them).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from kerasfrac.data.decode import letterbox

AUTOTUNE = tf.data.AUTOTUNE


def _flips(image: tf.Tensor) -> tf.Tensor:
    """[3, H, W, C]: the image, its left-right flip, its up-down flip."""
    return tf.stack([image, tf.image.flip_left_right(image), tf.image.flip_up_down(image)])


def flip_expand(ds: tf.data.Dataset) -> tf.data.Dataset:
    """Each element ``(image, *rest)`` becomes three: as is, flipped left-right, flipped
    up-down (the report's augmentation, tripling the set); ``rest`` (label, id) is repeated."""

    def expand(image, *rest):
        return (_flips(image), *(tf.stack([r, r, r]) for r in rest))

    return ds.map(expand, num_parallel_calls=AUTOTUNE).unbatch()


def random_flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Flip left-right and (independently) up-down, each with probability 1/2.

    Stateless: the same ``seed`` (int shape [2]) gives the same flips, so a seeded pipeline
    is reproducible and the op gives the same result eagerly and inside tf.data.
    """
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=2)
    image = tf.image.stateless_random_flip_left_right(image, seeds[0])
    return tf.image.stateless_random_flip_up_down(image, seeds[1])


def box_mask(
    boxes: tf.Tensor, height: tf.Tensor, width: tf.Tensor, image_size: int, resize: str = "stretch"
) -> tf.Tensor:
    """Fracture boxes -> float32 [image_size, image_size, 1] mask in the model's input frame.

    ``boxes`` [N, 4] are (ymin, xmin, ymax, xmax) normalised to the original ``height`` x
    ``width`` image; the mask is 1 on every output pixel a box overlaps (so a box never
    vanishes at low resolution), following ``preprocess``'s geometry: ``stretch`` maps [0, 1]
    onto the whole square, ``pad`` onto the centred content area of ``resize_with_pad``.
    No boxes: all zeros.
    """
    s = float(image_size)
    boxes = tf.reshape(tf.cast(boxes, tf.float32), [-1, 4])
    if resize == "pad":
        h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
        rh, rw, top, left = letterbox(h, w, s, tf.floor, tf.maximum)
        scale = tf.stack([rh, rw, rh, rw])
        offset = tf.stack([top, left, top, left])
        boxes = (boxes * scale + offset) / s
    edges = tf.range(image_size, dtype=tf.float32) / s  # pixel i spans [i/s, (i+1)/s)
    rows = tf.cast(
        (edges[None, :] + 1.0 / s > boxes[:, 0:1]) & (edges[None, :] < boxes[:, 2:3]), tf.float32
    )  # [N, S]
    cols = tf.cast(
        (edges[None, :] + 1.0 / s > boxes[:, 1:2]) & (edges[None, :] < boxes[:, 3:4]), tf.float32
    )
    mask = tf.minimum(tf.einsum("ny,nx->yx", rows, cols), 1.0)
    return mask[..., None]


def outline_mask(
    boxes: tf.Tensor,
    points: tf.Tensor,
    lengths: tf.Tensor,
    height: tf.Tensor,
    width: tf.Tensor,
    image_size: int,
    resize: str = "stretch",
) -> tf.Tensor:
    """Fracture outlines -> float32 [image_size, image_size, 1] mask in the model's input
    frame: 1 on every pixel whose centre lies inside an outline (even-odd rule), and on every
    pixel a box overlaps whose outline is missing (fewer than three points, or a record
    written before outlines existed).

    ``points`` [P, 2] are every box's outline points one after the other ((y, x) normalised
    to the original image, as the boxes), ``lengths`` [N] the points of each box; the
    geometry is ``box_mask``'s.
    """
    s = float(image_size)
    boxes = tf.reshape(tf.cast(boxes, tf.float32), [-1, 4])
    points = tf.reshape(tf.cast(points, tf.float32), [-1, 2])
    lengths = tf.cast(tf.reshape(lengths, [-1]), tf.int32)
    n = tf.shape(boxes)[0]
    # a record without outlines (or with a count that does not match): every box plain
    lengths = tf.cond(
        tf.equal(tf.size(lengths), n), lambda: lengths, lambda: tf.zeros([n], tf.int32)
    )
    traced = lengths >= 3
    plain = box_mask(tf.boolean_mask(boxes, ~traced), height, width, image_size, resize)
    if resize == "pad":
        h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
        rh, rw, top, left = letterbox(h, w, s, tf.floor, tf.maximum)
        points = (points * tf.stack([rh, rw]) + tf.stack([top, left])) / s
    # edges: each point to the next one of its outline (the last back to the first), for the
    # outlines with three points or more
    owner = tf.repeat(tf.range(n), lengths)
    ends = tf.cumsum(lengths)
    starts = ends - lengths
    index = tf.range(tf.shape(owner)[0])
    following = tf.where(index + 1 >= tf.gather(ends, owner), tf.gather(starts, owner), index + 1)
    keep = tf.gather(traced, owner)
    a = tf.boolean_mask(points, keep)
    b = tf.boolean_mask(tf.gather(points, following), keep)
    edge_owner = tf.boolean_mask(owner, keep)
    centres = (tf.range(image_size, dtype=tf.float32) + 0.5) / s
    py, px = centres[:, None, None], centres[None, :, None]  # [S, 1, 1], [1, S, 1]
    ay, ax, by, bx = a[:, 0], a[:, 1], b[:, 0], b[:, 1]  # [E]
    straddles = (ay > py) != (by > py)  # [S, 1, E]
    dy = tf.where(tf.equal(by, ay), tf.ones_like(by), by - ay)
    crosses = straddles & (px < (bx - ax) * (py - ay) / dy + ax)  # [S, S, E]
    counts = tf.math.unsorted_segment_sum(
        tf.transpose(tf.cast(crosses, tf.int32), [2, 0, 1]), edge_owner, n
    )  # [N, S, S]
    inside = tf.reduce_any(tf.equal(counts % 2, 1), axis=0)
    return tf.maximum(tf.cast(inside, tf.float32)[..., None], plain)


def _affine(size: int, angle, zoom, shift_y, shift_x) -> tf.Tensor:
    """ImageProjectiveTransform rows [N, 8] (output pixel -> input pixel) for a rotation by
    ``angle`` (radians) and a zoom by ``zoom`` about the centre, then a shift by (shift_y,
    shift_x); each argument a scalar or an [N] vector (one row per image)."""
    c = (size - 1) / 2.0
    angle, zoom, shift_y, shift_x = (
        tf.reshape(tf.cast(v, tf.float32), [-1]) for v in (angle, zoom, shift_y, shift_x)
    )
    cos, sin = tf.cos(angle) / zoom, tf.sin(angle) / zoom
    zero = tf.zeros_like(cos)
    return tf.stack(
        [
            cos,
            -sin,
            c - cos * c + sin * c - shift_x * size,
            sin,
            cos,
            c - sin * c - cos * c - shift_y * size,
            zero,
            zero,
        ],
        axis=-1,
    )


#: The per-image augmentation parameters, in the order of the rows ``draw_params`` appends to
#: each element and ``augment_batch`` applies: the two flips (1 = flip), the warp (angle in
#: radians, zoom, shifts as a share of the side) and the intensity change (gamma exponent,
#: contrast factor, brightness offset).
PARAMS = (
    "flip_lr",
    "flip_ud",
    "angle",
    "zoom",
    "shift_y",
    "shift_x",
    "gamma",
    "contrast",
    "brightness",
)
#: The parameters that change nothing.
IDENTITY = (0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0)


def draw_flips(seed: tf.Tensor, data_cfg=None) -> dict:
    """``{"flip_lr", "flip_ud"}`` (1.0 = flip, each with probability 1/2) from the stateless
    ``seed`` (int [2]): the draws ``random_flip`` makes (``tf.image.stateless_random_flip_*``)."""
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=2)
    return {
        name: tf.cast(tf.random.stateless_uniform([], s, 0.0, 1.0) < 0.5, tf.float32)
        for name, s in zip(("flip_lr", "flip_ud"), tf.unstack(seeds), strict=True)
    }


def draw_warp_and_intensity(seed: tf.Tensor, data_cfg) -> dict:
    """The warp (``data.rotation/zoom/translate``) and intensity (``data.gamma/contrast/
    brightness``) parameters of one image from the stateless ``seed`` (int [2]); a step the
    config leaves at 0 keeps its identity value."""
    d = data_cfg
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=7)

    def uniform(i, low, high):
        return tf.random.stateless_uniform([], seeds[i], low, high)

    out = {}
    if d.rotation:
        out["angle"] = uniform(0, -d.rotation, d.rotation) * (math.pi / 180.0)
    if d.zoom:
        out["zoom"] = uniform(1, 1.0 - d.zoom, 1.0 + d.zoom)
    if d.translate:
        out["shift_y"] = uniform(2, -d.translate, d.translate)
        out["shift_x"] = uniform(3, -d.translate, d.translate)
    if d.gamma:
        out["gamma"] = tf.exp(uniform(4, -d.gamma, d.gamma))
    if d.contrast:
        out["contrast"] = uniform(5, 1.0 - d.contrast, 1.0 + d.contrast)
    if d.brightness:
        out["brightness"] = uniform(6, -d.brightness, d.brightness)
    return out


def params_vector(values: dict) -> tf.Tensor:
    """float32 [len(PARAMS)]: ``values`` by name, ``IDENTITY`` for the rest."""
    return tf.stack(
        [tf.cast(values.get(n, v), tf.float32) for n, v in zip(PARAMS, IDENTITY, strict=True)]
    )


def warps(data_cfg) -> bool:
    """Whether ``data_cfg`` asks for the affine warp (rotation, zoom or shift)."""
    d = data_cfg
    return bool(d.rotation or d.zoom or d.translate)


def recolours(data_cfg) -> bool:
    """Whether ``data_cfg`` asks for an intensity change (gamma, contrast or brightness)."""
    d = data_cfg
    return bool(d.gamma or d.contrast or d.brightness)


def augments(data_cfg) -> bool:
    """Whether ``data_cfg`` asks for any warp or intensity step (``augment_image``)."""
    return warps(data_cfg) or recolours(data_cfg)


def _float(x: tf.Tensor) -> tf.Tensor:
    return x if x.dtype == tf.float32 else tf.image.convert_image_dtype(x, tf.float32)


def _transforms(p: dict, size: int) -> tf.Tensor:
    """[N, 8] ImageProjectiveTransform rows of each image's flips, then warp (``PARAMS``
    ``p``): the input pixel of a flipped image is mirrored, x -> S-1-x (left-right: the first
    row of the transform) and y -> S-1-y (up-down: the second). A flip maps pixel centres
    onto pixel centres, so one bilinear resampling with this row equals flipping, then
    warping."""
    t = _affine(size, p["angle"], p["zoom"], p["shift_y"], p["shift_x"])
    lr, ud = p["flip_lr"][:, None], p["flip_ud"][:, None]
    last = tf.constant([[0.0, 0.0, size - 1.0]])
    rows = [t[:, 0:3] * (1.0 - 2.0 * lr) + lr * last, t[:, 3:6] * (1.0 - 2.0 * ud) + ud * last]
    return tf.concat([*rows, t[:, 6:]], axis=-1)


def _warp_tf(x: tf.Tensor, transforms: tf.Tensor) -> tf.Tensor:
    """TensorFlow's bilinear warp (``ImageProjectiveTransformV3``) of float32 images."""
    size = int(x.shape[1])
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=x,
        transforms=transforms,
        output_shape=tf.constant([size, size]),
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )


@functools.cache
def opencv():
    """The ``cv2`` module where OpenCV >= 5 is installed (a dependency), else None.

    OpenCV's bilinear ``warpAffine`` is TensorFlow's ``ImageProjectiveTransformV3`` at an
    eighth of its CPU time (docs/speed.md); from version 5 on it interpolates at the exact
    position, as TensorFlow does (float32 within 5e-5), where 4.x rounds each position to 1/32
    of a pixel (up to 6 grey levels apart on noise), so with an older OpenCV the warp stays
    TensorFlow's."""
    try:
        import cv2
    except ImportError:
        return None
    major = str(getattr(cv2, "__version__", "0")).split(".")[0]
    return cv2 if major.isdigit() and int(major) >= 5 else None


def _warp_numpy(x: np.ndarray, transforms: np.ndarray, skip_empty: bool) -> np.ndarray:
    """OpenCV's bilinear warp of each image of ``x`` [N, H, W, C] (uint8 or float32, kept)
    by its affine ``transforms`` row (output pixel -> input pixel, as TensorFlow's; the
    projective terms are 0); outside the image is 0. ``skip_empty``: an image without a
    non-zero pixel stays zero, as its warp would."""
    cv2 = opencv()
    n, h, w, c = x.shape
    out = np.zeros_like(x)
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    for i in range(n):
        if skip_empty and not x[i].any():
            continue
        m = transforms[i, :6].reshape(2, 3).astype(np.float64)
        for lo in range(0, c, 4):  # warpAffine takes up to 4 channels at a time
            part = np.ascontiguousarray(x[i, :, :, lo : lo + 4])
            warped = cv2.warpAffine(
                part, m, (w, h), flags=flags, borderMode=cv2.BORDER_CONSTANT, borderValue=0
            )
            out[i, :, :, lo : lo + 4] = warped.reshape(h, w, -1)
    return out


def _warp(x: tf.Tensor, transforms: tf.Tensor, skip_empty: bool = False) -> tf.Tensor:
    """The bilinear warp of each image of ``x`` (uint8 or float32) by its ``transforms`` row
    ([N, 8], ``_transforms``), as float32 in [0, 1]; areas from outside the image are 0.
    ``skip_empty``: images without a non-zero pixel (a normal image's empty box mask, half of
    a balanced batch) are not warped; they stay zero, as their warp would.

    OpenCV's warp where ``opencv()`` has it, on the images' own dtype (uint8 from the cache:
    the result is rounded to whole grey levels, within half a level of the float32 warp,
    before the conversion), else TensorFlow's on float32."""
    if opencv() is None:
        x = _float(x)
        if not skip_empty:
            return _warp_tf(x, transforms)
        some = tf.reshape(tf.where(tf.reduce_any(x > 0.0, axis=[1, 2, 3])), [-1])
        warped = _warp_tf(tf.gather(x, some), tf.gather(transforms, some))
        return tf.tensor_scatter_nd_update(tf.zeros_like(x), some[:, None], warped)
    out = tf.numpy_function(
        lambda a, t: _warp_numpy(a, t, skip_empty), [x, transforms], x.dtype, stateful=False
    )
    out.set_shape(x.shape)
    return _float(out)


def augment_batch_parts(
    images: tf.Tensor, params: tf.Tensor, data_cfg, channels: int
) -> tuple[tf.Tensor, tf.Tensor | None]:
    """``augment_batch``'s result as ``(image, rest)``: the first ``channels`` and the
    further ones (the box mask; None where there are none), float32, without concatenating
    them again (the training pipeline reads them apart)."""
    d = data_cfg
    p = dict(zip(PARAMS, tf.unstack(tf.cast(params, tf.float32), axis=-1), strict=True))
    extra = images.shape[-1] is not None and images.shape[-1] > channels
    x = images[..., :channels] if extra else images
    rest = images[..., channels:] if extra else None
    if warps(d):
        t = _transforms(p, int(images.shape[1]))
        x = _warp(x, t)
        rest = _warp(rest, t, skip_empty=True) if extra else None
    elif d.flips == "random":
        lr = tf.reshape(p["flip_lr"] > 0.5, [-1, 1, 1, 1])
        ud = tf.reshape(p["flip_ud"] > 0.5, [-1, 1, 1, 1])

        def flip(v):
            v = tf.where(lr, tf.reverse(v, [2]), v)
            return tf.where(ud, tf.reverse(v, [1]), v)

        x = flip(x)
        rest = flip(rest) if extra else None
    x = _float(x)
    if extra:
        rest = _float(rest)
    if not recolours(d):
        return x, rest

    def per_image(name):
        return tf.reshape(p[name], [-1, 1, 1, 1])

    if d.gamma:
        x = tf.exp(per_image("gamma") * tf.math.log(tf.maximum(x, 1e-6)))
    if d.contrast:
        mean = tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)
        x = (x - mean) * per_image("contrast") + mean
    if d.brightness:
        x = x + per_image("brightness")
    return tf.clip_by_value(x, 0.0, 1.0), rest


def augment_batch(images: tf.Tensor, params: tf.Tensor, data_cfg, channels: int) -> tf.Tensor:
    """The per-image augmentation of a whole batch, each image with its own ``params`` row
    ([N, len(PARAMS)], ``draw_params``): flips, then the affine warp of all channels, then
    gamma, contrast and brightness of the first ``channels`` (the image; further channels, the
    box mask, only move). ``images`` [N, S, S, C] uint8 (the cache's) or float32 in [0, 1];
    returns float32 in [0, 1]; areas shifted in from outside the image are black (0).

    One batched op per step instead of one per image, and no work on empty masks (the
    pipeline's CPU time per image: docs/speed.md): with the warp on, the flips are folded into
    each image's warp (``_transforms``); gamma is ``exp(g log x)``, which is ``x ** g``.
    """
    x, rest = augment_batch_parts(images, params, data_cfg, channels)
    return x if rest is None else tf.concat([x, rest], axis=-1)


def augment_image(image: tf.Tensor, seed: tf.Tensor, data_cfg, channels: int) -> tf.Tensor:
    """Random affine warp (rotation, zoom, shift: ``data.rotation/zoom/translate``) of all
    channels, then gamma, contrast and brightness (``data.gamma/contrast/brightness``) of the
    first ``channels`` (the image; further channels, the box mask, only move with the warp),
    of one image (``augment_batch`` with the parameters ``draw_warp_and_intensity`` draws;
    no flips).

    Stateless: the same ``seed`` (int [2]) gives the same result, eagerly and in tf.data.
    Values stay in [0, 1]; areas shifted in from outside the image are black (0).
    """
    params = params_vector(draw_warp_and_intensity(seed, data_cfg))
    no_flips = dataclasses.replace(data_cfg, flips="none")
    out = augment_batch(image[None], params[None], no_flips, channels)[0]
    return tf.ensure_shape(out, image.shape)


@dataclass(frozen=True)
class ImageOp:
    """A per-image augmentation's draws: ``draw(seed, data_cfg) -> {param: value}`` (names
    of ``PARAMS``), made for each image where ``enabled(data_cfg)``, with stateless seeds from
    its own stream (the pipeline's seed + ``seed_offset``), so turning one op on leaves the
    others' draws unchanged. ``augment_batch`` applies them all, a batch at a time."""

    name: str
    enabled: Callable
    draw: Callable
    seed_offset: int = 0


#: The per-image ops, in the order the training pipeline draws (and applies) them.
IMAGE_OPS = (
    ImageOp("flip", lambda d: d.flips == "random", draw_flips),
    ImageOp("warp_and_intensity", augments, draw_warp_and_intensity, seed_offset=7919),
)


def draw_params(ds: tf.data.Dataset, data_cfg, seed: int) -> tf.data.Dataset:
    """``ds`` (elements ``(image, *rest)``) with each element's augmentation parameters
    appended (float32 [len(PARAMS)], ``IDENTITY`` where no op is enabled): the draws of every
    enabled ``IMAGE_OPS`` op, each from its own seeded stream, fresh on every pass."""
    ops = [op for op in IMAGE_OPS if op.enabled(data_cfg)]
    streams = [
        tf.data.Dataset.random(seed=seed + op.seed_offset, rerandomize_each_iteration=True).batch(2)
        for op in ops
    ]

    def draw(el, *seeds):
        el = el if isinstance(el, tuple) else (el,)
        values = {}
        for op, s in zip(ops, seeds, strict=True):
            values.update(op.draw(s, data_cfg))
        return (*el, params_vector(values))

    if not ops:
        return ds.map(lambda *el: (*el, params_vector({})))  # (image, *rest) or image alone
    return tf.data.Dataset.zip(ds, *streams).map(draw, num_parallel_calls=AUTOTUNE)


# --------------------------------------------------------------------------- per batch


def mixup_lambdas(n, alpha: float, seed) -> tf.Tensor:
    """``n`` mixing weights lam ~ Beta(alpha, alpha) folded to [0.5, 1] ([n, 1] float32), from
    the stateless ``seed`` (shape [2]): the same seed, the same weights (a resumed run
    replays them)."""
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 2)
    a = tf.random.stateless_gamma([n, 1], seeds[0], alpha=alpha)
    b = tf.random.stateless_gamma([n, 1], seeds[1], alpha=alpha)
    lam = a / tf.maximum(a + b, 1e-12)
    return tf.maximum(lam, 1.0 - lam)


def step_seed(seed: int, iteration, replica, salt: int = 0) -> tf.Tensor:
    """A stateless seed [2] for one training step's draws: the run's ``seed`` (plus ``salt``,
    one per kind of draw), the optimizer's ``iteration`` and the ``replica`` (each replica
    draws differently); a resumed run replays them."""
    base = tf.stack([tf.cast(seed, tf.int64), tf.cast(iteration, tf.int64)])
    return base + tf.cast(tf.stack([salt, tf.cast(replica, tf.int64) * 1_000_003]), tf.int64)


def partners(n, seed) -> tf.Tensor:
    """A permutation of the batch's ``n`` indices from a step's ``seed`` (``step_seed``):
    each example's partner in the step."""
    return tf.random.experimental.stateless_shuffle(
        tf.range(n), seed=seed + tf.constant([7919, 0], tf.int64)
    )


def mixup_draw(n, alpha: float, seed: int, iteration, replica=0) -> tuple:
    """``(lam, partner)`` of one training step: the mixing weights (``mixup_lambdas``) and a
    permutation of the batch, drawn from the run's ``seed``, the optimizer's ``iteration``
    and the ``replica`` (each replica blends its own batch differently)."""
    drawn = step_seed(seed, iteration, replica)
    return mixup_lambdas(n, alpha, drawn), partners(n, drawn)


def mixup(images, targets: list, lam, partner) -> tuple:
    """Blend each example with ``partner[i]`` of the same batch: ``images`` and every tensor
    of ``targets`` (labels, box-cell targets: the first axis is the batch) as
    ``lam * t + (1 - lam) * t[partner]``, ``lam`` [n, 1] broadcast over the other axes. Box
    weights are not blended: see ``mixup_box_weights``."""

    def blend(t):
        t = tf.cast(t, tf.float32)
        w = tf.reshape(lam, [-1] + [1] * (len(t.shape) - 1))
        return w * t + (1.0 - w) * tf.gather(t, partner)

    mixed = tf.cast(blend(images), images.dtype)
    return mixed, [blend(t) for t in targets]


def mixup_box_weights(box_weights, partner) -> tf.Tensor:
    """The box weight of each blended image: the smaller of its two images' weights. A
    fractured image without boxes (weight 0) has unknown cell targets, so a blend with it has
    too; blending the weights instead would train such cells towards a normal partner's zeros
    with weight 1 - lam."""
    w = tf.cast(box_weights, tf.float32)
    return tf.minimum(w, tf.gather(w, partner))


def box_paste_draw(n, rate: float, seed: int, iteration, replica=0) -> tuple:
    """``(chosen, partner)`` of one training step for ``train.box_paste``: which images
    receive a paste (each with probability ``rate``) and from which image of the batch,
    drawn from the run's ``seed``, the optimizer's ``iteration`` and the ``replica``."""
    drawn = step_seed(seed, iteration, replica, salt=104_729)
    return tf.random.stateless_uniform([n], drawn) < rate, partners(n, drawn)


def box_paste(
    images, labels, masks, chosen, partner, feather: int = 9, min_brightness: float = 0.7
) -> tuple:
    """Copy-paste of fractures (after Ghiasi et al. 2021, with FracAtlas' boxes): where
    ``chosen[i]`` and image ``partner[i]`` has a fracture box, the pixels of that box are
    pasted into image i at the same place (the model's input frame is the same for every
    image), their edges blended over ``feather`` pixels so that a seam is not what marks a
    fracture. Only bone onto bone: the paste happens where image i's mean inside the box is at
    least ``min_brightness`` times the donor's there (not a fracture floating on the
    background, which would teach "a bright patch on black is a fracture"). Image i then
    shows a fracture: its label becomes 1 and its box mask the union of both. Its box weight
    stays its own (a fractured image without boxes keeps unknown cells outside the paste).
    ``images`` [n, H, W, C], ``labels`` [n], ``masks`` [n, H, W, 1] in [0, 1]; returns
    ``(images, labels, masks)``."""
    dtype = images.dtype
    x = tf.cast(images, tf.float32)
    m = tf.cast(masks, tf.float32)
    donor = tf.cast(tf.gather(m, partner) > 0.5, tf.float32)
    donor_x = tf.gather(x, partner)
    area = tf.reduce_sum(donor, axis=[1, 2, 3])
    mine = tf.reduce_sum(tf.reduce_mean(x, -1, keepdims=True) * donor, [1, 2, 3])
    theirs = tf.reduce_sum(tf.reduce_mean(donor_x, -1, keepdims=True) * donor, [1, 2, 3])
    bone_on_bone = mine >= min_brightness * theirs
    do = tf.logical_and(tf.cast(chosen, tf.bool), tf.logical_and(area > 0.0, bone_on_bone))
    # feathered edge: the box's mask averaged over a feather x feather window, so alpha
    # ramps from 0 outside to 1 inside over about feather / 2 pixels on each side
    alpha = tf.nn.avg_pool2d(donor, feather, 1, "SAME") if feather > 1 else donor
    alpha = alpha * tf.reshape(tf.cast(do, tf.float32), [-1, 1, 1, 1])
    pasted = x * (1.0 - alpha) + donor_x * alpha
    y = tf.where(do, tf.ones_like(tf.cast(labels, tf.float32)), tf.cast(labels, tf.float32))
    union = tf.where(tf.reshape(do, [-1, 1, 1, 1]), tf.maximum(m, donor), m)
    return tf.cast(pasted, dtype), tf.cast(y, labels.dtype), tf.cast(union, masks.dtype)


def coons_fill_batch(images: tf.Tensor, rects: tf.Tensor, fill: tf.Tensor) -> tf.Tensor:
    """``images`` [B, S, S, C] with, where ``fill`` [B] (bool), the rectangle ``rects[b]`` =
    (y0, x0, y1, x1) (int, end exclusive, clamped to the image) replaced by the Coons patch of
    the pixels just outside it: the smooth surface meeting the surroundings on all four sides
    (``kerasfrac.explain.occlusion.coons_fill``, the occlusion test's fill, batched)."""
    x = tf.cast(images, tf.float32)
    size = tf.shape(x)[1]
    rects = tf.clip_by_value(tf.cast(rects, tf.int32), 0, size)
    y0, x0, y1, x1 = tf.unstack(rects, axis=-1)
    top, bottom = tf.maximum(y0 - 1, 0), tf.minimum(y1, size - 1)
    left, right = tf.maximum(x0 - 1, 0), tf.minimum(x1, size - 1)
    t = tf.gather(x, top, axis=1, batch_dims=1)  # [B, S, C]: the row above
    b = tf.gather(x, bottom, axis=1, batch_dims=1)
    lft = tf.gather(x, left, axis=2, batch_dims=1)  # [B, S, C]: the column to the left
    rgt = tf.gather(x, right, axis=2, batch_dims=1)
    grid = tf.cast(tf.range(size), tf.float32)

    def ramp(v, lo, hi):  # (v - lo) / max(hi - lo, 1), per image
        lo, hi = tf.cast(lo, tf.float32)[:, None], tf.cast(hi, tf.float32)[:, None]
        return (v[None] - lo) / tf.maximum(hi - lo, 1.0)

    u = ramp(grid, left, right)[:, None, :, None]  # [B, 1, S, 1]
    v = ramp(grid, top, bottom)[:, :, None, None]  # [B, S, 1, 1]

    def at(row, col):  # [B, 1, 1, C]
        return tf.gather(row, col, axis=1, batch_dims=1)[:, None, None, :]

    corners = (
        (1 - u) * (1 - v) * at(t, left)
        + u * (1 - v) * at(t, right)
        + (1 - u) * v * at(b, left)
        + u * v * at(b, right)
    )
    patch = (1 - v) * t[:, None] + v * b[:, None] + (1 - u) * lft[:, :, None] + u * rgt[:, :, None]
    patch -= corners

    def within(lo, hi):  # [B, S]: lo <= index < hi, per image
        index = tf.range(size)[None]
        return (index >= lo[:, None]) & (index < hi[:, None])

    rows, cols = within(y0, y1), within(x0, x1)
    inside = rows[:, :, None, None] & cols[:, None, :, None] & tf.reshape(fill, [-1, 1, 1, 1])
    return tf.cast(tf.where(inside, patch, x), images.dtype)


#: A fracture fill covers the mask's bounding rectangle grown by this share of its side plus
#: FILL_MARGIN_PX, so the fracture's ends are inside it; the occlusion test grows its boxes
#: by the same (``kerasfrac.explain.occlusion.MARGIN``).
FILL_MARGIN = 0.15
FILL_MARGIN_PX = 2


def mask_rects(masks: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """``(rects [B, 4] int32 (y0, x0, y1, x1), has [B] bool)``: the bounding rectangle of
    each box mask's non-zero pixels ([B, S, S, 1]), grown by ``FILL_MARGIN`` and
    ``FILL_MARGIN_PX`` and clamped; ``has`` is False for an empty mask."""
    on = tf.cast(masks, tf.float32)[..., 0] > 0.0
    size = tf.shape(on)[1]
    rows, cols = tf.reduce_any(on, axis=2), tf.reduce_any(on, axis=1)  # [B, S]

    def span(any_):
        lo = tf.argmax(tf.cast(any_, tf.int32), axis=1, output_type=tf.int32)
        hi = size - tf.argmax(tf.cast(any_[:, ::-1], tf.int32), axis=1, output_type=tf.int32)
        grow = tf.cast(FILL_MARGIN * tf.cast(hi - lo, tf.float32), tf.int32) + FILL_MARGIN_PX
        return tf.maximum(lo - grow, 0), tf.minimum(hi + grow, size)

    y0, y1 = span(rows)
    x0, x1 = span(cols)
    return tf.stack([y0, x0, y1, x1], axis=-1), tf.reduce_any(rows, axis=1)


def fracture_fill_draw(images, masks, labels, rate: float, seed) -> dict:
    """What ``fracture_fill`` does to each image of one batch, from the stateless ``seed``
    (``step_seed``): ``chosen`` (probability ``rate``), ``fracture`` (a chosen fractured image
    with a mask whose fracture is filled: half of them), and every image's ``rect`` (its
    fracture's grown rectangle where ``fracture``, else a control window of a fracture's size
    centred on a random pixel at least as bright as the image's mean: on bone, not on the
    black background, and, in a fractured image, off its fracture)."""
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 4)
    n = tf.shape(images)[0]
    size = tf.shape(images)[1]
    chosen = tf.random.stateless_uniform([n], seeds[0]) < rate
    rects, has = mask_rects(masks)
    fractured = tf.cast(labels, tf.float32) > 0.5
    fracture = chosen & has & fractured & (tf.random.stateless_uniform([n], seeds[1]) < 0.5)
    # the control's size: the image's own fracture's, else a random fracture's of the batch,
    # else a tenth of the side
    sizes = tf.stack([rects[:, 2] - rects[:, 0], rects[:, 3] - rects[:, 1]], axis=-1)
    donors = tf.where(has)[:, 0]
    pick = tf.random.stateless_uniform(
        [n], seeds[2], 0, tf.maximum(tf.shape(donors)[0], 1), tf.int32
    )
    default = tf.fill([n, 2], tf.maximum(size // 10, 1))
    other = tf.cond(
        tf.size(donors) > 0, lambda: tf.gather(sizes, tf.gather(donors, pick)), lambda: default
    )
    hw = tf.where(has[:, None], sizes, other)
    gray = tf.reduce_mean(tf.cast(images, tf.float32), axis=-1)  # [B, S, S]
    bright = gray >= tf.reduce_mean(gray, axis=[1, 2], keepdims=True)
    grid = tf.range(size)
    near_y = (
        tf.abs(grid[None] - (rects[:, 0:1] + rects[:, 2:3]) // 2)
        < (sizes[:, 0:1] + hw[:, 0:1]) // 2
    )
    near_x = (
        tf.abs(grid[None] - (rects[:, 1:2] + rects[:, 3:4]) // 2)
        < (sizes[:, 1:2] + hw[:, 1:2]) // 2
    )
    off = ~(near_y[:, :, None] & near_x[:, None, :] & has[:, None, None])
    allowed = tf.reshape(bright & off, [n, -1])
    allowed = tf.where(tf.reduce_any(allowed, 1, keepdims=True), allowed, tf.ones_like(allowed))
    logits = tf.where(allowed, 0.0, -1e9)
    centre = tf.random.stateless_categorical(logits, 1, seeds[3], dtype=tf.int32)[:, 0]
    cy, cx = centre // size, centre % size
    y0 = tf.clip_by_value(cy - hw[:, 0] // 2, 0, size - hw[:, 0])
    x0 = tf.clip_by_value(cx - hw[:, 1] // 2, 0, size - hw[:, 1])
    control = tf.stack([y0, x0, y0 + hw[:, 0], x0 + hw[:, 1]], axis=-1)
    return {
        "chosen": chosen,
        "fracture": fracture,
        "rect": tf.where(fracture[:, None], rects, control),
    }


def fracture_fill(images, labels, masks, drawn: dict) -> tuple:
    """Counterfactual fills (``train.fracture_fill``): every chosen image (``drawn``,
    ``fracture_fill_draw``) has one rectangle Coons-filled (``coons_fill_batch``). Where that
    rectangle is the image's fracture, the fracture is gone: the label becomes 0 (normal) and
    the box mask is cleared; elsewhere (controls, in both classes alike) label and mask stay,
    so that a fill's own trace tells nothing about the label. Returns ``(images, labels,
    masks)``."""
    filled = coons_fill_batch(images, drawn["rect"], drawn["chosen"])
    gone = drawn["fracture"]
    y = tf.where(gone, tf.zeros_like(tf.cast(labels, tf.float32)), tf.cast(labels, tf.float32))
    m = tf.where(tf.reshape(gone, [-1, 1, 1, 1]), tf.zeros_like(masks), masks)
    return filled, tf.cast(y, labels.dtype), m


def _fracture_fill_op(batch: dict, rate: float, seed: int, iteration, replica) -> dict:
    drawn = fracture_fill_draw(
        batch["image"],
        batch["box_mask"],
        batch["label"],
        rate,
        step_seed(seed, iteration, replica, salt=130_363),
    )
    images, labels, masks = fracture_fill(batch["image"], batch["label"], batch["box_mask"], drawn)
    return {**batch, "image": images, "label": labels, "box_mask": masks}


@dataclass(frozen=True)
class BatchOp:
    """A per-batch augmentation in the training step: ``fn(batch, value, seed, iteration,
    replica) -> batch`` on a dict batch, where the ``train.<key>`` config value is non-zero.
    ``stage``: "pixels" (before the step derives its targets from the box masks) or
    "targets" (after: it sees ``y``, the label as trained, and ``box_cells``)."""

    key: str
    stage: str
    needs: tuple[str, ...]
    fn: Callable


def _box_paste_op(batch: dict, rate: float, seed: int, iteration, replica) -> dict:
    chosen, donors = box_paste_draw(tf.shape(batch["image"])[0], rate, seed, iteration, replica)
    images, labels, masks = box_paste(
        batch["image"], batch["label"], batch["box_mask"], chosen, donors
    )
    return {**batch, "image": images, "label": labels, "box_mask": masks}


def _mixup_op(batch: dict, alpha: float, seed: int, iteration, replica) -> dict:
    """Blends ``image``, ``y`` and, where present, ``box_cells`` (their weight the smaller of
    the two images', ``mixup_box_weights``) and ``meta`` (blended where both images know the
    column, else unknown)."""
    lam, partner = mixup_draw(tf.shape(batch["image"])[0], alpha, seed, iteration, replica)
    keys = [k for k in ("y", "box_cells", "meta") if batch.get(k) is not None]
    images, mixed = mixup(batch["image"], [batch[k] for k in keys], lam, partner)
    out = {**batch, "image": images, **dict(zip(keys, mixed, strict=True))}
    if "box_cells" in keys:
        out["box_weight"] = mixup_box_weights(batch["box_weight"], partner)
    if "meta" in keys:
        meta = batch["meta"]
        unknown = tf.minimum(meta, tf.gather(meta, partner)) < 0.0
        out["meta"] = tf.where(unknown, -1.0, out["meta"])
    return out


#: The per-batch ops, in the order the training step applies them.
BATCH_OPS = (
    BatchOp("box_paste", "pixels", ("box_mask",), _box_paste_op),
    BatchOp("fracture_fill", "pixels", ("box_mask",), _fracture_fill_op),
    BatchOp("mixup", "targets", (), _mixup_op),
)


def apply_batch_ops(batch: dict, stage: str, train_cfg_values: dict, seed: int, iteration) -> dict:
    """``batch`` after every ``BATCH_OPS`` op of ``stage`` whose value in
    ``train_cfg_values`` (``{key: value}``) is non-zero and whose inputs the batch has; each
    replica draws differently."""
    replica = tf.distribute.get_replica_context().replica_id_in_sync_group
    for op in BATCH_OPS:
        value = train_cfg_values.get(op.key, 0)
        if op.stage == stage and value and all(batch.get(k) is not None for k in op.needs):
            batch = op.fn(batch, value, seed, iteration, replica)
    return batch
