"""Mutation fuzzing of the one door pixels enter by: :func:`pellucid.datasets.readers.read_image`
(and :func:`~pellucid.datasets.readers.dicom_identifying_tags` for DICOM inputs).

Seeds: the real sample DICOMs of ``../shared/data/dicom`` (when present), small DICOMs built here
with pydicom (monochrome with rescale and window, MONOCHROME1 with a VOI LUT, palette colour, RGB
multi-frame, deflated, headless implicit VR with a modality LUT, JPEG baseline, RLE Lossless, float pixel data)
and small PNG/JPEG/TIFF/BMP files. Each execution mutates one seed with a seeded random choice of
byte flips, truncation, region duplication or deletion, DICOM element value replacement (random
bytes, strings, numbers including NaN/inf, multi-values, packed integers, patient-name bytes, a
wrong VR), changes to a compressed frame's own header (sizes, lengths, JP2 box sizes set to 0, 1 or
65535) and PNG/JPEG header size changes, writes it to a temporary file and reads it.

Outcomes: an image (checked: float32 ``(H, W, 1|3)``, finite, in ``[0, 1]``), a project error
(:class:`~pellucid.datasets.readers.ImageReadError`), or a non-project exception, reported with its
type and the deepest source location. The target is zero non-project exceptions and zero invalid
images. Writes ``bench/results/fuzz.md``::

    nice python -m bench.bench_fuzz --executions 50000 --seconds 900

A decoder that grows without bound or never returns would take the machine's memory or hold the fuzzer for
good, so the run caps its own address space (``--memory-gb``, 6 by default: a refusal that ran out of memory
is then an outcome of its own, ``memory``) and each read's time (``--case-seconds``: a read still running in
Python after it is a ``hang``; one stuck in compiled code ends the run with a traceback that names the case).
``--pydicom-seeds`` adds the single-frame compressed files of pydicom's own test set (JPEG, JPEG-LS, JPEG 2000
as codestreams and as JP2 files, RLE): they reach the compiled decoders with real coded data.
"""
from __future__ import annotations

import argparse
import contextlib
import faulthandler
import io
import os
import random
import signal
import struct
import sys
import tempfile
import threading
import time
import traceback
import warnings
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DICOM_DIR = ROOT.parent / "shared" / "data" / "dicom"
OUT = Path(__file__).parent / "results" / "fuzz.md"

__all__ = ["SRGB_PRIMARIES", "check_outcome", "cmyk_icc_profile", "fuzz", "main", "mutate", "rgb_icc_profile",
           "seeds", "table"]

PHI_NAME = b"DOE^JANE"

# (group, element) of the DICOM elements worth replacing.
_TAGS: tuple[tuple[int, int], ...] = (
    (0x0002, 0x0010), (0x0008, 0x0005), (0x0008, 0x0016), (0x0008, 0x0060), (0x0010, 0x0010),
    (0x0018, 0x0015), (0x0028, 0x0002), (0x0028, 0x0004), (0x0028, 0x0006), (0x0028, 0x0008),
    (0x0028, 0x0010), (0x0028, 0x0011), (0x0028, 0x0100), (0x0028, 0x0101), (0x0028, 0x0102),
    (0x0028, 0x0103), (0x0028, 0x1050), (0x0028, 0x1051), (0x0028, 0x1052), (0x0028, 0x1053),
    (0x0028, 0x1056), (0x0028, 0x1101), (0x0028, 0x1102), (0x0028, 0x1103), (0x0028, 0x1201),
    (0x0028, 0x1202), (0x0028, 0x1203), (0x0028, 0x2110), (0x0028, 0x3000), (0x0028, 0x3002),
    (0x0028, 0x3006), (0x0028, 0x3010), (0x5200, 0x9229), (0x5200, 0x9230), (0x7FE0, 0x0010),
)
_TEXT_VALUES: tuple[bytes, ...] = (
    b"nan", b"NaN", b"inf", b"-inf", b"1e308", b"-1e308", b"1e999", b"0", b"-0", b"1\\2",
    b"1\\nan", b"nan\\inf", b"abc", b"", b" ", b"1.5e-320", b"+", b"4294967296", b"-1", b"65535",
    b"99999999999999999999", b"0.0\\0.0\\0.0", b"MONOCHROME2", b"PALETTE COLOR", b"YBR_FULL",
    b"RGB", b"CT", b"SEG", b"1.2.840.10008.1.2.1.99", b"1.2.840.10008.1.2.4.50", b"1.2.3",
    b"ISO_IR 192", b"\\", b"2\\2\\2\\2", PHI_NAME, b"\x00\x00", b"\xff\xfe\xfd",
)
_INT_PACKS = ("<H", "<I", "<h", "<i", ">H", ">I", "<d", "<f")
_INT_VALUES = (0, 1, 2, 3, 7, 8, 12, 16, 17, 32, 64, 255, 256, 4096, 32767, 32768, 65535, 65536,
               2**31 - 1, 2**32 - 1)
