"""Stored image bytes -> the model's input: decode, grayscale, resize (the letterbox geometry
once), uint8 -> float32. Works eagerly and inside ``tf.data`` alike; ``predict`` and
``explain`` prepare files with the same ops as training (``preprocess``)."""

from __future__ import annotations

import tensorflow as tf

from kerasfrac.names import RESIZES
from tfrecords_builder import schema

#: libjpeg's DCT-domain downscales (``tf.io.decode_jpeg``'s ``ratio``), largest last.
JPEG_RATIOS = (1, 2, 4, 8)

#: A JPEG is decoded at the largest ratio that keeps both sides at least this many times the
#: target size, so the area resize after it still averages 2 x 2 or more decoded pixels per
#: output pixel (without the margin the large FracAtlas images lost PSNR: docs/speed.md).
JPEG_MARGIN = 2

_JPEG_MAGIC = b"\xff\xd8\xff"  # what tf.io.decode_image tests to call a file a JPEG


def _decode_image(encoded: tf.Tensor, image_size: int, channels: int) -> tf.Tensor:
    """Stored bytes -> uint8 [h, w, channels], JPEGs shrunk in the DCT domain.

    A JPEG of 1 or 3 components is decoded by the same libjpeg call the builder validated
    (``decode_jpeg``, no recovery of truncated files) straight to ``channels`` (1: libjpeg's
    luma Y, the BT.601 weights of ``rgb_to_grayscale``, without making RGB first) and at the
    largest ``JPEG_RATIOS`` step that keeps ``JPEG_MARGIN`` x ``image_size`` pixels on the
    short side: a 2304 x 2880 X-ray for 224 px is decoded at 1/4 (576 x 720), 1/16 of the
    pixels. Anything else (PNG, CMYK JPEG) goes through ``schema.decode_image`` and
    ``rgb_to_grayscale`` (alpha dropped, rounded back to uint8) or channel tiling, as before.
    uint8 throughout: the resize reads it directly (a float copy of the decode cost 4 %).
    """

    def generic():
        image = schema.decode_image(encoded)
        has_color = tf.shape(image)[-1] >= 3
        if channels == 1:

            def luma():
                gray = tf.image.rgb_to_grayscale(tf.cast(image[..., :3], tf.float32))
                return tf.cast(tf.round(tf.clip_by_value(gray, 0.0, 255.0)), tf.uint8)

            return tf.cond(has_color, luma, lambda: image[..., :1])
        return tf.cond(
            has_color, lambda: image[..., :3], lambda: tf.tile(image[..., :1], [1, 1, 3])
        )

    def jpeg():
        shape = tf.image.extract_jpeg_shape(encoded)
        short = tf.reduce_min(shape[:2])
        need = JPEG_MARGIN * image_size
        # Index into JPEG_RATIOS: how many of the larger ratios still leave >= need pixels
        # (libjpeg's output side is ceil(side / ratio)).
        index = tf.add_n([tf.cast((short + r - 1) // r >= need, tf.int32) for r in JPEG_RATIOS[1:]])
        branches = [
            lambda r=r: tf.io.decode_jpeg(encoded, channels=channels, ratio=r) for r in JPEG_RATIOS
        ]
        return tf.cond(shape[2] == 4, generic, lambda: tf.switch_case(index, branches))

    is_jpeg = tf.equal(tf.strings.substr(encoded, 0, 3), _JPEG_MAGIC)
    image = tf.cond(is_jpeg, jpeg, generic)
    image.set_shape([None, None, channels])
    return image


def decode_resize(
    encoded: tf.Tensor, image_size: int, grayscale: bool = True, resize: str = "stretch"
) -> tf.Tensor:
    """Stored bytes -> uint8 [image_size, image_size, 1 or 3]: what the cache holds.

    Decode (see ``_decode_image``: JPEGs straight to the wanted channels and shrunk in the DCT
    domain), then resize with ``area`` (each output pixel the exact average of the input
    pixels it covers: a proper low-pass for shrinking, the closest to Pillow's LANCZOS of the
    candidates measured, and fast: docs/speed.md), then round to uint8. ``stretch`` squashes
    to a square as the report did; ``pad`` keeps the aspect ratio and pads with zeros
    (black). Works eagerly and inside ``Dataset.map`` alike (the format and size are only
    known at run time in a graph, hence ``tf.cond`` instead of Python ``if``).
    """
    if resize not in RESIZES:
        raise ValueError(f"resize must be one of {RESIZES}; got {resize!r}")
    channels = 1 if grayscale else 3
    image = _decode_image(encoded, image_size, channels)
    if resize == "stretch":
        image = tf.image.resize(image, [image_size, image_size], "area")
    else:
        image = tf.image.resize_with_pad(image, image_size, image_size, "area")
    # Area weights are non-negative and sum to 1, so the float result lies in [0, 255] (up to
    # float rounding): + 0.5 and truncation round it to the nearest uint8 without a clip.
    image = tf.cast(image + 0.5, tf.uint8)
    return tf.ensure_shape(image, [image_size, image_size, channels])


def to_float(image: tf.Tensor) -> tf.Tensor:
    """uint8 -> float32 in [0, 1] (x / 255): applied after the cache, so cached and uncached
    epochs give the model the same tensors."""
    return tf.image.convert_image_dtype(image, tf.float32)


def preprocess(
    encoded: tf.Tensor, image_size: int, grayscale: bool = True, resize: str = "stretch"
) -> tf.Tensor:
    """Stored bytes -> float32 [image_size, image_size, 1 or 3] in [0, 1]: exactly what the
    pipelines give the model (``to_float(decode_resize(...))``), for predict and explain."""
    return to_float(decode_resize(encoded, image_size, grayscale, resize))


def letterbox(height, width, size, floor=None, maximum=None) -> tuple:
    """``(content_height, content_width, top, left)`` of a ``height`` x ``width`` image
    resized with ``tf.image.resize_with_pad`` into ``size`` x ``size``, computed exactly as
    TensorFlow does (ratio, floor of the scaled sides, floor of half the padding). ``floor``
    and ``maximum``: the array module's (``tf.floor``/``tf.maximum`` for tensors, numpy's by
    default), so that training's box masks and explain's box frames share one geometry."""
    import numpy as np

    floor = floor or np.floor
    maximum = maximum or np.maximum
    ratio = maximum(width / size, height / size)
    return (
        floor(height / ratio),
        floor(width / ratio),
        floor((size - height / ratio) / 2.0),
        floor((size - width / ratio) / 2.0),
    )


def image_shape(data_cfg) -> tuple[int, int, int]:
    """The model input shape these images have."""
    return (data_cfg.image_size, data_cfg.image_size, 1 if data_cfg.grayscale else 3)
