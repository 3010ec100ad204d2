"""The faithfulness harness: golden values on a model simple enough to score by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from pellucid.explain import Explainer, Explanation, get_explainer, score_explanations, score_table
from pellucid.explain.metrics import (
    average_drop_increase,
    deletion_insertion,
    randomized_copy,
    road_scores,
    sanity_check,
    top_fraction_map,
)
from tests.explain.conftest import images_for, tiny_classifier


def sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z))


class AnalyticNet(nn.Module):
    """Logits ``[0, 4 * mean(top-left) - 4 * mean(bottom-right)]`` of the raw pixels."""

    def forward(self, x):
        h, w = x.shape[-2:]
        s = 4 * x[:, :, : h // 2, : w // 2].mean((1, 2, 3)) - 4 * x[:, :, h // 2:, w // 2:].mean((1, 2, 3))
        return torch.stack([torch.zeros_like(s), s], 1)


def quadrant_map(which: str, size: int = 64) -> np.ndarray:
    m = np.zeros((size, size), np.float32)
    h = size // 2
    if which == "tl":
        m[:h, :h] = 1
    else:
        m[h:, h:] = 1
    return m


def test_average_drop_and_increase_golden_values():
    model, x = AnalyticNet(), torch.ones(3, 3, 64, 64)
    maps = [quadrant_map("tl"), quadrant_map("br"), np.full((64, 64), 0.5, np.float32)]
    got = average_drop_increase(model, x, maps, [1, 1, 1])
    y = 0.5  # s = 0 on the all-ones image
    # Keeping the top-left (the evidence for class 1) raises confidence: s = 4.
    assert got["ad_100"][0] == pytest.approx(0.0) and got["ic_100"][0] == 100
    # Keeping only the bottom-right (evidence against): s = -4.
    assert got["ad_100"][1] == pytest.approx(100 * (y - sigmoid(-4)) / y, rel=1e-6)
    assert got["ic_100"][1] == 0
    # A flat half map halves both quadrants: s = 0, no drop, no increase.
    assert got["ad_100"][2] == pytest.approx(0.0, abs=1e-9) and got["ic_100"][2] == 0
    # 15 % kept = the first round(0.15 * 4096) = 614 (raster order) of the quadrant's 1024 pixels.
    assert got["ic_15"][0] == 100
    assert got["ad_15"][1] == pytest.approx(100 * (y - sigmoid(-4 * 614 / 1024)) / y, rel=1e-6)
    # 50 % kept: the quadrant (25 %) plus zero-valued pixels — same as the whole map.
    assert got["ad_50"][1] == pytest.approx(got["ad_100"][1])


def test_top_fraction_keeps_values_of_the_top_pixels():
    m = np.arange(16, dtype=np.float32).reshape(4, 4) / 15
    kept = top_fraction_map(m, 0.25)
    assert (kept > 0).sum() == 4
    np.testing.assert_allclose(kept[3], m[3])


def test_deletion_golden_value():
    model, x = AnalyticNet(), torch.ones(1, 3, 64, 64)
    auc, curve = deletion_insertion(model, x, [quadrant_map("tl")], [1], "deletion", steps=4, return_curves=True)
    # Removal order: top-left (25 %), then top-right, then the upper half of the bottom rows, then the rest.
    expected = [0.5, sigmoid(-4), sigmoid(-4), sigmoid(-2), 0.5]
    np.testing.assert_allclose(curve[0], expected, rtol=1e-6)
    assert auc[0] == pytest.approx(np.trapezoid(expected, dx=0.25) if hasattr(np, "trapezoid")
                                   else np.trapz(expected, dx=0.25), rel=1e-6)
    ins = deletion_insertion(model, x, [quadrant_map("tl")], [1], "insertion", steps=4)
    assert 0 <= ins[0] <= 1


def test_road_runs_and_prefers_the_right_map():
    model, x = AnalyticNet(), images_for(32, 1, seed=2)
    good = road_scores(model, x, [quadrant_map("tl", 32)], [1])
    bad = road_scores(model, x, [quadrant_map("br", 32)], [1])
    assert np.isfinite(good).all() and good[0] > bad[0]


class EdgeExplainer(Explainer):
    """Ignores the model: the map is the image's gradient magnitude."""

    name = "edge"

    def _explain(self, model, images, targets):
        g = images.mean(1)
        mag = (g[:, 1:, :-1] - g[:, :-1, :-1]).abs() + (g[:, :-1, 1:] - g[:, :-1, :-1]).abs()
        mag = torch.nn.functional.pad(mag, (0, 1, 0, 1))
        mag = mag / mag.amax((1, 2), keepdim=True).clamp_min(1e-8)
        return list(mag.numpy()), list(targets or [0] * len(images))