_VRS = (b"US", b"UL", b"SS", b"DS", b"IS", b"CS", b"LO", b"OB", b"OW", b"SQ", b"UN", b"FD", b"ZZ",
        b"\x00\x00", b"PN", b"UI", b"AT", b"OF")


# ---------------------------------------------------------------------------------------------
# seeds

#: sRGB's red, green and blue primaries as an ICC profile stores them (XYZ, adapted to D50)
SRGB_PRIMARIES = ((0.4361, 0.2225, 0.0139), (0.3851, 0.7169, 0.0971), (0.1431, 0.0606, 0.7141))


_D50 = (0.9642, 1.0, 0.8249)


def _xyz_tag(values: tuple[float, ...]) -> bytes:
    return b"XYZ " + bytes(4) + b"".join(struct.pack(">i", round(v * 65536)) for v in values)


def _icc_file(kind: bytes, tags: dict[bytes, bytes], description: str) -> bytes:
    """An ICC v2 profile (ICC.1:2001-04) of ``kind`` (device class, colour space and connection space, 12 bytes)
    holding ``tags`` and the description, white point and copyright every profile has."""
    text = description.encode("ascii") + b"\0"
    tags = {b"desc": b"desc" + bytes(4) + struct.pack(">I", len(text)) + text + bytes(4 + 4 + 2 + 1 + 67),
            b"wtpt": _xyz_tag(_D50), **tags, b"cprt": b"text" + bytes(4) + b"none\0"}
    offset = 128 + 4 + 12 * len(tags)
    table, data = b"", b""
    for signature, body in tags.items():
        body += bytes(-len(body) % 4)
        table += signature + struct.pack(">II", offset + len(data), len(body))
        data += body
    header = (struct.pack(">I", offset + len(data)) + bytes(4) + struct.pack(">I", 0x02100000) + kind + bytes(12)
              + b"acsp" + bytes(24) + struct.pack(">I", 0) + _xyz_tag(_D50)[8:] + bytes(48))
    return header + struct.pack(">I", len(tags)) + table + data


def rgb_icc_profile(red: tuple[float, ...], green: tuple[float, ...], blue: tuple[float, ...],
                    description: str = "swapped primaries") -> bytes:
    """A minimal display profile: the three primaries, a 2.2 gamma and a D50 white point. With sRGB's green as its
    red it makes a stored red mean green: a profile no reader can ignore without the colours showing it."""
    gamma = b"curv" + bytes(4) + struct.pack(">IH", 1, round(2.2 * 256)) + bytes(2)
    tags = {b"rXYZ": _xyz_tag(red), b"gXYZ": _xyz_tag(green), b"bXYZ": _xyz_tag(blue),
            b"rTRC": gamma, b"gTRC": gamma, b"bTRC": gamma}
    return _icc_file(b"mntrRGB XYZ ", tags, description)


