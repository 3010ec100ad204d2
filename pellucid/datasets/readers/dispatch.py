"""The single door through which pixels enter pellucid: :func:`read_image` checks the file, sends
DICOM (by suffix, preamble or header) to :func:`~pellucid.datasets.readers.dicom.read_dicom` and
ordinary images to Pillow, and converts to the requested channel count."""

from __future__ import annotations

import os

from pellucid.datasets.readers.common import _check_file, _warn
from pellucid.datasets.readers.detect import is_dicom
from pellucid.datasets.readers.dicom import read_dicom
from pellucid.datasets.readers.image import IMAGE_SUFFIXES, Image, ImageReadError
from pellucid.datasets.readers.pil import _read_pil

__all__ = [
    "read_image",
]


def read_image(
    path: str | os.PathLike[str],
    *,
    frame: int | None = None,
    window: tuple[float, float] | None = None,
    channels: int | None = None,
) -> Image:
    """Read an image or DICOM file into an :class:`Image`.

    Args:
        path: a ``.png``, ``.jpg``/``.jpeg``, ``.tif``/``.tiff``, ``.bmp`` or DICOM file (by
            suffix, preamble or header, see :func:`is_dicom`).
        frame: 0-based frame of a multi-frame file. DICOM defaults to the middle frame, a
            multi-page TIFF to the first page.
        window: DICOM ``(center, width)`` in modality units (e.g. Hounsfield units), applied
            instead of the file's VOI. Ignored, with a warning, for ordinary images and colour
            DICOM.
        channels: 1 for ``(H, W, 1)`` (RGB becomes luminance), 3 for ``(H, W, 3)`` (gray is
            replicated), None to keep the file's own (gray gives 1, colour gives 3).

    Returns:
        The image, float32 ``(H, W, C)`` in ``[0, 1]``, RGB order.

    Raises:
        ImageReadError: the file is missing, empty, corrupt, of an unsupported type, a DICOM
            object without an image, or compressed with a codec no installed decoder handles.
        ValueError: ``channels`` is not 1, 3 or None, or ``window`` has a width <= 0.
    """
    if channels not in (None, 1, 3):
        raise ValueError(f"channels={channels!r} is not supported: use 1, 3 or None (keep native)")
    p = _check_file(path)
    if is_dicom(p):
        image = read_dicom(p, frame=frame, window=window)
    elif p.suffix.lower() in IMAGE_SUFFIXES:
        if window is not None:
            _warn(
                f"window={window!r} ignored for {p.name}: windowing applies to DICOM only"
            )
        image = _read_pil(p, frame=frame)
    else:
        raise ImageReadError(
            f"{p}: unsupported file type {p.suffix or '(no suffix)'!r} and no DICOM header "
            "found — "
            f"convert it to one of {', '.join(sorted(IMAGE_SUFFIXES))} or DICOM"
        )
    if channels is not None and image.array.shape[2] != channels:
        if channels == 1:
            image.array = image.gray
            image.meta["notes"].append("converted RGB to gray (ITU-R BT.601 luminance)")
        else:
            image.array = image.rgb
            image.meta["notes"].append("replicated gray to 3 channels")
    return image
