"""Tests for the logistic head of few-shot models (``ProtoConfig.head = "logistic"``): it learns the
direction that separates the classes where the nearest prototype is swamped by nuisance directions,
its leave-one-out never sees a left-out image's copies, and model folders fit, reload and predict
with it; folders written before it load as prototypes."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from pellucid.core import fewshot as fs
from pellucid.core.fewshot import FewShotError, ProtoConfig
from tests.core.test_fewshot_resolution import _support


@pytest.fixture()
def tiny_backbone():
    torch.manual_seed(0)
    return fs.create_backbone("test_resnet", pretrained=False)[0]


def _two_classes(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class signal in dimension 0 only (means ±1, sd 0.1); 9 nuisance dimensions of sd 3."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(2).repeat_interleave(n)
    x = torch.randn(2 * n, 10, generator=g) * 3.0
    x[:, 0] = (2.0 * y - 1.0) + 0.1 * torch.randn(2 * n, generator=g)
    return x, y


def test_logistic_head_finds_the_direction_that_prototypes_miss(tiny_backbone):
    support, ys = _two_classes(30, seed=0)
    query, yq = _two_classes(200, seed=1)
    accuracy = {}
    for head in ("prototypes", "logistic"):
        net = fs.PrototypicalNetwork(tiny_backbone, ProtoConfig(head=head))
        net.set_support(support, ys, 2)
        with torch.no_grad():
            accuracy[head] = float((net.logits(net.transform(query)).argmax(1) == yq).float().mean())
    assert accuracy["logistic"] >= 0.95
    assert accuracy["prototypes"] <= 0.80
    # the head is refitted whenever the support changes, and the prototypes stay for explanations
    net.set_support(support[:, :5], ys, 2)
    assert net.head_weight.shape == (2, 5) and net.prototypes.shape == (2, 5)


def test_leave_one_out_never_sees_the_left_out_image_or_its_copies():
    x, y = _two_classes(6, seed=2)
    mirrored = x + 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    emb, labels = torch.cat([x, mirrored]), torch.cat([y, y])
    loo = fs.loo_logistic_logits(emb, labels, 2, 30.0, n_images=len(x))
    assert loo.shape == (12, 2)
    for i in (0, 7):
        keep = torch.ones(len(emb), dtype=torch.bool)
        keep[[i, i + len(x)]] = False  # the image and its mirrored copy
        w, b = fs.fit_logistic(emb[keep], labels[keep], 2, 30.0)
        assert torch.allclose(loo[i], fs.logistic_logits(x[i:i + 1], w, b)[0], atol=1e-5)
        keep[i + len(x)] = True  # leaving the copy in gives other logits
        w, b = fs.fit_logistic(emb[keep], labels[keep], 2, 30.0)
        assert not torch.allclose(loo[i], fs.logistic_logits(x[i:i + 1], w, b)[0], atol=1e-3)
    assert fs.loo_logistic_logits(x[:3], torch.tensor([0, 1, 1]), 2, 30.0) is None  # a class of one image
    with pytest.raises(FewShotError, match="every class"):
        fs.fit_logistic(x[:4], torch.tensor([0, 0, 2, 2]), 3, 30.0)


def test_head_config_validates_and_transduction_keeps_the_prototypes():
    with pytest.raises(KeyError, match="logistic"):
        ProtoConfig(head="logistc")
    for bad in (0, -1.0, "abc", float("inf"), None):
        with pytest.raises(FewShotError, match="head_c must be > 0"):
            ProtoConfig(head="logistic", head_c=bad)
    with pytest.raises(FewShotError, match="needs head='prototypes'"):
        ProtoConfig(head="logistic", transductive=2)
    round_trip = ProtoConfig.from_dict(ProtoConfig(head="logistic", head_c=10).to_dict())
    assert round_trip.head == "logistic" and round_trip.head_c == 10.0
    old = ProtoConfig.from_dict({k: v for k, v in ProtoConfig().to_dict().items() if not k.startswith("head")})
    assert old.head == "prototypes"
    spec = fs.create_backbone("efficientnet_lite0", pretrained=False)[0].spec
    assert fs.default_config(spec).head == "logistic"


def test_folder_with_logistic_head_reloads_predicts_and_old_folders_still_load(tmp_path):
    from safetensors.torch import load_file, save_file

    from pellucid.core.modelfolder import load_model
    from pellucid.core.predict import Predictor

    support = _support(tmp_path, per_class=4)
    config = ProtoConfig(layers=("layer3", "layer4"), power=0.5, center=True, normalize=True, image_size=64,
                         head="logistic")
    torch.manual_seed(0)
    folder = fs.fit_prototypes(support, tmp_path / "m", backbone="test_resnet", pretrained=False, config=config,
                               cache_dir=tmp_path / "cache")
    card = json.loads((folder / "card.json").read_text())
    assert card["fewshot"]["head"] == "logistic" and card["fewshot"]["head_c"] == fs.HEAD_C
    assert any("logistic regression" in n for n in card["fewshot"]["notes"])
    assert 0.0 <= card["metrics"]["support_loo_accuracy"] <= 1.0
    assert 0.0 <= card["metrics"]["prototype_loo_accuracy"] <= 1.0
    model, _ = load_model(folder)
    assert model.config.head == "logistic" and model.head_weight.shape == (2, 192 + 96)
    assert float(model.scale) == pytest.approx(card["fewshot"]["scale"], rel=1e-5)
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        emb = model.features(x)
        expected = model.scale * (emb @ model.head_weight.T + model.head_bias)
        assert torch.allclose(model(x), expected, atol=1e-5)
    results = Predictor(folder).predict_paths([s["path"] for s in card["support"]])
    assert not any(r.error for r in results)
    assert all(sum(r.probs.values()) == pytest.approx(1.0, abs=1e-5) for r in results)

    # transduction asked for at fitting time selects the prototypes (it refines them per batch)
    folder_t = fs.fit_prototypes(support, tmp_path / "t", backbone="test_resnet", pretrained=False,
                                 config=config, cache_dir=tmp_path / "cache", transductive=2)
    assert json.loads((folder_t / "card.json").read_text())["fewshot"]["head"] == "prototypes"

    # a folder written before the head existed: no head buffers in its weights, no head in its card
    proto = fs.fit_prototypes(support, tmp_path / "p", backbone="test_resnet", pretrained=False,
                              config=replace(config, head="prototypes"), cache_dir=tmp_path / "cache")
    state = {k: v for k, v in load_file(str(proto / "model.safetensors")).items() if not k.startswith("head_")}
    save_file(state, str(proto / "model.safetensors"))
    card_p = json.loads((proto / "card.json").read_text())
    card_p["fewshot"] = {k: v for k, v in card_p["fewshot"].items() if not k.startswith("head")}
    (proto / "card.json").write_text(json.dumps(card_p))
    old, _ = load_model(proto)
    assert old.config.head == "prototypes" and old.head_weight.numel() == 0
    with torch.no_grad():
        assert (old(x) <= 0).all()  # scaled negative distances, as before

    # a card that asks for a head its weights lack is refused in one line
    card["fewshot"]["head"] = "logistic"
    (proto / "card.json").write_text(json.dumps({**card_p, "fewshot": {**card_p["fewshot"], "head": "logistic"}}))
    from pellucid.core.modelfolder import ModelFolderError

    with pytest.raises(ModelFolderError, match="no logistic head"):
        load_model(proto)


def test_cli_head_flag_picks_the_classifier(tmp_path, monkeypatch, capsys):
    from pellucid.cli import build_parser
    from pellucid.core import fewshot_cli

    monkeypatch.chdir(tmp_path)  # the feature cache goes under runs/ of the working folder
    support = _support(tmp_path, per_class=2)
    for head in ("prototypes", None):
        out = tmp_path / f"m-{head}"
        argv = ["fewshot", "fit", "--support", str(support), "--backbone", "test_resnet", "--out", str(out),
                "--no-auto-backbones"] + (["--head", head] if head else [])
        args = build_parser().parse_args(argv)
        args.pretrained = False
        assert fewshot_cli.run(args) == 0
        card = json.loads((out / "card.json").read_text())
        assert card["fewshot"]["head"] == (head or "logistic")
        printed = capsys.readouterr().out
        assert ("nearest prototype" if head else "logistic regression") in printed
    with pytest.raises(SystemExit):
        build_parser().parse_args(["fewshot", "fit", "--head", "svm"])


def test_a_support_set_ranked_all_right_gets_a_finite_honest_scale():
    from pellucid.core.calibration import fit_temperature
    from pellucid.core.fewshot.folder import calibrated_scale

    y = torch.arange(3).repeat(5)
    logits = torch.nn.functional.one_hot(y, 3).double() * 2.0  # every leave-one-out logit ranks right
    plain = 1.0 / fit_temperature(logits, y, label_smoothing=0.0)
    kept = calibrated_scale(logits, y)
    assert plain > 3 * kept  # the plain fit runs off towards certainty (until L-BFGS gives up)
    top_plain = float(torch.softmax(logits[:1] * plain, 1).max())
    top = float(torch.softmax(logits[:1] * kept, 1).max())
    assert top_plain > 0.9999
    assert 0.9 < top < 1.0 - 0.5 / 16  # confident, but no more than 15 images can justify
    with pytest.raises(ValueError, match="label_smoothing"):
        fit_temperature(logits, y, label_smoothing=1.0)
