"""Telling DICOM files apart (:func:`is_dicom`: suffix, ``DICM`` preamble, or a parsable header
of a headless file) and the shared DICOM plumbing: importing pydicom with an install hint,
checking that a dataset has the attributes of an image object, and the inflation guard that every
parse of a file goes through first (:func:`_check_deflated`: a Deflated Explicit VR Little Endian
dataset is inflated in bounded chunks and refused past the budget of
:func:`~pellucid.datasets.readers.limits.max_inflated_bytes`, before pydicom inflates it whole)."""

from __future__ import annotations

import os
import stat
import struct
import warnings
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pellucid.datasets.readers.common import _pydicom_quiet
from pellucid.datasets.readers.image import DICOM_SUFFIXES, ImageReadError
from pellucid.datasets.readers.limits import max_inflated_bytes

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
        if not stat.S_ISREG(p.stat().st_mode):  # a named pipe would block, a device never end
            return False
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
        _check_deflated(p)
    except ImageReadError:
        return True  # a file meta group with a deflated transfer syntax: DICOM, refused later
    try:
        with warnings.catch_warnings(), _pydicom_quiet():
            warnings.simplefilter("ignore")
            ds = read_dataset(pydicom, p, stop_before_pixels=True)
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


#: the most ``read`` calls pydicom may make on one file: it reads about once per element, an image's
#: header has a few hundred, a structure set a few thousand. A file of zeros named ``.dcm`` (or with the
#: preamble, or one tag in front) parses as one empty element per 8 bytes: 14-35 s for 20 MB, about 30
#: minutes for a 1 GB file that ``truncate -s 1G`` makes in an instant. Past this many reads the parse
#: stops (8 MB of zeros, a few seconds).
MAX_HEADER_READS = 1_000_000

#: reads allowed for the file meta and command groups (a few dozen elements)
_MAX_META_READS = 10_000

#: small reads in a row that find only zeros (an empty element of tag (0000,0000) each): a header has none
#: but by chance; a file of zeros after a real tag is refused after these instead of the read bound
_MAX_ZERO_READS = 10_000

#: bytes read at the dataset's start: all zero means no header (a DICOM dataset opens with its tags)
_ZERO_PROBE = 1024


class HeaderTooLong(Exception):
    """pydicom read a file more than :data:`MAX_HEADER_READS` times: it is not a header."""


class ReadTooLarge(Exception):
    """One read asked for more bytes than its budget (a fragment of pixel data that declares gigabytes)."""


class _CountedReads:
    """A binary file whose ``read`` may be called at most ``limit`` times (then :class:`HeaderTooLong`), and,
    with ``most``, for at most that many bytes at a time (then :class:`ReadTooLarge`)."""

    def __init__(self, raw: Any, limit: int, most: int | None = None) -> None:
        self._raw = raw
        self._left = limit
        self._most = most
        self._zeros = 0

    def read(self, size: int = -1) -> bytes:
        self._left -= 1
        if self._left < 0:
            raise HeaderTooLong
        if self._most is not None and (size is None or size < 0 or size > self._most):
            raise ReadTooLarge
        data = self._raw.read(size)
        if 0 < len(data) <= 16 and not any(data):  # a tag and length of zeros
            self._zeros += 1
            if self._zeros > _MAX_ZERO_READS:
                raise HeaderTooLong
        else:
            self._zeros = 0
        return data

    def __getattr__(self, name: str) -> Any:  # seek, tell, name, ...
        return getattr(self._raw, name)


def read_dataset(pydicom: Any, path: Path, *, where: list[int] | None = None, **kwargs: Any) -> Dataset:
    """``pydicom.dcmread(path, force=True, **kwargs)`` with the number of reads bounded
    (:data:`MAX_HEADER_READS`) and a file whose dataset starts with zeros refused at once. ``where``, when
    given, gets the file position the parse stopped at (with ``stop_before_pixels``: the pixel element).

    Raises:
        HeaderTooLong: the file starts with zeros where its tags should be, or needs more reads than a
            header does; the callers say so in one line (or, sniffing, answer "not DICOM").
    """
    with path.open("rb") as raw:
        head = raw.read(128 + 4 + _ZERO_PROBE)
        start = 132 if head[128:132] == b"DICM" else 0
        probe = head[start:start + _ZERO_PROBE]
        if len(probe) == _ZERO_PROBE and not any(probe):
            raise HeaderTooLong
        raw.seek(0)
        ds = pydicom.dcmread(_CountedReads(raw, MAX_HEADER_READS), force=True, **kwargs)
        if where is not None:
            where.append(raw.tell())
        return ds


_DEFLATED_UID = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian
_CHUNK = 1 << 20


def no_header(p: Path) -> str:
    """The refusal of a file with no DICOM header where one should be (zeros, or no end to it)."""
    return (
        f"{p}: is not a DICOM file: no header where its tags should be (zeros, or more than "
        f"{MAX_HEADER_READS:,} elements) — re-export it, or check that the copy is complete"
    )


