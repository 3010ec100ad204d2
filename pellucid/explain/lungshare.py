"""Right for the right reasons: how much of an explanation falls inside the lungs, or on the border.

A chest X-ray classifier that looks at burned-in text, markers, the collimation edge or the
hospital's layout can score well and still be useless elsewhere (DeGrave et al., "AI for
radiographic COVID-19 detection selects shortcuts over signal", Nature Machine Intelligence 2021).
This module measures that per image: :func:`in_mask_share` is the share of a heatmap's mass inside
a lung mask, :func:`border_share` the share in the image's outer band (where text and markers sit),
and :func:`lung_share_scores` segments the images with a lung segmenter
(:mod:`pellucid.core.segmentation`) and scores a batch of explanations. :func:`summarize_shares`
averages them per explainer. Compare ``lung_share`` with ``lung_fraction`` (the share a uniform map
would get): a model that looks at the lungs lands well above it. :func:`mask_shares` scores one map
against one mask (reports and the web app use it).

An all-zero map has no mass, so its shares are undefined: they are NaN and the row says
``empty=True``. This happens, for instance, when Grad-CAM finds no location whose features raise the
explained class's score (the decision then rests on the head's bias, not on anything in the image).
Such maps are counted (``n_empty``) and left out of the means, never averaged in as NaN.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["in_mask_share", "border_share", "border_band", "lung_share_scores", "summarize_shares",
           "resolve_segmenter", "mask_shares", "SHARE_KEYS"]

#: the per-map values :func:`mask_shares` and :func:`lung_share_scores` return (besides ``empty``)
SHARE_KEYS = ("lung_share", "border_share", "lung_fraction", "lung_enrichment")


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
    whose card names one (``card.preprocessing.segmenter`` or ``card.recipe['segmenter']``)."""
    import torch

    if isinstance(model_or_folder, torch.nn.Module):
        return model_or_folder
    from pellucid.core.modelfolder import load_model, read_card

    folder = Path(model_or_folder)
    card = read_card(folder)
    if card.kind != "segmentation":
        ref = card.segmenter
        if not ref:
            raise ValueError(f"{folder} is a {card.kind!r} model without a segmenter; give a "
                             "segmentation model folder (pellucid train tb-lungseg) to score lung shares")
        folder = Path(ref) if Path(ref).is_absolute() else (folder / ref if (folder / ref).exists() else Path(ref))
    return load_model(folder)[0]


def mask_shares(heatmap: np.ndarray, mask: np.ndarray, width_frac: float = 0.08) -> dict:
    """Lung share, border share, lung area fraction and enrichment of one map against one lung mask.

    Args:
        heatmap: ``(H, W)`` map (negative values count as 0).
        mask: lung mask at any resolution covering the same field of view (resized, nearest).
        width_frac: width of the border band.

    Returns:
        ``lung_share``, ``border_share``, ``lung_fraction``, ``lung_enrichment`` and ``empty``
        (True for a map without mass, whose shares are NaN; no warning is issued here, the caller
        says which map was empty).
    """
    heat = _mass(heatmap)
    mask = _resize_mask(mask, heat.shape)
    frac = float(mask.mean())
    total = float(heat.sum())
    if total <= 0:
        return {"lung_share": math.nan, "border_share": math.nan, "lung_fraction": frac,
                "lung_enrichment": math.nan, "empty": True}
    share = float(heat[mask].sum() / total)
    border = float(heat[border_band(heat.shape, width_frac)].sum() / total)
    return {"lung_share": share, "border_share": border, "lung_fraction": frac,
            "lung_enrichment": share / frac if frac > 0 else math.nan, "empty": False}


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
        (``lung_share / lung_fraction``; > 1 means the map prefers the lungs) and ``empty`` (an
        all-zero map: its shares are NaN, with one warning naming it).
    """
    if len(images) != len(explanations):
        raise ValueError(f"{len(images)} images but {len(explanations)} explanations: give one per image")
    if masks is None:
        from pellucid.core.segmentation import segment_many

        masks = segment_many(resolve_segmenter(model_or_segmenter_folder), list(images))
    rows = []
    for i, (e, m) in enumerate(zip(explanations, masks)):
        method = getattr(e, "method", None)
        r = mask_shares(np.asarray(getattr(e, "heatmap", e)), m, width_frac)
        if r["empty"]:
            what = f"explanation {i}" + (f" ({method})" if method else "")
            warnings.warn(f"{what} is an all-zero map (no location raises the explained class's score): its "
                          "in-mask and border shares are undefined (NaN) and left out of the means", stacklevel=2)
        rows.append({"index": i, "method": method, **r})
    return rows


def summarize_shares(rows: Sequence[dict]) -> dict:
    """Per method: mean ``lung_share``, ``border_share``, ``lung_fraction``, ``lung_enrichment``
    over the maps that have mass (so ``lung_share`` and ``lung_fraction`` compare the same images);
    ``n`` (all rows) and ``n_empty`` (all-zero maps, left out of the means; the means are NaN when
    every map is empty)."""
    out: dict = {}
    for method in dict.fromkeys(r.get("method") for r in rows):
        sel = [r for r in rows if r.get("method") == method]
        scored = [r for r in sel if not r.get("empty", not np.isfinite(r["lung_share"]))]
        means = {}
        for k in SHARE_KEYS:
            vals = [float(r[k]) for r in scored if k in r and np.isfinite(r[k])]
            means[k] = float(np.mean(vals)) if vals else math.nan
        out[method or "all"] = means | {"n": len(sel), "n_empty": len(sel) - len(scored)}
    return out
