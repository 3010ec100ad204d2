"""DICOM pixel values to ``[0, 1]`` (PS3.3 C.11): the per-frame view of the LUT attributes
(functional groups of enhanced multi-frame objects included), the modality LUT or rescale, the VOI
(a requested window, else the file's VOI LUT or Window Center/Width, else the frame's min-max) for
monochrome images, and palette / YBR conversion and scaling for colour ones."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pellucid.datasets.readers.colour import to_srgb
from pellucid.datasets.readers.common import _as_list, _min_max
from pellucid.datasets.readers.image import ImageReadError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__: list[str] = []


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


def _header_number(
    view: Dataset, keyword: str, default: float, path: Path, *, limit: float
) -> float:
    """A single finite number with ``abs(value) <= limit``; ``default`` when absent, empty or 0.

    Raises:
        ImageReadError: the element is multi-valued, not a number, not finite or out of range
            (the message names the keyword, never the value).
    """
    try:
        value = view.get(keyword)
        if value is None or value == "":
            return default
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            if len(value) != 1:
                raise ValueError("multi-valued")
            value = value[0]
        if isinstance(value, (bytes, bytearray)):
            raise TypeError("raw bytes")
        number = float(value)
        if not math.isfinite(number) or abs(number) > limit:
            raise ValueError("out of range")
    except Exception as err:  # noqa: BLE001 - every bad value gets the same message
        raise ImageReadError(
            f"{path}: could not be decoded: its {keyword} is not a single finite number within "
            f"±{limit:g} — the header is corrupt; fix it or re-export the file"
        ) from err
    return number or default


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
    from pydicom.pixels import apply_voi_lut

    values = _modality_values(arr, view, meta, notes)
    # what the web app's window sliders span and start from: known here, so it never decodes the frame again
    meta["value_range"] = (float(values.min()), float(values.max()))
    meta["file_window"] = _first_window(view)
    # The VOI operates on modality values; the view must not rescale them a second time.
    voi_view = _voi_view(view)

    if window is not None:
        return _requested_window(values, voi_view, window, meta, notes, apply_voi_lut)
    out = _file_voi(values, voi_view, meta, path, notes, caveats, apply_voi_lut)
    if out is not None:
        return out
    low, high = float(values.min()), float(values.max())
    notes.append(f"no usable VOI in the file: min-max window [{low:g}, {high:g}]")
    if high <= low:
        caveats.append(f"{path.name}: the image is constant (all pixels {low:g})")
    return _min_max(values)


def _first_window(view: Dataset) -> tuple[float, float] | None:
    """The file's first Window Center/Width, when both are finite and the width positive."""
    try:
        center, width = float(_as_list(view.get("WindowCenter"))[0]), float(_as_list(view.get("WindowWidth"))[0])
    except Exception:  # noqa: BLE001 - absent, empty or not a number
        return None
    return (center, width) if math.isfinite(center) and math.isfinite(width) and width > 0 else None


def _modality_values(arr: np.ndarray, view: Dataset, meta: dict[str, Any], notes: list[str]) -> np.ndarray:
    """Stored values to modality values: the Modality LUT Sequence, else rescale slope/intercept."""
    from pydicom.pixels import apply_modality_lut

    if view.get("ModalityLUTSequence"):
        if arr.dtype.kind == "f":  # block-averaged on read: the LUT takes stored integers
            arr = np.rint(arr).astype(np.int64)
        values = np.asarray(apply_modality_lut(arr, view), dtype=np.float64)
        notes.append("applied the Modality LUT Sequence")
    else:
        slope, intercept = meta["rescale"]
        values = arr.astype(np.float64)
        if slope != 1.0 or intercept != 0.0:
            values = values * slope + intercept
            notes.append(f"rescaled: value * {slope:g} + {intercept:g}")
    return values


def _requested_window(
    values: np.ndarray,
    voi_view: Dataset,
    window: tuple[float, float],
    meta: dict[str, Any],
    notes: list[str],
    apply_voi_lut: Any,
) -> np.ndarray:
    """The VOI of an explicit ``window=(center, width)``, replacing the file's own."""
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


def _file_voi(
    values: np.ndarray,
    voi_view: Dataset,
    meta: dict[str, Any],
    path: Path,
    notes: list[str],
    caveats: list[str],
    apply_voi_lut: Any,
) -> np.ndarray | None:
    """The file's own VOI: its VOI LUT Sequence (first), else its first Window Center/Width;
    None when neither is usable."""
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
            notes.append(f"file window unusable ({type(err).__name__})")
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
    return None


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

    original = str(ds.PhotometricInterpretation).strip().upper()  # validated by the caller
    peak = float(2**bits_stored - 1)
    if photometric == "PALETTE COLOR":
        try:
            arr = apply_color_lut(arr, ds)
            descriptor = ds.get("RedPaletteColorLookupTableDescriptor")
            depth = int(descriptor[2]) if descriptor else 16
        except Exception as err:  # noqa: BLE001 - a corrupt LUT raises many types
            raise ImageReadError(
                f"{path}: could not be decoded: its palette colour lookup table is corrupt "
                f"({type(err).__name__}) — re-export the image as RGB"
            ) from err
        peak = float(2 ** (8 if depth <= 8 else 16) - 1)
        notes.append("applied the palette colour LUT")
    elif photometric.startswith("YBR"):
        try:
            arr = convert_color_space(arr, photometric, "RGB")
            notes.append(f"converted {photometric} to RGB")
        except Exception as err:  # noqa: BLE001
            raise ImageReadError(
                f"{path}: colour space {photometric} cannot be converted to RGB "
                f"({type(err).__name__}) — convert the file to RGB"
            ) from err
    elif photometric != "RGB":
        caveats.append(
            f"{path.name}: unexpected 3-sample photometric interpretation {photometric}; "
            "treated as RGB"
        )
    if original != photometric:
        notes.append(f"decoder converted {original} to {photometric}")
    if arr.ndim == 2:  # palette applied to a 2-D index image gives (H, W, 3) already
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    arr = _apply_icc(arr, ds, peak, notes)
    notes.append(f"scaled colour values by {peak:.0f}")
    return arr.astype(np.float64) / peak


def _apply_icc(arr: np.ndarray, ds: Dataset, peak: float, notes: list[str]) -> np.ndarray:
    """8-bit RGB pixels converted to sRGB from the file's ICC Profile (0028,2000), at the top level or in the
    first item of the Optical Path Sequence (slide microscopy); anything else unchanged. Deeper colour is left as
    stored: Pillow's colour management works on 8-bit samples."""
    icc = _icc_profile(ds)
    if icc is None or peak != 255.0 or arr.ndim != 3 or arr.shape[2] != 3:
        return arr
    from PIL import Image as PILImage

    image = PILImage.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    out = to_srgb(image, icc, notes)
    return arr if out is image else np.asarray(out)


def _icc_profile(ds: Dataset) -> bytes | None:
    for holder in (ds, _first_item(ds, "OpticalPathSequence")):
        try:
            value = holder.get("ICCProfile") if holder is not None else None
        except Exception:  # noqa: BLE001 - a corrupt element reads as absent
            value = None
        if isinstance(value, (bytes, bytearray)) and value:
            return bytes(value)
    return None


def _first_item(ds: Dataset, keyword: str) -> Any:
    try:
        sequence = ds.get(keyword)
        return sequence[0] if sequence else None
    except Exception:  # noqa: BLE001 - a corrupt sequence reads as absent
        return None
