"""Telling DICOM files apart (:func:`is_dicom`: suffix, ``DICM`` preamble, or a parsable header
of a headless file) and the shared DICOM plumbing: importing pydicom with an install hint, and
checking that a dataset has the attributes of an image object."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pellucid.datasets.readers.image import DICOM_SUFFIXES, ImageReadError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = [
    "is_dicom",
]

_DICOM_INSTALL_HINT = 'pip install "pellucid[dicom]"'


def is_dicom(path: str | os.PathLike[str]) -> bool:
    """Tell whether a file is DICOM.

    True when the suffix is a DICOM suffix, when the bytes at offset 128 are ``DICM`` (the
    standard preamble), or, for files without a preamble, when the first bytes look like a
    DICOM element tag and pydicom parses a header with at least one image-object attribute.

    Args:
        path: file to test. A missing or unreadable file gives False.

    Returns:
        Whether the file should be read with :func:`read_dicom`.
    """
    p = Path(path)
    if p.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with p.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True
    if len(head) < 8 or not _looks_like_first_tag(head):
        return False
    try:
        import pydicom
    except ImportError:
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(p, force=True, stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - any parse failure just means "not DICOM"
        return False
    return _has_image_object_attributes(ds)


def _import_pydicom(path: Path) -> Any:
    try:
        import pydicom
    except ImportError as err:
        raise ImageReadError(
            f"{path}: reading DICOM needs pydicom, which is not installed — {_DICOM_INSTALL_HINT}"
        ) from err
    return pydicom


def _looks_like_first_tag(head: bytes) -> bool:
    """Whether the first 4 bytes could be the tag of a headless file's first element."""
    for order in ("little", "big"):
        group = int.from_bytes(head[0:2], order)
        if group in (0x0002, 0x0008):
            return True
    return False


def _has_image_object_attributes(ds: Dataset) -> bool:
    keys = ("SOPClassUID", "SOPInstanceUID", "Modality", "StudyInstanceUID", "Rows", "PixelData")
    if any(k in ds for k in keys):
        return True
    file_meta = getattr(ds, "file_meta", None)
    return bool(file_meta) and "MediaStorageSOPClassUID" in file_meta
