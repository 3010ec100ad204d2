"""Reading DICOM (:func:`read_dicom`): parsing with pydicom, refusing objects that are not images
(no pixel data, segmentations, structure sets, ...), the transfer syntax (inferred for headless
files) and the defaults old files omit, frame choice, and decoding one frame with a clear message
when no installed decoder handles its compression. The pixel values are then mapped to
``[0, 1]`` by :mod:`pellucid.datasets.readers.dicom_values`.

Hostile or corrupt headers: the image size is checked against the pixel limit
(:mod:`pellucid.datasets.readers.limits`) from Rows, Columns, Samples per Pixel and Number of
Frames -- and, for JPEG-family compressed frames, from the frame's own SOF/SIZ marker -- before any
pixel is decoded; deflated files are inflated under a budget first; large legal frames are
block-averaged to at most ``MAX_SIDE`` in their stored type. Messages quote no header text: only
validated codes (a Modality from the known list, a registered SOP class or transfer syntax name)
and numbers, never a pydicom exception text, which may repeat header values."""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pellucid.datasets.readers.common import (
    check_file, _check_window, _is_panic, _native_stderr_quiet, _out_of_memory, _pydicom_quiet, _warn,
)
from pellucid.datasets.readers.detect import (
    _DICOM_INSTALL_HINT,
    no_header,
    HeaderTooLong,
    ReadTooLarge,
    _check_deflated,
    _CountedReads,
    _has_image_object_attributes,
    _import_pydicom,
    read_dataset,
)
from pellucid.datasets.readers.dicom_values import (
    _dicom_colour,
    _dicom_monochrome,
    _frame_view,
    _header_number,
)
from pellucid.datasets.readers.image import BURNED_IN_NOTE, IMAGE_SUFFIXES, Image, ImageReadError
from pellucid.datasets.readers.limits import MAX_FRAME_SCANS, jpeg_scans, max_pixels, reduce_array, reduction_factor

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

# Modality codes (PS3.3 C.7.3.1.1.1, current and retired) that may appear in a message or in meta.
_KNOWN_MODALITIES: frozenset[str] = frozenset(
    """AR ASMT AU BDUS BI BMD CD CF CP CR CS CT DD DF DG DM DOC DS DX EC ECG EPS ES FA FID FS GM
    HC HD IO IOL IVOCT IVUS KER KO LEN LP LS M3D MA MG MR MS NM OAM OCT OP OPM OPR OPT OPTBSV
    OPTENF OPV OSS OT PLAN POS PR PT PX REG RESP RF RG RTDOSE RTIMAGE RTPLAN RTRECORD RTSTRUCT
    RWV SEG SM SMR SR SRF ST STAIN TEXTUREMAP TG US VA VF XA XAPROTOCOL XC""".split()
)
_MODALITY_PATTERN = re.compile(r"^[A-Z]{1,16}$")

# Photometric interpretations pydicom can decode (PS3.3 C.7.6.3.1.2).
_KNOWN_PHOTOMETRIC: frozenset[str] = frozenset(
    {
        "MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "YBR_FULL", "YBR_FULL_422",
        "YBR_PARTIAL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT", "XYB",
    }
)
# Body Part Examined codes (PS3.16 Annex L, the common ones) that may appear in meta.
_KNOWN_BODY_PARTS: frozenset[str] = frozenset(
    """ABDOMEN ABDOMENPELVIS ANKLE AORTA ARM BLADDER BRAIN BREAST BRONCHUS CAROTID CHEST
    CHESTABDOMEN CHESTABDPELVIS CLAVICLE COCCYX COLON CSPINE CTSPINE EAR ELBOW ESOPHAGUS EXTREMITY
    EYE FACE FEMUR FINGER FOOT FOREARM GALLBLADDER HAND HEAD HEADNECK HEART HIP HUMERUS IAC JAW
    KIDNEY KNEE LARYNX LEG LIVER LSPINE LSSPINE LUNG MEDIASTINUM NECK ORBIT PANCREAS PELVIS
    PROSTATE RIB SACRUM SHOULDER SINUS SKULL SPINE SPLEEN SSPINE STERNUM STOMACH TESTIS THIGH
    THORAX THUMB THYROID TIBIA TLSPINE TMJ TOE TSPINE UTERUS WHOLEBODY WRIST ZYGOMA""".split()
)
_UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_CODE_PATTERN = re.compile(r"^[A-Z0-9_]{1,16}$")