class BlobExplainer(Explainer):
    """Ignores model and image: a centred Gaussian blob."""

    name = "blob"

    def _explain(self, model, images, targets):
        h, w = images.shape[-2:]
        yy, xx = np.mgrid[:h, :w]
        blob = np.exp(-((yy - h / 2) ** 2 + (xx - w / 2) ** 2) / (2 * (h / 6) ** 2)).astype(np.float32)
        return [blob] * len(images), list(targets or [0] * len(images))


@pytest.fixture(scope="module")
def trained_model():
    """test_resnet trained for a few steps to find a bright square (class 1) on smooth noise."""
    torch.manual_seed(0)
    model = tiny_classifier("test_resnet")
    x = images_for(64, 96, seed=11) * 0.5
    y = torch.arange(96) % 2
    for i in range(96):
        if y[i]:
            r, c = torch.randint(0, 48, (2,)).tolist()
            x[i, :, r:r + 16, c:c + 16] = 1.0
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a net this small only loses from intra-op threads on a busy machine
    try:
        for step in range(10):
            idx = torch.randint(0, 96, (16,))
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval(), x[1::2][:4]


def test_sanity_check_fails_for_a_model_blind_map_and_passes_for_gradcam(trained_model):
    model, x = trained_model
    for blind_explainer in (EdgeExplainer(), BlobExplainer()):
        blind = sanity_check(model, blind_explainer, x, [1] * len(x))
        assert all(r["sanity_rho"] == pytest.approx(1.0) and not r["sanity_pass"] for r in blind)
    # layer2 (8x8 at 64 px): test_resnet's layer4 is 2x2 there, too coarse for a rank correlation.
    grad = sanity_check(model, get_explainer("gradcam", layer="layer2"), x, [1] * len(x))
    rhos = [r["sanity_rho"] for r in grad]
    assert np.mean(rhos) < 0.5 and sum(r["sanity_pass"] for r in grad) >= len(x) - 1, rhos


def test_randomized_copy_changes_every_weight_but_not_the_original(tiny_models):
    model = tiny_models["test_resnet"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rnd = randomized_copy(model)
    for (k, p), (_, q) in zip(model.named_parameters(), rnd.named_parameters()):
        assert torch.equal(p, before[k])
        if p.ndim > 1:  # conv and linear weights (fresh batch-norm weights are already at their init)
            assert not torch.equal(p, q), k


def test_score_explanations_rows_and_table(tiny_models):
    model = tiny_models["test_resnet"]
    x = images_for(64, 2)
    exps = get_explainer("gradcam").explain(model, x) + get_explainer("eigencam").explain(model, x)
    rows = score_explanations(model, x, exps, metrics=("ad_ic", "deletion", "insertion", "sanity"), steps=5)
    assert [r["method"] for r in rows] == ["gradcam"] * 2 + ["eigencam"] * 2
    assert [r["image"] for r in rows] == [0, 1, 0, 1]
    for r, e in zip(rows, exps):
        assert 0 <= r["deletion_auc"] <= 1 and 0 <= r["ad_100"] <= 100
        assert e.scores["deletion_auc"] == r["deletion_auc"]
        assert isinstance(r["sanity_pass"], bool)
    table = score_table(rows)
    lines = table.splitlines()
    assert lines[0].startswith("| method | images | AD 100% ↓") and "deletion ↓" in lines[0]
    assert lines[2].startswith("| gradcam | 2 |") and lines[3].startswith("| eigencam | 2 |")
    with pytest.raises(ValueError, match="explanations for 2 images"):
        score_explanations(model, x, exps[:3])
    with pytest.raises(KeyError, match="Did you mean 'deletion'"):
        score_explanations(model, x, exps, metrics=("deletoin",))


def test_explanation_scores_default_empty():
    e = Explanation(np.zeros((2, 2), np.float32), "gradcam", 0)
    assert e.scores == {} and e.extras == {}
