"""The Explainer protocol, the explainer registry and the rules every explainer follows.

An :class:`Explainer` turns a model and a batch of images ``(B, 3, H, W)`` in [0, 1] into one
:class:`Explanation` per image: a heatmap ``(H, W)`` in [0, 1] at the input resolution, the class it
explains, and room for scores and method-specific extras. Explainers register themselves with
:func:`register_explainer`; :func:`get_explainer` builds one by name with keyword options (unknown
names and options get a did-you-mean). This module imports none of the explainers: each plugin
module registers its classes when it is imported, and the package :mod:`pellucid.explain` imports
the built-in ones, so the registry is full whenever any ``pellucid.explain`` module is in use.
:func:`preserved_model` is the context manager every explainer
runs inside: it restores train/eval mode of every module, ``requires_grad`` and ``.grad`` of every
parameter, and removes any hook left behind, so an explanation never changes the model it explains.
This module also holds the small helpers shared by the methods: class scores and probabilities for
one-logit (binary) and multi-logit outputs, target resolution, map normalisation and the lookup of
the layer CAM methods hook.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from pellucid.core.runtime import model_device as _model_device
from pellucid.registry import Registry, did_you_mean

__all__ = [
    "Explanation",
    "Explainer",
    "ExplanationError",
    "register_explainer",
    "get_explainer",
    "list_explainers",
    "explainer_class",
    "gradient_free_explainers",
    "preserved_model",
    "frozen_parameters",
    "check_images",
    "n_outputs",
    "no_gradient_error",
    "class_scores",
    "probabilities",
    "resolve_targets",
    "normalize_targets",
    "targets_from_output",
    "normalize_map",
    "find_layer",
    "default_cam_layer",
    "is_ensemble",
]


class ExplanationError(ValueError):
    """An explanation cannot be computed for this model (for example no gradient reaches the
    hooked layer); the message says which explainers still work."""


@dataclass
class Explanation:
    """One image's explanation.

    Attributes:
        heatmap: float32 array ``(H, W)`` in [0, 1] at the resolution of the explained input; 1 marks
            the strongest evidence for ``target``.
        method: registry name of the explainer that made it.
        target: index of the explained class.
        target_name: name of the explained class when the model or caller knows it.
        scores: faithfulness scores filled in by :func:`pellucid.explain.score_explanations`.
        extras: method-specific data (CAM layer, LIME segments and weights, the explainer's options).
    """

    heatmap: np.ndarray
    method: str
    target: int
    target_name: str | None = None
    scores: dict = field(default_factory=dict)
    extras: dict = field(default_factory=dict)


class Explainer:
    """Base class of every explainer.

    Subclasses set ``name`` (the registry name), ``needs_gradients`` (whether they backpropagate to
    a hooked layer) and implement :meth:`_explain`. Options are keyword arguments of ``__init__``;
    they are kept in :attr:`options` and copied into each explanation's extras, so an explanation
    can be recomputed (the sanity check does this on a randomised model). Trainable explainers set
    ``trainable = True`` and implement :meth:`fit`.
    """

    name: str = ""
    needs_gradients: bool = False
    trainable: bool = False
    description: str = ""

    def __init__(self, **options: Any):
        self.options = dict(options)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}({opts})"

    def fit(self, model: nn.Module, data: Any) -> "Explainer":
        """Train the explainer (only for ``trainable`` explainers)."""
        raise NotImplementedError(f"explainer {self.name!r} is not trainable; it needs no fit()")

    def explain(self, model: nn.Module, images: torch.Tensor,
                targets: Sequence[int] | int | None = None) -> list[Explanation]:
        """Explain a batch.

        Args:
            model: a classifier taking ``(B, 3, H, W)`` in [0, 1] and returning ``(B, C)`` scores
                (logits, or log-probabilities for ensembles; ``C == 1`` means a binary sigmoid).
            images: ``(B, 3, H, W)`` (or one ``(3, H, W)``) float tensor in [0, 1].
            targets: class index per image, one index for all, or None for the predicted class.

        Returns:
            One :class:`Explanation` per image, in order, heatmaps of shape ``(H, W)``.
        """
        if self.needs_gradients and torch.is_inference_mode_enabled():
            raise ExplanationError(f"{self.name} needs autograd but explain() was called inside torch.inference_mode(); "
                                   "call it outside that block")
        images = check_images(images)
        device = _model_device(model)
        images = images.to(device)
        targets = normalize_targets(targets, images.shape[0])
        with preserved_model(model):
            model.eval()
            maps, targets = self._explain(model, images, targets)
        names = getattr(model, "classes", None)
        out = []
        for heat, t in zip(maps, targets):
            heat, extra = (heat if isinstance(heat, tuple) else (heat, {}))
            heat = np.nan_to_num(np.asarray(heat, dtype=np.float32), nan=0.0)
            out.append(Explanation(
                heatmap=np.clip(heat, 0.0, 1.0),
                method=self.name,
                target=int(t),
                target_name=str(names[t]) if names is not None and t < len(names) else None,
                extras={"options": dict(self.options), **extra},
            ))
        return out

    __call__ = explain

    def _explain(self, model: nn.Module, images: torch.Tensor, targets: list[int] | None
                 ) -> tuple[list, list[int]]:
        """Return ``(maps, targets)``: one heatmap (or ``(heatmap, extras)``) per image and the
        explained classes (``targets`` None → predicted, via :func:`targets_from_output`).

        Runs inside :func:`preserved_model`, with the model in eval mode.
        """
        raise NotImplementedError


# --------------------------------------------------------------------------- registry
# Filled by the plugin modules (cam, lime, occlusion, ttame, ...) as they are imported; the package
# ``pellucid.explain`` imports the built-in ones.
_REGISTRY: Registry[type[Explainer]] = Registry("explainer")


def register_explainer(cls: type[Explainer]) -> type[Explainer]:
    """Class decorator: add an :class:`Explainer` subclass to the registry under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name; set the class attribute `name`")
    return _REGISTRY.register(cls.name, cls)


def list_explainers() -> list[str]:
    """Registered explainer names, sorted."""
    return _REGISTRY.names()


def explainer_class(name: str) -> type[Explainer]:
    """The class registered under ``name`` (did-you-mean on a typo)."""
    return _REGISTRY.get(name)


def get_explainer(name: str, **options: Any) -> Explainer:
    """Build the explainer registered under ``name`` with keyword ``options``.

    Raises:
        KeyError: unknown name (the message suggests close names and lists the registry).
        TypeError: an option the explainer does not take (with did-you-mean).
    """
    cls = explainer_class(name)
    params = inspect.signature(cls.__init__).parameters
    accepted = [p for p in params if p not in ("self", "args", "kwargs")]
    for key in options:
        if key not in accepted:
            hint = did_you_mean(key, accepted, n=2, cutoff=0.5)
            raise TypeError(f"explainer {name!r} has no option {key!r}.{hint} "
                            f"Options: {', '.join(accepted) or '(none)'}")
    return cls(**options)


def explainer_for(name: str, card: dict | None, **options: Any) -> Explainer:
    """:func:`get_explainer` with the options a model card's task sets for ``name``
    (``explainer_options`` of its ``task.toml``, e.g. Quickshift superpixels for sonar's LIME);
    ``options`` given here win over the card's."""
    preset = ((card or {}).get("explainer_options") or {}).get(name, {})
    return get_explainer(name, **{**preset, **options})


def gradient_free_explainers() -> list[str]:
    """Names of the registered explainers that need no gradient (they work on any model)."""
    return [n for n, c in _REGISTRY.items() if not c.needs_gradients]


# --------------------------------------------------------------------------- restoring the model
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_state_dict_hooks", "_load_state_dict_pre_hooks")


@contextlib.contextmanager
def preserved_model(model: nn.Module) -> Iterator[nn.Module]:
    """Run a block and leave ``model`` exactly as it was.

    Restores, for every module, its ``training`` flag; for every parameter, ``requires_grad`` and
    ``.grad`` (the same tensor object, or None); and removes every module hook added inside the
    block. Exceptions raised inside the block propagate unchanged.
    """
    modules = list(model.modules())
    training = [m.training for m in modules]
    params = list(model.parameters())
    requires = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    hook_keys = [{d: set(getattr(m, d, {}).keys()) for d in _HOOK_DICTS} for m in modules]
    try:
        yield model
    finally:
        for m, flag in zip(modules, training):
            m.training = flag
        with torch.no_grad():
            for p, flag, g in zip(params, requires, grads):
                p.requires_grad_(flag)
                p.grad = g
        for m, keys in zip(modules, hook_keys):
            for d, before in keys.items():
                hooks = getattr(m, d, None)
                if hooks is None:
                    continue
                for k in [k for k in hooks if k not in before]:
                    del hooks[k]


@contextlib.contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Temporarily set ``requires_grad=False`` on every parameter (restored on exit).

    Gradient explainers only need the gradient at one activation, never at the weights; freezing
    keeps autograd from recording the graph of the layers in front of the hooked one.
    """
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


# --------------------------------------------------------------------------- shared helpers
def check_images(images: torch.Tensor) -> torch.Tensor:
    """Validate a batch: ``(B, C, H, W)`` (or ``(C, H, W)``) float in [0, 1]; returns a normal
    (non-inference) float32 tensor."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor (B, 3, H, W) in [0, 1]; got {type(images).__name__}")
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4:
        raise ValueError(f"images must have shape (B, 3, H, W); got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError("images is an empty batch")
    if not images.is_floating_point():
        raise ValueError(f"images must be float in [0, 1]; got dtype {images.dtype} (divide uint8 by 255)")
    lo, hi = float(images.min()), float(images.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"images must be in [0, 1] (the model normalises inside); got range [{lo:.3g}, {hi:.3g}]. "
                         "Pass un-normalised images, e.g. from Predictor.preprocess")
    # A tensor made under inference_mode cannot take part in autograd: copy it out.
    if images.is_inference():
        with torch.inference_mode(False):
            images = images.clone()
    return images.float()




def n_outputs(output: torch.Tensor) -> int:
    """Number of classes an output ``(B, C)`` stands for (a single column is a binary sigmoid)."""
    return 2 if output.shape[-1] == 1 else int(output.shape[-1])


def class_scores(output: torch.Tensor, targets: Sequence[int]) -> torch.Tensor:
    """The pre-activation score of each image's target class, shape ``(B,)``.

    For a one-column (sigmoid) output, class 1 scores ``+logit`` and class 0 scores ``-logit``.
    """
    idx = torch.as_tensor(list(targets), device=output.device, dtype=torch.long)
    if output.shape[-1] == 1:
        sign = idx.to(output.dtype) * 2 - 1
        return output[:, 0] * sign
    return output.gather(1, idx[:, None])[:, 0]


def probabilities(output: torch.Tensor) -> torch.Tensor:
    """Class probabilities ``(B, C)`` of model outputs: softmax of logits or log-probabilities,
    ``[1 - sigmoid, sigmoid]`` for a one-column output."""
    output = output.float()
    if output.shape[-1] == 1:
        p = torch.sigmoid(output[:, 0])
        return torch.stack([1 - p, p], dim=1)
    return torch.softmax(output, dim=1)


def normalize_targets(targets: Sequence[int] | int | None, batch: int) -> list[int] | None:
    """One class index per image (an int is broadcast), or None; checks the count."""
    if targets is None:
        return None
    if isinstance(targets, (int, np.integer)):
        return [int(targets)] * batch
    targets = [int(t) for t in targets]
    if len(targets) != batch:
        raise ValueError(f"got {len(targets)} targets for {batch} images: give one per image, one int, or None")
    return targets


def targets_from_output(output: torch.Tensor, targets: Sequence[int] | None) -> list[int]:
    """The explained class per image: ``targets`` checked against the output width, or the
    predicted classes of ``output`` ``(B, C)`` when None."""
    n = n_outputs(output)
    if targets is None:
        return [int(i) for i in probabilities(output.detach()).argmax(1).tolist()]
    bad = [t for t in targets if not 0 <= t < n]
    if bad:
        raise ValueError(f"target class(es) {bad} out of range: the model has {n} classes (0..{n - 1})")
    return list(targets)


def resolve_targets(model: nn.Module, images: torch.Tensor, targets: Sequence[int] | int | None) -> list[int]:
    """Target class per image: the given ones (validated) or the model's predicted classes
    (costs one forward pass without autograd)."""
    targets = normalize_targets(targets, images.shape[0])
    with torch.no_grad():
        out = model(images if targets is None else images[:1])
    return targets_from_output(out, targets)


def normalize_map(cam: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """Min–max scale each map of ``(B, H, W)`` (or one ``(H, W)``) to [0, 1]; a flat map becomes 0.

    With ``threshold`` (a fraction in [0, 1)), values of the scaled map below it are set to 0 and
    the rest are rescaled to [0, 1] (Threshold-Grad-CAM: Chamas, Khalfaoui-Hassani & Masquelier,
    "Dilated Convolution with Learnable Spacings makes visual models more aligned with humans: a
    Grad-CAM study", arXiv:2408.03164, 2024).
    """
    cam = np.asarray(cam, dtype=np.float32)
    single = cam.ndim == 2
    c = cam[None] if single else cam
    c = np.nan_to_num(c, nan=0.0, posinf=0.0, neginf=0.0)
    lo = c.reshape(len(c), -1).min(1)[:, None, None]
    hi = c.reshape(len(c), -1).max(1)[:, None, None]
    span = hi - lo
    c = np.where(span > 1e-12, (c - lo) / np.where(span > 1e-12, span, 1.0), 0.0).astype(np.float32)
    if threshold is not None and threshold > 0:
        if not 0 <= threshold < 1:
            raise ValueError(f"threshold must be a fraction in [0, 1); got {threshold}")
        c = np.clip((c - threshold) / (1 - threshold), 0.0, 1.0).astype(np.float32)
    return c[0] if single else c


def is_ensemble(model: nn.Module) -> bool:
    """True for an ensemble: a module with ``members`` (classifiers) and ``weights``."""
    return hasattr(model, "members") and hasattr(model, "weights")


def default_cam_layer(model: nn.Module) -> str:
    """Dotted path (from ``model``) of the layer the backbone spec says CAM methods hook."""
    from pellucid.core.backbones import Backbone

    for name, mod in model.named_modules():
        if isinstance(mod, Backbone):
            prefix = f"{name}.net." if name else "net."
            return prefix + mod.spec.cam_layer
    raise ExplanationError(
        f"{type(model).__name__} has no pellucid Backbone, so there is no default CAM layer: pass layer='...' "
        f"(a dotted module name) or use a model-agnostic explainer ({', '.join(gradient_free_explainers())})")


def find_layer(model: nn.Module, layer: str | None) -> tuple[str, nn.Module]:
    """Resolve a CAM layer: None → the backbone spec's layer; else a dotted name, tried from the
    model root and then inside the backbone network. Unknown names get a did-you-mean."""
    if layer is None:
        layer = default_cam_layer(model)
    names = dict(model.named_modules())
    candidates = [layer]
    try:
        candidates.append(default_cam_layer(model).rsplit(".net.", 1)[0] + ".net." + layer)
    except ExplanationError:
        pass
    for cand in candidates:
        if cand in names and cand:
            return cand, names[cand]
    hint = did_you_mean(layer, [n for n in names if n], n=3, cutoff=0.6)
    raise KeyError(f"no layer {layer!r} in {type(model).__name__}.{hint} Give a dotted module name "
                   "as listed by model.named_modules()")


def no_gradient_error(model: nn.Module, layer: str, method: str, why: str) -> ExplanationError:
    """The error raised when no gradient reaches ``layer``."""
    return ExplanationError(
        f"{method}: no gradient reaches layer {layer!r} of {type(model).__name__} ({why}). This happens when the "
        "model computes its features without autograd (torch.no_grad / inference_mode / .detach(), e.g. a linear "
        "probe on cached features). Explainers that still work: "
        f"{', '.join(gradient_free_explainers())}.")



def to_original_frame(predictor, heatmap: np.ndarray, image) -> np.ndarray:
    """Place a map of the model's input on the original image's field of view.

    Most models see the whole image (squash-resized), so their maps are returned unchanged and
    overlays resize them. A lung-crop model (``--preprocess lung-crop``) sees only the lungs'
    bounding box: its map is resized into that box of an ``(H, W)`` zero map at the image's own
    resolution (nothing outside the box was seen, so nothing there is evidence). The box comes from
    running the model's own segmenter again on ``image``.
    """
    heat = np.asarray(heatmap, dtype=np.float32)
    if not getattr(predictor, "crops_input", False):
        return heat
    from pellucid.explain.overlay import resize_map

    box = predictor.masker(image).meta.get("lung_box")
    if box is None:  # the segmenter found no lungs: the model saw the whole image
        return heat
    arr = image.array if hasattr(image, "array") else np.asarray(image)
    y0, x0, y1, x1 = (int(v) for v in box)
    out = np.zeros(arr.shape[:2], dtype=np.float32)
    out[y0:y1, x0:x1] = resize_map(heat, (y1 - y0, x1 - x0))
    return out