def cmyk_icc_profile() -> bytes:
    """A minimal press profile (CMYK to Lab through a 2-point table) in which cyan ink alone prints sRGB's red, no
    ink white, black ink black and any other mix a dark gray. Pillow's plain formula makes cyan ink cyan."""

    def lab(lightness: float, a: float, b: float) -> bytes:  # ICC v2 16-bit Lab
        return struct.pack(">HHH", round(lightness / 100 * 0xFF00), round((a + 128) * 256), round((b + 128) * 256))

    table = b""
    for c, m, y, k in ((c, m, y, k) for c in (0, 1) for m in (0, 1) for y in (0, 1) for k in (0, 1)):
        table += lab(0, 0, 0) if k else lab(54, 80, 67) if (c, m, y) == (1, 0, 0) else lab(100 if not (c or m or y)
                                                                                                else 30, 0, 0)
    identity = b"".join(struct.pack(">i", 65536 if i in (0, 4, 8) else 0) for i in range(9))
    linear = struct.pack(">HH", 0, 65535)
    a2b0 = (b"mft2" + bytes(4) + bytes([4, 3, 2, 0]) + identity + struct.pack(">HH", 2, 2) + linear * 4 + table
            + linear * 3)
    return _icc_file(b"prtrCMYKLab ", {b"A2B0": a2b0}, "cyan ink prints red")


def _image_seeds() -> list[tuple[str, bytes]]:
    from PIL import Image

    rng = np.random.default_rng(0)
    gray = (np.add.outer(np.arange(24), np.arange(32)) * 4).astype(np.uint8)
    rgb = np.stack([gray, gray[::-1], 255 - gray], axis=2)
    out: list[tuple[str, bytes]] = []

    def save(suffix: str, im: Any, **kw: Any) -> None:
        buf = io.BytesIO()
        im.save(buf, **kw)
        out.append((suffix, buf.getvalue()))

    save(".png", Image.fromarray(gray), format="PNG")
    save(".png", Image.fromarray(rgb), format="PNG")
    save(".png", Image.fromarray(np.dstack([rgb, gray])), format="PNG")
    save(".png", Image.fromarray((gray.astype(np.uint16) * 200)), format="PNG")
    save(".png", Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE), format="PNG")
    save(".jpg", Image.fromarray(rgb), format="JPEG", quality=90)
    save(".jpg", Image.fromarray(gray), format="JPEG", quality=75, progressive=True)
    save(".tif", Image.fromarray(gray.astype(np.uint16) * 100), format="TIFF")
    frames = [Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)) for _ in range(3)]
    save(".tif", frames[0], format="TIFF", save_all=True, append_images=frames[1:])
    save(".bmp", Image.fromarray(rgb), format="BMP")
    red, green, blue = SRGB_PRIMARIES
    wide = rgb_icc_profile(green, red, blue)  # a profile the readers apply (mutations reach littleCMS)
    save(".jpg", Image.fromarray(rgb), format="JPEG", quality=90, icc_profile=wide)
    save(".png", Image.fromarray(np.dstack([rgb, gray])), format="PNG", icc_profile=wide)
    save(".jpg", Image.fromarray(rgb).convert("CMYK"), format="JPEG", quality=90, icc_profile=cmyk_icc_profile())
    return out


def _dicom_bytes(ds: Any, syntax: Any, *, implicit: bool = False, preamble: bool = True) -> bytes:
    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import dcmwrite

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = syntax
    ds.file_meta = meta
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=preamble)
    return buf.getvalue()


