"""Fracture outlines (FracAtlas' COCO polygons): stored by the builder beside each box, read
back in the model's input frame, rasterised, and scored against a heat map (Dice, IoU)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

from kerasfrac import data
from kerasfrac.explain import gradcam
from tfrecords_builder import schema


def test_the_build_stores_each_boxs_outline_as_coco_has_it(synthetic_build):
    raw = synthetic_build.parent / "raw"
    coco = json.loads((raw / "Annotations" / "COCO JSON" / "COCO_fracture_masks.json").read_text())
    images = {im["id"]: im for im in coco["images"]}
    want = {}
    for ann in coco["annotations"]:
        im = images[ann["image_id"]]
        xy = np.asarray(ann["segmentation"][0], np.float64).reshape(-1, 2)
        want.setdefault(im["file_name"], []).append(
            np.stack([xy[:, 1] / im["height"], xy[:, 0] / im["width"]], axis=1)
        )
    seen = 0
    for split in ("train", "val", "test"):
        records = data.split_records(synthetic_build, split)
        for image_id, boxes, outlines in zip(records.ids, records.boxes, records.polygons):
            assert len(outlines) == len(boxes)
            for got, expected in zip(outlines, want.get(image_id, [])):
                np.testing.assert_allclose(got, np.clip(expected, 0, 1), atol=1e-6)
                seen += 1
    assert seen == len(coco["annotations"]) > 10


def _parse(record: tf.train.Example) -> dict:
    return schema.parse_example(tf.constant(schema.serialize(record)))


def test_records_without_outlines_read_as_empty_ones():
    kw = dict(
        encoded=b"x",
        image_format="png",
        height=8,
        width=8,
        channels=1,
        image_id="a",
        source="synthetic",
        sha256="0",
        group="a",
        label=1,
        boxes=[(0.1, 0.1, 0.5, 0.5), (0.6, 0.6, 0.9, 0.9)],
    )
    parsed = _parse(schema.make_example(**kw))
    assert list(parsed["polygon_lengths"].numpy()) == [0, 0]
    traced = schema.make_example(**kw, polygons=[[(0.1, 0.1), (0.1, 0.5), (0.5, 0.3)], []])
    parsed = _parse(traced)
    assert list(parsed["polygon_lengths"].numpy()) == [3, 0]
    np.testing.assert_allclose(parsed["polygon_points"].numpy()[2], [0.5, 0.3])
    with pytest.raises(ValueError, match="1 polygons for 2 boxes"):
        schema.make_example(**kw, polygons=[[(0.1, 0.1), (0.1, 0.5), (0.5, 0.3)]])


def test_outline_mask_by_hand():
    # a right triangle with corners (y, x) = (0, 0), (0, 0.9), (0.9, 0) in a 4x4 grid: the
    # pixel centres ((k + 0.5) / 4) with y + x < 0.9: those with row + column <= 2, 6 of 16
    triangle = [np.array([[0.0, 0.0], [0.0, 0.9], [0.9, 0.0]])]
    mask = gradcam.outline_mask(triangle, [[0.0, 0.0, 1.0, 1.0]], (4, 4))
    ys, xs = np.mgrid[0:4, 0:4]
    assert np.array_equal(mask, (xs + ys + 1) < 4)
    # a rectangle outline equals its box; a box without an outline counts as its rectangle
    box = [0.25, 0.25, 0.75, 0.5]
    rect = [np.array([[0.25, 0.25], [0.25, 0.5], [0.75, 0.5], [0.75, 0.25]])]
    want = gradcam.box_region_mask([box], (8, 8))
    assert np.array_equal(gradcam.outline_mask(rect, [box], (8, 8)), want)
    assert np.array_equal(gradcam.outline_mask([np.zeros((0, 2))], [box], (8, 8)), want)


@pytest.mark.parametrize("resize", ["stretch", "pad"])
def test_the_outline_of_a_resized_image_is_the_resized_outline_within_a_pixel(resize):
    """Rasterising the outline mapped into the input frame equals resizing the original
    frame's raster (and flipping commutes with rasterising)."""
    h, w, size = 300, 200, 64
    outline = np.array([[0.2, 0.3], [0.25, 0.8], [0.7, 0.7], [0.8, 0.2]])
    box = [[0.2, 0.2, 0.8, 0.8]]
    full = gradcam.outline_mask([outline], box, (h, w)).astype(np.float32)[..., None]
    if resize == "pad":
        resized = tf.image.resize_with_pad(full, size, size, method="area").numpy()[..., 0]
    else:
        resized = tf.image.resize(full, (size, size), method="area").numpy()[..., 0]
    frame_outline = gradcam.points_to_input_frame(outline, h, w, size, resize)
    frame_box = gradcam.boxes_to_input_frame(box, h, w, size, resize)
    mask = gradcam.outline_mask([frame_outline], frame_box, (size, size))
    # pixels that disagree lie on the outline's edge: within a pixel of the other mask
    disagree = mask != (resized >= 0.5)
    from scipy import ndimage

    edge = ndimage.binary_dilation(mask) & ~ndimage.binary_erosion(mask)
    assert mask.sum() > 200 and np.all(disagree <= edge), disagree.sum()
    flipped = frame_outline.copy()
    flipped[:, 1] = 1 - flipped[:, 1]
    flipped_box = frame_box[:, [0, 3, 2, 1]] * [1, -1, 1, -1] + [0, 1, 0, 1]
    mirror = gradcam.outline_mask([flipped], flipped_box, (size, size))
    assert (mirror != mask[:, ::-1]).sum() <= edge.sum() // 4


