"""The web app's logic, free of Streamlit so it can be unit-tested.

Pages in :mod:`pellucid.ui.views` stay thin: they lay out widgets and call these functions, which in
turn call the same API as the command line (:class:`~pellucid.core.predict.Predictor`,
:mod:`pellucid.explain.report`, :mod:`pellucid.core.ood`). This module finds model folders, turns
uploaded bytes into images with one-line errors (size limit, pixel budget checked from the header
before decoding, not an image, corrupt, DICOM without pixels), reads a DICOM's value range for the
window controls, unpacks zip uploads within a budget (:class:`ZipBudget`: total and per-file size,
file count, compression ratio, checked from the central directory and again while streaming; no
paths outside the folder, no links, no nested zips), confines typed folders to the configured data
root (:func:`resolve_in_root`), caches explanations so that moving the opacity slider does not
recompute them (bounded in items and bytes), segments the lungs of chest X-rays for the outline and
lung share of each explanation (:class:`LungMaskCache`), shows each explanation with its colour bar and
plain words (:func:`explanation_view`, the words from :mod:`pellucid.explain.captions`), streams
explanations method by method (:meth:`ExplanationCache.stream`), reads the human-readable model card
(:func:`model_card_markdown`), and builds the report of what is on screen.

Everything a visitor can send is untrusted: errors are one line, name the upload (never a server
path) and say what to do; unexpected failures are logged here with their traceback and reported to
the visitor as one line.
"""
from __future__ import annotations

import logging
import math
import os
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from pellucid.core.card import ModelCard, as_card
from pellucid.core.privacy import header_text_silenced
from pellucid.explain.captions import Reading, read_case_result
from pellucid.ui.zips import ScratchFolder, UploadError, ZipBudget, env_number, extract_zip
from pellucid.datasets.readers import (
    Image,
    ImageReadError,
    dicom_identifying_tags,
    is_dicom,
    read_image,
)
from pellucid.explain.report import (
    Case,
    MethodResult,
    Progress,
    analyse_images,
    attach_lung_masks,
    build_context,
    display_name,
    explain_cases,
    lung_segmenter_for,
    overlay_rgb,
    render_html,
    render_pdf,
    scrub_path,
    sha256_bytes,
    write_cases_csv,
)

__all__ = [
    "DicomRange",
    "ExplanationCache",
    "ExplanationView",
    "FolderError",
    "ZipBudget",
    "LungMaskCache",
    "NO_SEGMENTER",
    "Upload",
    "UploadError",
    "cases_table",
    "csv_bytes",
    "data_root",
    "default_model",
    "dicom_range",
    "explanation_view",
    "extract_zip",
    "ScratchFolder",
    "find_model_folders",
    "find_segmenter_folders",
    "is_cxr",
    "load_lung_segmenter",
    "md_literal",
    "segmenter_choices",
    "max_page_uploads",
    "max_upload_bytes",
    "max_upload_pixels",
    "model_card_markdown",
    "model_plots",
    "read_upload",
    "report_files",
    "resolve_in_root",
    "uploads_to_cases",
]

PLOTS = (("roc.png", "ROC"), ("confusion.png", "Confusion matrix"), ("reliability.png", "Reliability"),
         ("training_curves.png", "Training curves"))
DEFAULT_MAX_UPLOAD_MB = 50
DEFAULT_MAX_PAGE_UPLOADS = 24
#: pixels (rows x columns x frames) an upload may declare in its header before it is decoded
DEFAULT_MAX_UPLOAD_PIXELS = 40_000_000

log = logging.getLogger(__name__)
#: the sidebar choice that turns lung outlines off
NO_SEGMENTER = "None"
MODEL_SEGMENTER = "From the model card"


_MARKDOWN_PUNCTUATION = frozenset("\\`*_{}[]()#+-.!|<>~:$=&@")


#: Where a bare address would start a link (``www.``, ``…@…``, ``…://``): an invisible word joiner goes there.
_AUTOLINK_START = re.compile(r"(?i)(?<=www)(?=\.)|(?=@)|(?<=:)(?=//)")


