"""Heatmap overlays: one colormap, RGB uint8, drawn at the original image's resolution.

Every overlay in pellucid (CLI, reports, web app) goes through :func:`overlay`, so all maps look the
same: the [0, 1] heatmap is resized bilinearly to the image the user gave (not the model's input
size — preprocessing squashes without cropping, so a plain resize maps it back), coloured with
:data:`COLORMAP` and blended over the image with opacity ``alpha``. For DICOM, pass the windowed
image returned by the reader.

:func:`draw_outline` draws the contour of a binary mask (the lungs, from
:mod:`pellucid.core.segmentation`) as a thin :data:`OUTLINE_COLOR` line over an image or an overlay,
also at the original resolution; ``overlay(..., outline=mask)`` does both in one call.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["COLORMAP", "OUTLINE_COLOR", "overlay", "save_overlay", "colorize", "resize_map", "mask_outline",
           "outline_width", "draw_outline"]

COLORMAP = "jet"
#: RGB colour of mask outlines: magenta, which the jet colormap never produces and which stands out on
#: grey X-rays.
OUTLINE_COLOR = (255, 0, 255)


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


def _resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W); got shape {mask.shape}")
    mask = mask.astype(bool)
    if mask.shape == tuple(size):
        return mask
    from PIL import Image as PILImage

    im = PILImage.fromarray(mask.astype(np.uint8) * 255).resize((int(size[1]), int(size[0])), PILImage.NEAREST)
    return np.asarray(im) > 127


def outline_width(size: tuple[int, int]) -> int:
    """Default line width in pixels for an image of ``size = (H, W)``: 1 px up to 512 px, then
    growing with the image, so the line survives the downscaling of reports and the browser."""
    return max(1, int(np.ceil(max(size) / 512)))


def mask_outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """The boundary of a binary mask: a bool ``(H, W)`` map of the mask's own pixels that touch the
    outside (``skimage.segmentation.find_boundaries``, ``mode="inner"``), thickened inwards to
    ``width`` pixels. Pixels outside the mask are never part of it, nor is the image's edge (a mask
    that touches the frame is not outlined along the frame).
    """
    from skimage.morphology import dilation, disk
    from skimage.segmentation import find_boundaries

    mask = np.asarray(mask).astype(bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W); got shape {mask.shape}")
    if width < 1:
        raise ValueError(f"outline width must be at least 1 pixel; got {width}")
    edge = find_boundaries(mask, connectivity=1, mode="inner")
    if width > 1 and edge.any():
        edge = dilation(edge, disk(width - 1)).astype(bool) & mask
    return edge


def draw_outline(image, mask: np.ndarray, color: tuple[int, int, int] = OUTLINE_COLOR,
                 width: int | None = None) -> np.ndarray:
    """Draw the outline of ``mask`` onto an image or an overlay.

    Args:
        image: RGB uint8 ``(H, W, 3)`` (e.g. from :func:`overlay`), or anything :func:`overlay`
            accepts as an image.
        mask: ``(h, w)`` binary mask; resized (nearest) to ``(H, W)`` when its size differs, which is
            right when both cover the same field of view.
        color: RGB colour of the line (default :data:`OUTLINE_COLOR`).
        width: line width in pixels, inside the mask; None picks :func:`outline_width`.

    Returns:
        A new RGB uint8 array ``(H, W, 3)``: the image with the boundary pixels set to ``color``,
        every other pixel unchanged.
    """
    arr = np.asarray(image)
    if arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3:
        out = arr.copy()
    else:
        out = np.clip(_as_rgb_float(image) * 255 + 0.5, 0, 255).astype(np.uint8)
    edge = mask_outline(_resize_mask(mask, out.shape[:2]), width or outline_width(out.shape[:2]))
    out[edge] = np.asarray(color, dtype=np.uint8)
    return out


def overlay(image, heatmap: np.ndarray, alpha: float = 0.5, outline: np.ndarray | None = None) -> np.ndarray:
    """Blend a heatmap over an image at the image's resolution.

    Args:
        image: the original image: ``(H, W)``, ``(H, W, C)`` float in [0, 1] or uint8, a reader
            ``Image``, or a ``(3, H, W)`` tensor.
        heatmap: ``(h, w)`` map in [0, 1] (any resolution; resized to ``(H, W)``).
        alpha: heatmap opacity in [0, 1] (0: the image only, 1: the heatmap only).
        outline: optional binary mask (e.g. the lungs) whose outline is drawn over the blend
            (see :func:`draw_outline`).

    Returns:
        RGB uint8 array ``(H, W, 3)``.
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1]; got {alpha}")
    rgb = _as_rgb_float(image)
    heat = colorize(resize_map(heatmap, rgb.shape[:2]))
    out = np.clip(((1 - alpha) * rgb + alpha * heat) * 255 + 0.5, 0, 255).astype(np.uint8)
    return out if outline is None else draw_outline(out, outline)


def save_overlay(path: str | Path, image, heatmap: np.ndarray, alpha: float = 0.5,
                 outline: np.ndarray | None = None) -> Path:
    """Write :func:`overlay` (with the ``outline`` of a mask, if given) as a PNG (parent folders are
    created); returns the path."""
    from PIL import Image as PILImage

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray(overlay(image, heatmap, alpha, outline)).save(path)
    return path
