"""Explanation reports: one image or a whole folder, as self-contained HTML and as PDF.

This module owns the path from files to a report, and the web app reuses every step of it:

1. :func:`analyse_paths` / :func:`analyse_images` read inputs, predict them in batches (calibrated
   probabilities, the card's threshold policy) and run the out-of-domain check of
   :mod:`pellucid.core.ood` on each; every input gets a :class:`Case`, unreadable ones with their
   error instead of stopping the run.
2. :func:`explain_cases` computes the chosen explainers in batches, with their faithfulness scores.
3. :func:`build_context` turns cases + model card into one plain dict (PNG bytes for figures) that
   both renderers read: :func:`render_html` (jinja2 template, images embedded as base64) and
   :func:`render_pdf` (fpdf2, DejaVu fonts from matplotlib, so any text renders).

:func:`write_report` (``pellucid report``) ties them together. A few inputs (up to
``detail_limit``) get a full section each: input, label, probability chart, threshold, overlays side
by side with scores. More inputs get a folder summary: a table (also written as CSV), metrics with
intervals and a confusion matrix when labels are known from the folder layout (sub-folders named
like the card's classes), per-class galleries of the most and least confident cases, and SP-LIME
picks when the explain package offers them.

Chest X-ray models with a lung segmenter (the one the model card names for its ``lung-mask``
preprocessing, or a segmentation folder given as ``write_report(..., lung_segmenter=...)``) get
the lung outline drawn on every explanation overlay, each overlay's lung share and border share
beside it (:mod:`pellucid.explain.lungshare`), and, in folder reports, their means per explainer.
Without a segmenter nothing of this appears.

Privacy: DICOM identifying header values are never read into a report unless
``include_identifiers=True``, and a DICOM file's name is replaced by ``DICOM <sha256 prefix>`` (file
names of clinical exports often carry names or IDs); error messages and log lines use that display
name too.
"""
from __future__ import annotations

import base64
import csv
import datetime as _dt
import hashlib
import io
import logging
import math
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

import pellucid
from pellucid.core.ood import OODCheck, OODReference, check_domain, forward_with_features, load_reference
from pellucid.datasets.readers import DICOM_SUFFIXES, Image, ImageReadError, is_dicom, read_image
from pellucid.explain.base import to_original_frame

__all__ = [
    "REPORT_METRICS",
    "SCORE_LABELS",
    "Case",
    "MethodResult",
    "method_detail",
    "Progress",
    "ReportError",
    "analyse_images",
    "analyse_paths",
    "attach_lung_masks",
    "available_methods",
    "build_context",
    "card_rows",
    "display_name",
    "explain_cases",
    "intended_use",
    "lung_segmenter_for",
    "metric_rows",
    "overlay_rgb",
    "render_html",
    "render_pdf",
    "score_items",
    "scrub_path",
    "share_items",
    "sha256_bytes",
    "threshold_text",
    "write_cases_csv",
    "write_report",
]

log = logging.getLogger(__name__)

DEFAULT_INTENDED_USE = "Research use only. Not a diagnostic device; every result needs review by a qualified person."
Progress = Callable[[float, str], None]

_SAFE_META = ("format", "original_size", "modality", "photometric", "window", "voi_lut_applied",
              "monochrome1_inverted", "frame", "n_frames", "bits_stored", "notes")
#: Faithfulness metrics computed for reports and the scores shown, with which way is better. ROAD and
#: the sanity check are left out: on CPU they cost ten times more than the explanation itself.
REPORT_METRICS = ("ad_ic", "deletion", "insertion")
SCORE_LABELS = {"deletion_auc": "deletion AUC ↓", "insertion_auc": "insertion AUC ↑", "road": "ROAD ↑",
                "ad_50": "drop with top 50% kept ↓"}
#: SP-LIME in folder reports: LIME runs on at most this many inputs, with this many perturbations each.
SPLIME_SAMPLE = 16
SPLIME_LIME_SAMPLES = 300
_THUMB = 512  # longest side of images embedded in reports, pixels
_OUTLINE_TEXT = ("Magenta line: the lungs as segmented by {name}. Lung share: the share of the map's mass "
                 "inside them (compare with the lung area, a uniform map's share); border share: on the "
                 "image's outer 8% band, where markers and burned-in text sit.")
_LUNG_SHARE_TEXT = ("Lungs segmented by {name}. Means over the explained inputs; all-zero maps have no share "
                    "and are counted apart. A model that looks at the lungs puts well more than the lung area "
                    "inside them.")
_TABLE_ROWS = 500  # summary-table rows shown in a report (the CSV has all)


class ReportError(ValueError):
    """A report cannot be made as asked (no images, an unknown explainer name)."""


@dataclass(eq=False)
class MethodResult:
    """One explainer's output for one case.

    Attributes:
        method: explainer name.
        heatmap: ``(h, w)`` float in [0, 1] at the model's input resolution, or None if it failed.
        scores: faithfulness scores by metric name.
        note: why the heatmap or scores are missing (empty when all went well).
        detail: how the map was computed, where that varies per image (LIME: the precision of its
            passes and the check that chose it; see :func:`method_detail`).
    """

    method: str
    heatmap: np.ndarray | None
    scores: dict[str, float] = field(default_factory=dict)
    note: str = ""
    detail: str = ""


def method_detail(extras: dict) -> str:
    """One line on how an explanation was computed, from its extras (empty when nothing varies).

    LIME's passes may run in a reduced precision that was checked against float32 on the image;
    the reader should see which precision made the map and what the check measured.
    """
    used = extras.get("precision")
    if used is None:
        return ""
    for prec in ("bfloat16", "int8"):
        check = extras.get(f"{prec}_check")
        if check:
            verdict = "kept" if check["passed"] else "rejected, float32 used"
            return (f"passes in {used}; {prec} check on {check['images']} copies: mean |Δp| "
                    f"{check['mean_abs_diff']:.3f}, max {check['max_abs_diff']:.3f} ({verdict})")
    return f"passes in {used}"


@dataclass(eq=False)
class Case:
    """One input on its way to a report.

    Attributes:
        name: display name, safe to show (hashed for DICOM unless identifiers were asked for).
        sha256: SHA-256 of the input file's bytes.
        is_dicom: whether the input was DICOM.
        image: the image as read (DICOM windowed), or None when unreadable or released.
        label / index / probs: predicted class, its index, calibrated probabilities by class.
        logits: raw logits ``(C,)``.
        true_label: the class from the folder layout, when the parent folder names a class.
        ood: the out-of-domain check.
        explanations: one :class:`MethodResult` per requested method.
        identifiers: DICOM identifying tags; filled only when identifiers were asked for.
        error: one line when the input could not be read.
        path: where the file is (never rendered for DICOM unless identifiers were asked for).
        window: DICOM window ``(center, width)`` the image was read with, None for the file's own.
        lung_mask: ``(H, W)`` bool lung mask at the image's resolution, when a lung segmenter ran.
    """

    name: str
    sha256: str
    is_dicom: bool = False
    image: Image | None = None
    label: str | None = None
    index: int | None = None
    probs: dict[str, float] = field(default_factory=dict)
    logits: np.ndarray | None = None
    true_label: str | None = None
    ood: OODCheck | None = None
    explanations: list[MethodResult] = field(default_factory=list)
    identifiers: dict[str, str] = field(default_factory=dict)
    error: str = ""
    path: Path | None = None
    window: tuple[float, float] | None = None
    meta: dict = field(default_factory=dict)
    lung_mask: np.ndarray | None = None

    @property
    def confidence(self) -> float:
        """Probability of the predicted class (NaN when there is no prediction)."""
        return self.probs.get(self.label, math.nan) if self.label else math.nan


