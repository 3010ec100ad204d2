"""Zip uploads of the web app's Batch page, unpacked within a budget.

:func:`extract_zip` checks a zip's central directory (file count, total and per-member size,
compression ratio, names, links, compression method) and then streams every member in 1 MB chunks,
counting again, since a header can lie; anything over budget or pointing outside the folder is refused
in one line (:class:`UploadError`) and what was written is removed.
"""
from __future__ import annotations

import io
import logging
import os
import shutil
import stat
import tempfile
import weakref
import zipfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MAX_ZIP_BYTES", "MAX_ZIP_FILES", "MAX_ZIP_MEMBER_BYTES", "MAX_ZIP_RATIO", "ScratchFolder", "UploadError",
           "ZipBudget", "env_number", "extract_zip"]

log = logging.getLogger(__name__)

MAX_ZIP_FILES = 10_000
MAX_ZIP_BYTES = 2 << 30
MAX_ZIP_MEMBER_BYTES = 256 << 20
MAX_ZIP_RATIO = 100.0
#: members smaller than this may compress better than MAX_ZIP_RATIO (headers, blank masks)
_RATIO_FLOOR = 1 << 20
_CHUNK = 1 << 20


class UploadError(ValueError):
    """An uploaded file that cannot be used; the message is one line naming the file."""


def env_number(name: str, default: float) -> float:
    """A positive number from the environment variable ``name``, else ``default`` (a bad value is logged)."""
    raw = os.environ.get(name, "")
    try:
        value = float(raw) if raw else default
    except ValueError:
        log.warning("%s=%r is not a number; using %s", name, raw, default)
        return default
    return value if value > 0 else default


class ScratchFolder:
    """A temporary folder that lives as long as this object: the unpacked images of one Batch run.

    Kept in a browser session's state, it is removed when that run is replaced, when the session ends
    and its state is dropped, or when the server's Python exits, whichever comes first; ``pellucid ui``
    also removes the scratch root it gave the server (``TMPDIR``) once the server has stopped, for a
    server that was killed.
    """

    def __init__(self, prefix: str = "pellucid-") -> None:
        self.path = tempfile.mkdtemp(prefix=prefix)
        self._remove = weakref.finalize(self, shutil.rmtree, self.path, True)

    def remove(self) -> None:
        """Remove the folder now (again: nothing)."""
        self._remove()

    def __fspath__(self) -> str:
        return self.path


@dataclass(frozen=True)
class ZipBudget:
    """What one zip upload may unpack to.

    Attributes:
        max_files: members (folders not counted).
        max_bytes: total unpacked bytes (``PELLUCID_MAX_ZIP_MB`` megabytes, default 2048).
        max_file_bytes: unpacked bytes of one member.
        max_ratio: unpacked / compressed size of one member larger than 1 MB (images barely
            compress; a zip bomb's members compress hundreds of times).
    """

    max_files: int = MAX_ZIP_FILES
    max_bytes: int = MAX_ZIP_BYTES
    max_file_bytes: int = MAX_ZIP_MEMBER_BYTES
    max_ratio: float = MAX_ZIP_RATIO

    @classmethod
    def from_env(cls) -> ZipBudget:
        """The default budget, its total from ``PELLUCID_MAX_ZIP_MB`` when set."""
        total = int(env_number("PELLUCID_MAX_ZIP_MB", MAX_ZIP_BYTES / (1 << 20)) * (1 << 20))
        return cls(max_bytes=total, max_file_bytes=min(MAX_ZIP_MEMBER_BYTES, total))


def _size(n: float) -> str:
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{int(n)} bytes"


def _member_problem(m: zipfile.ZipInfo) -> str | None:
    """Why a member's name or type is refused (None: it may be unpacked)."""
    name = m.filename
    mode = (m.external_attr >> 16) & 0o177777
    if stat.S_ISLNK(mode):
        return "is a symbolic link"
    if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        return "is not a regular file"
    parts = name.split("/")
    if (name.startswith("/") or "\\" in name or "\0" in name or ".." in parts
            or (parts and len(parts[0]) >= 2 and parts[0][1] == ":")):
        return "points outside the folder"
    if m.flag_bits & 0x1:
        return "is encrypted"
    if m.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        return "uses a compression other than deflate"
    return None


