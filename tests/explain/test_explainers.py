"""Every registered explainer on two tiny backbones, plus the behaviour the protocol promises."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pellucid.explain import ExplanationError, get_explainer, list_explainers
from pellucid.explain.base import explainer_class, gradient_free_explainers
from pellucid.explain.metrics import deletion_insertion
from tests.explain.conftest import BACKBONES, FAST_OPTIONS, NoGradProbe, images_for, tiny_classifier

from tests.explain.helpers import assert_same, snapshot

# Trainable explainers (T-TAME) need fit() first; their own tests cover them.
READY = [n for n in list_explainers() if not explainer_class(n).trainable]

def test_registry_lists_the_methods():
    assert set(list_explainers()) >= {"gradcam", "gradcam++", "xgradcam", "layercam", "scorecam", "eigencam",
                                      "hirescam", "lime", "occlusion"}
    assert {"lime", "occlusion", "eigencam"} <= set(gradient_free_explainers())


@pytest.mark.parametrize("backbone", list(BACKBONES))
@pytest.mark.parametrize("method", READY)
def test_every_explainer_on_tiny_backbones(method, backbone):
    size = BACKBONES[backbone]
    model = tiny_classifier(backbone)
    # Leave the model in an unusual state: training mode, one frozen block, one stale gradient.
    model.train()
    first = next(model.parameters())
    first.requires_grad_(False)
    model.head.weight.grad = torch.ones_like(model.head.weight)
    before = snapshot(model)
    x = images_for(size, 2)
    exps = get_explainer(method, **FAST_OPTIONS.get(method, {})).explain(model, x, targets=[1, 0])
    assert len(exps) == 2
    for e, t in zip(exps, [1, 0]):
        assert e.heatmap.shape == (size, size)
        assert e.heatmap.dtype == np.float32
        assert not np.isnan(e.heatmap).any()
        assert e.heatmap.min() >= 0 and e.heatmap.max() <= 1
        assert e.method == method and e.target == t
    assert_same(before, snapshot(model))


def test_predicted_class_is_the_default_target(tiny_models):
    model = tiny_models["test_resnet"]
    x = images_for(64, 3)
    with torch.no_grad():
        predicted = model(x).argmax(1).tolist()
    assert [e.target for e in get_explainer("gradcam").explain(model, x)] == predicted


def test_score_cam_draws_no_progress_bar_of_its_own(tiny_models, capfd):
    """pytorch-grad-cam's Score-CAM drew a tqdm bar per batch under `pellucid explain`'s own one."""
    capfd.readouterr()
    result = get_explainer("scorecam", batch_size=16).explain(tiny_models["test_resnet"], images_for(64, 2))
    assert len(result) == 2 and all(r.heatmap is not None for r in result)
    printed = capfd.readouterr()
    assert "it/s" not in printed.err and "%|" not in printed.err, printed.err[:200]


def test_lean_gradcam_matches_pytorch_grad_cam(tiny_models):
    model = tiny_models["test_resnet"]
    x = images_for(64, 3, seed=1)
    fast = get_explainer("gradcam").explain(model, x, [0, 1, 1])
    slow = get_explainer("gradcam", fast=False).explain(model, x, [0, 1, 1])
    for a, b in zip(fast, slow):
        np.testing.assert_allclose(a.heatmap, b.heatmap, atol=1e-4)


def test_frozen_backbone_still_explains_and_stays_frozen(tiny_models):
    model = tiny_models["test_resnet"]
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    try:
        for method in ("gradcam", "gradcam++"):
            exps = get_explainer(method).explain(model, images_for(64, 2), [1, 1])
            assert all(e.heatmap.max() > 0 for e in exps)
        assert not any(p.requires_grad for p in model.backbone.parameters())
    finally:
        for p in model.backbone.parameters():
            p.requires_grad_(True)


@pytest.mark.parametrize("method", [n for n in READY if explainer_class(n).needs_gradients])
def test_no_gradient_gives_a_clear_error(method, tiny_models):
    probe = NoGradProbe(tiny_models["test_resnet"]).eval()
    hooks_before = [len(m._forward_hooks) for m in probe.modules()]
    with pytest.raises(ExplanationError) as err:
        get_explainer(method).explain(probe, images_for(64, 2))
    msg = str(err.value)
    assert "no gradient reaches" in msg and "backbone.net.layer4" in msg
    for name in ("lime", "occlusion", "eigencam"):
        assert name in msg
    assert hooks_before == [len(m._forward_hooks) for m in probe.modules()]
    # ... and the gradient-free ones do work on it.
    assert get_explainer("eigencam").explain(probe, images_for(64, 1))[0].heatmap.max() > 0


def test_layer_override_and_typo(tiny_models):
    model = tiny_models["test_resnet"]
    x = images_for(64, 1)
    e = get_explainer("gradcam", layer="layer3").explain(model, x)[0]
    assert e.extras["layer"] == "backbone.net.layer3"
    e = get_explainer("gradcam", layer="backbone.net.layer2").explain(model, x)[0]
    assert e.extras["layer"] == "backbone.net.layer2"
    with pytest.raises(KeyError, match="Did you mean 'backbone.net.layer4'"):
        get_explainer("gradcam", layer="backbone.net.layr4").explain(model, x)


def test_threshold_zeroes_the_weak_part(tiny_models):
    model = tiny_models["test_resnet"]
    x = images_for(64, 1, seed=3)
    plain = get_explainer("gradcam").explain(model, x, [1])[0].heatmap
    cut = get_explainer("gradcam", threshold=0.5).explain(model, x, [1])[0].heatmap
    np.testing.assert_array_equal(cut == 0, plain <= 0.5)
    np.testing.assert_allclose(cut[plain > 0.5], (plain[plain > 0.5] - 0.5) / 0.5, atol=1e-5)
    with pytest.raises(ValueError, match="threshold"):
        get_explainer("gradcam", threshold=1.5)


def test_one_logit_binary_model():
    model = tiny_classifier("test_resnet", num_classes=1)
    x = images_for(64, 2)
    pos = get_explainer("gradcam").explain(model, x, [1, 1])
    neg = get_explainer("gradcam").explain(model, x, [0, 0])
    assert all(e.heatmap.shape == (64, 64) for e in pos + neg)
    # Class 0 is explained through -logit: where class 1 has evidence, class 0 has none.
    assert not np.allclose(pos[0].heatmap, neg[0].heatmap)
    with pytest.raises(ValueError, match="out of range"):
        get_explainer("gradcam").explain(model, x, [2, 0])


class TinyEnsemble(nn.Module):
    def __init__(self, members, weights):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.weights = list(weights)

    def forward(self, x):
        probs = sum(w * torch.softmax(m(x), 1) for m, w in zip(self.members, self.weights)) / sum(self.weights)
        return torch.log(probs)


def test_ensemble_combines_member_maps_with_weights():
    a, b = tiny_classifier("test_resnet", seed=1), tiny_classifier("shallow_cnn", seed=2)
    x = images_for(64, 2)
    only_a = get_explainer("gradcam").explain(TinyEnsemble([a, b], [1.0, 0.0]), x, [1, 0])
    direct = get_explainer("gradcam").explain(a, x, [1, 0])
    for e, d in zip(only_a, direct):
        np.testing.assert_allclose(e.heatmap, d.heatmap, atol=1e-5)
    both = get_explainer("gradcam").explain(TinyEnsemble([a, b], [0.5, 0.5]), x)
    assert both[0].extras["layer"] == ["backbone.net.layer4", "backbone.net.block3"]
    # Model-agnostic explainers see the ensemble as one model.
    assert get_explainer("occlusion", mask_size=16).explain(TinyEnsemble([a, b], [0.5, 0.5]), x[:1])[0].heatmap.shape == (64, 64)


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_a_model_averaging_views_is_explained_view_by_view_and_turned_back(method):
    """A dihedral test-time-view model cannot tell an image from its turned copy, and neither can its
    map: the map of the turned image is the turned map (exactly, because each view's map is turned back
    before averaging). One network pass alone does not have that property; T-TAME refuses in one line."""
    from pellucid.core.views import ViewAverage

    net = tiny_classifier("test_resnet", num_classes=3, seed=3)
    model = ViewAverage(net, "dihedral").eval()
    x = images_for(64, 2, seed=4)
    turned = torch.rot90(x, 1, (2, 3)).flip(-1)
    maps = [np.stack([e.heatmap for e in get_explainer(method).explain(m, t)])
            for m in (model, net) for t in (x, turned)]
    expect = np.rot90(maps[0], 1, (1, 2))[..., ::-1]
    np.testing.assert_allclose(maps[1], expect, atol=1e-5)
    assert np.abs(maps[3] - np.rot90(maps[2], 1, (1, 2))[..., ::-1]).max() > 0.05
    targets = [e.target for e in get_explainer(method).explain(model, x)]
    with torch.no_grad():  # the explained class is the averaged model's, not one view's
        assert targets == model(x).argmax(1).tolist()
    with pytest.raises(ExplanationError, match="averages 8 turned or mirrored views"):
        get_explainer("ttame").explain(model, x)


def test_inference_tensors_and_bad_inputs(tiny_models):
    model = tiny_models["test_resnet"]
    with torch.inference_mode():
        x = images_for(64, 1)
    assert get_explainer("gradcam").explain(model, x)[0].heatmap.shape == (64, 64)
    with torch.inference_mode():
        with pytest.raises(ExplanationError, match="inference_mode"):
            get_explainer("gradcam").explain(model, x)
        assert get_explainer("eigencam").explain(model, x)[0].heatmap.max() > 0  # needs no autograd
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        get_explainer("gradcam").explain(model, images_for(64, 1) * 255)
    with pytest.raises(ValueError, match="targets"):
        get_explainer("gradcam").explain(model, images_for(64, 2), [0, 1, 1])


@pytest.mark.parametrize("method, min_share", [("gradcam", 0.95), ("hirescam", 0.95), ("occlusion", 0.8),
                                               ("lime", 0.8)])
def test_evidence_in_the_known_quadrant(method, min_share, quadrant_net):
    x = images_for(64, 2, seed=5)
    options = {"layer": "gate"} if method in ("gradcam", "hirescam") else {}
    if method == "lime":
        # Black hiding: the toy model is linear in the pixels, so lime's mean-colour hiding would
        # leave its output unchanged.
        options = {"num_samples": 200, "n_segments": 64, "compactness": 30, "hide_color": 0.0}
    exps = get_explainer(method, **options).explain(quadrant_net, x)
    assert [e.target for e in exps] == [1, 1]
    for e in exps:
        share = e.heatmap[:32, :32].sum() / e.heatmap.sum()
        assert share > min_share, share
    maps = [e.heatmap for e in exps]
    good = deletion_insertion(quadrant_net, x, maps, [1, 1], "deletion", steps=10)
    inverted = deletion_insertion(quadrant_net, x, [1 - m for m in maps], [1, 1], "deletion", steps=10)
    assert (good < inverted).all(), (good, inverted)
