"""Where T-TAME taps a classifier: the default tap layers from the backbone spec
(:func:`default_tap_layers`), resolving dotted layer names (also given inside the backbone, with
did-you-mean on a typo), and the forward hooks that copy each tapped layer's feature map while a
forward pass runs (``_Taps``)."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from pellucid.explain.base import ExplanationError
from pellucid.registry import did_you_mean

__all__ = [
    "default_tap_layers",
]


def _backbone(model: nn.Module) -> tuple[str, Any] | None:
    """``(prefix of its network's modules, Backbone)`` of the first pellucid Backbone in ``model``."""
    from pellucid.core.backbones import Backbone

    for name, mod in model.named_modules():
        if isinstance(mod, Backbone):
            return (f"{name}.net." if name else "net."), mod
    return None


def default_tap_layers(model: nn.Module) -> list[str]:
    """Dotted names (from ``model``) of the late stages the backbone spec lists for trainable
    explainers (``spec.tap_layers``), shallow to deep."""
    found = _backbone(model)
    if found is not None:
        prefix, backbone = found
        return [prefix + t for t in backbone.spec.tap_layers]
    raise ExplanationError(
        f"{type(model).__name__} has no pellucid Backbone, so there are no default T-TAME taps: pass "
        "layers=[...] (dotted module names, shallow to deep, as listed by model.named_modules())")


def _resolve_layers(model: nn.Module, layers: Sequence[str] | None) -> list[tuple[str, nn.Module]]:
    names = list(layers) if layers else default_tap_layers(model)
    modules = dict(model.named_modules())
    found = _backbone(model)
    bb_prefix = found[0] if found is not None else None  # names may also be given inside the backbone
    out = []
    for n in names:
        for cand in (n, bb_prefix + n if bb_prefix else None):
            if cand and cand in modules:
                out.append((cand, modules[cand]))
                break
        else:
            hint = did_you_mean(n, [m for m in modules if m], n=3)
            raise ExplanationError(f"no layer {n!r} to tap in {type(model).__name__}.{hint} T-TAME taps dotted module "
                                   "names as listed by model.named_modules()")
    return out


class _Taps:
    """Forward hooks that keep a copy of each tapped layer's output while ``active``."""

    def __init__(self, layers: Sequence[tuple[str, nn.Module]]):
        self.layers = list(layers)
        self.out: dict[str, torch.Tensor] = {}
        self.active = True
        self.handles = []

    def __enter__(self) -> "_Taps":
        for name, module in self.layers:
            self.handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if not self.active:
                return None
            if not isinstance(output, torch.Tensor) or output.ndim != 4:
                what = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
                raise ExplanationError(f"T-TAME needs convolutional feature maps (B, C, h, w); layer {name!r} gives "
                                       f"{what}: pick other layers with layers=[...]")
            # A copy: a later in-place op (ReLU, residual add) must not change what was tapped.
            self.out[name] = output.detach().clone()
            return None
        return hook

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def features(self) -> list[torch.Tensor]:
        missing = [n for n, _ in self.layers if n not in self.out]
        if missing:
            raise ExplanationError(f"T-TAME tapped layer(s) {missing} did not run in the forward pass")
        return [self.out[n] for n, _ in self.layers]
