"""Right for the right reasons: how much of an explanation falls inside the lungs, or on the border.

A chest X-ray classifier that looks at burned-in text, markers, the collimation edge or the
hospital's layout can score well and still be useless elsewhere (DeGrave et al., "AI for
radiographic COVID-19 detection selects shortcuts over signal", Nature Machine Intelligence 2021).
This module measures that per image: :func:`in_mask_share` is the share of a heatmap's mass inside
a lung mask, :func:`border_share` the share in the image's outer band (where text and markers sit),
and :func:`lung_share_scores` segments the images with a lung segmenter
(:mod:`pellucid.core.segmentation`) and scores a batch of explanations. :func:`summarize_shares`
averages them per explainer. Compare ``lung_share`` with ``lung_fraction`` (the share a uniform map
would get): a model that looks at the lungs lands well above it.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["in_mask_share", "border_share", "border_band", "lung_share_scores", "summarize_shares",
           "resolve_segmenter"]


def _mass(heatmap: np.ndarray) -> np.ndarray:
    h = np.asarray(heatmap, dtype=np.float64)
    if h.ndim != 2:
        raise ValueError(f"heatmap must be 2-D (H, W), got shape {h.shape}")
    return np.clip(np.nan_to_num(h, nan=0.0), 0.0, None)


def _resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    mask = np.asarray(mask, dtype=bool)
    if mask.shape == tuple(shape):
        return mask
    import cv2

    return cv2.resize(mask.astype(np.uint8), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST).astype(bool)


def in_mask_share(heatmap: np.ndarray, mask: np.ndarray) -> float:
    """Share of the heatmap's mass inside ``mask``.

    Args:
        heatmap: ``(H, W)`` in [0, 1] (negative values count as 0).
        mask: ``(h, w)`` bool; resized (nearest) to the heatmap's size when they differ, which is
            right when both cover the same field of view (squash resizing).

    Returns:
        A float in [0, 1]; NaN with a warning for an all-zero heatmap (the share is undefined).
    """
    h = _mass(heatmap)
    total = h.sum()
    if total <= 0:
        warnings.warn("heatmap has no mass: in-mask share undefined (NaN)", stacklevel=2)
        return math.nan
    return float(h[_resize_mask(mask, h.shape)].sum() / total)


def border_band(shape: tuple[int, int], width_frac: float = 0.08) -> np.ndarray:
    """Boolean ``shape`` mask of the outer band, ``width_frac`` of each side wide (at least one pixel)."""
    if not 0 < width_frac < 0.5:
        raise ValueError(f"width_frac must be in (0, 0.5), got {width_frac}")
    h, w = shape
    dy, dx = max(1, int(round(width_frac * h))), max(1, int(round(width_frac * w)))
    band = np.zeros((h, w), dtype=bool)
    band[:dy] = band[-dy:] = True
    band[:, :dx] = band[:, -dx:] = True
    return band


def border_share(heatmap: np.ndarray, width_frac: float = 0.08) -> float:
    """Share of the heatmap's mass in the image's outer band (see :func:`border_band`)."""
    h = _mass(heatmap)
    return in_mask_share(h, border_band(h.shape, width_frac))


def resolve_segmenter(model_or_folder):
    """A loaded segmenter from a segmentation module, a segmentation folder, or a classifier folder
    whose card names one (``card['preprocessing']['segmenter']`` or ``card['recipe']['segmenter']``)."""
    import torch

    if isinstance(model_or_folder, torch.nn.Module):
        return model_or_folder
    from pellucid.core.modelfolder import load_model, read_card

    folder = Path(model_or_folder)
    card = read_card(folder)
    if card.get("kind") != "segmentation":
        ref = (card.get("preprocessing") or {}).get("segmenter") or (card.get("recipe") or {}).get("segmenter")
        if not ref:
            raise ValueError(f"{folder} is a {card.get('kind', 'classifier')!r} model without a segmenter; give a "
                             "segmentation model folder (pellucid train tb-lungseg) to score lung shares")
        folder = Path(ref) if Path(ref).is_absolute() else (folder / ref if (folder / ref).exists() else Path(ref))
    return load_model(folder)[0]


def lung_share_scores(model_or_segmenter_folder, images: Sequence, explanations: Sequence, *,
                      masks: Sequence[np.ndarray] | None = None, width_frac: float = 0.08) -> list[dict]:
    """Per-image lung and border shares of explanations.

    Args:
        model_or_segmenter_folder: a segmenter (module or folder), or a classifier folder whose card
            references one; ignored when ``masks`` are given.
        images: the explained images (:class:`~pellucid.datasets.readers.Image` or arrays), one per
            explanation.
        explanations: :class:`~pellucid.explain.base.Explanation` objects or ``(H, W)`` heatmaps.
        masks: precomputed lung masks (skip segmentation).
        width_frac: width of the border band.

    Returns:
        One dict per image: ``index``, ``method``, ``lung_share``, ``border_share``,
        ``lung_fraction`` (area share of the lungs: a uniform map's lung share), ``lung_enrichment``
        (``lung_share / lung_fraction``; > 1 means the map prefers the lungs).
    """
    if len(images) != len(explanations):
        raise ValueError(f"{len(images)} images but {len(explanations)} explanations: give one per image")
    if masks is None:
        from pellucid.core.segmentation import segment_many

        masks = segment_many(resolve_segmenter(model_or_segmenter_folder), list(images))
    rows = []
    for i, (e, m) in enumerate(zip(explanations, masks)):
        heat = np.asarray(getattr(e, "heatmap", e))
        mask = _resize_mask(m, heat.shape)
        frac = float(mask.mean())
        share = in_mask_share(heat, mask)
        rows.append({"index": i, "method": getattr(e, "method", None), "lung_share": share,
                     "border_share": border_share(heat, width_frac), "lung_fraction": frac,
                     "lung_enrichment": share / frac if frac > 0 else math.nan})
    return rows


def summarize_shares(rows: Sequence[dict]) -> dict:
    """Mean ``lung_share``, ``border_share``, ``lung_fraction``, ``lung_enrichment`` per method (NaN-aware)."""
    out: dict = {}
    for method in dict.fromkeys(r.get("method") for r in rows):
        sel = [r for r in rows if r.get("method") == method]
        out[method or "all"] = {
            k: float(np.nanmean([r[k] for r in sel])) if any(np.isfinite(r[k]) for r in sel) else math.nan
            for k in ("lung_share", "border_share", "lung_fraction", "lung_enrichment")} | {"n": len(sel)}
    return out
