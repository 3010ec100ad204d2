"""The pixel and memory budget of the readers, checked from the header before anything is decoded.

:data:`MAX_PIXELS` (overridable with the ``PELLUCID_MAX_PIXELS`` environment variable, read at
every call of :func:`max_pixels`) is the largest image, in pixels of one frame times samples per
pixel for DICOM, that pellucid agrees to decode. The default, 40 megapixels, sits above the
largest routine radiographs -- full-field digital mammograms are up to about 30 Mpx (e.g. 4096 x
5625 at 50 um), computed radiography plates 10-20 Mpx (35 x 43 cm at 100 um is 3500 x 4300) --
and far below the hostile files that decompress to gigabytes from a few hundred kilobytes. At the
limit, one 16-bit frame is 80 MB and an 8-bit RGB picture 120 MB; nothing bigger is allocated.

Images that pass the limit but are larger than :data:`MAX_SIDE` on their longer side (2048 px,
well above any classifier input) are decoded reduced: JPEG through libjpeg's DCT scaling
(``draft``), everything else by block averaging in its stored integer type, so that no
full-resolution float copy ever exists; the reduction is recorded in ``meta['notes']``.

Deflated DICOM (Deflated Explicit VR Little Endian) is inflated first in bounded chunks and
refused once the inflated dataset exceeds :func:`max_inflated_bytes` (4 bytes per allowed pixel
plus 16 MiB for the header: a 40 Mpx 32-bit frame, or 8-bit RGB, fits).
"""

from __future__ import annotations

import math
import os

import numpy as np

__all__ = [
    "MAX_PIXELS",
    "MAX_FRAME_SCANS",
    "MAX_JPEG_SCANS",
    "MAX_SIDE",
    "jpeg_scans",
    "max_inflated_bytes",
    "max_pixels",
    "reduce_array",
    "reduction_factor",
]

#: Default pixel limit (one frame, times samples per pixel for DICOM); ``PELLUCID_MAX_PIXELS``
#: overrides it.
MAX_PIXELS: int = 40_000_000

#: Images whose longer side exceeds this are decoded reduced (integer factor) to at most this.
MAX_SIDE: int = 2048

#: Scans a JPEG file may hold: a progressive file from a camera or scanner has about 10, a phone's multi-picture
#: file a few dozen with its thumbnails. libjpeg decodes every scan over the whole image, so one scan repeated
#: makes a small file that holds a door for as long as it likes (20,000 scans of a 2000-px picture, 8 MB: 8.9 s).
MAX_JPEG_SCANS: int = 200

#: Scans one compressed DICOM frame may hold (baseline and lossless frames have one per component or one in all,
#: the retired progressive process about 10). pydicom's pylibjpeg decodes a scan about 40 times slower than
#: Pillow: 510 scans of a 2000-px frame took 36 s, 20,000 scans over 10 minutes.
MAX_FRAME_SCANS: int = 32

_ENV = "PELLUCID_MAX_PIXELS"


def jpeg_scans(data: bytes) -> int:
    """Start-of-scan markers (``FF DA``) in JPEG or JPEG-LS data: coded data never holds one (a coded ``FF``
    is followed by ``00``, or in JPEG-LS by a byte under ``80``), so each is a scan (or an embedded
    thumbnail's)."""
    return data.count(b"\xff\xda")


def max_pixels() -> int:
    """The pixel limit in force: ``PELLUCID_MAX_PIXELS`` when set, else :data:`MAX_PIXELS`.

    Raises:
        ValueError: the environment variable is set but is not a positive integer.
    """
    raw = os.environ.get(_ENV, "").strip().replace("_", "")
    if not raw:
        return MAX_PIXELS
    try:
        value = int(float(raw)) if "e" in raw.lower() else int(raw)
    except (ValueError, OverflowError):
        value = 0
    if value <= 0:
        raise ValueError(
            f"{_ENV}={os.environ.get(_ENV)!r} is not a positive integer — set it to a pixel count "
            f"such as {MAX_PIXELS} or unset it"
        )
    return value


def max_inflated_bytes() -> int:
    """The most bytes a deflated DICOM dataset may inflate to: 4 per allowed pixel + 16 MiB."""
    return 4 * max_pixels() + (16 << 20)


def reduction_factor(height: int, width: int, max_side: int = MAX_SIDE) -> int:
    """The smallest integer factor that brings the longer side to at most ``max_side``."""
    return max(1, math.ceil(max(height, width) / max_side))


def reduce_array(arr: np.ndarray, factor: int) -> np.ndarray:
    """Block-average ``arr`` (``(H, W)`` or ``(H, W, C)``, any numeric type) by ``factor``.

    The result is float32 of shape ``(ceil(H / f), ceil(W / f)[, C])``; edge blocks average the
    pixels they have. Works on bands of rows so that at most a few megabytes of float exist at a
    time: the full-resolution array is never converted to float.
    """
    if factor <= 1:
        return arr.astype(np.float32)
    h, w = arr.shape[:2]
    out_h, out_w = -(-h // factor), -(-w // factor)
    out = np.empty((out_h, out_w) + arr.shape[2:], dtype=np.float32)
    band_rows = max(1, (4 << 20) // max(1, w * factor * int(np.prod(arr.shape[2:], dtype=np.int64))))
    for top in range(0, out_h, band_rows):
        stop = min(out_h, top + band_rows)
        band = arr[top * factor : stop * factor].astype(np.float64)
        rows = band.shape[0]
        pad_h, pad_w = (stop - top) * factor - rows, out_w * factor - w
        if pad_h or pad_w:
            pad = [(0, pad_h), (0, pad_w)] + [(0, 0)] * (arr.ndim - 2)
            counts = np.pad(np.ones((rows, w)), pad[:2])
            band = np.pad(band, pad)
        else:
            counts = None
        shape = (stop - top, factor, out_w, factor) + arr.shape[2:]
        sums = band.reshape(shape).sum(axis=(1, 3))
        if counts is not None:
            n = counts.reshape(shape[:4]).sum(axis=(1, 3))
            sums /= n.reshape(n.shape + (1,) * (arr.ndim - 2))
        else:
            sums /= factor * factor
        out[top:stop] = sums
    return out