def test_dice_and_iou_against_outlines_in_the_audit():
    audit = gradcam.Audit((4, 4))
    triangle = [np.array([[0.0, 0.0], [0.0, 0.9], [0.9, 0.0]])]  # 6 pixels (see above)
    cam = np.zeros((4, 4))
    cam[0, :3] = 1.0  # 3 pixels, all inside the triangle
    audit.add(cam, 1, np.array([[0.0, 0.0, 1.0, 1.0]]), "a", outlines=triangle)
    traced = audit.result(has_boxes=True)["pointing_game"]["localisation"]["outlines"]
    assert traced["n"] == 1
    assert traced["dice"]["mean"] == pytest.approx(2 * 3 / (3 + 6))
    assert traced["iou"]["mean"] == pytest.approx(3 / 6)


# --------------------------------------------------------------------------- the training mask


def _tf_mask(outlines, boxes, h, w, size, resize):
    from kerasfrac.data import augment

    points = np.concatenate([np.reshape(o, (-1, 2)) for o in outlines]).astype(np.float32)
    lengths = np.array([len(np.reshape(o, (-1, 2))) for o in outlines], np.int64)
    return augment.outline_mask(
        tf.constant(np.asarray(boxes, np.float32)),
        tf.constant(points),
        tf.constant(lengths),
        tf.constant(h),
        tf.constant(w),
        size,
        resize,
    ).numpy()[..., 0]


OUTLINE = np.array([[0.2, 0.3], [0.25, 0.8], [0.7, 0.7], [0.8, 0.2]])
SECOND_BOX = [0.05, 0.05, 0.15, 0.2]  # a box without an outline: counts as its rectangle


@pytest.mark.parametrize("resize", ["stretch", "pad"])
def test_the_pipelines_outline_mask_equals_the_rasterised_outline(resize):
    h, w, size = 300, 200, 48
    boxes = [[0.2, 0.2, 0.8, 0.8], SECOND_BOX]
    from scipy import ndimage

    from kerasfrac.data import augment

    got = _tf_mask([OUTLINE, np.zeros((0, 2))], boxes, h, w, size, resize) > 0
    frame_boxes = gradcam.boxes_to_input_frame(boxes, h, w, size, resize)
    frame = gradcam.points_to_input_frame(OUTLINE, h, w, size, resize)
    traced = gradcam.outline_mask([frame], frame_boxes[:1], (size, size))
    # the box without an outline: every pixel it overlaps, as box_mask
    rect = augment.box_mask(tf.constant([SECOND_BOX]), h, w, size, resize).numpy()[..., 0] > 0
    want = traced | rect
    # float32 in the graph, float64 here: pixel centres on the outline may go either way
    edge = ndimage.binary_dilation(traced) & ~ndimage.binary_erosion(traced)
    assert traced.sum() > 300 and rect.sum() > 5 and np.all((got != want) <= edge)
    assert (got != want).sum() <= 5
    # a record without outlines: every box whole, as box_mask
    plain = _tf_mask([np.zeros((0, 2))] * 2, boxes, h, w, size, resize)
    assert np.array_equal(
        plain, augment.box_mask(tf.constant(boxes, tf.float32), h, w, size, resize).numpy()[..., 0]
    )


