"""Ordinary image files (PNG, JPEG, TIFF, BMP) through Pillow: frame selection, EXIF orientation,
and the conversion of every Pillow mode (palette, alpha, 16- and 32-bit integer, float) to
float32 ``(H, W, C)`` in ``[0, 1]``, each step recorded in ``meta['notes']``."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from pellucid.datasets.readers.colour import to_srgb
from pellucid.datasets.readers.common import _min_max, _native_stderr_quiet, _out_of_memory, _warn
from pellucid.datasets.readers.image import Image, ImageReadError
from pellucid.datasets.readers.limits import MAX_JPEG_SCANS, jpeg_scans, max_pixels, reduction_factor

__all__: list[str] = []

logger = logging.getLogger(__name__)

_PIL_FORMATS = {"JPEG": "jpeg", "PNG": "png", "TIFF": "tiff", "BMP": "bmp", "MPO": "jpeg"}

#: the only decoders Pillow may run, whatever the file's name: Pillow picks its decoder from the
#: content, so a GIF, WebP, TGA or PostScript file named ``.png`` was decoded as that (PostScript
#: through Ghostscript, where it is installed): 40-odd decoders on every door's input instead of four
#: (a phone's multi-picture JPEG opens as JPEG and comes back as MPO).
OPEN_FORMATS = ("PNG", "JPEG", "TIFF", "BMP")

#: PNG chunks or JPEG segments a file may hold before its image data, and the TIFF pages counted: a real file has
#: a few dozen chunks or segments. Pillow parses every one at open (and walks every TIFF page to count them),
#: so a file of a million 4-byte comments held a door 2-5 s per 4-15 MB, minutes for a few hundred MB.
MAX_HEADER_SEGMENTS = 10_000
#: PNG image data chunks (``IDAT``) a file may hold: encoders write 8-64 KB each (a 100 MB picture in 8 KB
#: chunks: 12,800); Pillow reads each in Python, so a million 1-byte chunks (13 MB) took 2.8 s.
MAX_PNG_DATA_CHUNKS = 200_000
#: TIFF strips or tiles of one page: Pillow makes a Python object of each when it opens a page, then decodes each
#: in Python (a 40 MB file of 5,000,000 one-byte strips: 21 s and 1.7 GB to open, 80 s to read); a real page has
#: one strip per row or per few rows, or tiles of 256 px: tens of thousands at most. Over the pages Pillow walks
#: to count them, ten times this (a stack of 1,000 pages of 512 one-row strips has 512,000).
MAX_TIFF_PIECES = 100_000
#: entries one TIFF directory may hold (Pillow parses each; real files have a few dozen)
_MAX_TIFF_ENTRIES = 10_000
MAX_COUNTED_PAGES = 1_000  # a page costs Pillow a seek and a parse of its tags: 0.15 ms

_IDENTIFY_BYTES = 64 << 10  # what naming another format reads of a file

#: bytes of run-length coded BMP data a file may hold: Pillow decodes BMP runs in Python, 0.7 s a megabyte of
#: one-pixel runs (an 80 MB file at the pixel limit: about a minute); a run-length BMP of an ordinary picture
#: of a few megapixels is well under this
MAX_RLE_BYTES = 8 << 20

#: TIFF compressions every libtiff build decodes (none, CCITT, LZW, JPEG, Deflate, PackBits); a page in another
#: (WebP, ZSTD, LZMA, JPEG 2000, JPEG XL, LERC, ...) that fails to decode is named as such, not as corrupt
_COMMON_TIFF_COMPRESSIONS = frozenset({1, 2, 3, 4, 5, 6, 7, 8, 32773, 32946})
_TIFF_COMPRESSION_NAMES = {50001: "WebP", 50000: "Zstandard", 34925: "LZMA", 34712: "JPEG 2000", 50002: "JPEG XL",
                           52546: "JPEG XL", 34887: "LERC", 34892: "lossy JPEG (DNG)", 34676: "SGI LogL",
                           34677: "SGI LogLuv", 32809: "ThunderScan"}


def _read_pil(path: Path, *, frame: int | None) -> Image:
    from PIL import Image as PILImage
    from PIL import ImageOps

    _quiet_pillow()
    compression = None

    limit = _sync_pil_limit(PILImage)
    notes: list[str] = []
    flood = _too_many_segments(path)
    if flood:
        raise ImageReadError(f"{path}: {flood} — the file is corrupt or hostile; re-export it")
    if _too_many_scans(path):
        raise ImageReadError(
            f"{path}: is a JPEG of more than {MAX_JPEG_SCANS:,} scans — no camera or scanner writes that many, "
            "and each is decoded over the whole image; re-save it (e.g. as PNG)"
        )
    try:
        # Pillow's own bomb check (at open, from the header) warns above MAX_IMAGE_PIXELS and
        # refuses above twice that; both become our one-line refusal.
        with warnings.catch_warnings():
            warnings.simplefilter("error", PILImage.DecompressionBombWarning)
            with PILImage.open(path, formats=OPEN_FORMATS) as im:
                fmt = _PIL_FORMATS.get(str(im.format), str(im.format).lower())
                _check_pixels(im.size, limit, path)
                n_frames = _frame_count(im) if frame is None else int(getattr(im, "n_frames", 1) or 1)
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
                    _check_pixels(im.size, limit, path)
                elif n_frames > 1:
                    more = "at least " if n_frames >= MAX_COUNTED_PAGES else ""
                    notes.append(f"frame 0 of {more}{n_frames} (first frame by default)")
                _check_rle(im, path)
                compression = _tiff_compression(im)
                mode = im.mode
                file_size = im.size
                if fmt == "jpeg" and reduction_factor(im.height, im.width) > 1:
                    # libjpeg decodes at 1/2, 1/4 or 1/8 scale: the smallest one still >= target
                    k = reduction_factor(im.height, im.width)
                    im.draft(im.mode, (-(-im.width // k), -(-im.height // k)))
                with _native_stderr_quiet(compression is not None):  # libtiff prints on damaged pages
                    im.load()
                icc = im.info.get("icc_profile")
                white_is_zero = _white_is_zero(im)
                im = _unsigned_32_as_float(im, notes)
                rotated = _exif_rotated(im)
                if rotated:
                    im = ImageOps.exif_transpose(im)
                    notes.append("applied the EXIF orientation")
                    if _swaps_axes(rotated):
                        file_size = (file_size[1], file_size[0])
                if fmt == "png":
                    im = _colour_key(im, path, notes)
                im = _reduce_pil(im, file_size, notes)
                im = to_srgb(im, icc, notes)
                original_size = (file_size[1], file_size[0])
                array = _pil_to_float(im, path, notes)
                if white_is_zero:
                    array = 1.0 - array
                    notes.append("inverted WhiteIsZero values so that higher values are brighter")
    except ImageReadError:
        raise
    except (PILImage.DecompressionBombError, PILImage.DecompressionBombWarning) as err:
        raise ImageReadError(
            f"{path}: is too large to decode (more pixels than the pixel limit of {limit}) — "
            "reduce it first, or raise PELLUCID_MAX_PIXELS if it really is an image"
        ) from err
    except MemoryError as err:
        raise _out_of_memory(path) from err
    except PILImage.UnidentifiedImageError as err:
        other = _other_format(path)
        if other is None:
            raise ImageReadError(
                f"{path}: could not be decoded: the file is corrupt, truncated or not really a "
                f"{path.suffix.lstrip('.').upper() or 'image'} ({type(err).__name__}) — re-export "
                "or re-download it"
            ) from err
        raise ImageReadError(
            f"{path}: its content is {other}, not {path.suffix.lstrip('.').upper() or 'an image pellucid reads'} "
            "— pellucid reads PNG, JPEG, TIFF, BMP and DICOM; convert it to one of them"
        ) from err
    except Exception as err:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
        if compression is not None and compression not in _COMMON_TIFF_COMPRESSIONS:
            name = _TIFF_COMPRESSION_NAMES.get(compression, "an uncommon scheme")
            raise ImageReadError(
                f"{path}: is a TIFF compressed with {name} (compression {compression}), which this installation "
                f"cannot decode ({type(err).__name__}) — re-save it uncompressed, or with LZW or Deflate"
            ) from err
        raise ImageReadError(
            f"{path}: could not be decoded: the file is corrupt, truncated or not really a "
            f"{path.suffix.lstrip('.').upper() or 'image'} ({type(err).__name__}) — re-export "
            "or re-download it"
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
    logger.debug("read an image: shape %s; %s", image.array.shape, "; ".join(notes))
    return image


def _frame_count(im: Any) -> int:
    """Frames of an opened image, counting at most :data:`MAX_COUNTED_PAGES` TIFF pages (Pillow's
    ``n_frames`` walks every page of the file); the image is left at frame 0."""
    if not getattr(im, "is_animated", False):
        return 1
    if im.format != "TIFF":
        return int(getattr(im, "n_frames", 1) or 1)
    count = 1
    try:
        while count < MAX_COUNTED_PAGES:
            im.seek(count)
            count += 1
    except EOFError:
        pass
    im.seek(0)
    return count


def _too_many_segments(path: Path) -> str | None:
    """Why a PNG, JPEG or TIFF file holds more chunks, segments or strips than any real file (reading only their
    headers): a PNG's metadata chunks anywhere (Pillow reads those after the image data too, at the end of a
    load: a million text chunks there took 9.4 s) or its image data chunks past :data:`MAX_PNG_DATA_CHUNKS`; a
    JPEG's segments before its first scan; a TIFF's strips or tiles (:func:`_tiff_flood`). None for anything
    else, or a structure that does not parse (left to Pillow to judge)."""
    with path.open("rb") as fh:
        head = fh.read(8)
        count = 0
        if head == b"\x89PNG\r\n\x1a\n":
            data_chunks = 0
            while True:
                chunk = fh.read(8)
                if len(chunk) < 8 or chunk[4:8] == b"IEND":
                    return None
                if chunk[4:8] == b"IDAT":
                    data_chunks += 1
                    if data_chunks > MAX_PNG_DATA_CHUNKS:
                        return f"has its image data in more than {MAX_PNG_DATA_CHUNKS:,} chunks"
                else:
                    count += 1
                    if count > MAX_HEADER_SEGMENTS:
                        return f"has more than {MAX_HEADER_SEGMENTS:,} metadata chunks"
                fh.seek(int.from_bytes(chunk[:4], "big") + 4, os.SEEK_CUR)
        if head[:4] in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):
            return _tiff_flood(fh, head)
        if head[:2] != b"\xff\xd8":
            return None
        fh.seek(2)
        while count <= MAX_HEADER_SEGMENTS:
            count += 1
            marker = fh.read(2)
            if len(marker) < 2 or marker[0] != 0xFF or marker[1] == 0xDA:  # not a marker, or the scan begins
                return None
            if marker[1] == 0xFF:  # a fill byte: the marker starts one byte on
                fh.seek(-1, os.SEEK_CUR)
            elif not (marker[1] in (0x01, 0xD8) or 0xD0 <= marker[1] <= 0xD7):  # these carry no length
                size = fh.read(2)
                if len(size) < 2:
                    return None
                fh.seek(int.from_bytes(size, "big") - 2, os.SEEK_CUR)
        return f"has more than {MAX_HEADER_SEGMENTS:,} metadata chunks before its pixels"


_TIFF_OFFSET_TAGS = (273, 324)  # StripOffsets, TileOffsets: one value a piece


def _tiff_flood(fh: Any, head: bytes) -> str | None:
    """Why a TIFF (or BigTIFF) holds more pieces than a real one, read from its directories' entries alone: a page
    of more than :data:`MAX_TIFF_PIECES` strips or tiles, ten times that over the first :data:`MAX_COUNTED_PAGES`
    pages, or a directory of more than 10,000 entries. None otherwise, or for a structure that does not parse
    (Pillow judges it)."""
    import struct

    order = "<" if head[:2] == b"II" else ">"
    big = head[2:4] in (b"+\0", b"\0+")
    if big:
        fh.seek(8)
        raw = fh.read(8)
        if len(raw) < 8:
            return None
        (offset,) = struct.unpack(order + "Q", raw)
        entry, count_fmt, n_fmt = 20, "Q", "Q"
    else:
        (offset,) = struct.unpack(order + "I", head[4:8])
        entry, count_fmt, n_fmt = 12, "I", "H"
    n_size = struct.calcsize(n_fmt)
    total, pages, seen = 0, 0, set()
    while offset and offset not in seen and pages < MAX_COUNTED_PAGES:
        seen.add(offset)
        fh.seek(offset)
        raw = fh.read(n_size)
        if len(raw) < n_size:
            return None
        (n,) = struct.unpack(order + n_fmt, raw)
        if n > _MAX_TIFF_ENTRIES:
            return f"has a TIFF directory of more than {_MAX_TIFF_ENTRIES:,} entries"
        table = fh.read(n * entry + (8 if big else 4))
        if len(table) < n * entry:
            return None
        pieces = 0
        for k in range(n):
            at = k * entry
            (tag,) = struct.unpack_from(order + "H", table, at)
            if tag in _TIFF_OFFSET_TAGS:
                pieces += struct.unpack_from(order + count_fmt, table, at + 4)[0]
        total += pieces
        if pieces > MAX_TIFF_PIECES:
            return f"has its pixels in more than {MAX_TIFF_PIECES:,} TIFF strips or tiles"
        if total > 10 * MAX_TIFF_PIECES:
            return f"has more than {10 * MAX_TIFF_PIECES:,} TIFF strips or tiles over its first {pages + 1} pages"
        rest = table[n * entry:]
        if len(rest) < (8 if big else 4):
            return None
        (offset,) = struct.unpack(order + ("Q" if big else "I"), rest[:8 if big else 4])
        pages += 1
    return None


def _check_rle(im: Any, path: Path) -> None:
    """Refuse a run-length coded BMP with more than :data:`MAX_RLE_BYTES` of coded data (Pillow's decoder
    for it is written in Python)."""
    tiles = [t for t in getattr(im, "tile", None) or [] if t[0] == "bmp_rle"]
    if tiles and path.stat().st_size - min(t[2] for t in tiles) > MAX_RLE_BYTES:
        raise ImageReadError(
            f"{path}: is a run-length coded BMP of more than {MAX_RLE_BYTES >> 20} MB, which decodes slowly "
            "(about a second a megabyte) — re-save it uncompressed or as PNG"
        )


def _too_many_scans(path: Path) -> bool:
    """Whether a JPEG file holds more than :data:`MAX_JPEG_SCANS` scans (:func:`jpeg_scans`), counted over the
    whole file in 1 MiB pieces; a second picture's and a thumbnail's count too."""
    with path.open("rb") as fh:
        if fh.read(2) != b"\xff\xd8":
            return False
        count, last = 0, b""
        while count <= MAX_JPEG_SCANS:
            piece = fh.read(1 << 20)
            if not piece:
                return False
            count += jpeg_scans(last + piece[:1]) + jpeg_scans(piece)  # one across the pieces' seam too
            last = piece[-1:]
        return True


def content_format(path: Path) -> str | None:
    """The format of ``path`` by its content when it is one pellucid reads (``"PNG"``, ``"JPEG"``, …),
    else None; only the header is read."""
    from PIL import Image as PILImage

    try:
        if _too_many_segments(path):  # Pillow would parse them all to find out
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a decompression-bomb warning: the reader decides later
            with PILImage.open(path, formats=OPEN_FORMATS) as im:
                return str(im.format)
    except Exception:  # noqa: BLE001 - not one of those formats, or unreadable
        return None


def _other_format(path: Path) -> str | None:
    """The name of the format Pillow finds in a file that is none of the readers' own (a GIF named
    ``.png``), for the refusal: from the file's first 64 KiB, so no decoder runs and a flood of metadata
    blocks is not walked."""
    import io

    from PIL import Image as PILImage

    try:
        with path.open("rb") as fh:
            head = fh.read(_IDENTIFY_BYTES)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with PILImage.open(io.BytesIO(head)) as im:
                return str(im.format or "") or None
    except Exception:  # noqa: BLE001 - unknown to Pillow too: the file is corrupt
        return None


def _sync_pil_limit(pil_image: Any) -> int:
    """Set ``PIL.Image.MAX_IMAGE_PIXELS`` to the readers' pixel limit and return the limit."""
    limit = max_pixels()
    pil_image.MAX_IMAGE_PIXELS = limit
    return limit


