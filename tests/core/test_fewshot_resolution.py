"""Tests for the input side of a few-shot embedding (:attr:`ProtoConfig.resolution`, opt-in):
validation, the embedder feeding every backbone at that side, ``fit_prototypes`` recording it in
the card (with and without the backbone choice), and old cards loading unchanged."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pellucid.core import fewshot as fs
from pellucid.core.fewshot import FewShotError, ProtoConfig
from tests.conftest import data_dir

BASE = ProtoConfig(layers=("layer3", "layer4"), power=0.5, center=True, normalize=True, image_size=64,
                   auto_weights=True)


def _support(tmp_path: Path, per_class: int = 3) -> Path:
    """A support folder whose manifest points at real tb_cxr images (nothing is copied)."""
    src = data_dir("tb_cxr")
    rows = ["path,label,group"]
    for label in ("normal", "tuberculosis"):
        rows += [f"{f.resolve()},{label},{f.stem}" for f in sorted((src / label).iterdir())[:per_class]]
    support = tmp_path / "support"
    support.mkdir()
    (support / "manifest.csv").write_text("\n".join(rows) + "\n")
    return support


def test_resolution_validates_and_round_trips():
    cfg = replace(BASE, resolution=48.0)
    assert cfg.resolution == 48 and isinstance(cfg.resolution, int)
    assert ProtoConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    old = {k: v for k, v in BASE.to_dict().items() if k != "resolution"}
    assert ProtoConfig.from_dict(old).resolution is None
    for bad in (0, 3, 12.5, -64, 99999):  # 99999 px had asked OpenCV for 30 GB
        with pytest.raises(FewShotError, match=f"resolution must be a whole number.*got {bad}"):
            ProtoConfig(resolution=bad)
    with pytest.raises(FewShotError, match="image_size must be a whole number of pixels from 8 to 4096"):
        ProtoConfig(image_size=100000)


def test_embedding_config_uses_the_resolution_for_every_backbone():
    from pellucid.core.backbones import get_backbone_spec

    lite0, lite2 = get_backbone_spec("efficientnet_lite0"), get_backbone_spec("efficientnet_lite2")
    cfg = fs.default_config(lite0)
    assert fs.embedding_config(cfg, lite0, [lite2]).image_size == 260  # own sizes: the largest
    assert fs.embedding_config(replace(cfg, resolution=320), lite0, [lite2]).image_size == 320
    assert fs.embedding_config(replace(cfg, resolution=320), lite0).image_size == 320
    assert fs.embedding_config(cfg, lite0).image_size == 224


def test_embedder_at_a_resolution_feeds_every_backbone_that_side():
    torch.manual_seed(0)
    bb, _ = fs.create_backbone("test_resnet", pretrained=False)
    extra, _ = fs.create_backbone("shallow_cnn", pretrained=False)
    cfg = fs.embedding_config(replace(BASE, resolution=48), bb.spec, [extra.spec])
    assert cfg.image_size == 48
    net = fs.PrototypicalNetwork(bb, cfg, extras=[extra]).eval()
    assert net.embedder.input_size == 48 and net.embedder.side(extra) == 48 and net.embedder.side(bb) == 48
    x = torch.rand(2, 3, 48, 48)
    with torch.no_grad():
        raw = net.raw_features(x)
        # shallow_cnn (own size 32) sees the 48-px input as it is, not resized to 32
        direct = extra.net.block1((x - net.embedder.mean1) / net.embedder.std1).mean((2, 3))
        # an input of another side is resized to the resolution first
        big = torch.nn.functional.interpolate(x, size=(96, 96), mode="bilinear", antialias=True)
        back = torch.nn.functional.interpolate(big, size=(48, 48), mode="bilinear", antialias=True)
        torch.testing.assert_close(net.raw_features(big), net.raw_features(back))
    start = sum(net.embedder.dims[:2])
    torch.testing.assert_close(raw[:, start:start + 32], direct)
    # without a resolution the extra backbone gets its own 32 px: different features
    own = fs.PrototypicalNetwork(bb, fs.embedding_config(BASE, bb.spec, [extra.spec]), extras=[extra]).eval()
    with torch.no_grad():
        assert not torch.allclose(own.raw_features(x)[:, start:start + 32], direct)


def test_feature_cache_keys_tell_resolutions_apart(tmp_path):
    torch.manual_seed(0)
    bb, _ = fs.create_backbone("test_resnet", pretrained=False)
    extra, _ = fs.create_backbone("shallow_cnn", pretrained=False)
    paths = [str(p) for p in sorted((data_dir("tb_cxr") / "normal").iterdir())[:2]]
    cfg = fs.embedding_config(BASE, bb.spec, [extra.spec])
    native = fs.PrototypicalNetwork(bb, replace(cfg, image_size=48), extras=[extra])
    at48 = fs.PrototypicalNetwork(bb, replace(cfg, resolution=48, image_size=48), extras=[extra])
    fs.clear_memory_cache()
    a = fs.extract_features(native, paths, image_size=48, cache_dir=tmp_path)
    b = fs.extract_features(at48, paths, image_size=48, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2  # two keys, not one hit
    assert a.shape == b.shape and not torch.allclose(a, b)


def test_backbone_choice_at_a_resolution_runs_every_candidate_at_it(tmp_path):
    from pellucid.core.modelfolder import load_model

    torch.manual_seed(0)
    cfg = replace(BASE, resolution=48, auto_backbones=(("shallow_cnn",),))
    folder = fs.fit_prototypes(_support(tmp_path), tmp_path / "m", backbone="test_resnet", pretrained=False,
                               config=cfg, cache_dir=tmp_path / "cache")
    card = json.loads((folder / "card.json").read_text())
    choice = card["metrics"]["embedding_choice"]
    assert list(choice["loo_nll"]) == ["test_resnet", "test_resnet+shallow_cnn"]
    assert all(v is not None and v > 0 for v in choice["loo_nll"].values())
    assert choice["chosen"] == min(choice["loo_nll"], key=choice["loo_nll"].get)
    assert card["preprocessing"]["image_size"] == 48 and card["fewshot"]["resolution"] == 48
    # one feature file per candidate, both computed at 48 px
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2
    model, _ = load_model(folder)
    again, _ = load_model(folder)
    assert model.embedder.resolution == 48 and model.embedder.input_size == 48
    x = torch.rand(2, 3, 48, 48)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 2) and torch.isfinite(out).all() and torch.equal(out, again(x))


def test_fixed_resolution_fit_predicts_at_that_side(tmp_path):
    from pellucid.core.modelfolder import load_model
    from pellucid.core.predict import Predictor

    torch.manual_seed(0)
    cfg = replace(BASE, resolution=48, backbones=("shallow_cnn",))
    folder = fs.fit_prototypes(_support(tmp_path), tmp_path / "m", backbone="test_resnet", pretrained=False,
                               config=cfg, cache_dir=tmp_path / "cache")
    card = json.loads((folder / "card.json").read_text())
    assert card["preprocessing"]["image_size"] == 48 and card["fewshot"]["resolution"] == 48
    assert card["fewshot"]["extra_backbones"][0]["input_size"] == 48
    assert any("every backbone sees the images at 48 px" in n for n in card["fewshot"]["notes"])
    assert "embedding_choice" not in card["metrics"]
    model, _ = load_model(folder)
    assert model.embedder.resolution == 48 and model.embedder.input_size == 48
    queries = sorted((data_dir("tb_cxr") / "tuberculosis").iterdir())[-2:]
    probs = [r.probs for r in Predictor(folder).predict_paths(queries)]
    assert all(sum(p.values()) == pytest.approx(1.0, abs=1e-5) for p in probs)


def test_old_card_without_resolution_loads_and_predicts_unchanged(tmp_path):
    """A folder written before ``resolution`` existed (its card lacks the keys) predicts exactly as
    the same folder with the keys: the backbones' own sizes."""
    import shutil

    from pellucid.core.modelfolder import load_model

    torch.manual_seed(0)
    cfg = replace(BASE, backbones=("shallow_cnn",))
    folder = fs.fit_prototypes(_support(tmp_path), tmp_path / "m", backbone="test_resnet", pretrained=False,
                               config=cfg, cache_dir=tmp_path / "cache")
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    card = json.loads((old / "card.json").read_text())
    assert card["fewshot"].pop("resolution") is None
    (old / "card.json").write_text(json.dumps(card))
    a, _ = load_model(folder)
    b, _ = load_model(old)
    assert b.config.resolution is None and b.embedder.side(b.embedder.extras[0]) == 32
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_cli_fit_reads_a_resolution_when_the_parser_defines_one(tmp_path, monkeypatch, capsys):
    import argparse

    from pellucid.core import fewshot_cli

    monkeypatch.chdir(tmp_path)  # the feature cache goes under runs/ of the working folder
    ns = argparse.Namespace(action="fit", support=str(_support(tmp_path, per_class=2)), backbone="test_resnet",
                            out=str(tmp_path / "m"), pretrained=False, resolution=48)
    assert fewshot_cli.run(ns) == 0
    card = json.loads((tmp_path / "m" / "card.json").read_text())
    assert card["fewshot"]["resolution"] == 48 and card["preprocessing"]["image_size"] == 48
    assert "48 px" in capsys.readouterr().out
    with pytest.raises(FewShotError, match="resolution must be a whole number"):
        fewshot_cli.run(argparse.Namespace(**{**vars(ns), "out": str(tmp_path / "bad"), "resolution": 5}))


