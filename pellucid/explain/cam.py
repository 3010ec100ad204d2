"""The CAM family: Grad-CAM and its relatives through pytorch-grad-cam, plus a lean Grad-CAM.

Every method hooks one layer — by default the backbone spec's ``cam_layer``, overridable with
``layer=`` (a dotted module name) — and weights its activation maps into a class map, upsampled to
the input size and scaled to [0, 1]. Methods: ``gradcam``, ``gradcam++``, ``xgradcam``,
``layercam``, ``hirescam`` (gradient based), ``scorecam`` and ``eigencam`` (no gradient needed).
Targets are one class per image (a one-column binary output is explained as ``±logit``).

How gradients are taken: a forward hook on the CAM layer replaces its output with a fresh leaf
tensor that requires grad, and every parameter is frozen for the call. Backpropagation therefore
stops at the hooked layer, never walks the backbone in front of it, and works on frozen
(linear-probe) backbones too; only a model that computes its features with autograd switched off
(``torch.no_grad``, ``.detach()``) cannot be explained this way, and gets an
:class:`~pellucid.explain.base.ExplanationError` naming the explainers that still work.

``gradcam`` runs a hand-written path by default (``fast=True``): one forward pass with that hook,
then ``torch.autograd.grad`` of the summed target scores with respect to the hooked activation
only. pytorch-grad-cam's GradCAM backpropagates into every parameter and copies activations to
NumPy, which costs about four times the forward pass on CPU; the lean path stays close to one
forward (see ``bench/bench_explain.py``) and matches pytorch-grad-cam's map (tested).
``fast=False`` uses pytorch-grad-cam instead.

``threshold=`` applies Threshold-Grad-CAM (Chamas, Khalfaoui-Hassani & Masquelier, "Dilated
Convolution with Learnable Spacings makes visual models more aligned with humans: a Grad-CAM
study", arXiv:2408.03164, 2024): values of the [0, 1] map below the threshold become 0 and the rest
are rescaled to [0, 1], which removes the low-level noise that makes some maps look random.

Ensembles (a module with ``members`` and ``weights``) are explained member by member at each
member's own CAM layer, for the ensemble's target class, and the members' [0, 1] maps are averaged
with the ensemble weights.
"""
from __future__ import annotations

import types
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pellucid.explain.base import (
    Explainer,
    ExplanationError,
    class_scores,
    find_layer,
    frozen_parameters,
    is_ensemble,
    no_gradient_error,
    normalize_map,
    preserved_model,
    register_explainer,
    resolve_targets,
    targets_from_output,
)

__all__ = [
    "CAMExplainer",
    "GradCAM",
    "GradCAMPlusPlus",
    "XGradCAM",
    "LayerCAM",
    "ScoreCAM",
    "EigenCAM",
    "HiResCAM",
    "lean_gradcam",
]


class _LeafAtLayer:
    """Forward hook that makes a layer's output a new autograd leaf.

    The returned tensor is a clone of the leaf, so in-place operations after the layer (an
    ``inplace`` ReLU) act on the clone and the leaf keeps the layer's true output. A model that runs
    the layer more than once per forward pass (a multi-scale few-shot embedding) is explained at the
    first call; later calls pass through.
    """

    def __init__(self) -> None:
        self.leaf: torch.Tensor | None = None
        self.grad_disabled = False

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> Any:
        if not isinstance(output, torch.Tensor):
            raise ExplanationError(f"CAM layer {type(module).__name__} returns {type(output).__name__}, not a tensor: "
                                   "pick another layer with layer='...'")
        if not torch.is_grad_enabled():
            self.grad_disabled = True
            return None
        if self.leaf is not None:
            return None
        self.leaf = output.detach().requires_grad_(True)
        return self.leaf.clone()


def lean_gradcam(model: nn.Module, layer_name: str, layer: nn.Module, images: torch.Tensor,
                 targets: Sequence[int] | None, method: str = "gradcam") -> tuple[np.ndarray, list[int]]:
    """Grad-CAM with one forward pass and a gradient at the hooked activation only.

    Args:
        model: classifier in eval mode; images in [0, 1] ``(B, 3, H, W)``.
        layer_name, layer: the hooked module and its dotted name (for messages).
        targets: class per image, or None for the predicted class.

    Returns:
        ``(maps, targets)``: un-normalised ReLU class maps ``(B, H, W)`` upsampled bilinearly to the
        input size, and the explained classes.
    """
    hook = _LeafAtLayer()
    handle = layer.register_forward_hook(hook)
    try:
        with frozen_parameters(model), torch.enable_grad():
            output = model(images)
    finally:
        handle.remove()
    if hook.leaf is None:
        why = "the layer ran with autograd disabled" if hook.grad_disabled else "the layer was not called"
        raise no_gradient_error(model, layer_name, method, why)
    targets = targets_from_output(output, targets)
    score = class_scores(output, targets).sum()
    if not score.requires_grad:
        raise no_gradient_error(model, layer_name, method, "the output does not depend on the layer through autograd")
    (grad,) = torch.autograd.grad(score, hook.leaf, allow_unused=True)
    if grad is None:
        raise no_gradient_error(model, layer_name, method, "the output does not depend on the layer through autograd")
    act = hook.leaf.detach()
    if act.ndim != 4:
        raise ExplanationError(f"{method} needs a convolutional layer with output (B, C, h, w); {layer_name!r} gives "
                               f"{tuple(act.shape)}: pick another layer with layer='...'")
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * act).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return cam.float().cpu().numpy(), targets


