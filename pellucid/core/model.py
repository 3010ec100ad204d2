"""The classifier pellucid trains and serves: input normalisation + backbone + linear head.

A :class:`Classifier` takes RGB images as float32 in [0, 1] (``(B, 3, H, W)``) and returns logits
``(B, n_classes)``. Normalisation lives inside the model, read from the backbone spec, so callers —
predictors, explainers, the web app — never retype mean and std, and perturbation explainers work
in image space.
"""
from __future__ import annotations

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
    """

    def __init__(self, backbone: Backbone, num_classes: int, dropout: float = 0.2):
        super().__init__()
        self.backbone = backbone
        spec = backbone.spec
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(spec.embedding_dim, num_classes)
        self.num_classes = num_classes

    @property
    def spec(self):
        return self.backbone.spec

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [0, 1] → normalised input of the backbone."""
        return (x - self.mean) / self.std

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled embedding ``(B, D)`` of images in [0, 1]."""
        return self.backbone(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, n_classes)`` of images ``(B, 3, H, W)`` in [0, 1]."""
        return self.head(self.dropout(self.features(x)))


def build_classifier(backbone: str, num_classes: int, *, pretrained: bool | str = False,
                     checkpoint: str | None = None, dropout: float = 0.2) -> tuple[Classifier, dict]:
    """Create a registered backbone with a fresh head; returns ``(model, weight_info)``."""
    bb, info = create_backbone(backbone, pretrained=pretrained, checkpoint=checkpoint)
    return Classifier(bb, num_classes, dropout=dropout), info
