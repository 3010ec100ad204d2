"""The case pipeline of reports: read files (or take already-read images), predict them in batches
(calibrated probabilities, the card's threshold policy), run the out-of-domain check of
:mod:`pellucid.core.ood` on each, and explain the predicted class with the chosen explainers and their
faithfulness scores. Every input becomes a :class:`~.records.Case`; unreadable ones carry their error
instead of stopping the run.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from pellucid.core.ood import OODReference, check_domain, forward_with_features
from pellucid.datasets.readers import DICOM_SUFFIXES, Image, ImageReadError, is_dicom
from pellucid.explain.base import to_original_frame
from pellucid.explain.report.card import _is_number
from pellucid.explain.report.privacy import _read, _safe_meta, _sha256_file, display_name, scrub_path
from pellucid.explain.report.records import Case, MethodResult, Progress, ReportError

__all__ = ["REPORT_METRICS", "analyse_images", "analyse_paths", "explain_cases", "method_detail"]

log = logging.getLogger(__name__)

#: Faithfulness metrics computed for reports and the scores shown, with which way is better. ROAD and
#: the sanity check are left out: on CPU they cost ten times more than the explanation itself.
REPORT_METRICS = ("ad_ic", "deletion", "insertion")


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


def _class_of(path: Path, classes: Sequence[str]) -> str | None:
    folded = {c.casefold(): c for c in classes}
    return folded.get(path.parent.name.casefold())


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
