"""T-TAME: loss terms (golden values), the attention module, fitting with the classifier frozen,
a toy model whose evidence sits in one quadrant, and the model-folder round trip."""
from __future__ import annotations

import argparse
import json
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from pellucid.core.modelfolder import load_model, save_model
from pellucid.explain import ExplanationError, get_explainer
from pellucid.explain.base import explainer_class
from pellucid.explain.metrics import deletion_insertion, score_explanations
from pellucid.explain.ttame import (
    WEIGHTS_FILE,
    LossWeights,
    TTAME,
    TTAMEAttention,
    area_loss,
    default_tap_layers,
    load_ttame,
    masked_ce_loss,
    run_cli,
    ttame_loss,
    variation_loss,
)
from tests.explain.conftest import BACKBONES, NoGradProbe, QuadrantNet, images_for, tiny_classifier

from tests.explain.helpers import assert_same, snapshot

FAST = {"epochs": 1, "batch_size": 8}


# --------------------------------------------------------------------------- loss terms
M1 = [[0.0, 1.0], [1.0, 1.0]]  # mean 0.75; one vertical and one horizontal jump of 1
M2 = [[0.25, 0.25], [0.25, 0.25]]  # mean 0.25, flat


@pytest.mark.parametrize("power, expected", [(1.0, 0.5), (0.5, 0.6830127), (0.3, 0.7885344)])
def test_area_loss_golden(power, expected):
    masks = torch.tensor([M1, M2])
    assert area_loss(masks, power).item() == pytest.approx(expected, abs=1e-6)
    assert area_loss(masks[:, None], power).item() == pytest.approx(expected, abs=1e-6)  # (B, 1, h, w) too


@pytest.mark.parametrize("masks, expected", [
    ([M1, M2], 0.5),                  # M1: 0.5 (vertical) + 0.5 (horizontal); M2: 0
    ([[[0.0, 0.5, 1.0]]], 0.25),      # one row: only horizontal steps of 0.5
    ([[[0.0], [1.0]]], 1.0),          # one column: one vertical step of 1
    ([[[0.3]]], 0.0),                 # one pixel
])
def test_variation_loss_golden(masks, expected):
    assert variation_loss(torch.tensor(masks)).item() == pytest.approx(expected, abs=1e-7)


def test_masked_ce_golden():
    assert masked_ce_loss(torch.tensor([[2.0, 0.0]]), torch.tensor([0])).item() == pytest.approx(0.1269280, abs=1e-6)
    assert masked_ce_loss(torch.tensor([[0.0]]), torch.tensor([1])).item() == pytest.approx(0.6931472, abs=1e-6)
    assert masked_ce_loss(torch.tensor([[3.0]]), torch.tensor([0])).item() == pytest.approx(3.0485874, abs=1e-6)


def test_ttame_loss_golden_and_weights():
    total, parts = ttame_loss(torch.tensor([[2.0, 0.0]]), torch.tensor([0]), torch.tensor([M1]))
    assert parts["ce"].item() == pytest.approx(0.1269280, abs=1e-6)
    assert parts["area"].item() == pytest.approx(0.75 ** 0.3, abs=1e-6)
    assert parts["tv"].item() == pytest.approx(1.0, abs=1e-6)
    assert total.item() == pytest.approx(2.0350215, abs=1e-6)  # 1.5 ce + 2 area + 0.01 tv
    total, _ = ttame_loss(torch.tensor([[2.0, 0.0]]), torch.tensor([0]), torch.tensor([M1]),
                          LossWeights(ce=1.0, area=0.0, tv=1.0, area_power=1.0))
    assert total.item() == pytest.approx(1.1269280, abs=1e-6)
    with pytest.raises(ValueError, match="area"):
        LossWeights(area=-1.0)
    with pytest.raises(ValueError, match="masks"):
        area_loss(torch.zeros(2, 3, 4, 4))


