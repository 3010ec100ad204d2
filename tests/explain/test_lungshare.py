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


def test_mask_shares_golden_and_empty_map():
    from pellucid.explain.lungshare import mask_shares

    h = np.zeros((10, 10), np.float32)
    h[4:6, 3:7] = 1
    r = mask_shares(h, MASK)
    assert r == {"lung_share": pytest.approx(0.5), "border_share": 0.0, "lung_fraction": 0.5,
                 "lung_enrichment": pytest.approx(1.0), "empty": False}
    e = mask_shares(np.zeros((10, 10)), MASK)  # no warning here: callers name the map
    assert e["empty"] and math.isnan(e["lung_share"]) and math.isnan(e["border_share"])
    assert e["lung_fraction"] == 0.5


def test_empty_maps_are_counted_not_averaged_as_nan():
    """Regression: one all-zero Grad-CAM map (a decision resting on the head's bias) made the mean
    lung share of the lung-masked TB model NaN."""
    h = np.zeros((10, 10), np.float32)
    h[4:6, 1:4] = 1
    exps = [Explanation(h, "gradcam", 1), Explanation(np.zeros((10, 10), np.float32), "gradcam", 1)]
    with pytest.warns(UserWarning, match=r"explanation 1 \(gradcam\) is an all-zero map") as rec:
        rows = lung_share_scores(None, [np.zeros((10, 10))] * 2, exps, masks=[MASK, MASK])
    assert len(rec) == 1  # one warning per empty map, not one per share
    assert [r["empty"] for r in rows] == [False, True] and math.isnan(rows[1]["lung_share"])
    s = summarize_shares(rows)["gradcam"]
    assert s["lung_share"] == 1.0 and s["lung_fraction"] == 0.5 and s["border_share"] == 0.0
    assert s["n"] == 2 and s["n_empty"] == 1
    everything_empty = summarize_shares([rows[1]])["gradcam"]
    assert math.isnan(everything_empty["lung_share"]) and everything_empty["n_empty"] == 1


@pytest.fixture(scope="module")
def bias_driven_folder(tmp_path_factory):
    """A tiny classifier whose 'lesion' score comes only from the head's bias: no location of the
    (non-negative) CAM layer raises it, so Grad-CAM of 'lesion' is all zero, like two images of the
    lung-masked TB model (runs/tblungs-mask)."""
    from pellucid.core.modelfolder import save_model
    from tests.explain.conftest import tiny_classifier

    model = tiny_classifier("test_resnet")
    with torch.no_grad():
        w = model.head.weight.abs() + 0.01
        model.head.weight.copy_(torch.stack([w[0], -w[1]]))
        model.head.bias.copy_(torch.tensor([0.0, 50.0]))
    spec = model.spec
    card = {"kind": "classifier", "task": "toy-lungs", "classes": ["normal", "lesion"], "positive_class": "lesion",
            "modality": "CXR", "backbone": spec.to_dict(),
            "preprocessing": {"image_size": 64, "channels_in": 3, "resize": "squash", "input_range": [0.0, 1.0],
                              "mean": list(spec.mean), "std": list(spec.std)},
            "threshold": {}, "calibration": {}}
    return save_model(tmp_path_factory.mktemp("bias_model"), model, card)


