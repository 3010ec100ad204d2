"""The classifier pellucid trains and serves: input normalisation + backbone + linear head.

A :class:`Classifier` takes RGB images as float32 in [0, 1] (``(B, 3, H, W)``) and returns logits
``(B, n_classes)``. Normalisation lives inside the model, read from the backbone spec, so callers —
predictors, explainers, the web app — never retype mean and std, and perturbation explainers work
in image space.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from pellucid.core.backbones import Backbone, create_backbone

__all__ = ["Classifier", "build_classifier"]


class Classifier(nn.Module):
    """Backbone + dropout + linear head.

    Args:
        backbone: a :class:`~pellucid.core.backbones.Backbone`.
        num_classes: number of output classes.
        dropout: dropout before the head.
        taps: dotted paths of inner layers of the backbone (``probe_layers`` in a recipe) whose
            outputs, averaged over space, are concatenated in front of the pooled embedding. A
            linear probe then sees mid-level features (textures, parts) beside the last layer's
            ImageNet-specific ones; the head is sized for the concatenation.

    Raises:
        ValueError: a tap names no layer of the backbone.
    """

    def __init__(self, backbone: Backbone, num_classes: int, dropout: float = 0.2, taps: Sequence[str] = ()):
        super().__init__()
        self.backbone = backbone
        spec = backbone.spec
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.dropout = nn.Dropout(dropout)
        self.taps = tuple(str(t) for t in taps)
        for path in self.taps:
            try:
                backbone.module_at(path)
            except AttributeError:
                raise ValueError(f"backbone {spec.name!r} has no layer {path!r} to pool (probe_layers); its "
                                 f"stages are {list(spec.stages)}") from None
        self.head = nn.Linear(spec.embedding_dim + self._tap_width(), num_classes)
        self.num_classes = num_classes

    def _tap_width(self) -> int:
        """Channels of the tapped layers together, from one forward pass of a blank image (0 without taps)."""
        if not self.taps:
            return 0
        was = self.backbone.training
        self.backbone.eval()
        with torch.no_grad():
            width = sum(t.shape[1] for t in self._tapped(torch.zeros(1, 3, self.spec.input_size, self.spec.input_size))[:-1])
        self.backbone.train(was)
        return width

    @property
    def spec(self):
        return self.backbone.spec

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [0, 1] → normalised input of the backbone."""
        return (x - self.mean) / self.std

    def _tapped(self, z: torch.Tensor) -> list[torch.Tensor]:
        """The pooled outputs of the taps, then the backbone's embedding, of normalised input ``z``."""
        taps, last = self.backbone.pooled_layers(z, self.taps)
        return taps + [last]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled embedding ``(B, D)`` of images in [0, 1] (the taps' pooled outputs first, when set)."""
        if not self.taps:
            return self.backbone(self.normalize(x))
        return torch.cat(self._tapped(self.normalize(x)), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, n_classes)`` of images ``(B, 3, H, W)`` in [0, 1]."""
        return self.head(self.dropout(self.features(x)))


def build_classifier(backbone: str, num_classes: int, *, pretrained: bool | str = False,
                     checkpoint: str | None = None, dropout: float = 0.2,
                     taps: Sequence[str] = ()) -> tuple[Classifier, dict]:
    """Create a registered backbone with a fresh head (over ``taps`` too, see :class:`Classifier`);
    returns ``(model, weight_info)``."""
    bb, info = create_backbone(backbone, pretrained=pretrained, checkpoint=checkpoint)
    return Classifier(bb, num_classes, dropout=dropout, taps=taps), info
