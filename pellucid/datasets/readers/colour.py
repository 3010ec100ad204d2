"""Colours as the file means them: an RGB image that embeds an ICC profile (a phone's Display P3 photo, a
camera's Adobe RGB one, a colour DICOM's ICC Profile element) is converted to sRGB, the space every model and
every picture pellucid draws assumes. Without this the stored numbers were read as sRGB, so a wide-gamut photo
came out dull and tinted, and the same scene differed between a P3 and an sRGB copy of it. A CMYK image (a JPEG or
TIFF from a print workflow) with its press profile is converted through that profile, not Pillow's plain formula.

The profile is read with Pillow's ImageCms (littleCMS). A profile that does not parse, is not one for the image's
colours (RGB or CMYK) or
is larger than any real one is passed over with a note and the stored colours are kept: a browser does the same,
and refusing the image for its metadata would lose a readable picture. Profiles that say they are sRGB are not
applied (they would change nothing but rounding). The profile's own text (its description) is never copied into a
note: a hand-made file can carry anything there."""

from __future__ import annotations

import hashlib
import io
import threading
from typing import Any

__all__: list[str] = []

#: bytes an embedded profile may have: real RGB profiles are 0.5-4 KB (matrix and curves), LUT-based ones up to
#: about a megabyte; a JPEG can carry 16 MB in its APP2 segments
MAX_ICC_BYTES = 4 << 20

CONVERTED_NOTE = "converted colours from the file's embedded ICC profile to sRGB"
UNREADABLE_NOTE = "ignored an embedded ICC profile that could not be read; the stored colours are kept"

_CACHE: dict[bytes, Any] = {}  # sha-256 of a profile -> its transform, or a note saying why it is not used
_CACHE_LIMIT = 32
_LOCK = threading.Lock()


def to_srgb(im: Any, icc: Any, notes: list[str]) -> Any:
    """``im`` (a loaded Pillow image) with its colours converted from the ICC profile ``icc`` (bytes) to sRGB.
    RGB, RGBA and CMYK images are converted (RGB out of CMYK; the alpha is kept as it is); any other mode, no
    profile, an sRGB profile or one that cannot be used returns ``im`` unchanged, the last with a note (a CMYK
    image is then converted by Pillow's plain formula, as it was)."""
    if im.mode not in ("RGB", "RGBA", "CMYK") or not isinstance(icc, (bytes, bytearray)) or not icc:
        return im
    transform = _transform(bytes(icc), "CMYK" if im.mode == "CMYK" else "RGB")
    if transform is None:
        return im
    if isinstance(transform, str):
        notes.append(transform)
        return im
    from PIL import ImageCms

    alpha = im.getchannel("A") if im.mode == "RGBA" else None
    rgb = im.convert("RGB") if alpha is not None else im
    try:
        out = ImageCms.applyTransform(rgb, transform)
    except (ImageCms.PyCMSError, ValueError, OSError):  # a transform that fails on these pixels
        notes.append(UNREADABLE_NOTE)
        return im
    if out is None:
        return im
    if alpha is not None:
        out.putalpha(alpha)
    notes.append(CONVERTED_NOTE)
    return out


def _transform(icc: bytes, space: str) -> Any:
    """A cached ImageCms transform from ``icc`` (for an image in ``space``, "RGB" or "CMYK") to sRGB; None for an
    sRGB profile; a note (str) when the profile cannot be used."""
    key = hashlib.sha256(icc).digest() + space.encode()
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
    value = _build(icc, space)
    with _LOCK:
        if len(_CACHE) >= _CACHE_LIMIT:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = value
    return value


def _build(icc: bytes, image_space: str) -> Any:
    if len(icc) > MAX_ICC_BYTES:
        return (
            f"ignored an embedded ICC profile of {len(icc) >> 20} MB, larger than any real one; "
            "the stored colours are kept"
        )
    from PIL import ImageCms

    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        space = str(profile.profile.xcolor_space).strip()
        description = str(profile.profile.profile_description or "")
        if space != image_space:
            name = _SPACES.get(space)
            if name is None:
                return "ignored an embedded ICC profile of an unknown colour space; the stored colours are kept"
            return f"ignored an embedded ICC profile for {name} colours on {_ARTICLE[image_space]} {image_space} image"
        if space == "RGB" and description.startswith("sRGB"):
            return None
        srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
        return ImageCms.buildTransform(profile, srgb, space, "RGB", renderingIntent=ImageCms.Intent.PERCEPTUAL)
    except (ImageCms.PyCMSError, ValueError, TypeError, OSError, OverflowError, UnicodeError):
        return UNREADABLE_NOTE


_ARTICLE = {"RGB": "an", "CMYK": "a"}

#: the ICC colour space signatures, by the name a note gives them
_SPACES = {"XYZ": "XYZ", "Lab": "Lab", "Luv": "Luv", "YCbr": "YCbCr", "Yxy": "Yxy", "GRAY": "gray", "HSV": "HSV",
           "HLS": "HLS", "CMYK": "CMYK", "CMY": "CMY", "RGB": "RGB",
           **{f"{n:X}CLR": f"{n}-colour" for n in range(2, 16)}}