def _dicom_seeds() -> list[tuple[str, bytes]]:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import (
        DeflatedExplicitVRLittleEndian,
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        JPEGBaseline8Bit,
        RLELossless,
    )
    from PIL import Image

    ramp = (np.add.outer(np.arange(20), np.arange(24)) * 37 % 4096).astype(np.uint16)

    def base(modality: str = "CT") -> Dataset:
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ds.SOPInstanceUID = "1.2.3.4.5.6.7"
        ds.Modality = modality
        ds.PatientName = PHI_NAME.decode()
        ds.PatientID = "SECRET123"
        ds.InstitutionName = "ST ELSEWHERE HOSPITAL"
        ds.BodyPartExamined = "CHEST"
        ds.Rows, ds.Columns = ramp.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        return ds

    out: list[tuple[str, bytes]] = []
    ds = base()
    ds.RescaleSlope, ds.RescaleIntercept = "1.5", "-1024"
    ds.WindowCenter, ds.WindowWidth = ["40", "300"], ["400", "1500"]
    ds.PixelData = ramp.tobytes()
    out.append((".dcm", _dicom_bytes(ds, ExplicitVRLittleEndian)))
    out.append((".dcm", _dicom_bytes(ds, DeflatedExplicitVRLittleEndian)))

    ds = base("CR")
    ds.PhotometricInterpretation = "MONOCHROME1"
    lut = Dataset()
    lut.LUTDescriptor = [256, 0, 16]
    lut.add_new(0x00283006, "US", list(range(0, 65536, 256)))
    ds.VOILUTSequence = [lut]
    ds.PixelData = ramp.tobytes()
    out.append((".dcm", _dicom_bytes(ds, ExplicitVRLittleEndian)))

    ds = base("OT")
    mlut = Dataset()
    mlut.LUTDescriptor = [4096, 0, 16]
    mlut.ModalityLUTType = "HU"
    mlut.add_new(0x00283006, "US", list(range(4096)))
    ds.ModalityLUTSequence = [mlut]
    ds.PixelData = ramp.tobytes()
    out.append(("", _dicom_bytes(ds, ImplicitVRLittleEndian, preamble=False)))

    ds = base("US")
    ds.PhotometricInterpretation = "PALETTE COLOR"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    for colour, scale in (("Red", 1), ("Green", 2), ("Blue", 3)):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(ds, f"{colour}PaletteColorLookupTableData",
                (np.arange(256, dtype=np.uint16) * 257 // scale).astype("<u2").tobytes())
    ds.PixelData = (ramp % 256).astype(np.uint8).tobytes()
    out.append((".dcm", _dicom_bytes(ds, ExplicitVRLittleEndian)))

    ds = base("XC")
    rgb = np.stack([ramp % 256, (ramp * 3) % 256, 255 - ramp % 256], axis=2).astype(np.uint8)
    ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
    ds.PhotometricInterpretation = "RGB"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.NumberOfFrames = 2
    ds.PixelData = np.stack([rgb, rgb[::-1]]).tobytes()
    out.append((".dcm", _dicom_bytes(ds, ExplicitVRLittleEndian)))

    ds.ICCProfile = rgb_icc_profile(*SRGB_PRIMARIES[1::-1], SRGB_PRIMARIES[2])  # the same, with a camera's profile
    out.append((".dcm", _dicom_bytes(ds, ExplicitVRLittleEndian)))

    ds = base("XC")
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
    ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    out.append((".dcm", _dicom_bytes(ds, JPEGBaseline8Bit)))

    ds = base("MR")
    ds.BitsAllocated = 32
    del ds.BitsStored, ds.HighBit, ds.PixelRepresentation
    ds.FloatPixelData = (ramp.astype(np.float32) / 7).tobytes()
    out.append((".dcm", _dicom_bytes(ds, ExplicitVRLittleEndian)))

    # RLE Lossless: decoded by pylibjpeg-rle, compiled Rust, whose panics pass ``except Exception``
    ds = base("MR")
    ds.PixelData = ramp.tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.compress(RLELossless, encoding_plugin="pydicom")
    out.append((".dcm", _dicom_bytes(ds, RLELossless)))
    return out


def seeds(real_dicoms: bool = True, pydicom_seeds: bool = False) -> list[tuple[str, bytes]]:
    """``(suffix, bytes)`` of every seed: real sample DICOMs (if present), built DICOMs, images, and with
    ``pydicom_seeds`` the compressed single-frame files of pydicom's test set."""
    out = _image_seeds() + _dicom_seeds()
    if real_dicoms and DICOM_DIR.is_dir():
        out += [(".dcm", p.read_bytes()) for p in sorted(DICOM_DIR.iterdir()) if p.is_file()]
    if pydicom_seeds:
        out += _pydicom_compressed_seeds()
    return out


def _pydicom_compressed_seeds(max_bytes: int = 400_000) -> list[tuple[str, bytes]]:
    import pydicom
    import pydicom.data

    out = []
    for path in sorted((Path(pydicom.data.__file__).parent / "test_files").rglob("*.dcm")):
        if path.stat().st_size > max_bytes:
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            syntax = ds.file_meta.TransferSyntaxUID
            if syntax.is_encapsulated and not syntax.is_deflated and int(ds.get("NumberOfFrames", 1) or 1) == 1:
                out.append((".dcm", path.read_bytes()))
        except Exception:  # noqa: BLE001 - pydicom's test set holds broken files on purpose
            continue
    return out


# ---------------------------------------------------------------------------------------------
# mutations

def _random_value(rng: random.Random) -> bytes:
    kind = rng.randrange(6)
    if kind == 0:
        return rng.choice(_TEXT_VALUES)
    if kind == 1:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 17)))
    if kind == 2:
        fmt = rng.choice(_INT_PACKS)
        value = rng.choice(_INT_VALUES) if "d" not in fmt and "f" not in fmt else rng.choice(
            (float("nan"), float("inf"), -1e300, 0.0, 1.5))
        try:
            return struct.pack(fmt, value) * rng.choice((1, 1, 2, 3))
        except (struct.error, OverflowError):
            return struct.pack(fmt, 0)
    if kind == 3:
        return "\\".join(rng.choice(("nan", "inf", "1", "-3.5", "1e400", "x", "")) for _ in range(
            rng.randrange(1, 5))).encode()
    if kind == 4:
        return PHI_NAME + bytes(rng.randrange(2))
    return str(rng.uniform(-1e6, 1e6)).encode()


