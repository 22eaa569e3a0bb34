"""Images that are not 8-bit JPEG/PNG, mapped to 8 bits the one way the builder and
``kerasfrac predict`` share: DICOM (modality LUT, its VOI LUT table or window, MONOCHROME1
inverted) and
16-bit PNGs (GRAZPEDWRI-DX), whose full stored range is the window. TensorFlow-free."""

from __future__ import annotations

import io

import numpy as np

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def is_dicom(data: bytes) -> bool:
    """A DICOM file by its preamble (``DICM`` at byte 128)."""
    return data[128:132] == b"DICM"


def png_bit_depth(data: bytes) -> int | None:
    """The bit depth in a PNG's IHDR chunk (8 or 16 for X-rays), None if not a PNG."""
    if data.startswith(PNG_MAGIC) and len(data) >= 25 and data[12:16] == b"IHDR":
        return data[24]
    return None


def window(x: np.ndarray, center: float | None = None, width: float | None = None) -> np.ndarray:
    """Values -> [0, 1]: DICOM's linear window (PS3.3 C.11.2.1.2) where one is given, else
    the image's own minimum..maximum (a flat image becomes 0)."""
    x = np.asarray(x, dtype=np.float64)
    if center is not None and width is not None:
        y = (x - (center - 0.5)) / max(width - 1, 1.0) + 0.5
    else:
        lo, hi = float(x.min()), float(x.max())
        y = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    return np.clip(y, 0.0, 1.0)


def to_uint8(y: np.ndarray) -> np.ndarray:
    """[0, 1] -> uint8, rounded."""
    return np.round(np.asarray(y) * 255).astype(np.uint8)


def png16_to_uint8(pixels: np.ndarray) -> np.ndarray:
    """A 16-bit PNG's pixels (H, W[, C]) -> uint8 by the image's own min..max window, the
    way a DICOM without a window is mapped (GRAZPEDWRI's exports use a varying part of the
    16-bit range, so a fixed shift by 8 bits would leave some nearly black)."""
    return to_uint8(window(pixels))


def dicom_to_uint8(data: bytes) -> np.ndarray:
    """DICOM bytes -> uint8 [H, W] (grayscale) or [H, W, 3] (color), display-ready."""
    import pydicom
    from pydicom.pixels import apply_modality_lut

    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    pixels = ds.pixel_array
    if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
        pixels = pixels[0]
    if int(getattr(ds, "SamplesPerPixel", 1)) == 3:  # color: scale the stored range to 8 bit
        bits = int(getattr(ds, "BitsStored", 8))
        return np.round(pixels.astype(np.float64) / (2**bits - 1) * 255).astype(np.uint8)
    x = apply_modality_lut(pixels, ds)
    center, width = getattr(ds, "WindowCenter", None), getattr(ds, "WindowWidth", None)
    luts = getattr(ds, "VOILUTSequence", None)
    if luts:  # a VOI LUT table, preferred to a window (pydicom's default too)
        from pydicom.pixels import apply_voi_lut

        bits = int(luts[0].LUTDescriptor[2])  # bits per LUT entry: its output range
        y = np.clip(apply_voi_lut(x, ds, prefer_lut=True) / (2**bits - 1), 0.0, 1.0)
    elif center is not None and width is not None:
        c = float(center[0] if isinstance(center, pydicom.multival.MultiValue) else center)
        w = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
        y = window(x, c, w)
    else:
        y = window(x)
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        y = 1.0 - y  # MONOCHROME1: low values are bright; training X-rays show bone bright
    return to_uint8(y)
