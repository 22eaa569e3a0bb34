"""Decode every image fully, once, and sort the good from the bad.

TensorFlow's own decoder is the judge, since it is what reads the records later: a file that
``tf.io.decode_image`` rejects is quarantined with the reason, never written. Truncated JPEGs
(which the real FracAtlas has) can be kept with ``recover_truncated``: decoded with
``try_recover_truncated`` and stored as a lossless PNG re-encode. The header is read first
(``image_size``; Pillow where that cannot) so that a decompression bomb is refused before any
pixel is decoded.

Work runs in a thread pool: TF's decode kernels release the GIL, so threads scale over cores
without a process per worker each importing TensorFlow.
"""

from __future__ import annotations

import dataclasses
import functools
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

from tfrecords_builder import pixels as pixels_8bit
from tfrecords_builder.defaults import DEFAULT_MAX_PIXELS
from tfrecords_builder.quiet import without_lines

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
    #: what is stored instead of the file: a lossless PNG of a recovered truncated JPEG, or
    #: of a 16-bit PNG or DICOM mapped to 8 bits (``converted`` says which)
    recovered: bytes | None = None
    converted: str | None = None  # "png16" or "dicom" where the image was mapped to 8 bits
    truncated: bool = False  # a truncated JPEG (quarantined, or recovered)
    data: bytes | None = dataclasses.field(default=None, repr=False)  # kept for the writer
    sample: np.ndarray | None = dataclasses.field(default=None, repr=False)  # for the thumb
    thumb: np.ndarray | None = dataclasses.field(default=None, repr=False)  # for the phash


def sniff(data: bytes) -> str | None:
    if data.startswith(JPEG_MAGIC):
        return "jpeg"
    if data.startswith(PNG_MAGIC):
        return "png"
    return None


HASH_SIZE, THUMB_SIZE = 8, 32  # imagehash.phash's defaults: 8x8 low frequencies of 32x32
SAMPLES = 2 * THUMB_SIZE  # pixels sampled per side; each thumbnail pixel averages 2x2 of them
LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601-2 luma, Pillow's "L"
THUMB_CHUNK = 64  # samples made into thumbnails at a time


@functools.lru_cache(maxsize=8192)
def _grid(n: int) -> np.ndarray:
    """The centres of SAMPLES equal bins along a side of ``n`` pixels."""
    return (2 * np.arange(SAMPLES) + 1) * n // (2 * SAMPLES)


@functools.lru_cache(maxsize=8192)
def _columns(width: int, channels: int, keep: int) -> np.ndarray:
    """Flat indices, in a row of ``width`` x ``channels`` bytes, of the grid's first ``keep``
    channels (one ``take`` on a 2-D row block, cheaper than fancy indexing over three axes)."""
    return (channels * _grid(width)[:, None] + np.arange(keep)).ravel()


def hash_sample(pixels: tf.Tensor | np.ndarray) -> np.ndarray:
    """A 64x64 grid of pixel samples of decoded ``pixels`` (H, W, C): (64, 64, 1) for gray,
    (64, 64, 3) for colour, uint8. All a perceptual hash needs, from 64 rows of the image.

    No full-size resize and no Pillow copy: those hold the GIL for a good share of the
    decoding time. ``np.asarray`` views TensorFlow's buffer.
    """
    array = np.asarray(pixels)
    height, width, channels = array.shape
    keep = 1 if channels in (1, 2) else 3
    rows = array[_grid(height)].reshape(SAMPLES, width * channels)
    return rows.take(_columns(width, channels, keep), axis=1).reshape(SAMPLES, SAMPLES, keep)


def thumbnails(samples: list[np.ndarray]) -> np.ndarray:
    """(N, 32, 32) uint8 grayscale thumbnails of ``hash_sample`` outputs: 2x2 box averages,
    then luma (ITU-R 601-2, as Pillow's "L") for colour; vectorised over all samples (adding
    pairs in uint16, then one matrix product, cheaper than luma first in float)."""
    out = np.empty((len(samples), THUMB_SIZE, THUMB_SIZE), np.uint8)
    for channels, weights in ((1, np.ones(1)), (3, LUMA)):
        index = [i for i, s in enumerate(samples) if s.shape[-1] == channels]
        if index:
            stack = np.stack([samples[i] for i in index]).astype(np.uint16)
            pairs = stack.reshape(-1, THUMB_SIZE, 2, THUMB_SIZE, 2 * channels)
            rows = pairs[:, :, 0] + pairs[:, :, 1]  # vertical pairs, (n, 32, 32, 2 channels)
            boxed = rows[..., :channels] + rows[..., channels:]  # then horizontal pairs
            out[index] = np.rint(boxed @ (weights / 4))
    return out


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
    return perceptual_hashes(thumbnails([hash_sample(pixels)]))[0]


