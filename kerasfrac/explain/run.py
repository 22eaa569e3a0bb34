"""What a trained model looks at: class visualization, feature maps, Grad-CAM figures and the
shortcut audit of ``kerasfrac explain`` (PNGs + ``explain.json``, also in TensorBoard).

Small pure pieces (keras-io ``visualizing_what_convnets_learn``):

* ``ascent_step`` (a ``tf.function``): one step of gradient ascent on the input pixels, the
  gradient L2-normalised, BatchNorm in inference mode, the weights untouched;
  ``visualize_class`` loops it from noise or a real image (jitter, blur and L2 regularisers
  optional) and records the logit before and after every step; ``deprocess_image`` turns
  the result into a displayable uint8 image.
* ``feature_model`` / ``feature_maps``: a sub-model from ``model.inputs`` to the conv block
  outputs (fresh or reloaded models alike).
* Grad-CAM and the audit numbers live in ``kerasfrac.explain.gradcam``.

``explain_run`` ties them to a run directory: the run's config prepares the images exactly
as training did, figures go to ``OUT`` (default ``RUN_DIR/explain``, and then also to
``RUN_DIR/tensorboard/explain`` and into the run's ``report.html``), numbers to
``OUT/explain.json``; with another ``OUT`` nothing is written into the run.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import keras
import matplotlib
import numpy as np
import tensorflow as tf

from kerasfrac import runs
from kerasfrac.explain import gradcam, occlusion
from kerasfrac.explain.gradcam import layer_output
from kerasfrac.models import block_output_names, classifier, logit_layer_name
from kerasfrac.options import AscentOptions, ExplainOptions

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import patches  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

# Local imports of the data stage and runs: the figures' pure pieces import without them.

CLASS_SIGN = {"fractured": 1.0, "normal": -1.0}


# --------------------------------------------------------------------------- class visualization


def logit_model(model: keras.Model) -> keras.Model:
    """Sub-model input -> pre-sigmoid logit [B, 1] (shares the weights)."""
    return keras.Model(model.inputs[0], layer_output(model, logit_layer_name(model)))


def _gaussian_kernel(sigma: float, channels: int) -> tf.Tensor:
    radius = max(1, int(math.ceil(2 * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float32)
    k1 = np.exp(-0.5 * (x / sigma) ** 2)
    k1 /= k1.sum()
    k2 = np.outer(k1, k1)[:, :, None, None]
    return tf.constant(np.tile(k2, (1, 1, channels, 1)), tf.float32)


def blur(image: tf.Tensor, sigma: float) -> tf.Tensor:
    """Gaussian blur of [B, H, W, C] (reflect-padded, per channel)."""
    kernel = _gaussian_kernel(sigma, int(image.shape[-1]))
    r = (int(kernel.shape[0]) - 1) // 2
    padded = tf.pad(image, [[0, 0], [r, r], [r, r], [0, 0]], mode="REFLECT")
    return tf.nn.depthwise_conv2d(padded, kernel, [1, 1, 1, 1], "VALID")


def total_variation(image) -> float:
    """Mean absolute difference of neighbouring pixels (down and across) of [H, W, C] or
    [B, H, W, C]: low for smooth images, high for pixel noise."""
    x = np.asarray(image, np.float64)
    x = x[None] if x.ndim == 3 else x
    dy = np.abs(np.diff(x, axis=1)).mean()
    dx = np.abs(np.diff(x, axis=2)).mean()
    return float(dx + dy)


def make_ascent_step(model: keras.Model):
    """``step(image, sign, step_size, l2, tv) -> (new_image, logit_before)`` as a tf.function.

    The logit's gradient ``sign * d logit / d image`` is L2-normalised over the whole image
    and scaled by sqrt(pixels) (RMS 1 per pixel), so ``step_size`` is the RMS change per pixel
    and means the same at every image size; the penalties' gradients are then subtracted per
    pixel, on that same scale: ``l2 * 2 (image - 0.5)`` (pulls towards gray) and ``tv`` times
    the gradient of the summed total variation (sign of each neighbour difference: smooths
    pixel noise). The result is clipped to [0, 1] (the range the model was trained on).
    ``sign`` +1 drives the logit up ("fractured"), -1 down.
    """
    lm = logit_model(model)
    n_pixels = float(np.prod(model.inputs[0].shape[1:]))

    @tf.function(reduce_retracing=True)
    def step(image, sign, step_size, l2, tv):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(image)
            logit = tf.cast(lm(image, training=False)[:, 0], tf.float32)
            objective = sign * tf.reduce_mean(logit)
            variation = tf.reduce_sum(tf.abs(image[:, 1:] - image[:, :-1])) + tf.reduce_sum(
                tf.abs(image[:, :, 1:] - image[:, :, :-1])
            )
        grads = tf.math.l2_normalize(tape.gradient(objective, image)) * tf.sqrt(n_pixels)
        grads -= l2 * 2.0 * (image - 0.5) + tv * tape.gradient(variation, image)
        del tape
        return tf.clip_by_value(image + step_size * grads, 0.0, 1.0), logit

    return step


@dataclass
class ClassVis:
    target: str
    start: np.ndarray  # [H, W, C] float in [0, 1]
    result: np.ndarray
    logits: np.ndarray  # [steps + 1]: before the first step ... after the last

    @property
    def logit_before(self) -> float:
        return float(self.logits[0])

    @property
    def logit_after(self) -> float:
        return float(self.logits[-1])


def noise_image(shape, seed: int = 0) -> np.ndarray:
    """Gray noise around 0.5 (a start for ascent from nothing)."""
    rng = np.random.default_rng(seed)
    return (0.5 + 0.1 * rng.uniform(-1, 1, size=shape)).astype(np.float32)


def visualize_class(
    model: keras.Model,
    target: str = "fractured",
    start: np.ndarray | None = None,
    opts: AscentOptions | None = None,
    step=None,
) -> ClassVis:
    """Gradient ascent on the pixels of ``start`` (default: noise) towards ``target``.

    The weights are not changed (only the image is a variable of the ascent). ``step``: a
    step from ``make_ascent_step(model)`` to reuse across calls (avoids retracing).
    """
    opts = opts or AscentOptions()
    opts.check()
    if target not in CLASS_SIGN:
        raise ValueError(f"class-vis target must be one of {tuple(CLASS_SIGN)}; got {target!r}")
    shape = tuple(model.inputs[0].shape[1:])
    if start is None:
        start = noise_image(shape, opts.seed)
    start = np.asarray(start, np.float32)
    if start.shape != shape:
        raise ValueError(f"start image has shape {start.shape}; the model takes {shape}")
    step = step or make_ascent_step(model)
    lm = logit_model(model)
    rng = np.random.default_rng(opts.seed)
    image = tf.constant(start[None])
    sign = tf.constant(CLASS_SIGN[target])
    size, l2, tv = (tf.constant(float(v), tf.float32) for v in (opts.step_size, opts.l2, opts.tv))
    # Without jitter or blur the step's own logit (of the image before it) is the record;
    # with them the image changes outside the step, so each result is scored separately.
    exact = not opts.jitter and not opts.blur_every
    logits = [] if exact else [float(lm(image, training=False)[0, 0])]
    for i in range(opts.steps):
        shift = (
            [int(v) for v in rng.integers(-opts.jitter, opts.jitter + 1, 2)]
            if opts.jitter
            else None
        )
        if shift:
            image = tf.roll(image, shift=shift, axis=[1, 2])
        image, logit = step(image, sign, size, l2, tv)
        if shift:
            image = tf.roll(image, shift=[-shift[0], -shift[1]], axis=[1, 2])
        if opts.blur_every and (i + 1) % opts.blur_every == 0:
            image = blur(image, opts.blur_sigma)
        if exact:
            logits.append(float(logit[0]))
        else:
            logits.append(float(lm(image, training=False)[0, 0]))
    if exact:
        logits.append(float(lm(image, training=False)[0, 0]))
    return ClassVis(target, start, image.numpy()[0], np.array(logits, np.float64))


def deprocess_image(image: np.ndarray, stretch: bool = True) -> np.ndarray:
    """float [H, W, C] -> uint8 [H, W] (grayscale) or [H, W, 3] for display.

    ``stretch`` (keras-io): centre on the mean, scale to std 0.15 around gray 0.5, clip, so
    that faint patterns grown from noise become visible; otherwise clip [0, 1] as is.
    """
    x = np.asarray(image, np.float64)
    if stretch:
        x = (x - x.mean()) / (x.std() + 1e-5) * 0.15 + 0.5
    x = np.clip(x, 0.0, 1.0)
    x = (x * 255).round().astype(np.uint8)
    return x[..., 0] if x.shape[-1] == 1 else x


# --------------------------------------------------------------------------- feature maps


def feature_model(model: keras.Model, names: list[str] | None = None) -> keras.Model:
    """Sub-model input -> [output of each named layer] (default: every conv block output)."""
    names = list(names or block_output_names(model))
    if not names:
        raise ValueError(f"model {model.name!r} has no convolutional blocks to show")
    outputs = [layer_output(model, n) for n in names]
    return keras.Model(model.inputs[0], outputs, name="feature_maps")


def feature_maps(model: keras.Model, images, names: list[str] | None = None) -> dict:
    """``{layer name: float32 [B, h, w, K]}`` for a batch of images (inference mode)."""
    names = list(names or block_output_names(model))
    outs = feature_model(model, names)(tf.convert_to_tensor(images, tf.float32), training=False)
    if not isinstance(outs, list | tuple):
        outs = [outs]
    return {n: np.asarray(o, np.float32) for n, o in zip(names, outs)}


# --------------------------------------------------------------------------- figures


def _save(fig, path: Path, name: str = "", **adjust) -> Path:
    # Fixed margins instead of bbox_inches="tight": the tight box draws every figure twice,
    # which doubled the time of the feature-map grids (hundreds of axes).
    if name:  # the run and split (or image files) the figure is of
        fig.suptitle(name, fontsize=10)
    if fig.get_layout_engine() is None:  # constrained figures lay themselves out
        fig.subplots_adjust(**{"left": 0.02, "right": 0.98, "bottom": 0.03, "top": 0.9, **adjust})
    runs.save_figure(fig, path, dpi=90)
    plt.close(fig)
    return path


def _colorbar(fig, shown, ax, label: str, size: int = 7):
    """A colour bar for ``shown`` in a slot cut from the right of ``ax`` (kept in place when
    ``_save`` sets the margins, unlike ``fig.colorbar(ax=...)``)."""
    from mpl_toolkits.axes_grid1 import make_axes_locatable

    cax = make_axes_locatable(ax).append_axes("right", size="6%", pad=0.04)
    bar = fig.colorbar(shown, cax=cax)
    bar.set_label(label, fontsize=size)
    bar.ax.tick_params(labelsize=size - 1)
    return bar


def _show(ax, image, title: str = "", stretch: bool = False, size: int = 8, **kw) -> None:
    ax.imshow(deprocess_image(image, stretch), cmap="gray", vmin=0, vmax=255, **kw)
    ax.set_title(title, fontsize=size)
    ax.axis("off")


def class_vis_figure(path: Path, rows: list[tuple[str, ClassVis]], name: str = "") -> Path:
    """One row per ascent: start | result | result - start (colour bar) | logit per step."""
    fig, axes = plt.subplots(len(rows), 4, figsize=(12.5, 2.8 * len(rows)), squeeze=False)
    for (label, vis), ax in zip(rows, axes):
        reached = f"logit {vis.logit_before:+.1f} -> {vis.logit_after:+.1f}"
        _show(ax[0], vis.start, f"{label}\nstart, logit {vis.logit_before:+.1f}")
        _show(
            ax[1],
            vis.result,
            f"towards {vis.target}\nreached logit {vis.logit_after:+.1f}",
            stretch=True,
        )
        diff = (
            (vis.result - vis.start)[..., 0]
            if vis.result.shape[-1] == 1
            else ((vis.result - vis.start).mean(-1))
        )
        lim = float(np.abs(diff).max()) or 1.0
        shown = ax[2].imshow(diff, cmap="coolwarm", vmin=-lim, vmax=lim)
        ax[2].set_title(f"change (red brighter)\n{reached}", fontsize=8)
        ax[2].axis("off")
        _colorbar(fig, shown, ax[2], "pixel change")
        ax[3].plot(vis.logits)
        ax[3].set(xlabel="step", ylabel="logit")
        ax[3].set_title(f"logit per step: {reached}", fontsize=8)
        ax[3].tick_params(labelsize=7)
    height = 2.8 * len(rows)  # inches: margins for the suptitle and the last "step"
    return _save(
        fig,
        path,
        name,
        wspace=0.75,
        hspace=0.6,
        bottom=0.5 / height,
        top=1 - 0.85 / height,
        left=0.04,
    )


#: Channels per row of the feature-map figure; more channels wrap onto further rows.
FEATURE_COLUMNS = 8
#: Font size (points) of every label of the feature-map and CAM figures (90 dpi: ~10 px).
LABEL_SIZE = 8


def feature_maps_figure(
    path: Path,
    layer: str,
    images,
    maps: np.ndarray,
    titles: list[str],
    max_channels: int = 16,
    name: str = "",
) -> Path:
    """Per image a block of rows: the input, then its ``max_channels`` most active channels
    (``FEATURE_COLUMNS`` to a row, so the figure stays about 1,000 px wide at any
    ``max_channels``), on one colour scale per image (its colour bar: the activation)."""
    if max_channels < 1:
        raise ValueError(f"max_channels must be >= 1; got {max_channels}")
    k = min(max_channels, maps.shape[-1])
    cols = min(k, FEATURE_COLUMNS)
    sub = math.ceil(k / cols)  # rows per image
    n = len(images)
    fig, axes = plt.subplots(
        n * sub,
        cols + 1,
        figsize=(1.15 * (cols + 1.5) + 0.9, 1.3 * n * sub + 0.5),
        squeeze=False,
        layout="constrained",
        width_ratios=[1.5] + [1] * cols,  # room for the image's title
    )
    for ax in axes.flat:
        ax.axis("off")
    for i, (img, fmap, title) in enumerate(zip(images, maps, titles)):
        block = axes[i * sub : (i + 1) * sub]
        _show(block[0, 0], img, title, size=LABEL_SIZE)
        order = np.argsort(-fmap.mean(axis=(0, 1)))[:k]
        lo, hi = float(fmap[..., order].min()), float(fmap[..., order].max())
        shown = None
        for j, c in enumerate(order):
            ax = block[j // cols, 1 + j % cols]
            shown = ax.imshow(fmap[..., c], cmap="viridis", vmin=lo, vmax=hi)
            ax.set_title(f"channel {c}", fontsize=LABEL_SIZE)
        if shown is not None:
            bar = fig.colorbar(shown, ax=block[:, 1:].ravel().tolist(), shrink=0.9, pad=0.02)
            bar.set_label("activation", fontsize=LABEL_SIZE)
            bar.ax.tick_params(labelsize=LABEL_SIZE - 1)
    fig.get_layout_engine().set(w_pad=0.02, h_pad=0.04, wspace=0.02, hspace=0.02)
    return _save(fig, path, name)


def _draw_boxes(ax, boxes, shape) -> None:
    h, w = shape
    for ymin, xmin, ymax, xmax in np.asarray(boxes).reshape(-1, 4):
        ax.add_patch(
            patches.Rectangle(
                (xmin * w - 0.5, ymin * h - 0.5),
                (xmax - xmin) * w,
                (ymax - ymin) * h,
                fill=False,
                edgecolor="lime",
                linewidth=1.2,
            )
        )


def grad_cam_figure(
    path: Path, images, cams, titles, boxes=None, name: str = "", what: str = "Grad-CAM"
) -> Path:
    """Per image: the image (boxes in green) | the map's overlay (``what``: the method used,
    e.g. HiResCAM) with its maximum marked; one colour bar (the map as a fraction of its
    image's peak) and a legend of the box outlines and the peak marker."""
    n = len(images)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    # Constrained layout: the titles, the colour bar and its label and the legend below
    # get room of their own, however few images (one --images file was clipped).
    fig, axes = plt.subplots(
        rows,
        2 * cols,
        figsize=(2.4 * 2 * cols + 0.8, 2.7 * rows + 0.9),
        squeeze=False,
        layout="constrained",
    )
    for ax in axes.flat:
        ax.axis("off")
    for i, (img, cam, title) in enumerate(zip(images, cams, titles)):
        a0, a1 = axes[i // cols, 2 * (i % cols)], axes[i // cols, 2 * (i % cols) + 1]
        _show(a0, img, title)
        _show(a1, img, what)
        peak = float(cam.max())
        shown = a1.imshow(cam / peak if peak > 0 else cam, cmap="jet", alpha=0.45, vmin=0, vmax=1)
        if peak > 0:
            y, x = np.unravel_index(int(np.argmax(cam)), cam.shape)
            a1.plot([x], [y], "w+", markersize=10, markeredgewidth=2)
        if boxes is not None and boxes[i] is not None:
            _draw_boxes(a0, boxes[i], cam.shape)
            _draw_boxes(a1, boxes[i], cam.shape)
    if n:
        bar = fig.colorbar(shown, ax=axes.ravel().tolist(), shrink=0.8, pad=0.02)
        bar.set_label(f"{what} (share of peak)", fontsize=LABEL_SIZE)
        bar.ax.tick_params(labelsize=LABEL_SIZE - 1)
        handles = [Line2D([], [], color="w", marker="+", ls="", markersize=9, mew=2)]
        labels = [f"{what} peak"]
        if boxes is not None and any(b is not None and np.size(b) for b in boxes):
            handles.append(patches.Patch(fill=False, edgecolor="lime", linewidth=1.2))
            labels.append("fracture box")
        fig.legend(
            handles,
            labels,
            loc="outside lower center",
            ncol=len(labels),
            fontsize=LABEL_SIZE,
            facecolor="0.55",
        )
    return _save(fig, path, name)


def mean_cam_figure(
    path: Path, means: dict[str, np.ndarray], border: float, name: str = "", what="Grad-CAM"
) -> Path:
    """The average (per-image normalised) map per class (``what``: Grad-CAM, or the box
    head's heat map), the border band outlined."""
    fig, axes = plt.subplots(1, len(means), figsize=(3.4 * len(means), 3.4), squeeze=False)
    for ax, (cls, m) in zip(axes[0], means.items()):
        shown = ax.imshow(m, cmap="jet")
        _colorbar(fig, shown, ax, "share of the map's mass per pixel")
        h, w = m.shape
        by, bx = max(1, round(border * h)), max(1, round(border * w))
        ax.add_patch(
            patches.Rectangle(
                (bx - 0.5, by - 0.5),
                w - 2 * bx,
                h - 2 * by,
                fill=False,
                edgecolor="white",
                linestyle="--",
            )
        )
        ax.set_title(f"mean {what}: {cls}", fontsize=9)
        ax.axis("off")
    return _save(fig, path, name, wspace=0.45, hspace=0.45, top=0.82, right=0.9)


# --------------------------------------------------------------------------- images to explain


@dataclass
class Example:
    image: np.ndarray  # [S, S, C] float in [0, 1]
    image_id: str
    label: int  # 1 fractured, 0 normal, -1 unknown (a file given with --images)
    boxes: np.ndarray | None = None  # [N, 4] normalised in the input frame


def load_image_files(paths, data_cfg, log=print) -> list[Example]:
    """Decode and prepare image files like the evaluation pipeline; undecodable files are
    reported (through ``log``) and skipped."""
    from kerasfrac.data import preprocess

    out = []
    for p in paths:
        p = Path(p)
        try:
            encoded = tf.io.read_file(str(p))
            image = preprocess(encoded, data_cfg.image_size, data_cfg.grayscale, data_cfg.resize)
        except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError, ValueError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            log(f"skipped {str(p)!r}: cannot decode it as an image ({reason[:120]})")
            continue
        out.append(Example(image.numpy(), p.name, -1))
    return out


def split_batches(data_cfg, build, split: str, batch_size: int):
    """Batches of ``(images, labels, ids, boxes, outlines)`` of a split in read order: the
    images of ``data.make_eval_dataset``; the boxes of ``data.split_records`` as a list of
    [N, 4] arrays and their fracture outlines as a list (per image) of [P, 2] (y, x) arrays,
    both in the model's input frame (mapped through ``data.resize``)."""
    from kerasfrac import data

    build = data.check_build(build)
    records = data.split_records(build, split)
    size, resize = data_cfg.image_size, data_cfg.resize
    start = 0
    for batch in data.make_eval_dataset(build, split, data_cfg, batch_size, True):
        images, labels, ids = batch["image"], batch["label"], batch["id"]
        end = start + len(ids)
        frames = list(zip(records.heights[start:end], records.widths[start:end]))
        frame_boxes = [
            gradcam.boxes_to_input_frame(b, int(h), int(w), size, resize)
            for b, (h, w) in zip(records.boxes[start:end], frames)
        ]
        outlines = [
            [gradcam.points_to_input_frame(p, int(h), int(w), size, resize) for p in polys]
            for polys, (h, w) in zip(records.polygons[start:end], frames)
        ]
        yield (
            images.numpy(),
            labels.numpy().astype(int),
            [i.decode() for i in ids.numpy()],
            frame_boxes,
            outlines,
        )
        start = end


def pick_examples(data_cfg, build, split: str, n: int) -> list[Example]:
    """The first ``n`` images of a split, half fractured (those with boxes first) and half
    normal where the split has them."""
    fractured, boxed, normal = [], [], []
    for images, labels, ids, boxes, _ in split_batches(data_cfg, build, split, 32):
        for img, y, i, b in zip(images, labels, ids, boxes):
            ex = Example(img, i, int(y), b if len(b) else None)
            (normal if y == 0 else boxed if len(b) else fractured).append(ex)
        if len(boxed) >= n and len(normal) >= n:
            break
    pos = (boxed + fractured)[: max(n - n // 2, n - len(normal))]
    return pos + normal[: n - len(pos)]


# --------------------------------------------------------------------------- the command


CLASS_NAMES = {1: "fractured", 0: "normal", -1: "unlabelled"}


def _title(ex: Example, prob: float | None = None) -> str:
    """The image and its label ("unlabelled" for a file given with --images); with
    ``prob``, the prediction (at 0.5) and its probability."""
    label = "unlabelled" if ex.label < 0 else f"label {CLASS_NAMES[ex.label]}"
    if prob is None:
        return f"{ex.image_id[:18]}\n{label}"
    return (
        f"{ex.image_id[:18]}\n{label}, predicted {CLASS_NAMES[int(prob >= 0.5)]}\n"
        f"p(fractured) {prob:.2f}"
    )


def _signs(target: str, labels, logits) -> np.ndarray:
    labels = np.asarray(labels)
    if target == "label" and (labels < 0).any():  # files without labels: their prediction
        lab = gradcam.target_signs("label", np.maximum(labels, 0))
        pred = gradcam.target_signs("predicted", labels, logits)
        return np.where(labels < 0, pred, lab).astype(np.float32)
    return gradcam.target_signs(target, labels, logits)


def _cams(cam: gradcam.GradCam, images, labels, target: str) -> tuple[np.ndarray, np.ndarray]:
    """Maps and logits of a batch, for the target chosen per image."""
    logits = None
    if target == "predicted" or (target == "label" and (np.asarray(labels) < 0).any()):
        cam(images, 1.0)
        logits = cam.last_logits
    maps = cam(images, _signs(target, labels, logits))
    return maps, cam.last_logits


def audit_split(
    model, data_cfg, build, split: str, opts: ExplainOptions, cam: gradcam.GradCam = None
) -> tuple[dict, dict[str, np.ndarray]]:
    """The audit block of explain.json and the mean normalised map per class."""
    cam = cam or gradcam.GradCam(model, opts.cam_layer, opts.cam_method)
    shape = (data_cfg.image_size, data_cfg.image_size)
    audit = gradcam.Audit(shape, opts.border, opts.corner, opts.tolerance)
    sums = {"fractured": np.zeros(shape), "normal": np.zeros(shape)}
    counts = {"fractured": 0, "normal": 0}
    has_boxes = False
    for images, labels, ids, boxes, outlines in split_batches(
        data_cfg, build, split, opts.batch_size
    ):
        maps, _ = _cams(cam, images, labels, opts.cam_target)
        for m, y, i, b, o in zip(maps, labels, ids, boxes, outlines):
            has_boxes |= len(b) > 0
            audit.add(m, int(y), b if len(b) else None, i, outlines=o)
            if m.max() > 0:
                key = "fractured" if y == 1 else "normal"
                sums[key] += m / m.sum()
                counts[key] += 1
    result = audit.result(has_boxes)
    result.update(
        split=split,
        cam_layer=cam.layer_name,
        cam_method=cam.method,
        cam_target=opts.cam_target,
    )
    means = {k: sums[k] / counts[k] for k in sums if counts[k]}
    return result, means


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def summary(result: dict) -> str:
    """Human-readable lines of the audit block."""
    kind = gradcam.map_kind(result["cam_method"])
    lines = [
        f"{kind} audit ({result['cam_method']} on {result['cam_layer']}, {result['split']} "
        f"split, {result['n_images']} images, {result['n_zero_maps']} all-zero maps):",
        f"  border share (outer {result['border_width']:.0%} band; uniform map "
        f"{result['border_share_uniform']:.3f}): all {_fmt(result['border_share'])}"
        + "".join(f", {name} {_fmt(c['border_share'])}" for name, c in result["per_class"].items()),
        "  corner shares (uniform "
        f"{result['corner_share_uniform']:.3f}): "
        + ", ".join(f"{k} {_fmt(v)}" for k, v in result["corner_shares"].items()),
    ]
    pg = result["pointing_game"]
    if not pg["available"]:
        lines.append(f"  pointing game: not available: {pg['reason']}")
    else:
        ci = pg.get("hit_rate_ci95")
        cci = pg.get("centre_baseline_ci95")
        lines.append(
            f"  pointing game ({pg['n_played']} fractured images with boxes, "
            f"{pg.get('n_empty_maps_counted_as_misses', 0)} empty maps counted as misses): hit "
            f"rate {_fmt(pg['hit_rate'])}"
            + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
            + f" vs chance {_fmt(pg['chance_rate'])} and a map peaking at the image centre "
            f"{_fmt(pg.get('centre_baseline_hit_rate'))}"
            + (f" [{cci[0]:.3f}, {cci[1]:.3f}]" if cci else "")
            + f"; {kind} mass in boxes {_fmt(pg['box_mass_share'])}"
        )
        loc = pg.get("localisation")
        if loc and pg["n_played"]:
            tops = ", ".join(
                f"IoU >= {k.rsplit('_', 1)[1]} {_fmt(v['rate'])} [{v['ci95'][0]:.3f}, "
                f"{v['ci95'][1]:.3f}]"
                for k, v in loc.items()
                if k.startswith("top1_hit_iou_")
            )
            lines.append(
                f"  localisation (map cut at {loc['threshold']:g} x its peak, against the boxes):"
                f" Dice {_fmt(loc['dice']['mean'])}, IoU {_fmt(loc['iou']['mean'])}; its top-1 "
                f"region finds a box at {tops}"
            )
            traced = loc.get("outlines") or {}
            if traced.get("n"):
                lines.append(
                    f"  against the fractures' outlines ({traced['n']} images): Dice "
                    f"{_fmt(traced['dice']['mean'])}, IoU {_fmt(traced['iou']['mean'])}"
                )
    return "\n".join(lines)


def verdict(result: dict) -> str:
    """One line for the end of `kerasfrac explain`: whether the map's peak points at the
    fracture beyond chance and beyond a map peaking at the image centre (the lower bound of
    the hit rate's 95% CI above each rate), and the occlusion test's verdict where it ran."""
    a = result.get("audit")
    if not a:
        return "verdict: none (the audit did not run; `--what audit` gives one)"
    parts = [_pointing_verdict(a)]
    if result.get("box_map_audit"):
        parts.append(_pointing_verdict(result["box_map_audit"]))
    occ = result.get("occlusion")
    if occ and occ.get("available"):
        parts.append(
            "occlusion: the classifier relies on the fracture region"
            if occ["reads_the_fracture_region"]
            else "occlusion: NOT shown to rely on the fracture region"
        )
    return "verdict: " + "; ".join(parts)


def _pointing_verdict(a: dict) -> str:
    """Whether one audited map points at the fracture (``verdict``'s part for it)."""
    kind = gradcam.map_kind(a["cam_method"])
    pg = a["pointing_game"]
    if not pg["available"]:
        return f"pointing game not played ({pg['reason']})"
    if pg.get("hit_rate") is None:
        return "pointing game not played (no fractured image with a box in the split)"
    ci = pg.get("hit_rate_ci95")
    low = ci[0] if ci else pg["hit_rate"]
    chance, centre = pg["chance_rate"], pg.get("centre_baseline_hit_rate")
    beats_chance = chance is not None and low > chance
    beats_centre = centre is None or low > centre
    how = (
        f"(hit rate {pg['hit_rate']:.3f}, 95% CI from {low:.3f}; chance {_fmt(chance)}, "
        f"centre {_fmt(centre)})"
    )
    if beats_chance and beats_centre:
        said = f"{kind} points at the fracture beyond chance and the centre baseline"
    elif beats_chance:
        said = f"{kind} points at the fracture beyond chance but NOT beyond a centre peak"
    else:
        said = f"{kind} does NOT point at the fracture beyond chance"
    return f"{said} {how}"


def explain_run(
    run_dir: str | Path,
    opts: ExplainOptions | None = None,
    image_files: list[str] | None = None,
    out: str | Path | None = None,
    model_path: str | Path | None = None,
    log=print,
) -> dict:
    """Run the chosen parts on a run directory; return what explain.json holds. Writes only
    into ``out``, and into the run's TensorBoard where ``out`` is the default (RUN/explain)."""
    opts = opts or ExplainOptions()
    opts.check()
    with runs.run_lock(run_dir, exclusive=False, command="explain"):  # no train meanwhile
        return _explain_run(Path(run_dir), opts, image_files, out, model_path, log)


def _explain_run(run_dir: Path, opts: ExplainOptions, image_files, out, model_path, log) -> dict:
    from kerasfrac import data

    # boxmap reads the box head, which a checkpoint keeps (model.keras holds the classifier)
    cfg, full, path = runs.load_model(run_dir, model_path, box_head=opts.cam_method == "boxmap")
    in_run = out is None  # --out elsewhere: nothing is written into the run
    out = Path(out) if out else run_dir / runs.EXPLAIN
    out.mkdir(parents=True, exist_ok=True)
    build = data.check_build(cfg.data.dir, cfg.dataset)  # the manifest, read once
    examples = _examples(opts, cfg, build, image_files, log)
    # Every figure names the run and where its images come from.
    n = len(image_files or [])
    where = f"{n} image file{'s' * (n != 1)}" if image_files else f"{opts.split} split"
    ctx = _Context(
        opts=opts,
        cfg=cfg,
        build=build,
        full=full,
        model=classifier(full),
        examples=examples,
        out=out,
        figure_name=f"{runs.run_name(run_dir)}, {where}",
        split_name=f"{runs.run_name(run_dir)}, {opts.split} split",
        cam=gradcam.GradCam(full, opts.cam_layer, opts.cam_method)
        if {"grad-cam", "audit"} & set(opts.what)
        else None,
        log=log,
        box_full=_box_model(run_dir, opts, model_path),
    )
    result: dict = {
        "run_dir": str(run_dir),
        "model": str(path),
        "options": {k: v for k, v in asdict(opts).items() if k != "ascent"},
        "images": [e.image_id for e in examples],
    }
    pngs: list[Path] = []
    for part, make in _PARTS.items():
        if part in opts.what:
            pngs += make(ctx, result)
    if pngs and in_run:
        runs.log_images(run_dir, "explain", pngs)
    result["figures"] = [str(p) for p in pngs]
    result = _write_json(out / "explain.json", result, path)
    if in_run:  # the run's report.html shows explain's part beside the evaluation
        from kerasfrac.evaluation import html

        result["report_html"] = str(html.write_run_report(run_dir))
    return result


def _box_model(run_dir: Path, opts: ExplainOptions, model_path) -> keras.Model | None:
    """The run's box_model.keras (classifier plus box or mask head) where the Grad-CAM
    figure and the audit show the classifier's own map: both then show the box or mask map
    beside it (``boxmap.png``; the audit localises both)."""
    if not {"audit", "grad-cam"} & set(opts.what):
        return None
    if opts.cam_method == "boxmap" or model_path is not None:
        return None
    if not runs.box_model_path(run_dir).is_file():
        return None
    return runs.load_model(run_dir, None, box_head=True)[1]


@dataclass
class _Context:
    """What every part of ``explain_run`` reads."""

    opts: ExplainOptions
    cfg: object
    build: object
    full: keras.Model
    model: keras.Model
    examples: list[Example]
    out: Path
    figure_name: str
    split_name: str
    cam: gradcam.GradCam | None
    log: object
    #: The model with its box (or mask) head where the run saved one and the Grad-CAM figure
    #: and the audit show the classifier's map: both then also show the box heat map
    #: (``box_cam``, made once for both).
    box_full: keras.Model | None = None
    box_cam: gradcam.GradCam | None = field(init=False, default=None)

    def __post_init__(self):
        if self.box_full is not None:
            self.box_cam = gradcam.GradCam(self.box_full, None, "boxmap")

    def images(self) -> np.ndarray | None:
        """The examples' images as one array (stacked anew: call once per part)."""
        return np.stack([e.image for e in self.examples]) if self.examples else None


def _examples(opts, cfg, build, image_files, log) -> list[Example]:
    """The images the figures show: ``--images`` files, else ``n_images`` of the split."""
    if not {"class-vis", "feature-maps", "grad-cam"} & set(opts.what):
        return []
    if not image_files:
        return pick_examples(cfg.data, build, opts.split, opts.n_images)
    examples = load_image_files(image_files, cfg.data, log)
    if not examples:
        raise ValueError(
            f"none of the {len(image_files)} --images files could be decoded; pass "
            "JPEG/PNG/BMP/GIF files"
        )
    return examples


def _class_vis_part(ctx: _Context, result: dict) -> list[Path]:
    opts, model = ctx.opts, ctx.model
    weights_before = [w.copy() for w in model.get_weights()]
    step = make_ascent_step(model)
    rows, vis_json = [], []
    starts = [(None, "noise")] + [(e.image, e.image_id) for e in ctx.examples[: opts.vis_images]]
    for start, name in starts:
        for target in ("fractured", "normal"):
            vis = visualize_class(model, target, start, opts.ascent, step)
            rows.append((name[:24], vis))
            vis_json.append(
                {
                    "start": name,
                    "target": target,
                    "logit_before": vis.logit_before,
                    "logit_after": vis.logit_after,
                }
            )
    png = class_vis_figure(ctx.out / "class_vis.png", rows, ctx.figure_name)
    result["class_vis"] = {"ascent": asdict(opts.ascent), "runs": vis_json}
    changed = any(not np.array_equal(a, b) for a, b in zip(weights_before, model.get_weights()))
    if changed:  # pragma: no cover - a bug guard, not a user error
        raise RuntimeError("class visualization changed the model weights")
    return [png]


def _feature_maps_part(ctx: _Context, result: dict) -> list[Path]:
    shown = ctx.examples[: min(len(ctx.examples), 4)]
    maps = feature_maps(ctx.model, np.stack([e.image for e in shown]), ctx.opts.feature_layers)
    pngs = [
        feature_maps_figure(
            ctx.out / f"feature_maps_{name}.png",
            name,
            [e.image for e in shown],
            m,
            [_title(e) for e in shown],
            ctx.opts.max_channels,
            f"{ctx.figure_name}: feature maps of {name}",
        )
        for name, m in maps.items()
    ]
    result["feature_maps"] = {n: list(m.shape[1:]) for n, m in maps.items()}
    return pngs


def _grad_cam_part(ctx: _Context, result: dict) -> list[Path]:
    examples, target = ctx.examples, ctx.opts.cam_target
    images = ctx.images()
    labels = [e.label for e in examples]
    maps, logits = _cams(ctx.cam, images, labels, target)
    probs = 1 / (1 + np.exp(-logits))
    titles = [_title(e, p) for e, p in zip(examples, probs)]
    boxes = [e.boxes for e in examples]

    def figure(name: str, cam_maps, method: str, suffix: str = "") -> Path:
        kind = gradcam.map_kind(method)
        title = f"{ctx.figure_name}: {kind}{suffix}"
        return grad_cam_figure(ctx.out / name, images, cam_maps, titles, boxes, title, kind)

    pngs = [figure("grad_cam.png", maps, ctx.cam.method, f" ({target} class)")]
    if ctx.box_full is not None:
        # a model with a box or mask head: its own map of the same images beside the classifier's
        pngs.append(figure("boxmap.png", _cams(ctx.box_cam, images, labels, target)[0], "boxmap"))
    return pngs


def _audit_part(ctx: _Context, result: dict) -> list[Path]:
    opts, cam = ctx.opts, ctx.cam
    audit, means = audit_split(ctx.model, ctx.cfg.data, ctx.build, opts.split, opts, cam)
    result["audit"] = audit
    pngs = []
    if means:
        name = "boxmap_mean.png" if cam.method == "boxmap" else "grad_cam_mean.png"
        pngs.append(
            mean_cam_figure(
                ctx.out / name, means, opts.border, ctx.split_name, gradcam.map_kind(cam.method)
            )
        )
    ctx.log(summary(audit))
    if ctx.box_full is not None and audit["pointing_game"]["available"]:
        # the box (or mask) head's own map, localised on the same images
        box_audit, box_means = audit_split(
            ctx.box_full, ctx.cfg.data, ctx.build, opts.split, opts, ctx.box_cam
        )
        result["box_map_audit"] = box_audit
        if box_means:
            pngs.append(
                mean_cam_figure(
                    ctx.out / "boxmap_mean.png",
                    box_means,
                    opts.border,
                    ctx.split_name,
                    gradcam.map_kind("boxmap"),
                )
            )
        ctx.log(summary(box_audit))
    if audit["pointing_game"]["available"]:  # the split has boxes: fill them in
        from kerasfrac import data

        records = data.split_records(ctx.build, opts.split)
        result["occlusion"] = occlusion.occlusion_test(
            ctx.model,
            split_batches(ctx.cfg.data, ctx.build, opts.split, opts.batch_size),
            border=opts.border,
            groups=dict(zip(records.ids, records.groups)),
            seed=0,
            batch_size=opts.batch_size,
        )
        ctx.log(occlusion.summary(result["occlusion"]))
    return pngs


#: The parts of ``kerasfrac explain --what``, in the order they run.
_PARTS = {
    "class-vis": _class_vis_part,
    "feature-maps": _feature_maps_part,
    "grad-cam": _grad_cam_part,
    "audit": _audit_part,
}


def _write_json(json_path: Path, result: dict, model_path) -> dict:
    """explain.json: this run's result, beside the audits of earlier runs (one entry per
    split, model, layer, method and target, side by side)."""
    result["audits"] = _earlier_audits(json_path)
    if "audit" in result:
        a = result["audit"]
        key = f"{a['split']}|{model_path}|{a['cam_layer']}|{a['cam_method']}|{a['cam_target']}"
        result["audits"][key] = a
    runs.write_text(json_path, json.dumps(result, indent=2, default=_json_default) + "\n")
    result["json"] = str(json_path)
    return result


def _earlier_audits(json_path: Path) -> dict:
    """The ``audits`` an earlier explain.json in this folder kept (its own ``audit`` too, for
    files written before ``audits`` existed), so that runs of other splits, models or layers
    are kept beside this one instead of overwritten."""
    if not json_path.is_file():
        return {}
    try:
        old = json.loads(json_path.read_text())
    except json.JSONDecodeError:
        return {}
    audits = dict(old.get("audits") or {})
    a = old.get("audit")
    if a and not audits:
        key = f"{a.get('split')}|{old.get('model')}|{a.get('cam_layer')}|{a.get('cam_method')}|"
        audits[key + str(a.get("cam_target"))] = a
    return audits


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def main(run_dir, opts: ExplainOptions, image_files=None, out=None, model_path=None) -> int:
    """``kerasfrac explain``: see ``cli.add_explain``."""
    result = explain_run(
        run_dir,
        opts,
        image_files,
        out,
        model_path,
        log=lambda m: print(m, file=sys.stderr if m.startswith("skipped") else sys.stdout),
    )
    for f in result["figures"]:
        print(f"figure: {f}")
    print(f"written: {result['json']}")
    if result.get("report_html"):
        print(f"updated: {result['report_html']} (explanations added)")
    print(verdict(result))
    return 0
