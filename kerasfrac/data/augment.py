"""Augmentation, per image and per batch, seeded and stateless (a resumed run replays it).

Per image (``IMAGE_OPS``, in tf.data after the cache): each op's ``enabled(data_cfg)`` says
whether the config asks for it, and it draws from its own seeded stream, so turning one on
leaves the others' draws unchanged. A box mask rides along as the image's last channel, so
every geometric op moves image and boxes together.

Per batch (``BATCH_OPS``, in the training step, where a batch's images meet): box paste acts on
pixels and box masks (``stage="pixels"``), mixup on the training targets (``stage="targets"``:
label, box cells, metadata). Batches are dicts: ``image``, ``label``, ``box_mask``,
``box_weight``, ``meta`` (where the model has the head that needs them).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

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
    """ImageProjectiveTransform row (output pixel -> input pixel) for a rotation by ``angle``
    (radians) and a zoom by ``zoom`` about the centre, then a shift by (shift_y, shift_x)."""
    c = (size - 1) / 2.0
    cos, sin = tf.cos(angle) / zoom, tf.sin(angle) / zoom
    return tf.stack(
        [
            cos,
            -sin,
            c - cos * c + sin * c - shift_x * size,
            sin,
            cos,
            c - sin * c - cos * c - shift_y * size,
            0.0,
            0.0,
        ]
    )[None]


def augment_image(image: tf.Tensor, seed: tf.Tensor, data_cfg, channels: int) -> tf.Tensor:
    """Random affine warp (rotation, zoom, shift: ``data.rotation/zoom/translate``) of all
    channels, then gamma, contrast and brightness (``data.gamma/contrast/brightness``) of the
    first ``channels`` (the image; further channels, the box mask, only move with the warp).

    Stateless: the same ``seed`` (int [2]) gives the same result, eagerly and in tf.data.
    Values stay in [0, 1]; areas shifted in from outside the image are black (0).
    """
    d = data_cfg
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=7)

    def uniform(i, low, high):
        return tf.random.stateless_uniform([], seeds[i], low, high)

    if d.rotation or d.zoom or d.translate:
        size = int(image.shape[0])
        angle = uniform(0, -d.rotation, d.rotation) * (math.pi / 180.0) if d.rotation else 0.0
        zoom = uniform(1, 1.0 - d.zoom, 1.0 + d.zoom) if d.zoom else 1.0
        dy = uniform(2, -d.translate, d.translate) if d.translate else 0.0
        dx = uniform(3, -d.translate, d.translate) if d.translate else 0.0
        warped = tf.raw_ops.ImageProjectiveTransformV3(
            images=image[None],
            transforms=_affine(size, angle, zoom, dy, dx),
            output_shape=tf.constant([size, size]),
            fill_value=0.0,
            interpolation="BILINEAR",
            fill_mode="CONSTANT",
        )
        image = tf.ensure_shape(warped[0], image.shape)
    if not (d.gamma or d.contrast or d.brightness):
        return image
    x, rest = image[..., :channels], image[..., channels:]
    if d.gamma:
        x = tf.pow(tf.maximum(x, 1e-6), tf.exp(uniform(4, -d.gamma, d.gamma)))
    if d.contrast:
        mean = tf.reduce_mean(x)
        x = (x - mean) * uniform(5, 1.0 - d.contrast, 1.0 + d.contrast) + mean
    if d.brightness:
        x = x + uniform(6, -d.brightness, d.brightness)
    x = tf.clip_by_value(x, 0.0, 1.0)
    return tf.concat([x, rest], axis=-1)


def augments(data_cfg) -> bool:
    """Whether ``data_cfg`` asks for any ``augment_image`` step."""
    d = data_cfg
    return bool(d.rotation or d.zoom or d.translate or d.gamma or d.contrast or d.brightness)


@dataclass(frozen=True)
class ImageOp:
    """A per-image augmentation: ``fn(image, seed, data_cfg, channels) -> image`` on float32
    [S, S, C (+1 box-mask channel)], applied where ``enabled(data_cfg)``, with stateless seeds
    from its own stream (the pipeline's seed + ``seed_offset``)."""

    name: str
    enabled: Callable
    fn: Callable
    seed_offset: int = 0

    def apply_to(self, ds: tf.data.Dataset, data_cfg, channels: int, seed: int):
        """``ds`` (elements ``(image, *rest)``) with this op on each image."""
        rng = tf.data.Dataset.random(seed=seed + self.seed_offset, rerandomize_each_iteration=True)
        return tf.data.Dataset.zip(ds, rng.batch(2)).map(
            lambda el, s: (self.fn(el[0], s, data_cfg, channels), *el[1:]),
            num_parallel_calls=AUTOTUNE,
        )


#: The per-image ops, in the order the training pipeline applies them.
IMAGE_OPS = (
    ImageOp("flip", lambda d: d.flips == "random", lambda x, s, d, c: random_flip(x, s)),
    ImageOp("warp_and_intensity", augments, augment_image, seed_offset=7919),
)


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
