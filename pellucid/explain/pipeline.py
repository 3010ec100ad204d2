"""The case pipeline's explain half: explanations and their scores attached to Cases.

:func:`explain_cases` runs the chosen explainers on Cases that the predict half
(:class:`pellucid.core.pipeline.CasePipeline`) decided, in batches, scores each map for faithfulness
on the model's input, then places it on the image's own field of view. Every door — ``pellucid
explain``, ``pellucid report``, the web app and the library — calls it, so the same image gets the
same maps, the same score set and the same handling of a failing explainer everywhere: a method that
fails becomes a note on its results (and in the returned notes), never a lost run.
:func:`analyse_paths` / :func:`analyse_images` are the predict half with the defaults the explain
doors use (they keep the images, which explanations need).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from pellucid.core.ood import MemberReferences, OODReference
from pellucid.core.pipeline import Case, CasePipeline, MethodResult, Progress
from pellucid.core.privacy import read_quietly
from pellucid.datasets.readers import Image
from pellucid.explain.base import explainer_for, to_original_frame

__all__ = ["SCORE_METRICS", "analyse_images", "analyse_paths", "explain_cases", "json_safe", "method_detail",
           "resolve_target"]

log = logging.getLogger(__name__)

#: Faithfulness metrics every door computes, with which way is better. ROAD and the sanity check are
#: left out by default: on CPU they cost ten times more than the explanation itself.
SCORE_METRICS = ("ad_ic", "deletion", "insertion")


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


def json_safe(extras: dict) -> dict:
    """The JSON-representable part of an explainer's extras (numbers, strings, flat lists, dicts)."""
    out = {}
    for k, v in extras.items():
        if isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v
        elif isinstance(v, (list, tuple)) and all(isinstance(x, (str, int, float, bool)) for x in v):
            out[k] = list(v)
        elif isinstance(v, dict):
            out[k] = json_safe(v)
    return out


def resolve_target(target: int | str | None, classes: Sequence[str]) -> int | None:
    """A class name or index → index (None stays None: explain each case's decided class)."""
    if target is None:
        return None
    if isinstance(target, str) and target in classes:
        return list(classes).index(target)
    try:
        idx = int(target)
    except (TypeError, ValueError):
        from pellucid.registry import unknown_name_error

        raise unknown_name_error("class", str(target), list(classes)) from None
    if not 0 <= idx < len(classes):
        raise ValueError(f"target class index {idx} out of range: the model has classes {list(classes)}")
    return idx


def analyse_images(predictor, images: Sequence[Image], names: Sequence[str], sha256s: Sequence[str], *,
                   dicom: Sequence[bool] | None = None,
                   reference: OODReference | MemberReferences | None | str = "auto", batch_size: int = 16,
                   policy: str | None = None) -> list[Case]:
    """Cases of already-read images (the web app's uploads), through the one pipeline."""
    pipe = CasePipeline(predictor, reference=reference, batch_size=batch_size, policy=policy)
    return pipe.from_images(images, names, sha256s, dicom)


def analyse_paths(predictor, paths: Iterable[str | Path], *, include_identifiers: bool = False,
                  window: tuple[float, float] | None = None, keep_images: bool = True,
                  reference: OODReference | MemberReferences | None | str = "auto", batch_size: int = 16,
                  progress: Progress | None = None, policy: str | None = None) -> list[Case]:
    """Cases of files and folders (folders searched recursively), through the one pipeline.

    Raises:
        PipelineError: no image files found.
    """
    pipe = CasePipeline(predictor, reference=reference, batch_size=batch_size, policy=policy,
                        include_identifiers=include_identifiers, window=window, keep_images=keep_images)
    return list(pipe.from_paths(paths, progress=progress))


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool)