# Total pixels of all frames together (stored data, not decoded) may be this many times the limit.
_ALL_FRAMES_FACTOR = 32


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
    p = check_file(path)
    window = _check_window(window)
    if frame is not None and (isinstance(frame, bool) or not isinstance(frame, (int, np.integer))):
        raise ImageReadError(f"{p}: frame={frame!r} is not an integer — pass a frame number from 0")
    pydicom = _import_pydicom(p)
    caveats: list[str] = []
    # pydicom reports non-conformant header values (a DS too long, ...) as warnings while values
    # are read lazily. They are chatter for our purpose and may quote identifying values, so only
    # their count is logged; our own caveats are warned once the reading is done.
    with warnings.catch_warnings(record=True) as caught, _pydicom_quiet():
        warnings.simplefilter("always")
        try:
            image = _read_dicom(pydicom, p, frame, window, caveats)
        except ImageReadError:
            raise
        except MemoryError as err:
            raise _out_of_memory(p) from err
        except Exception as err:  # noqa: BLE001 - pydicom raises many types on corrupt headers
            raise ImageReadError(_corrupt_header(p, err)) from err
        finally:
            if caught:
                logger.debug("pydicom: %d header warning(s) while reading a DICOM file", len(caught))
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
    original_photometric = _photometric(ds, p)

    n_frames = _number_of_frames(ds)
    _check_size(ds, p, n_frames)
    frame = _choose_frame(frame, n_frames, p, notes)

    arr, photometric = _decode_frame(ds, p, tsyntax, frame, notes)
    rows, columns = int(arr.shape[0]), int(arr.shape[1])
    bits_stored = _header_int(ds, "BitsStored", 1, 64) or int(arr.dtype.itemsize * 8)
    arr = _reduce_frame(arr, photometric, notes)
    view = _frame_view(ds, frame)
    slope = _header_number(view, "RescaleSlope", 1.0, p, limit=1e6)
    intercept = _header_number(view, "RescaleIntercept", 0.0, p, limit=1e9)

    meta: dict[str, Any] = {
        "path": str(p),
        "format": "dicom",
        "original_size": (rows, columns),
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
        "transfer_syntax": _uid_text(tsyntax),
        "transfer_syntax_name": _uid_name(tsyntax),
        "notes": notes,
    }
    if tsyntax.is_compressed and not getattr(tsyntax, "is_deflated", False):
        notes.append(f"decoded {_uid_name(tsyntax) or 'a compressed transfer syntax'}")
    if _safe_get(ds, "LossyImageCompression") == "01":
        notes.append("the file states it has undergone lossy compression")
    if str(_safe_get(ds, "BurnedInAnnotation") or "").strip().upper() == "YES":
        notes.append(BURNED_IN_NOTE)

    if arr.ndim == 3 or photometric == "PALETTE COLOR":  # colour (palette indices are one sample)
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

    if not np.all(np.isfinite(out)):
        raise ImageReadError(
            f"{p}: pixel values are not finite (NaN or infinite) after the rescale and window — "
            "the header's rescale/window values or the pixel data are corrupt; re-export it"
        )
    image = Image(np.clip(out, 0.0, 1.0).astype(np.float32, copy=False), meta)
    logger.debug("read a DICOM image: shape %s; %s", image.array.shape, "; ".join(notes))
    return image


#: a DICOM file up to this size is parsed whole; a larger one (a long multi-frame series) is parsed up to its
#: pixel data, and only the frame to read is taken from the file (:func:`_frame_source`), so memory follows
#: the frame, not the file: a 629 MB file of 1,200 frames had taken 679 MB, a 20 GB one would not have fit
_WHOLE_FILE_BYTES = 256 << 20

#: the file position and length (None: undefined, encapsulated) of a large file's pixel data value
_PIXELS_AT = "_pellucid_pixels_at"


def _parse(pydicom: Any, p: Path) -> Dataset:
    """The dataset of ``p`` (``force=True``: files without the preamble work): whole, or, for a file over
    :data:`_WHOLE_FILE_BYTES`, up to its pixel data, whose place in the file is kept on the dataset."""
    _check_deflated(p)
    if p.stat().st_size > _WHOLE_FILE_BYTES:
        where: list[int] = []
        ds = _parse_with(pydicom, p, stop_before_pixels=True, where=where)
        located = _pixel_value(p, ds, where[0]) if where else None
        if located is not None:
            object.__setattr__(ds, _PIXELS_AT, located)
            return ds
    return _parse_with(pydicom, p)  # small, deflated, float pixels, 1-bit: whole, as pydicom reads it