def _find_element(data: bytes, tag: tuple[int, int], rng: random.Random) -> tuple[int, bool] | None:
    group, element = tag
    starts = []
    for order in ("<", ">"):
        key = struct.pack(order + "HH", group, element)
        pos = data.find(key, 0 if tag[0] == 2 else 132)
        if pos >= 0:
            starts.append((pos, order == "<"))
    return rng.choice(starts) if starts else None


def _replace_element(data: bytes, rng: random.Random) -> bytes:
    """Replace the value (and sometimes the VR) of one DICOM element, fixing its length field."""
    found = _find_element(data, rng.choice(_TAGS), rng)
    if found is None:
        return _flip(data, rng)
    pos, little = found
    order = "<" if little else ">"
    vr = data[pos + 4 : pos + 6]
    explicit = vr.isalpha() and vr.isupper()
    value = _random_value(rng)
    if explicit and vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL"):
        head, length_fmt, value_at = 12, order + "I", pos + 8
    elif explicit:
        head, length_fmt, value_at = 8, order + "H", pos + 6
    else:
        head, length_fmt, value_at = 8, order + "I", pos + 4
    try:
        (old_len,) = struct.unpack(length_fmt, data[value_at : value_at + struct.calcsize(length_fmt)])
    except struct.error:
        return data[:pos]
    if old_len == 0xFFFFFFFF or pos + head + old_len > len(data):
        old_len = min(len(data) - pos - head, 64) if rng.random() < 0.5 else 0
    new = struct.pack(length_fmt, min(len(value), 0xFFFF if length_fmt.endswith("H") else 2**32 - 1))
    prefix = data[:pos + 4]
    if explicit:
        new_vr = rng.choice(_VRS) if rng.random() < 0.15 else vr
        prefix += new_vr + (b"\x00\x00" if head == 12 else b"")
    return prefix + new + value + data[pos + head + old_len :]


def _flip(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 4, 16))):
        i = rng.randrange(len(buf))
        buf[i] = rng.randrange(256) if rng.random() < 0.7 else buf[i] ^ (1 << rng.randrange(8))
    return bytes(buf)


def _header_size(data: bytes, rng: random.Random) -> bytes:
    """Give a PNG (IHDR, CRC fixed) or JPEG (SOF) header another width/height."""
    size = rng.choice((0, 1, 65535, 2**31 - 1, 100000, 12000, 6500, rng.randrange(1, 70000)))
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        ihdr = bytearray(data[8 + 8 : 8 + 8 + 13])
        at = rng.choice((0, 4))
        ihdr[at : at + 4] = struct.pack(">I", size)
        chunk = b"IHDR" + bytes(ihdr)
        return data[:8] + data[8:12] + chunk + struct.pack(">I", zlib.crc32(chunk)) + data[8 + 8 + 13 + 4 :]
    for marker in (b"\xff\xc0", b"\xff\xc2", b"\xff\xc1"):
        pos = data.find(marker)
        if pos >= 0:
            at = pos + 5 + rng.choice((0, 2))
            return data[:at] + struct.pack(">H", min(size, 65535)) + data[at + 2 :]
    return _flip(data, rng)


