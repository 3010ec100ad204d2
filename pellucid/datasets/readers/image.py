"""The :class:`Image` type every reader returns (float32 ``(H, W, C)`` in ``[0, 1]``, RGB order,
with a ``meta`` provenance record), the :class:`ImageReadError` every reader raises, and the file
suffixes pellucid reads (:data:`IMAGE_SUFFIXES`, :data:`DICOM_SUFFIXES`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "BURNED_IN_NOTE",
    "DICOM_SUFFIXES",
    "IMAGE_SUFFIXES",
    "Image",
    "ImageReadError",
]

IMAGE_SUFFIXES: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".jfif", ".jpe", ".tif", ".tiff", ".bmp"})
DICOM_SUFFIXES: frozenset[str] = frozenset({".dcm", ".dicom"})

#: the note a DICOM image carries when its header says text is burned into its pixels (Burned In Annotation YES, as
#: ultrasound and many secondary captures say): the picture, and every overlay and report of it, may show the
#: patient's name or other identifiers, which no header redaction removes
BURNED_IN_NOTE = ("the file says text is burned into its pixels (Burned In Annotation YES): the picture may show the "
                  "patient's name or other identifiers — check it and its overlays before sharing them")


class ImageReadError(ValueError):
    """A file could not be read as an image.

    The message is one line: it names the file, says what is wrong and what to do about it.
    """


@dataclass
class Image:
    """Pixels read from one file, with a record of how they were obtained.

    Attributes:
        array: float32 array of shape ``(H, W, C)``, ``C`` in ``{1, 3}``, values in ``[0, 1]``,
            RGB order (never BGR). A 2-D array is accepted and given a channel axis.
        meta: provenance: ``path``, ``format`` (``'png'``, ``'jpeg'``, ``'tiff'``, ``'bmp'``,
            ``'dicom'``), ``original_size`` ``(H, W)``, ``mode``, ``notes`` (list of what was
            done) and, for DICOM, ``modality``, ``photometric``, ``monochrome1_inverted``,
            ``rescale`` ``(slope, intercept)``, ``window`` ``(center, width)`` or None,
            ``voi_lut_applied``, ``frame``, ``n_frames``, ``bits_stored``, ``transfer_syntax``.
    """

    array: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        array = np.asarray(self.array, dtype=np.float32)
        if array.ndim == 2:
            array = array[:, :, None]
        if array.ndim != 3 or array.shape[2] not in (1, 3):
            raise ValueError(
                f"Image.array has shape {tuple(np.shape(self.array))}: expected (H, W, 1) or "
                "(H, W, 3); convert RGBA/other layouts before building an Image"
            )
        self.array = array

    @property
    def rgb(self) -> np.ndarray:
        """The image as float32 of shape ``(H, W, 3)``; a gray image is replicated."""
        if self.array.shape[2] == 3:
            return self.array
        return np.repeat(self.array, 3, axis=2)

    @property
    def gray(self) -> np.ndarray:
        """The image as float32 of shape ``(H, W, 1)``; RGB becomes ITU-R BT.601 luminance."""
        if self.array.shape[2] == 1:
            return self.array
        return _luminance(self.array)


def _luminance(rgb: np.ndarray) -> np.ndarray:
    weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return (rgb @ weights)[:, :, None].astype(np.float32, copy=False)