class CAMExplainer(Explainer):
    """A CAM method from pytorch-grad-cam behind the Explainer protocol.

    Args:
        layer: dotted name of the layer to hook (from the model root, or inside the backbone
            network, e.g. ``"layer3"``); None uses the backbone spec's ``cam_layer``.
        threshold: Threshold-Grad-CAM fraction in [0, 1): map values below it become 0, the rest
            are rescaled to [0, 1]. None keeps the plain map.
    """

    pgc_class: str = ""

    def __init__(self, layer: str | None = None, threshold: float | None = None):
        if threshold is not None and not 0 <= threshold < 1:
            raise ValueError(f"threshold must be a fraction in [0, 1); got {threshold}")
        super().__init__(layer=layer, threshold=threshold)
        self.layer = layer
        self.threshold = threshold

    # -- one model --------------------------------------------------------------------------
    def _maps_one(self, model: nn.Module, images: torch.Tensor, targets: list[int] | None
                  ) -> tuple[np.ndarray, list[int], str]:
        """[0, 1] maps ``(B, H, W)`` of one (non-ensemble) model, the targets and the layer name."""
        name, layer = find_layer(model, self.layer)
        maps, targets = self._pgc_maps(model, name, layer, images, targets)
        return normalize_map(maps), targets, name

    def _pgc_maps(self, model: nn.Module, name: str, layer: nn.Module, images: torch.Tensor,
                  targets: list[int] | None) -> tuple[np.ndarray, list[int]]:
        import pytorch_grad_cam
        from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget, ClassifierOutputTarget

        with frozen_parameters(model):
            with torch.no_grad():
                probe = model(images[:1])
            one_column = probe.shape[-1] == 1
            targets = resolve_targets(model, images, None) if targets is None else targets_from_output(probe, targets)
            hook = _LeafAtLayer()
            # Registered before pytorch-grad-cam's own hooks, so they see the leaf.
            handle = layer.register_forward_hook(hook) if self.needs_gradients else None
            cam = getattr(pytorch_grad_cam, self.pgc_class)(model=model, target_layers=[layer])
            self._configure(cam)
            wanted = [(BinaryClassifierOutputTarget if one_column else ClassifierOutputTarget)(t) for t in targets]
            try:
                maps = cam(input_tensor=images, targets=wanted)
            except (RuntimeError, TypeError, IndexError, AttributeError) as err:
                if self.needs_gradients and (hook.grad_disabled or not cam.activations_and_grads.gradients):
                    why = ("the layer ran with autograd disabled" if hook.grad_disabled
                           else "the output does not depend on the layer through autograd")
                    raise no_gradient_error(model, name, self.name, why) from err
                raise
            finally:
                cam.activations_and_grads.release()
                if handle is not None:
                    handle.remove()
        return np.asarray(maps, dtype=np.float32), targets

    def _configure(self, cam: Any) -> None:
        """Set method-specific attributes on the pytorch-grad-cam object."""

    def _maps_viewed(self, model: nn.Module, images: torch.Tensor, targets: list[int] | None):
        """``_maps_one``, or for a model that averages test-time views (``pellucid.core.views``) the mean of
        its network's maps over the views, each computed on the turned image and turned back."""
        views = getattr(model, "views", None)
        if views is None or not hasattr(model, "inner"):
            return self._maps_one(model, images, targets)
        from pellucid.core.views import apply_view, undo_view

        if targets is None:
            targets = resolve_targets(model, images, None)  # the averaged model's classes, not one view's
        total = 0.0
        for view in views:
            maps, _, name = self._maps_one(model.inner, apply_view(images, view), targets)
            total = total + undo_view(maps, view)
        return total / len(views), targets, name

    # -- the protocol -----------------------------------------------------------------------
    def _explain(self, model: nn.Module, images: torch.Tensor, targets: list[int] | None):
        if is_ensemble(model):
            if targets is None:
                targets = resolve_targets(model, images, None)
            weights = np.asarray(list(model.weights), dtype=np.float64)
            if len(weights) != len(model.members) or (weights < 0).any() or weights.sum() <= 0:
                raise ValueError(f"ensemble has {len(model.members)} members and weights {list(weights)}: "
                                 "need one non-negative weight per member with a positive sum")
            weights = weights / weights.sum()
            total = np.zeros((images.shape[0], *images.shape[-2:]), dtype=np.float64)
            layers = []
            for member, w in zip(model.members, weights):
                with preserved_model(member):
                    member.eval()
                    maps, _, name = self._maps_viewed(member, images, targets)
                total += w * maps
                layers.append(name)
            extras = {"layer": layers, "member_weights": weights.tolist()}
        else:
            total, targets, name = self._maps_viewed(model, images, targets)
            extras = {"layer": name}
        maps = normalize_map(total, self.threshold)
        return [(m, dict(extras)) for m in maps], targets