#: where a compressed frame's own header starts: JPEG's start of image, a JPEG 2000 codestream, a JP2 file
_CODED_STARTS = (b"\xff\xd8\xff", b"\xff\x4f\xff\x51", b"\x00\x00\x00\x0cjP  ")


def _coded_header(data: bytes, rng: random.Random) -> bytes:
    """Change a size in the header of a DICOM file's first compressed frame: a JPEG or JPEG-LS frame's height or
    width, a JPEG 2000 codestream's, or the length of a JP2 file's first box after its signature (0, 1, 65535 or
    at random). The decoders trust these before any check of their own, and whole-file mutations seldom land on
    them: a height of 0 made pylibjpeg-libjpeg grow without bound, a box length of 0 held pydicom for good."""
    pixel_data = max(data.rfind(b"\xe0\x7f\x10\x00"), 0)
    starts = [i for i in (data.find(start, pixel_data) for start in _CODED_STARTS) if i >= 0]
    if not starts:
        return _flip(data, rng)
    begin = min(starts)
    value = rng.choice((0, 0, 1, 65535, rng.randrange(65536)))
    if data.startswith(b"\xff\xd8", begin):
        from pellucid.datasets.readers.dicom import _SOF_MARKERS  # the start-of-frame markers the readers check

        sof = next((i for i in range(begin + 2, min(len(data) - 9, begin + 65536))
                    if data[i] == 0xFF and (data[i + 1] in _SOF_MARKERS)), None)
        if sof is None:
            return _flip(data, rng)
        at, width = sof + rng.choice((5, 7)), 2
    elif data.startswith(b"\xff\x4f", begin):
        at, width = begin + rng.choice((8, 12)), 4  # Xsiz, Ysiz
    else:
        at, width = begin + 12, 4  # the first box after the signature
    return data[:at] + value.to_bytes(width, "big") + data[at + width :]


def mutate(data: bytes, suffix: str, rng: random.Random) -> bytes:
    """One seeded mutation of ``data`` (a file with ``suffix``); may stack up to three."""
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        if not data:
            return data
        is_dicom = suffix in (".dcm", "")
        kind = rng.random()
        if is_dicom and kind < 0.06:
            data = _coded_header(data, rng)
        elif is_dicom and kind < 0.45:
            data = _replace_element(data, rng)
        elif not is_dicom and kind < 0.2:
            data = _header_size(data, rng)
        elif kind < 0.75:
            data = _flip(data, rng)
        elif kind < 0.87:
            data = data[: rng.randrange(len(data))]
        elif kind < 0.94:
            i = rng.randrange(len(data))
            j = min(len(data), i + rng.randrange(1, 512))
            data = data[:i] + data[j:] if rng.random() < 0.5 else data[:j] + data[i:j] + data[j:]
        else:
            i = rng.randrange(len(data))
            data = data[:i] + PHI_NAME + data[i + rng.choice((0, len(PHI_NAME))) :]
    return data


# ---------------------------------------------------------------------------------------------
# execution

def _location(err: BaseException) -> str:
    frames = traceback.extract_tb(err.__traceback__)
    if not frames:
        return "?"
    ours = [f for f in frames if "pellucid" in f.filename and "/.venv/" not in f.filename]
    last = frames[-1]
    where = f"{Path(last.filename).name}:{last.lineno}"
    if ours and ours[-1] is not last:
        where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno} → {where}"
    return where


class _CaseTimeout(BaseException):
    """Raised in the reading thread when one read outlives ``--case-seconds``."""


