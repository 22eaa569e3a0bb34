"""Decode every image fully, once, and sort the good from the bad.

TensorFlow's own decoder is the judge, since it is what reads the records later: a file that
``tf.io.decode_image`` rejects is quarantined with the reason, never written. Truncated JPEGs
(which the real FracAtlas has) can be kept with ``recover_truncated``: decoded with
``try_recover_truncated`` and stored as a lossless PNG re-encode. The header is read first
(Pillow, lazily) so that a decompression bomb is refused before any pixel is decoded.

Work runs in a thread pool: TF's decode kernels release the GIL, so threads scale over cores
without a process per worker each importing TensorFlow.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tensorflow as tf
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from tfrecords_builder.defaults import DEFAULT_MAX_PIXELS

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RECOVER_FRACTION = 0.5  # a recovered JPEG must have at least half of its lines


@dataclasses.dataclass
class Checked:
    """The outcome for one file: ``reason`` is None when the image is good."""

    path: Path
    reason: str | None = None
    sha256: str = ""
    image_format: str = ""  # format of the bytes to store: jpeg | png
    height: int = 0
    width: int = 0
    channels: int = 0
    phash: int | None = None  # 64-bit perceptual hash of the decoded image
    recovered: bytes | None = None  # lossless re-encode of a recovered truncated JPEG
    thumb: np.ndarray | None = dataclasses.field(default=None, repr=False)  # for phash


def sniff(data: bytes) -> str | None:
    if data.startswith(JPEG_MAGIC):
        return "jpeg"
    if data.startswith(PNG_MAGIC):
        return "png"
    return None


HASH_SIZE, THUMB_SIZE = 8, 32  # imagehash.phash's defaults: 8x8 low frequencies of 32x32


def hash_view(pixels: tf.Tensor) -> np.ndarray:
    """A strided ~64 px copy of ``pixels`` (gray or RGB), all a perceptual hash needs.

    phash only looks at 32x32: a full-size Pillow copy and Lanczos resize of a 2304x2880
    X-ray cost about as much as decoding it (measured A/B on fracatlas-mini). ``np.asarray``
    views TensorFlow's buffer (``.numpy()`` would copy the whole image under the GIL).
    """
    array = np.asarray(pixels)
    step = max(1, min(array.shape[0], array.shape[1]) // (2 * THUMB_SIZE))
    view = array[::step, ::step, 0] if array.shape[-1] in (1, 2) else array[::step, ::step, :3]
    return np.ascontiguousarray(view)


def thumbnail(view: np.ndarray) -> np.ndarray:
    """The 32x32 grayscale (uint8) thumbnail of a ``hash_view``: Pillow's L and box filter."""
    thumb = Image.fromarray(view).convert("L")
    return np.asarray(thumb.resize((THUMB_SIZE, THUMB_SIZE), Image.Resampling.BOX))


def _dct_rows() -> np.ndarray:
    """The first HASH_SIZE rows of scipy.fftpack's unnormalised DCT-II matrix for 32 points."""
    k, n = np.arange(HASH_SIZE)[:, None], np.arange(THUMB_SIZE)[None, :]
    return 2.0 * np.cos(np.pi * k * (2 * n + 1) / (2 * THUMB_SIZE))


def perceptual_hashes(thumbs: np.ndarray) -> list[int]:
    """``imagehash.phash`` of each 32x32 thumbnail in ``thumbs`` (N, 32, 32), as 64-bit ints.

    The same maths as imagehash (2-D DCT-II, 8x8 lowest frequencies against their median,
    bits row-major, first bit highest), for all thumbnails in one matrix product rather than
    one scipy call per image under the GIL; ``tests/test_builder.py`` checks it against
    imagehash itself.
    """
    thumbs = np.asarray(thumbs, dtype=np.float64).reshape(-1, THUMB_SIZE, THUMB_SIZE)
    rows = _dct_rows()
    low = (rows @ thumbs @ rows.T).reshape(len(thumbs), -1)
    bits = low > np.median(low, axis=1, keepdims=True)
    return [int.from_bytes(b.tobytes(), "big") for b in np.packbits(bits, axis=1)]


def perceptual_hash(pixels: tf.Tensor) -> int:
    """64-bit DCT perceptual hash (imagehash.phash) of decoded ``pixels`` (H, W, C)."""
    return perceptual_hashes(thumbnail(hash_view(pixels))[None])[0]


