"""The pictures of a report as PNG bytes: inputs and overlays (heatmap over the image, with the lung
outline when the case has a mask, and its colour bar), scaled down to at most :data:`_THUMB` pixels, and
matplotlib charts (the decision threshold drawn on the positive class's bar only).
"""
from __future__ import annotations

import io
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from pellucid.datasets.readers import Image
from pellucid.explain.report.records import Case

__all__ = ["legend_png", "overlay_rgb"]

_THUMB = 512  # longest side of images embedded in reports, pixels


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


def _outlined(case: Case, heatmap: np.ndarray, alpha: float, outline: bool = True) -> np.ndarray:
    """The overlay of ``heatmap`` on the case's image, with the lung outline when the case has a mask
    (and ``outline`` is on)."""
    rgb = overlay_rgb(case.image, heatmap, alpha)
    if case.lung_mask is None or not outline:
        return rgb
    from pellucid.explain.overlay import draw_outline

    return draw_outline(rgb, case.lung_mask)


def legend_png(rgb: np.ndarray, legend, max_side: int = _THUMB) -> bytes:
    """An overlay (RGB uint8) shrunk to at most ``max_side`` pixels with its colour bar underneath
    (:func:`pellucid.explain.overlay.with_colorbar`; ``legend`` from :mod:`pellucid.explain.captions`), as PNG."""
    from pellucid.explain.overlay import with_colorbar

    return _png(with_colorbar(rgb, legend.high, legend.low, legend.title, max_side=max_side), max_side=1 << 16)


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


def _prob_chart(case: Case, classes: Sequence[str], threshold: float | None, positive_index: int | None = None) -> bytes:
    from pellucid.core.plots import plot_probabilities

    return _plot_png(lambda p: plot_probabilities([case.probs[c] for c in classes], classes, p, threshold=threshold,
                                                  positive_index=positive_index))