def _check_pixels(size: tuple[int, int], limit: int, path: Path) -> None:
    width, height = (int(v) for v in size)
    if width <= 0 or height <= 0:
        raise ImageReadError(
            f"{path}: its header gives an empty image ({width}×{height}) — the file is corrupt; "
            "re-export it"
        )
    if width * height > limit:
        raise ImageReadError(
            f"{path}: is too large to decode ({width}×{height} = {width * height} pixels, over "
            f"the pixel limit of {limit}) — reduce it first, or raise PELLUCID_MAX_PIXELS if it really "
            "is an image"
        )


def _swaps_axes(orientation: int) -> bool:
    return orientation in (5, 6, 7, 8)


def _reduce_pil(im: Any, file_size: tuple[int, int], notes: list[str]) -> Any:
    """Reduce a loaded image (already drafted for JPEG) to at most MAX_SIDE, in its own type."""
    k = reduction_factor(im.height, im.width)
    if k > 1:
        mode = im.mode
        if mode == "1":
            im = im.convert("L")
        elif mode in ("P", "PA"):
            gray_palette = _palette_is_gray(im)
            has_alpha = mode == "PA" or "transparency" in im.info
            im = im.convert(("LA" if has_alpha else "L") if gray_palette else ("RGBA" if has_alpha else "RGB"))
            notes.append("expanded palette to " + ("gray" if gray_palette else "RGB"))
        elif mode.startswith("I;16"):
            im = im.convert("I")
        try:
            im = im.reduce(k)
        except ValueError:  # a mode Pillow cannot reduce: go through RGB
            im = im.convert("RGB").reduce(k)
            notes.append(f"converted {mode} to RGB")
    if im.size != file_size:
        notes.append(
            f"downscaled from {file_size[0]}×{file_size[1]} to {im.width}×{im.height} on read"
        )
    return im


