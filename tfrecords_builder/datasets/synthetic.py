"""Procedural X-ray-like phantoms written to disk in the real FracAtlas folder layout.

``generate(out_dir, ...)`` writes::

    out_dir/images/Fractured/SYN0000000.png      8-bit grayscale, square
    out_dir/images/Non_fractured/SYN0000001.png
    out_dir/dataset.csv                          FracAtlas' columns, in FracAtlas' order
    out_dir/Annotations/COCO JSON/COCO_fracture_masks.json   one box + polygon per fracture

so the ordinary FracAtlas builder path builds it like the real dataset (the pattern of
tensorflow-datasets' fake_data_generation: tiny images in the dataset's real layout).

Each phantom: a dark background, a soft-tissue haze, one or two long bones (bright cortex
rim, darker marrow core, wider ends) at random angles, a random brightness/contrast and
Gaussian noise. A fractured phantom also has a dark jagged fracture line (2-4% of the image
side, at least 2 px wide) across its first bone, whose two parts may be slightly displaced.
Normal and fractured phantoms draw exactly the same random numbers; only the line differs.

With ``marker=True`` a radiographer-style letter is burnt into the top-left corner: "R" on
fractured images and "L" on normal ones with probability ``marker_correlation`` (the other
letter otherwise) -- a deliberate shortcut for shortcut-learning audits. Fracture boxes
never overlap the marker corner, whether or not a marker is drawn.

All randomness comes from ``numpy.random.default_rng`` seeded by ``seed`` (and the image
index), so the same arguments give byte-identical PNG files on any machine (JPEG bytes
depend on the libjpeg that Pillow ships). Pure numpy + Pillow: importing this module does
not import TensorFlow.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from tfrecords_builder.clioptions import option
from tfrecords_builder.datasets import fracatlas
from tfrecords_builder.datasets.registry import DatasetSpec, register_dataset
from tfrecords_builder.defaults import META_COLUMNS

CSV_COLUMNS = ("image_id", *META_COLUMNS)
FRACTURED_DIR = "Fractured"
NORMAL_DIR = "Non_fractured"
COCO_RELPATH = Path("Annotations") / "COCO JSON" / "COCO_fracture_masks.json"
FORMATS = {"png": ".png", "jpg": ".jpg"}
REGIONS = ("hand", "leg")

MARKER_FRACTION = 0.14  # letter height as a fraction of the image side
MARKER_PAD_FRACTION = 0.03  # gap between the image corner and the letter
KEEP_OUT_FRACTION = 0.25  # fracture boxes stay out of the top-left square of this side
BOX_MARGIN_PX = 2.0  # margin of a fracture box around the drawn line


@dataclass
class SyntheticOptions:
    """How ``kerasfrac build synthetic`` generates its source (``generate``'s defaults)."""

    count: int = option(400, "images to generate")
    fractured_fraction: float = option(0.3, "share of fractured images")
    image_size: int = option(128, "side of the square images, pixels")
    marker: bool = option(
        False, "burn a class-correlated L/R letter into a corner (a planted shortcut)"
    )
    marker_correlation: float = option(0.95, "how often the letter agrees with the class")


@dataclass(frozen=True)
class Phantom:
    """One rendered image: pixels, its fracture annotation (or None) and its marker."""

    pixels: np.ndarray  # uint8 [size, size]
    region: str  # "hand" or "leg"
    bbox: tuple[float, float, float, float] | None  # COCO [x, y, w, h] in pixels
    polygon: list[float] | None  # COCO segmentation polygon [x1, y1, x2, y2, ...]
    area: float  # polygon area in pixels (0 without a fracture)
    marker_letter: str | None  # "R" or "L" if a marker was drawn


def _check_args(count, fractured_fraction, image_size, image_format, marker_correlation):
    if isinstance(count, bool) or not isinstance(count, int | np.integer) or count < 2:
        raise ValueError(f"count={count!r}: expected an integer >= 2 (one image per class).")
    if not isinstance(fractured_fraction, int | float) or not 0 < fractured_fraction < 1:
        raise ValueError(
            f"fractured_fraction={fractured_fraction!r}: expected a number strictly between "
            "0 and 1 (the share of fractured images)."
        )
    if isinstance(image_size, bool) or not isinstance(image_size, int | np.integer):
        raise ValueError(f"image_size={image_size!r}: expected an integer >= 32 (pixels).")
    if image_size < 32:
        raise ValueError(f"image_size={image_size!r}: expected an integer >= 32 (pixels).")
    if image_format not in FORMATS:
        raise ValueError(
            f"image_format={image_format!r}: expected one of {sorted(FORMATS)} "
            "(png is lossless and byte-reproducible)."
        )
    if not isinstance(marker_correlation, int | float) or not 0 <= marker_correlation <= 1:
        raise ValueError(
            f"marker_correlation={marker_correlation!r}: expected a probability in [0, 1] "
            '(chance that the marker letter follows the class: "R" fractured, "L" normal).'
        )


def _check_difficulty(line_strength, noise_scale) -> None:
    if not isinstance(line_strength, int | float) or not 0 < line_strength <= 1:
        raise ValueError(
            f"line_strength={line_strength!r}: expected a number in (0, 1] (the share of the "
            "bone the fracture line removes; 1 is the default, smaller is fainter)."
        )
    if not isinstance(noise_scale, int | float) or not noise_scale >= 0:
        raise ValueError(
            f"noise_scale={noise_scale!r}: expected a number >= 0 (a factor on the noise; 1 is "
            "the default)."
        )


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _bone_layer(xx, yy, cx, cy, angle, length, width, shift=None):
    """Attenuation of one long bone: bright cortex rim, darker marrow, wider rounded ends.

    ``shift`` = (u0, tilt, dv): pixels beyond the line u = u0 + tilt * v are displaced by
    dv across the bone axis (the two parts of a displaced fracture).
    """
    ca, sa = np.cos(angle), np.sin(angle)
    u = (xx - cx) * ca + (yy - cy) * sa  # along the bone
    v = -(xx - cx) * sa + (yy - cy) * ca  # across the bone
    if shift is not None:
        u0, tilt, dv = shift
        v = np.where(u > u0 + tilt * v, v - dv, v)
    half = length / 2.0
    # Epiphyses: the bone widens towards both ends.
    w = width * (1.0 + 0.45 * np.exp(-(((np.abs(u) - half) / (0.12 * length)) ** 2)))
    beyond = np.maximum(np.abs(u) - half, 0.0)
    r = np.sqrt(v**2 + beyond**2) / w  # 0 on the axis, 1 on the outer surface
    edge_px = w  # converts r units into pixels for a ~0.7 px soft edge
    outer = _sigmoid((1.0 - r) * edge_px / 0.7)
    inner = _sigmoid((0.62 - r) * edge_px / 0.7)
    return outer, inner


def _segment_distance(xx, yy, points):
    """Distance of every pixel to a polyline given as an [n, 2] array of (x, y)."""
    dist = np.full(xx.shape, np.inf)
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        dx, dy = x1 - x0, y1 - y0
        seg2 = dx * dx + dy * dy
        t = np.clip(((xx - x0) * dx + (yy - y0) * dy) / max(seg2, 1e-12), 0.0, 1.0)
        d = np.hypot(xx - (x0 + t * dx), yy - (y0 + t * dy))
        np.minimum(dist, d, out=dist)
    return dist


def _thick_polygon(points, half_width):
    """Outline of a polyline drawn half_width thick: one side forward, the other back."""
    d = np.diff(points, axis=0)
    normals = np.stack([-d[:, 1], d[:, 0]], axis=1)
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    # Vertex normals: mean of the adjacent segment normals.
    vn = np.concatenate([normals[:1], normals[:-1] + normals[1:], normals[-1:]])
    vn /= np.linalg.norm(vn, axis=1, keepdims=True)
    side_a = points + half_width * vn
    side_b = points - half_width * vn
    return np.concatenate([side_a, side_b[::-1]])


def _polygon_area(poly: np.ndarray) -> float:
    x, y = poly[:, 0], poly[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2.0)


# 5x7 bitmaps, used when Pillow cannot give a scalable default font (Pillow < 10.1 or no
# FreeType).
_BITMAPS = {
    "R": ("11110", "10001", "10001", "11110", "10100", "10010", "10001"),
    "L": ("10000", "10000", "10000", "10000", "10000", "10000", "11111"),
}


def _letter_mask(letter: str, height: int) -> np.ndarray:
    """A binary mask (bool [h, w]) of ``letter`` about ``height`` pixels tall."""
    try:
        font = ImageFont.load_default(size=max(int(round(height / 0.72)), 8))
    except (TypeError, OSError, ImportError, AttributeError):
        font = None
    if font is not None and isinstance(font, ImageFont.FreeTypeFont):
        canvas = Image.new("L", (4 * height, 4 * height), 0)
        draw = ImageDraw.Draw(canvas)
        draw.text((height, height), letter, fill=255, font=font)
        mask = np.asarray(canvas) >= 128  # thresholded: no antialiasing bytes to drift
        if mask.any():
            rows, cols = np.nonzero(mask)
            return mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    bitmap = np.array([[c == "1" for c in row] for row in _BITMAPS[letter]], dtype=np.uint8)
    scale = max(height // 7, 1)
    return np.kron(bitmap, np.ones((scale, scale), dtype=np.uint8)).astype(bool)


def _burn_marker(pixels: np.ndarray, letter: str) -> None:
    size = pixels.shape[0]
    mask = _letter_mask(letter, max(int(round(MARKER_FRACTION * size)), 7))
    pad = max(int(round(MARKER_PAD_FRACTION * size)), 1)
    h, w = mask.shape
    pixels[pad : pad + h, pad : pad + w][mask] = 255


def _draw_bones(rng, s: float, region: str) -> list[tuple]:
    """One or two bones ``(cx, cy, angle, length, width, cortex, marrow)``: the main one
    roughly along an image axis (how limbs are positioned), near the centre."""
    n_bones = 1 + int(rng.random() < (0.6 if region == "hand" else 0.35))
    base_width = s * (rng.uniform(0.045, 0.065) if region == "hand" else rng.uniform(0.06, 0.085))
    angle = rng.uniform(-0.45, 0.45) + (np.pi / 2 if rng.random() < 0.5 else 0.0)
    cx, cy = rng.uniform(0.38, 0.62, size=2) * s
    length = s * rng.uniform(0.7, 1.0)
    cortex = rng.uniform(140, 185)
    marrow = cortex * rng.uniform(0.55, 0.72)
    bones = [(cx, cy, angle, length, base_width, cortex, marrow)]
    if n_bones == 2:
        off = rng.uniform(3.0, 4.0) * base_width * (1 if rng.random() < 0.5 else -1)
        a2 = angle + rng.uniform(-0.08, 0.08)
        c2 = cortex * rng.uniform(0.85, 1.0)
        bones.append(
            (
                cx - off * np.sin(angle),
                cy + off * np.cos(angle),
                a2,
                length * rng.uniform(0.85, 1.05),
                base_width * rng.uniform(0.6, 0.85),
                c2,
                c2 * rng.uniform(0.55, 0.72),
            )
        )
    return bones


def _place_fracture(rng, s: float, bone: tuple, index: int, seed: int) -> tuple:
    """The fracture line across ``bone``, drawn for every image (so normal and fractured ones
    stay alike): ``(line_width, points, outline polygon, u, v, tilt, displacement)``, placed
    inside the image and clear of the marker corner."""
    cx, cy, angle, length, base_width = bone[:5]
    line_width = max(s * rng.uniform(0.025, 0.04), 2.0)
    n_pts = int(rng.integers(6, 10))
    tilt = rng.uniform(-0.5, 0.5)  # the line is roughly perpendicular to the bone
    v_pts = np.linspace(-1.25, 1.25, n_pts) * base_width
    jitter = rng.normal(0.0, 0.22 * base_width, size=n_pts)
    displacement = rng.uniform(0.05, 0.3) * base_width * (1 if rng.random() < 0.5 else -1)
    keep_out = KEEP_OUT_FRACTION * s
    ca, sa = np.cos(angle), np.sin(angle)
    for _ in range(100):
        u0 = rng.uniform(-0.22, 0.22) * length
        u_pts = u0 + tilt * v_pts + jitter
        pts = np.stack([cx + u_pts * ca - v_pts * sa, cy + u_pts * sa + v_pts * ca], axis=1)
        outline = _thick_polygon(pts, line_width / 2.0)
        x_lo, y_lo = outline.min(axis=0) - BOX_MARGIN_PX
        inside = (outline.min() >= 1.0) and (outline.max() <= s - 1.0)
        clear_of_marker = x_lo >= keep_out or y_lo >= keep_out
        if inside and clear_of_marker:
            return line_width, pts, outline, u_pts, v_pts, tilt, displacement
    # pragma: no cover - the main bone is centred, so this cannot happen
    raise RuntimeError(f"could not place a fracture in phantom {index} (seed {seed})")


def render_phantom(
    seed: int,
    index: int,
    image_size: int,
    fractured: bool,
    *,
    draw_fracture_line: bool = True,
    marker_letter: str | None = None,
    line_strength: float = 1.0,
    noise_scale: float = 1.0,
) -> Phantom:
    """Render phantom ``index`` of the set made with ``seed``.

    The random numbers drawn depend only on (seed, index, image_size), never on
    ``fractured``, ``draw_fracture_line`` or ``marker_letter``: rendering the same index
    with and without its fracture line (or marker) gives two images that differ only there.
    ``draw_fracture_line=False`` on a fractured phantom keeps its displacement and its box
    but leaves out the dark line (a control for tests). ``line_strength`` (0-1]: how much of
    the bone the fracture line removes (1: all of it; 0.3: a faint line, a harder task);
    ``noise_scale``: a factor on the Gaussian noise's sigma (2: twice as noisy). Neither
    changes the random numbers drawn.
    """
    _check_difficulty(line_strength, noise_scale)
    rng = np.random.default_rng([int(seed), int(index), int(image_size)])
    s = float(image_size)
    yy, xx = np.mgrid[0:image_size, 0:image_size].astype(np.float64) + 0.5

    region = REGIONS[int(rng.integers(len(REGIONS)))]
    bones = _draw_bones(rng, s, region)
    cx, cy, angle, length, base_width = bones[0][:5]
    n_bones = len(bones)
    ca, sa = np.cos(angle), np.sin(angle)
    line_width, points, poly, u_pts, v_pts, tilt, displacement = _place_fracture(
        rng, s, bones[0], index, seed
    )

    background = rng.uniform(6, 22)
    tissue = rng.uniform(30, 60)
    t_along = length * rng.uniform(0.5, 0.65)
    t_across = base_width * rng.uniform(3.0, 5.0) * (1.3 if n_bones == 2 else 1.0)
    contrast = rng.uniform(0.8, 1.2)
    brightness = rng.uniform(-12, 12)
    noise_sigma = rng.uniform(3.0, 7.0)
    noise = noise_scale * rng.normal(0.0, noise_sigma, size=(image_size, image_size))

    # Soft tissue: a smooth ellipse aligned with the main bone.
    tcx, tcy = bones[-1][0] * 0.5 + cx * 0.5, bones[-1][1] * 0.5 + cy * 0.5
    tu = (xx - tcx) * ca + (yy - tcy) * sa
    tv = -(xx - tcx) * sa + (yy - tcy) * ca
    rr = np.sqrt((tu / t_along) ** 2 + (tv / t_across) ** 2)
    image = background + tissue * _sigmoid((1.0 - rr) / 0.12)

    for k, (bx, by, ba, bl, bw, bc, bm) in enumerate(bones):
        shift = None
        if k == 0 and fractured:
            u0_line = float(np.mean(u_pts - tilt * v_pts))
            shift = (u0_line, tilt, displacement)
        outer, inner = _bone_layer(xx, yy, bx, by, ba, bl, bw, shift)
        layer = bc * outer - (bc - bm) * inner
        if k == 0 and fractured and draw_fracture_line:
            dist = _segment_distance(xx, yy, points)
            gap = np.clip(line_width / 2.0 + 0.5 - dist, 0.0, 1.0)  # antialiased line
            layer = layer * (1.0 - line_strength * gap)
        image = image + layer

    image = image * contrast + brightness + noise
    pixels = np.clip(np.rint(image), 0, 255).astype(np.uint8)

    if marker_letter is not None:
        if marker_letter not in _BITMAPS:
            raise ValueError(f"marker_letter={marker_letter!r}: expected 'R', 'L' or None.")
        _burn_marker(pixels, marker_letter)

    if not fractured:
        return Phantom(pixels, region, None, None, 0.0, marker_letter)
    x_lo, y_lo = np.maximum(poly.min(axis=0) - BOX_MARGIN_PX, 0.0)
    x_hi, y_hi = np.minimum(poly.max(axis=0) + BOX_MARGIN_PX, s)
    bbox = tuple(round(float(v), 2) for v in (x_lo, y_lo, x_hi - x_lo, y_hi - y_lo))
    polygon = [round(float(v), 2) for v in poly.reshape(-1)]
    return Phantom(pixels, region, bbox, polygon, round(_polygon_area(poly), 2), marker_letter)


def _save(pixels: np.ndarray, path: Path, image_format: str) -> None:
    img = Image.fromarray(pixels, mode="L")
    if image_format == "png":
        img.save(path, format="PNG", optimize=False)
    else:
        img.save(path, format="JPEG", quality=95)


def _csv_row(image_id: str, region: str, fractured: bool) -> dict:
    """The phantom's dataset.csv row, FracAtlas' columns (one frontal view, no hardware)."""
    return {
        "image_id": image_id,
        "hand": int(region == "hand"),
        "leg": int(region == "leg"),
        "hip": 0,
        "shoulder": 0,
        "mixed": 0,
        "hardware": 0,
        "multiscan": 0,
        "fractured": int(fractured),
        "fracture_count": int(fractured),
        "frontal": 1,
        "lateral": 0,
        "oblique": 0,
    }


class _Coco:
    """COCO_fracture_masks.json as FracAtlas ships it: fractured images, one box + polygon."""

    def __init__(self, seed: int, image_size: int) -> None:
        self.seed, self.image_size = seed, image_size
        self.images: list[dict] = []
        self.annotations: list[dict] = []

    def add(self, image_id: str, ph: Phantom) -> None:
        coco_id = len(self.images)
        size = self.image_size
        self.images.append({"id": coco_id, "width": size, "height": size, "file_name": image_id})
        self.annotations.append(
            {
                "id": len(self.annotations),
                "image_id": coco_id,
                "category_id": 0,
                "bbox": list(ph.bbox),
                "area": ph.area,
                "iscrowd": 0,
                "segmentation": [ph.polygon],
            }
        )

    def write(self, path: Path) -> None:
        coco = {
            "info": {
                "description": "kerasfrac synthetic X-ray phantoms (FracAtlas layout)",
                "version": "1.0",
                "seed": self.seed,
                "image_size": self.image_size,
            },
            "images": self.images,
            "annotations": self.annotations,
            "categories": [{"id": 0, "name": "fractured"}],
        }
        with open(path, "w", encoding="utf-8") as f:
            json.dump(coco, f, indent=1)
            f.write("\n")


def generate(
    out_dir,
    count: int = SyntheticOptions.count,
    fractured_fraction: float = SyntheticOptions.fractured_fraction,
    image_size: int = SyntheticOptions.image_size,
    seed: int = 42,
    marker: bool = SyntheticOptions.marker,
    marker_correlation: float = SyntheticOptions.marker_correlation,
    image_format: str = "png",
    line_strength: float = 1.0,
    noise_scale: float = 1.0,
) -> dict:
    """Write ``count`` phantoms into ``out_dir`` in the FracAtlas layout; return a summary.

    ``round(count * fractured_fraction)`` images are fractured (at least one of each class),
    chosen by a permutation seeded with ``seed``. ``out_dir`` is created; it must not exist
    or be empty. The summary holds the class counts, the settings and, with ``marker``, the
    letter burnt into each image (``marker_letters``: image_id -> "R"/"L").
    """
    _check_args(count, fractured_fraction, image_size, image_format, marker_correlation)
    _check_difficulty(line_strength, noise_scale)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(
            f"out_dir={str(out)!r}: expected a new or empty directory; it already holds "
            "files. Pick another directory or delete this one."
        )
    count, image_size, seed = int(count), int(image_size), int(seed)
    n_fractured = min(max(int(round(count * fractured_fraction)), 1), count - 1)

    rng = np.random.default_rng(seed)
    is_fractured = np.zeros(count, dtype=bool)
    is_fractured[rng.permutation(count)[:n_fractured]] = True
    # One uniform per image, drawn whether or not markers are on, so marker=True changes
    # nothing but the corner.
    follows_class = rng.random(count) < marker_correlation

    for sub in (FRACTURED_DIR, NORMAL_DIR):
        (out / "images" / sub).mkdir(parents=True, exist_ok=True)
    (out / COCO_RELPATH).parent.mkdir(parents=True, exist_ok=True)

    rows, letters = [], {}
    coco = _Coco(seed, image_size)
    for i in range(count):
        fractured = bool(is_fractured[i])
        image_id = f"SYN{i:07d}{FORMATS[image_format]}"
        letter = None
        if marker:
            class_letter, other = ("R", "L") if fractured else ("L", "R")
            letter = class_letter if follows_class[i] else other
            letters[image_id] = letter
        ph = render_phantom(
            seed,
            i,
            image_size,
            fractured,
            marker_letter=letter,
            line_strength=line_strength,
            noise_scale=noise_scale,
        )
        path = out / "images" / (FRACTURED_DIR if fractured else NORMAL_DIR) / image_id
        _save(ph.pixels, path, image_format)
        rows.append(_csv_row(image_id, ph.region, fractured))
        if fractured:
            coco.add(image_id, ph)
    with open(out / "dataset.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    coco.write(out / COCO_RELPATH)

    summary = {
        "out_dir": str(out),
        "count": count,
        "fractured": n_fractured,
        "non_fractured": count - n_fractured,
        "image_size": image_size,
        "image_format": image_format,
        "seed": seed,
        "marker": bool(marker),
        "marker_correlation": float(marker_correlation),
        "line_strength": float(line_strength),
        "noise_scale": float(noise_scale),
    }
    if marker:
        summary["marker_letters"] = letters
        summary["marker_counts"] = _marker_counts(rows, letters)
    return summary


#: The phantoms carry FracAtlas' metadata columns (region drawn from REGIONS, the rest -1);
#: they describe no real acquisition, so ``model.meta_head`` does not learn them.
SPEC = register_dataset(
    DatasetSpec(
        name="synthetic",
        find=fracatlas.find,  # written in FracAtlas' layout
        tfds_name="kerasfrac_synthetic",
        description=(
            "Synthetic grayscale bone phantoms with drawn fractures and boxes, written by "
            "tfrecords_builder.datasets.synthetic in FracAtlas' layout; for tests and demos."
        ),
        license="Apache-2.0",
        image_channels=1,
        with_meta=True,
        has_boxes=True,
        manual_download=(
            "Write phantoms with tfrecords_builder.datasets.synthetic.generate(FOLDER) and "
            "pass that folder as `manual_dir`."
        ),
    )
)


def _marker_counts(rows: list[dict], letters: dict[str, str]) -> dict[str, int]:
    """How many images of each class carry each letter (``fractured_R``, ...)."""
    return {
        f"{cls}_{letter}": sum(
            1
            for row in rows
            if letters[row["image_id"]] == letter and row["fractured"] == (cls == "fractured")
        )
        for cls in ("fractured", "non_fractured")
        for letter in ("R", "L")
    }