def test_explain_paths_flags_empty_maps_and_writes_finite_means(bias_driven_folder, tmp_path, caplog):
    import json
    import logging

    from pellucid.explain.run import explain_paths
    from tests.ui.helpers import bright_segmenter, write_lungs_png

    files = [write_lungs_png(tmp_path / "in" / f"x{i}.png", seed=i) for i in range(2)]
    seg = bright_segmenter()
    with caplog.at_level(logging.WARNING, logger="pellucid.explain.run"):
        rows = explain_paths(bias_driven_folder, files, ["gradcam"], out_dir=tmp_path / "lesion", score=True,
                             metrics=("ad_ic",), lung_segmenter=seg)
    assert [r["target_name"] for r in rows] == ["lesion", "lesion"]  # decided by the bias
    assert all(r["heatmap_empty"] and math.isnan(r["lung_share"]) for r in rows)
    assert all(0 < r["lung_fraction"] < 1 for r in rows)
    assert sum("x0.png" in m and "all zero" in m for m in caplog.messages) == 1
    record = json.loads((tmp_path / "lesion" / "x0.json").read_text())
    assert record["explanations"][0]["heatmap"]["empty"] is True
    summary = json.loads((tmp_path / "lesion" / "lung_shares.json").read_text())["gradcam"]
    assert summary["n"] == 2 and summary["n_empty"] == 2

    rows = explain_paths(bias_driven_folder, files, ["gradcam"], "normal", out_dir=tmp_path / "normal",
                         score=True, metrics=("ad_ic",), lung_segmenter=seg)
    assert not any(r["heatmap_empty"] for r in rows)
    summary = json.loads((tmp_path / "normal" / "lung_shares.json").read_text())["gradcam"]
    assert summary["n_empty"] == 0 and all(math.isfinite(summary[k]) for k in ("lung_share", "border_share"))
    # the overlays carry the lung outline
    from PIL import Image as PILImage

    from pellucid.explain.overlay import OUTLINE_COLOR

    png = np.asarray(PILImage.open(rows[0]["overlay"]))
    k = png.shape[1] // 80  # enlarged by a whole factor for the colour bar's text, the bar underneath
    assert png.shape[1] == 80 * k and png.shape[0] > 80 * k and (png[:80 * k] == OUTLINE_COLOR).all(axis=2).any()


def test_lung_crop_maps_are_placed_in_the_lungs_box():
    """A lung-crop model's map covers the lungs' box: it goes back into that box of the original
    image, zero elsewhere; other models' maps are left as they are."""
    from types import SimpleNamespace

    from pellucid.datasets.readers import Image
    from pellucid.explain.base import to_original_frame

    image = Image(np.zeros((100, 80, 3), np.float32), {})
    crop = SimpleNamespace(crops_input=True,
                           masker=lambda im: Image(np.zeros((40, 30, 3), np.float32), {"lung_box": [10, 20, 50, 50]}))
    out = to_original_frame(crop, np.ones((16, 16), np.float32), image)
    assert out.shape == (100, 80)
    assert out[10:50, 20:50].min() == pytest.approx(1.0) and out.sum() == pytest.approx(40 * 30)
    heat = np.random.default_rng(0).random((16, 16)).astype(np.float32)
    np.testing.assert_array_equal(to_original_frame(SimpleNamespace(crops_input=False), heat, image), heat)
    no_lungs = SimpleNamespace(crops_input=True, masker=lambda im: Image(im.array, {}))  # empty mask: whole image
    np.testing.assert_array_equal(to_original_frame(no_lungs, heat, image), heat)


def test_lung_crop_models_explain_and_report_end_to_end(tmp_path):
    import json

    from PIL import Image as PILImage

    from pellucid.cli import main
    from tests.ui.helpers import tiny_masked_model_folder, tiny_segmenter_folder, write_lungs_png

    seg = tiny_segmenter_folder(tmp_path / "seg")
    model = tiny_masked_model_folder(tmp_path / "model", seg)
    card = json.loads((model / "card.json").read_text())
    card["preprocessing"]["preprocess"] = "lung-crop"
    (model / "card.json").write_text(json.dumps(card, indent=1))
    image = write_lungs_png(tmp_path / "cxr.png")
    assert main(["explain", "--model", str(model), "--method", "gradcam", "--out", str(tmp_path / "e"), str(image)]) == 0
    overlay = next((tmp_path / "e").glob("*_gradcam.png"))
    (w, h), (w0, h0) = PILImage.open(overlay).size, PILImage.open(image).size
    assert w % w0 == 0 and h > h0 * (w // w0)  # the original frame (enlarged by a whole factor) + colour bar
    assert main(["report", "--model", str(model), "--methods", "gradcam", "--out", str(tmp_path / "r"), str(image)]) == 0