# --------------------------------------------------------------------------- the module
def test_attention_forward_equals_the_concat_form():
    torch.manual_seed(0)
    att = TTAMEAttention([4, 6, 8], n_classes=3, layers=["a", "b", "c"])
    with torch.no_grad():  # non-trivial batch-norm statistics
        for b in att.branches:
            b.bn.running_mean.uniform_(-1, 1)
            b.bn.running_var.uniform_(0.5, 2)
    att.eval()
    feats = [torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4), torch.randn(2, 8, 2, 2)]
    out = att(feats)
    assert out.shape == (2, 3, 8, 8)
    assert out.min() > 0 and out.max() < 1
    torch.testing.assert_close(out, att.forward_concat(feats), atol=1e-6, rtol=1e-5)
    with pytest.raises(ExplanationError, match="another model"):
        att([torch.randn(2, 5, 8, 8), feats[1], feats[2]])


def test_default_taps_come_from_the_backbone_spec():
    model = tiny_classifier("test_resnet")
    assert default_tap_layers(model) == ["backbone.net.layer2", "backbone.net.layer3", "backbone.net.layer4"]
    with pytest.raises(ExplanationError, match="layers="):
        default_tap_layers(nn.Sequential(nn.Conv2d(3, 2, 1)))


def test_registered_as_a_trainable_explainer():
    assert explainer_class("ttame") is TTAME and TTAME.trainable
    with pytest.raises(TypeError, match="Did you mean 'epochs'"):
        get_explainer("ttame", epoch=3)


# --------------------------------------------------------------------------- fitting
@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_fit_leaves_the_classifier_bit_identical_and_maps_are_valid(backbone):
    size = BACKBONES[backbone]
    model = tiny_classifier(backbone)
    # An unusual state that must survive: training mode, one frozen tensor, one stale gradient.
    model.train()
    next(model.parameters()).requires_grad_(False)
    model.head.weight.grad = torch.ones_like(model.head.weight)
    before = snapshot(model)
    explainer = get_explainer("ttame", **FAST).fit(model, images_for(size, 16, seed=1))
    assert_same(before, snapshot(model))
    assert explainer.fit_info["train_images"] + explainer.fit_info["val_images"] == 16

    x = images_for(size, 3, seed=2)
    exps = explainer.explain(model, x, targets=[1, 0, 1])
    assert_same(before, snapshot(model))
    for e, t in zip(exps, [1, 0, 1]):
        assert e.heatmap.shape == (size, size) and e.heatmap.dtype == np.float32
        assert not np.isnan(e.heatmap).any()
        assert e.heatmap.min() >= 0 and e.heatmap.max() <= 1
        assert e.method == "ttame" and e.target == t
        assert e.extras["layers"] == default_tap_layers(model)
    model.eval()
    with torch.no_grad():
        predicted = model(x).argmax(1).tolist()
    assert [e.target for e in explainer.explain(model, x)] == predicted
    raw = get_explainer("ttame", normalize=False)
    raw.attention = explainer.attention
    for e in raw.explain(model, x):
        lo, hi = e.extras["raw_range"]
        assert 0 < lo <= e.heatmap.min() + 1e-6 and e.heatmap.max() <= hi + 1e-6 < 1  # the sigmoid map itself