JPEG_STANDALONE = {0x01, *range(0xD0, 0xDA)}  # TEM, RSTn, SOI, EOI: markers without a length
JPEG_NOT_SOF = {0xC4, 0xC8, 0xCC}  # DHT, JPG, DAC share the SOFn range


def image_size(data: bytes, fmt: str) -> tuple[int, int] | None:
    """(width, height) from the header of a JPEG (its SOFn segment) or PNG (its IHDR chunk),
    reading no pixel; None where the header is not laid out as the standard says.

    The decompression-bomb guard needs the size before decoding. Pillow's ``Image.open`` (53
    us per FracAtlas file) and ``imagesize`` (25 us) are pure Python too; this is 2.4 us, and
    Python held in the decode threads costs more than its own length in GIL hand-offs (in
    the builder, Pillow's header read cost 0.04x-0.17x of the decode floor's time over
    repeated A/B runs on fracatlas-mini). Anything it cannot read goes to Pillow
    (``_header``), which names the problem.
    """
    if fmt == "png":
        if len(data) >= 24 and data[12:16] == b"IHDR":
            return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        return None
    i, end = 2, len(data) - 9  # after SOI; a SOF segment needs 9 bytes from its marker
    while i < end:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker in JPEG_STANDALONE:
            i += 2
        elif 0xC0 <= marker <= 0xCF and marker not in JPEG_NOT_SOF:
            return (data[i + 7] << 8) | data[i + 8], (data[i + 5] << 8) | data[i + 6]
        else:
            i += 2 + ((data[i + 2] << 8) | data[i + 3])
    return None


