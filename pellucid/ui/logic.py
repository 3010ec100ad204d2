"""The web app's logic, free of Streamlit so it can be unit-tested.

Pages in :mod:`pellucid.ui.views` stay thin: they lay out widgets and call these functions, which in
turn call the same API as the command line (:class:`~pellucid.core.predict.Predictor`,
:mod:`pellucid.explain.report`, :mod:`pellucid.core.ood`). This module finds model folders, turns
uploaded bytes into images with one-line errors (size limit, not an image, corrupt, DICOM without
pixels), reads a DICOM's value range for the window controls, unpacks zip uploads safely, caches
explanations so that moving the opacity slider does not recompute them, segments the lungs of chest
X-rays for the outline and lung share of each explanation (:class:`LungMaskCache`,
:func:`explanation_view`), and builds the report of what is on screen.
"""
from __future__ import annotations

import io
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from pellucid.core.card import ModelCard, as_card
from pellucid.datasets.readers import (
    DICOM_SUFFIXES,
    IMAGE_SUFFIXES,
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
    score_items,
    scrub_path,
    sha256_bytes,
    share_items,
    write_cases_csv,
)

__all__ = [
    "DicomRange",
    "ExplanationCache",
    "LungMaskCache",
    "NO_SEGMENTER",
    "Upload",
    "UploadError",
    "cases_table",
    "csv_bytes",
    "default_model",
    "dicom_range",
    "explanation_view",
    "extract_zip",
    "find_model_folders",
    "find_segmenter_folders",
    "is_cxr",
    "load_lung_segmenter",
    "segmenter_choices",
    "max_upload_bytes",
    "model_plots",
    "read_upload",
    "report_files",
    "uploads_to_cases",
]

PLOTS = (("roc.png", "ROC"), ("confusion.png", "Confusion matrix"), ("reliability.png", "Reliability"),
         ("training_curves.png", "Training curves"))
DEFAULT_MAX_UPLOAD_MB = 50
MAX_ZIP_FILES = 10_000
MAX_ZIP_BYTES = 4 << 30
#: the sidebar choice that turns lung outlines off
NO_SEGMENTER = "None"
MODEL_SEGMENTER = "From the model card"


class UploadError(ValueError):
    """An uploaded file that cannot be used; the message is one line naming the file."""


def max_upload_bytes() -> int:
    """Per-file upload limit: ``PELLUCID_MAX_UPLOAD_MB`` megabytes (default 50)."""
    raw = os.environ.get("PELLUCID_MAX_UPLOAD_MB", "")
    try:
        mb = float(raw) if raw else DEFAULT_MAX_UPLOAD_MB
    except ValueError:
        mb = DEFAULT_MAX_UPLOAD_MB
    return int(mb * (1 << 20))


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
    suffix = Path(name).suffix.lower()
    return suffix if suffix in IMAGE_SUFFIXES | DICOM_SUFFIXES else ""


def read_upload(name: str, data: bytes, *, window: tuple[float, float] | None = None,
                include_identifiers: bool = False, max_bytes: int | None = None) -> Upload:
    """Read uploaded bytes as an image or DICOM.

    Args:
        name: the uploaded file's name (its suffix decides the reader; DICOM is also sniffed).
        data: the file's bytes.
        window: DICOM ``(center, width)``; None keeps the file's own.
        include_identifiers: show a DICOM file's own name instead of its hash.
        max_bytes: size limit (default :func:`max_upload_bytes`).

    Returns:
        An :class:`Upload`; problems are in its ``error`` (one line), never raised.
    """
    limit = max_upload_bytes() if max_bytes is None else max_bytes
    sha = sha256_bytes(data)
    if len(data) > limit:
        return Upload(name=name, sha256=sha, error=f"{name} is {len(data) / 2**20:.1f} MB, over the "
                      f"{limit / 2**20:.0f} MB limit — downscale it, or raise PELLUCID_MAX_UPLOAD_MB")
    if not data:
        return Upload(name=name, sha256=sha, error=f"{name} is empty — upload the file again")
    with tempfile.TemporaryDirectory(prefix="pellucid-upload-") as tmp:
        path = Path(tmp) / f"upload{_suffix(name)}"
        path.write_bytes(data)
        dicom = is_dicom(path)
        shown = display_name(name, sha, dicom, include_identifiers)
        up = Upload(name=shown, sha256=sha, is_dicom=dicom, window=window if dicom else None)
        try:
            up.image = read_image(path, window=up.window)
        except ImageReadError as err:
            up.error = scrub_path(str(err), path, shown)
            return up
        except ValueError as err:  # a window with width <= 0
            up.error = f"{shown}: {err}"
            return up
        up.meta = dict(up.image.meta)
        up.meta.pop("path", None)
        if dicom and up.image.array.shape[2] == 1:
            up.dicom_range = dicom_range(data)
        if dicom and include_identifiers:
            up.identifiers = dicom_identifying_tags(path)
    return up


