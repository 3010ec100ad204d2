"""Tiny models and seeded images shared by the explanation tests."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pellucid.core.model import build_classifier

# Options that keep the slow explainers fast on tiny inputs (everything else runs with defaults).
FAST_OPTIONS = {"lime": {"num_samples": 48, "n_segments": 16}, "scorecam": {"batch_size": 128},
                "occlusion": {"mask_size": 16}}

BACKBONES = {"test_resnet": 64, "shallow_cnn": 32}


def tiny_classifier(name: str, num_classes: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model, _ = build_classifier(name, num_classes, pretrained=False)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, nn.Module]:
    return {name: tiny_classifier(name) for name in BACKBONES}


def images_for(size: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    """Seeded smooth colour images ``(n, 3, size, size)`` in [0, 1] (noise upsampled from 8x8, so
    superpixel methods find regions)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 8, 8, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


class QuadrantMask(nn.Module):
    """Zeros a feature map outside its top-left quadrant."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        mask = torch.zeros(h, w, dtype=x.dtype, device=x.device)
        mask[: h // 2, : w // 2] = 1
        return x * mask


class QuadrantNet(nn.Module):
    """A hand-made classifier whose evidence lies only in the top-left quadrant.

    conv (positive 1x1 filters) → ReLU → keep the top-left quadrant (``gate``, the CAM layer) →
    global mean → class 1 logit; class 0 logit is the constant 0.5.
    """

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.gate = QuadrantMask()
        with torch.no_grad():
            self.conv.weight.copy_(torch.linspace(0.5, 1.5, 12).view(4, 3, 1, 1))
            self.conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.gate(torch.relu(self.conv(x)))
        s = f.mean(dim=(1, 2, 3)) * 4
        return torch.stack([torch.full_like(s, 0.5), s], dim=1)


@pytest.fixture()
def quadrant_net() -> nn.Module:
    return QuadrantNet().eval()


class NoGradProbe(nn.Module):
    """A linear probe that computes its features without autograd (as feature caches do)."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.clf = classifier

    def forward(self, x):
        with torch.no_grad():
            f = self.clf.features(x)
        return self.clf.head(f)