def md_literal(text: str) -> str:
    """``text`` (a file name, or a message that quotes one) shown as itself where Streamlit renders
    Markdown: every punctuation mark that Markdown or Streamlit's directives (``:red[...]``, ``$...$``)
    could read is written as a numeric character reference, which Markdown shows as the character and
    never parses, so ``[x](http://…).png`` is not a link and ``**a**.png`` not bold; a bare address
    (``x@example.com``, ``www.example.com``), which Markdown links after decoding references, gets an
    invisible word joiner (U+2060) where it starts, so it is not linked either; whitespace runs become one
    space, so it stays one line."""
    text = _AUTOLINK_START.sub("\u2060", " ".join(str(text).split()))
    return "".join(f"&#{ord(ch)};" if ch in _MARKDOWN_PUNCTUATION else ch for ch in text)


class FolderError(UploadError):
    """A typed folder the Batch page may not or cannot read; the message is one line."""


def max_upload_bytes() -> int:
    """Per-file upload limit: ``PELLUCID_MAX_UPLOAD_MB`` megabytes (default 50)."""
    return int(env_number("PELLUCID_MAX_UPLOAD_MB", DEFAULT_MAX_UPLOAD_MB) * (1 << 20))


def max_page_uploads() -> int:
    """How many files the Predict page reads at once: ``PELLUCID_MAX_PAGE_UPLOADS`` (default
    :data:`DEFAULT_MAX_PAGE_UPLOADS`). Each is decoded and kept for its explanations, so this bounds the
    page's memory; the Batch page takes a zip of any size, streamed."""
    return max(1, int(env_number("PELLUCID_MAX_PAGE_UPLOADS", DEFAULT_MAX_PAGE_UPLOADS)))


def max_upload_pixels() -> int:
    """Pixels an uploaded image may declare in its header (one frame, times samples per pixel for
    DICOM): ``PELLUCID_MAX_UPLOAD_PIXELS`` when set, else the readers' own budget
    (``PELLUCID_MAX_PIXELS``, 40 million by default). Checked before anything is decoded."""
    if os.environ.get("PELLUCID_MAX_UPLOAD_PIXELS", "").strip():
        return int(env_number("PELLUCID_MAX_UPLOAD_PIXELS", DEFAULT_MAX_UPLOAD_PIXELS))
    try:
        from pellucid.datasets.readers.limits import max_pixels
    except ImportError:  # readers without a pixel budget
        return DEFAULT_MAX_UPLOAD_PIXELS
    try:
        return int(max_pixels())
    except ValueError as err:  # a malformed PELLUCID_MAX_PIXELS: the server log says so
        log.warning("%s; uploads use %d pixels", err, DEFAULT_MAX_UPLOAD_PIXELS)
        return DEFAULT_MAX_UPLOAD_PIXELS


def data_root() -> Path | None:
    """The one folder (with its sub-folders) the Batch page may read: ``PELLUCID_DATA_ROOT``, set by
    ``pellucid ui --data-root DIR``; None (the default) turns typed folders off."""
    raw = os.environ.get("PELLUCID_DATA_ROOT", "").strip()
    return Path(raw) if raw else None


def resolve_in_root(typed: str, root: str | Path) -> Path:
    """The folder a visitor typed, resolved (symlinks followed) and checked to lie inside ``root``.

    A relative path is taken from ``root``. Nothing outside ``root`` is looked at: the containment is
    decided on the resolved path before asking whether the folder exists.

    Raises:
        FolderError: outside the data root, or not a folder there (one line, no server path).
    """
    text = typed.strip()
    if not text or "\0" in text:
        raise FolderError("type a folder path inside the data root")
    base = os.path.realpath(root)
    target = os.path.realpath(os.path.join(base, text))
    if os.path.commonpath([base, target]) != base:
        raise FolderError(f"{text} is outside the data root this app may read — type a folder inside it "
                          "(relative paths start there)")
    if not os.path.isdir(target):
        raise FolderError(f"{text} is not a folder inside the data root — check the spelling")
    return Path(target)


# --------------------------------------------------------------------------------------------
# model folders


def _card_kind(card_path: Path) -> str | None:
    from pellucid.core.card import read_card

    try:
        return read_card(card_path.parent).kind
    except (OSError, ValueError):  # CardError / ModelFolderError are ValueErrors
        return None


