"""Tests for multi-scale few-shot embeddings (:attr:`ProtoConfig.scales`): validation, the layer
names and weights :func:`embedding_config` writes, the embedder running every backbone again at each
side, ``fit_prototypes`` → model folder → prediction, old cards, and CAM explanations of a model that
runs its hooked layer twice."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from pellucid.core import fewshot as fs
from pellucid.core.fewshot import FewShotError, ProtoConfig
from tests.conftest import data_dir
from tests.core.test_fewshot_resolution import BASE, _support


def _two_backbones():
    torch.manual_seed(0)
    bb, _ = fs.create_backbone("test_resnet", pretrained=False)  # own input 64 px
    extra, _ = fs.create_backbone("shallow_cnn", pretrained=False)  # own input 32 px
    return bb, extra


def test_scales_validate_and_round_trip():
    cfg = replace(BASE, scales=[320.0, 48])
    assert cfg.scales == (320, 48) and all(isinstance(s, int) for s in cfg.scales)
    assert ProtoConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    old = {k: v for k, v in BASE.to_dict().items() if k != "scales"}  # a card written before scales
    assert ProtoConfig.from_dict(old).scales == ()
    for bad in ([4], [12.5], [99999], ["320"], [True]):
        with pytest.raises(FewShotError, match="scales must be whole numbers of pixels from 8 to 4096"):
            ProtoConfig(scales=bad)
    with pytest.raises(FewShotError, match="scales lists a side twice"):
        ProtoConfig(scales=(320, 320))


def test_embedding_config_appends_every_backbone_at_each_side():
    from pellucid.core.backbones import get_backbone_spec

    lite0, lite2 = get_backbone_spec("efficientnet_lite0"), get_backbone_spec("efficientnet_lite2")
    cfg = replace(fs.default_config(lite0), scales=(320,))
    pair = fs.embedding_config(cfg, lite0, [lite2])
    n0, n2 = len(lite0.tap_layers), len(lite2.tap_layers)
    assert pair.layers == (tuple(lite0.tap_layers) + tuple(f"efficientnet_lite2:{t}" for t in lite2.tap_layers)
                           + tuple(f"@320:{t}" for t in lite0.tap_layers)
                           + tuple(f"efficientnet_lite2@320:{t}" for t in lite2.tap_layers))
    assert pair.image_size == 320 and pair.backbones == ("efficientnet_lite2",)
    assert pair.layer_weights == tuple(cfg.layer_weights) * 4 and len(pair.layer_weights) == 2 * (n0 + n2)
    # auto_weights chooses one pattern for all four blocks alike (each backbone, each side)
    assert [g for g, _ in fs.layer_groups(pair.layers)] == ["", "efficientnet_lite2", "@320", "efficientnet_lite2@320"]
    alone = fs.embedding_config(cfg, lite0)
    assert alone.layers == tuple(lite0.tap_layers) + tuple(f"@320:{t}" for t in lite0.tap_layers)
    assert alone.image_size == 320 and alone.backbones == ()
    # a side below the backbones' own: the input is the largest of them
    assert fs.embedding_config(replace(cfg, scales=(160,)), lite0, [lite2]).image_size == 260


def test_embedder_runs_every_backbone_again_at_each_side():
    bb, extra = _two_backbones()
    ms = fs.PrototypicalNetwork(bb, fs.embedding_config(replace(BASE, scales=(48,)), bb.spec, [extra.spec]),
                                extras=[extra]).eval()
    own = fs.PrototypicalNetwork(bb, fs.embedding_config(BASE, bb.spec, [extra.spec]), extras=[extra]).eval()
    at48 = fs.PrototypicalNetwork(bb, fs.embedding_config(replace(BASE, resolution=48), bb.spec, [extra.spec]),
                                  extras=[extra]).eval()
    assert ms.embedder.input_size == 64
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        raw, base, small = ms.raw_features(x), own.raw_features(x), at48.raw_features(x)
    assert ms.embedder.dims == own.embedder.dims * 2
    # the backbones at their own sides, then both again at 48 px (the same resize as a 48-px embedder's)
    torch.testing.assert_close(raw, torch.cat([base, small], 1))
    assert not torch.allclose(base, small)


def test_layers_must_repeat_the_backbones_at_each_side():
    bb, extra = _two_backbones()
    good = fs.embedding_config(replace(BASE, scales=(48,)), bb.spec, [extra.spec])
    with pytest.raises(FewShotError, match="then all of them again at each of the scales"):
        fs.PrototypicalNetwork(bb, replace(good, layers=good.layers[:-1], layer_weights=None), extras=[extra])
    with pytest.raises(FewShotError, match="names input side '96', which is not among the scales"):
        fs.PrototypicalNetwork(bb, replace(good, layers=good.layers[:-1] + ("shallow_cnn@96:block3",),
                                           layer_weights=None), extras=[extra])
    with pytest.raises(FewShotError, match="need explicit layers"):
        fs.Embedder(bb, (), scales=(48,))


def test_multiscale_fit_writes_a_folder_that_reloads_and_predicts(tmp_path):
    from pellucid.core.modelfolder import load_model
    from pellucid.core.predict import Predictor

    torch.manual_seed(0)
    cfg = replace(BASE, backbones=("shallow_cnn",), scales=(48,))
    folder = fs.fit_prototypes(_support(tmp_path), tmp_path / "m", backbone="test_resnet", pretrained=False,
                               config=cfg, cache_dir=tmp_path / "cache")
    card = json.loads((folder / "card.json").read_text())
    assert card["fewshot"]["scales"] == [48] and card["preprocessing"]["image_size"] == 64
    assert sum("@48:" in layer for layer in card["fewshot"]["layers"]) == len(card["fewshot"]["layers"]) // 2
    assert any(n.startswith("multi-scale: every backbone also runs at 48 px") for n in card["fewshot"]["notes"])
    assert card["metrics"]["support_loo_accuracy"] is not None
    model, _ = load_model(folder)
    again, _ = load_model(folder)
    assert model.embedder.scales == (48,) and model.embedder.input_size == 64
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    queries = sorted((data_dir("tb_cxr") / "tuberculosis").iterdir())[-2:]
    probs = [r.probs for r in Predictor(folder).predict_paths(queries)]
    assert all(sum(p.values()) == pytest.approx(1.0, abs=1e-5) for p in probs)
    # the same model without scales is another cache entry, not a hit
    fs.fit_prototypes(tmp_path / "support", tmp_path / "m2", backbone="test_resnet", pretrained=False,
                      config=replace(cfg, scales=()), cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2


def test_cam_of_a_multiscale_model_follows_the_first_pass():
    from pellucid.explain import get_explainer
    from pellucid.explain.cam import _LeafAtLayer
    from pellucid.explain.pipeline import _cam_covers_part

    bb, _ = _two_backbones()
    cfg = fs.embedding_config(replace(BASE, scales=(32,)), bb.spec)
    net = fs.PrototypicalNetwork(bb, cfg, extras=[]).eval()
    x = torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        net.set_support(net.raw_features(x), torch.tensor([0, 1, 0, 1]), 2)
    calls, hook = [], _LeafAtLayer()
    layer = bb.module_at(bb.spec.cam_layer)
    handles = [layer.register_forward_hook(lambda m, i, o: calls.append(o.shape[-1])),
               layer.register_forward_hook(hook)]
    with torch.enable_grad():
        net(x[:1])
    for h in handles:
        h.remove()
    assert len(calls) == 2 and calls[0] > calls[1]  # the layer runs at 64 px, then at 32 px
    assert hook.leaf is not None and hook.leaf.shape[-1] == calls[0]  # the map is the first pass's
    for method in ("gradcam", "gradcam++"):
        exp = get_explainer(method).explain(net, x[:1])
        assert exp[0].heatmap.shape == (64, 64) and np.isfinite(exp[0].heatmap).all() and exp[0].heatmap.max() > 0

    class Card:
        extra = {"fewshot": {"backbones": [], "scales": [32]}}

    assert "runs again at 32 px" in _cam_covers_part(Card())
    Card.extra = {"fewshot": {"backbones": [], "scales": []}}
    assert _cam_covers_part(Card()) is None


def test_cli_fit_reads_scales_and_says_them(tmp_path, monkeypatch, capsys):
    import argparse

    from pellucid.cli import build_parser
    from pellucid.core import fewshot_cli

    monkeypatch.chdir(tmp_path)  # the feature cache goes under runs/ of the working folder
    args = build_parser().parse_args(["fewshot", "fit", "--support", str(_support(tmp_path, per_class=2)),
                                      "--backbone", "test_resnet", "--out", str(tmp_path / "m"), "--scales", "48"])
    ns = argparse.Namespace(**{**vars(args), "pretrained": False})
    assert fewshot_cli.run(ns) == 0
    card = json.loads((tmp_path / "m" / "card.json").read_text())
    assert card["fewshot"]["scales"] == [48]
    out = capsys.readouterr().out
    assert "again at 48 px" in out and "multi-scale: CAM explainers show the first backbone at its own input" in out
    assert fewshot_cli._scales("none") == () and fewshot_cli._scales(None) is None
    # --scales none: the default's candidates without the multi-scale one
    spec = fs.create_backbone("efficientnet_lite0", pretrained=False)[0].spec
    off = fewshot_cli._config(argparse.Namespace(scales="none", backbone=None), spec)
    assert off.auto_backbones == (("efficientnet_lite2",),) and off.scales == ()
    more = fewshot_cli._config(argparse.Namespace(scales="448", backbone=None), spec)
    assert more.auto_backbones == fs.BACKBONE_CANDIDATES and more.scales == (448,)
    with pytest.raises(FewShotError, match="--scales must be comma-separated whole numbers"):
        fewshot_cli._scales("big")


def test_a_candidate_with_an_input_side_joins_the_choice_and_its_sides_are_stored(tmp_path):
    from pellucid.core.modelfolder import load_model

    torch.manual_seed(0)
    cfg = replace(BASE, auto_backbones=(("shallow_cnn",), ("shallow_cnn", "@48")))
    nets = dict(fs.candidate_embeddings(fs.create_backbone("test_resnet", pretrained=False)[0], cfg, pretrained=False))
    assert list(nets) == ["test_resnet", "test_resnet+shallow_cnn", "test_resnet+shallow_cnn+@48"]
    assert [n.config.scales for n in nets.values()] == [(), (), (48,)]
    assert nets["test_resnet+shallow_cnn+@48"].embedder.scales == (48,)
    folder = fs.fit_prototypes(_support(tmp_path), tmp_path / "m", backbone="test_resnet", pretrained=False,
                               config=cfg, cache_dir=tmp_path / "cache")
    card = json.loads((folder / "card.json").read_text())
    choice = card["metrics"]["embedding_choice"]
    assert list(choice["loo_nll"]) == list(nets) and all(v is not None for v in choice["loo_nll"].values())
    assert choice["chosen"] == min(choice["loo_nll"], key=choice["loo_nll"].get)
    # what is stored is the chosen candidate: its extra backbones and its input sides
    assert card["fewshot"]["scales"] == ([48] if choice["chosen"].endswith("+@48") else [])
    assert card["fewshot"]["backbones"] == ([] if choice["chosen"] == "test_resnet" else ["shallow_cnn"])
    model, _ = load_model(folder)
    assert list(model.config.scales) == card["fewshot"]["scales"]
    with torch.no_grad():
        assert torch.isfinite(model(torch.rand(2, 3, 64, 64))).all()
    with pytest.raises(FewShotError, match="'@big' is not an input side"):
        replace(BASE, auto_backbones=(("shallow_cnn", "@big"),))


def test_a_card_whose_scales_and_layers_disagree_gets_one_line_naming_the_file(tmp_path):
    import shutil

    from pellucid.core.modelfolder import ModelFolderError, load_model

    torch.manual_seed(0)
    folder = fs.fit_prototypes(_support(tmp_path), tmp_path / "m", backbone="test_resnet", pretrained=False,
                               config=replace(BASE, scales=(48,)), cache_dir=None)
    edits = {"no-sides": lambda f: f.pop("scales"), "tiny-side": lambda f: f.update(scales=[5]),
             "no-copies": lambda f: f.update(layers=[x for x in f["layers"] if "@" not in x], layer_weights=None)}
    for name, edit in edits.items():
        bad = tmp_path / name
        shutil.copytree(folder, bad)
        card = json.loads((bad / "card.json").read_text())
        edit(card["fewshot"])
        (bad / "card.json").write_text(json.dumps(card))
        with pytest.raises(ModelFolderError) as err:
            load_model(bad)
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith(f"{bad}/card.json: its fewshot section does not hold together")
        assert msg.endswith("refit the model with `pellucid fewshot fit`")