def check_outcome(path: Path, dicom: bool) -> tuple[str, str]:
    """Read ``path`` through the door: ``('image'|'project'|'memory'|'hang'|'crash'|'invalid', detail)``."""
    from pellucid.datasets.readers import ImageReadError, dicom_identifying_tags, read_image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if dicom:
                try:
                    dicom_identifying_tags(path)
                except ImageReadError:
                    pass
            image = read_image(path)
        except ImageReadError as err:
            message = str(err)
            if "\n" in message or path.name not in message:
                return "invalid", f"message not one line naming the file: {message[:120]}"
            if "ran out of memory" in message or isinstance(err.__cause__, MemoryError):
                return "memory", f"the read reached the address-space cap: {message.split(': ', 1)[-1][:100]}"
            cause = err.__cause__
            if cause is not None and not isinstance(cause, ImageReadError) and ("header is corrupt (" in message or "the file is corrupt (" in message):
                # refused by a catch-all: counted, with where it came from, to show what is left
                return "project", f"caught generically: {type(cause).__name__} at {_location(cause)}"
            return "project", ""
        except (KeyboardInterrupt, SystemExit):
            raise
        except _CaseTimeout as err:
            stack = traceback.extract_tb(err.__traceback__)[:-1]  # less the alarm's own frame
            where = f"{Path(stack[-1].filename).name}:{stack[-1].lineno} in {stack[-1].name}" if stack else "?"
            return "hang", f"still reading after the case's time, at {where}"
        except BaseException as err:  # noqa: BLE001 - what the fuzzer is looking for (a Rust panic included)
            if isinstance(err, MemoryError) or isinstance(err.__cause__, MemoryError):
                return "memory", f"{type(err).__name__} at {_location(err)}"
            return "crash", f"{type(err).__name__} at {_location(err)}"
    arr = image.array
    if arr.dtype != np.float32 or arr.ndim != 3 or arr.shape[2] not in (1, 3) or not arr.size:
        return "invalid", f"array {arr.dtype} {arr.shape}"
    if not np.isfinite(arr).all():
        return "invalid", "non-finite image"
    if float(arr.min()) < 0.0 or float(arr.max()) > 1.0:
        return "invalid", "values outside [0, 1]"
    return "image", ""


#: where a run stuck in compiled code leaves the case it was reading and the Python traceback at that moment
#: (stderr may point at the null device while a decoder runs)
STUCK_LOG = Path(tempfile.gettempdir()) / f"pellucid-fuzz-stuck-{os.getpid()}.txt"


@contextlib.contextmanager
def _time_limit(seconds: float | None, case: int, path: Path) -> Any:
    """Raise :class:`_CaseTimeout` in this (main) thread after ``seconds``; after twice that (a read stuck in
    compiled code never returns to Python) end the process, leaving the case, its file (kept: the process ends
    before its temporary folder is removed) and the traceback in :data:`STUCK_LOG`."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def alarm(signum: int, frame: Any) -> None:
        raise _CaseTimeout(f"case {case}")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    with STUCK_LOG.open("w") as log:
        log.write(f"case {case}: {path}\n")
        log.flush()
        faulthandler.dump_traceback_later(2 * seconds, exit=True, file=log)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            faulthandler.cancel_dump_traceback_later()


#: how far one read may raise the process's peak memory: a frame at the pixel limit decodes in well under this
GROWTH_LIMIT = 1 << 30


def _peak_memory() -> int:
    """The process's peak resident memory in bytes (0 where unknown)."""
    try:
        import resource
    except ImportError:
        return 0
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def cap_memory(gigabytes: float | None) -> None:
    """Cap this process's address space, so a decoder that grows without bound fails (and is counted) instead of
    taking the machine's memory. Linux only; elsewhere nothing is capped."""
    if not gigabytes:
        return
    try:
        import resource
    except ImportError:
        return
    limit = int(gigabytes * (1 << 30))
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))


def _lift_memory_cap() -> None:
    try:
        import resource
    except ImportError:
        return
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (hard, hard))


