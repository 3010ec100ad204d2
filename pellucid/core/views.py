"""Test-time views: a classifier that averages its logits over rotated and mirrored copies of the input.

Tissue patches have no "up": a nucleus rotated by 90 degrees or mirrored is the same nucleus, so a
model that reads each patch in several orientations and averages its logits makes fewer errors than
one pass (measured on nuclei, ``docs/recipes.md``, "Test-time views"). A recipe asks for it with
``tta = "dihedral"`` (the 8 rotations and mirror images of a square) or ``"flip"`` (the image and its
left-right mirror); the model card records it as ``preprocessing.tta`` and :func:`pellucid.core.modelfolder.load_model`
wraps the network in :class:`ViewAverage`, so every door — predict, eval, explain, report, export and
the web app — predicts with the same views. The weights on disk are the plain network's.

Explanations follow the views: the CAM explainers compute a map per view on the rotated input, turn
it back with :func:`undo_view` and average the maps (``pellucid.explain.cam``); perturbation
explainers (LIME, occlusion) see the averaged model as a black box. The out-of-domain check reads
the embedding of the unrotated view, the one its reference was fitted on.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from pellucid.core.tasks import TTA_CHOICES, check_tta

__all__ = ["VIEW_SETS", "ViewAverage", "apply_view", "undo_view", "check_tta"]

#: A view is ``(k, mirror)``: mirror left-right first (if ``mirror``), then rotate by ``k`` quarter turns.
View = tuple[int, bool]

#: The view sets a recipe may name; the first view of each is the image as it is.
VIEW_SETS: dict[str, tuple[View, ...]] = {
    "flip": ((0, False), (0, True)),
    "dihedral": tuple((k, m) for m in (False, True) for k in range(4)),
}
assert set(VIEW_SETS) == set(TTA_CHOICES), "pellucid.core.tasks.TTA_CHOICES names the view sets"


def apply_view(x: torch.Tensor, view: View) -> torch.Tensor:
    """Images ``(B, C, H, W)`` (square when ``k`` is odd) seen in ``view``."""
    k, mirror = view
    if mirror:
        x = x.flip(-1)
    k %= 4  # torch.rot90 written as flips and a transpose, which ONNX export knows
    if k == 1:
        return x.flip(-1).transpose(-2, -1)
    if k == 2:
        return x.flip(-2).flip(-1)
    return x.transpose(-2, -1).flip(-1) if k == 3 else x


def undo_view(maps: np.ndarray, view: View) -> np.ndarray:
    """Maps ``(..., H, W)`` computed on ``apply_view(x, view)`` put back in the frame of ``x``."""
    k, mirror = view
    out = np.rot90(maps, -k, axes=(-2, -1)) if k % 4 else maps
    return np.ascontiguousarray(out[..., ::-1] if mirror else out)


class ViewAverage(nn.Module):
    """A classifier whose logits are the mean of ``model``'s logits over the views of ``tta``.

    Args:
        model: a classifier mapping ``(B, 3, S, S)`` images in [0, 1] to logits ``(B, C)``.
        tta: a key of :data:`VIEW_SETS`.

    Attributes:
        inner: the wrapped network (its weights are what a model folder stores).
        tta: the view set's name; ``views``: its views, the identity first.
    """

    def __init__(self, model: nn.Module, tta: str):
        super().__init__()
        if tta not in VIEW_SETS:
            raise ValueError(f"tta must be one of {list(VIEW_SETS)}, got {tta!r}")
        self.inner = model
        self.tta = tta
        self.views: Sequence[View] = VIEW_SETS[tta]
        self.num_classes = getattr(model, "num_classes", None)
        if hasattr(model, "_pellucid_folder"):
            self._pellucid_folder = model._pellucid_folder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The mean logits over the views, ``(B, C)``."""
        return torch.stack([self.inner(apply_view(x, v)).float() for v in self.views]).mean(0)

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``forward(x)`` and the pooled embedding of the unrotated view (None when the network has no
        ``features`` + ``head``), in one pass over the views."""
        net = self.inner
        if not (hasattr(net, "features") and hasattr(net, "head")):
            return self.forward(x), None
        feats = net.features(x)
        first = net.head(net.dropout(feats)) if hasattr(net, "dropout") else net.head(feats)
        logits = [first.float()] + [net(apply_view(x, v)).float() for v in self.views[1:]]
        return torch.stack(logits).mean(0), feats.float()
