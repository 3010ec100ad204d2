"""Overlays: one colormap, original resolution, RGB uint8."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from pellucid.explain import overlay, save_overlay
from pellucid.explain.overlay import colorize


@pytest.mark.parametrize("image", [
    np.random.default_rng(0).random((100, 80, 3), dtype=np.float32),
    np.random.default_rng(1).random((100, 80), dtype=np.float32),
    (np.random.default_rng(2).random((100, 80, 1)) * 255).astype(np.uint8),
])
def test_overlay_at_original_resolution(image):
    heat = np.zeros((64, 64), np.float32)
    heat[:32, :32] = 1
    out = overlay(image, heat, alpha=0.5)
    assert out.shape == (100, 80, 3) and out.dtype == np.uint8
    # The hot quadrant lands in the top-left of the original frame.
    hot = colorize(np.ones((1, 1)))[0, 0]
    top_left = out[:40, :30].astype(float) / 255
    assert np.abs(top_left - (0.5 * hot + 0.5 * top_left.mean())).mean() < 0.3


def test_alpha_extremes_and_tensor_input():
    img = torch.rand(3, 20, 30)
    heat = np.linspace(0, 1, 20 * 30, dtype=np.float32).reshape(20, 30)
    np.testing.assert_array_equal(overlay(img, heat, alpha=0.0),
                                  np.clip(img.permute(1, 2, 0).numpy() * 255 + 0.5, 0, 255).astype(np.uint8))
    np.testing.assert_array_equal(overlay(img, heat, alpha=1.0),
                                  np.clip(colorize(heat) * 255 + 0.5, 0, 255).astype(np.uint8))
    with pytest.raises(ValueError, match="alpha"):
        overlay(img, heat, alpha=2)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        overlay(np.full((4, 4, 3), 7.0, np.float32), heat)


def test_save_overlay_writes_png(tmp_path):
    path = save_overlay(tmp_path / "sub" / "x.png", np.zeros((50, 70, 3), np.float32), np.ones((8, 8), np.float32))
    with PILImage.open(path) as im:
        assert im.size == (70, 50) and im.mode == "RGB"


# ----------------------------------------------------------------------------- mask outlines
def _disc(shape=(60, 70), centre=(30, 30), r=18) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= r * r


def test_draw_outline_only_on_the_mask_boundary():
    from scipy import ndimage

    from pellucid.explain.overlay import OUTLINE_COLOR, draw_outline, mask_outline

    img = np.random.default_rng(0).integers(0, 256, (60, 70, 3), dtype=np.uint8)
    mask = _disc()
    out = draw_outline(img, mask, width=1)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert out is not img and not np.shares_memory(out, img)
    changed = (out != img).any(axis=2)
    edge = mask_outline(mask)
    assert edge.any() and not (changed & ~edge).any()  # nothing but the boundary changes
    assert np.all(out[edge] == OUTLINE_COLOR)
    inside = ndimage.binary_erosion(mask)  # strictly inside: every 4-neighbour is in the mask
    np.testing.assert_array_equal(out[inside], img[inside])
    np.testing.assert_array_equal(out[~mask], img[~mask])
    # every boundary pixel is a mask pixel next to the outside, and every such pixel is drawn
    np.testing.assert_array_equal(edge, mask & ~inside)


def test_draw_outline_width_resize_and_inputs():
    from pellucid.explain.overlay import OUTLINE_COLOR, draw_outline, mask_outline, outline_width

    mask = _disc()
    thick = mask_outline(mask, width=3)
    assert (thick & ~mask).sum() == 0 and thick.sum() > mask_outline(mask).sum()
    with pytest.raises(ValueError, match="at least 1"):
        mask_outline(mask, width=0)
    with pytest.raises(ValueError, match="2-D"):
        draw_outline(np.zeros((60, 70, 3), np.uint8), np.ones((2, 60, 70), bool))
    # a mask at another resolution (same field of view) is resized onto the image: size is kept
    big = np.zeros((120, 140), np.float32)
    out = draw_outline(big, _disc())
    assert out.shape == (120, 140, 3) and (out == OUTLINE_COLOR).all(axis=2).any()
    # a mask that fills the frame has no boundary inside the image; an empty mask draws nothing
    img = np.full((20, 20, 3), 0.5, np.float32)
    ref = draw_outline(img, np.zeros((20, 20), bool))
    np.testing.assert_array_equal(draw_outline(img, np.ones((20, 20), bool)), ref)
    assert (ref == 128).all()
    assert outline_width((256, 256)) == 1 and outline_width((2048, 1500)) == 4


def test_overlay_with_outline_is_overlay_then_outline(tmp_path):
    from pellucid.explain.overlay import draw_outline

    img = np.random.default_rng(3).random((60, 70), dtype=np.float32)
    heat = np.random.default_rng(4).random((16, 16)).astype(np.float32)
    mask = _disc()
    both = overlay(img, heat, 0.4, outline=mask)
    np.testing.assert_array_equal(both, draw_outline(overlay(img, heat, 0.4), mask))
    path = save_overlay(tmp_path / "o.png", img, heat, 0.4, outline=mask)
    np.testing.assert_array_equal(np.asarray(PILImage.open(path)), both)