def dicom_range(data: bytes) -> DicomRange | None:
    """Window limits of a monochrome DICOM from its bytes (modality LUT applied), or None."""
    import warnings

    import pydicom
    from pydicom.pixels import apply_modality_lut

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
            arr = ds.pixel_array
            if arr.ndim == 3 and int(ds.get("NumberOfFrames", 1) or 1) > 1:
                arr = arr[arr.shape[0] // 2]
            values = apply_modality_lut(arr, ds).astype(np.float64)
    except Exception:  # noqa: BLE001 - the image was read already; the sliders are optional
        return None
    low, high = float(values.min()), float(values.max())
    if high <= low:
        high = low + 1.0
    center, width = (low + high) / 2, high - low
    wc, ww = ds.get("WindowCenter"), ds.get("WindowWidth")
    if wc is not None and ww is not None:
        try:
            c = float(wc[0] if isinstance(wc, pydicom.multival.MultiValue) else wc)
            w = float(ww[0] if isinstance(ww, pydicom.multival.MultiValue) else ww)
            if w > 0:
                center, width = c, w
        except (TypeError, ValueError):
            pass
    return DicomRange(low=low, high=high, center=center, width=width)


def extract_zip(data: bytes, dest: str | Path, *, max_files: int = MAX_ZIP_FILES,
                max_bytes: int = MAX_ZIP_BYTES) -> Path:
    """Unpack a zip upload into ``dest`` safely (no paths outside it, bounded size and count).

    Raises:
        UploadError: not a zip file, too many files, too large, or a member escaping ``dest``.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise UploadError("the upload is not a zip file — zip the folder of images and upload that") from None
    with zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
        if len(members) > max_files:
            raise UploadError(f"the zip holds {len(members)} files, over the limit of {max_files}; split it")
        total = sum(m.file_size for m in members)
        if total > max_bytes:
            raise UploadError(f"the zip unpacks to {total / 2**30:.1f} GB, over the limit of "
                              f"{max_bytes / 2**30:.0f} GB; split it")
        root = dest.resolve()
        for m in members:
            target = (dest / m.filename).resolve()
            if not target.is_relative_to(root):
                raise UploadError(f"the zip member {m.filename!r} points outside the folder; re-create the zip")
            if Path(m.filename).name.startswith(".") or "__MACOSX" in Path(m.filename).parts:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(m) as src, target.open("wb") as out:
                out.write(src.read())
    return dest


# --------------------------------------------------------------------------------------------
# explanations and reports


class ExplanationCache:
    """Explanations by (model, input hash, window, method), so reruns only compute what is new."""

    def __init__(self, max_items: int = 512):
        self._items: dict[tuple, MethodResult] = {}
        self.max_items = max_items

    @staticmethod
    def _key(model_key: str, case: Case, method: str) -> tuple:
        return (model_key, case.sha256, case.window, case.index, method)

    def attach(self, predictor, cases: Sequence[Case], methods: Sequence[str], model_key: str, *,
               progress: Progress | None = None) -> list[str]:
        """Give every case one result per method, computing the missing ones in batches.

        Returns:
            Notes from the explainers (failures), as :func:`~pellucid.explain.report.explain_cases`.
        """
        missing: dict[str, list[Case]] = {}
        for c in cases:
            if c.error or c.index is None:
                continue
            for m in methods:
                if self._key(model_key, c, m) not in self._items:
                    missing.setdefault(m, []).append(c)
        notes: list[str] = []
        for i, (m, todo) in enumerate(missing.items()):
            def step(f: float, text: str, i: int = i) -> None:
                progress((i + f) / len(missing), text)

            notes += explain_cases(predictor, todo, [m], progress=step if progress is not None else None)
            for c in todo:
                for r in c.explanations:
                    if r.method == m:
                        self._items[self._key(model_key, c, m)] = r
        while len(self._items) > self.max_items:
            self._items.pop(next(iter(self._items)))
        for c in cases:
            if c.error or c.index is None:
                continue
            c.explanations = [self._items[self._key(model_key, c, m)] for m in methods
                              if self._key(model_key, c, m) in self._items]
        return notes


class LungMaskCache:
    """Lung masks by (segmenter, input hash, window), so reruns (a moved slider) do not segment again."""

    def __init__(self, max_items: int = 256):
        self._items: dict[tuple, np.ndarray] = {}
        self.max_items = max_items

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
            c.lung_mask = self._items.get((segmenter_key, c.sha256, c.window))
            if c.lung_mask is None:
                todo.append(c)
        notes = attach_lung_masks(segmenter, todo)
        for c in todo:
            if c.lung_mask is not None:
                self._items[(segmenter_key, c.sha256, c.window)] = c.lung_mask
        while len(self._items) > self.max_items:
            self._items.pop(next(iter(self._items)))
        return notes


def explanation_view(case: Case, result: MethodResult, alpha: float, *, outline: bool = True
                     ) -> tuple[np.ndarray, str]:
    """What the predict page shows for one explanation: the overlay (RGB uint8 at the image's
    resolution, with the lung outline when the case has a lung mask and ``outline`` is on) and its
    caption (method, faithfulness scores, lung share, lung area and border share, and how the map
    was computed where that varies, e.g. the precision of LIME's passes)."""
    from pellucid.explain.overlay import draw_outline

    if result.heatmap is None or case.image is None:
        raise ValueError(f"{result.method}: no heatmap to show ({result.note or 'not computed'})")
    rgb = overlay_rgb(case.image, result.heatmap, alpha)
    parts = [f"{k} {v}" for k, v in score_items(result.scores)]
    if case.lung_mask is not None:
        if outline:
            rgb = draw_outline(rgb, case.lung_mask)
        parts += [f"{k} {v}" for k, v in share_items(result.heatmap, case.lung_mask)]
    if result.detail:
        parts.append(result.detail)
    return rgb, result.method + (" · " + " · ".join(parts) if parts else "")


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
