"""Lung masks in reports: which lung segmenter applies to a model (the card's, or one given for a chest
X-ray model), segmenting the cases, and where each explanation's mass falls (lung share, lung area,
border share; :mod:`pellucid.explain.lungshare`), per overlay and as means per explainer.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Sequence

import torch

from pellucid.core.card import ModelCard, as_card
from pellucid.explain.captions import share_items
from pellucid.explain.report.records import Case, ReportError

__all__ = ["attach_lung_masks", "lung_segmenter_for", "share_items"]

log = logging.getLogger(__name__)


def _is_cxr(card: ModelCard | dict) -> bool:
    return str(as_card(card).modality or "").upper() == "CXR"


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
    card = as_card(predictor.card)
    if lung_segmenter is None:
        masker = getattr(predictor, "masker", None)
        if masker is not None:
            return masker.model, Path(masker.folder).name if masker.folder else "the model's segmenter"
        if not card.segmenter:
            return None, None
        lung_segmenter = predictor.folder
    elif not _is_cxr(card):
        raise ReportError(f"a lung segmenter outlines chest X-rays; this model's modality is "
                          f"{card.modality or 'not stated'} ({card.task}): leave the segmenter out")
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
