"""The few-shot ``nn.Module`` s: :class:`Embedder` (normalisation, backbone and multi-layer pooling
into raw features) and :class:`PrototypicalNetwork` (Snell, Swersky & Zemel, "Prototypical
Networks for Few-shot Learning", NeurIPS 2017), the module served by model folders of kind
``"prototypes"``: images ``(B, 3, S, S)`` in [0, 1] in, logits ``(B, n_way)`` = scaled negative
distances to the prototypes out (or, with ``ProtoConfig.head = "logistic"``, the scaled logits of a
logistic regression fitted on the support embeddings), so prediction, evaluation and CAM
explanations work unchanged."""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pellucid.core.backbones import Backbone, spatial_mean
from pellucid.core.fewshot.config import PLAIN, FewShotError, ProtoConfig
from pellucid.core.fewshot.head import fit_logistic, logistic_logits
from pellucid.core.fewshot.maths import (
    _logits_from_distances,
    _post_transform,
    _pre_transform,
    compute_prototypes,
    pairwise_distances,
    refine_prototypes,
)

__all__ = [
    "Embedder",
    "PrototypicalNetwork",
]


_pool = spatial_mean


class Embedder(nn.Module):
    """Normalisation + backbone(s) + (multi-layer) pooling: images ``(B, 3, S, S)`` in [0, 1] → raw
    features ``(B, D)``, the concatenation of the pooled outputs of ``layers``.

    With ``extras`` (more backbones, :attr:`ProtoConfig.backbones`), the pooled layers of every
    backbone are concatenated in order: the primary's ``layers`` name its own modules, the extras'
    are written ``"<backbone name>:<module>"``. Each backbone then gets the input resized
    (bilinear, antialiased) to its own ``spec.input_size`` and normalised with its own mean and std,
    so one input tensor (at the largest input size) feeds them all.

    Args:
        backbone: a registered :class:`~pellucid.core.backbones.Backbone` (the primary).
        layers: dotted paths to pool; ``()`` uses the backbone output.
        flip: average with the features of the horizontally mirrored images.
        extras: further backbones whose layers (prefixed by their name) are in ``layers``.
        resolution: when given, every backbone gets the input at this side (resized only when the
            input has another), instead of each extra backbone at its own input size
            (:attr:`ProtoConfig.resolution`).
        scales: more input sides at which every backbone runs again (:attr:`ProtoConfig.scales`):
            after the layers above, ``layers`` lists them again for each side, written
            ``"@<side>:<module>"`` (primary) and ``"<name>@<side>:<module>"`` (extras). A hooked
            layer then runs once per side in every forward pass, the backbones' own sides first.
    """

    def __init__(self, backbone: Backbone, layers: Sequence[str] = (), flip: bool = False,
                 extras: Sequence[Backbone] = (), resolution: int | None = None, scales: Sequence[int] = ()):
        super().__init__()
        self.backbone = backbone
        self.resolution = None if resolution is None else int(resolution)
        self.scales = tuple(int(s) for s in scales)
        self.extras = nn.ModuleList(extras)
        self.layers = tuple(layers)
        self.flip = bool(flip)
        by_name = {bb.spec.name: bb for bb in self.extras}
        if len(by_name) != len(self.extras) or backbone.spec.name in by_name:
            raise FewShotError(f"each backbone may appear once; got {[backbone.spec.name, *by_name]}")
        if (self.extras or self.scales) and not self.layers:
            raise FewShotError("several backbones or input sides need explicit layers (the primary's, then "
                               "'<name>:<layer>' and '<name>@<side>:<layer>' ones)")
        owners = [backbone, *self.extras]
        # (index of the backbone, its input side or None for its own, the modules pooled), in order
        self._groups: list[tuple[int, int | None, list[str]]] = []
        for path in self.layers:
            prefix, _, inner = path.rpartition(":")
            name, at, side = prefix.partition("@")
            if name and name not in by_name:
                raise FewShotError(f"layer {path!r} names backbone {name!r}, which is not among the extra "
                                   f"backbones {list(by_name)}")
            if at and not (side.isdigit() and int(side) in self.scales):
                raise FewShotError(f"layer {path!r} names input side {side!r}, which is not among the scales "
                                   f"{list(self.scales)}")
            owner = by_name[name] if name else backbone
            try:
                owner.module_at(inner)
            except AttributeError:
                raise FewShotError(f"backbone {owner.spec.name!r} has no layer {inner!r}; its tap layers are "
                                   f"{list(owner.spec.tap_layers)}") from None
            key = (owners.index(owner), int(side) if at else None)
            if not self._groups or self._groups[-1][:2] != key:
                self._groups.append((*key, []))
            self._groups[-1][2].append(inner)
        base: list[list[str]] = [[] for _ in owners]  # each backbone's modules at its own side
        for i, side, paths in self._groups:
            if side is None:
                base[i] += paths
        expected = [f"{owners[i].spec.name}:{p}" if i else p for i, paths in enumerate(base) for p in paths]
        expected += [f"{owners[i].spec.name if i else ''}@{s}:{p}" for s in self.scales
                     for i, paths in enumerate(base) for p in paths]
        if (self.extras or self.scales) and expected != list(self.layers):
            raise FewShotError(f"layers must list the primary's layers first, then each extra backbone's in the "
                               f"order of the extras {list(by_name)}, then all of them again at each of the "
                               f"scales {list(self.scales)}; got {list(self.layers)}")
        if not self._groups:
            self._groups = [(0, None, [])]
        for i, bb in enumerate(owners):
            self.register_buffer(f"mean{i or ''}", torch.tensor(bb.spec.mean, dtype=torch.float32).view(1, 3, 1, 1),
                                 persistent=False)
            self.register_buffer(f"std{i or ''}", torch.tensor(bb.spec.std, dtype=torch.float32).view(1, 3, 1, 1),
                                 persistent=False)
        self.dims: list[int] | None = None

    @property
    def spec(self):
        return self.backbone.spec

    @property
    def input_size(self) -> int:
        """Side of the input the embedder expects: the largest of its backbones' sides (its
        ``resolution`` when set, else their own input sizes) and its ``scales``."""
        return max([self.side(bb) for bb in (self.backbone, *self.extras)] + list(self.scales))

    def side(self, backbone: Backbone) -> int:
        """Input side ``backbone`` runs at (besides the ``scales``): the embedder's ``resolution``,
        else the backbone's own."""
        return self.resolution or backbone.spec.input_size

    def _once(self, backbone: Backbone, layers: Sequence[str], x: torch.Tensor) -> list[torch.Tensor]:
        if not layers:
            return [backbone(x)]
        return backbone.pooled_layers(x, layers)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw features ``(B, D)`` of images ``(B, 3, S, S)`` in [0, 1]."""
        blocks: list[torch.Tensor] = []
        owners = [self.backbone, *self.extras]
        for i, side, layers in self._groups:
            bb, xi = owners[i], x
            size = side or self.side(bb)
            if (self.extras or self.resolution or self.scales) and xi.shape[-1] != size:
                xi = F.interpolate(xi, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            xi = (xi - getattr(self, f"mean{i or ''}")) / getattr(self, f"std{i or ''}")
            got = self._once(bb, layers, xi)
            if self.flip:
                got = [(a + b) / 2 for a, b in zip(got, self._once(bb, layers, xi.flip(3)))]
            blocks += got
        self.dims = [b.shape[1] for b in blocks]
        return torch.cat(blocks, dim=1)


class PrototypicalNetwork(nn.Module):
    """A prototypical network (Snell et al., NeurIPS 2017) over any registered backbone.

    Call :meth:`process_support_set` (images) or :meth:`set_support` (raw features) once, then
    ``model(query_images)`` gives logits. Inputs are RGB in [0, 1]; normalisation is inside.

    Args:
        backbone: the feature extractor.
        config: embedding, transforms and distance (:class:`ProtoConfig`).
        learn_scale: make the logit scale a trainable parameter (episodic training).
        extras: the backbones named by ``config.backbones`` (default: built with random weights,
            as when a model folder is loaded and its state dict comes next).

    Attributes:
        prototypes: ``(n_way, D)`` transformed class prototypes.
        support_embeddings: ``(n_support, D)`` transformed support embeddings.
        support_labels: ``(n_support,)`` class indices.
        center: ``(D,)`` the support mean subtracted before normalisation (zeros when unused).
        support_items: ``[(path, label)]`` of the support images, when known (example explanations).
    """

    def __init__(self, backbone: Backbone, config: ProtoConfig = PLAIN, *, learn_scale: bool = False,
                 extras: Sequence[Backbone] | None = None):
        super().__init__()
        self.config = config
        if extras is None:  # a folder being loaded: randomly initialised, its weights come next
            from pellucid.core.backbones import create_backbone

            extras = [create_backbone(name, pretrained=False)[0] for name in config.backbones]
        if [bb.spec.name for bb in extras] != list(config.backbones):
            raise FewShotError(f"extra backbones {[bb.spec.name for bb in extras]} do not match config.backbones "
                               f"{list(config.backbones)}")
        self.embedder = Embedder(backbone, config.layers, config.flip, extras, resolution=config.resolution,
                                 scales=config.scales)
        log_scale = torch.tensor(math.log(config.scale), dtype=torch.float32)
        if learn_scale:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)
        self.register_buffer("prototypes", torch.zeros(0, 0))
        self.register_buffer("support_embeddings", torch.zeros(0, 0))
        self.register_buffer("support_labels", torch.zeros(0, dtype=torch.long))
        self.register_buffer("center", torch.zeros(0))
        self.register_buffer("dims", torch.zeros(0, dtype=torch.long))
        self.register_buffer("head_weight", torch.zeros(0, 0))
        self.register_buffer("head_bias", torch.zeros(0))
        self.support_items: list[tuple[str, str]] = []

    @property
    def backbone(self) -> Backbone:
        return self.embedder.backbone

    @property
    def spec(self):
        return self.embedder.backbone.spec

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.exp()

    @property
    def n_way(self) -> int:
        return int(self.prototypes.shape[0])

    def raw_features(self, x: torch.Tensor) -> torch.Tensor:
        """Raw (untransformed) features ``(B, D)`` of images ``(B, 3, S, S)`` in [0, 1]."""
        return self.embedder(x)

    def _dims(self, d: int) -> list[int]:
        if self.dims.numel():
            return self.dims.tolist()
        return list(self.embedder.dims) if self.embedder.dims else [d]

    def transform(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw features ``(B, D)`` → embeddings ``(B, D)`` in the space of the prototypes."""
        x = _pre_transform(raw, self._dims(raw.shape[1]), self.config)
        return _post_transform(x, self.center if self.config.center else None, self.config)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings ``(B, D)`` of images in [0, 1] (what the prototypes are compared with)."""
        return self.transform(self.raw_features(x))

    def set_support(self, raw: torch.Tensor, labels: torch.Tensor, n_way: int | None = None,
                    mirrored: torch.Tensor | None = None) -> None:
        """Store the support set from raw features ``(n_support, D)`` and labels ``(n_support,)``.

        ``mirrored``: raw features of the mirrored support images (``config.support_flip``), stored
        after the originals as extra support embeddings of the same classes (row ``i + n_support``
        is the mirror of row ``i``). It may hold ``k`` such sets, one after the other (row
        ``i + j * n_support`` is a copy of image ``i``): any augmented views of the support images."""
        raw = raw.detach().float()
        if mirrored is not None:
            if len(mirrored) % max(len(raw), 1):
                raise FewShotError(f"mirrored has {len(mirrored)} rows for {len(raw)} support images; give a whole "
                                   "number of copies of every support image, in the same order")
            copies = len(mirrored) // max(len(raw), 1)
            raw = torch.cat([raw, mirrored.detach().float().to(raw.device)])
            labels = labels.repeat(1 + copies)
        dims = self._dims(raw.shape[1])
        self.dims = torch.tensor(dims, dtype=torch.long, device=raw.device)
        pre = _pre_transform(raw, dims, self.config)
        self.center = pre.mean(0) if self.config.center else torch.zeros(raw.shape[1], device=raw.device)
        emb = _post_transform(pre, self.center if self.config.center else None, self.config)
        self.support_labels = labels.long().to(raw.device)
        self.support_embeddings = emb
        self.prototypes = compute_prototypes(emb, self.support_labels, n_way)
        if self.config.head == "logistic":
            self.head_weight, self.head_bias = (t.to(raw.device) for t in fit_logistic(
                emb, self.support_labels, self.n_way, self.config.head_c))
        else:
            self.head_weight, self.head_bias = torch.zeros(0, 0, device=raw.device), torch.zeros(0, device=raw.device)

    @torch.no_grad()
    def process_support_set(self, images: torch.Tensor, labels: torch.Tensor, n_way: int | None = None) -> None:
        """Compute the prototypes from support images ``(n_support, 3, S, S)`` in [0, 1]."""
        self.set_support(self.raw_features(images), labels, n_way)

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Logits ``(n_query, n_way)`` of transformed embeddings ``(n_query, D)``.

        With ``config.transductive`` steps the prototypes are first refined on this batch
        (:func:`~pellucid.core.fewshot.maths.refine_prototypes`): each row then depends on the other
        rows of the batch. The stored prototypes are left as they are."""
        if self.prototypes.numel() == 0:
            raise FewShotError("no support set: call process_support_set(images, labels) first")
        if self.config.head == "logistic":
            if self.head_weight.numel() == 0:
                raise FewShotError("the logistic head is not fitted: fit the model with `pellucid fewshot fit` "
                                   "(or fit_support)")
            return self.scale * logistic_logits(embeddings, self.head_weight, self.head_bias)
        prototypes = self.prototypes
        if self.config.transductive and len(embeddings) and self.support_embeddings.numel():
            prototypes = refine_prototypes(self.support_embeddings, self.support_labels, embeddings, self.n_way,
                                           steps=self.config.transductive, scale=self.scale,
                                           distance=self.config.distance)
        dist = pairwise_distances(embeddings, prototypes, self.config.distance)
        return _logits_from_distances(dist, self.config, self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(n_query, n_way)`` (scaled negative distances) of images ``(n_query, 3, S, S)``."""
        return self.logits(self.features(x))

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward(x)`` and the raw features in one pass: what the domain check reads
        (:class:`~pellucid.core.ood.NeighbourReference`)."""
        raw = self.raw_features(x)
        return self.logits(self.transform(raw)), raw

    def _resize_buffers(self, state: Mapping[str, torch.Tensor]) -> None:
        for name in ("prototypes", "support_embeddings", "support_labels", "center", "dims", "head_weight",
                     "head_bias"):
            if name in state:
                setattr(self, name, torch.empty_like(state[name]))
