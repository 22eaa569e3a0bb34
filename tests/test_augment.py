"""kerasfrac.data.augment: box masks, the per-image warp and intensity ops (seeded, equal eagerly
and in tf.data, masks moving with their image), and the per-batch ops (mixup, box paste)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf

from kerasfrac import config, data
from kerasfrac.config import ConfigError
from kerasfrac.data import augment
from kerasfrac.training import train


def test_box_mask_geometry_stretch_and_pad():
    box = tf.constant([[0.25, 0.5, 0.75, 1.0]])
    stretch = data.box_mask(box, 100, 200, 8, "stretch")[..., 0].numpy()
    want = np.zeros((8, 8))
    want[2:6, 4:8] = 1
    np.testing.assert_array_equal(stretch, want)
    # pad: a 100x200 image becomes 4 rows of content centred in 8 (rows 2..5)
    pad = data.box_mask(box, 100, 200, 8, "pad")[..., 0].numpy()
    want = np.zeros((8, 8))
    want[3:5, 4:8] = 1
    np.testing.assert_array_equal(pad, want)
    assert data.box_mask(tf.zeros([0, 4]), 50, 50, 8)[..., 0].numpy().sum() == 0
    tiny = data.box_mask(tf.constant([[0.5, 0.5, 0.501, 0.501]]), 50, 50, 8).numpy()
    assert tiny.sum() == 1  # a box never vanishes at low resolution


def _aug_cfg(**kw):
    return config.DataConfig(image_size=32, **kw)


def test_augment_is_seeded_and_equal_eagerly_and_in_tf_data():
    cfg = _aug_cfg(rotation=15, zoom=0.2, translate=0.1, gamma=0.3, contrast=0.3, brightness=0.1)
    image = tf.random.stateless_uniform([32, 32, 2], [0, 1])
    seed = tf.constant([3, 4], tf.int64)
    eager = data.augment_image(image, seed, cfg, channels=1).numpy()
    again = data.augment_image(image, seed, cfg, channels=1).numpy()
    other = data.augment_image(image, tf.constant([5, 6], tf.int64), cfg, channels=1).numpy()
    ds = tf.data.Dataset.from_tensors((image, seed)).map(
        lambda x, s: data.augment_image(x, s, cfg, channels=1)
    )
    in_graph = next(iter(ds)).numpy()
    np.testing.assert_array_equal(eager, again)
    np.testing.assert_allclose(eager, in_graph, atol=1e-6)
    assert not np.allclose(eager, other)
    assert eager.min() >= 0.0 and eager[..., :1].max() <= 1.0


def test_augment_moves_the_mask_with_the_image_and_only_recolours_the_image():
    size = 32
    image = np.zeros((size, size, 1), "float32")
    image[4:10, 20:28] = 1.0  # a bright box in the top right
    mask = (image > 0.5).astype("float32")
    stacked = tf.constant(np.concatenate([image, mask], -1))
    warp = _aug_cfg(rotation=180.0, zoom=0.0, translate=0.0)
    for k in range(5):
        out = data.augment_image(stacked, tf.constant([k, 7], tf.int64), warp, channels=1).numpy()
        np.testing.assert_allclose(out[..., 0], out[..., 1], atol=1e-6)  # moved together
    colour = _aug_cfg(gamma=0.5, contrast=0.5, brightness=0.3)
    stacked = tf.constant(np.concatenate([0.2 + 0.5 * image, mask], -1))  # mid-grey values
    out = data.augment_image(stacked, tf.constant([1, 2], tf.int64), colour, channels=1).numpy()
    np.testing.assert_array_equal(out[..., 1], mask[..., 0])  # the mask is not recoloured
    assert not np.allclose(out[..., 0], 0.2 + 0.5 * image[..., 0], atol=1e-3)


def test_augment_off_is_the_identity():
    image = tf.random.stateless_uniform([16, 16, 1], [0, 2])
    out = data.augment_image(image, tf.constant([1, 1], tf.int64), _aug_cfg(), channels=1)
    np.testing.assert_array_equal(out.numpy(), image.numpy())


@pytest.mark.slow
def test_training_stream_with_boxes_carries_masks_of_fractured_images(synthetic_build):
    cfg = config.DataConfig(
        dir=str(synthetic_build), image_size=64, flips="random", rotation=10, zoom=0.1
    )
    ds, steps = data.make_dataset(None, "train", cfg, 8, seed=0, with_boxes=True)
    batch = next(iter(ds))
    assert sorted(batch) == ["box_mask", "box_weight", "image", "label"]
    images, labels = batch["image"], batch["label"]
    masks, weights = batch["box_mask"], batch["box_weight"]
    assert images.shape == (8, 64, 64, 1) and masks.shape == (8, 64, 64, 1)
    covered = masks.numpy().reshape(8, -1).mean(1)
    y = labels.numpy()
    assert np.all(covered[y == 0] == 0) and np.all(covered[y == 1] > 0)
    assert np.all(weights.numpy() == 1.0)  # every synthetic fractured phantom has a box
    # the warp interpolates the mask bilinearly: values stay within [0, 1]
    assert masks.numpy().min() >= 0.0 and masks.numpy().max() <= 1.0


def test_mixup_lambdas_are_seeded_beta_draws_folded_to_the_dominant_image():
    lam = augment.mixup_lambdas(4000, 0.4, tf.constant([3, 5], tf.int64)).numpy()
    assert lam.shape == (4000, 1) and lam.min() >= 0.5 and lam.max() <= 1.0
    again = augment.mixup_lambdas(4000, 0.4, tf.constant([3, 5], tf.int64)).numpy()
    other = augment.mixup_lambdas(4000, 0.4, tf.constant([3, 6], tf.int64)).numpy()
    np.testing.assert_array_equal(lam, again)
    assert np.abs(lam - other).max() > 0.1
    # folded Beta(0.4, 0.4): E[max(lam, 1 - lam)] = 0.5 + E|lam - 0.5|, 0.84 for alpha 0.4
    # (numerically: scipy.stats.beta(0.4, 0.4).expect(lambda x: max(x, 1 - x)))
    from scipy.stats import beta

    want = beta(0.4, 0.4).expect(lambda x: max(x, 1 - x))
    assert lam.mean() == pytest.approx(want, abs=0.01)
    # a larger alpha mixes more evenly
    assert augment.mixup_lambdas(4000, 4.0, tf.constant([3, 5], tf.int64)).numpy().mean() < 0.7


def test_mixup_blends_images_labels_and_box_targets_alike():
    rng = np.random.default_rng(2)
    images = rng.random((3, 8, 8, 1), dtype="float32")
    labels = np.array([[1.0], [0.0], [1.0]], "float32")
    cells = rng.random((3, 2, 2, 1), dtype="float32")
    weights = np.array([1.0, 1.0, 0.0], "float32")
    lam = np.array([[1.0], [0.75], [0.5]], "float32")
    partner = np.array([1, 0, 1])
    mixed, (y, c) = augment.mixup(tf.constant(images), [labels, cells], lam, partner)
    np.testing.assert_allclose(mixed[0], images[0])  # lam 1: unchanged
    np.testing.assert_allclose(mixed[1], 0.75 * images[1] + 0.25 * images[0], rtol=1e-6)
    np.testing.assert_allclose(y.numpy().ravel(), [1.0, 0.25, 0.5])
    np.testing.assert_allclose(c[2], 0.5 * cells[2] + 0.5 * cells[1], rtol=1e-6)
    # Image 2 is fractured without boxes (weight 0): its cells are unknown, and so are those
    # of any blend with it. Blending the weights would give image 2 weight 0.5 on targets
    # that are half its partner's; the smaller weight keeps them out of the box loss.
    w = augment.mixup_box_weights(tf.constant(weights), np.array([1, 2, 1]))
    np.testing.assert_allclose(w.numpy(), [1.0, 0.0, 0.0])


def test_box_paste_moves_a_fracture_box_into_another_image():
    rng = np.random.default_rng(4)
    images = rng.random((4, 32, 32, 1), dtype="float32")
    labels = np.array([0.0, 1.0, 1.0, 0.0], "float32")
    masks = np.zeros((4, 32, 32, 1), "float32")
    masks[1, 8:16, 10:20] = 1.0  # image 1: a boxed fracture
    masks[2, 20:28, 2:8] = 1.0  # image 2 too
    chosen = np.array([True, True, True, False])
    partner = np.array([1, 2, 3, 1])  # 0 <- 1, 1 <- 2, 2 <- 3 (normal: nothing), 3 not chosen
    x, y, m = augment.box_paste(
        tf.constant(images), tf.constant(labels), tf.constant(masks), chosen, partner, feather=3
    )
    x, y, m = x.numpy(), y.numpy(), m.numpy()
    # image 0 (normal) now shows image 1's fracture: its box's inside is image 1's pixels
    # (the feather, 3 px, only touches the box's edge pixels), far outside it is untouched
    np.testing.assert_allclose(x[0, 9:15, 11:19], images[1, 9:15, 11:19], rtol=1e-6)
    np.testing.assert_allclose(x[0, 20:, :], images[0, 20:, :], rtol=1e-6)
    np.testing.assert_allclose(x[0, :, 22:], images[0, :, 22:], rtol=1e-6)
    edge = x[0, 8, 12]  # on the box's edge: a blend of the two
    assert min(images[0, 8, 12, 0], images[1, 8, 12, 0]) < edge + 1e-6
    assert edge < max(images[0, 8, 12, 0], images[1, 8, 12, 0]) + 1e-6
    assert y.tolist() == [1.0, 1.0, 1.0, 0.0]  # 0 became fractured, 2 and 3 unchanged
    np.testing.assert_array_equal(m[0], masks[1])
    np.testing.assert_array_equal(m[1], np.maximum(masks[1], masks[2]))  # both boxes
    # a donor without a box pastes nothing; an image not chosen is untouched
    for i in (2, 3):
        np.testing.assert_array_equal(x[i], images[i])
        np.testing.assert_array_equal(m[i], masks[i])
    # bone onto bone only: where image 0 is black under image 1's box, nothing is pasted
    dark = images.copy()
    dark[0, 6:18, 8:22] = 0.02
    x, y, m = augment.box_paste(
        tf.constant(dark), tf.constant(labels), tf.constant(masks), chosen, partner, feather=3
    )
    np.testing.assert_array_equal(x.numpy()[0], dark[0])
    assert y.numpy()[0] == 0.0 and m.numpy()[0].max() == 0.0


def test_box_paste_needs_the_box_head():
    with pytest.raises(ConfigError, match=r"'train.box_paste'.*model.box_head=true"):
        config.load_config(overrides=["model.name=resnet_small", "train.box_paste=0.3"])
    cfg = config.load_config(
        overrides=["model.name=resnet_small", "model.box_head=true", "train.box_paste=0.3"]
    )
    assert train.step_options(cfg.train)["box_paste_rate"] == 0.3


def test_box_paste_draws_are_seeded_at_the_asked_rate():
    chosen, partner = augment.box_paste_draw(4000, 0.3, 5, tf.constant(7))
    again, partner2 = augment.box_paste_draw(4000, 0.3, 5, tf.constant(7))
    other, _ = augment.box_paste_draw(4000, 0.3, 5, tf.constant(8))
    np.testing.assert_array_equal(chosen, again)
    np.testing.assert_array_equal(partner, partner2)
    assert sorted(partner.numpy().tolist()) == list(range(4000))  # a permutation
    assert np.mean(chosen.numpy()) == pytest.approx(0.3, abs=0.03)  # sd 0.007
    assert np.mean(chosen.numpy() != other.numpy()) > 0.2  # the next step draws anew


def _square_boxes(rng, image, label):
    """Fractured images get a white square off the centre and off the diagonals (so that any
    flip moves it) and a box exactly on it; normal ones none."""
    if label == 0:
        return []
    image[2:10, 20:30] = 255
    return [(2 / 32, 20 / 32, 10 / 32, 30 / 32)]


@pytest.mark.parametrize("flips", ["random", "expand"])
def test_every_flip_moves_the_box_mask_with_its_image(tmp_path, flips):
    """In the training stream, the box mask of every image covers exactly its white square,
    wherever the flips took it (a mask left unflipped fails on every flipped image)."""
    from tests.conftest import make_tfrecord_dir

    counts = {"train": 6, "val": 1, "test": 1}
    build = make_tfrecord_dir(tmp_path / "b", counts, separable=False, boxes=_square_boxes)
    cfg = config.DataConfig(dir=str(build), image_size=32, flips=flips, oversample=False)
    ds, _ = data.make_dataset(None, "train", cfg, 4, seed=1, with_boxes=True)
    moved = 0
    for _ in range(3):
        for batch in ds.as_numpy_iterator():
            for image, mask, label in zip(batch["image"], batch["box_mask"], batch["label"]):
                white, marked = image[..., 0] > 0.99, mask[..., 0] > 0.5
                np.testing.assert_array_equal(white, marked)
                assert white.sum() == (80 if label == 1 else 0)
                moved += bool(label == 1 and not white[2:10, 20:30].all())
    assert moved > 0  # some flips did move a square


def _reference_augment(image, flip_seed, warp_seed, cfg, channels):
    """The per-image augmentation as it was before ``augment_batch`` (tf.image's seeded flips,
    then one ImageProjectiveTransformV3 per image, then ``tf.pow`` gamma): the reference the
    batched path must equal."""
    import math

    image = data.random_flip(image, flip_seed) if cfg.flips == "random" else image
    seeds = tf.random.experimental.stateless_split(tf.cast(warp_seed, tf.int64), num=7)

    def uniform(i, low, high):
        return tf.random.stateless_uniform([], seeds[i], low, high)

    size = int(image.shape[0])
    angle = uniform(0, -cfg.rotation, cfg.rotation) * (math.pi / 180.0)
    zoom = uniform(1, 1.0 - cfg.zoom, 1.0 + cfg.zoom)
    c = (size - 1) / 2.0
    cos, sin = tf.cos(angle) / zoom, tf.sin(angle) / zoom
    dy, dx = uniform(2, -cfg.translate, cfg.translate), uniform(3, -cfg.translate, cfg.translate)
    row = tf.stack(
        [cos, -sin, c - cos * c + sin * c - dx * size, sin, cos, c - sin * c - cos * c - dy * size]
        + [0.0, 0.0]
    )[None]
    image = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None],
        transforms=row,
        output_shape=[size, size],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )[0]
    x, rest = image[..., :channels], image[..., channels:]
    x = tf.pow(tf.maximum(x, 1e-6), tf.exp(uniform(4, -cfg.gamma, cfg.gamma)))
    mean = tf.reduce_mean(x)
    x = (x - mean) * uniform(5, 1.0 - cfg.contrast, 1.0 + cfg.contrast) + mean
    x = tf.clip_by_value(x + uniform(6, -cfg.brightness, cfg.brightness), 0.0, 1.0)
    return tf.concat([x, rest], -1)


@pytest.mark.parametrize("warp", ["opencv", "tensorflow"])
@pytest.mark.parametrize("flips", ["random", "none"])
def test_batched_augmentation_equals_the_per_image_reference(flips, warp, monkeypatch):
    """``draw_params`` + ``augment_batch`` (flips folded into one warp per image, gamma as
    exp(g log x), a batch per op, empty masks left alone) give what flipping, warping and
    recolouring each image on its own with TensorFlow's kernels gives, from the same seeds:
    within 1e-4 on every pixel, image and mask channel, with TensorFlow's warp; with
    OpenCV's (on the cache's uint8, rounded to whole grey levels before the conversion)
    within what the warp's rounding (``test_opencv_warp_equals_tensorflows``: 0.6 of a
    grey level) becomes after gamma (x ** g, g >= exp(-0.3): at most d ** g for a change d)
    and contrast (x 1.3 at most)."""
    if warp == "opencv":
        assert augment.opencv() is not None, "OpenCV >= 5 is a dependency (setup.cfg)"
    else:
        monkeypatch.setattr(augment, "opencv", lambda: None)
    tol = 1e-4 if warp == "tensorflow" else 1e-4 + 1.3 * (0.6 / 255) ** math.exp(-0.3)
    cfg = _aug_cfg(
        flips=flips, rotation=12, zoom=0.2, translate=0.1, gamma=0.3, contrast=0.3, brightness=0.1
    )
    n = 12
    images = tf.cast(
        tf.random.stateless_uniform([n, 32, 32, 2], [1, 2], 0, 256, tf.int32), tf.uint8
    )
    # every other image with an empty mask channel (a normal image's), which is not warped
    images *= tf.constant([[1, 1], [1, 0]] * (n // 2), tf.uint8)[:, None, None, :]
    ds = data.draw_params(tf.data.Dataset.from_tensor_slices(images), cfg, seed=5)
    params = tf.stack([p for _, p in ds])
    batched = data.augment_batch(images, params, cfg, channels=1).numpy()
    # the same seed streams the pipeline draws from (one per op, see IMAGE_OPS)
    flip_seeds = list(
        tf.data.Dataset.random(seed=5, rerandomize_each_iteration=True).batch(2).take(n)
    )
    warp_seeds = list(
        tf.data.Dataset.random(seed=5 + 7919, rerandomize_each_iteration=True).batch(2).take(n)
    )
    flipped = 0
    for i in range(n):
        want = _reference_augment(
            tf.image.convert_image_dtype(images[i], tf.float32),
            flip_seeds[i],
            warp_seeds[i],
            cfg,
            1,
        ).numpy()
        np.testing.assert_allclose(batched[i], want, atol=tol)
        flipped += int(params[i, 0] + params[i, 1] > 0)
    assert (flipped > 0) == (flips == "random")  # the flips were drawn and applied
    assert len({tuple(np.round(p, 4)) for p in params.numpy()}) == n  # each image its own draw


def test_opencv_warp_equals_tensorflows():
    """The warp the pipeline runs (OpenCV's, on the cache's uint8, rounded to grey levels)
    equals TensorFlow's bilinear ``ImageProjectiveTransformV3`` of the float32 images within
    0.6 of a grey level (float32 input: within 5e-5), borders, flips and empty masks
    included; an empty image is not warped and stays zero."""
    assert augment.opencv() is not None, "OpenCV >= 5 is a dependency (setup.cfg)"
    cfg = _aug_cfg(flips="random", rotation=15, zoom=0.2, translate=0.1)
    n = 8
    noise = tf.random.stateless_uniform([n, 40, 40, 3], [6, 7], 0, 256, tf.int32)
    images = (
        tf.cast(noise, tf.uint8) * tf.constant([1, 0] * (n // 2), tf.uint8)[:, None, None, None]
    )
    params = tf.stack(
        [p for _, p in data.draw_params(tf.data.Dataset.from_tensor_slices(images), cfg, seed=3)]
    )
    p = dict(zip(augment.PARAMS, tf.unstack(params, axis=-1), strict=True))
    t = augment._transforms(p, 40)
    floats = tf.image.convert_image_dtype(images, tf.float32)
    want = augment._warp_tf(floats, t).numpy()
    got = augment._warp(images, t).numpy()
    assert got.dtype == np.float32 and np.abs(got - want).max() <= 0.6 / 255
    np.testing.assert_allclose(augment._warp(floats, t).numpy(), want, atol=5e-5)
    skipped = augment._warp(images, t, skip_empty=True).numpy()
    np.testing.assert_array_equal(skipped[1::2], 0.0)
    np.testing.assert_array_equal(skipped[0::2], got[0::2])
    assert np.abs(got[0] - floats[0].numpy()).mean() > 0.05  # the warp moved something


def test_batched_flips_without_a_warp_equal_tf_image_flips():
    cfg = _aug_cfg(flips="random")
    images = tf.random.stateless_uniform([8, 16, 16, 1], [3, 4])
    ds = data.draw_params(tf.data.Dataset.from_tensor_slices(images), cfg, seed=9)
    params = tf.stack([p for _, p in ds])
    out = data.augment_batch(images, params, cfg, channels=1).numpy()
    seeds = list(tf.data.Dataset.random(seed=9, rerandomize_each_iteration=True).batch(2).take(8))
    for i in range(8):
        np.testing.assert_array_equal(out[i], data.random_flip(images[i], seeds[i]).numpy())


def test_batched_coons_fill_equals_the_occlusion_tests_fill():
    from kerasfrac.explain import occlusion

    rng = np.random.default_rng(0)
    images = rng.random((5, 24, 24, 1)).astype("float32")
    rects = np.array([[3, 4, 10, 12], [0, 0, 6, 6], [18, 15, 24, 24], [5, 5, 6, 6], [2, 2, 9, 9]])
    fill = np.array([True, True, True, True, False])
    out = augment.coons_fill_batch(tf.constant(images), tf.constant(rects), tf.constant(fill))
    for i in range(5):
        want = occlusion.coons_fill(images[i], *rects[i]) if fill[i] else images[i]
        np.testing.assert_allclose(out[i].numpy(), want, atol=1e-5)
    assert not np.allclose(out[0].numpy(), images[0])


def test_fracture_fill_removes_the_fracture_or_fills_a_control_on_bone():
    """Chosen fractured images lose their fracture (label 0, mask cleared, the grown box
    filled) or, like every chosen normal image, get a control window of a fracture's size
    filled on bone (brighter than the image's mean), off the fracture, label and mask kept."""
    n, s = 64, 48
    images = np.zeros((n, s, s, 1), "float32")
    images[:, 8:40, 8:40] = 0.8  # a bright square of "bone" on a black background
    masks = np.zeros((n, s, s, 1), "float32")
    labels = np.zeros(n, "float32")
    labels[: n // 2] = 1.0
    masks[: n // 2, 12:18, 14:20] = 1.0  # the fracture of each fractured image
    images[: n // 2, 12:18, 14:20] = 0.2  # drawn dark
    drawn = augment.fracture_fill_draw(
        tf.constant(images), tf.constant(masks), tf.constant(labels), 1.0, tf.constant([1, 2])
    )
    x, y, m = augment.fracture_fill(tf.constant(images), tf.constant(labels), masks, drawn)
    x, y, m, rect = x.numpy(), y.numpy(), m.numpy(), drawn["rect"].numpy()
    gone = drawn["fracture"].numpy()
    assert drawn["chosen"].numpy().all()
    assert 8 <= gone.sum() <= 24 and not gone[n // 2 :].any()  # half of the fractured ones
    for i in range(n):
        y0, x0, y1, x1 = rect[i]
        if gone[i]:
            assert y[i] == 0 and m[i].sum() == 0
            assert y0 <= 12 and x0 <= 14 and y1 >= 18 and x1 >= 20  # covers the grown fracture
            assert x[i, 12:18, 14:20].min() > 0.7  # the dark fracture is filled with bone
        else:
            assert y[i] == labels[i] and m[i].sum() == masks[i].sum()
            cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
            assert images[i, cy, cx, 0] >= 0.8 * 0.5  # centred on bone
            assert (y1 - y0, x1 - x0) == (10, 10)  # a fracture's size (6 px grown by 2 x 2)
            if labels[i]:  # off the fracture, which stays as it was
                assert not (y0 < 18 and 12 < y1 and x0 < 20 and 14 < x1)
                np.testing.assert_array_equal(x[i, 12:18, 14:20], images[i, 12:18, 14:20])


def test_fracture_fill_needs_the_box_head():
    with pytest.raises(ConfigError, match=r"'train.fracture_fill'.*model.box_head=true"):
        config.load_config(overrides=["model.name=resnet_small", "train.fracture_fill=0.5"])
    cfg = config.load_config(
        overrides=["model.name=resnet_small", "model.box_head=true", "train.fracture_fill=0.5"]
    )
    assert train.step_options(cfg.train)["fracture_fill_rate"] == 0.5


@pytest.mark.parametrize("oversample", [True, False])
def test_skipped_batches_are_drawn_not_augmented_and_the_stream_goes_on_unchanged(
    synthetic_build, oversample
):
    """A resumed run's stream (``skip_batches``) is the uninterrupted stream from that batch
    on, augmentation and box masks included, across epoch ends (``repeat``)."""
    cfg = _aug_cfg(flips="random", rotation=10, zoom=0.1, gamma=0.2, oversample=oversample)

    def stream(skip):
        ds, _ = data.make_dataset(
            synthetic_build,
            "train",
            cfg,
            8,
            seed=3,
            with_boxes=True,
            repeat=True,
            skip_batches=skip,
        )
        return [b for b in ds.take(8)]

    whole, resumed = stream(0), stream(5)
    for a, b in zip(whole[5:], resumed, strict=False):
        for key in ("image", "label", "box_mask", "box_weight"):
            np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())
    assert not np.array_equal(whole[0]["image"].numpy(), resumed[0]["image"].numpy())
