"""Tests of the synthetic X-ray phantom generator (tfrecords_builder.datasets.synthetic)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter, ImageFont

from tfrecords_builder.datasets import synthetic

CSV_HEADER = (
    "image_id,hand,leg,hip,shoulder,mixed,hardware,multiscan,fractured,fracture_count,"
    "frontal,lateral,oblique"
)
COCO = Path("Annotations") / "COCO JSON" / "COCO_fracture_masks.json"


def _read_csv(root: Path) -> list[dict]:
    with open(root / "dataset.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _read_coco(root: Path) -> dict:
    return json.loads((root / COCO).read_text(encoding="utf-8"))


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _pixels(root: Path, row: dict) -> np.ndarray:
    sub = "Fractured" if row["fractured"] == "1" else "Non_fractured"
    return np.asarray(Image.open(root / "images" / sub / row["image_id"]))


def _boxes_by_file(coco: dict) -> dict[str, list[list[float]]]:
    names = {im["id"]: im["file_name"] for im in coco["images"]}
    boxes: dict[str, list[list[float]]] = {}
    for ann in coco["annotations"]:
        boxes.setdefault(names[ann["image_id"]], []).append(ann["bbox"])
    return boxes


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("syn") / "fracatlas_like"
    summary = synthetic.generate(root, count=20, fractured_fraction=0.3, image_size=48, seed=7)
    return root, summary


def test_layout_and_csv_are_exactly_fracatlas(small_set):
    root, _ = small_set
    assert sorted(p.name for p in root.iterdir()) == ["Annotations", "dataset.csv", "images"]
    assert sorted(p.name for p in (root / "images").iterdir()) == ["Fractured", "Non_fractured"]
    assert (root / COCO).is_file()
    lines = (root / "dataset.csv").read_text(encoding="utf-8").split("\n")
    assert lines[0] == CSV_HEADER
    assert lines[-1] == ""  # one trailing newline, no blank rows, no \r
    rows = _read_csv(root)
    assert [r["image_id"] for r in rows] == [f"SYN{i:07d}.png" for i in range(20)]
    for row in rows:
        sub = "Fractured" if row["fractured"] == "1" else "Non_fractured"
        path = root / "images" / sub / row["image_id"]
        assert path.is_file(), path
        with Image.open(path) as im:
            assert (im.mode, im.size, im.format) == ("L", (48, 48), "PNG")
        assert int(row["hand"]) + int(row["leg"]) == 1
        assert (row["hip"], row["shoulder"], row["mixed"], row["hardware"]) == ("0",) * 4
        assert row["fracture_count"] == row["fractured"]
        assert (row["frontal"], row["lateral"], row["oblique"]) == ("1", "0", "0")
    n_files = sum(1 for p in (root / "images").rglob("*") if p.is_file())
    assert n_files == 20


def test_class_counts_follow_fraction(small_set, tmp_path):
    root, summary = small_set
    rows = _read_csv(root)
    n_frac = sum(r["fractured"] == "1" for r in rows)
    assert n_frac == round(20 * 0.3) == 6
    assert len(list((root / "images" / "Fractured").iterdir())) == 6
    assert len(list((root / "images" / "Non_fractured").iterdir())) == 14
    assert (summary["fractured"], summary["non_fractured"], summary["count"]) == (6, 14, 20)
    assert (summary["image_size"], summary["seed"], summary["marker"]) == (48, 7, False)
    # The fractured images are spread over the ids (a seeded permutation, not the first 6).
    assert [r["fractured"] for r in rows] != ["1"] * 6 + ["0"] * 14
    # Tiny fractions still give one image of each class.
    s = synthetic.generate(tmp_path / "tiny", count=3, fractured_fraction=0.01, image_size=32)
    assert (s["fractured"], s["non_fractured"]) == (1, 2)


def test_same_seed_gives_identical_bytes_other_seed_differs(tmp_path):
    kwargs = dict(count=8, fractured_fraction=0.5, image_size=40, marker=True)
    synthetic.generate(tmp_path / "a", seed=3, **kwargs)
    synthetic.generate(tmp_path / "b", seed=3, **kwargs)
    synthetic.generate(tmp_path / "c", seed=4, **kwargs)
    a, b, c = (_all_files(tmp_path / n) for n in "abc")
    assert len(a) == 8 + 2
    assert a == b
    images_a = {k: v for k, v in a.items() if k.startswith("images")}
    images_c = {k: v for k, v in c.items() if k.startswith("images")}
    assert all(images_a.get(k) != v for k, v in images_c.items())


def test_coco_boxes_one_per_fractured_image_inside_it(small_set):
    root, _ = small_set
    coco = _read_coco(root)
    assert set(coco) == {"info", "images", "annotations", "categories"}
    assert coco["categories"] == [{"id": 0, "name": "fractured"}]
    rows = _read_csv(root)
    fractured = {r["image_id"] for r in rows if r["fractured"] == "1"}
    assert {im["file_name"] for im in coco["images"]} == fractured  # normals are not listed
    assert len(coco["images"]) == len(coco["annotations"]) == 6
    assert len({im["id"] for im in coco["images"]}) == 6
    assert all((im["width"], im["height"]) == (48, 48) for im in coco["images"])
    for ann in coco["annotations"]:
        assert (ann["category_id"], ann["iscrowd"]) == (0, 0)
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 48 and y + h <= 48
        assert 2 <= w and 2 <= h and w * h < 0.5 * 48 * 48  # a local box, not the image
        poly = np.array(ann["segmentation"][0]).reshape(-1, 2)
        assert len(poly) >= 6
        assert poly[:, 0].min() >= x and poly[:, 0].max() <= x + w
        assert poly[:, 1].min() >= y and poly[:, 1].max() <= y + h
        # Tight: the polygon fills the box up to a margin of a few pixels.
        assert poly[:, 0].min() - x <= 3 and poly[:, 1].min() - y <= 3
        assert 0 < ann["area"] <= w * h


def test_files_are_the_rendered_phantoms(small_set):
    root, _ = small_set
    coco = _read_coco(root)
    boxes = _boxes_by_file(coco)
    for i, row in enumerate(_read_csv(root)[:6]):
        ph = synthetic.render_phantom(7, i, 48, row["fractured"] == "1")
        np.testing.assert_array_equal(_pixels(root, row), ph.pixels)
        assert (ph.bbox is not None) == (row["fractured"] == "1")
        if ph.bbox is not None:
            assert boxes[row["image_id"]] == [list(ph.bbox)]


@pytest.mark.parametrize("index", range(6))
def test_fracture_line_darkens_only_its_box(index):
    size = 96
    with_line = synthetic.render_phantom(11, index, size, True)
    control = synthetic.render_phantom(11, index, size, True, draw_fracture_line=False)
    x, y, w, h = with_line.bbox
    assert control.bbox == with_line.bbox
    inside = np.zeros((size, size), dtype=bool)
    inside[int(y) : int(np.ceil(y + h)), int(x) : int(np.ceil(x + w))] = True
    a = with_line.pixels.astype(int)
    b = control.pixels.astype(int)
    np.testing.assert_array_equal(a[~inside], b[~inside])  # the line stays in its box
    assert a[inside].mean() < b[inside].mean() - 10  # and darkens it clearly
    # The line cuts through the bone: a line of pixels (not a speck) loses most of the bone's
    # brightness, and nothing gets brighter.
    darkening = b - a
    assert darkening.min() >= 0
    assert (darkening > 50).sum() >= 20
    assert darkening.max() > 80


def test_a_fainter_line_and_more_noise_make_a_harder_phantom_from_the_same_draws():
    """The demo's harder task: ``line_strength`` dims the fracture line and ``noise_scale``
    multiplies the noise; the random numbers are the same, so the defaults give the same
    pixels as before and a faint line differs from the full one only on the line."""
    size, index = 96, 3
    full = synthetic.render_phantom(11, index, size, True)
    assert np.array_equal(
        full.pixels, synthetic.render_phantom(11, index, size, True, line_strength=1.0).pixels
    )
    faint = synthetic.render_phantom(11, index, size, True, line_strength=0.3)
    control = synthetic.render_phantom(11, index, size, True, draw_fracture_line=False)
    assert faint.bbox == full.bbox
    dark_full = control.pixels.astype(int) - full.pixels.astype(int)
    dark_faint = control.pixels.astype(int) - faint.pixels.astype(int)
    on_line = dark_full > 50
    assert on_line.sum() >= 20
    # About 30% of the full line's darkening (rounding to whole grey levels aside).
    ratio = dark_faint[on_line].sum() / dark_full[on_line].sum()
    assert 0.25 < ratio < 0.35, ratio
    np.testing.assert_array_equal(dark_faint[dark_full == 0], 0)
    normal = synthetic.render_phantom(5, 2, 64, False)
    noisy = synthetic.render_phantom(5, 2, 64, False, noise_scale=3.0)
    residual = noisy.pixels.astype(float) - normal.pixels.astype(float)
    flat = synthetic.render_phantom(5, 2, 64, False, noise_scale=0.0).pixels.astype(float)
    assert np.std(noisy.pixels - flat) > 2.5 * np.std(normal.pixels - flat)
    assert residual.std() > 0


def test_normal_and_fractured_phantoms_share_everything_but_the_fracture():
    normal = synthetic.render_phantom(5, 2, 64, False)
    fractured = synthetic.render_phantom(5, 2, 64, True)
    assert normal.bbox is None and normal.polygon is None and normal.area == 0
    assert normal.region == fractured.region
    diff = normal.pixels != fractured.pixels
    # Only the fractured bone changes (the line, and the displaced part beyond it).
    assert diff.any()
    assert diff.mean() < 0.4


def test_marker_brightens_corner_and_follows_correlation(tmp_path):
    kwargs = dict(count=40, fractured_fraction=0.5, image_size=64, seed=2)
    synthetic.generate(tmp_path / "plain", **kwargs)
    s = synthetic.generate(tmp_path / "marked", marker=True, marker_correlation=1.0, **kwargs)
    rows = _read_csv(tmp_path / "marked")
    boxes = _boxes_by_file(_read_coco(tmp_path / "marked"))
    assert _read_csv(tmp_path / "plain") == rows
    assert s["marker_counts"] == {
        "fractured_R": 20,
        "fractured_L": 0,
        "non_fractured_R": 0,
        "non_fractured_L": 20,
    }
    corner = int(0.25 * 64)
    masks = {}
    for row in rows:
        plain = _pixels(tmp_path / "plain", row).astype(int)
        marked = _pixels(tmp_path / "marked", row).astype(int)
        changed = marked != plain
        assert changed.any()
        assert not changed[corner:, :].any() and not changed[:, corner:].any()
        assert marked[:corner, :corner].mean() > plain[:corner, :corner].mean() + 10
        assert (marked[changed] == 255).all()
        # Big enough to see: the letter spans about 14% of the side.
        rows_hit = np.nonzero(changed.any(axis=1))[0]
        assert rows_hit.max() - rows_hit.min() + 1 >= 0.1 * 64
        for x, y, w, h in boxes.get(row["image_id"], []):  # never on a fracture box
            assert not changed[int(y) : int(np.ceil(y + h)), int(x) : int(np.ceil(x + w))].any()
        letter = s["marker_letters"][row["image_id"]]
        assert letter == ("R" if row["fractured"] == "1" else "L")
        masks.setdefault(letter, (marked[:corner, :corner] == 255))
    assert (masks["R"] != masks["L"]).any()  # the two letters look different

    inverse = synthetic.generate(tmp_path / "inv", marker=True, marker_correlation=0.0, **kwargs)
    assert inverse["marker_counts"]["fractured_L"] == 20
    assert inverse["marker_counts"]["non_fractured_R"] == 20


def test_marker_correlation_is_a_probability(tmp_path):
    s = synthetic.generate(
        tmp_path / "m", count=200, image_size=32, marker=True, marker_correlation=0.8, seed=1
    )
    c = s["marker_counts"]
    follows = c["fractured_R"] + c["non_fractured_L"]
    assert sum(c.values()) == 200 == len(s["marker_letters"])
    assert 140 <= follows <= 180  # 160 expected; binomial sd about 5.7


def test_marker_falls_back_to_bitmap_letters(monkeypatch):
    def no_sizes(*args, **kwargs):
        raise TypeError("load_default() got an unexpected keyword argument 'size'")

    monkeypatch.setattr(ImageFont, "load_default", no_sizes)
    r = synthetic._letter_mask("R", 14)
    l_ = synthetic._letter_mask("L", 14)
    assert r.shape == l_.shape and r.shape[0] >= 7
    assert r.any() and l_.any() and (r != l_).any()
    ph = synthetic.render_phantom(0, 0, 64, False, marker_letter="L")
    assert (ph.pixels[:16, :16] == 255).sum() >= 10


def test_jpg_format(tmp_path):
    synthetic.generate(tmp_path / "j", count=4, image_size=32, image_format="jpg")
    rows = _read_csv(tmp_path / "j")
    assert all(r["image_id"].endswith(".jpg") for r in rows)
    for row in rows:
        sub = "Fractured" if row["fractured"] == "1" else "Non_fractured"
        with Image.open(tmp_path / "j" / "images" / sub / row["image_id"]) as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "L", (32, 32))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(count=1), "count"),
        (dict(count=2.5), "count"),
        (dict(fractured_fraction=0.0), "fractured_fraction"),
        (dict(fractured_fraction=1.0), "fractured_fraction"),
        (dict(fractured_fraction=-0.2), "fractured_fraction"),
        (dict(image_size=31), "image_size"),
        (dict(image_format="bmp"), "image_format"),
        (dict(marker_correlation=1.5), "marker_correlation"),
        (dict(marker_correlation=-0.1), "marker_correlation"),
        (dict(line_strength=0.0), "line_strength"),
        (dict(line_strength=1.5), "line_strength"),
        (dict(noise_scale=-1.0), "noise_scale"),
    ],
)
def test_bad_arguments_raise_value_error(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=name) as info:
        synthetic.generate(tmp_path / "bad", **kwargs)
    assert repr(next(iter(kwargs.values()))) in str(info.value)
    assert "expected" in str(info.value)
    assert not (tmp_path / "bad").exists()  # nothing written


def test_refuses_non_empty_out_dir_accepts_empty(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="out_dir"):
        synthetic.generate(tmp_path / "full", count=2, image_size=32)
    (tmp_path / "empty").mkdir()
    s = synthetic.generate(tmp_path / "empty", count=2, image_size=32)
    assert s["count"] == 2


def test_module_does_not_import_tensorflow():
    # the module with its package (the dataset registry, the FracAtlas layout it reuses)
    code = "import sys, tfrecords_builder.datasets.synthetic\nprint('tensorflow' in sys.modules)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _valley_features(path: Path) -> np.ndarray:
    """A fixed 'one-layer CNN': a 3x3 grayscale closing minus the image (dark thin lines on
    bright structures light up), border trimmed, then 4x4 max-pooled."""
    with Image.open(path) as im:
        closed = im.filter(ImageFilter.MaxFilter(3)).filter(ImageFilter.MinFilter(3))
        valleys = np.asarray(closed, np.float32) - np.asarray(im, np.float32)
    valleys = valleys[2:-2, 2:-2]
    k = valleys.shape[0] // 4
    return valleys[: 4 * k, : 4 * k].reshape(4, k, 4, k).max(axis=(1, 3)).ravel() / 255


def test_classes_are_learnable_by_a_trivial_classifier(tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    root = tmp_path / "learn"
    synthetic.generate(root, count=200, fractured_fraction=0.5, image_size=64, seed=123)
    rows = _read_csv(root)
    x = np.stack(
        [
            _valley_features(
                root
                / "images"
                / ("Fractured" if r["fractured"] == "1" else "Non_fractured")
                / r["image_id"]
            )
            for r in rows
        ]
    )
    y = np.array([int(r["fractured"]) for r in rows])
    assert 0.3 < y[:150].mean() < 0.7  # both classes in the training part
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    clf.fit(x[:150], y[:150])
    accuracy = clf.score(x[150:], y[150:])
    assert accuracy > 0.75, accuracy
