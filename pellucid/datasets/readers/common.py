"""Small utilities shared by the readers: argument checks (:func:`check_file`,
:func:`_check_window`), min-max normalisation, one-line error texts, :func:`_warn`, which
attributes a warning to the first caller outside the readers package, and :func:`_pydicom_quiet`,
which keeps pydicom's log records (they quote header values, e.g. a patient name in an invalid
element) out of the logs while a file is read."""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
import stat
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pellucid.datasets.readers.image import ImageReadError

__all__ = ["check_file"]

_PACKAGE_DIR = os.path.dirname(__file__)  # _warn skips frames of every module in here


def check_file(path: str | os.PathLike[str]) -> Path:
    """``path`` as a Path when it is a non-empty regular file (a link to one is followed); else
    :class:`ImageReadError` in one line. Nothing is opened: a named pipe would block its reader and a
    device such as ``/dev/zero`` never ends, so both are refused from their ``stat``."""
    p = Path(path)
    if not p.exists():
        raise ImageReadError(f"{p}: not found — check the path")
    if p.is_dir():
        raise ImageReadError(f"{p}: is a directory — pass an image file inside it")
    try:
        st = p.stat()
    except OSError as err:
        raise ImageReadError(
            f"{p}: cannot be accessed ({_one_line(err)}) — check permissions"
        ) from err
    if not stat.S_ISREG(st.st_mode):
        raise ImageReadError(
            f"{p}: is not a regular file (a named pipe, socket or device) — save the image to a file "
            "and give that"
        )
    if st.st_size == 0:
        raise ImageReadError(f"{p}: is empty (0 bytes) — the file is incomplete; re-export it")
    return p


def _check_window(window: tuple[float, float] | None) -> tuple[float, float] | None:
    if window is None:
        return None
    try:
        center, width = (float(v) for v in window)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"window={window!r} is not a (center, width) pair of numbers, e.g. (40, 400)"
        ) from err
    if not (math.isfinite(center) and math.isfinite(width)) or width <= 0:
        raise ValueError(
            f"window={window!r} needs a finite center and a width > 0, e.g. (40, 400)"
        )
    return center, width


def _min_max(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros_like(values)
    return (values - low) / (high - low)


def _as_list(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return list(value)
    return [value]


def _warn(message: str) -> None:
    """``warnings.warn`` attributed to the first caller outside the readers package."""
    frame = inspect.currentframe()
    level = 1
    while frame is not None and os.path.dirname(frame.f_code.co_filename) == _PACKAGE_DIR:
        frame = frame.f_back
        level += 1
    warnings.warn(message, stacklevel=level)


def _out_of_memory(path: Path, doing: str = "decoding") -> ImageReadError:
    """The one-line refusal when reading ``path`` ran out of memory while ``doing`` something."""
    return ImageReadError(f"{path}: ran out of memory while {doing} — lower PELLUCID_MAX_PIXELS or reduce the image")


def _is_panic(err: BaseException) -> bool:
    """A panic of a decoder written in Rust (pylibjpeg-rle decodes RLE Lossless DICOM frames): PyO3 raises it as
    ``PanicException``, a ``BaseException`` that ``except Exception`` lets through, so a damaged RLE frame had
    stopped every door with a traceback."""
    return type(err).__name__ == "PanicException" and not isinstance(err, Exception)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    if len(text) > 160:
        text = text[:157] + "..."
    return f"{type(err).__name__}: {text}" if not text.startswith(type(err).__name__) else text


class _DropAll(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


_DROP = _DropAll()
_QUIET_LOCK = threading.Lock()
_quiet_depth = 0


@contextlib.contextmanager
def _pydicom_quiet() -> Iterator[None]:
    """Drop the ``pydicom`` logger's records (and warnings) while reading; nestable, thread-safe."""
    global _quiet_depth
    logger = logging.getLogger("pydicom")
    with _QUIET_LOCK:
        _quiet_depth += 1
        logger.addFilter(_DROP)
    try:
        yield
    finally:
        with _QUIET_LOCK:
            _quiet_depth -= 1
            if _quiet_depth == 0:
                logger.removeFilter(_DROP)


_STDERR_LOCK = threading.Lock()
_stderr_depth = 0
_stderr_saved: int | None = None


@contextlib.contextmanager
def _native_stderr_quiet(active: bool = True) -> Iterator[None]:
    """Point file descriptor 2 at the null device while compiled decoders run: libtiff prints its complaints
    about a damaged or unsupported page (``Fax4Decode: Bad code word ...``, ``WEBP compression support is not
    configured``) and a Rust decoder's panic prints ``thread '<unnamed>' panicked at ...`` to the process's stderr,
    beside the one line the readers raise. Nestable and thread-safe: the first to enter points it away, the last
    to leave points it back."""
    global _stderr_depth, _stderr_saved
    if not active:
        yield
        return
    with _STDERR_LOCK:
        if _stderr_depth == 0:
            try:
                sys.stderr.flush()
                saved = os.dup(2)
                null = os.open(os.devnull, os.O_WRONLY)
            except (OSError, ValueError, AttributeError):  # no stderr to point elsewhere
                saved = None
            if saved is not None:
                os.dup2(null, 2)
                os.close(null)
            _stderr_saved = saved
        _stderr_depth += 1
    try:
        yield
    finally:
        with _STDERR_LOCK:
            _stderr_depth -= 1
            if _stderr_depth == 0 and _stderr_saved is not None:
                os.dup2(_stderr_saved, 2)
                os.close(_stderr_saved)
                _stderr_saved = None