def _header(data: bytes) -> tuple[str | None, int, int, str | None]:
    """(pillow format, width, height, error) from the header alone, without decoding.

    ``--max-pixels`` is the size guard (checked by the caller); Pillow's own error above twice
    its limit is kept. No ``warnings.catch_warnings`` here: it is not thread-safe, and this
    runs in the decode threads.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.format, im.width, im.height, None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:  # -W error
        return None, 0, 0, f"too large (decompression-bomb guard): {err}"
    except UnidentifiedImageError:
        return None, 0, 0, "not an image: no known image format (Pillow cannot identify it)"
    except (OSError, SyntaxError, ValueError) as err:
        return None, 0, 0, f"not an image: unreadable header ({err})"


def check_file(path: Path, recover_truncated: bool, max_pixels: int) -> Checked:
    """One file's verdict; a good one carries its thumbnail for ``check_all``'s hashing."""
    out = Checked(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        out.reason = f"unreadable: {err}"
        return out
    if not data:
        out.reason = "empty file (0 bytes)"
        return out
    out.sha256 = hashlib.sha256(data).hexdigest()
    fmt = sniff(data)
    pil_format, width, height, error = _header(data)
    if error and error.startswith("too large"):
        out.reason = error
        return out
    if fmt is None:
        out.reason = (
            error if error else f"unsupported format {pil_format}: only JPEG and PNG are accepted"
        )
        return out
    if error:
        out.reason = f"undecodable {fmt}: {error.removeprefix('not an image: ')}"
        return out
    if width * height > max_pixels:
        out.reason = (
            f"too large: {width}x{height} = {width * height} pixels exceeds --max-pixels "
            f"{max_pixels} (decompression-bomb guard)"
        )
        return out
    try:
        pixels = tf.io.decode_image(data, channels=0, expand_animations=False)
    except tf.errors.InvalidArgumentError as err:
        first = tf_message(err)
        recovered = _recover_jpeg(data) if fmt == "jpeg" else None
        if recovered is None:
            out.reason = f"undecodable {fmt}: tf.io.decode_image failed ({first})"
            return out
        if not recover_truncated:
            out.reason = (
                f"truncated JPEG: tf.io.decode_jpeg fails ({first}); "
                "--recover-truncated keeps it as a lossless re-encode"
            )
            return out
        pixels = recovered
        fmt = "png"
        out.recovered = tf.io.encode_png(pixels).numpy()
    out.image_format = fmt
    out.height, out.width, out.channels = (int(d) for d in pixels.shape)
    out.thumb = hash_view(pixels)  # check_all thumbnails and hashes it
    return out


def tf_message(err: Exception) -> str:
    """TF's error text without its ``{{function_node ...}}`` and ``[Op:...]`` decorations."""
    text = re.sub(r"\{\{.*?\}\}\s*", "", str(err)).split("[Op:")[0].strip()
    return (text.splitlines() or [""])[-1][:200]


def _recover_jpeg(data: bytes) -> tf.Tensor | None:
    try:
        return tf.io.decode_jpeg(
            data, try_recover_truncated=True, acceptable_fraction=RECOVER_FRACTION
        )
    except tf.errors.InvalidArgumentError:
        return None


def check_all(
    paths: list[Path],
    recover_truncated: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int | None = None,
    progress: bool = True,
) -> list[Checked]:
    """Check every file in parallel; results in the order of ``paths``, good ones with
    their perceptual hash (computed for all at once, after the decoding)."""
    workers = workers or os.cpu_count() or 1
    checks = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda p: check_file(p, recover_truncated, max_pixels), paths)
        bar = tqdm(results, total=len(paths), desc="validate", unit="img", disable=not progress)
        for c in bar:
            # Pillow's thumbnail here, in the thread that mostly waits: in the workers its
            # GIL hand-offs cost a quarter of the decoding time (measured on fracatlas-mini).
            if c.thumb is not None:
                c.thumb = thumbnail(c.thumb)
            checks.append(c)
    good = [c for c in checks if c.thumb is not None]
    if good:
        hashes = perceptual_hashes(np.stack([c.thumb for c in good]))
        for c, h in zip(good, hashes, strict=True):
            c.phash, c.thumb = h, None
    return checks
