"""What outputs may show of an input: names, messages and metadata without patient data.

Inputs are identified by the SHA-256 of their bytes; DICOM inputs are shown as ``DICOM <sha256
prefix>`` instead of their file name (clinical exports are often named after the patient or the
accession number) unless identifiers were asked for; messages are scrubbed of every spelling of the
input's path; only a fixed list of non-identifying reader metadata is kept; and images are read with
reader warnings silenced, since those can quote header values. Every door (CLI, reports, the web app,
the library) names inputs through these functions.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import unicodedata
import warnings
from pathlib import Path

from pellucid.datasets.readers import Image, read_image

__all__ = ["SAFE_META", "display_name", "header_text_silenced", "read_quietly", "safe_meta", "safe_text", "scrub_path",
           "sha256_bytes", "sha256_file"]

#: Reader metadata keys that never carry identifiers.
SAFE_META = ("format", "original_size", "modality", "body_part", "sop_class", "photometric", "window",
             "voi_lut_applied", "monochrome1_inverted", "frame", "n_frames", "bits_stored", "notes")


#: Characters that reorder the text around them when displayed (a name could show "gnp.exe" as "exe.png").
_BIDI_CONTROLS = frozenset([0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)])


def safe_text(text: str) -> str:
    """``text`` (a file name, or a message that holds one) as every output can carry it: bytes that are
    not UTF-8 (a Linux file name may hold any) become ``\\xNN``; control characters (a newline or a tab
    in a name), line and paragraph separators and the marks that reorder displayed text become escapes
    such as ``\\n`` or ``\\u202e``, so a name is one line that reads as it is stored. Text that needs
    none is returned unchanged; the result is unchanged by a second pass."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # lone surrogates that are not escaped bytes
        raw = text.encode("utf-8", "surrogatepass")
    text = raw.decode("utf-8", "backslashreplace")
    if text.isprintable():
        return text
    return "".join(ch.encode("unicode_escape").decode("ascii")
                   if unicodedata.category(ch) in ("Cc", "Zl", "Zp") or ord(ch) in _BIDI_CONTROLS else ch
                   for ch in text)


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def display_name(name: str, sha256: str, dicom: bool, include_identifiers: bool = False) -> str:
    """The name outputs show for an input: the name given, or ``DICOM <hash>`` for DICOM.

    DICOM exports are often named after the patient or accession number, so their names are only
    shown when ``include_identifiers`` is set.
    """
    if dicom and not include_identifiers:
        return f"DICOM {sha256[:12]}"
    return name


def scrub_path(message: str, path: Path | None, name: str) -> str:
    """``message`` with every spelling of ``path`` replaced by the display ``name``."""
    if path is None:
        return message
    path = Path(path)
    spellings = {str(path), path.as_posix(), path.name}
    try:
        spellings.add(str(path.resolve()))
    except OSError:  # a symlink loop or an unreadable parent: the other spellings still go
        pass
    ordered = sorted(spellings - {""}, key=len, reverse=True)
    return re.sub("|".join(map(re.escape, ordered)), lambda _: name, message)


def safe_meta(meta: dict) -> dict:
    """The non-identifying part of a reader's metadata."""
    return {k: meta[k] for k in SAFE_META if k in meta and meta[k] not in (None, [], "")}


@contextlib.contextmanager
def header_text_silenced():
    """Silence the channels through which DICOM header text can escape while a file is read:
    Python warnings (reader caveats) and pydicom's own logger (it logs invalid values verbatim)."""
    pydicom_log = logging.getLogger("pydicom")
    was = pydicom_log.disabled
    pydicom_log.disabled = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        pydicom_log.disabled = was


def read_quietly(path: Path, window: tuple[float, float] | None = None) -> Image:
    """:func:`read_image` with reader warnings and pydicom's logging silenced (they can quote header
    values, such as a patient's name in a corrupt Modality)."""
    with header_text_silenced():
        return read_image(path, window=window)