def find_model_folders(root: str | Path = "runs", *, segmenters: bool = False) -> list[Path]:
    """Model folders (``card.json`` present) up to two levels under ``root``, newest first.

    Lung segmentation folders (card ``kind`` ``"segmentation"``) are not classifiers: they are left
    out, or, with ``segmenters=True``, they are the only ones listed.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    cards = list(root.glob("*/card.json")) + list(root.glob("*/*/card.json"))
    cards = [c for c in cards if (_card_kind(c) == "segmentation") == segmenters]
    cards.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return [c.parent for c in cards]


def find_segmenter_folders(root: str | Path = "runs") -> list[Path]:
    """Lung segmentation folders (``pellucid train tb-lungseg``) up to two levels under ``root``."""
    return find_model_folders(root, segmenters=True)


def is_cxr(card: ModelCard | dict) -> bool:
    """Whether a model card is a chest X-ray model (the only kind lung outlines apply to)."""
    return str(as_card(card).modality or "").upper() == "CXR"


def segmenter_choices(card: ModelCard | dict, root: str | Path = "runs") -> list[str]:
    """Options of the sidebar's lung segmenter picker for a model: empty for a model that is not a
    chest X-ray model; else the model card's own segmenter first (when it names one, and then the
    default), ``None`` and the segmentation folders under ``root``."""
    if not is_cxr(card):
        return []
    own = [MODEL_SEGMENTER] if as_card(card).segmenter else []
    return own + [NO_SEGMENTER] + [str(p) for p in find_segmenter_folders(root)]


def load_lung_segmenter(predictor, choice: str | None):
    """The segmenter a sidebar ``choice`` means for ``predictor``'s model, and its display name.

    Returns:
        ``(segmenter, name)``; ``(None, None)`` for ``None``, no choice, or a model without one.

    Raises:
        ReportError: the folder is not a usable segmentation folder (one line, for ``st.error``).
    """
    if not choice or choice == NO_SEGMENTER:
        return None, None
    return lung_segmenter_for(predictor, None if choice == MODEL_SEGMENTER else choice)


def default_model(root: str | Path = "runs") -> str | None:
    """``$PELLUCID_MODEL`` (set by ``pellucid ui --model``), else the newest folder under ``root``."""
    env = os.environ.get("PELLUCID_MODEL")
    if env:
        return env
    found = find_model_folders(root)
    return str(found[0]) if found else None


def model_plots(folder: str | Path) -> list[tuple[str, Path]]:
    """The evaluation plots a model folder has, as ``(title, path)``."""
    plots = Path(folder) / "plots"
    return [(title, plots / name) for name, title in PLOTS if (plots / name).exists()]


# --------------------------------------------------------------------------------------------
# uploads


@dataclass
class DicomRange:
    """Values a DICOM window can sensibly take, in modality units (e.g. Hounsfield units).

    Attributes:
        low / high: smallest and largest modality value in the (middle) frame.
        center / width: the window to start from: the file's own, else the full range.
    """

    low: float
    high: float
    center: float
    width: float


@dataclass
class Upload:
    """One uploaded file, read.

    Attributes:
        name: display name (``DICOM <hash>`` for DICOM unless identifiers are shown).
        sha256: hash of the uploaded bytes.
        is_dicom: whether it is DICOM.
        image: the image (windowed for DICOM), None when unreadable.
        error: one-line message when unreadable.
        window: the window it was read with (None: the file's own).
        dicom_range: window limits for the sliders (monochrome DICOM only).
    """

    name: str
    sha256: str
    is_dicom: bool = False
    image: Image | None = None
    error: str = ""
    window: tuple[float, float] | None = None
    dicom_range: DicomRange | None = None
    meta: dict = field(default_factory=dict)
    identifiers: dict[str, str] = field(default_factory=dict)


def _suffix(name: str) -> str:
    """The suffix the upload's temporary file gets: the upload's own when it is 1-10 letters and digits, so the
    readers answer as they do for the same file on disk (``doc.txt``: "unsupported file type '.txt'"; a zip: "is an
    archive"); otherwise none (the DICOM sniffer still looks at the bytes)."""
    suffix = Path(name).suffix.lower()
    return suffix if re.fullmatch(r"\.[a-z0-9]{1,10}", suffix) else ""


def _declared_pixels(path: Path, dicom: bool) -> int | None:
    """Pixels of one frame the file's header declares (rows x columns, x samples per pixel for DICOM,
    as the readers count), without decoding anything; None when the header cannot be parsed (the
    reader then says what is wrong)."""
    if dicom:
        import pydicom

        from pellucid.datasets.readers.detect import _check_deflated, read_dataset

        # The readers' guards first: a deflated dataset is refused past its budget before pydicom inflates it
        # whole (a 1.5 MB upload that inflates to 1.5 GB had taken 4 GB and 23 s here), and the header's
        # reads are bounded (a file of zeros).
        _check_deflated(Path(path))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = read_dataset(pydicom, Path(path), stop_before_pixels=True)
            rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
            samples = int(ds.get("SamplesPerPixel", 1) or 1)
        except Exception:  # noqa: BLE001 - a header pydicom cannot parse: read_image says what is wrong
            return None
        return rows * cols * max(samples, 1) if rows and cols else None
    from PIL import Image as PILImage

    from pellucid.datasets.readers.pil import OPEN_FORMATS, _too_many_segments

    if _too_many_segments(path):  # Pillow would parse every chunk at open: read_image refuses it in one line
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DecompressionBombWarning: the budget below decides
        try:
            with PILImage.open(path, formats=OPEN_FORMATS) as im:  # the header only, of a format the readers read
                return int(im.width) * int(im.height)
        except PILImage.DecompressionBombError:
            return max(PILImage.MAX_IMAGE_PIXELS or 0, 1) * 2 + 1
        except Exception:  # noqa: BLE001 - not an image Pillow knows: read_image says so in one line
            return None


def read_upload(name: str, data: bytes, *, window: tuple[float, float] | None = None,
                include_identifiers: bool = False, max_bytes: int | None = None,
                max_pixels: int | None = None) -> Upload:
    """Read uploaded bytes as an image or DICOM.

    The byte size is checked first, then the pixel count the header declares (before anything is
    decoded), then the file is read through :func:`~pellucid.datasets.readers.read_image`.

    Args:
        name: the uploaded file's name (its suffix decides the reader; DICOM is also sniffed).
        data: the file's bytes.
        window: DICOM ``(center, width)``; None keeps the file's own.
        include_identifiers: show a DICOM file's own name instead of its hash.
        max_bytes: size limit (default :func:`max_upload_bytes`).
        max_pixels: pixel limit (default :func:`max_upload_pixels`).

    Returns:
        An :class:`Upload`; problems are in its ``error`` (one line, no server path), never raised.
        Unexpected failures are logged with their traceback.
    """
    limit = max_upload_bytes() if max_bytes is None else max_bytes
    pixel_limit = max_upload_pixels() if max_pixels is None else max_pixels
    sha = sha256_bytes(data)
    if len(data) > limit:
        return Upload(name=name, sha256=sha, error=f"{name} is {len(data) / 2**20:.1f} MB, over the "
                      f"{limit / 2**20:.0f} MB limit — downscale it, or raise PELLUCID_MAX_UPLOAD_MB")
    if not data:
        return Upload(name=name, sha256=sha, error=f"{name} is empty — upload the file again")
    shown, dicom = name, False
    # pydicom logs invalid header values verbatim (a patient's name in a corrupt tag): silenced throughout
    with tempfile.TemporaryDirectory(prefix="pellucid-upload-") as tmp, header_text_silenced():
        path = Path(tmp) / f"upload{_suffix(name)}"
        try:
            path.write_bytes(data)
            dicom = is_dicom(path)
            shown = display_name(name, sha, dicom, include_identifiers)
            up = Upload(name=shown, sha256=sha, is_dicom=dicom, window=window if dicom else None)
            pixels = _declared_pixels(path, dicom)
            if pixels is not None and pixels > pixel_limit:
                up.error = (f"{shown} declares {pixels / 1e6:.0f} million pixels, over the "
                            f"{pixel_limit / 1e6:.0f} million limit of this app — downscale it before uploading")
                return up
            up.image = read_image(path, window=up.window)
            up.meta = dict(up.image.meta)
            up.meta.pop("path", None)
            if dicom and up.image.array.shape[2] == 1:
                up.dicom_range = dicom_range(up.image.meta)
            if dicom and include_identifiers:
                up.identifiers = dicom_identifying_tags(path)
        except ImageReadError as err:
            return Upload(name=shown, sha256=sha, is_dicom=dicom, window=window if dicom else None,
                          error=_one_line(scrub_path(str(err), path, shown)))
        except ValueError as err:  # a window with width <= 0
            return Upload(name=shown, sha256=sha, is_dicom=dicom, window=window if dicom else None,
                          error=_one_line(scrub_path(f"{shown}: {err}", path, shown)))
        except MemoryError:
            log.warning("upload %s: out of memory while reading", sha[:12])
            return Upload(name=shown, sha256=sha, is_dicom=dicom,
                          error=f"{shown}: too large to read on this server — downscale it before uploading")
        except Exception:  # noqa: BLE001 - a fuzzed file can break any decoder: one line, the rest to the log
            log.exception("upload %s (%s): unexpected error while reading", sha[:12], shown)
            return Upload(name=shown, sha256=sha, is_dicom=dicom,
                          error=f"{shown}: cannot be read — the file is corrupt or not a supported image or "
                                "DICOM; re-export it")
    return up


def _one_line(text: str) -> str:
    return " ".join(text.split()) if "\n" in text or "\r" in text else text


def dicom_range(meta: dict) -> DicomRange | None:
    """Window limits of a monochrome DICOM from what the readers recorded of it (its modality values' range and
    the file's own window), or None. The frame is not decoded a second time: the readers' checks (pixel limit,
    frame headers) are the only door its pixels pass."""
    value_range = meta.get("value_range")
    if not value_range:
        return None
    low, high = (float(v) for v in value_range)
    if not (math.isfinite(low) and math.isfinite(high)):
        return None
    if high <= low:
        high = low + 1.0
    center, width = meta.get("file_window") or ((low + high) / 2, high - low)
    return DicomRange(low=low, high=high, center=float(center), width=float(width))


def _nbytes(value) -> int:
    """Bytes of the arrays a cached value holds (a heatmap, a mask)."""
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    heatmap = getattr(value, "heatmap", None)
    return int(heatmap.nbytes) if isinstance(heatmap, np.ndarray) else 0


class _Bounded:
    """An insertion-ordered store bounded in items and in array bytes (oldest out first)."""

    def __init__(self, max_items: int, max_bytes: int):
        self._items: dict[tuple, object] = {}
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: tuple) -> bool:
        return key in self._items

    def get(self, key: tuple):
        return self._items.get(key)

    def put(self, key: tuple, value) -> None:
        if key in self._items:
            self.nbytes -= _nbytes(self._items.pop(key))
        size = _nbytes(value)
        if size > self.max_bytes:  # one item over the whole budget is not kept
            return
        self._items[key] = value
        self.nbytes += size
        while self._items and (len(self._items) > self.max_items or self.nbytes > self.max_bytes):
            self.nbytes -= _nbytes(self._items.pop(next(iter(self._items))))


class _SessionCache:
    """A per-session cache bounded in items and bytes (:class:`_Bounded`)."""

    def __init__(self, max_items: int, max_bytes: int):
        self._store = _Bounded(max_items, max_bytes)

    @property
    def max_items(self) -> int:
        return self._store.max_items

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays held."""
        return self._store.nbytes

    def __len__(self) -> int:
        return len(self._store)


class ExplanationCache(_SessionCache):
    """Explanations by (model, input hash, window, method), so reruns only compute what is new.

    One cache lives in each visitor's session: it keeps at most ``max_items`` results and
    ``max_bytes`` of heatmaps (each is ``H x W`` float32 at the image's resolution, so an item is
    bounded by the upload pixel budget), dropping the oldest first.
    """

    def __init__(self, max_items: int = 512, max_bytes: int = 256 << 20):
        super().__init__(max_items, max_bytes)


    @staticmethod
    def _key(model_key: str, case: Case, method: str) -> tuple:
        return (model_key, case.sha256, case.window, case.index, method)

    def attach(self, predictor, cases: Sequence[Case], methods: Sequence[str], model_key: str, *,
               progress: Progress | None = None) -> list[str]:
        """Give every case one result per method, computing the missing ones in batches.

        Returns:
            Notes from the explainers (failures), as :func:`~pellucid.explain.report.explain_cases`.
        """
        notes: list[str] = []
        for _, found in self.stream(predictor, cases, methods, model_key, progress=progress):
            notes += [n for n in found if n not in notes]
        return notes

    def stream(self, predictor, cases: Sequence[Case], methods: Sequence[str], model_key: str, *,
               progress: Progress | None = None) -> Iterator[tuple[str, list[str]]]:
        """Like :meth:`attach`, one method at a time: after each method every case holds its result
        (``case.explanations`` grows in ``methods`` order) and ``(method, notes)`` is yielded, so a
        page can show each method's maps as soon as they exist instead of after the slowest one.
        """
        live = [c for c in cases if not c.error and c.index is not None]
        for c in live:
            c.explanations = []
        for i, m in enumerate(methods):
            keys = {id(c): self._key(model_key, c, m) for c in live}
            todo = [c for c in live if keys[id(c)] not in self._store]
            notes: list[str] = []
            fresh: dict[tuple, MethodResult] = {}
            if todo:
                def step(f: float, text: str, i: int = i) -> None:
                    progress((i + f) / len(methods), text)

                notes = explain_cases(predictor, todo, [m], progress=step if progress is not None else None)
                for c in todo:
                    r = next((r for r in c.explanations if r.method == m), None)
                    if r is not None:
                        fresh[keys[id(c)]] = r
                        self._store.put(keys[id(c)], r)
            for c in live:
                r = self._store.get(keys[id(c)]) or fresh.get(keys[id(c)])
                c.explanations = [e for e in c.explanations if e.method != m] + ([r] if r is not None else [])
            if progress is not None:
                progress((i + 1) / len(methods), f"{m}: done")
            yield m, notes


class LungMaskCache(_SessionCache):
    """Lung masks by (segmenter, input hash, window), so reruns (a moved slider) do not segment again.

    Bounded like :class:`ExplanationCache`: ``max_items`` masks and ``max_bytes`` of them.
    """

    def __init__(self, max_items: int = 256, max_bytes: int = 64 << 20):
        super().__init__(max_items, max_bytes)


    def attach(self, segmenter, cases: Sequence[Case], segmenter_key: str) -> list[str]:
        """Give every readable case its lung mask (``case.lung_mask``), segmenting the missing ones.

        Returns:
            Notes (segmentation that failed), as :func:`~pellucid.explain.report.attach_lung_masks`.
        """
        if segmenter is None:
            return []
        todo = []
        for c in cases:
            if c.error or c.image is None:
                continue
            c.lung_mask = self._store.get((segmenter_key, c.sha256, c.window))
            if c.lung_mask is None:
                todo.append(c)
        notes = attach_lung_masks(segmenter, todo)
        for c in todo:
            if c.lung_mask is not None:
                self._store.put((segmenter_key, c.sha256, c.window), c.lung_mask)
        return notes


@dataclass
class ExplanationView:
    """What the predict page shows for one explanation.

    Attributes:
        overlay: the map over the image, RGB uint8 at the image's resolution (with the lung outline
            when asked for and known).
        image: ``overlay`` (shrunk to at most ``max_side`` pixels) with its colour bar underneath.
        caption: one line: the method and what red and blue mean.
        reading: the plain words (:class:`pellucid.explain.captions.Reading`): the method's sentence,
            one sentence per score, notes, and the technical details.
    """

    overlay: np.ndarray
    image: np.ndarray
    caption: str
    reading: Reading


def explanation_view(case: Case, result: MethodResult, alpha: float, *, outline: bool = True,
                     max_side: int = 640) -> ExplanationView:
    """The overlay, its colour bar and its words for one explanation of a case, from the same
    functions the report and ``pellucid explain`` use (:mod:`pellucid.explain.captions`); lung
    shares and the lung note when the case has a lung mask (the outline only with ``outline``)."""
    from pellucid.explain.overlay import draw_outline, with_colorbar

    if result.heatmap is None or case.image is None:
        raise ValueError(f"{result.method}: no heatmap to show ({result.note or 'not computed'})")
    rgb = overlay_rgb(case.image, result.heatmap, alpha)
    if case.lung_mask is not None and outline:
        rgb = draw_outline(rgb, case.lung_mask)
    reading = read_case_result(case, result)
    legend = reading.legend
    return ExplanationView(rgb, with_colorbar(rgb, legend.high, legend.low, legend.title, max_side=max_side),
                           reading.caption, reading)


def model_card_markdown(folder: str | Path, max_bytes: int = 256 << 10) -> str | None:
    """The human-readable model card ``MODEL_CARD.md`` of a model folder (its YAML front matter left
    out), or None when the folder has none or it cannot be read as UTF-8 text."""
    path = Path(folder) / "MODEL_CARD.md"
    try:
        if not path.is_file() or path.stat().st_size > max_bytes:
            return None
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    if text.startswith("---\n"):
        end = text.find("\n---", 4)
        if end != -1:
            text = text[end + 4:].lstrip("\n")
    return _no_images(text.strip()) or None


def _no_images(text: str) -> str:
    """Markdown with every image made a plain link (``![`` escaped, unless already): a model folder may come
    from anyone, and an image in its card was fetched by the browser from wherever it pointed as soon as the
    Model page opened. pellucid's own cards hold no images; a link stays, to be followed only when clicked."""
    return _IMAGE_START.sub(lambda m: m.group(1) + "\\![", text)


#: ``![`` after an even number of backslashes (none, or escaped backslashes): the start of an image
_IMAGE_START = re.compile(r"(?<!\\)((?:\\\\)*)!\[")


def uploads_to_cases(predictor, uploads: Sequence[Upload], *, reference="auto") -> list[Case]:
    """Predict the readable uploads through the one pipeline (the model folder's out-of-domain
    reference by default, as every door); unreadable ones become cases that carry their error."""
    good = [u for u in uploads if u.image is not None]
    predicted = iter(analyse_images(predictor, [u.image for u in good], [u.name for u in good],
                                    [u.sha256 for u in good], dicom=[u.is_dicom for u in good], reference=reference))
    cases = []
    for u in uploads:
        if u.image is None:
            cases.append(Case(name=u.name, sha256=u.sha256, is_dicom=u.is_dicom, error=u.error))
            continue
        c = next(predicted)
        c.window, c.identifiers = u.window, dict(u.identifiers)
        cases.append(c)
    return cases


def cases_table(cases: Sequence[Case], classes: Sequence[str]) -> list[dict]:
    """Rows for the batch table: input, folder label, prediction, probabilities, domain check, error."""
    rows = []
    for c in cases:
        row = {"input": c.name, "folder label": c.true_label or "",
               "predicted": "withheld" if c.withheld else c.label or ""}
        for k in classes:
            row[f"P({k})"] = None if c.error or not c.probs else round(c.probs[k], 4)
        row["domain check"] = c.ood.summary() if c.ood else ""
        row["error"] = c.error
        rows.append(row)
    return rows


def csv_bytes(cases: Sequence[Case], classes: Sequence[str]) -> bytes:
    """The batch table as the CSV ``pellucid report`` writes."""
    with tempfile.TemporaryDirectory() as tmp:
        return write_cases_csv(Path(tmp) / "predictions.csv", cases, classes).read_bytes()


def report_files(predictor, cases: Sequence[Case], *, methods: Sequence[str], alpha: float,
                 include_identifiers: bool = False, notes: Sequence[str] = (), splime_per_class: int = 0,
                 progress: Progress | None = None, segmenter=None, segmenter_name: str | None = None,
                 outline: bool = True) -> tuple[str, bytes]:
    """The HTML text and PDF bytes of a report of ``cases`` (as shown on screen: lung outlines and
    shares when the cases carry lung masks or a ``segmenter`` is given)."""
    ctx = build_context(predictor, list(cases), methods=methods, alpha=alpha, include_identifiers=include_identifiers,
                        notes=notes, splime_per_class=splime_per_class, csv_name="predictions.csv", progress=progress,
                        segmenter=segmenter, segmenter_name=segmenter_name, outline=outline)
    return render_html(ctx), render_pdf(ctx)