# --------------------------------------------------------------------------------------------
# names, hashes, privacy


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


def _class_of(path: Path, classes: Sequence[str]) -> str | None:
    folded = {c.casefold(): c for c in classes}
    return folded.get(path.parent.name.casefold())


# --------------------------------------------------------------------------------------------
# prediction


def _predict_cases(predictor, cases: list[Case], reference: OODReference | None, batch_size: int) -> None:
    """Fill label / probs / logits / ood of cases that hold an image (in place, batched)."""
    from pellucid.core.calibration import apply_temperature

    todo = [c for c in cases if c.image is not None and not c.error]
    modality = predictor.card.get("modality")
    for i in range(0, len(todo), batch_size):
        chunk = todo[i:i + batch_size]
        batch = torch.stack([predictor.preprocess(c.image) for c in chunk]).to(predictor.device)
        logits, feats = forward_with_features(predictor.model, batch)
        probs = apply_temperature(torch.from_numpy(logits), predictor.temperature)
        idx = predictor.decide(probs)
        for j, c in enumerate(chunk):
            c.logits = logits[j]
            c.index = int(idx[j])
            c.label = predictor.classes[c.index]
            c.probs = {k: float(v) for k, v in zip(predictor.classes, probs[j])}
            c.ood = check_domain(c.image, logits[j], probs[j], modality=modality,
                                 features=None if feats is None else feats[j], reference=reference)


def analyse_images(predictor, images: Sequence[Image], names: Sequence[str], sha256s: Sequence[str], *,
                   dicom: Sequence[bool] | None = None, reference: OODReference | None = None,
                   batch_size: int = 16) -> list[Case]:
    """Predict already-read images (the web app's uploads) into :class:`Case` records.

    Args:
        predictor: a :class:`~pellucid.core.predict.Predictor`.
        images: images as read.
        names: display names (already privacy-safe).
        sha256s: SHA-256 of each input file.
        dicom: which inputs were DICOM.
        reference: OOD reference of the model, if any.
    """
    dicom = list(dicom) if dicom is not None else [False] * len(images)
    cases = [Case(name=n, sha256=s, is_dicom=d, image=im, meta=_safe_meta(im.meta))
             for im, n, s, d in zip(images, names, sha256s, dicom)]
    _predict_cases(predictor, cases, reference, batch_size)
    return cases


def analyse_paths(predictor, paths: Iterable[str | Path], *, include_identifiers: bool = False,
                  window: tuple[float, float] | None = None, keep_images: bool = True,
                  reference: OODReference | None = None, batch_size: int = 16,
                  progress: Progress | None = None) -> list[Case]:
    """Read, predict and domain-check files and folders (folders are searched recursively).

    Args:
        predictor: a :class:`~pellucid.core.predict.Predictor`.
        paths: files and folders.
        include_identifiers: show DICOM file names and read their identifying tags.
        window: DICOM ``(center, width)`` for every DICOM input; None keeps each file's own.
        keep_images: keep the read images in the cases (set False for big folders; images are read
            again by :func:`explain_cases` for the few cases it explains).
        reference: OOD reference of the model, if any.
        progress: ``progress(fraction, text)`` callback.

    Raises:
        ReportError: no image files found.
    """
    from pellucid.datasets.readers import dicom_identifying_tags
    from pellucid.datasets.samples import find_images

    roots = [Path(p) for p in paths]
    files = find_images(roots)
    if not files:
        raise ReportError(f"no image or DICOM files in {', '.join(map(str, roots))}: give image files or a "
                          "folder of them (.png, .jpg, .tif, .bmp, .dcm)")
    dirs = [r for r in roots if r.is_dir()]
    cases: list[Case] = []
    pending: list[Case] = []
    done = 0

    def flush() -> None:
        nonlocal pending
        _predict_cases(predictor, pending, reference, batch_size)
        if not keep_images:
            for c in pending:
                c.image = None
        pending = []
        if progress:
            progress(done / len(files), f"predicted {done} of {len(files)}")

    for f in files:
        done += 1
        rel = next((f.relative_to(d).as_posix() for d in dirs if f.is_relative_to(d)), f.name)
        try:
            sha = _sha256_file(f)
        except OSError as err:
            shown = f"DICOM file #{done}" if f.suffix.lower() in DICOM_SUFFIXES and not include_identifiers else rel
            cases.append(Case(name=shown, sha256="", error=f"{shown}: cannot be opened ({err.strerror})", path=f))
            continue
        dcm = is_dicom(f)
        name = display_name(rel, sha, dcm, include_identifiers)
        case = Case(name=name, sha256=sha, is_dicom=dcm, path=f, window=window if dcm else None,
                    true_label=_class_of(f, predictor.classes))
        try:
            case.image = _read(f, case.window)
            case.meta = _safe_meta(case.image.meta)
            if dcm and include_identifiers:
                case.identifiers = dicom_identifying_tags(f)
        except ImageReadError as err:
            case.error = scrub_path(str(err), f, name)
            log.warning("%s", case.error)
        cases.append(case)
        if case.image is not None:
            pending.append(case)
        if len(pending) >= batch_size:
            flush()
    flush()
    return cases


def _read(path: Path, window: tuple[float, float] | None) -> Image:
    with warnings.catch_warnings():
        # reader caveats (e.g. a window ignored) can quote header values; they are not report content
        warnings.simplefilter("ignore")
        return read_image(path, window=window)


# --------------------------------------------------------------------------------------------
# explanations


def available_methods() -> list[str]:
    """Names of the registered explainers ([] when the explain package offers none)."""
    try:
        from pellucid.explain import list_explainers
    except ImportError:
        return []
    return list(list_explainers())


