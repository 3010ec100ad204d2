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


# ----------------------------------------------------------------------------- colour bars
def _jet_ends() -> tuple[np.ndarray, np.ndarray]:
    return tuple(np.round(colorize(np.array([[v]]))[0, 0] * 255) for v in (0.0, 1.0))


def _has_colour_bar(strip: np.ndarray) -> bool:
    lo, hi = _jet_ends()
    return any(np.abs(row[8].astype(float) - lo).max() < 30 and np.abs(row[-9].astype(float) - hi).max() < 30
               for row in strip)


def test_with_colorbar_puts_the_legend_under_the_map():
    from pellucid.explain.overlay import LEGEND_MIN_WIDTH, with_colorbar

    rgb = overlay(np.random.default_rng(0).random((60, 80), dtype=np.float32), np.eye(8, dtype=np.float32))
    out = with_colorbar(rgb, "more influence on “tb”", "less influence", "Grad-CAM: influence on “tb”")
    k = -(-LEGEND_MIN_WIDTH // 80)  # enlarged by a whole factor, each pixel a k x k block
    assert out.dtype == np.uint8 and out.shape[1] == 80 * k and out.shape[0] > 60 * k
    np.testing.assert_array_equal(out[: 60 * k: k, :: k], rgb)
    assert _has_colour_bar(out[60 * k:]) and not _has_colour_bar(out[: 60 * k])
    # the strip has text (dark ink) besides the bar
    strip = out[60 * k:]
    assert ((strip < 80).all(axis=2) & ~(strip[..., 2] > 100)).sum() > 50
    big = overlay(np.zeros((400, 900), np.float32), np.eye(8, dtype=np.float32))
    wide = with_colorbar(big, "high", "low")
    assert wide.shape[1] == 900 and np.array_equal(wide[:400], big)
    shrunk = with_colorbar(big, "high", "low", max_side=300)
    assert shrunk.shape[1] == LEGEND_MIN_WIDTH  # shrunk for display, but never below what the legend needs
    with pytest.raises(ValueError, match="RGB uint8"):
        with_colorbar(np.zeros((4, 4)), "h", "l")


def test_colorbar_strip_fits_long_words_on_two_lines():
    from pellucid.explain.overlay import colorbar_strip

    one = colorbar_strip(600, "more", "less")
    two = colorbar_strip(200, "more influence on “a very long class name indeed”", "less influence")
    assert one.shape[1] == 600 and two.shape[1] == 200
    assert two.shape[0] > colorbar_strip(200, "more", "less").shape[0]  # low and high on their own lines
    with pytest.raises(ValueError, match="16 pixels"):
        colorbar_strip(10, "h", "l")


def test_save_overlay_with_legend(tmp_path):
    from pellucid.explain.captions import legend_for

    path = save_overlay(tmp_path / "x.png", np.zeros((400, 500, 3), np.float32), np.ones((8, 8), np.float32),
                        legend=legend_for("lime", "tb"))
    with PILImage.open(path) as im:
        arr = np.asarray(im.convert("RGB"))
    assert arr.shape[1] == 500 and arr.shape[0] > 400 and _has_colour_bar(arr[400:])


# ----------------------------------------------------------------------------- plain words
def test_legends_say_what_high_and_low_mean():
    from pellucid.explain.captions import legend_for

    assert legend_for("gradcam", "tb").high == "more influence on “tb”"
    assert legend_for("gradcam", "tb").low == "less influence"
    lime = legend_for("lime", "tb")
    assert "evidence for “tb”" in lime.high and "neutral or against" in lime.low
    assert "hiding this lowers" in legend_for("occlusion", "tb").high
    assert legend_for("ttame").title.startswith("T-TAME")


@pytest.mark.parametrize("scores, confidence, expected", [
    ({"deletion_auc": 0.986}, 0.99, "lowered the model's confidence slowly: this map is a weak guide"),
    ({"deletion_auc": 0.1}, 0.9, "fall quickly: the map points at what the model used"),
    ({"deletion_auc": 0.45}, 0.9, "only gradually"),
    ({"insertion_auc": 0.85}, 0.9, "brought the confidence back quickly"),
    ({"insertion_auc": 0.1}, 0.9, "brought little of the confidence back"),
    ({"ad_50": 0.0}, None, "cost 0% of the confidence: that half holds almost all"),
    ({"ad_50": 80.0}, None, "lies largely outside the highlighted half"),
    ({"road": 0.2}, None, "as a faithful map should"),
    ({"road": -0.1}, None, "not borne out"),
    ({"sanity_pass": False}, None, "barely changed when the model's weights were randomised"),
])
def test_score_sentences(scores, confidence, expected):
    from pellucid.explain.captions import score_sentences

    out = score_sentences(scores, confidence)
    assert len(out) == 1 and expected in out[0]


def test_score_sentences_of_a_model_that_ignores_the_image():
    """Flat curves (a model whose confidence does not move) never read as a faithful map."""
    from pellucid.explain.captions import score_sentences

    out = score_sentences({"deletion_auc": 0.5, "insertion_auc": 0.505, "ad_50": 2.0}, confidence=0.5)
    assert "weak guide" in out[0] and "did no better than removing them" in out[1]
    assert "the model barely reacts to what is hidden" in out[2]
    good = score_sentences({"deletion_auc": 0.1, "insertion_auc": 0.8, "ad_50": 2.0}, confidence=0.9)
    assert "fall quickly" in good[0] and "back quickly" in good[1] and "almost all of the evidence" in good[2]


def test_score_sentences_skip_missing_and_nan():
    from pellucid.explain.captions import score_sentences

    assert score_sentences({}) == [] and score_sentences({"deletion_auc": float("nan")}) == []


def test_map_notes_blank_nearly_blank_border_and_lungs():
    from pellucid.explain.captions import map_notes

    blank = map_notes("occlusion", np.zeros((50, 50)), "tb")
    assert len(blank) == 1 and blank[0].startswith("This map is blank")
    assert "barely changed when patches were hidden" in blank[0]
    assert "no region's features raised the score" in map_notes("gradcam", np.zeros((5, 5)), "tb")[0]
    speck = np.zeros((100, 100))
    speck[50, 50] = 1.0
    assert map_notes("occlusion", speck, "tb")[0].startswith("This map is nearly blank")
    centre = np.zeros((100, 100))
    centre[30:70, 30:70] = 1.0
    assert map_notes("gradcam", centre, "tb") == []
    frame = np.zeros((100, 100))
    frame[:5] = frame[-5:] = 1.0
    notes = map_notes("gradcam", frame, "tb")
    assert len(notes) == 1 and "outer edge" in notes[0] and notes[0].startswith("100%")
    lungs = np.zeros((100, 100), bool)
    lungs[20:80, 10:40] = lungs[20:80, 60:90] = True
    between = np.zeros((100, 100))
    between[20:80, 45:55] = 1.0  # the mediastinum: inside the image, outside the lungs
    assert map_notes("gradcam", between, "tb") == []
    notes = map_notes("gradcam", between, "tb", lung_mask=lungs)
    assert len(notes) == 1 and notes[0].startswith("Only 0% of this map falls inside the lungs")
    assert map_notes("gradcam", np.where(lungs, 1.0, 0.0), "tb", lung_mask=lungs) == []


def test_read_explanation_gathers_the_words():
    from pellucid.core.pipeline import MethodResult
    from pellucid.explain.captions import read_explanation, reading_dict

    r = MethodResult("lime", np.zeros((20, 20), np.float32), {"deletion_auc": 0.9, "ad_50": 5.0},
                     detail="passes in float32", extras={"target_name": "tb"})
    reading = read_explanation(r, confidence=0.95)
    assert reading.title == "LIME" and "evidence for “tb”" in reading.caption
    assert reading.sentence.startswith("LIME hid random patches")
    assert len(reading.scores) == 2 and reading.notes[0].startswith("This map is blank")
    details = dict(reading.details)
    assert details["method"] == "lime" and details["deletion AUC ↓"] == "0.900"
    assert details["drop with top 50% kept ↓"] == "5.0%" and details["computed"] == "passes in float32"
    d = reading_dict(reading)
    assert d["legend"]["high"] == "strong evidence for “tb”" and d["scores_text"] == reading.scores