@register_explainer
class GradCAM(CAMExplainer):
    """Grad-CAM (Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via
    Gradient-based Localization", ICCV 2017): channel weights are the spatial mean of the class
    score's gradient.

    Args:
        layer, threshold: see :class:`CAMExplainer`.
        fast: True (default) uses the lean one-forward implementation; False uses pytorch-grad-cam.
    """

    name = "gradcam"
    needs_gradients = True
    pgc_class = "GradCAM"

    def __init__(self, layer: str | None = None, threshold: float | None = None, fast: bool = True):
        super().__init__(layer=layer, threshold=threshold)
        self.options["fast"] = fast
        self.fast = fast

    def _maps_one(self, model, images, targets):
        if not self.fast:
            return super()._maps_one(model, images, targets)
        name, layer = find_layer(model, self.layer)
        maps, targets = lean_gradcam(model, name, layer, images, targets, method=self.name)
        return normalize_map(maps), targets, name


@register_explainer
class GradCAMPlusPlus(CAMExplainer):
    """Grad-CAM++ (Chattopadhay et al., "Grad-CAM++: Generalized Gradient-based Visual Explanations
    for Deep Convolutional Networks", WACV 2018): weights from positive higher-order gradients."""

    name = "gradcam++"
    needs_gradients = True
    pgc_class = "GradCAMPlusPlus"


@register_explainer
class XGradCAM(CAMExplainer):
    """XGrad-CAM (Fu et al., "Axiom-based Grad-CAM", BMVC 2020): activation-normalised gradient
    weights."""

    name = "xgradcam"
    needs_gradients = True
    pgc_class = "XGradCAM"


@register_explainer
class LayerCAM(CAMExplainer):
    """LayerCAM (Jiang et al., "LayerCAM: Exploring Hierarchical Class Activation Maps for
    Localization", IEEE TIP 2021): element-wise positive gradients times activations."""

    name = "layercam"
    needs_gradients = True
    pgc_class = "LayerCAM"


@register_explainer
class HiResCAM(CAMExplainer):
    """HiResCAM (Draelos & Carin, "Use HiResCAM instead of Grad-CAM for faithful explanations of
    convolutional neural networks", arXiv:2011.08891): element-wise gradient times activation,
    without spatial averaging."""

    name = "hirescam"
    needs_gradients = True
    pgc_class = "HiResCAM"


#: stands in for the ``tqdm`` module inside pytorch-grad-cam's Score-CAM: ``tqdm.tqdm(iterable)`` is the iterable
_SILENT_TQDM = types.SimpleNamespace(tqdm=lambda iterable, *args, **kwargs: iterable)


@register_explainer
class ScoreCAM(CAMExplainer):
    """Score-CAM (Wang et al., "Score-CAM: Score-Weighted Visual Explanations for Convolutional
    Neural Networks", CVPR Workshops 2020): each channel, upsampled, masks the input; the masked
    scores weight the channels. Gradient free; one forward per channel and image.

    Args:
        layer, threshold: see :class:`CAMExplainer`.
        batch_size: masked images per forward pass.
    """

    name = "scorecam"
    needs_gradients = False
    pgc_class = "ScoreCAM"

    def __init__(self, layer: str | None = None, threshold: float | None = None, batch_size: int = 64):
        super().__init__(layer=layer, threshold=threshold)
        self.options["batch_size"] = batch_size
        self.batch_size = batch_size

    def _configure(self, cam: Any) -> None:
        cam.batch_size = self.batch_size
        # pytorch-grad-cam draws a progress bar of its own per image batch (a screenful of "0/8 [A" lines under
        # `pellucid explain`'s one bar, which already counts the images): its module's tqdm passes through
        import pytorch_grad_cam.score_cam as score_cam_module

        score_cam_module.tqdm = _SILENT_TQDM


@register_explainer
class EigenCAM(CAMExplainer):
    """EigenCAM (Muhammad & Yeasin, "Eigen-CAM: Class Activation Map using Principal Components",
    IJCNN 2020): the first principal component of the layer's activations. Gradient free and
    class agnostic: the map is the same whatever the target."""

    name = "eigencam"
    needs_gradients = False
    pgc_class = "EigenCAM"