def _check_methods(methods: Sequence[str]) -> list[str]:
    import difflib

    known = available_methods()
    for m in methods:
        if m not in known:
            close = difflib.get_close_matches(m, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ReportError(f"unknown explainer {m!r}: {hint}available: {', '.join(known) or 'none installed'}")
    return list(methods)


def explain_cases(predictor, cases: Sequence[Case], methods: Sequence[str], *, batch_size: int = 8,
                  score: bool = True, progress: Progress | None = None) -> list[str]:
    """Explain each case's predicted class with each method, in batches (in place).

    Cases without an image are read again from their path. An explainer that fails leaves a note on
    its results instead of stopping the report.

    Returns:
        Notes for the report (methods that failed or are unavailable).
    """
    notes: list[str] = []
    todo = [c for c in cases if c.index is not None and not c.error]
    for c in todo:
        if c.image is None and c.path is not None:
            c.image = _read(c.path, c.window)
    if not todo or not methods:
        return notes
    try:
        from pellucid.explain import explainer_for, score_explanations
    except ImportError as err:
        notes.append(f"explanations unavailable: {err}")
        for c in todo:
            c.explanations = [MethodResult(m, None, {}, "explain package unavailable") for m in methods]
        return notes
    steps = max(1, len(methods) * math.ceil(len(todo) / batch_size))
    step = 0
    for m in methods:
        for c in todo:
            c.explanations = [e for e in c.explanations if e.method != m]
        try:
            explainer = explainer_for(m, getattr(predictor, "card", None))
        except (KeyError, ValueError) as err:
            notes.append(f"{m}: {err}")
            for c in todo:
                c.explanations.append(MethodResult(m, None, {}, "unavailable"))
            continue
        for i in range(0, len(todo), batch_size):
            chunk = todo[i:i + batch_size]
            x = torch.stack([predictor.preprocess(c.image) for c in chunk]).to(predictor.device)
            targets = [c.index for c in chunk]
            results: list[MethodResult]
            # An explainer can fail in many ways (no gradient at the hooked layer, a library error);
            # one failing method must not cost the user the rest of the report, so it becomes a note.
            try:
                expl = explainer.explain(predictor.model, x, targets)
            except Exception as err:  # noqa: BLE001 - see above
                msg = f"{m} failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                log.warning("%s", msg)
                if msg not in notes:
                    notes.append(msg)
                results = [MethodResult(m, None, {}, "failed") for _ in chunk]
            else:
                scores: list[dict] = [{} for _ in chunk]
                if score:
                    try:
                        scores = list(score_explanations(predictor.model, x, expl, metrics=REPORT_METRICS))
                    except Exception as err:  # noqa: BLE001 - scores are optional, same reason
                        note = f"{m}: faithfulness scores failed ({type(err).__name__})"
                        log.warning("%s", note)
                        if note not in notes:
                            notes.append(note)
                results = [MethodResult(m, np.clip(to_original_frame(predictor, e.heatmap, c.image), 0, 1),
                                        {k: float(v) for k, v in (s or {}).items()
                                         if _is_number(v) and k not in ("image", "target")},
                                        detail=method_detail(e.extras))
                           for e, s, c in zip(expl, scores, chunk)]
            for c, r in zip(chunk, results):
                c.explanations.append(r)
            step += 1
            if progress:
                progress(step / steps, f"{m}: explained {min(i + batch_size, len(todo))} of {len(todo)}")
    return notes


def score_items(scores: dict[str, float]) -> list[tuple[str, str]]:
    """The scores a report shows, as ``(label, "0.123")`` (see :data:`SCORE_LABELS`)."""
    shown = [(k, label) for k, label in SCORE_LABELS.items() if k in scores] or [(k, k) for k in scores]
    return [(label, f"{scores[k]:.1f}%" if k.startswith(("ad_", "ic_")) else _fmt(scores[k])) for k, label in shown]


def share_items(heatmap: np.ndarray, mask: np.ndarray) -> list[tuple[str, str]]:
    """Where a map's mass falls, as ``(label, "38.2%")``: lung share, the lung area (a uniform
    map's lung share) and border share; an all-zero map says so instead of showing NaN."""
    from pellucid.explain.lungshare import mask_shares

    r = mask_shares(heatmap, mask)
    if r["empty"]:
        return [("lung share", "n/a (empty map)"), ("lung area", f"{r['lung_fraction']:.1%}")]
    return [("lung share", f"{r['lung_share']:.1%}"), ("lung area", f"{r['lung_fraction']:.1%}"),
            ("border share", f"{r['border_share']:.1%}")]


def _is_cxr(card: dict) -> bool:
    return str(card.get("modality") or "").upper() == "CXR"


def lung_segmenter_for(predictor, lung_segmenter=None) -> tuple[Any, str] | tuple[None, None]:
    """The lung segmenter a report (or the web app) uses for ``predictor``'s model, and its name.

    Args:
        predictor: a :class:`~pellucid.core.predict.Predictor`.
        lung_segmenter: a segmentation model folder (or a loaded segmenter) to use; None takes the
            model card's segmenter when it has one.

    Returns:
        ``(segmenter, name)``, or ``(None, None)`` when none applies: the model names no segmenter
        and none was given.

    Raises:
        ReportError: a segmenter was given for a model that is not a chest X-ray model, or the
            folder is not a usable segmentation folder.
    """
    card = predictor.card
    if lung_segmenter is None:
        masker = getattr(predictor, "masker", None)
        if masker is not None:
            return masker.model, Path(masker.folder).name if masker.folder else "the model's segmenter"
        pre, recipe = card.get("preprocessing") or {}, card.get("recipe") or {}
        if not (pre.get("segmenter") or recipe.get("segmenter")):
            return None, None
        lung_segmenter = predictor.folder
    elif not _is_cxr(card):
        raise ReportError(f"a lung segmenter outlines chest X-rays; this model's modality is "
                          f"{card.get('modality') or 'not stated'} ({card.get('task')}): leave the segmenter out")
    from pellucid.explain.lungshare import resolve_segmenter

    try:
        seg = resolve_segmenter(lung_segmenter)
    except (ValueError, OSError, KeyError) as err:  # ModelFolderError is a ValueError
        raise ReportError(f"cannot use {lung_segmenter} as a lung segmenter: {str(err).splitlines()[0]}") from err
    kind = (getattr(seg, "card", None) or {}).get("kind")
    if not isinstance(lung_segmenter, torch.nn.Module) and kind != "segmentation":
        raise ReportError(f"{lung_segmenter} is not a segmentation model folder (pellucid train tb-lungseg)")
    folder = getattr(seg, "_pellucid_folder", None)
    return seg, Path(folder).name if folder else "lung segmenter"


def attach_lung_masks(segmenter, cases: Sequence[Case], batch_size: int = 16) -> list[str]:
    """Segment the lungs of every case that holds an image and has no mask yet (in place).

    Returns:
        Notes for the report (segmentation that failed; the report goes on without outlines).
    """
    if segmenter is None:
        return []
    from pellucid.core.segmentation import segment_many

    todo = [c for c in cases if c.image is not None and c.lung_mask is None and not c.error]
    if not todo:
        return []
    try:
        masks = segment_many(segmenter, [c.image for c in todo], batch_size=batch_size)
    # outlines are an addition to the report: a failing segmenter becomes a note, not a lost report
    except Exception as err:  # noqa: BLE001
        log.warning("lung segmentation failed: %s", type(err).__name__)
        return [f"lung segmentation failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                "no lung outlines"]
    for c, m in zip(todo, masks):
        c.lung_mask = m
    return []


def _outlined(case: Case, heatmap: np.ndarray, alpha: float, outline: bool = True) -> np.ndarray:
    """The overlay of ``heatmap`` on the case's image, with the lung outline when the case has a mask
    (and ``outline`` is on)."""
    rgb = overlay_rgb(case.image, heatmap, alpha)
    if case.lung_mask is None or not outline:
        return rgb
    from pellucid.explain.overlay import draw_outline

    return draw_outline(rgb, case.lung_mask)


def _share_summary(cases: Sequence[Case], methods: Sequence[str]) -> list[dict]:
    """Mean lung / border shares per method over the cases with a lung mask and a heatmap."""
    from pellucid.explain.lungshare import mask_shares, summarize_shares

    rows = [{"method": r.method, **mask_shares(r.heatmap, c.lung_mask)}
            for c in cases if c.lung_mask is not None for r in c.explanations if r.heatmap is not None]
    if not rows:
        return []
    summary = summarize_shares(rows)
    order = [m for m in methods if m in summary] + [m for m in summary if m not in methods]
    pct = lambda v: "n/a" if not math.isfinite(v) else f"{v:.1%}"  # noqa: E731
    return [{"method": m, "n": summary[m]["n"], "n_empty": summary[m]["n_empty"],
             "lung_share": pct(summary[m]["lung_share"]), "lung_fraction": pct(summary[m]["lung_fraction"]),
             "border_share": pct(summary[m]["border_share"])} for m in order]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.number)) and not isinstance(v, bool)