def _parse_with(pydicom: Any, p: Path, **kwargs: Any) -> Dataset:
    try:
        ds = read_dataset(pydicom, p, **kwargs)
    except MemoryError as err:
        raise _out_of_memory(p, "parsing the DICOM header") from err
    except HeaderTooLong as err:
        raise ImageReadError(no_header(p)) from err
    except Exception as err:  # noqa: BLE001 - pydicom raises many types on corrupt files
        raise ImageReadError(
            f"{p}: could not be parsed as DICOM: the header is corrupt or the file truncated "
            f"({type(err).__name__}) — re-export it"
        ) from err
    return ds


_LONG_LENGTH_VRS = (b"OB", b"OW", b"OD", b"OF", b"OL", b"OV", b"UN")


def _pixel_value(p: Path, ds: Dataset, at: int) -> tuple[int, int | None] | None:
    """Where the value of (7FE0,0010) Pixel Data starts in ``p`` and its length (None when undefined), read
    from the element's own header at ``at``; None when that is not Pixel Data of whole bytes per sample
    (the caller then parses the file whole)."""
    encoding = getattr(ds, "original_encoding", (None, None))
    implicit, little = encoding if isinstance(encoding, tuple) and len(encoding) == 2 else (None, None)
    if implicit is None or little is None or _header_int(ds, "BitsAllocated", 1, 64) not in (8, 16, 32, 64):
        return None
    order = "little" if little else "big"
    with p.open("rb") as fh:
        fh.seek(at)
        head = fh.read(12)
    if len(head) < 12 or (int.from_bytes(head[0:2], order), int.from_bytes(head[2:4], order)) != (0x7FE0, 0x0010):
        return None
    if implicit:
        start, length = at + 8, int.from_bytes(head[4:8], order)
    elif head[4:6] in _LONG_LENGTH_VRS:
        start, length = at + 12, int.from_bytes(head[8:12], order)
    else:
        start, length = at + 8, int.from_bytes(head[6:8], order)
    return start, (None if length == 0xFFFFFFFF else length)


def _corrupt_header(p: Path, err: BaseException) -> str:
    """The one-line refusal for an unexpected failure: the exception type, never its text."""
    return (
        f"{p}: could not be decoded: the DICOM header is corrupt ({type(err).__name__}) — "
        "re-export it or convert it with a DICOM tool (e.g. dcmtk's dcmconv)"
    )


def _safe_get(ds: Dataset, keyword: str) -> Any:
    """``ds.get(keyword)``, or None when the element cannot be converted."""
    try:
        return ds.get(keyword)
    except Exception:  # noqa: BLE001 - a corrupt element reads as absent
        return None


