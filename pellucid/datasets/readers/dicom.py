"""Reading DICOM (:func:`read_dicom`): parsing with pydicom, refusing objects that are not images
(no pixel data, segmentations, structure sets, ...), the transfer syntax (inferred for headless
files) and the defaults old files omit, frame choice, and decoding one frame with a clear message
when no installed decoder handles its compression. The pixel values are then mapped to
``[0, 1]`` by :mod:`pellucid.datasets.readers.dicom_values`."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pellucid.datasets.readers.common import _check_file, _check_window, _one_line, _warn
from pellucid.datasets.readers.detect import _DICOM_INSTALL_HINT, _has_image_object_attributes, _import_pydicom
from pellucid.datasets.readers.dicom_values import _dicom_colour, _dicom_monochrome, _frame_view
from pellucid.datasets.readers.image import IMAGE_SUFFIXES, Image, ImageReadError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = [
    "read_dicom",
]

logger = logging.getLogger(__name__)


# Modalities whose objects are not pictures of the patient, even when they carry pixel data.
_NON_IMAGE_MODALITIES: dict[str, str] = {
    "SEG": "a segmentation",
    "RTSTRUCT": "a radiotherapy structure set",
    "RTPLAN": "a radiotherapy plan",
    "RTDOSE": "a radiotherapy dose grid",
    "RTRECORD": "a radiotherapy treatment record",
    "SR": "a structured report",
    "PR": "a presentation state",
    "KO": "a key object selection",
    "REG": "a registration",
}


def read_dicom(
    path: str | os.PathLike[str],
    *,
    frame: int | None = None,
    window: tuple[float, float] | None = None,
) -> Image:
    """Read one frame of a DICOM file, windowed and normalised to ``[0, 1]``.

    Steps (each recorded in ``meta['notes']``): parse with ``force=True`` (files without the
    128-byte preamble work); decode the chosen frame (pydicom handles BitsStored, signedness,
    big-endian and compressed syntaxes; YBR is converted to RGB); apply the modality LUT or
    rescale slope/intercept; apply the VOI (explicit ``window`` first, else the file's VOI LUT
    Sequence or first Window Center/Width, else the frame's min-max); invert MONOCHROME1.
    Per-frame functional groups of enhanced multi-frame objects are honoured. Colour images are
    scaled by their largest storable value and are not windowed.

    Args:
        path: the DICOM file.
        frame: 0-based frame; default the middle frame ``n_frames // 2``.
        window: ``(center, width)`` in modality units; overrides the file's VOI.

    Returns:
        The image, float32 ``(H, W, 1)`` for monochrome or ``(H, W, 3)`` for colour, in ``[0, 1]``.

    Raises:
        ImageReadError: missing or unparsable file, no pixel data, a non-image object (SEG,
            RTSTRUCT, ...), frame out of range, undecodable or truncated pixel data, or a
            transfer syntax no installed decoder handles.
        ValueError: ``window`` is not a pair with width > 0.
    """
    p = _check_file(path)
    window = _check_window(window)
    pydicom = _import_pydicom(p)
    caveats: list[str] = []
    # pydicom reports non-conformant header values (a DS too long, ...) as warnings while values
    # are read lazily. They are chatter for our purpose and may quote identifying values, so only
    # their count is logged; our own caveats are warned once the reading is done.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            image = _read_dicom(pydicom, p, frame, window, caveats)
        finally:
            if caught:
                logger.debug("pydicom: %d header warning(s) while reading %s", len(caught), p.name)
    for message in caveats:
        _warn(message)
    return image


def _read_dicom(
    pydicom: Any,
    p: Path,
    frame: int | None,
    window: tuple[float, float] | None,
    caveats: list[str],
) -> Image:
    ds = _parse(pydicom, p)
    notes: list[str] = []
    modality = _image_modality(ds, p)

    tsyntax = _ensure_transfer_syntax(ds, notes)
    _fill_retired_defaults(ds, p, notes, caveats)

    n_frames = _number_of_frames(ds)
    frame = _choose_frame(frame, n_frames, p, notes)

    arr, photometric = _decode_frame(ds, p, tsyntax, frame, notes)
    bits_stored = int(ds.get("BitsStored", 0) or 0) or int(arr.dtype.itemsize * 8)
    original_photometric = str(ds.PhotometricInterpretation).strip().upper()
    view = _frame_view(ds, frame)
    slope = float(view.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(view.get("RescaleIntercept", 0.0) or 0.0)

    meta: dict[str, Any] = {
        "path": str(p),
        "format": "dicom",
        "original_size": (int(arr.shape[0]), int(arr.shape[1])),
        "mode": original_photometric,
        "modality": modality or None,
        "body_part": _text_tag(ds, "BodyPartExamined"),
        "sop_class": _sop_class_name(ds),
        "photometric": original_photometric,
        "monochrome1_inverted": False,
        "rescale": (slope, intercept),
        "window": None,
        "voi_lut_applied": False,
        "frame": frame,
        "n_frames": n_frames,
        "bits_stored": bits_stored,
        "transfer_syntax": str(tsyntax),
        "transfer_syntax_name": tsyntax.name,
        "notes": notes,
    }
    if tsyntax.is_compressed and not getattr(tsyntax, "is_deflated", False):
        notes.append(f"decoded {tsyntax.name}")
    if ds.get("LossyImageCompression") == "01":
        notes.append("the file states it has undergone lossy compression")

    if arr.ndim == 3:  # colour
        if window is not None:
            caveats.append(
                f"window={window!r} ignored for {p.name}: it is a colour ({original_photometric}) "
                "image"
            )
        out = _dicom_colour(arr, ds, photometric, bits_stored, p, notes, caveats)
    else:
        out = _dicom_monochrome(arr, view, window, meta, p, notes, caveats)
        if original_photometric == "MONOCHROME1":
            out = 1.0 - out
            meta["monochrome1_inverted"] = True
            notes.append("inverted MONOCHROME1 so that higher values are brighter")
        out = out[:, :, None]

    image = Image(np.clip(out, 0.0, 1.0).astype(np.float32, copy=False), meta)
    logger.debug("read %s: shape %s; %s", p.name, image.array.shape, "; ".join(notes))
    return image


def _parse(pydicom: Any, p: Path) -> Dataset:
    """The whole dataset of ``p`` (``force=True``: files without the preamble work)."""
    try:
        ds = pydicom.dcmread(p, force=True)
    except Exception as err:  # noqa: BLE001 - pydicom raises many types on corrupt files
        raise ImageReadError(
            f"{p}: could not be parsed as DICOM ({_one_line(err)}) — the file is corrupt or "
            "truncated; re-export it"
        ) from err
    return ds


def _image_modality(ds: Dataset, p: Path) -> str:
    """The upper-case Modality of an image object; refuses datasets that are not images."""
    if not _has_image_object_attributes(ds):
        raise ImageReadError(
            f"{p}: is not a DICOM file (no DICOM header found) — pass a .dcm image or an "
            f"ordinary image ({', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    modality = str(ds.get("Modality", "") or "").strip().upper()
    described = _describe_object(ds, modality)
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ImageReadError(
            f"{p}: has no pixel data ({described}); it is not an image — export the image series "
            "instead"
        )
    if modality in _NON_IMAGE_MODALITIES:
        raise ImageReadError(
            f"{p}: is {_NON_IMAGE_MODALITIES[modality]} ({described}), not an image — export the "
            "image series instead"
        )
    return modality


def _choose_frame(frame: int | None, n_frames: int, p: Path, notes: list[str]) -> int:
    """The 0-based frame to read: ``frame`` checked against ``n_frames``, or the middle one."""
    if frame is None:
        frame = n_frames // 2
        if n_frames > 1:
            notes.append(f"frame {frame} of {n_frames} (middle frame by default)")
    elif isinstance(frame, bool) or not isinstance(frame, (int, np.integer)):
        raise ImageReadError(f"{p}: frame={frame!r} is not an integer — pass 0..{n_frames - 1}")
    elif not 0 <= int(frame) < n_frames:
        raise ImageReadError(
            f"{p}: frame {frame} is out of range — the file has {n_frames} frame(s), "
            f"pass 0..{n_frames - 1}"
        )
    else:
        frame = int(frame)
        if n_frames > 1:
            notes.append(f"frame {frame} of {n_frames} (requested)")
    return frame


def _text_tag(ds: Dataset, keyword: str) -> str | None:
    """A short coded-string tag, upper-cased, or None when absent or unreadable (never raises)."""
    try:
        value = str(ds.get(keyword, "") or "").strip().upper()
    except Exception:  # noqa: BLE001 - a corrupt element must not stop reading the pixels
        return None
    return value[:64] if value and value.replace("_", "").replace(" ", "").isalnum() else None


def _sop_class_name(ds: Dataset) -> str | None:
    """The SOP class's registered name (e.g. ``CT Image Storage``), or None when unknown."""
    try:
        sop = ds.get("SOPClassUID")
        name = getattr(sop, "name", None)
    except Exception:  # noqa: BLE001 - as above
        return None
    return name if name and name != str(sop) else None


def _describe_object(ds: Dataset, modality: str) -> str:
    parts = [f"Modality {modality or 'unknown'}"]
    sop = ds.get("SOPClassUID")
    if sop is not None:
        name = getattr(sop, "name", str(sop))
        if name and name != str(sop):
            parts.append(name)
    return ", ".join(parts)


def _ensure_transfer_syntax(ds: Dataset, notes: list[str]) -> Any:
    """Return the Transfer Syntax UID, inferring it from the encoding of headless files."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import (
        UID,
        ExplicitVRBigEndian,
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
    )

    if getattr(ds, "file_meta", None) is None:
        ds.file_meta = FileMetaDataset()
    uid = ds.file_meta.get("TransferSyntaxUID")
    if uid:
        return UID(str(uid))
    implicit, little = ds.original_encoding
    if implicit:
        uid = ImplicitVRLittleEndian
    elif little is False:
        uid = ExplicitVRBigEndian
    else:
        uid = ExplicitVRLittleEndian
    ds.file_meta.TransferSyntaxUID = uid
    notes.append(f"no file meta header: transfer syntax inferred as {uid.name}")
    return uid


def _fill_retired_defaults(
    ds: Dataset, path: Path, notes: list[str], caveats: list[str]
) -> None:
    """Supply the image-pixel attributes that old (ACR-NEMA style) files omit."""
    missing = []
    if "SamplesPerPixel" not in ds:
        ds.SamplesPerPixel = 1
        missing.append("SamplesPerPixel=1")
    if "PhotometricInterpretation" not in ds:
        ds.PhotometricInterpretation = "MONOCHROME2" if ds.SamplesPerPixel == 1 else "RGB"
        missing.append(f"PhotometricInterpretation={ds.PhotometricInterpretation}")
    if "BitsStored" not in ds and "BitsAllocated" in ds:
        ds.BitsStored = ds.BitsAllocated
        missing.append(f"BitsStored={ds.BitsStored}")
    if "HighBit" not in ds and "BitsStored" in ds:
        ds.HighBit = int(ds.BitsStored) - 1
    if "PixelRepresentation" not in ds:
        ds.PixelRepresentation = 0
        missing.append("PixelRepresentation=0")
    if missing:
        notes.append("missing attributes assumed: " + ", ".join(missing))
        caveats.append(
            f"{path.name}: missing DICOM attributes assumed ({', '.join(missing)}); check the "
            "image looks right"
        )


def _number_of_frames(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def _missing_decoder_packages(tsyntax: Any) -> list[str] | None:
    """None when an installed decoder handles ``tsyntax``; else the plugins that would.

    An empty list means pydicom has no decoder for ``tsyntax`` at all.
    """
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        return []
    if decoder.is_available:
        return None
    return list(decoder.missing_dependencies)


def _decode_frame(
    ds: Dataset, path: Path, tsyntax: Any, frame: int, notes: list[str]
) -> tuple[np.ndarray, str]:
    """Decode one frame: ``(H, W)`` or ``(H, W, 3)``, and its photometric interpretation."""
    try:
        from pydicom.pixels import as_pixel_options, get_decoder
    except ImportError as err:  # pydicom < 3
        raise ImageReadError(
            f"{path}: pellucid needs pydicom >= 3.0 to decode DICOM pixels — "
            f"{_DICOM_INSTALL_HINT} (or pip install -U pydicom)"
        ) from err

    missing = _missing_decoder_packages(tsyntax)
    if missing == []:
        raise ImageReadError(
            f"{path}: pixel data uses transfer syntax {tsyntax} ({tsyntax.name}), which pydicom "
            "cannot decode — convert the file to an uncompressed transfer syntax (e.g. with "
            "dcmtk's dcmdjpeg or gdcmconv --raw)"
        )
    if missing is not None:
        options = f" (or one of: {'; '.join(missing)})"
        raise ImageReadError(
            f"{path}: pixel data uses transfer syntax {tsyntax} ({tsyntax.name}), which no "
            f"installed decoder handles — {_DICOM_INSTALL_HINT} for pylibjpeg and "
            f"pylibjpeg-libjpeg{options}, or convert the file to an uncompressed transfer syntax"
        )
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            decoder = get_decoder(tsyntax)
            arr, props = decoder.as_array(ds, index=frame, **as_pixel_options(ds))
    except Exception as err:  # noqa: BLE001 - decoders raise many types on bad data
        raise ImageReadError(
            f"{path}: pixel data could not be decoded ({_one_line(err)}) — the file is corrupt "
            "or truncated; re-export it"
        ) from err
    for message in dict.fromkeys(" ".join(str(w.message).split()) for w in caught):
        notes.append(f"pydicom: {message}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    photometric = str(props.get("photometric_interpretation", ds.PhotometricInterpretation))
    return arr, photometric.strip().upper()