def _colour_key(im: Any, path: Path, notes: list[str]) -> Any:
    """A PNG's colour key applied: a gray or RGB image's ``tRNS`` chunk names one value that stands for
    transparent, and those pixels are composited over black, as an alpha channel and palette transparency are.
    Pillow keeps the key beside the pixels unapplied (and gives a 1-, 2- or 4-bit gray key in the file's own
    scale), so they had been shown as stored. A 16-bit RGB key is not applied (Pillow keeps 8 of the 16 bits)."""
    key = im.info.get("transparency")
    if key is None or im.mode not in ("1", "L", "I;16", "RGB"):
        return im
    depth = _png_bit_depth(path)
    arr = np.asarray(im)
    if im.mode == "RGB":
        if not (isinstance(key, tuple) and len(key) == 3 and all(isinstance(v, int) for v in key)):
            return im
        if depth == 16:
            notes.append("the PNG's 16-bit transparent colour was not applied")
            return im
        mask = np.all(arr == np.array(key), axis=-1)
    elif not isinstance(key, int):
        return im
    elif im.mode == "1":
        mask = arr == bool(key)
    else:
        scale = 255 // (2**depth - 1) if im.mode == "L" and depth in (1, 2, 4) else 1
        mask = arr == key * scale
    if not mask.any():
        return im
    from PIL import Image as PILImage

    out = arr.copy()
    out[mask] = 0
    notes.append("composited the PNG's transparent colour over black")
    return PILImage.fromarray(out)