def test_a_warped_outline_mask_is_the_mask_of_the_warped_outline_within_a_pixel():
    """The augmentation warps the mask channel with the image; rasterising the outline after
    the same warp gives the same mask up to the pixels on its edge."""
    from scipy import ndimage

    from kerasfrac.data import augment

    size = 64
    box = [[0.2, 0.2, 0.8, 0.8]]
    mask = _tf_mask([OUTLINE], box, size, size, size, "stretch")
    angle, zoom, dy, dx = 0.2, 1.1, 0.05, -0.03
    transform = augment._affine(size, angle, zoom, dy, dx)
    warped = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.constant(mask[None, ..., None]),
        transforms=transform,
        output_shape=tf.constant([size, size]),
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    ).numpy()[0, ..., 0]
    # the transform maps output pixel (x, y) to input (a0 x + a1 y + a2, b0 x + b1 y + b2):
    # the outline's points go the other way (pixel coordinates, centres at k + 0.5)
    a0, a1, a2, b0, b1, b2 = transform.numpy()[0, :6]
    forward = np.linalg.inv(np.array([[a0, a1, a2], [b0, b1, b2], [0, 0, 1]]))
    xy = np.stack([OUTLINE[:, 1] * size - 0.5, OUTLINE[:, 0] * size - 0.5, np.ones(4)])
    moved = forward @ xy
    points = np.stack([(moved[1] + 0.5) / size, (moved[0] + 0.5) / size], axis=1)
    want = gradcam.outline_mask([points], [[0, 0, 1, 1]], (size, size))
    got = warped >= 0.5
    edge = ndimage.binary_dilation(want) & ~ndimage.binary_erosion(want)
    assert want.sum() > 500 and np.all((got != want) <= edge), (got != want).sum()


def test_training_batches_carry_the_outline_mask_inside_the_box_mask(synthetic_build):
    from kerasfrac import config

    cfg = config.from_dict(
        {
            "dataset": "synthetic",
            "data": {"dir": str(synthetic_build), "image_size": 64, "flips": "none"},
            "model": {"name": "resnet_small", "box_head": True},
            "train": {"box_target": "outline"},
        }
    )
    masks = {}
    for target in ("box", "outline"):
        ds, _ = data.make_dataset(
            synthetic_build,
            "train",
            cfg.data,
            16,
            training=True,
            with_boxes=True,
            box_target=target,
        )
        batch = next(iter(ds))
        masks[target] = (batch["box_mask"].numpy()[..., 0], batch["label"].numpy())
    (box, labels), (outline, labels_o) = masks["box"], masks["outline"]
    assert np.array_equal(labels, labels_o) and labels.sum() >= 4  # the same stream
    fractured = labels == 1
    assert np.all(outline[~fractured] == 0)
    # every outline lies in its box, and is smaller than it
    assert np.all(outline[fractured] <= box[fractured])
    assert 0 < outline[fractured].sum() < 0.9 * box[fractured].sum()


def test_box_target_needs_the_box_head():
    from kerasfrac import config

    with pytest.raises(config.ConfigError, match="train.box_target"):
        config.from_dict({"dataset": "synthetic", "train": {"box_target": "outline"}})
    with pytest.raises(config.ConfigError, match="train.box_target"):
        config.from_dict(
            {
                "dataset": "synthetic",
                "model": {"name": "resnet_small", "box_head": True},
                "train": {"box_target": "x"},
            }
        )