def fuzz(executions: int, seconds: float, seed: int = 0, *, real_dicoms: bool = True,
         work: Path | None = None, case_seconds: float | None = None, pydicom_seeds: bool = False) -> dict[str, Any]:
    """Run up to ``executions`` mutations (stopping after ``seconds``) and count the outcomes."""
    rng = random.Random(seed)
    corpus = seeds(real_dicoms, pydicom_seeds)
    counts: Counter[str] = Counter()
    problems: Counter[str] = Counter()
    examples: dict[str, int] = {}
    slowest = (0.0, -1)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        for i in range(executions):
            if time.perf_counter() - t0 > seconds:
                break
            suffix, data = corpus[rng.randrange(len(corpus))]
            try:
                data = mutate(data, suffix, rng)
            except MemoryError:  # a decoder kept what it took: nothing more can run in this process
                _lift_memory_cap()  # so that the table can still be written
                key = f"memory: the run's memory was exhausted before case {i} (a decoder kept what it took)"
                counts["memory"] += 1
                problems[key] += 1
                examples.setdefault(key, i)
                break
            path = Path(tmp) / f"case{i % 7}{suffix}"
            path.write_bytes(data)
            start, peak = time.perf_counter(), _peak_memory()
            with _time_limit(case_seconds, i, path):
                outcome, detail = check_outcome(path, suffix in (".dcm", ""))
            took = time.perf_counter() - start
            grew = _peak_memory() - peak
            if grew > GROWTH_LIMIT and outcome != "memory":  # a decoder that failed its allocation calmly
                outcome, detail = "memory", f"the read raised the process's peak memory by {grew / 2**30:.1f} GB"
            if took > slowest[0]:
                slowest = (took, i)
            counts[outcome] += 1
            if detail:
                problems[f"{outcome}: {detail}"] += 1
                examples.setdefault(f"{outcome}: {detail}", i)
    return {
        "executions": sum(counts.values()), "counts": dict(counts), "problems": dict(problems),
        "examples": examples, "seconds": time.perf_counter() - t0, "seed": seed,
        "n_seeds": len(corpus), "slowest_s": slowest[0], "slowest_case": slowest[1],
    }


def table(res: dict[str, Any], cpu: str, command: str) -> list[str]:
    c = res["counts"]
    crashes = c.get("crash", 0) + c.get("memory", 0) + c.get("hang", 0)
    lines = [
        "# Reader fuzzing (`read_image`, `dicom_identifying_tags`)",
        "",
        f"`{command}` — seed {res['seed']}, {res['n_seeds']} seed files, CPU: {cpu}",
        "",
        "| executions | images returned | project errors (ImageReadError) | non-project exceptions "
        "(memory, hangs included) | invalid images / messages | seconds | executions/s | slowest execution |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {res['executions']} | {c.get('image', 0)} | {c.get('project', 0)} | {crashes} | "
        f"{c.get('invalid', 0)} | {res['seconds']:.0f} | {res['executions'] / max(res['seconds'], 1e-9):.0f} "
        f"| {res['slowest_s']:.2f} s (case {res['slowest_case']}) |",
        "",
    ]
    if res["problems"]:
        lines += [
            "Non-project exceptions and invalid outcomes would be listed first; `project: caught "
            "generically` rows are refusals by a catch-all (one-line message naming the exception "
            "type only), with where the underlying exception was raised.",
            "",
            "| outcome: type and location | count | first case |",
            "|---|---:|---:|",
        ]
        for key, n in sorted(res["problems"].items(), key=lambda kv: (kv[0].startswith("project"), -kv[1])):
            lines.append(f"| {key} | {n} | {res['examples'][key]} |")
    if not crashes and not c.get("invalid", 0):
        lines += ["", "No non-project exception, no invalid image, no malformed message."]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--executions", type=int, default=50_000)
    parser.add_argument("--seconds", type=float, default=900.0, help="stop after this long")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--memory-gb", type=float, default=6.0,
                        help="cap the run's address space (0: no cap); a read that reaches it is counted")
    parser.add_argument("--case-seconds", type=float, default=60.0,
                        help="a read still running after this long is counted as a hang (0: no limit)")
    parser.add_argument("--pydicom-seeds", action="store_true",
                        help="also mutate the compressed single-frame files of pydicom's test set")
    args = parser.parse_args(argv)
    from bench import write_table
    from pellucid.core.quantize import cpu_features

    summary = cpu_features().summary()  # before the cap: it may start processes
    cap_memory(args.memory_gb)
    res = fuzz(args.executions, args.seconds, args.seed, case_seconds=args.case_seconds,
               pydicom_seeds=args.pydicom_seeds)
    command = (f"python -m bench.bench_fuzz --executions {args.executions} --seconds {args.seconds:g} "
               f"--seed {args.seed} --memory-gb {args.memory_gb:g} --case-seconds {args.case_seconds:g}"
               + (" --pydicom-seeds" if args.pydicom_seeds else ""))
    write_table(table(res, summary, command), args.out)
    c = res["counts"]
    return 1 if c.get("crash") or c.get("invalid") or c.get("memory") or c.get("hang") else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