def _header_int(ds: Dataset, keyword: str, low: int, high: int) -> int | None:
    """A single integer in ``[low, high]``, or None when absent, multi-valued or out of range."""
    value = _safe_get(ds, keyword)
    if value is None or value == "" or isinstance(value, (bytes, bytearray, str)):
        return None
    try:
        if type(value).__name__ == "MultiValue" or isinstance(value, (list, tuple)):
            return None
        number = int(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if low <= number <= high else None


def _photometric(ds: Dataset, p: Path) -> str:
    """The Photometric Interpretation if it is one pydicom decodes; else a refusal (unquoted)."""
    value = _safe_get(ds, "PhotometricInterpretation")
    text = str(value).strip().upper() if isinstance(value, str) else ""
    if text not in _KNOWN_PHOTOMETRIC:
        raise ImageReadError(
            f"{p}: could not be decoded: its Photometric Interpretation is missing or not one "
            "pellucid knows — the header is corrupt; re-export it as MONOCHROME2 or RGB"
        )
    return text


def _check_size(ds: Dataset, p: Path, n_frames: int) -> None:
    """Refuse frames larger than the pixel limit, from the header alone (nothing decoded yet)."""
    rows = _header_int(ds, "Rows", 1, 65535)
    columns = _header_int(ds, "Columns", 1, 65535)
    samples = _header_int(ds, "SamplesPerPixel", 1, 4)
    bits = _header_int(ds, "BitsAllocated", 1, 64)
    if rows is None or columns is None or samples is None or (
        "PixelData" in ds and bits not in (1, 8, 16, 32, 64)
    ):
        raise ImageReadError(
            f"{p}: could not be decoded: its Rows, Columns, Samples per Pixel or Bits Allocated "
            "are missing or invalid — the header is corrupt; re-export it"
        )
    limit = max_pixels()
    per_frame = rows * columns * samples
    if per_frame > limit:
        raise ImageReadError(
            f"{p}: is too large to decode ({columns}×{rows}×{samples} samples = {per_frame} per "
            f"frame, over the pixel limit of {limit}) — reduce it first, or raise "
            "PELLUCID_MAX_PIXELS if it really is an image"
        )
    if per_frame * n_frames > _ALL_FRAMES_FACTOR * limit:
        raise ImageReadError(
            f"{p}: is too large to decode ({n_frames} frames of {per_frame} samples, over "
            f"{_ALL_FRAMES_FACTOR} × the pixel limit of {limit}) — export the frames you need, or "
            "raise PELLUCID_MAX_PIXELS"
        )


def _reduce_frame(arr: np.ndarray, photometric: str, notes: list[str]) -> np.ndarray:
    """Block-average a large decoded frame to at most MAX_SIDE (no full-size float copy).

    Palette indices are subsampled instead (averaging indices would invent colours)."""
    rows, columns = int(arr.shape[0]), int(arr.shape[1])
    k = reduction_factor(rows, columns)
    if k <= 1:
        return arr
    if photometric == "PALETTE COLOR":
        out = np.ascontiguousarray(arr[::k, ::k])
    else:
        out = reduce_array(arr, k)
    notes.append(
        f"downscaled from {columns}×{rows} to {out.shape[1]}×{out.shape[0]} on read"
    )
    return out


def _uid_text(uid: Any) -> str | None:
    """The UID if it is a well-formed UID (digits and dots), else None — never other text."""
    text = str(uid).strip() if uid is not None else ""
    return text if len(text) <= 64 and _UID_PATTERN.match(text) else None


def _uid_name(uid: Any) -> str | None:
    """The registered name of a UID (from pydicom's dictionary), else None."""
    text = _uid_text(uid)
    if text is None:
        return None
    try:
        from pydicom.uid import UID_dictionary
    except ImportError:  # pragma: no cover - older layout
        from pydicom._uid_dict import UID_dictionary  # type: ignore[no-redef]
    entry = UID_dictionary.get(text)
    return str(entry[0]) if entry else None


def _image_modality(ds: Dataset, p: Path) -> str:
    """The upper-case Modality of an image object; refuses datasets that are not images."""
    if not _has_image_object_attributes(ds):
        raise ImageReadError(
            f"{p}: is not a DICOM file (no DICOM header found) — pass a .dcm image or an "
            f"ordinary image ({', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    modality = _modality(ds)
    described = _describe_object(ds, modality)
    located = getattr(ds, _PIXELS_AT, None) is not None  # a large file's, left in the file
    if not located and not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
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


def _modality(ds: Dataset) -> str:
    """The Modality when it is a known code (``^[A-Z]{1,16}$`` and in the list), else ``''``."""
    value = _safe_get(ds, "Modality")
    text = value.strip().upper() if isinstance(value, str) else ""
    return text if _MODALITY_PATTERN.match(text) and text in _KNOWN_MODALITIES else ""


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
    """A known Body Part Examined code, upper-cased, or None (never raises, never other text)."""
    value = _safe_get(ds, keyword)
    text = value.strip().upper() if isinstance(value, str) else ""
    return text if _CODE_PATTERN.match(text) and text in _KNOWN_BODY_PARTS else None


def _sop_class_name(ds: Dataset) -> str | None:
    """The SOP class's registered name (e.g. ``CT Image Storage``), or None when unknown."""
    return _uid_name(_safe_get(ds, "SOPClassUID"))


def _describe_object(ds: Dataset, modality: str) -> str:
    parts = [f"Modality {modality or 'unknown'}"]
    name = _sop_class_name(ds)
    if name:
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
        return UID(str(uid).strip("\0 "))
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
    value = _safe_get(ds, "NumberOfFrames")
    if value in (None, ""):
        return 1
    frames = _header_int(ds, "NumberOfFrames", 0, 2**31 - 1)
    if frames is None:
        raise ValueError("NumberOfFrames")
    return max(1, frames)


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
            f"{path}: pixel data uses transfer syntax {_describe_uid(tsyntax)}, which pydicom "
            "cannot decode — convert the file to an uncompressed transfer syntax (e.g. with "
            "dcmtk's dcmdjpeg or gdcmconv --raw)"
        )
    if missing is not None:
        options = f" (or one of: {'; '.join(missing)})"
        raise ImageReadError(
            f"{path}: pixel data uses transfer syntax {_describe_uid(tsyntax)}, which no "
            f"installed decoder handles — {_DICOM_INSTALL_HINT} for pylibjpeg and "
            f"pylibjpeg-libjpeg{options}, or convert the file to an uncompressed transfer syntax"
        )
    source, index, options = _frame_source(ds, path, tsyntax, frame, as_pixel_options(ds))
    if tsyntax.is_encapsulated:
        _check_compressed_frame(ds, path, source, index)
    try:
        with warnings.catch_warnings(record=True) as caught, _native_stderr_quiet(tsyntax.is_encapsulated):
            warnings.simplefilter("always")
            decoder = get_decoder(tsyntax)
            arr, props = decoder.as_array(source, index=index, **options)
    except MemoryError as err:
        raise _out_of_memory(path, "decoding the pixel data") from err
    except BaseException as err:  # noqa: BLE001 - decoders raise many types on bad data, a Rust one panics
        if not isinstance(err, Exception) and not _is_panic(err):
            raise
        raise ImageReadError(
            f"{path}: pixel data could not be decoded ({type(err).__name__}) — the file is "
            "corrupt or truncated; re-export it"
        ) from err
    if caught:  # their texts may quote header values: only the count is kept
        notes.append(f"pydicom: {len(caught)} decoder warning(s) (texts not kept)")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    photometric = str(props.get("photometric_interpretation", ds.PhotometricInterpretation))
    photometric = photometric.strip().upper()
    if photometric not in _KNOWN_PHOTOMETRIC:
        raise ImageReadError(
            f"{path}: could not be decoded: the decoder gave an unknown colour space — the "
            "header is corrupt; re-export it"
        )
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3) or arr.dtype.kind not in "uif":
        raise ImageReadError(
            f"{path}: could not be decoded: the pixel data has an unexpected layout "
            f"({arr.ndim} axes) — the header is corrupt; re-export it"
        )
    return arr, photometric


