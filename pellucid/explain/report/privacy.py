"""Privacy of report outputs: what a report may show of an input. Inputs are named by their SHA-256 and,
for DICOM, by ``DICOM <sha256 prefix>`` instead of the file name (file names of clinical exports often
carry names or IDs) unless identifiers were asked for; messages are scrubbed of every spelling of the
path; only a fixed list of non-identifying reader metadata is kept; and images are read with reader
warnings silenced, since those can quote header values.
"""
from __future__ import annotations

import hashlib
import re
import warnings
from pathlib import Path

from pellucid.datasets.readers import Image, read_image

__all__ = ["display_name", "scrub_path", "sha256_bytes"]

_SAFE_META = ("format", "original_size", "modality", "photometric", "window", "voi_lut_applied",
              "monochrome1_inverted", "frame", "n_frames", "bits_stored", "notes")


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def display_name(name: str, sha256: str, dicom: bool, include_identifiers: bool = False) -> str:
    """The name a report shows for an input: the file name, or ``DICOM <hash>`` for DICOM.

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
    spellings = sorted({str(path), str(path.resolve()), path.as_posix(), path.name} - {""}, key=len, reverse=True)
    return re.sub("|".join(map(re.escape, spellings)), lambda _: name, message)


def _safe_meta(meta: dict) -> dict:
    return {k: meta[k] for k in _SAFE_META if k in meta and meta[k] not in (None, [], "")}


def _read(path: Path, window: tuple[float, float] | None) -> Image:
    with warnings.catch_warnings():
        # reader caveats (e.g. a window ignored) can quote header values; they are not report content
        warnings.simplefilter("ignore")
        return read_image(path, window=window)