_VRS = frozenset(b"AE AS AT CS DA DS DT FL FD IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR "
                 b"US UT UV".split())
_VRS_LENGTH_32 = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_UNDEFINED = 0xFFFFFFFF


class _ElementWalk:
    """Walks the elements of an inflated Explicit VR Little Endian dataset as it streams in, counting them
    and the empty elements of tag (0000,0000) in a row, and skipping values (pixel data) unread.

    pydicom parses the inflated dataset from its own buffer, out of reach of the read bound of
    :func:`read_dataset`, so a deflated dataset of zeros after one real tag (150 KB that inflate to
    150 MB) had taken a minute to refuse. The walk stops counting (and never refuses) at anything it
    does not follow, such as an unknown VR or an undefined length outside a sequence."""

    def __init__(self) -> None:
        self.elements = 0
        self.zeros = 0
        self.lost = False
        self._skip = 0
        self._rest = b""

    @property
    def too_long(self) -> bool:
        return self.elements > MAX_HEADER_READS or self.zeros > _MAX_ZERO_READS

    def feed(self, data: bytes) -> None:
        if self.lost or self.too_long:
            return
        if self._skip >= len(data):
            self._skip -= len(data)
            return
        buf, i = (self._rest + data, 0) if self._rest else (data, self._skip)
        self._skip = 0
        end = len(buf)
        while end - i >= 8 and not self.too_long:
            group, elem = struct.unpack_from("<HH", buf, i)
            vr = buf[i + 4:i + 6]
            self.elements += 1
            if group == 0 and elem == 0 and not any(buf[i + 4:i + 8]):
                self.zeros += 1  # what zeros parse as: an empty element, 8 bytes
                i += 8
                continue
            self.zeros = 0
            if group == 0xFFFE:  # an item or a delimiter: tag and length, no VR; items are walked into
                i += 8
                continue
            if vr not in _VRS:
                self.lost = True
                return
            if vr in _VRS_LENGTH_32:
                if end - i < 12:
                    self.elements -= 1
                    break
                (length,) = struct.unpack_from("<I", buf, i + 8)
                i += 12
            else:
                (length,) = struct.unpack_from("<H", buf, i + 6)
                i += 8
            if vr == b"SQ":
                continue  # its items follow, defined length or not
            if length == _UNDEFINED:
                self.lost = True
                return
            if length > end - i:
                self._skip = length - (end - i)
                i = end
            else:
                i += length
        self._rest = buf[i:] if i < end else b""


def _check_deflated(path: Path) -> None:
    """Refuse a deflated DICOM whose dataset inflates beyond the budget, reading in 1 MiB chunks.

    Files that are not deflated, or whose file meta cannot be read, pass: the parser that follows
    judges them. Memory stays at a few MiB whatever the compression ratio.

    Raises:
        ImageReadError: the inflated dataset exceeds :func:`max_inflated_bytes`, or the deflate
            stream is corrupt.
    """
    try:
        from pydicom.filereader import (
            _read_command_set_elements,
            _read_file_meta_info,
            read_preamble,
        )
    except ImportError:  # another pydicom layout: nothing to guard with
        return
    with path.open("rb") as fh:
        try:
            with warnings.catch_warnings(), _pydicom_quiet():
                warnings.simplefilter("ignore")
                counted = _CountedReads(fh, _MAX_META_READS)  # zeros read as command elements, one per 8 bytes
                read_preamble(counted, True)
                file_meta = _read_file_meta_info(counted)
                _read_command_set_elements(counted)
                uid = str(file_meta.get("TransferSyntaxUID") or "").strip("\0 ")
        except Exception:  # noqa: BLE001 - a corrupt meta group is the parser's to refuse
            return
        if uid != _DEFLATED_UID:
            return
        budget = max_inflated_bytes()
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        walk = _ElementWalk()
        total = 0
        try:
            while not inflater.eof:
                chunk = fh.read(_CHUNK)
                if not chunk:
                    break
                out = inflater.decompress(chunk, _CHUNK)
                total += len(out)
                walk.feed(out)
                # not past the stream's end: bytes after it (a pad byte) stay in the tail, and the loop had never ended
                while inflater.unconsumed_tail and not inflater.eof and total <= budget and not walk.too_long:
                    out = inflater.decompress(inflater.unconsumed_tail, _CHUNK)
                    total += len(out)
                    walk.feed(out)
                if walk.too_long:
                    raise ImageReadError(no_header(path))
                if total > budget:
                    raise ImageReadError(
                        f"{path}: its deflated dataset inflates to more than {budget} bytes, over "
                        "the budget of the pixel limit — re-save it uncompressed, or raise "
                        "PELLUCID_MAX_PIXELS if it really is one image"
                    )
        except zlib.error as err:
            raise ImageReadError(
                f"{path}: could not be decoded: its deflated dataset is corrupt (zlib.error) — "
                "re-export it"
            ) from err