def overlay_rgb(image: Image | np.ndarray, heatmap: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Heatmap over the image, RGB uint8 ``(H, W, 3)`` at the image's resolution.

    Uses :func:`pellucid.explain.overlay` when present, else a jet colour map blended with opacity
    ``alpha`` in [0, 1].
    """
    rgb = image.rgb if isinstance(image, Image) else np.asarray(image, dtype=np.float32)
    try:
        from pellucid.explain import overlay
    except ImportError:
        overlay = None
    if overlay is not None:
        return np.asarray(overlay(rgb, heatmap, alpha), dtype=np.uint8)
    import cv2
    from matplotlib import colormaps

    h, w = rgb.shape[:2]
    heat = cv2.resize(np.asarray(heatmap, dtype=np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    colour = colormaps["jet"](np.clip(heat, 0, 1))[..., :3].astype(np.float32)
    if rgb.shape[2] == 1:
        rgb = np.repeat(rgb, 3, axis=2)
    out = (1 - alpha) * rgb + alpha * colour
    return np.clip(out * 255 + 0.5, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# figures


def _png(array: np.ndarray, max_side: int = _THUMB) -> bytes:
    from PIL import Image as PILImage

    a = np.asarray(array)
    if a.dtype != np.uint8:
        a = np.clip(a.astype(np.float32) * 255 + 0.5, 0, 255).astype(np.uint8)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    im = PILImage.fromarray(a)
    if max(im.size) > max_side:
        im.thumbnail((max_side, max_side), PILImage.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _plot_png(draw: Callable[[Path], Any]) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "figure.png"
        draw(path)
        return path.read_bytes()


def _prob_chart(case: Case, classes: Sequence[str], threshold: float | None) -> bytes:
    from pellucid.core.plots import plot_probabilities

    return _plot_png(lambda p: plot_probabilities([case.probs[c] for c in classes], classes, p, threshold=threshold))


# --------------------------------------------------------------------------------------------
# card summary


def intended_use(card: dict) -> str:
    """The card's intended-use text, or the default research-use notice."""
    return str(card.get("intended_use") or DEFAULT_INTENDED_USE)


def threshold_text(card: dict) -> str:
    """How the decision is made, e.g. ``tuberculosis if P(tuberculosis) >= 0.430 (policy: youden)``."""
    thr = card.get("threshold") or {}
    value, policy = thr.get("value"), thr.get("policy") or "argmax"
    pos = thr.get("positive_class") or card.get("positive_class")
    if value is None or pos is None:
        return f"highest probability wins (policy: {policy})"
    return f"{pos} if P({pos}) ≥ {float(value):.3f}, else the other class (policy: {policy})"


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{digits}f}" if _is_number(v) else str(v)


def card_rows(card: dict) -> list[tuple[str, str]]:
    """The model card summary as ``(field, value)`` rows for reports and the web app."""
    bb = card.get("backbone") or {}
    weights = card.get("weights") or {}
    training = card.get("training") or {}
    split = card.get("split") or {}
    cal = card.get("calibration") or {}
    pre = card.get("preprocessing") or {}
    rows = [("Task", f"{card.get('title') or card.get('task')} ({card.get('task')})"),
            ("Classes", ", ".join(card.get("classes", []))),
            ("Modality", str(card.get("modality") or "n/a")),
            ("Backbone", f"{bb.get('name', 'n/a')}" + (f" ({bb['family']})" if bb.get("family") else "")
             + (f", {pre['image_size']} px input" if pre.get("image_size") else "")),
            ("Weights", " — ".join(str(x) for x in (weights.get("source"), weights.get("detail")) if x) or "n/a")]
    if training.get("data"):
        rows.append(("Training data", str(training["data"])))
    if split:
        parts = [f"{k} {split[k]}" for k in ("train", "val", "test") if isinstance(split.get(k), int)]
        rows.append(("Split", ", ".join(parts) + (f" (hash {split['hash']})" if split.get("hash") else "")))
    if cal.get("temperature") is not None:
        ece = ""
        if cal.get("ece_before") is not None and cal.get("ece_after") is not None:
            ece = f"; ECE {_fmt(cal['ece_before'])} → {_fmt(cal['ece_after'])}"
        rows.append(("Calibration", f"temperature {_fmt(cal['temperature'], 2)}{ece}"))
    rows.append(("Decision", threshold_text(card)))
    rows.append(("Model pellucid version", str(card.get("pellucid_version", "n/a"))))
    if card.get("created"):
        rows.append(("Model created", str(card["created"])))
    return rows


def metric_rows(metrics: dict | None) -> list[tuple[str, str, str]]:
    """``(name, value, "[low, high]")`` rows of a metrics dict as :func:`classification_metrics` writes it."""
    rows = []
    for name, m in ((metrics or {}).get("metrics") or {}).items():
        if not isinstance(m, dict):
            continue
        ci = f"[{_fmt(m.get('low'))}, {_fmt(m.get('high'))}]" if m.get("low") is not None else ""
        rows.append((name, _fmt(m.get("value")), ci))
    return rows


# --------------------------------------------------------------------------------------------
# report context


