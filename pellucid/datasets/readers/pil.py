"""Ordinary image files (PNG, JPEG, TIFF, BMP) through Pillow: frame selection, EXIF orientation,
and the conversion of every Pillow mode (palette, alpha, 16- and 32-bit integer, float) to
float32 ``(H, W, C)`` in ``[0, 1]``, each step recorded in ``meta['notes']``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from pellucid.datasets.readers.common import _min_max, _one_line, _warn
from pellucid.datasets.readers.image import Image, ImageReadError

__all__: list[str] = []

logger = logging.getLogger(__name__)

_PIL_FORMATS = {"JPEG": "jpeg", "PNG": "png", "TIFF": "tiff", "BMP": "bmp", "MPO": "jpeg"}


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
