"""The T-TAME attention architecture: one :class:`FeatureBranch` per tapped feature map (1×1
convolution keeping the channel count, batch norm, skip connection, ReLU), fused by a 1×1
convolution into one sigmoid map per class (:class:`TTAMEAttention`), which also describes itself
for saving (its ``config()``, versioned by the weights-file format)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pellucid.explain.base import ExplanationError

__all__ = [
    "FeatureBranch",
    "TTAMEAttention",
]

_FORMAT = 1


class FeatureBranch(nn.Module):
    """One tap's branch: ``relu(bn(conv1x1(x)) + x)``, channels kept.

    Args:
        channels: channels of the tapped feature map.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)) + x)


class TTAMEAttention(nn.Module):
    """The T-TAME attention mechanism: feature branches → upsample → concatenate → fusion → sigmoid.

    Args:
        channels: channels of each tapped feature map, shallow to deep.
        n_classes: number of classes (one map each).
        layers: dotted names (from the model root) of the tapped layers, in the same order; kept
            so a saved module knows where it hooks.

    The fusion is a 1×1 convolution over the concatenated, upsampled branches. Bilinear upsampling
    acts on each channel alone and linearly, so it commutes with the 1×1 convolution: the forward
    pass applies each branch's slice of the fusion weights at the branch's own resolution and
    upsamples only the ``n_classes`` partial maps — the same result as concatenating first
    (:meth:`forward_concat`), with far less upsampling.
    """

    def __init__(self, channels: Sequence[int], n_classes: int, layers: Sequence[str] = ()):
        super().__init__()
        if not channels or any(int(c) < 1 for c in channels):
            raise ValueError(f"channels must be positive channel counts, one per tap; got {list(channels)}")
        if n_classes < 1:
            raise ValueError(f"n_classes must be >= 1; got {n_classes}")
        if layers and len(layers) != len(channels):
            raise ValueError(f"{len(layers)} layer names for {len(channels)} channel counts")
        self.channels = [int(c) for c in channels]
        self.n_classes = int(n_classes)
        self.layers = list(layers)
        self.branches = nn.ModuleList(FeatureBranch(c) for c in self.channels)
        self.fusion = nn.Conv2d(sum(self.channels), self.n_classes, 1)

    def config(self) -> dict:
        """What it takes to rebuild the module (stored beside the weights)."""
        return {"channels": list(self.channels), "n_classes": self.n_classes, "layers": list(self.layers),
                "format": _FORMAT}

    def _check(self, feats: Sequence[torch.Tensor]) -> None:
        if len(feats) != len(self.branches):
            raise ExplanationError(f"T-TAME attention has {len(self.branches)} branches but got {len(feats)} feature maps")
        got = [int(f.shape[1]) if f.ndim == 4 else None for f in feats]
        if got != self.channels:
            shapes = [tuple(f.shape) for f in feats]
            raise ExplanationError(
                f"T-TAME attention was fitted on feature maps with {self.channels} channels at layers {self.layers}, "
                f"but this model gives {shapes}: it was fitted for another model; refit it for this one")

    @staticmethod
    def _size(feats: Sequence[torch.Tensor]) -> tuple[int, int]:
        return tuple(max((tuple(f.shape[-2:]) for f in feats), key=lambda s: s[0] * s[1]))

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """Class maps ``(B, n_classes, h, w)`` in [0, 1] from the tapped feature maps ``(B, C_s, h_s, w_s)``;
        ``(h, w)`` is the largest tap's resolution."""
        self._check(feats)
        size = self._size(feats)
        weight = self.fusion.weight
        total = None
        start = 0
        for branch, f, c in zip(self.branches, feats, self.channels):
            part = F.conv2d(branch(f), weight[:, start:start + c])
            start += c
            if tuple(part.shape[-2:]) != size:
                part = F.interpolate(part, size=size, mode="bilinear", align_corners=False)
            total = part if total is None else total + part
        return torch.sigmoid(total + self.fusion.bias.view(1, -1, 1, 1))

    def forward_concat(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """The paper's literal order (upsample every branch, concatenate, fuse); same result as
        :meth:`forward`, kept as its reference."""
        self._check(feats)
        size = self._size(feats)
        ups = []
        for branch, f in zip(self.branches, feats):
            b = branch(f)
            ups.append(b if tuple(b.shape[-2:]) == size else
                       F.interpolate(b, size=size, mode="bilinear", align_corners=False))
        return torch.sigmoid(self.fusion(torch.cat(ups, dim=1)))
