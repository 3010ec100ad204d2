"""Heatmap overlays: one colormap, RGB uint8, drawn at the original image's resolution.

Every overlay in pellucid (CLI, reports, web app) goes through :func:`overlay`, so all maps look the
same: the [0, 1] heatmap is resized bilinearly to the image the user gave (not the model's input
size — preprocessing squashes without cropping, so a plain resize maps it back), coloured with
:data:`COLORMAP` and blended over the image with opacity ``alpha``. For DICOM, pass the windowed
image returned by the reader.

:func:`draw_outline` draws the contour of a binary mask (the lungs, from
:mod:`pellucid.core.segmentation`) as a thin :data:`OUTLINE_COLOR` line over an image or an overlay,
also at the original resolution; ``overlay(..., outline=mask)`` does both in one call.

:func:`with_colorbar` puts a colour bar under an overlay: the :data:`COLORMAP` gradient with what its
low and high ends mean (the words come from :mod:`pellucid.explain.captions`), so a map is never shown
without its legend. Overlays narrower than ``min_width`` are first enlarged by a whole factor (nearest
neighbour, so each original pixel stays a square block) to leave the legend's text room to be read.
``save_overlay(..., legend=...)`` writes the overlay with its colour bar.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pellucid.core.fonts import font_file_for

__all__ = ["COLORMAP", "OUTLINE_COLOR", "LEGEND_MIN_WIDTH", "overlay", "save_overlay", "colorize", "resize_map",
           "mask_outline", "outline_width", "draw_outline", "colorbar_strip", "with_colorbar"]

COLORMAP = "jet"
#: RGB colour of mask outlines: magenta, which the jet colormap never produces and which stands out on
#: grey X-rays.
OUTLINE_COLOR = (255, 0, 255)
#: Overlays narrower than this (pixels) are enlarged by a whole factor before a colour bar is added.
LEGEND_MIN_WIDTH = 320
_INK = (31, 41, 51)


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


def _font(size: int, path: str | None = None):
    """The font file ``path`` (default DejaVu Sans, shipped with matplotlib) at ``size`` pixels; Pillow's own font
    where it cannot be loaded."""
    from PIL import ImageFont

    try:
        return ImageFont.truetype(path or font_file_for(""), size)
    except (OSError, ImportError):
        return ImageFont.load_default(size=size)


def _fitting_font(texts: list[str], width: int, size: int):
    """The largest font up to ``size`` (at least 8 px) in which every text fits ``width`` pixels: DejaVu Sans, or
    an installed font that has every character of the texts (a class named in Chinese or Hindi)."""
    path = font_file_for("".join(texts))
    font = _font(size, path)
    while size > 8 and max(font.getlength(t) for t in texts) > width:
        size -= 1
        font = _font(size, path)
    return font


def colorbar_strip(width: int, high: str, low: str, title: str | None = None) -> np.ndarray:
    """A legend strip ``(h, width, 3)`` uint8 on white: an optional title, the :data:`COLORMAP` gradient
    from 0 (left) to 1 (right), and under it ``low`` at the left end and ``high`` at the right end.

    Text size follows ``width`` (about a 24th of it, at least 8 px) and shrinks until every line fits;
    when ``low`` and ``high`` do not fit side by side they go on two lines.
    """
    from PIL import Image as PILImage
    from PIL import ImageDraw

    width = int(width)
    if width < 16:
        raise ValueError(f"a colour bar needs at least 16 pixels of width; got {width}")
    pad = max(2, width // 80)
    size = max(8, min(96, width // 24))
    low_t, high_t = f"◀ low: {low}", f"high: {high} ▶"
    font = _fitting_font([t for t in (title, low_t, high_t) if t], width - 2 * pad, size)
    line = int(font.size * 1.3)
    side_by_side = font.getlength(low_t) + font.getlength(high_t) + 3 * pad <= width - 2 * pad
    bar_h = max(6, font.size)
    rows = (1 if title else 0) + (1 if side_by_side else 2)
    height = pad + rows * line + bar_h + 2 * pad
    im = PILImage.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(im)
    y = pad
    if title:
        draw.text((pad, y), title, fill=_INK, font=font)
        y += line
    ramp = colorize(np.tile(np.linspace(0, 1, width - 2 * pad, dtype=np.float32), (bar_h, 1)))
    im.paste(PILImage.fromarray((ramp * 255 + 0.5).astype(np.uint8)), (pad, y))
    y += bar_h + pad
    draw.text((pad, y), low_t, fill=_INK, font=font)
    if not side_by_side:
        y += line
    draw.text((width - pad - font.getlength(high_t), y), high_t, fill=_INK, font=font)
    return np.asarray(im)


def with_colorbar(rgb: np.ndarray, high: str, low: str, title: str | None = None,
                  min_width: int = LEGEND_MIN_WIDTH, max_side: int | None = None) -> np.ndarray:
    """An overlay with its colour bar (:func:`colorbar_strip`) underneath.

    Args:
        rgb: the overlay, RGB uint8 ``(H, W, 3)`` (e.g. from :func:`overlay`).
        high / low: what the warm and cool ends of the colour map mean.
        title: the legend's title line (None: no title).
        min_width: overlays narrower than this are first enlarged by the smallest whole factor that
            reaches it (nearest neighbour).
        max_side: for display (reports, the web app): an overlay whose longer side exceeds this (or
            ``min_width``, the larger) is first shrunk to it (Lanczos), so the legend's text keeps its
            size on screen. None keeps the original resolution.

    Returns:
        RGB uint8 ``(k*H + h, k*W, 3)``: the (enlarged by ``k``) overlay on top, unchanged otherwise,
        and the legend strip of height ``h`` below.
    """
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"rgb must be an RGB uint8 (H, W, 3) overlay; got {rgb.dtype} {rgb.shape}")
    if max_side is not None and max(rgb.shape[:2]) > max(max_side, min_width):
        from PIL import Image as PILImage

        side = max(max_side, min_width)  # never shrunk below what the legend needs
        im = PILImage.fromarray(rgb)
        im.thumbnail((side, side), PILImage.Resampling.LANCZOS)
        rgb = np.asarray(im)
    k = max(1, int(np.ceil(min_width / max(rgb.shape[1], 1))))
    if k > 1:
        rgb = np.repeat(np.repeat(rgb, k, axis=0), k, axis=1)
    return np.concatenate([rgb, colorbar_strip(rgb.shape[1], high, low, title)], axis=0)


def save_overlay(path: str | Path, image, heatmap: np.ndarray, alpha: float = 0.5,
                 outline: np.ndarray | None = None, legend=None) -> Path:
    """Write :func:`overlay` (with the ``outline`` of a mask, if given) as a PNG (parent folders are
    created); returns the path.

    ``legend``: a :class:`pellucid.explain.captions.Legend` (or anything with ``title``, ``high`` and
    ``low``) adds the colour bar of :func:`with_colorbar`; None writes the bare overlay at the
    image's resolution.
    """
    from PIL import Image as PILImage

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = overlay(image, heatmap, alpha, outline)
    if legend is not None:
        rgb = with_colorbar(rgb, legend.high, legend.low, legend.title)
    PILImage.fromarray(rgb).save(path)
    return path