_CAM_FAMILY = ("gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "scorecam", "eigencam")


def _cam_covers_part(card) -> str | None:
    """For a few-shot model that embeds with extra backbones (Lite0 + Lite2, chosen by its support
    set) or at more input sides (``scales``), what a CAM map leaves out: it hooks the first
    backbone's layer, at the first pass through it (its own input side)."""
    fewshot = (getattr(card, "extra", None) or {}).get("fewshot") or {}
    extra, scales = fewshot.get("backbones") or [], fewshot.get("scales") or []
    if not extra and not scales:
        return None
    also = [f"embeds with {', '.join(extra)}"] if extra else []
    also += [f"runs again at {', '.join(f'{s} px' for s in scales)}"] if scales else []
    return (f"this map follows the first backbone at its own input side only; the model also {' and '.join(also)}, "
            "whose share of the decision the map does not show (LIME and occlusion cover the whole model)")


def _note_once(notes: list[str], note: str) -> None:
    log.warning("%s", note)
    if note not in notes:
        notes.append(note)


def _target_of(case: Case, fixed: int | None) -> int:
    return fixed if fixed is not None else int(case.index)


def _results(predictor, method: str, expl, scores, chunk: Sequence[Case]) -> list[MethodResult]:
    out = []
    classes = predictor.classes
    for e, s, c in zip(expl, scores, chunk):
        extras = json_safe(e.extras)
        extras.update(target=int(e.target), target_name=classes[int(e.target)])
        out.append(MethodResult(method, np.clip(to_original_frame(predictor, e.heatmap, c.image), 0, 1),
                                {k: float(v) for k, v in (s or {}).items()
                                 if _is_number(v) and k not in ("image", "target")},
                                detail=method_detail(e.extras), extras=extras))
    return out


def _span(start: int, n: int) -> str:
    """``"3"`` or ``"3–5"``: images ``start + 1 .. start + n`` in words."""
    return f"{start + 1}" if n == 1 else f"{start + 1}–{start + n}"


def explain_cases(predictor, cases: Sequence[Case], methods: Sequence[str], *, batch_size: int = 8,
                  score: bool = True, metrics: Sequence[str] = SCORE_METRICS,
                  options: Mapping[str, dict] | None = None, target: int | str | None = None,
                  progress: Progress | None = None) -> list[str]:
    """Explain each case with each method, in batches (in place: ``case.explanations``).

    Args:
        predictor: the :class:`~pellucid.core.predict.Predictor` that decided the cases.
        cases: Cases from the predict half; those with an error or no decision are left alone, and
            those whose image was released are read again from their path.
        methods: explainer names.
        batch_size: images per explainer call.
        score: compute the faithfulness ``metrics`` of every map (on the model's input).
        options: explainer options by method name (the card's presets apply underneath).
        target: class name or index to explain for every case; None explains each decided class.
        progress: ``progress(fraction, text)`` before each batch is explained, before it is scored,
            and after it is done (the text names the method and the images).

    Returns:
        Notes: methods that are unavailable or failed, and scores that could not be computed.
    """
    notes: list[str] = []
    fixed = resolve_target(target, predictor.classes)
    todo = [c for c in cases if c.index is not None and not c.error]
    for c in todo:
        if c.image is None and c.path is not None:
            c.image = read_quietly(c.path, c.window)
    if not todo or not methods:
        return notes
    from pellucid.explain.metrics import score_explanations

    options = dict(options or {})
    partial = _cam_covers_part(getattr(predictor, "card", None))
    steps = max(1, len(methods) * math.ceil(len(todo) / batch_size))
    step = 0
    for m in methods:
        for c in todo:
            c.explanations = [e for e in c.explanations if e.method != m]
        try:
            explainer = explainer_for(m, getattr(predictor, "card", None), **options.get(m, {}))
        except (KeyError, ValueError, TypeError) as err:
            notes.append(f"{m}: {err.args[0] if isinstance(err, KeyError) and err.args else err}")
            for c in todo:
                c.explanations.append(MethodResult(m, None, {}, "unavailable"))
            continue
        if partial and m in _CAM_FAMILY:
            _note_once(notes, f"{m}: {partial}")
        for i in range(0, len(todo), batch_size):
            chunk = todo[i:i + batch_size]
            if progress:  # before the (possibly long) explainer call, so a slow method is never silent
                progress(step / steps, f"{m}: explaining image {_span(i, len(chunk))} of {len(todo)}")
            x = torch.stack([predictor.preprocess(c.image) for c in chunk]).to(predictor.device)
            # An explainer can fail in many ways (no gradient at the hooked layer, a library error);
            # one failing method must not cost the user the rest of the run, so it becomes a note.
            try:
                expl = explainer.explain(predictor.model, x, [_target_of(c, fixed) for c in chunk])
            except Exception as err:  # noqa: BLE001 - see above
                reason = f"{type(err).__name__}: {str(err).splitlines()[0]}" if str(err) else type(err).__name__
                _note_once(notes, f"{m} failed: {reason}")
                # the reason travels with each row: a summary of "failed" alone had left the user guessing
                results = [MethodResult(m, None, {}, f"failed ({reason})") for _ in chunk]
            else:
                scores: list[dict] = [{} for _ in chunk]
                if score:
                    if progress:
                        progress((step + 0.5) / steps, f"{m}: scoring {_span(i, len(chunk))} of {len(todo)}")
                    try:
                        scores = list(score_explanations(predictor.model, x, expl, metrics=tuple(metrics)))
                    except Exception as err:  # noqa: BLE001 - scores are optional, same reason
                        _note_once(notes, f"{m}: faithfulness scores failed ({type(err).__name__})")
                results = _results(predictor, m, expl, scores, chunk)
            for c, r in zip(chunk, results):
                c.explanations.append(r)
            step += 1
            if progress:
                progress(step / steps, f"{m}: explained {min(i + batch_size, len(todo))} of {len(todo)}")
    return notes