def _case_context(case: Case, classes: Sequence[str], threshold: float | None, alpha: float,
                  include_identifiers: bool, outline: bool = True) -> dict:
    ctx: dict[str, Any] = {"name": case.name, "sha256": case.sha256, "error": case.error,
                           "label": case.label, "true_label": case.true_label, "is_dicom": case.is_dicom}
    if case.error or case.label is None:
        return ctx
    top = case.label
    ctx["probs"] = [(c, case.probs[c], c == top) for c in classes]
    ctx["prob_png"] = _prob_chart(case, classes, threshold)
    if case.image is not None:
        ctx["input_png"] = _png(case.image.array)
    overlays = []
    for r in case.explanations:
        item = {"method": r.method, "note": r.note, "detail": r.detail, "scores": score_items(r.scores), "shares": []}
        if r.heatmap is not None and case.image is not None:
            item["png"] = _png(_outlined(case, r.heatmap, alpha, outline))
        if r.heatmap is not None and case.lung_mask is not None:
            item["shares"] = share_items(r.heatmap, case.lung_mask)
        overlays.append(item)
    ctx["overlays"] = overlays
    if case.ood is not None:
        ctx["ood"] = {"flagged": case.ood.flagged, "uncertain": case.ood.uncertain, "text": case.ood.summary(),
                      "method": case.ood.method,
                      "scores": [(k, _fmt(v)) for k, v in case.ood.scores.items()]}
    meta = dict(case.meta)
    if case.window is not None:
        meta["window"] = f"centre {case.window[0]:g}, width {case.window[1]:g} (chosen)"
    ctx["meta"] = [(k, "; ".join(map(str, v)) if isinstance(v, list) else str(v)) for k, v in meta.items()]
    ctx["identifiers"] = sorted(case.identifiers.items()) if include_identifiers else []
    return ctx


def _card_item(case: Case, alpha: float, heatmap: np.ndarray | None = None, method: str = "",
               outline: bool = True) -> dict:
    """A small gallery tile: ``heatmap`` or the case's first overlay (else the input), label, confidence."""
    png = None
    if case.image is not None:
        if heatmap is None:
            first = next((r for r in case.explanations if r.heatmap is not None), None)
            if first is not None:
                heatmap, method = first.heatmap, first.method
        png = _png(_outlined(case, heatmap, alpha, outline) if heatmap is not None else case.image.array, 256)
    return {"name": case.name, "label": case.label, "confidence": case.confidence, "true_label": case.true_label,
            "correct": None if case.true_label is None else case.true_label == case.label, "png": png,
            "method": method if heatmap is not None else "",
            "ood": case.ood.summary() if case.ood and case.ood.flagged else ""}


def select_gallery(cases: Sequence[Case], classes: Sequence[str], k: int = 3) -> dict[str, dict[str, list[Case]]]:
    """Per predicted class, the ``k`` most and ``k`` least confident cases (no case twice).

    Cases flagged out of domain are left out: the galleries show how the model behaves in its domain.
    """
    out: dict[str, dict[str, list[Case]]] = {}
    for cls in classes:
        mine = sorted((c for c in cases if c.label == cls and not c.error and not (c.ood and c.ood.flagged)),
                      key=lambda c: -c.confidence)
        most = mine[:k]
        least = [c for c in mine[::-1][:k] if c not in most]
        out[cls] = {"most": most, "least": least}
    return out


