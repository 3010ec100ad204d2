"""Fonts that can draw the text they are given. Class names and file names can be in any script, but DejaVu Sans
(the font matplotlib ships, used for the explanation colour bars and the training plots) has no Chinese, Japanese,
Korean, Devanagari or Thai: a class named 結核 was drawn as two empty boxes, with nothing to say so.

DejaVu Sans stays the font wherever it has every character. Otherwise the fonts installed on the system (the folders
matplotlib searches: ``/usr/share/fonts``, ``~/.fonts``, macOS's and Windows' font folders) are read for the
characters they cover, once per process and only when a character is missing (about a second for 300 fonts), and the
first that covers the text is used; `make install` installs Debian's Noto fonts where it can. Where no installed
font has a character, DejaVu's box is drawn, as before."""

from __future__ import annotations

import functools
import logging
import threading
from pathlib import Path

__all__ = ["DEJAVU_SANS", "cover_scripts", "fallback_fonts", "font_file_for"]

logger = logging.getLogger(__name__)

_LOCK = threading.RLock()


@functools.lru_cache(maxsize=1)
def _dejavu() -> str:
    from matplotlib import get_data_path

    return str(Path(get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf")


DEJAVU_SANS = "DejaVu Sans"


@functools.lru_cache(maxsize=None)
def _cmap(path: str) -> frozenset[int]:
    """The code points a font file (the first face of a collection) has glyphs for; empty when it cannot be read."""
    try:
        from fontTools.ttLib import TTFont

        with TTFont(path, fontNumber=0, lazy=True) as font:
            return frozenset((font.getBestCmap() or {}).keys())
    except Exception as err:  # noqa: BLE001 - a broken font file on the system is passed over
        logger.debug("font %s passed over (%s)", path, type(err).__name__)
        return frozenset()


def _preference(path: str) -> tuple[int, int, int, str]:
    name = Path(path).name.lower()
    plain = 0 if ("regular" in name or "-" not in name) else 1
    return ("sans" not in name, plain, any(w in name for w in ("mono", "serif", "bold", "italic", "light")), name)


@functools.lru_cache(maxsize=1)
def _system_fonts() -> tuple[str, ...]:
    try:
        from matplotlib import font_manager

        found = font_manager.findSystemFonts(fontext="ttf") + font_manager.findSystemFonts(fontext="otf")
    except Exception as err:  # noqa: BLE001 - no font folders: DejaVu alone
        logger.debug("no system fonts (%s)", type(err).__name__)
        return ()
    return tuple(sorted(set(found), key=_preference))


def _missing(text: str) -> set[int]:
    return {ord(ch) for ch in text if ch.isprintable() and not ch.isspace()} - _cmap(_dejavu())


def font_file_for(text: str) -> str:
    """The font file to draw ``text`` with in one font: DejaVu Sans when it has every character, else the first
    installed font that has them all (then the one that has most), else DejaVu Sans."""
    missing = _missing(text)
    if not missing:
        return _dejavu()
    with _LOCK:
        best, best_count = _dejavu(), 0
        for path in _system_fonts():
            count = len(missing & _cmap(path))
            if count == len(missing):
                return path
            if count > best_count:
                best, best_count = path, count
    return best


def fallback_fonts(texts: list[str]) -> list[str]:
    """Font files that, after DejaVu Sans, cover the characters of ``texts`` it lacks (fewest files, first found
    first), for matplotlib's per-character fallback."""
    missing = set().union(*(_missing(t) for t in texts)) if texts else set()
    chosen: list[str] = []
    with _LOCK:
        for path in _system_fonts():
            if not missing:
                break
            covered = missing & _cmap(path)
            if covered:
                chosen.append(path)
                missing -= covered
    return chosen


def cover_scripts(fig: object) -> None:
    """Give every text of a matplotlib figure that has characters DejaVu Sans lacks the installed fonts that have
    them, as per-character fallbacks after DejaVu Sans (registered with matplotlib's font list, which the figure's
    other texts do not see)."""
    from matplotlib import font_manager
    from matplotlib.text import Text

    texts = [t for t in fig.findobj(Text) if t.get_text()]  # type: ignore[attr-defined]
    files = fallback_fonts([t.get_text() for t in texts])
    if not files:
        return
    families = [DEJAVU_SANS]
    with _LOCK:  # matplotlib's font list is shared by every thread
        for path in files:
            try:
                font_manager.fontManager.addfont(path)
                families.append(font_manager.FontProperties(fname=path).get_name())
            except Exception as err:  # noqa: BLE001 - a font matplotlib cannot load is passed over
                logger.debug("font %s not usable by matplotlib (%s)", path, type(err).__name__)
    for text in texts:
        if _missing(text.get_text()):
            text.set_fontfamily(families)