def extract_zip(data: bytes, dest: str | Path, *, max_files: int | None = None, max_bytes: int | None = None,
                budget: ZipBudget | None = None) -> Path:
    """Unpack a zip upload into ``dest`` within a :class:`ZipBudget`.

    The central directory is checked first (count, total and per-member size, compression ratio,
    names, links, compression method), then every member is streamed in 1 MB chunks and counted
    again, since a header can lie. Nested zips are left packed (not written); ``__MACOSX`` and dot
    files are skipped. On any refusal what was written is removed.

    Args:
        data: the zip file's bytes.
        dest: folder to unpack into (created).
        max_files / max_bytes: override the budget's count and total (kept for callers).
        budget: the limits (default :meth:`ZipBudget.from_env`).

    Raises:
        UploadError: not a zip, damaged, over budget, or a member that is a link, encrypted, or
            points outside ``dest`` (one line).
    """
    import dataclasses
    import shutil
    import zlib

    budget = budget or ZipBudget.from_env()
    if max_files is not None:
        budget = dataclasses.replace(budget, max_files=max_files)
    if max_bytes is not None:
        budget = dataclasses.replace(budget, max_bytes=max_bytes, max_file_bytes=min(budget.max_file_bytes, max_bytes))
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError, IndexError):
        raise UploadError("the upload is not a zip file, or a damaged one — zip the folder of images again "
                          "and upload that") from None
    with zf:
        members = _checked_members(zf, budget, len(data))
        root = dest.resolve()
        written = 0
        try:
            for m in members:
                written = _unpack_member(zf, m, dest, root, budget, written)
        except UploadError:
            shutil.rmtree(dest, ignore_errors=True)
            raise
        except OSError as err:  # disk full, name too long, ...
            shutil.rmtree(dest, ignore_errors=True)
            log.warning("zip upload: cannot unpack: %s", err)
            raise UploadError("the zip could not be unpacked on this server (disk space or a file name) — "
                              "try a smaller zip with short names") from None
        except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, NotImplementedError, RuntimeError) as err:
            shutil.rmtree(dest, ignore_errors=True)
            log.warning("zip upload: %s: %s", type(err).__name__, err)
            raise UploadError("the zip is damaged (a member does not match its header) — zip the folder of "
                              "images again and upload that") from None
    return dest


# --------------------------------------------------------------------------------------------
# explanations and reports


def _checked_members(zf: zipfile.ZipFile, budget: ZipBudget, archive_bytes: int) -> list[zipfile.ZipInfo]:
    """The zip's file members, after the central directory's checks (count, names, links, sizes, ratio)."""
    members = [m for m in zf.infolist() if not m.is_dir()]
    if len(members) > budget.max_files:
        raise UploadError(f"the zip holds {len(members)} files, over the limit of {budget.max_files}; split it")
    for m in zf.infolist():
        problem = _member_problem(m)
        if problem:
            raise UploadError(f"the zip member {m.filename[:80]!r} {problem}; re-create the zip with plain "
                              "image files only")
    total = sum(m.file_size for m in members)
    if total > budget.max_bytes:
        raise UploadError(f"the zip unpacks to {_size(total)}, over the limit of {_size(budget.max_bytes)}; "
                          "split it")
    if sum(m.compress_size for m in members) > archive_bytes:
        raise UploadError("the zip's members overlap (a zip bomb's trick); re-create the zip")
    for m in members:
        if m.file_size > budget.max_file_bytes:
            raise UploadError(f"the zip member {m.filename[:80]!r} unpacks to {_size(m.file_size)}, over the "
                              f"per-file limit of {_size(budget.max_file_bytes)}; split or downscale it")
        if m.file_size > _RATIO_FLOOR and m.file_size > budget.max_ratio * max(m.compress_size, 1):
            raise UploadError(f"the zip member {m.filename[:80]!r} is compressed "
                              f"{m.file_size / max(m.compress_size, 1):.0f} times, over the limit of "
                              f"{budget.max_ratio:.0f} (images do not compress that well); re-create the zip")
    return members


def _unpack_member(zf: zipfile.ZipFile, m: zipfile.ZipInfo, dest: Path, root: Path, budget: ZipBudget,
                   written: int) -> int:
    """Stream one member into ``dest`` in chunks, counting against its header and the budget; returns
    the bytes written so far in all (hidden files, ``__MACOSX`` and nested zips are skipped)."""
    rel = Path(m.filename)
    if rel.name.startswith(".") or "__MACOSX" in rel.parts or rel.suffix.lower() == ".zip":
        return written
    target = (dest / rel).resolve()
    if not target.is_relative_to(root) or target == root:
        raise UploadError(f"the zip member {m.filename[:80]!r} points outside the folder; re-create the zip")
    target.parent.mkdir(parents=True, exist_ok=True)
    size = 0
    with zf.open(m) as src, target.open("wb") as out:
        while chunk := src.read(_CHUNK):
            size += len(chunk)
            written += len(chunk)
            if size > m.file_size or size > budget.max_file_bytes or written > budget.max_bytes:
                log.warning("zip upload: member %r unpacked past its budget after %d bytes (%d in all); refused",
                            m.filename, size, written)
                raise UploadError(f"the zip member {m.filename[:80]!r} unpacks to more than its header says or "
                                  "than the budget allows; re-create the zip")
            out.write(chunk)
    return written
