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