class StrongQuadrantNet(QuadrantNet):
    """:class:`QuadrantNet` (class-1 evidence only in the top-left quadrant) with logits far enough
    apart that hiding it costs more cross-entropy than the area term saves: class 1 =
    16 · mean(gated features) − 4, class 0 = 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.gate(torch.relu(self.conv(x))).mean(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(s), 16 * s - 4], dim=1)


def test_fitted_toy_model_puts_its_map_mass_in_the_evidence_quadrant():
    net = StrongQuadrantNet().eval()
    explainer = get_explainer("ttame", layers=["conv", "gate"], epochs=20, batch_size=8, lr=0.03, patience=20)
    explainer.fit(net, images_for(32, 48, seed=0))
    x = images_for(32, 6, seed=7)
    exps = explainer.explain(net, x)
    assert [e.target for e in exps] == [1] * 6
    for e in exps:
        share = e.heatmap[:16, :16].sum() / e.heatmap.sum()
        assert share > 0.9, share
    maps = [e.heatmap for e in exps]
    good = deletion_insertion(net, x, maps, [1] * 6, "deletion", steps=10)
    inverted = deletion_insertion(net, x, [1 - m for m in maps], [1] * 6, "deletion", steps=10)
    assert (good < inverted).all(), (good, inverted)


def test_fit_refuses_a_model_without_input_gradients():
    probe = NoGradProbe(tiny_classifier("test_resnet")).eval()
    with pytest.raises(ExplanationError, match="does not depend on its input"):
        get_explainer("ttame", **FAST).fit(probe, images_for(64, 4))


# --------------------------------------------------------------------------- model folder
def _toy_folder(path, model):
    card = {"kind": "classifier", "task": "toy-ttame", "classes": ["a", "b"], "backbone": {"name": "test_resnet"},
            "preprocessing": {"image_size": 64}, "note": "kept"}
    save_model(path, model, card)
    return path


def test_unfitted_model_gets_a_clear_error(tmp_path):
    model = tiny_classifier("test_resnet")
    with pytest.raises(ExplanationError, match="pellucid fit-explainer ttame --model DIR"):
        get_explainer("ttame").explain(model, images_for(64, 1))
    folder = _toy_folder(tmp_path / "m", model)
    with pytest.raises(ExplanationError, match=f"pellucid fit-explainer ttame --model {folder}"):
        get_explainer("ttame", folder=str(folder)).explain(model, images_for(64, 1))


def test_a_damaged_ttame_file_is_one_line_and_builds_nothing_from_its_config(tmp_path):
    """A hand-made or damaged ``ttame.safetensors`` ended in a JSON, key, type or safetensors traceback, and a
    config asking for 10**9 channels had the attention allocate before its weights were read (4e18 bytes
    asked for). Each is now one line naming the file and saying how to refit; nothing is built from the config
    but what the file's own tensors fill."""
    from safetensors.torch import save_file

    folder = tmp_path / "m"
    folder.mkdir()
    path = folder / WEIGHTS_FILE
    configs = {"not JSON": "{", "nested too deep": "[" * 100_000 + "]" * 100_000, "a list": "[]", "no channels": "{}",
               "text channels": json.dumps({"channels": "x", "n_classes": 2}),
               "huge": json.dumps({"channels": [10**9], "n_classes": 10**6, "layers": ["a"]})}
    for what, meta in configs.items():
        save_file({"w": torch.zeros(1)}, str(path), metadata={"pellucid_ttame": meta})
        with pytest.raises(ExplanationError, match="damaged|does not match its own config") as err:
            load_ttame(folder)
        message = str(err.value)
        assert "\n" not in message and str(path) in message and f"--model {folder}" in message, what
    path.write_bytes(b"\x10\0\0\0\0\0\0\0{")  # cut short
    with pytest.raises(ExplanationError, match="is damaged \\(SafetensorError\\)"):
        load_ttame(folder)