def _header(data: bytes) -> tuple[str | None, int, int, str | None]:
    """(pillow format, width, height, error) from the header alone, without decoding: for
    files ``image_size`` cannot read, to name their format or problem.

    Pillow's own error above twice its limit is kept. No ``warnings.catch_warnings`` here: it
    is not thread-safe, and this runs in the decode threads.
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


def check_file(
    path: Path, recover_truncated: bool, max_pixels: int, keep_bytes: bool = False
) -> Checked:
    """One file's verdict; a good one carries its hash sample for ``check_all`` and,
    with ``keep_bytes``, the very bytes that were hashed and decoded (the writer stores those,
    so no file is read twice and nothing can change in between)."""
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
    named_dicom = path.suffix.lower() in (".dcm", ".dicom") and sniff(data) is None
    if pixels_8bit.is_dicom(data) or named_dicom:
        return _check_dicom(out, data, max_pixels)
    fmt = sniff(data)
    size = image_size(data, fmt) if fmt else None
    if size is None:
        pil_format, width, height, error = _header(data)
        if error and error.startswith("too large"):
            out.reason = error
            return out
        if fmt is None:
            out.reason = error or f"unsupported format {pil_format}: only JPEG and PNG are accepted"
            return out
        if error:
            out.reason = f"undecodable {fmt}: {error.removeprefix('not an image: ')}"
            return out
    else:
        width, height = size
    if width * height > max_pixels:
        out.reason = (
            f"too large: {width}x{height} = {width * height} pixels exceeds --max-pixels "
            f"{max_pixels} (decompression-bomb guard)"
        )
        return out
    if fmt == "png" and pixels_8bit.png_bit_depth(data) == 16:
        return _check_png16(out, data)
    try:
        pixels = tf.io.decode_image(data, channels=0, expand_animations=False)
    except tf.errors.InvalidArgumentError as err:
        first = tf_message(err)
        recovered = _recover_jpeg(data) if fmt == "jpeg" else None
        out.truncated = recovered is not None
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
    array = np.asarray(pixels)  # a view of TF's buffer; cheaper than TensorShape
    out.height, out.width, out.channels = array.shape
    out.sample = hash_sample(array)  # check_all makes thumbnails of many at once
    if keep_bytes and out.recovered is None:
        out.data = data
    return out


def _stored_png(out: Checked, array: np.ndarray, converted: str) -> Checked:
    """``out`` for an image stored as a lossless 8-bit PNG of ``array`` (uint8 [H, W(, C)])."""
    array = array[..., None] if array.ndim == 2 else array
    out.recovered = tf.io.encode_png(array).numpy()
    out.converted = converted
    out.image_format = "png"
    out.height, out.width, out.channels = array.shape
    out.sample = hash_sample(array)
    return out


def png16_to_uint8(data: bytes) -> np.ndarray:
    """A 16-bit PNG file -> uint8 [H, W, C] by its own min..max (``pixels.png16_to_uint8``)."""
    pixels = tf.io.decode_png(data, channels=0, dtype=tf.uint16)
    return pixels_8bit.png16_to_uint8(pixels.numpy())


def png16_to_png8(data: bytes) -> bytes:
    """A 16-bit PNG file -> the 8-bit PNG the builder stores (``kerasfrac predict`` too)."""
    return tf.io.encode_png(png16_to_uint8(data)).numpy()


def _check_png16(out: Checked, data: bytes) -> Checked:
    """A 16-bit PNG, mapped to 8 bits by its own min..max."""
    try:
        array = png16_to_uint8(data)
    except tf.errors.InvalidArgumentError as err:
        out.reason = f"undecodable png: tf.io.decode_png failed ({tf_message(err)})"
        return out
    return _stored_png(out, array, "png16")


#: What pydicom raises on a file it cannot read (a bad header, a compressed transfer syntax
#: without its decoder, missing pixel data).
DICOM_ERRORS = (
    ValueError,
    AttributeError,
    KeyError,
    TypeError,
    NotImplementedError,
    RuntimeError,
    OSError,
    EOFError,
)


def _check_dicom(out: Checked, data: bytes, max_pixels: int) -> Checked:
    """A DICOM file: size from its header first, then ``pixels.dicom_to_uint8`` (modality
    LUT, window, MONOCHROME1 inverted), stored as an 8-bit PNG."""
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
        width, height = int(ds.get("Columns", 0) or 0), int(ds.get("Rows", 0) or 0)
    except (pydicom.errors.InvalidDicomError, *DICOM_ERRORS) as err:
        out.reason = f"undecodable dicom: unreadable header ({type(err).__name__}: {err})"
        return out
    if width * height > max_pixels:
        out.reason = (
            f"too large: {width}x{height} = {width * height} pixels exceeds --max-pixels "
            f"{max_pixels} (decompression-bomb guard)"
        )
        return out
    try:
        array = pixels_8bit.dicom_to_uint8(data)
    except (pydicom.errors.InvalidDicomError, *DICOM_ERRORS) as err:
        out.reason = f"undecodable dicom: {type(err).__name__}: {err}"
        return out
    return _stored_png(out, array, "dicom")


def pixel_sample(data: bytes, size: int) -> np.ndarray:
    """The image in ``data`` (as the builder stores it) in grayscale, area-resized to ``size`` x
    ``size``, float32: what the near-duplicate pixel check compares."""
    pixels = tf.io.decode_image(data, channels=1, expand_animations=False)
    small = tf.image.resize(tf.cast(pixels, tf.float32), (size, size), method="area")
    return small.numpy()[..., 0]


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


#: What libjpeg (and TensorFlow's jpeg_mem.cc) print to stderr, naming no file, when a JPEG
#: is truncated: the builder's quarantine names each such file with its reason instead.
TRUNCATION_MESSAGES = (
    "Premature end of JPEG file",
    "Premature end of JPEG data",
    "Input file read error",
)


def is_truncation_message(line: str) -> bool:
    text = line.strip()
    return text.startswith(TRUNCATION_MESSAGES) or (
        "jpeg_mem.cc" in text and any(m in text for m in TRUNCATION_MESSAGES)
    )


def check_all(
    paths: list[Path],
    recover_truncated: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int | None = None,
    progress: bool = True,
    keep_bytes: bool = False,
) -> list[Checked]:
    """Check every file in parallel; results in the order of ``paths``, good ones with
    their perceptual hash (thumbnails in chunks as results come, hashes all at once at the
    end) and, with ``keep_bytes``, their bytes (``Checked.data``)."""
    workers = workers or os.cpu_count() or 1
    checks: list[Checked] = []
    sampled: list[Checked] = []

    def thumbnail_sampled() -> None:
        """Thumbnails in chunks, while the workers decode (numpy's loops release the GIL)."""
        thumbs = thumbnails([c.sample for c in sampled])
        for c, thumb in zip(sampled, thumbs, strict=True):
            c.thumb, c.sample = thumb, None
        sampled.clear()

    def explained(line: str) -> bool:  # libjpeg's nameless lines about the truncated files
        return any(c.truncated for c in checks) and is_truncation_message(line)

    with without_lines(explained) as stderr, ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(
            lambda p: check_file(p, recover_truncated, max_pixels, keep_bytes), paths
        )
        bar = tqdm(
            results,
            total=len(paths),
            desc="validate",
            unit="img",
            disable=not progress,
            file=stderr,
        )
        for c in bar:
            checks.append(c)
            if c.sample is not None:
                sampled.append(c)
                if len(sampled) == THUMB_CHUNK:
                    thumbnail_sampled()
    thumbnail_sampled()
    good = [c for c in checks if c.thumb is not None]
    if good:
        hashes = perceptual_hashes(np.stack([c.thumb for c in good]))
        for c, h in zip(good, hashes, strict=True):
            c.phash, c.thumb = h, None
    return checks
