"""Each fine-tune strategy freezes exactly what it should and thaws stages top-down."""
from __future__ import annotations

import pytest
import torch

from pellucid.core.finetune import freeze_bn_of_frozen, get_strategy, list_strategies
from pellucid.core.model import build_classifier


def _trainable(module):
    return all(p.requires_grad for p in module.parameters())


def _frozen(module):
    return not any(p.requires_grad for p in module.parameters())


@pytest.fixture
def model():
    return build_classifier("test_resnet", 2, pretrained=False)[0]


def test_linear_probe_freezes_backbone(model):
    s = get_strategy("linear-probe")
    s.setup(model)
    assert _frozen(model.backbone) and _trainable(model.head)
    assert s.on_epoch_start(model, 5) == []
    assert _frozen(model.backbone)


def test_full_trains_everything_with_two_lrs(model):
    s = get_strategy("full", lr=1e-4, head_lr=1e-3)
    s.setup(model)
    assert _trainable(model)
    groups = {g["name"]: g["lr"] for g in s.param_groups(model)}
    assert groups == {"head": 1e-3, "backbone": 1e-4}


def test_progressive_thaws_top_down_with_discriminative_lrs(model):
    s = get_strategy("progressive", lr=1e-3, lr_decay=0.5, stages_per_epoch=1, max_stages=3)
    s.setup(model)
    assert _frozen(model.backbone) and _trainable(model.head)
    groups = s.param_groups(model)
    assert [g["name"] for g in groups] == ["head", "layer4", "layer3", "layer2"]
    assert [g["lr"] for g in groups[1:]] == [1e-3, 5e-4, 2.5e-4]
    assert s.on_epoch_start(model, 0) == ["layer4"]
    net = model.backbone.net
    assert _trainable(net.layer4) and _frozen(net.layer3)
    assert s.on_epoch_start(model, 1) == ["layer3"]
    assert s.on_epoch_start(model, 2) == ["layer2"]
    assert s.on_epoch_start(model, 3) == []  # max_stages reached
    assert _frozen(net.layer1) and _frozen(net.conv1)
    model.train()
    freeze_bn_of_frozen(model)
    assert not net.layer1[0].bn1.training and net.layer4[0].bn1.training


def test_unknown_strategy():
    assert set(list_strategies()) == {"linear-probe", "full", "lp-ft", "progressive"}
    with pytest.raises(KeyError, match="Did you mean 'progressive'"):
        get_strategy("progresive")


def test_progressive_step_changes_only_thawed(model):
    s = get_strategy("progressive", stages_per_epoch=1, max_stages=1)
    s.setup(model)
    s.on_epoch_start(model, 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(s.param_groups(model))
    model.train()
    freeze_bn_of_frozen(model)
    loss = torch.nn.functional.cross_entropy(model(torch.rand(4, 3, 64, 64)), torch.tensor([0, 1, 0, 1]))
    loss.backward()
    opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("backbone.net.layer4") for k in changed)
    assert any(k.startswith("head") for k in changed)
    assert not any(k.startswith(("backbone.net.layer3", "backbone.net.layer1", "backbone.net.conv1")) for k in changed)


def test_lp_ft_fits_the_probe_first_then_trains_everything(model):
    s = get_strategy("lp-ft", lr=1e-4, head_lr=1e-4)
    assert s.probe_first and s.needs_images and s.bn_eval
    s.setup(model)
    assert all(p.requires_grad for p in model.parameters())
    names = [g["name"] for g in s.param_groups(model)]
    assert names == ["head", "backbone"] and all(g["lr"] == 1e-4 for g in s.param_groups(model))


def test_fine_tune_that_does_not_beat_its_probe_stops():
    from types import SimpleNamespace

    from pellucid.core.training import _beat_probe_callback

    cb = _beat_probe_callback(probe_val_loss=0.30, epochs=2)
    trainer = SimpleNamespace(sanity_checking=False, current_epoch=0, should_stop=False,
                              callback_metrics={"val_loss": torch.tensor(0.35)})
    cb.on_validation_epoch_end(trainer, None)
    assert not trainer.should_stop  # one epoch is not yet enough to judge
    trainer.current_epoch, trainer.callback_metrics = 1, {"val_loss": torch.tensor(0.33)}
    cb.on_validation_epoch_end(trainer, None)
    assert trainer.should_stop and cb.stopped_at == 1
    # a run that beat the probe once keeps going
    cb = _beat_probe_callback(probe_val_loss=0.30, epochs=2)
    trainer = SimpleNamespace(sanity_checking=False, current_epoch=0, should_stop=False,
                              callback_metrics={"val_loss": torch.tensor(0.25)})
    cb.on_validation_epoch_end(trainer, None)
    trainer.current_epoch, trainer.callback_metrics = 1, {"val_loss": torch.tensor(0.40)}
    cb.on_validation_epoch_end(trainer, None)
    assert not trainer.should_stop
