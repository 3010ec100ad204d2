"""Right-for-the-right-reasons shares: in-mask and border mass of heatmaps, golden values."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pellucid.explain.base import Explanation
from pellucid.explain.lungshare import (
    border_band, border_share, in_mask_share, lung_share_scores, resolve_segmenter, summarize_shares,
)

MASK = np.zeros((10, 10), bool)
MASK[:, :5] = True  # left half


@pytest.mark.parametrize("fill, expected", [
    (lambda h: h.__setitem__((slice(2, 8), slice(1, 4)), 1.0), 1.0),    # all mass inside
    (lambda h: h.__setitem__((slice(2, 8), slice(6, 9)), 0.7), 0.0),    # all mass outside
    (lambda h: h.__setitem__((slice(None), slice(None)), 0.5), 0.5),    # uniform: half the area
    (lambda h: (h.__setitem__((0, 0), 1.0), h.__setitem__((0, 9), 3.0)), 0.25),  # 1 in, 3 out
])
def test_in_mask_share_golden(fill, expected):
    h = np.zeros((10, 10), np.float32)
    fill(h)
    assert in_mask_share(h, MASK) == pytest.approx(expected)


def test_in_mask_share_resizes_mask_and_rejects_bad_input():
    h = np.zeros((20, 20), np.float32)
    h[:, :10] = 1.0
    assert in_mask_share(h, MASK) == pytest.approx(1.0)  # 10×10 mask stretched onto the 20×20 map
    with pytest.warns(UserWarning, match="no mass"):
        assert math.isnan(in_mask_share(np.zeros((4, 4)), np.ones((4, 4), bool)))
    with pytest.raises(ValueError, match="must be 2-D"):
        in_mask_share(np.ones((2, 4, 4)), np.ones((4, 4), bool))


def test_border_share_golden():
    assert border_band((50, 50), 0.1).sum() == 50 * 50 - 40 * 40
    uniform = np.ones((50, 50))
    assert border_share(uniform, 0.1) == pytest.approx(1 - 0.64)
    centre = np.zeros((50, 50))
    centre[20:30, 20:30] = 1
    assert border_share(centre) == 0.0
    text = np.zeros((50, 50))
    text[1:3, 1:10] = 1  # burned-in label in the corner
    assert border_share(text) == 1.0
    with pytest.raises(ValueError, match="width_frac"):
        border_band((10, 10), 0.6)


def test_lung_share_scores_with_given_masks_and_summary():
    h_in = np.zeros((10, 10), np.float32)
    h_in[4:6, 1:4] = 1
    h_half = np.zeros((10, 10), np.float32)
    h_half[4:6, 3:7] = 1
    exps = [Explanation(h_in, "gradcam", 1), Explanation(h_half, "gradcam", 1)]
    rows = lung_share_scores(None, [np.zeros((10, 10))] * 2, exps, masks=[MASK, MASK])
    assert [r["lung_share"] for r in rows] == pytest.approx([1.0, 0.5])
    assert rows[0]["lung_fraction"] == 0.5 and rows[0]["lung_enrichment"] == pytest.approx(2.0)
    assert rows[1]["border_share"] == 0.0 and rows[0]["method"] == "gradcam"
    s = summarize_shares(rows)["gradcam"]
    assert s["lung_share"] == pytest.approx(0.75) and s["n"] == 2
    with pytest.raises(ValueError, match="2 images but 1 explanations"):
        lung_share_scores(None, [np.zeros((10, 10))] * 2, exps[:1], masks=[MASK])


def test_lung_share_scores_runs_a_segmenter():
    from pellucid.core.segmentation import build_unet

    torch.manual_seed(0)
    seg = build_unet((4, 8), (2,), 0).eval()
    seg.image_size = 16
    images = [np.random.default_rng(i).random((24, 24)).astype(np.float32) for i in range(2)]
    rows = lung_share_scores(seg, images, [np.ones((12, 12))] * 2)
    for r in rows:  # a uniform map's lung share is the lung area fraction
        if r["lung_fraction"] > 0:
            assert r["lung_share"] == pytest.approx(r["lung_fraction"], abs=1e-9)
        else:
            assert r["lung_share"] == 0.0


def test_resolve_segmenter_refuses_classifier_without_segmenter(tiny_model_dir):
    with pytest.raises(ValueError, match="without a segmenter"):
        resolve_segmenter(tiny_model_dir)
