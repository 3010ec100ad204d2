"""The folder summary of a report (several inputs): the prediction table, counts, metrics with intervals and
a confusion matrix when labels are known from the folder layout, per-class galleries of the most and
least confident cases (explained here, in batches), SP-LIME picks and the mean lung / border shares per
explainer.
"""
from __future__ import annotations

import logging
import warnings
from typing import Any, Sequence

import numpy as np
import torch

from pellucid.explain.base import to_original_frame
from pellucid.explain.report.card import metric_rows
from pellucid.explain.pipeline import explain_cases
from pellucid.explain.report.figures import _outlined, _plot_png, _png
from pellucid.explain.report.lungs import _share_summary, attach_lung_masks
from pellucid.explain.report.privacy import _read
from pellucid.explain.report.records import Case, Progress

__all__ = ["SPLIME_LIME_SAMPLES", "SPLIME_SAMPLE", "folder_summary", "select_gallery"]

log = logging.getLogger(__name__)

#: SP-LIME in folder reports: LIME runs on at most this many inputs, with this many perturbations each.
SPLIME_SAMPLE = 16
SPLIME_LIME_SAMPLES = 300

_TABLE_ROWS = 500  # summary-table rows shown in a report (the CSV has all)


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


def folder_summary(predictor, cases: Sequence[Case], ok: Sequence[Case], notes: list[str], *,
                   methods: Sequence[str], alpha: float, detail_limit: int, gallery_size: int,
                   splime_per_class: int, csv_name: str | None, progress: Progress | None, segmenter,
                   outline: bool) -> dict:
    """The ``summary`` section of :func:`~.context.build_context` (same arguments; ``ok`` are the
    readable, predicted cases). Notes from the explainers and the segmenter are appended to ``notes``.
    """
    classes = predictor.classes
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
    return summary
