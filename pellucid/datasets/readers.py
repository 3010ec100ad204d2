"""Image and DICOM file readers: the single door through which pixels enter pellucid.

Every file, whether an ordinary image (PNG, JPEG, TIFF, BMP) or a DICOM object, is read into an
:class:`Image`: a float32 array of shape ``(H, W, C)`` with ``C`` in ``{1, 3}``, values in
``[0, 1]``, RGB channel order, plus a ``meta`` dict saying where the pixels came from and what was
done to them (``meta['notes']``). DICOM handling follows PS3.3 C.11 through pydicom: the modality
LUT (rescale slope/intercept), then the VOI LUT or window (an explicit ``window=`` argument wins,
then the file's VOI LUT or Window Center/Width, else the frame's min-max), then MONOCHROME1
inversion; multi-frame files yield one frame (the middle one unless asked). Anything that cannot be
read is refused with an :class:`ImageReadError` whose one-line message names the file, says what is
wrong and what to do. :func:`dicom_identifying_tags` exposes the identifying header values so
reports can check redaction; they are never logged.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = [
    "DICOM_SUFFIXES",
    "IDENTIFYING_TAGS",
    "IMAGE_SUFFIXES",
    "Image",
    "ImageReadError",
    "dicom_identifying_tags",
    "is_dicom",
    "read_dicom",
    "read_image",
]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".jfif", ".jpe", ".tif", ".tiff", ".bmp"})
DICOM_SUFFIXES: frozenset[str] = frozenset({".dcm", ".dicom"})

#: DICOM keywords whose values identify a patient, a person or an institution, or date the
#: examination (HIPAA Safe Harbor treats dates as identifiers). Drawn from the Basic Application
#: Level Confidentiality Profile, PS3.15 Table E.1-1. Private tags are not covered.
IDENTIFYING_TAGS: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "OtherPatientIDs",
    "OtherPatientIDsSequence",
    "OtherPatientNames",
    "PatientBirthName",
    "PatientMotherBirthName",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "MedicalRecordLocator",
    "MilitaryRank",
    "ReferringPhysicianName",
    "ReferringPhysicianAddress",
    "ReferringPhysicianTelephoneNumbers",
    "PerformingPhysicianName",
    "NameOfPhysiciansReadingStudy",
    "PhysiciansOfRecord",
    "RequestingPhysician",
    "OperatorsName",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "StationName",
    "DeviceSerialNumber",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "SeriesDate",
    "AcquisitionDate",
    "ContentDate",
)

_DICOM_INSTALL_HINT = 'pip install "pellucid[dicom]"'

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

# Elements a frame's modality/VOI LUT depends on (copied into a per-frame view of the dataset).
_LUT_KEYWORDS: tuple[str, ...] = (
    "PhotometricInterpretation",
    "SamplesPerPixel",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "ModalityLUTSequence",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "VOILUTSequence",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
)

_PIL_FORMATS = {"JPEG": "jpeg", "PNG": "png", "TIFF": "tiff", "BMP": "bmp", "MPO": "jpeg"}


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


# --------------------------------------------------------------------------------------------
# public functions


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
    try:
        ds = pydicom.dcmread(p, force=True)
    except Exception as err:  # noqa: BLE001 - pydicom raises many types on corrupt files
        raise ImageReadError(
            f"{p}: could not be parsed as DICOM ({_one_line(err)}) — the file is corrupt or "
            "truncated; re-export it"
        ) from err

    notes: list[str] = []
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

    tsyntax = _ensure_transfer_syntax(ds, notes)
    _fill_retired_defaults(ds, p, notes, caveats)

    n_frames = _number_of_frames(ds)
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


def dicom_identifying_tags(path: str | os.PathLike[str]) -> dict[str, str]:
    """Return the identifying header values present in a DICOM file, for redaction checks.

    The whole dataset, sequences included, is searched for the keywords in
    :data:`IDENTIFYING_TAGS`; a keyword's top-level value wins over nested ones. Empty values are
    left out. The values are returned, never logged.

    Args:
        path: the DICOM file.

    Returns:
        ``{keyword: value as str}``, e.g. ``{'PatientName': 'Doe^John', 'PatientID': '123'}``;
        empty when nothing identifying is present.

    Raises:
        ImageReadError: the file is missing, or is not DICOM, or cannot be parsed.
    """
    p = _check_file(path)
    if not is_dicom(p):
        raise ImageReadError(f"{p}: is not a DICOM file — identifying tags exist only in DICOM")
    pydicom = _import_pydicom(p)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(p, force=True, stop_before_pixels=True)
    except Exception as err:  # noqa: BLE001
        raise ImageReadError(
            f"{p}: could not be parsed as DICOM ({type(err).__name__}) — the file is corrupt; "
            "re-export it"
        ) from err
    wanted = set(IDENTIFYING_TAGS)
    found: dict[str, str] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's complaints about value formats
        for keyword in IDENTIFYING_TAGS:  # top level first
            if keyword in ds:
                text = _element_text(ds[keyword])
                if text:
                    found[keyword] = text
        for elem in ds.iterall():  # then anything nested in sequences
            keyword = elem.keyword
            if keyword in wanted and keyword not in found:
                text = _element_text(elem)
                if text:
                    found[keyword] = text
    return found


# --------------------------------------------------------------------------------------------
# ordinary images (Pillow)


def _read_pil(path: Path, *, frame: int | None) -> Image:
    from PIL import Image as PILImage
    from PIL import ImageOps

    notes: list[str] = []
    try:
        with PILImage.open(path) as im:
            fmt = _PIL_FORMATS.get(str(im.format), str(im.format).lower())
            n_frames = int(getattr(im, "n_frames", 1) or 1)
            if frame is not None:
                if isinstance(frame, bool) or not isinstance(frame, (int, np.integer)):
                    raise ImageReadError(
                        f"{path}: frame={frame!r} is not an integer — pass 0..{n_frames - 1}"
                    )
                if not 0 <= int(frame) < n_frames:
                    raise ImageReadError(
                        f"{path}: frame {frame} is out of range — the file has {n_frames} "
                        f"frame(s), pass 0..{n_frames - 1}"
                    )
                im.seek(int(frame))
            elif n_frames > 1:
                notes.append(f"frame 0 of {n_frames} (first frame by default)")
            im.load()
            mode = im.mode
            if _exif_rotated(im):
                im = ImageOps.exif_transpose(im)
                notes.append("applied the EXIF orientation")
            original_size = (im.height, im.width)
            array = _pil_to_float(im, path, notes)
    except ImageReadError:
        raise
    except Exception as err:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
        raise ImageReadError(
            f"{path}: cannot be read as an image ({_one_line(err)}) — the file is corrupt, "
            "truncated or not really a "
            f"{path.suffix.lstrip('.').upper() or 'image'}; re-export or re-download it"
        ) from err
    meta: dict[str, Any] = {
        "path": str(path),
        "format": fmt,
        "original_size": original_size,
        "mode": mode,
        "frame": int(frame) if frame is not None else 0,
        "n_frames": n_frames,
        "notes": notes,
    }
    image = Image(array, meta)
    logger.debug("read %s: shape %s; %s", path.name, image.array.shape, "; ".join(notes))
    return image


def _exif_rotated(im: Any) -> bool:
    try:
        return int(im.getexif().get(0x0112, 1)) not in (0, 1)
    except Exception:  # noqa: BLE001 - malformed EXIF is not a reason to refuse the image
        return False


def _pil_to_float(im: Any, path: Path, notes: list[str]) -> np.ndarray:
    """Convert a loaded PIL image to float32 ``(H, W, C)`` in ``[0, 1]``."""
    mode = im.mode
    if mode == "1":
        return np.asarray(im, dtype=np.float32)[:, :, None]
    if mode == "P" or mode == "PA":
        has_alpha = mode == "PA" or "transparency" in im.info
        im = im.convert("RGBA" if has_alpha else "RGB")
        rgb = _pil_to_float(im, path, notes)
        notes.append("expanded palette to RGB")
        if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]):
            notes.append("palette is gray: kept one channel")
            return rgb[:, :, :1]
        return rgb
    if mode in ("L", "RGB"):
        arr = np.asarray(im, dtype=np.float32) / 255.0
    elif mode in ("LA", "La", "RGBA", "RGBa"):
        raw = np.asarray(im.convert("LA" if mode.startswith("L") else "RGBA"), dtype=np.float32)
        raw /= 255.0
        colour, alpha = raw[..., :-1], raw[..., -1:]
        if float(alpha.min()) < 1.0:
            notes.append("composited transparent pixels over black")
            colour = colour * alpha
        else:
            notes.append("dropped an opaque alpha channel")
        arr = colour
    elif mode.startswith("I;16"):
        arr = np.asarray(im).astype(np.float32) / 65535.0
        notes.append("scaled 16-bit values by 65535")
    elif mode == "I":
        raw = np.asarray(im).astype(np.float64)
        bits = _tiff_bits(im)
        if bits is not None and bits <= 32 and raw.min() >= 0:
            peak = float(2**bits - 1)
        elif raw.size and raw.min() >= 0 and raw.max() <= 65535:
            peak, bits = 65535.0, 16
        else:
            peak = 0.0
        if peak:
            arr = (raw / peak).astype(np.float32)
            notes.append(f"scaled {bits}-bit integer values by {peak:.0f}")
        else:
            arr = _min_max(raw).astype(np.float32)
            notes.append("32-bit signed values min-max normalised")
            _warn(
                f"{path.name}: 32-bit integer pixels have no fixed range; min-max normalised"
            )
    elif mode == "F":
        raw = np.asarray(im, dtype=np.float64)
        if not np.all(np.isfinite(raw)):
            raise ImageReadError(
                f"{path}: floating-point image contains NaN or infinite values — fix or "
                "re-export it"
            )
        if raw.size and raw.min() >= 0.0 and raw.max() <= 1.0:
            arr = raw.astype(np.float32)
            notes.append("float values already in [0, 1]")
        else:
            arr = _min_max(raw).astype(np.float32)
            notes.append("float values min-max normalised")
            _warn(
                f"{path.name}: floating-point pixels outside [0, 1]; min-max normalised"
            )
    else:  # CMYK, YCbCr, LAB, HSV, ...
        arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        notes.append(f"converted {mode} to RGB")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr


def _tiff_bits(im: Any) -> int | None:
    tags = getattr(im, "tag_v2", None)
    if tags is None:
        return None
    bits = tags.get(258)
    if isinstance(bits, (tuple, list)):
        bits = bits[0] if bits else None
    return int(bits) if bits else None


# --------------------------------------------------------------------------------------------
# DICOM helpers


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


def _frame_view(ds: Dataset, frame: int) -> Dataset:
    """A small dataset holding the LUT attributes that apply to one frame.

    Top-level attributes first, overridden by the Shared then Per-frame Functional Groups of
    enhanced multi-frame objects (Pixel Value Transformation and Frame VOI LUT macros).
    """
    from pydicom.dataset import Dataset as DicomDataset

    view = DicomDataset()
    view.set_original_encoding(*ds.original_encoding)
    for keyword in _LUT_KEYWORDS:
        if keyword in ds:
            view[keyword] = ds[keyword]
    for groups_kw, index in (
        ("SharedFunctionalGroupsSequence", 0),
        ("PerFrameFunctionalGroupsSequence", frame),
    ):
        groups = ds.get(groups_kw)
        if not groups or len(groups) <= index:
            continue
        item = groups[index]
        for macro in ("PixelValueTransformationSequence", "FrameVOILUTSequence"):
            seq = item.get(macro)
            if seq:
                for elem in seq[0]:
                    view[elem.tag] = elem
    return view


def _dicom_monochrome(
    arr: np.ndarray,
    view: Dataset,
    window: tuple[float, float] | None,
    meta: dict[str, Any],
    path: Path,
    notes: list[str],
    caveats: list[str],
) -> np.ndarray:
    """Modality LUT, then VOI, then normalisation to ``[0, 1]`` (float64 ``(H, W)``)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    if view.get("ModalityLUTSequence"):
        values = apply_modality_lut(arr, view)
        notes.append("applied the Modality LUT Sequence")
    else:
        slope, intercept = meta["rescale"]
        values = arr.astype(np.float64)
        if slope != 1.0 or intercept != 0.0:
            values = values * slope + intercept
            notes.append(f"rescaled: value * {slope:g} + {intercept:g}")
    # The VOI operates on modality values; the view must not rescale them a second time.
    voi_view = _voi_view(view)

    if window is not None:
        center, width = window
        voi_view.WindowCenter = center
        voi_view.WindowWidth = width
        voi_view.VOILUTFunction = "LINEAR" if width >= 1 else "LINEAR_EXACT"
        for keyword in ("VOILUTSequence",):
            if keyword in voi_view:
                del voi_view[keyword]
        out = _apply_voi(values, voi_view, apply_voi_lut)
        meta["window"] = (float(center), float(width))
        notes.append(f"window center {center:g} width {width:g} (requested)")
        return out

    has_lut = bool(voi_view.get("VOILUTSequence"))
    has_window = None not in (voi_view.get("WindowCenter"), voi_view.get("WindowWidth"))
    if has_lut:
        try:
            out = _apply_voi(np.rint(values).astype(np.int64), voi_view, apply_voi_lut)
        except Exception as err:  # noqa: BLE001
            notes.append(f"VOI LUT Sequence unusable ({type(err).__name__})")
        else:
            if out is not None:
                meta["voi_lut_applied"] = True
                notes.append("applied the file's VOI LUT Sequence (first)")
                return out
    if has_window:
        centers = _as_list(voi_view.WindowCenter)
        widths = _as_list(voi_view.WindowWidth)
        if "VOILUTSequence" in voi_view:
            del voi_view["VOILUTSequence"]
        try:
            center, width = float(centers[0]), float(widths[0])
            if not (math.isfinite(center) and math.isfinite(width) and width > 0):
                raise ValueError(f"center {center}, width {width}")
            out = _apply_voi(values, voi_view, apply_voi_lut)
        except Exception as err:  # noqa: BLE001
            notes.append(f"file window unusable ({_one_line(err)})")
            caveats.append(
                f"{path.name}: the file's Window Center/Width is unusable; min-max used instead"
            )
        else:
            if out is not None:
                meta["window"] = (center, width)
                function = str(voi_view.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
                extra = f" (first of {len(centers)})" if len(centers) > 1 else ""
                notes.append(
                    f"window center {center:g} width {width:g} from the file{extra}, {function}"
                )
                return out
    low, high = float(values.min()), float(values.max())
    notes.append(f"no usable VOI in the file: min-max window [{low:g}, {high:g}]")
    if high <= low:
        caveats.append(f"{path.name}: the image is constant (all pixels {low:g})")
    return _min_max(values)


def _voi_view(view: Dataset) -> Dataset:
    from pydicom.dataset import Dataset as DicomDataset

    out = DicomDataset()
    out.set_original_encoding(*view.original_encoding)
    for elem in view:
        if elem.keyword not in ("ModalityLUTSequence", "RescaleSlope", "RescaleIntercept"):
            out[elem.tag] = elem
    if out.get("PhotometricInterpretation") not in ("MONOCHROME1", "MONOCHROME2"):
        out.PhotometricInterpretation = "MONOCHROME2"
    if "BitsStored" not in out:
        out.BitsStored = 16
    if "PixelRepresentation" not in out:
        out.PixelRepresentation = 0
    return out


def _apply_voi(values: np.ndarray, voi_view: Dataset, apply_voi_lut: Any) -> np.ndarray | None:
    """Apply pydicom's VOI and rescale its output range to ``[0, 1]``.

    The output range (which pydicom ties to BitsStored or the LUT depth) is found by passing the
    two extreme inputs through the same transform. Returns None when that range is empty.
    """
    if np.issubdtype(values.dtype, np.integer):
        extremes = np.array([np.iinfo(np.int32).min, np.iinfo(np.int32).max], dtype=np.int64)
    else:
        extremes = np.array([-1e30, 1e30], dtype=np.float64)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        out = np.asarray(apply_voi_lut(values, voi_view, index=0), dtype=np.float64)
        ends = np.asarray(apply_voi_lut(extremes, voi_view, index=0), dtype=np.float64)
    low, high = float(ends.min()), float(ends.max())
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        return None
    return (out - low) / (high - low)


def _dicom_colour(
    arr: np.ndarray,
    ds: Dataset,
    photometric: str,
    bits_stored: int,
    path: Path,
    notes: list[str],
    caveats: list[str],
) -> np.ndarray:
    """Colour pixels to RGB float ``(H, W, 3)`` in ``[0, 1]``."""
    from pydicom.pixels import apply_color_lut, convert_color_space

    peak = float(2**bits_stored - 1)
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        descriptor = ds.get("RedPaletteColorLookupTableDescriptor")
        depth = int(descriptor[2]) if descriptor else 16
        peak = float(2 ** (8 if depth <= 8 else 16) - 1)
        notes.append("applied the palette colour LUT")
    elif photometric.startswith("YBR"):
        try:
            arr = convert_color_space(arr, photometric, "RGB")
            notes.append(f"converted {photometric} to RGB")
        except Exception as err:  # noqa: BLE001
            raise ImageReadError(
                f"{path}: colour space {photometric} cannot be converted to RGB "
                f"({_one_line(err)}) — convert the file to RGB"
            ) from err
    elif photometric != "RGB":
        caveats.append(
            f"{path.name}: unexpected 3-sample photometric interpretation {photometric!r}; "
            "treated as RGB"
        )
    if str(ds.PhotometricInterpretation).strip().upper() != photometric:
        notes.append(
            f"decoder converted {str(ds.PhotometricInterpretation).strip()} to {photometric}"
        )
    if arr.ndim == 2:  # palette applied to a 2-D index image gives (H, W, 3) already
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    notes.append(f"scaled colour values by {peak:.0f}")
    return arr.astype(np.float64) / peak


# --------------------------------------------------------------------------------------------
# small utilities


def _check_file(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if not p.exists():
        raise ImageReadError(f"{p}: not found — check the path")
    if p.is_dir():
        raise ImageReadError(f"{p}: is a directory — pass an image file inside it")
    try:
        size = p.stat().st_size
    except OSError as err:
        raise ImageReadError(
            f"{p}: cannot be accessed ({_one_line(err)}) — check permissions"
        ) from err
    if size == 0:
        raise ImageReadError(f"{p}: is empty (0 bytes) — the file is incomplete; re-export it")
    return p


def _check_window(window: tuple[float, float] | None) -> tuple[float, float] | None:
    if window is None:
        return None
    try:
        center, width = (float(v) for v in window)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"window={window!r} is not a (center, width) pair of numbers, e.g. (40, 400)"
        ) from err
    if not (math.isfinite(center) and math.isfinite(width)) or width <= 0:
        raise ValueError(
            f"window={window!r} needs a finite center and a width > 0, e.g. (40, 400)"
        )
    return center, width


def _luminance(rgb: np.ndarray) -> np.ndarray:
    weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return (rgb @ weights)[:, :, None].astype(np.float32, copy=False)


def _min_max(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros_like(values)
    return (values - low) / (high - low)


def _as_list(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return list(value)
    return [value]


def _element_text(elem: Any) -> str:
    value = elem.value
    if value is None:
        return ""
    if elem.VR == "SQ":
        return f"<sequence of {len(value)} item(s)>" if len(value) else ""
    if isinstance(value, (bytes, bytearray)):
        return value.decode("latin-1", errors="replace").strip("\x00 ")
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value).strip()
    return str(value).strip()


def _warn(message: str) -> None:
    """``warnings.warn`` attributed to the first caller outside this module."""
    frame = inspect.currentframe()
    level = 1
    while frame is not None and frame.f_code.co_filename == __file__:
        frame = frame.f_back
        level += 1
    warnings.warn(message, stacklevel=level)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    if len(text) > 160:
        text = text[:157] + "..."
    return f"{type(err).__name__}: {text}" if not text.startswith(type(err).__name__) else text
