"""Occlusion sensitivity through MONAI: the model-agnostic baseline.

Occlusion (Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks", ECCV 2014)
slides a patch over the image, hides what is under it and records how much the target class's
probability falls. MONAI's :class:`monai.visualize.OcclusionSensitivity` does the sliding, batching
and blending of overlapping windows; this wrapper turns its probability map into a [0, 1] heatmap
(the drop ``p(original) - p(occluded)``, negative drops clipped to 0, scaled to max 1). It needs
only forward passes, so it works on any model, including frozen or non-differentiable ones.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

from pellucid.explain.base import Explainer, probabilities, register_explainer, targets_from_output

__all__ = ["OcclusionExplainer"]


@register_explainer
class OcclusionExplainer(Explainer):
    """MONAI occlusion sensitivity behind the Explainer protocol.

    Args:
        mask_size: side of the occluding patch in pixels; None uses an eighth of the shorter
            image side (at least 2).
        overlap: overlap of neighbouring patches in [0, 1).
        mode: what replaces the occluded pixels: ``"gaussian"`` (MONAI's default: multiplied by
            1 - a Gaussian), ``"mean_img"``, ``"mean_patch"`` or a constant float.
        batch_size: occluded images per forward pass.
        progress: show MONAI's progress bar.
    """

    name = "occlusion"
    needs_gradients = False

    def __init__(self, mask_size: int | None = None, overlap: float = 0.5, mode: str | float = "gaussian",
                 batch_size: int = 64, progress: bool = False):
        if not 0 <= overlap < 1:
            raise ValueError(f"overlap must be in [0, 1); got {overlap}")
        super().__init__(mask_size=mask_size, overlap=overlap, mode=mode, batch_size=batch_size, progress=progress)
        self.mask_size = mask_size
        self.overlap = overlap
        self.mode = mode
        self.batch_size = batch_size
        self.progress = progress

    def _explain(self, model: nn.Module, images: torch.Tensor, targets: list[int] | None):
        from monai.visualize import OcclusionSensitivity

        h, w = images.shape[-2:]
        mask = self.mask_size or max(2, min(h, w) // 8)
        occ = OcclusionSensitivity(nn_module=model, mask_size=mask, n_batch=self.batch_size,
                                   verbose=self.progress, mode=self.mode, overlap=self.overlap,
                                   activate=probabilities)
        with torch.no_grad():
            ref = probabilities(model(images))
        targets = targets_from_output(torch.log(ref.clamp_min(1e-12)), targets)
        maps = []
        for i, t in enumerate(targets):
            with warnings.catch_warnings():
                # MONAI 1.x indexes with lists; torch warns about it on every window.
                warnings.filterwarnings("ignore", message="Using a non-tuple sequence", category=UserWarning)
                occ_map, _ = occ(images[i:i + 1])
            drop = (ref[i, t] - torch.as_tensor(occ_map)[0, t]).clamp_min(0).float().cpu().numpy()
            top = drop.max()
            heat = drop / top if top > 0 else np.zeros_like(drop)
            maps.append((heat.astype(np.float32), {"mask_size": mask}))
        return maps, targets