def _png_bit_depth(path: Path) -> int:
    """The bit depth in a PNG's header (0 when it cannot be read)."""
    try:
        with path.open("rb") as fh:
            head = fh.read(26)
    except OSError:
        return 0
    return head[24] if len(head) == 26 and head[12:16] == b"IHDR" else 0


def _palette_is_gray(im: Any) -> bool:
    try:
        palette = im.getpalette() or []
    except Exception:  # noqa: BLE001
        return False
    rgb = [tuple(palette[i : i + 3]) for i in range(0, len(palette) - 2, 3)]
    return bool(rgb) and all(r == g == b for r, g, b in rgb)


def _exif_rotated(im: Any) -> int:
    """The EXIF orientation (2..8) when it asks for a transform, else 0."""
    try:
        orientation = int(im.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - malformed EXIF is not a reason to refuse the image
        return 0
    return orientation if 2 <= orientation <= 8 else 0


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
            notes.append(f"{bits or 32}-bit signed values min-max normalised")
            _warn(
                f"{path.name}: {bits or 32}-bit signed integer pixels have no fixed range; min-max normalised"
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


def _quiet_pillow() -> None:
    """Pillow's plugins log decoding trouble (``ERROR PIL.TiffImagePlugin: More samples per pixel ...``) beside
    the one line the readers raise for it: only their critical records are let through."""
    pil_logger = logging.getLogger("PIL")
    if pil_logger.level < logging.CRITICAL:
        pil_logger.setLevel(logging.CRITICAL)


def _tiff_compression(im: Any) -> int | None:
    """The compression code of an opened TIFF page, else None."""
    tags = getattr(im, "tag_v2", None)
    try:
        return int(tags.get(259, 1)) if tags is not None else None
    except (TypeError, ValueError):
        return None


def _white_is_zero(im: Any) -> bool:
    """Whether a TIFF page stores 0 as white (photometric interpretation 0, WhiteIsZero) in a mode that
    Pillow leaves as stored: 16-bit integers and 32-bit floats. Pillow inverts 1- to 8-bit pages itself."""
    tags = getattr(im, "tag_v2", None)
    if tags is None or im.mode not in ("I;16", "I;16B", "I;16L", "I", "F"):
        return False
    try:
        return int(tags.get(262, -1)) == 0
    except (TypeError, ValueError):
        return False


def _unsigned_32_as_float(im: Any, notes: list[str]) -> Any:
    """A TIFF page of unsigned 32-bit integers as floats in [0, 1]. Pillow reads them as signed (mode "I"), so
    values from 2**31 up had come out negative: the picture scrambled by the min-max range."""
    tags = getattr(im, "tag_v2", None)
    if tags is None or im.mode != "I" or _tiff_bits(im) != 32:
        return im
    sample_format = tags.get(339, 1)
    if isinstance(sample_format, (tuple, list)):
        sample_format = sample_format[0] if sample_format else 1
    if sample_format != 1:
        return im
    from PIL import Image as PILImage

    values = np.asarray(im).view(np.uint32)
    notes.append("scaled 32-bit unsigned values by 4294967295")
    return PILImage.fromarray((values / 4294967295.0).astype(np.float32))


def _tiff_bits(im: Any) -> int | None:
    tags = getattr(im, "tag_v2", None)
    if tags is None:
        return None
    bits = tags.get(258)
    if isinstance(bits, (tuple, list)):
        bits = bits[0] if bits else None
    return int(bits) if bits else None