def _splime_section(predictor, cases: Sequence[Case], per_class: int, alpha: float, *, seed: int = 0) -> dict:
    """SP-LIME picks (Ribeiro et al., KDD 2016) via :func:`pellucid.explain.splime.sp_lime`.

    LIME is run on a class-stratified sample of at most :data:`SPLIME_SAMPLE` in-domain cases (LIME
    costs :data:`SPLIME_LIME_SAMPLES` forward passes per image), then ``per_class`` representative
    cases are picked per predicted class. Returns the section: ``cards`` (tiles with the LIME
    overlays) and ``note``.
    """
    sample, num_samples = SPLIME_SAMPLE, SPLIME_LIME_SAMPLES
    try:
        from pellucid.explain.splime import sp_lime
    except ImportError:
        return {"cards": [], "note": "SP-LIME is not available in this installation."}
    usable = [c for c in cases if c.index is not None and not c.error and not (c.ood and c.ood.flagged)]
    if len(usable) < 2:
        return {"cards": [], "note": "SP-LIME needs at least two readable in-domain images."}
    rng = np.random.default_rng(seed)
    chosen: list[Case] = []
    by_class = {k: [c for c in usable if c.label == k] for k in predictor.classes}
    share = max(1, sample // max(1, sum(1 for v in by_class.values() if v)))
    for members in by_class.values():
        if len(members) > share:
            members = [members[i] for i in sorted(rng.choice(len(members), share, replace=False))]
        chosen.extend(members)
    release = [c for c in chosen if c.image is None and c.path is not None]
    for c in release:
        c.image = _read(c.path, c.window)
    try:
        images = torch.stack([predictor.preprocess(c.image) for c in chosen]).to(predictor.device)
        result = sp_lime(predictor.model, images, budget=per_class, targets=[c.index for c in chosen],
                         num_samples=num_samples, seed=seed)
        cards = [_card_item(chosen[i], alpha, to_original_frame(predictor, result.explanations[i].heatmap,
                                                                 chosen[i].image), "lime")
                 for k in sorted(result.picks) for i in result.picks[k]]
    # SP-LIME is an optional section: whatever goes wrong in it becomes a note, not a lost report.
    except Exception as err:  # noqa: BLE001
        log.warning("SP-LIME failed: %s", type(err).__name__)
        first = str(err).splitlines()[0] if str(err) else ""
        return {"cards": [], "note": f"SP-LIME failed ({type(err).__name__}: {first})."}
    finally:
        for c in release:
            c.image = None
    note = (f"LIME ({num_samples} samples) on {len(chosen)} of {len(usable)} in-domain inputs, "
            f"{per_class} pick(s) per predicted class.")
    return {"cards": cards, "note": note}


def _folder_metrics(predictor, cases: Sequence[Case]) -> dict | None:
    from pellucid.core.metrics import classification_metrics
    from pellucid.core.plots import plot_confusion

    labelled = [c for c in cases if c.true_label is not None and c.label is not None]
    if not labelled:
        return None
    y = [predictor.classes.index(c.true_label) for c in labelled]
    probs = np.array([[c.probs[k] for k in predictor.classes] for c in labelled])
    binary = len(predictor.classes) == 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = classification_metrics(y, probs, predictor.classes,
                                     threshold=predictor.threshold if binary else None,
                                     positive_index=predictor.positive_index if binary else None,
                                     n_boot=1000 if len(y) <= 2000 else 200)
    cm = res["confusion_matrix"]
    return {"n": len(labelled), "rows": metric_rows(res),
            "confusion_png": _plot_png(lambda p: plot_confusion(cm, predictor.classes, p)),
            "warnings": sorted({str(w.message) for w in caught}), "result": res}


def build_context(predictor, cases: Sequence[Case], *, methods: Sequence[str] = (), alpha: float = 0.5,
                  include_identifiers: bool = False, detail_limit: int = 8, gallery_size: int = 3,
                  splime_per_class: int = 0, notes: Sequence[str] = (), csv_name: str | None = None,
                  title: str | None = None, progress: Progress | None = None, segmenter=None,
                  segmenter_name: str | None = None, outline: bool = True) -> dict:
    """Everything a report shows, as a plain dict that both renderers read.

    Up to ``detail_limit`` cases get a full section each; more cases get a folder summary with
    galleries (whose explanations are computed here, in batches) and, when ``splime_per_class`` > 0,
    SP-LIME picks. With a lung ``segmenter`` (see :func:`lung_segmenter_for`), explained cases get
    their lung mask (kept on the case), overlays show the lung outline and the lung / border shares,
    and the folder summary their means per explainer; cases that already carry a ``lung_mask`` show
    it even without a segmenter. ``outline=False`` keeps the shares but draws no outline.
    """
    card = predictor.card
    classes = predictor.classes
    ok = [c for c in cases if not c.error and c.label is not None]
    notes = list(notes)
    ctx: dict[str, Any] = {
        "title": title or f"pellucid report — {card.get('title') or card.get('task')}",
        "generated": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "version": pellucid.__version__,
        "intended_use": intended_use(card),
        "card_rows": card_rows(card),
        "card_metrics": metric_rows(card.get("metrics")),
        "card_metrics_n": (card.get("metrics") or {}).get("n"),
        "threshold": threshold_text(card),
        "methods": list(methods),
        "alpha": alpha,
        "include_identifiers": include_identifiers,
        "cases": [],
        "summary": None,
        "lung_segmenter": None,
    }
    if segmenter is not None:
        notes.extend(n for n in attach_lung_masks(segmenter, [c for c in ok if c.explanations]) if n not in notes)
    threshold = predictor.threshold if len(classes) == 2 else None
    if len(cases) > 1:
        rows = []
        for c in cases[:_TABLE_ROWS]:
            rows.append({"name": c.name, "true_label": c.true_label or "", "label": c.label or "",
                         "probs": [c.probs.get(k) for k in classes], "error": c.error,
                         "ood": c.ood.summary() if c.ood else "", "flagged": bool(c.ood and c.ood.flagged)})
        counts = [(k, sum(1 for c in ok if c.label == k)) for k in classes]
        summary: dict[str, Any] = {
            "n": len(cases), "n_ok": len(ok), "n_error": len(cases) - len(ok), "counts": counts,
            "n_flagged": sum(1 for c in ok if c.ood and c.ood.flagged), "classes": list(classes), "rows": rows,
            "rows_left_out": max(0, len(cases) - _TABLE_ROWS), "csv_name": csv_name,
            "metrics": _folder_metrics(predictor, cases), "galleries": [], "splime": None,
        }
        if len(cases) > detail_limit:
            gallery = select_gallery(ok, classes, gallery_size)
            chosen = [c for g in gallery.values() for part in g.values() for c in part]
            need = [c for c in chosen if not c.explanations]
            notes.extend(n for n in explain_cases(predictor, need, methods, progress=progress) if n not in notes)
            if segmenter is not None:
                notes.extend(n for n in attach_lung_masks(segmenter, need) if n not in notes)
            summary["galleries"] = [{"cls": k, "most": [_card_item(c, alpha, outline=outline) for c in g["most"]],
                                     "least": [_card_item(c, alpha, outline=outline) for c in g["least"]]}
                                    for k, g in gallery.items()]
            for c in chosen:
                if c.path is not None:
                    c.image = None  # release what was read again for the gallery
            if splime_per_class > 0:
                if progress:
                    progress(0.0, "SP-LIME: explaining a sample with LIME")
                summary["splime"] = _splime_section(predictor, ok, splime_per_class, alpha)
        summary["lung_shares"] = _share_summary(ok, methods)
        ctx["summary"] = summary
    if len(cases) <= detail_limit:
        ctx["cases"] = [_case_context(c, classes, threshold, alpha, include_identifiers, outline) for c in cases]
    if any(c.lung_mask is not None for c in ok):
        ctx["lung_segmenter"] = segmenter_name or "lung segmenter"
    ctx["outline"] = bool(outline and ctx["lung_segmenter"])
    ctx["notes"] = notes
    ctx["ood_method"] = next((c.ood.method for c in ok if c.ood), None)
    return ctx


# --------------------------------------------------------------------------------------------
# rendering


def _datauri(png: bytes | None) -> str:
    return "data:image/png;base64," + base64.b64encode(png or b"").decode("ascii")


def render_html(ctx: dict) -> str:
    """The report as one self-contained HTML page (images embedded as base64 PNG)."""
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    env = Environment(loader=FileSystemLoader(str(Path(__file__).parent / "templates")),
                      autoescape=select_autoescape(["html", "j2"]), trim_blocks=True, lstrip_blocks=True)
    env.filters["datauri"] = _datauri
    env.filters["pct"] = lambda v: "" if v is None or not _is_number(v) or not math.isfinite(v) else f"{v:.1%}"
    return env.get_template("report.html.j2").render(**ctx)


class _PDF:
    """A thin layer over fpdf2 with the report's few building blocks."""

    def __init__(self, title: str, footer: str):
        from fpdf import FPDF
        from matplotlib import get_data_path

        fonts = Path(get_data_path()) / "fonts" / "ttf"
        outer = self

        class Doc(FPDF):
            def footer(self):  # noqa: D401 - fpdf2 hook
                self.set_y(-12)
                self.set_font("DejaVu", "", 7)
                self.set_text_color(120)
                self.cell(0, 5, f"{outer.footer_text}  ·  page {self.page_no()}/{{nb}}", align="C")
                self.set_text_color(0)

        self.footer_text = footer
        self.pdf = Doc(format="A4")
        self.pdf.set_title(title)
        self.pdf.set_creator(f"pellucid {pellucid.__version__}")
        self.pdf.add_font("DejaVu", "", str(fonts / "DejaVuSans.ttf"))
        self.pdf.add_font("DejaVu", "B", str(fonts / "DejaVuSans-Bold.ttf"))
        self.pdf.set_auto_page_break(True, margin=15)
        self.pdf.set_margins(15, 15, 15)
        self.pdf.add_page()
        self.width = self.pdf.w - 30

    def heading(self, text: str, size: int = 13) -> None:
        if self.pdf.will_page_break(20):
            self.pdf.add_page()
        self.pdf.ln(2)
        self.pdf.set_font("DejaVu", "B", size)
        self.pdf.multi_cell(0, size * 0.5, text, new_x="LMARGIN", new_y="NEXT")
        self.pdf.ln(1)

    def text(self, text: str, size: int = 9, bold: bool = False, colour: tuple[int, int, int] | None = None) -> None:
        self.pdf.set_font("DejaVu", "B" if bold else "", size)
        if colour:
            self.pdf.set_text_color(*colour)
        self.pdf.multi_cell(0, size * 0.5, text, new_x="LMARGIN", new_y="NEXT")
        self.pdf.set_text_color(0)

    def banner(self, text: str, fill: tuple[int, int, int], colour: tuple[int, int, int]) -> None:
        self.pdf.set_font("DejaVu", "B", 9)
        self.pdf.set_fill_color(*fill)
        self.pdf.set_text_color(*colour)
        self.pdf.multi_cell(0, 5.5, text, fill=True, padding=2, new_x="LMARGIN", new_y="NEXT")
        self.pdf.set_text_color(0)
        self.pdf.set_fill_color(255)
        self.pdf.ln(2)

    def table(self, rows: Sequence[Sequence[str]], widths: Sequence[float] | None = None, header: bool = True,
              size: int = 8) -> None:
        if not rows:
            return
        self.pdf.set_font("DejaVu", "", size)
        with self.pdf.table(col_widths=widths, first_row_as_headings=header, line_height=size * 0.55,
                            text_align="LEFT", borders_layout="HORIZONTAL_LINES",
                            headings_style=_headings_style()) as t:
            for r in rows:
                row = t.row()
                for cell in r:
                    row.cell(str(cell))
        self.pdf.ln(2)

    def images(self, items: Sequence[tuple[bytes, str]], max_h: float = 70.0) -> None:
        """PNG images side by side, each with a caption under it."""
        from PIL import Image as PILImage

        items = [(png, cap) for png, cap in items if png]
        if not items:
            return
        gap = 4.0
        n = len(items)
        slot = (self.width - gap * (n - 1)) / n
        sizes = []
        for png, _ in items:
            w, h = PILImage.open(io.BytesIO(png)).size
            dw = min(slot, max_h * w / h)
            sizes.append((dw, dw * h / w))
        lines = max(cap.count("\n") + 1 for _, cap in items)
        row_h = max(h for _, h in sizes) + 3 + 3.5 * lines
        if self.pdf.will_page_break(row_h):
            self.pdf.add_page()
        y0 = self.pdf.get_y()
        x = self.pdf.l_margin
        for (png, cap), (w, h) in zip(items, sizes):
            self.pdf.image(io.BytesIO(png), x=x + (slot - w) / 2, y=y0, w=w, h=h)
            self.pdf.set_xy(x, y0 + h + 1)
            self.pdf.set_font("DejaVu", "", 7)
            self.pdf.multi_cell(slot, 3.3, cap, align="C")
            x += slot + gap
        self.pdf.set_xy(self.pdf.l_margin, y0 + row_h)

    def output(self) -> bytes:
        # fontTools logs every table of the font subset at INFO; quiet it for this call only
        quiet = logging.getLogger("fontTools")
        level = quiet.level
        quiet.setLevel(max(level, logging.WARNING))
        try:
            return bytes(self.pdf.output())
        finally:
            quiet.setLevel(level)


def _headings_style():
    from fpdf.fonts import FontFace

    return FontFace(emphasis="BOLD", fill_color=(235, 239, 245))


def render_pdf(ctx: dict) -> bytes:
    """The report as PDF bytes (same content as the HTML, laid out for A4)."""
    doc = _PDF(ctx["title"], f"pellucid {ctx['version']} · {ctx['generated']}")
    doc.heading(ctx["title"], 15)
    doc.banner("Intended use: " + ctx["intended_use"], (255, 243, 205), (102, 77, 3))
    doc.text(f"Generated {ctx['generated']} by pellucid {ctx['version']}.", 8, colour=(90, 90, 90))
    if ctx.get("ood_method") == "heuristic":
        doc.text("Out-of-domain check: heuristics only (this model folder has no in-domain reference).", 8,
                 colour=(90, 90, 90))
    for note in ctx.get("notes", []):
        doc.text("Note: " + note, 8, colour=(150, 60, 0))

    s = ctx.get("summary")
    if s:
        doc.heading("Summary")
        doc.text(f"{s['n']} input(s): {s['n_ok']} predicted, {s['n_error']} unreadable, "
                 f"{s['n_flagged']} flagged out of domain. Predicted: "
                 + ", ".join(f"{k} {n}" for k, n in s["counts"]) + ".")
        if s.get("metrics"):
            m = s["metrics"]
            doc.heading(f"Metrics on {m['n']} labelled input(s) (labels from folder names)", 11)
            doc.table([("metric", "value", "95% CI"), *m["rows"]], widths=(40, 25, 40))
            for w in m["warnings"]:
                doc.text(w, 7, colour=(150, 60, 0))
            doc.images([(m["confusion_png"], "confusion matrix")], max_h=75)
        for g in s.get("galleries", []):
            doc.heading(f"Predicted {g['cls']}", 11)
            for part, cards in (("most confident", g["most"]), ("least confident", g["least"])):
                if cards:
                    doc.text(part, 8, bold=True)
                    doc.images([(c["png"], _card_caption(c)) for c in cards], max_h=45)
        if s.get("lung_shares"):
            doc.heading("Where the explanations fall", 11)
            doc.text(_LUNG_SHARE_TEXT.format(name=ctx.get("lung_segmenter") or "a lung segmenter"), 8)
            doc.table([("explainer", "maps", "mean lung share", "mean lung area", "mean border share", "empty maps"),
                       *[(r["method"], str(r["n"] - r["n_empty"]), r["lung_share"], r["lung_fraction"],
                          r["border_share"], str(r["n_empty"])) for r in s["lung_shares"]]],
                      widths=(30, 15, 32, 32, 35, 25))
        if s.get("splime") is not None:
            doc.heading("SP-LIME picks", 11)
            if s["splime"]["note"]:
                doc.text(s["splime"]["note"], 8)
            doc.images([(c["png"], _card_caption(c)) for c in s["splime"]["cards"]], max_h=45)
        doc.heading("All inputs", 11)
        head = ["input", "true", "predicted", *[f"P({k})" for k in s["classes"]], "check"]
        rows = [head]
        for r in s["rows"]:
            check = r["error"] or ("" if r["ood"] == "ok" else r["ood"])
            rows.append([r["name"], r["true_label"], r["label"],
                         *["" if p is None else f"{p:.3f}" for p in r["probs"]], check])
        k = len(s["classes"])
        w = min(18.0, 54.0 / k)
        doc.table(rows, widths=(50, 22, 22, *[w] * k, 180 - 94 - w * k), size=7)
        if s["rows_left_out"]:
            doc.text(f"{s['rows_left_out']} more row(s) in {s['csv_name'] or 'the CSV'}.", 8)

    for c in ctx["cases"]:
        doc.heading(f"Input: {c['name']}")
        if c["error"]:
            doc.text("Could not be read: " + c["error"], colour=(160, 0, 0))
            continue
        label_line = f"Predicted: {c['label']}  ({dict((k, p) for k, p, _ in c['probs'])[c['label']]:.1%})"
        if c.get("true_label"):
            label_line += f"   ·   folder label: {c['true_label']}"
        doc.text(label_line, 12, bold=True)
        ood = c.get("ood")
        if ood and ood["flagged"]:
            doc.banner("Flagged — " + ood["text"] + ". Do not use this prediction.", (248, 215, 218), (114, 28, 36))
        elif ood and ood["uncertain"]:
            doc.text("Low confidence: the top probability is close to chance.", 8, colour=(150, 60, 0))
        doc.text("Decision rule: " + ctx["threshold"], 8)
        doc.images([(c.get("input_png"), "input" + (" (windowed)" if c["is_dicom"] else "")),
                    (c["prob_png"], "calibrated probabilities")], max_h=60)
        if c["overlays"]:
            doc.text(f"Explanations of '{c['label']}' (overlay opacity {ctx['alpha']:.2f})", 9, bold=True)
            if ctx.get("outline") and any(o.get("shares") for o in c["overlays"]):
                doc.text(_OUTLINE_TEXT.format(name=ctx["lung_segmenter"]), 8, colour=(90, 90, 90))
            doc.images([(o.get("png"), _overlay_caption(o)) for o in c["overlays"] if o.get("png")], max_h=60)
            for o in c["overlays"]:
                if not o.get("png"):
                    doc.text(f"{o['method']}: {o['note'] or 'no heatmap'}", 8, colour=(150, 60, 0))
        rows = [("field", "value"), ("SHA-256", c["sha256"]), *c["meta"]]
        if ood:
            rows.append(("domain check", f"{ood['text']} ({ood['method']}): "
                         + ", ".join(f"{k} {v}" for k, v in ood["scores"])))
        rows.extend(c["identifiers"])
        doc.table(rows, widths=(35, 145), size=7)

    doc.heading("Model")
    doc.table([("field", "value"), *ctx["card_rows"]], widths=(40, 140))
    if ctx["card_metrics"]:
        n = f" (test split, n = {ctx['card_metrics_n']})" if ctx["card_metrics_n"] else ""
        doc.text("Held-out metrics" + n, 9, bold=True)
        doc.table([("metric", "value", "95% CI"), *ctx["card_metrics"]], widths=(40, 25, 40))
    return doc.output()


def _card_caption(c: dict) -> str:
    cap = f"{c['name']}\n{c['label']} {c['confidence']:.1%}"
    if c["true_label"]:
        cap += f" · true {c['true_label']}" + (" ✓" if c["correct"] else " ✗")
    if c["ood"]:
        cap += "\nflagged: out of domain"
    return cap


def _overlay_caption(o: dict) -> str:
    cap = o["method"] + ("\n" + ", ".join(f"{k} {v}" for k, v in o["scores"]) if o["scores"] else "")
    if o.get("shares"):
        cap += "\n" + ", ".join(f"{k} {v}" for k, v in o["shares"])
    if o.get("detail"):
        cap += "\n" + o["detail"]
    return cap


# --------------------------------------------------------------------------------------------
# files


def write_cases_csv(path: str | Path, cases: Sequence[Case], classes: Sequence[str]) -> Path:
    """``path,label,prob_<class>...,error,true_label,domain,sha256`` rows (display names as path)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", *[f"prob_{c}" for c in classes], "error", "true_label", "domain", "sha256"])
        for c in cases:
            probs = ["" if c.error or c.label is None else f"{c.probs[k]:.6f}" for k in classes]
            w.writerow([c.name, c.label or "", *probs, c.error, c.true_label or "",
                        c.ood.summary() if c.ood else "", c.sha256])
    return path


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "input"


def write_report(model_dir: str | Path, paths: Sequence[str | Path], methods: Sequence[str] | None = None,
                 out_dir: str | Path = "runs/report", include_identifiers: bool = False, *, alpha: float = 0.5,
                 batch_size: int = 16, detail_limit: int = 8, gallery_size: int = 3, splime_per_class: int = 2,
                 progress: Progress | None = None, lung_segmenter: str | Path | None = None) -> list[Path]:
    """Write the HTML and PDF report of images or folders (``pellucid report``).

    Args:
        model_dir: model folder.
        paths: image / DICOM files and folders (searched recursively).
        methods: explainer names; default the card's explainers that are installed.
        out_dir: where to write.
        include_identifiers: show DICOM file names and identifying tags (off by default).
        alpha: overlay opacity in [0, 1].
        detail_limit: inputs up to which every input gets its own section.
        splime_per_class: SP-LIME picks per predicted class in larger folders (0 turns them off).
        lung_segmenter: segmentation model folder for lung outlines and lung shares (chest X-ray
            models only); None uses the model card's segmenter when it names one, else none.

    Returns:
        ``[html, pdf]`` for one input (``report-<name>.html/.pdf``), ``[html, pdf, csv]`` for several
        (``report.html``, ``report.pdf``, ``predictions.csv``).

    Raises:
        ReportError: no images found, an unknown explainer name, or an unusable lung segmenter.
    """
    from pellucid.core.predict import Predictor

    if not 0.0 <= alpha <= 1.0:
        raise ReportError(f"alpha={alpha} is not an opacity: give a value in [0, 1]")
    predictor = Predictor(model_dir)
    card = predictor.card
    segmenter, segmenter_name = lung_segmenter_for(predictor, lung_segmenter)
    notes: list[str] = []
    if methods is None:
        known = available_methods()
        methods = [m for m in card.get("explainers", []) if m in known]
        missing = [m for m in card.get("explainers", []) if m not in known]
        if missing:
            notes.append(f"explainers not installed: {', '.join(missing)}")
    else:
        methods = _check_methods([m for m in methods if m])
    reference = load_reference(model_dir)
    inputs = [Path(p) for p in paths]
    cases = analyse_paths(predictor, inputs, include_identifiers=include_identifiers,
                          keep_images=False, reference=reference, batch_size=batch_size, progress=progress)
    log.info("report: %d input(s), %d unreadable", len(cases), sum(1 for c in cases if c.error))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    detailed = len(cases) <= detail_limit
    if detailed:
        notes.extend(explain_cases(predictor, cases, methods, batch_size=min(batch_size, 8), progress=progress))
    csv_path = out / "predictions.csv" if len(cases) > 1 else None
    ctx = build_context(predictor, cases, methods=methods, alpha=alpha, include_identifiers=include_identifiers,
                        detail_limit=detail_limit, gallery_size=gallery_size,
                        splime_per_class=0 if detailed else splime_per_class, notes=notes,
                        csv_name=csv_path.name if csv_path else None, progress=progress,
                        segmenter=segmenter, segmenter_name=segmenter_name)
    stem = "report" if len(cases) > 1 else f"report-{_slug(Path(cases[0].name).stem)}"
    html, pdf = out / f"{stem}.html", out / f"{stem}.pdf"
    html.write_text(render_html(ctx), encoding="utf-8")
    pdf.write_bytes(render_pdf(ctx))
    written += [html, pdf]
    if csv_path is not None:
        written.append(write_cases_csv(csv_path, cases, predictor.classes))
    return written