def test_save_and_load_round_trip_with_the_model_folder(tmp_path):
    model = tiny_classifier("test_resnet")
    folder = _toy_folder(tmp_path / "m", model)
    fitted = get_explainer("ttame", **FAST).fit(model, images_for(64, 12, seed=3), folder=folder)
    assert (folder / WEIGHTS_FILE).is_file()
    card = json.loads((folder / "card.json").read_text())
    entry = card["explainers_fitted"]["ttame"]
    assert card["note"] == "kept" and card["classes"] == ["a", "b"]  # read-modify-write
    assert entry["file"] == WEIGHTS_FILE and entry["n_classes"] == 2 and entry["layers"] == default_tap_layers(model)
    assert entry["train_images"] == fitted.fit_info["train_images"] and "model_sha256" in entry

    loaded = load_ttame(folder)
    for k, v in fitted.attention.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k

    reloaded, _ = load_model(folder)
    x = images_for(64, 3, seed=4)
    want = fitted.explain(model, x)
    got = get_explainer("ttame", folder=str(folder)).explain(reloaded, x)
    for a, b in zip(want, got):
        assert a.target == b.target
        np.testing.assert_allclose(a.heatmap, b.heatmap, atol=1e-6)
    reloaded._pellucid_folder = str(folder)  # what load_model records (see the patch in the report)
    via_attr = get_explainer("ttame").explain(reloaded, x)
    np.testing.assert_allclose(via_attr[0].heatmap, want[0].heatmap, atol=1e-6)

    # The harness rebuilds the explainer from the stored options for the sanity check.
    rows = score_explanations(reloaded, x, got, metrics=("ad_ic", "sanity"))
    assert all(np.isfinite(r["ad_100"]) and np.isfinite(r["sanity_rho"]) for r in rows)

    # A retrained model is flagged.
    with torch.no_grad():
        reloaded.head.bias.add_(1.0)
    save_model(folder, reloaded, json.loads((folder / "card.json").read_text()))
    with pytest.warns(UserWarning, match="changed since T-TAME was fitted"):
        load_ttame(folder)


def test_cli_fits_from_split_json_and_saves_into_the_folder(tiny_model_dir, tmp_path, capsys):
    folder = tmp_path / "tb"
    shutil.copytree(tiny_model_dir, folder)
    assert run_cli(argparse.Namespace(model=str(folder), data=None, epochs=1)) == 0
    out = capsys.readouterr().out
    assert str(folder / WEIGHTS_FILE) in out and "fitted in" in out
    entry = json.loads((folder / "card.json").read_text())["explainers_fitted"]["ttame"]
    assert entry["train_images"] > 0 and entry["val_images"] > 0 and "split.json" in entry["source"]
    model, card = load_model(folder)
    e = get_explainer("ttame", folder=str(folder)).explain(model, images_for(card["preprocessing"]["image_size"], 1))[0]
    assert e.heatmap.shape == (64, 64)


def test_tap_names_may_be_given_inside_the_backbone():
    from pellucid.explain.ttame import _resolve_layers

    model = tiny_classifier("test_resnet")
    assert [n for n, _ in _resolve_layers(model, ["layer3", "backbone.net.layer4"])] == \
        ["backbone.net.layer3", "backbone.net.layer4"]
    with pytest.raises(ExplanationError, match="Did you mean 'backbone.net.layer4'"):
        _resolve_layers(model, ["backbone.net.layr4"])



def _tap_channels(model: nn.Module, size: int) -> list[int]:
    from pellucid.explain.ttame import _resolve_layers, _Taps

    with torch.no_grad(), _Taps(_resolve_layers(model, None)) as taps:
        model(images_for(size, 1))
        return [f.shape[1] for f in taps.features()]


def test_a_map_needs_no_autograd():
    model = tiny_classifier("test_resnet")
    torch.manual_seed(0)
    explainer = get_explainer("ttame")
    explainer.attention = TTAMEAttention(_tap_channels(model, 64), 2, default_tap_layers(model)).eval()
    x = images_for(64, 2)
    want = explainer.explain(model, x)
    with torch.inference_mode():
        inside = explainer.explain(model, x)
    for a, b in zip(want, inside):
        np.testing.assert_allclose(a.heatmap, b.heatmap, atol=1e-6)
    # A model whose features are computed without autograd can be explained (not fitted).
    probe = NoGradProbe(model).eval()
    explainer.attention.layers = ["clf." + n for n in default_tap_layers(model)]
    assert explainer.explain(probe, x)[0].heatmap.shape == (64, 64)
