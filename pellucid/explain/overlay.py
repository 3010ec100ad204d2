"""Heatmap overlays: one colormap, RGB uint8, drawn at the original image's resolution.

Every overlay in pellucid (CLI, reports, web app) goes through :func:`overlay`, so all maps look the
same: the [0, 1] heatmap is resized bilinearly to the image the user gave (not the model's input
size — preprocessing squashes without cropping, so a plain resize maps it back), coloured with
:data:`COLORMAP` and blended over the image with opacity ``alpha``. For DICOM, pass the windowed
image returned by the reader.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["COLORMAP", "overlay", "save_overlay", "colorize", "resize_map"]

COLORMAP = "jet"


def resize_map(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a ``(h, w)`` map to ``size = (H, W)``; float32, clipped to [0, 1]."""
    from PIL import Image as PILImage

    heatmap = np.asarray(heatmap, dtype=np.float32)
    if heatmap.ndim != 2:
        raise ValueError(f"heatmap must be 2-D (H, W); got shape {heatmap.shape}")
    if heatmap.shape == tuple(size):
        return np.clip(heatmap, 0, 1)
    im = PILImage.fromarray(heatmap, mode="F").resize((int(size[1]), int(size[0])), PILImage.BILINEAR)
    return np.clip(np.asarray(im, dtype=np.float32), 0, 1)


def colorize(heatmap: np.ndarray) -> np.ndarray:
    """A [0, 1] map ``(H, W)`` → RGB float32 ``(H, W, 3)`` in [0, 1] with :data:`COLORMAP`."""
    from matplotlib import colormaps

    return colormaps[COLORMAP](np.clip(heatmap, 0, 1))[..., :3].astype(np.float32)


def _as_rgb_float(image) -> np.ndarray:
    arr = image.array if hasattr(image, "array") and hasattr(image, "meta") else image
    if hasattr(arr, "detach"):  # a (3, H, W) tensor
        arr = arr.detach().cpu().numpy()
        if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[2] not in (1, 3):
            arr = arr.transpose(1, 2, 0)
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ValueError(f"image must be (H, W), (H, W, 1|3|4) or a (3, H, W) tensor; got shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255.0
    else:
        arr = arr.astype(np.float32)
        if arr.size and (arr.min() < -1e-3 or arr.max() > 1 + 1e-3):
            raise ValueError(f"float image must be in [0, 1]; got range [{arr.min():.3g}, {arr.max():.3g}]")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.clip(arr, 0, 1)


def overlay(image, heatmap: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a heatmap over an image at the image's resolution.

    Args:
        image: the original image: ``(H, W)``, ``(H, W, C)`` float in [0, 1] or uint8, a reader
            ``Image``, or a ``(3, H, W)`` tensor.
        heatmap: ``(h, w)`` map in [0, 1] (any resolution; resized to ``(H, W)``).
        alpha: heatmap opacity in [0, 1] (0: the image only, 1: the heatmap only).

    Returns:
        RGB uint8 array ``(H, W, 3)``.
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1]; got {alpha}")
    rgb = _as_rgb_float(image)
    heat = colorize(resize_map(heatmap, rgb.shape[:2]))
    out = (1 - alpha) * rgb + alpha * heat
    return np.clip(out * 255 + 0.5, 0, 255).astype(np.uint8)


def save_overlay(path: str | Path, image, heatmap: np.ndarray, alpha: float = 0.5) -> Path:
    """Write :func:`overlay` as a PNG (parent folders are created); returns the path."""
    from PIL import Image as PILImage

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray(overlay(image, heatmap, alpha)).save(path)
    return path