def _describe_uid(uid: Any) -> str:
    text, name = _uid_text(uid), _uid_name(uid)
    if text is None:
        return "(an invalid UID)"
    return f"{text} ({name})" if name else text


# JPEG start-of-frame markers (SOF0..SOF15 less DHT, JPG and DAC) and JPEG-LS SOF55.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}


def _compressed_frame_size(data: bytes) -> tuple[int, int, int] | None:
    """``(rows, columns, components)`` from a JPEG/JPEG-LS SOF or JPEG 2000 SIZ marker."""
    if data[:2] == b"\xff\xd8":
        pos = 2
        while pos + 4 <= len(data):
            if data[pos] != 0xFF:
                return None
            marker = data[pos + 1]
            if marker == 0xFF:
                pos += 1
                continue
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
                pos += 2
                continue
            length = int.from_bytes(data[pos + 2 : pos + 4], "big")
            if marker in _SOF_MARKERS and pos + 10 <= len(data):
                rows = int.from_bytes(data[pos + 5 : pos + 7], "big")
                columns = int.from_bytes(data[pos + 7 : pos + 9], "big")
                return rows, columns, data[pos + 9]
            if marker == 0xDA or length < 2:
                return None
            pos += 2 + length
        return None
    siz = data.find(b"\xff\x4f\xff\x51", 0, 4096)
    if siz >= 0 and siz + 42 <= len(data):
        base = siz + 4 + 2 + 2  # SOC, SIZ, Lsiz, Rsiz
        x, y, x0, y0 = (int.from_bytes(data[base + 4 * i : base + 4 * i + 4], "big") for i in range(4))
        components = int.from_bytes(data[base + 32 : base + 34], "big")
        return max(0, y - y0), max(0, x - x0), components
    return None


