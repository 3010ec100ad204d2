"""Registry, option checking, model restoration and map normalisation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pellucid.explain import get_explainer, list_explainers
from pellucid.explain.base import normalize_map, preserved_model


def test_unknown_explainer_and_option_get_did_you_mean():
    with pytest.raises(KeyError, match="Did you mean 'gradcam'"):
        get_explainer("gradcamm")
    with pytest.raises(KeyError, match="Available: .*lime"):
        get_explainer("nothing-like-it")
    with pytest.raises(TypeError, match="Did you mean 'threshold'"):
        get_explainer("gradcam", treshold=0.3)
    assert list_explainers() == sorted(list_explainers())


def test_preserved_model_restores_even_after_an_error():
    model = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2), nn.Linear(2, 2))
    model.train()
    model[2].weight.requires_grad_(False)
    grad = torch.ones_like(model[0].weight)
    model[0].weight.grad = grad
    with pytest.raises(RuntimeError, match="boom"):
        with preserved_model(model):
            model.eval()
            for p in model.parameters():
                p.requires_grad_(True)
                p.grad = None
            model[0].register_forward_hook(lambda *a: None)
            model[1].register_full_backward_hook(lambda *a: None)
            raise RuntimeError("boom")
    assert all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == [True, True, True, True, False, True]
    assert model[0].weight.grad is grad
    assert not model[0]._forward_hooks and not model[1]._backward_hooks


def test_normalize_map_and_threshold():
    m = np.array([[0.0, 1.0], [2.0, 4.0]])
    np.testing.assert_allclose(normalize_map(m), [[0, 0.25], [0.5, 1]])
    np.testing.assert_allclose(normalize_map(m, threshold=0.5), [[0, 0], [0, 1]])
    assert normalize_map(np.full((3, 3), 7.0)).max() == 0
    assert normalize_map(np.stack([m, 2 * m])).shape == (2, 2, 2)
