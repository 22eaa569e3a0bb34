"""The patch study: can the fracture itself be learned from these images, at this resolution?

A full-image classifier can score well on FracAtlas from the acquisition context alone (issue
37: the occlusion test shows no reliance on the fracture region). This probe asks the question
underneath: from each fractured image with fracture boxes, one crop centred on each box
(label 1) and one control crop of the same size from the same image (label 0), on bone (the
free window whose mean intensity is closest to the fracture crop's, overlapping no box:
``occlusion.control_window``). Both classes come from the same images, so nothing outside
the crop (hardware, view, body region, image size, burnt-in letters elsewhere) can tell them
apart: only the crop's content. A small CNN is trained on the train split's crops and scored
on another split's crops (AUROC with a CI resampling images).

The crop covers the same share of the image (``PATCH_SHARE`` of the side) whatever
``image_size``, so that comparing image sizes compares resolutions of the same field of view.
High AUROC: the fracture is learnable from this data at this resolution, and a full-image
model that ignores it has an attention problem, not an information problem. Near 0.5: it is
not, and more data, pretraining or resolution would be needed first.

    python -m kerasfrac.explain.patches --data-dir BUILD --image-size 320 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

#: The crop's side as a share of the image side (48 px at 320 px; FracAtlas' median fracture
#: box is about 24 px long at 320 px).
PATCH_SHARE = 0.15
#: Control crops keep out of this border band (burnt-in letters and markers), where they can.
BORDER = 0.05


def patch_size(image_size: int) -> int:
    return max(8, int(round(PATCH_SHARE * image_size)))


def _crop(image: np.ndarray, cy: float, cx: float, p: int) -> tuple[np.ndarray, tuple]:
    h, w = image.shape[:2]
    y0 = int(np.clip(round(cy - p / 2), 0, h - p))
    x0 = int(np.clip(round(cx - p / 2), 0, w - p))
    return image[y0 : y0 + p, x0 : x0 + p], (y0, x0, y0 + p, x0 + p)


def crops(
    build_dir, split: str, image_size: int, resize: str = "pad", normals: int = 0, seed: int = 0
) -> dict:
    """``{"x" [N, p, p, 1] float32, "y" [N], "group" [N] (image id), "region" [N] (the
    image's body region, ``metrics.body_region``; None without region columns)}``: every box's crop
    (1) and one control crop per box from the same image (0), of the fractured images of
    ``split`` that have boxes; with ``normals``, also that many crops at random places of each
    normal image (0: anywhere, borders and letters included, as a scan of the whole image
    meets them). Images decoded as training decodes them (``image_size``, ``resize``)."""
    rng = np.random.default_rng(seed)
    from kerasfrac import config, data
    from kerasfrac.explain import occlusion
    from kerasfrac.explain.gradcam import boxes_to_input_frame

    records = data.split_records(build_dir, split)
    cfg = config.DataConfig(dir=str(build_dir), image_size=image_size, resize=resize)
    p = patch_size(image_size)
    xs, ys, groups = [], [], []
    ds = data.make_eval_dataset(build_dir, split, cfg, 32)
    images = (im for batch in ds for im in batch["image"].numpy())
    for i, image in enumerate(images):
        boxes = records.boxes[i]
        if records.labels[i] == 0:
            for _ in range(normals):
                y0, x0 = rng.integers(0, image_size - p + 1, size=2)
                xs.append(image[y0 : y0 + p, x0 : x0 + p, :1])
                ys.append(0)
                groups.append(records.ids[i])
        if records.labels[i] != 1 or len(boxes) == 0:
            continue
        frame = boxes_to_input_frame(
            boxes, records.heights[i], records.widths[i], image_size, resize
        )
        gray = image.mean(axis=-1)
        taken = occlusion.grown_boxes(frame, gray.shape)
        for ymin, xmin, ymax, xmax in frame:
            cy, cx = (ymin + ymax) / 2 * image_size, (xmin + xmax) / 2 * image_size
            patch, _ = _crop(image, cy, cx, p)
            window = occlusion.control_window(gray, (p, p), float(patch.mean()), taken, BORDER)
            if window is None:
                continue
            y0, x0, y1, x1 = window
            for crop, label in ((patch, 1), (image[y0:y1, x0:x1], 0)):
                xs.append(crop[..., :1])
                ys.append(label)
                groups.append(records.ids[i])
    if not xs:
        raise ValueError(
            f"the {split!r} split of {str(build_dir)!r} has no fractured image with fracture "
            "boxes: the patch study needs a build with boxes (FracAtlas, or --boxes)"
        )
    from kerasfrac.evaluation.metrics import body_region

    regions = body_region(records.meta)
    at = {image_id: k for k, image_id in enumerate(records.ids)}
    region = [None if regions is None else regions[at[g]] for g in groups]
    return {
        "x": np.stack(xs).astype("float32"),
        "y": np.array(ys),
        "group": np.array(groups),
        "region": np.array(region, dtype=object),
    }


def keep_fractured_images(c: dict, fraction: float, seed: int = 0) -> dict:
    """``crops``' result with the crops of only ``fraction`` of its fractured images (their
    fracture crops and controls, drawn at random), every other crop (normal images') kept:
    the study's learning curve over the number of boxed fractures it trains on."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"train fraction {fraction} must be in (0, 1]: the share of boxed images")
    fractured = np.unique(c["group"][c["y"] == 1])
    rng = np.random.default_rng(seed)
    n = max(1, int(round(fraction * fractured.size)))
    dropped = np.setdiff1d(fractured, rng.choice(fractured, size=n, replace=False))
    keep = ~np.isin(c["group"], dropped)
    return {k: v[keep] for k, v in c.items()}


def probe(p: int, seed: int = 0):
    """The small CNN the study trains: four 3x3 conv blocks (32, 64, 128, 128 channels, BN,
    ReLU, max-pooling after the first three), global average pooling, dropout 0.3, a logit."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((p, p, 1))
    x = inputs
    for i, width in enumerate((32, 64, 128, 128)):
        x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.ReLU()(x)
        if i < 3:
            x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.3)(x)
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(x))
    model.compile(optimizer=keras.optimizers.AdamW(1e-3, weight_decay=0.05), loss="bce")
    return model


def _augment(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random flips and quarter turns (a fracture has no preferred orientation in a crop)."""
    out = np.empty_like(x)
    for i, im in enumerate(x):
        im = np.rot90(im, rng.integers(4))
        out[i] = im[:, ::-1] if rng.random() < 0.5 else im
    return out


def _train(model, x: np.ndarray, y: np.ndarray, epochs: int, rng: np.random.Generator) -> None:
    """``epochs`` passes over the crops, each freshly flipped and turned (``_augment``), the
    classes weighted to count alike (1 and 1 where they are balanced already)."""
    pos = float(y.mean())
    weights = {0: 0.5 / (1 - pos), 1: 0.5 / pos}
    for _ in range(epochs):
        model.fit(_augment(x, rng), y, batch_size=32, epochs=1, verbose=0, class_weight=weights)


def study(
    build_dir,
    image_size: int,
    *,
    epochs: int = 30,
    seed: int = 0,
    eval_split: str = "val",
    resize: str = "pad",
    train_fraction: float = 1.0,
) -> dict:
    """Train the probe on the train split's crops (of ``train_fraction`` of its boxed images,
    ``keep_fractured_images``), score ``eval_split``'s; returns the counts, the AUROC with its
    CI (resampling images) and the time taken."""
    from kerasfrac.evaluation import metrics

    start = time.perf_counter()
    train, test = (crops(build_dir, s, image_size, resize) for s in ("train", eval_split))
    train = keep_fractured_images(train, train_fraction, seed)
    p = patch_size(image_size)
    model = probe(p, seed)
    rng = np.random.default_rng(seed)
    _train(model, train["x"], train["y"], epochs, rng)
    scores = model.predict(test["x"], batch_size=64, verbose=0).ravel()
    ci = metrics.auroc_ci(test["y"], scores, groups=test["group"])
    fit = model.predict(train["x"], batch_size=64, verbose=0).ravel()
    by_region = {}
    for region in sorted({r for r in test["region"] if r is not None}):
        keep = test["region"] == region
        r = metrics.auroc_ci(test["y"][keep], scores[keep], groups=test["group"][keep])
        by_region[region] = {"auroc": r["auroc"], "ci95": r["ci95"], "crops": int(keep.sum())}
    return {
        "image_size": image_size,
        "patch": p,
        "epochs": epochs,
        "seed": seed,
        "eval_split": eval_split,
        "train_fraction": train_fraction,
        "train_crops": int(train["y"].size),
        "train_fractures": int(train["y"].sum()),
        "train_images": int(np.unique(train["group"]).size),
        "eval_crops": int(test["y"].size),
        "eval_images": int(np.unique(test["group"]).size),
        "train_auroc": metrics.auroc(train["y"], fit),
        "auroc": ci["auroc"],
        "ci95": ci["ci95"],
        "by_region": by_region,
        "seconds": round(time.perf_counter() - start, 1),
    }


#: The scan's step between crops, in pixels.
SCAN_STRIDE = 8


def crop_maps(model, images: np.ndarray, stride: int = SCAN_STRIDE) -> np.ndarray:
    """[B, h, w]: the probe's probability for the crop at every place of each image ([B, S,
    S, 1]), crops ``stride`` px apart, each cut out and scored as in training (a crop's own
    borders, not the image around it: a fully convolutional pass would see beyond them)."""
    import tensorflow as tf

    p = int(model.input_shape[1])
    out = []
    for image in images:
        cut = tf.image.extract_patches(
            image[None], [1, p, p, 1], [1, stride, stride, 1], [1, 1, 1, 1], "VALID"
        )[0]
        h, w = int(cut.shape[0]), int(cut.shape[1])
        probs = model.predict(tf.reshape(cut, [-1, p, p, 1]), batch_size=1024, verbose=0)
        out.append(np.asarray(probs).reshape(h, w))
    return np.stack(out)


def _hard_negatives(model, build_dir, cfg, n_images: int, per_image: int, rng) -> np.ndarray:
    """The ``per_image`` highest-scoring crops (``crop_maps``) of ``n_images`` normal training
    images drawn at random: the places the probe takes for fractures where there are none."""
    from kerasfrac import data

    records = data.split_records(build_dir, "train")
    normal = np.flatnonzero(records.labels == 0)
    keep = set(rng.choice(normal, size=min(n_images, normal.size), replace=False).tolist())
    p = int(model.input_shape[1])
    out = []
    images = (im for b in data.make_eval_dataset(build_dir, "train", cfg, 32) for im in b["image"])
    for i, image in enumerate(images):
        if i not in keep:
            continue
        image = image.numpy()[..., :1]
        scores = crop_maps(model, image[None])[0]
        for k in np.argsort(scores.ravel())[::-1][:per_image]:
            y0, x0 = (np.array(divmod(int(k), scores.shape[1])) * SCAN_STRIDE).tolist()
            out.append(image[y0 : y0 + p, x0 : x0 + p])
    return np.stack(out).astype("float32")


def image_study(
    build_dir,
    image_size: int,
    *,
    epochs: int = 30,
    seed: int = 0,
    eval_split: str = "val",
    resize: str = "pad",
    normals: int = 2,
    mine: int = 0,
    mined_per_image: int = 3,
    train_fraction: float = 1.0,
) -> dict:
    """A classifier that sees nothing but crops: the probe trained on fracture crops against
    controls and random crops of normal images (``normals`` each), then slid over every
    ``eval_split`` image (``crop_maps``), the image's score its highest crop. With ``mine``:
    one round of hard-negative mining first (the ``mined_per_image`` highest-scoring crops of
    ``mine`` normal training images join the negatives, and the probe trains on for half the
    epochs). Returns its image AUROC beside the no-anatomy baseline, overall and within body
    region and hands (``evaluate.baseline_comparison``), and each image's score by id.
    ``train_fraction``: the fracture crops of only that share of the boxed training images
    (``keep_fractured_images``; normal images' crops all kept)."""
    from kerasfrac import config, data
    from kerasfrac.evaluation import evaluate

    start = time.perf_counter()
    train = crops(build_dir, "train", image_size, resize, normals=normals, seed=seed)
    train = keep_fractured_images(train, train_fraction, seed)
    model = probe(patch_size(image_size), seed)
    rng = np.random.default_rng(seed)
    cfg = config.DataConfig(dir=str(build_dir), image_size=image_size, resize=resize)
    _train(model, train["x"], train["y"], epochs, rng)
    mined = 0
    if mine:
        hard = _hard_negatives(model, build_dir, cfg, mine, mined_per_image, rng)
        mined = len(hard)
        x = np.concatenate([train["x"], hard])
        y = np.concatenate([train["y"], np.zeros(len(hard), train["y"].dtype)])
        _train(model, x, y, max(1, epochs // 2), rng)
    ds = data.make_eval_dataset(build_dir, eval_split, cfg, 32, with_ids=True)
    ids, labels, scores = [], [], []
    for batch in ds:
        scores.append(crop_maps(model, batch["image"].numpy()[..., :1]).max(axis=(1, 2)))
        labels.append(batch["label"].numpy())
        ids += [i.decode() for i in batch["id"].numpy()]
    records = data.split_records(build_dir, eval_split)
    comparison = evaluate.baseline_comparison(
        build_dir,
        eval_split,
        ids,
        np.concatenate(labels).astype(int),
        np.concatenate(scores),
        groups=records.groups,
    )
    return {
        "image_size": image_size,
        "patch": patch_size(image_size),
        "eval_split": eval_split,
        "train_fraction": train_fraction,
        "train_crops": int(train["y"].size),
        "train_fractures": int(train["y"].sum()),
        "mined_negatives": mined,
        "comparison": comparison,
        "scores": dict(zip(ids, np.concatenate(scores).astype(float).tolist(), strict=True)),
        "seconds": round(time.perf_counter() - start, 1),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kerasfrac.explain.patches", description=__doc__)
    ap.add_argument("--data-dir", required=True, help="a build with fracture boxes")
    ap.add_argument("--image-size", type=int, nargs="+", default=[320])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split", default="val", help="the split the probe is scored on")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument(
        "--train-fraction",
        type=float,
        default=1.0,
        help="train on the fracture crops of this share of the boxed training images (a "
        "learning curve over the number of boxed fractures; default 1: all)",
    )
    ap.add_argument(
        "--mine",
        type=int,
        default=0,
        help="with --images: hard-negative mining on this many normal training images",
    )
    ap.add_argument(
        "--images",
        action="store_true",
        help="also score whole images by their highest crop, beside the no-anatomy baseline",
    )
    a = ap.parse_args(argv)
    results = []
    common = dict(epochs=a.epochs, seed=a.seed, eval_split=a.split, train_fraction=a.train_fraction)
    for size in a.image_size:
        if a.images:
            r = image_study(a.data_dir, size, mine=a.mine, **common)
            c = r["comparison"]
            d = c.get("difference") or {}
            aurocs = (
                f"image AUROC {d['auroc_a']:.3f} against the baseline's {d['auroc_b']:.3f}; "
                if d.get("auroc_a") is not None and d.get("auroc_b") is not None
                else ""
            )
            print(
                f"crops only, {size} px, {a.split}, {r['train_fractures']} training fracture "
                f"crops: {aurocs}{c.get('sentence', c)}",
                flush=True,
            )
            rows = {"within region": c.get("within_region"), **(c.get("subgroups") or {})}
            for key, row in rows.items():
                if row and "model" in row:
                    print(f"  {key}: {_brief(row)}", flush=True)
            results.append(r)
            continue
        r = study(a.data_dir, size, **common)
        lo, hi = r["ci95"] or (float("nan"), float("nan"))
        print(
            f"patch study {size} px (crops {r['patch']} px): {a.split} AUROC {r['auroc']:.3f} "
            f"[{lo:.3f}, {hi:.3f}] on {r['eval_crops']} crops of {r['eval_images']} images; "
            f"train {r['train_crops']} crops ({r['train_fractures']} fractures), "
            f"train AUROC {r['train_auroc']:.3f}; "
            f"{r['seconds']:.0f} s",
            flush=True,
        )
        for region, v in r["by_region"].items():
            lo, hi = v["ci95"] or (float("nan"), float("nan"))
            print(
                f"  {region}: {v['auroc']:.3f} [{lo:.3f}, {hi:.3f}] on {v['crops']} crops",
                flush=True,
            )
        results.append(r)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
    return 0


def _brief(row: dict) -> str:
    """model AUROC, baseline AUROC, the paired difference [CI] of one comparison row."""

    def ci(d):
        lo, hi = d.get("ci95") or (float("nan"), float("nan"))
        return f"[{lo:+.3f}, {hi:+.3f}]"

    m, b, d = row["model"], row["baseline"], row["difference"]
    if m.get("auroc") is None or b.get("auroc") is None:
        return "undefined (one class only)"
    return f"crops {m['auroc']:.3f}, baseline {b['auroc']:.3f}, lead {d['difference']:+.3f} {ci(d)}"


if __name__ == "__main__":
    sys.exit(main())
