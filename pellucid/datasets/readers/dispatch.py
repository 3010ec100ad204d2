"""The single door through which pixels enter pellucid: :func:`read_image` checks the file, sends
DICOM (by suffix, preamble or header) to :func:`~pellucid.datasets.readers.dicom.read_dicom` and
ordinary images to Pillow, and converts to the requested channel count.

Whatever the bytes, :func:`read_image` returns a finite float32 image in ``[0, 1]`` or raises
:class:`ImageReadError` with one line that names the file, says what is wrong and what to do: an
unexpected failure anywhere below is reported by its exception type only (its text may quote
header values), and MemoryError becomes a refusal too."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pellucid.datasets.readers.common import check_file, _check_window, _is_panic, _out_of_memory, _warn
from pellucid.datasets.readers.detect import is_dicom
from pellucid.datasets.readers.dicom import read_dicom
from pellucid.datasets.readers.image import DICOM_SUFFIXES, IMAGE_SUFFIXES, Image, ImageReadError
from pellucid.datasets.readers.limits import max_pixels
from pellucid.datasets.readers.pil import _read_pil, content_format

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
        ValueError: ``channels`` is not 1, 3 or None, ``window`` has a width <= 0, or
            ``PELLUCID_MAX_PIXELS`` is set but not a positive integer.
    """
    if channels not in (None, 1, 3):
        raise ValueError(f"channels={channels!r} is not supported: use 1, 3 or None (keep native)")
    window = _check_window(window)
    max_pixels()  # a malformed PELLUCID_MAX_PIXELS is a configuration error, not a corrupt file
    p = check_file(path)
    try:
        image = _read(p, frame, window)
        if channels is not None and image.array.shape[2] != channels:
            if channels == 1:
                image.array = image.gray
                image.meta["notes"].append("converted RGB to gray (ITU-R BT.601 luminance)")
            else:
                image.array = image.rgb
                image.meta["notes"].append("replicated gray to 3 channels")
    except ImageReadError:
        raise
    except MemoryError as err:
        raise _out_of_memory(p) from err
    except BaseException as err:  # noqa: BLE001 - the door: nothing but ImageReadError leaves it
        if not isinstance(err, Exception) and not _is_panic(err):
            raise  # an interrupt, or the interpreter exiting
        kind = "DICOM header" if p.suffix.lower() in DICOM_SUFFIXES else "file"
        raise ImageReadError(
            f"{p}: could not be decoded: the {kind} is corrupt ({type(err).__name__}) — "
            "re-export it"
        ) from err
    if not _valid(image.array):
        raise ImageReadError(
            f"{p}: could not be decoded: the pixel values are not finite numbers in [0, 1] — "
            "the file is corrupt; re-export it"
        )
    return image


def _valid(array: np.ndarray) -> bool:
    return (
        array.dtype == np.float32
        and array.ndim == 3
        and array.shape[2] in (1, 3)
        and array.size > 0
        and bool(np.isfinite(array).all())
        and float(array.min()) >= 0.0
        and float(array.max()) <= 1.0
    )


def _image_named_dicom(p: Path) -> str | None:
    """The format of a PNG, JPEG, TIFF or BMP image under a DICOM suffix (``scan.dcm`` saved as a PNG),
    told by its content; None for anything else, and always for a file with the DICOM preamble."""
    if p.suffix.lower() not in DICOM_SUFFIXES:
        return None
    try:
        with p.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return None
    if head[128:132] == b"DICM":
        return None
    return content_format(p)


#: archives a user may hand over in place of the images they hold (read as none of them)
_ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".7z", ".rar")


def _read(p: Path, frame: int | None, window: tuple[float, float] | None) -> Image:
    renamed = _image_named_dicom(p)
    if is_dicom(p) and renamed is None:
        return read_dicom(p, frame=frame, window=window)
    if p.suffix.lower() in IMAGE_SUFFIXES or renamed is not None:
        if window is not None:
            _warn(
                f"window={window!r} ignored for {p.name}: windowing applies to DICOM only"
            )
        image = _read_pil(p, frame=frame)
        if renamed is not None:
            image.meta["notes"].append(f"a {renamed} image named {p.suffix}: read as {renamed}")
        return image
    if p.name.lower().endswith(_ARCHIVE_SUFFIXES):
        raise ImageReadError(
            f"{p}: is an archive ({p.suffix.lower()}), not an image — unpack it and give the folder "
            "(the web app's Batch page takes a zip as it is)"
        )
    raise ImageReadError(
        f"{p}: unsupported file type {p.suffix or '(no suffix)'!r} and no DICOM header found — "
        f"convert it to one of {', '.join(sorted(IMAGE_SUFFIXES))} or DICOM"
    )
