"""The T-TAME training loss as pure tensor functions: :class:`LossWeights`, the area term
(:func:`area_loss`, the paper's power form), the total-variation term (:func:`variation_loss`), the
cross-entropy of the masked image against the model's own prediction (:func:`masked_ce_loss`), and
their weighted sum :func:`ttame_loss`."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "LossWeights",
    "area_loss",
    "variation_loss",
    "masked_ce_loss",
    "ttame_loss",
]


@dataclass(frozen=True)
class LossWeights:
    """Weights of the T-TAME loss terms (defaults from the paper's experiments).

    Attributes:
        ce: weight of the cross-entropy of the masked image against the model's prediction.
        area: weight of the area term.
        tv: weight of the total-variation (smoothness) term.
        area_power: exponent ``p`` of the area term ``(mean mask)^p``; below 1 it pushes hardest on
            masks that are already small.
    """

    ce: float = 1.5
    area: float = 2.0
    tv: float = 0.01
    area_power: float = 0.3

    def __post_init__(self):
        for name in ("ce", "area", "tv", "area_power"):
            value = getattr(self, name)
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"loss weight {name} must be a finite number >= 0; got {value}")


def _as_maps(masks: torch.Tensor) -> torch.Tensor:
    if masks.ndim == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.ndim != 3:
        raise ValueError(f"masks must have shape (B, h, w) or (B, 1, h, w); got {tuple(masks.shape)}")
    return masks


def area_loss(masks: torch.Tensor, power: float = 0.3) -> torch.Tensor:
    """Area term: the batch mean of ``(mean of each mask)^power``.

    Args:
        masks: ``(B, h, w)`` or ``(B, 1, h, w)`` in [0, 1].
        power: exponent ``p`` (1 is the plain mean area).

    Returns:
        A scalar tensor.
    """
    masks = _as_maps(masks)
    area = masks.flatten(1).mean(1).clamp_min(1e-12)
    return area.pow(power).mean()


def variation_loss(masks: torch.Tensor) -> torch.Tensor:
    """Total-variation (smoothness) term: per mask, the mean squared difference of vertically
    adjacent values plus that of horizontally adjacent values; averaged over the batch.

    Args:
        masks: ``(B, h, w)`` or ``(B, 1, h, w)``.

    Returns:
        A scalar tensor (0 for a constant mask).
    """
    masks = _as_maps(masks)
    b = masks.shape[0]
    zero = masks.new_zeros(b)
    dv = (masks[:, 1:, :] - masks[:, :-1, :]).pow(2).flatten(1).mean(1) if masks.shape[1] > 1 else zero
    dh = (masks[:, :, 1:] - masks[:, :, :-1]).pow(2).flatten(1).mean(1) if masks.shape[2] > 1 else zero
    return (dv + dh).mean()


def masked_ce_loss(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of model outputs ``(B, C)`` against class indices ``(B,)``.

    Multi-column outputs are logits (or log-probabilities); a one-column output is a binary
    sigmoid logit, scored with binary cross-entropy.
    """
    targets = targets.long()
    if output.shape[-1] == 1:
        return F.binary_cross_entropy_with_logits(output[:, 0].float(), targets.float())
    return F.cross_entropy(output.float(), targets)


def ttame_loss(output: torch.Tensor, targets: torch.Tensor, masks: torch.Tensor,
               weights: LossWeights = LossWeights()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The T-TAME training loss.

    Args:
        output: classifier outputs ``(B, C)`` on the masked images ``x ⊙ up(masks)``.
        targets: the classes the model predicts on the unmasked images, ``(B,)``.
        masks: the attention maps of those classes ``(B, h, w)`` in [0, 1], at the attention
            resolution.
        weights: the term weights and the area exponent.

    Returns:
        ``(total, {"ce": ..., "area": ..., "tv": ...})`` — the unweighted terms in the dict.
    """
    parts = {"ce": masked_ce_loss(output, targets), "area": area_loss(masks, weights.area_power),
             "tv": variation_loss(masks)}
    total = weights.ce * parts["ce"] + weights.area * parts["area"] + weights.tv * parts["tv"]
    return total, parts