def _frame_source(
    ds: Dataset, path: Path, tsyntax: Any, frame: int, options: dict[str, Any]
) -> tuple[Any, int, dict[str, Any]]:
    """What the decoder reads, the frame's index in it, and its options: the dataset itself, or, for a large
    file parsed up to its pixel data, that one frame taken from the file (encapsulated again when compressed)."""
    located = getattr(ds, _PIXELS_AT, None)
    if located is None:
        return ds, frame, options
    start, length = located
    one = {**options, "number_of_frames": 1, "pixel_keyword": "PixelData", "transfer_syntax_uid": tsyntax}
    truncated = ImageReadError(
        f"{path}: pixel data could not be decoded (its frame {frame} is missing or cut short) — the file is "
        "corrupt or truncated; re-export it"
    )
    with path.open("rb") as fh:
        if tsyntax.is_encapsulated:
            from pydicom.encaps import encapsulate, get_frame

            fh.seek(start)
            # pydicom reads each fragment in one read of the length its item declares; a compressed frame is
            # no larger than 8 bytes a sample of the pixel limit
            budget = 8 * max_pixels() + (16 << 20)
            try:
                data = get_frame(_CountedReads(fh, sys.maxsize, most=budget), frame,
                                 number_of_frames=_number_of_frames(ds))
            except ReadTooLarge as err:
                raise ImageReadError(
                    f"{path}: a fragment of its compressed pixel data is larger than {budget:,} bytes, more than "
                    "a frame within the pixel limit can take — the file is corrupt or hostile; re-export it"
                ) from err
            except Exception as err:  # noqa: BLE001 - a broken encapsulation
                raise truncated from err
            return encapsulate([bytes(data)]), 0, one
        from pydicom.pixels.utils import get_expected_length

        frame_bytes = int(get_expected_length(ds, "bytes")) // _number_of_frames(ds)
        if length is None or (frame + 1) * frame_bytes > length:
            raise truncated
        fh.seek(start + frame * frame_bytes)
        data = fh.read(frame_bytes)
    if len(data) < frame_bytes:
        raise truncated
    return data, 0, one


def _jp2_box_problem(data: bytes) -> str | None:
    """What is wrong with the boxes before the codestream of a frame wrapped as a JP2 file, else None. pydicom
    walks them by their lengths to find the codestream, and a box of length 0 there (legal only for the last box)
    kept it walking on the spot: a 30 KB frame held a door at full CPU for good. pydicom reads a length of 1 (a
    64-bit length follows) as one byte, so it is refused too."""
    if not data.startswith(b"\x00\x00\x00\x0cjP  "):
        return None
    offset = 12
    while offset < len(data):  # as pydicom walks: a box cut short at the end is read as far as it goes
        length = int.from_bytes(data[offset : offset + 4], "big")
        if data[offset + 4 : offset + 8] == b"jp2c":
            return None
        if length < 8:  # 0: "to the end of the file"; 1: a 64-bit length, which no header box before it needs
            return f"a box of length {length} before the codestream"
        offset += length
    return None


def _check_compressed_frame(ds: Dataset, path: Path, source: Any, index: int) -> None:
    """Refuse a compressed frame whose own header is larger than the limit or than Rows×Columns."""
    try:
        from pydicom.encaps import get_frame

        whole = not isinstance(source, (bytes, bytearray))  # the dataset, or one frame from a large file
        pixels = source.PixelData if whole else source
        frames = _number_of_frames(ds) if whole else 1
        data = bytes(get_frame(pixels, index, number_of_frames=frames))
    except Exception:  # noqa: BLE001 - the decoder will refuse a broken encapsulation
        return
    jp2 = _jp2_box_problem(data)
    if jp2:
        raise ImageReadError(
            f"{path}: its JPEG 2000 frame's boxes do not hold together ({jp2}) — the file is corrupt or hostile; "
            "re-export it"
        )
    if data[:2] == b"\xff\xd8" and jpeg_scans(data) > MAX_FRAME_SCANS:
        raise ImageReadError(
            f"{path}: its compressed frame holds more than {MAX_FRAME_SCANS} JPEG scans, more than any modality "
            "writes (each is decoded over the whole frame) — the file is corrupt or hostile; re-export it"
        )
    size = _compressed_frame_size(data)
    if size is None:
        return
    rows, columns, components = size
    if rows == 0 or columns == 0 or components == 0:
        # a JPEG or JPEG-LS frame may leave its height to a DNL marker after the data; no modality writes one, and
        # pylibjpeg-libjpeg then grew without bound (21 GB in 95 s for a 2.9 KB frame, until the system killed it)
        raise ImageReadError(
            f"{path}: its compressed frame does not state its size ({columns}×{rows}×{components} in its own header) "
            "— the file is corrupt or hostile; re-export it"
        )
    limit = max_pixels()
    declared = (_header_int(ds, "Rows", 1, 65535) or 0) * (_header_int(ds, "Columns", 1, 65535) or 0)
    if rows * columns * max(1, components) > limit or rows * columns > declared:
        raise ImageReadError(
            f"{path}: its compressed frame is {columns}×{rows}×{components}, larger than the "
            "header's Rows×Columns or the pixel limit — the file is corrupt or hostile; re-export it"
        )