def test_support_views_join_their_class_and_leave_one_out_drops_them_with_their_image():
    """``set_support(mirrored=...)`` takes any whole number of augmented copies of the support set
    (the bench's support crops); leave-one-out leaves an image out with all its copies."""
    from pellucid.core.fewshot.folder import _fit_scale

    torch.manual_seed(0)
    bb, _ = fs.create_backbone("test_resnet", pretrained=False)
    net = fs.PrototypicalNetwork(bb, replace(BASE, layers=("layer4",), layer_weights=None, auto_weights=False))
    net.embedder.dims = [8]
    labels = torch.tensor([0, 0, 1, 1])
    raw = torch.rand(4, 8)
    views = torch.rand(2 * 4, 8)
    net.set_support(raw, labels, 2, mirrored=views)
    assert net.support_embeddings.shape == (12, 8) and net.support_labels.tolist() == [0, 0, 1, 1] * 3
    fitted = _fit_scale(net.support_embeddings, net.support_labels, 2, net.config, n_images=4)
    assert fitted is not None and 0 <= fitted[1] <= 1 and fitted[2] > 0
    # copies identical to their images change no prototype and no leave-one-out prototype, as long
    # as leaving an image out drops its copies too (were a copy kept, the held-out image would be
    # near its own class prototype and the NLL would fall)
    net.set_support(raw, labels, 2, mirrored=torch.cat([raw, raw]))
    with_copies = _fit_scale(net.support_embeddings, net.support_labels, 2, net.config, n_images=4)
    net.set_support(raw, labels, 2)
    without = _fit_scale(net.support_embeddings, net.support_labels, 2, net.config, n_images=4)
    assert with_copies == pytest.approx(without, rel=1e-5)
    with pytest.raises(FewShotError, match="5 rows for 4 support images"):
        net.set_support(raw, labels, 2, mirrored=torch.rand(5, 8))


def test_command_line_parses_resolution():
    from pellucid.cli import build_parser

    args = build_parser().parse_args(["fewshot", "fit", "--support", "s", "--resolution", "320"])
    assert args.resolution == 320
    assert build_parser().parse_args(["fewshot", "fit", "--support", "s"]).resolution is None
