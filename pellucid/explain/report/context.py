"""The one description of a report: :func:`build_context` turns cases and the model card into a plain dict
that every renderer reads (the HTML of :mod:`.html`, and the PDF of :mod:`.pdf`, which prints that HTML
or lays the same dict out with fpdf2). Its sections: title, intended use and notes; ``card_rows`` /
``card_metrics`` (model card text); ``cases``, one full section per input up to ``detail_limit``
(probabilities, figures as PNG bytes, overlays with their colour bars, plain-language readings
(:mod:`pellucid.explain.captions`), scores and lung shares, metadata); ``how_to_read``; and
``summary`` for several inputs (table rows, metrics, galleries, SP-LIME, lung shares; :mod:`.summary`).
"""
from __future__ import annotations

import datetime as _dt
from typing import Any, Sequence

import pellucid
from pellucid.core.card import as_card
from pellucid.explain.report.card import _fmt, card_rows, intended_use, metric_rows, threshold_text
from pellucid.explain.captions import (
    HOW_TO_READ_ITEMS, burned_in_caveat, read_case_result, reading_dict, score_items, share_items,
)
from pellucid.explain.report.figures import _outlined, _png, _prob_chart, legend_png
from pellucid.explain.report.lungs import attach_lung_masks
from pellucid.explain.report.records import Case, Progress
from pellucid.explain.report.summary import folder_summary

__all__ = ["build_context"]


def _overlay_item(case: Case, r, alpha: float, outline: bool) -> dict:
    """One explanation of a case: its picture with colour bar, the plain words of
    :mod:`pellucid.explain.captions` (sentence, score sentences, notes) and the technical details."""
    item = {"method": r.method, "note": r.note, "detail": r.detail, "scores": score_items(r.scores), "shares": []}
    reading = read_case_result(case, r)
    item.update(reading_dict(reading))
    if r.heatmap is not None and case.image is not None:
        item["png"] = legend_png(_outlined(case, r.heatmap, alpha, outline), reading.legend)
    if r.heatmap is not None and case.lung_mask is not None:
        item["shares"] = share_items(r.heatmap, case.lung_mask)
    return item


def _case_context(case: Case, classes: Sequence[str], threshold: float | None, alpha: float,
                  include_identifiers: bool, outline: bool = True, positive_index: int | None = None) -> dict:
    ctx: dict[str, Any] = {"name": case.name, "sha256": case.sha256, "error": case.error,
                           "label": case.label, "true_label": case.true_label, "is_dicom": case.is_dicom}
    if case.error or not case.probs:
        return ctx
    top = case.label
    if case.withheld:  # the domain policy withholds labels of flagged inputs: the report says so
        ctx["label"] = "withheld (out of domain)"
    ctx["probs"] = [(c, case.probs[c], c == top) for c in classes]
    ctx["prob_png"] = _prob_chart(case, classes, threshold, positive_index)
    if case.image is not None:
        ctx["input_png"] = _png(case.image.array)
    ctx["overlays"] = [_overlay_item(case, r, alpha, outline) for r in case.explanations]
    if case.ood is not None:
        ctx["ood"] = {"flagged": case.ood.flagged, "uncertain": case.ood.uncertain, "text": case.ood.summary(),
                      "method": case.ood.method,
                      "scores": [(k, _fmt(v)) for k, v in case.ood.scores.items()]}
    ctx["burned_in"] = burned_in_caveat(case.meta)
    meta = dict(case.meta)
    if case.window is not None:
        meta["window"] = f"centre {case.window[0]:g}, width {case.window[1]:g} (chosen)"
    ctx["meta"] = [(k, "; ".join(map(str, v)) if isinstance(v, list) else str(v)) for k, v in meta.items()]
    ctx["identifiers"] = sorted(case.identifiers.items()) if include_identifiers else []
    return ctx


def build_context(predictor, cases: Sequence[Case], *, methods: Sequence[str] = (), alpha: float = 0.5,
                  include_identifiers: bool = False, detail_limit: int = 8, gallery_size: int = 3,
                  splime_per_class: int = 0, notes: Sequence[str] = (), csv_name: str | None = None,
                  title: str | None = None, progress: Progress | None = None, segmenter=None,
                  segmenter_name: str | None = None, outline: bool = True) -> dict:
    """Everything a report shows, as a plain dict that both renderers read.

    Up to ``detail_limit`` cases get a full section each; more cases get a folder summary with
    galleries (whose explanations are computed here, in batches) and, when ``splime_per_class`` > 0,
    SP-LIME picks. With a lung ``segmenter`` (see :func:`~.lungs.lung_segmenter_for`), explained cases get
    their lung mask (kept on the case), overlays show the lung outline and the lung / border shares,
    and the folder summary their means per explainer; cases that already carry a ``lung_mask`` show
    it even without a segmenter. ``outline=False`` keeps the shares but draws no outline.
    """
    card = as_card(predictor.card)
    classes = predictor.classes
    ok = [c for c in cases if not c.error and c.probs]
    notes = list(notes)
    ctx: dict[str, Any] = {
        "title": title or f"pellucid report — {card.title or card.task}",
        "generated": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "version": pellucid.__version__,
        "intended_use": intended_use(card),
        "card_rows": card_rows(card),
        "card_metrics": metric_rows(card.metrics),
        "card_metrics_n": card.metrics.get("n"),
        "threshold": threshold_text(card),
        "methods": list(methods),
        "alpha": alpha,
        "include_identifiers": include_identifiers,
        "cases": [],
        "summary": None,
        "lung_segmenter": None,
        "how_to_read": list(HOW_TO_READ_ITEMS),
    }
    if segmenter is not None:
        notes.extend(n for n in attach_lung_masks(segmenter, [c for c in ok if c.explanations]) if n not in notes)
    threshold = predictor.threshold if len(classes) == 2 else None
    positive = getattr(predictor, "positive_index", None) if threshold is not None else None
    if len(cases) > 1:
        ctx["summary"] = folder_summary(predictor, cases, ok, notes, methods=methods, alpha=alpha,
                                        detail_limit=detail_limit, gallery_size=gallery_size,
                                        splime_per_class=splime_per_class, csv_name=csv_name,
                                        progress=progress, segmenter=segmenter, outline=outline)
    if len(cases) <= detail_limit:
        ctx["cases"] = [_case_context(c, classes, threshold, alpha, include_identifiers, outline, positive)
                        for c in cases]
    if any(c.lung_mask is not None for c in ok):
        ctx["lung_segmenter"] = segmenter_name or "lung segmenter"
    ctx["outline"] = bool(outline and ctx["lung_segmenter"])
    burned = sum(1 for c in ok if burned_in_caveat(c.meta))
    if burned and len(cases) > 1:  # one case says it beside its pictures; a folder's galleries say it here
        notes.append(f"{burned} of the {len(cases)} images say text is burned into their pixels (DICOM Burned In "
                     "Annotation YES): the pictures of them here may show patients' names or other identifiers — "
                     "check them before sharing this report.")
    ctx["notes"] = notes
    ctx["ood_method"] = next((c.ood.method for c in ok if c.ood), None)
    return ctx
