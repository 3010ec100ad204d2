"""The few-shot ``nn.Module`` s: :class:`Embedder` (normalisation, backbone and multi-layer pooling
into raw features) and :class:`PrototypicalNetwork` (Snell, Swersky & Zemel, "Prototypical
Networks for Few-shot Learning", NeurIPS 2017), the module served by model folders of kind
``"prototypes"``: images ``(B, 3, S, S)`` in [0, 1] in, logits ``(B, n_way)`` = scaled negative
distances to the prototypes out, so prediction, evaluation and CAM explanations work unchanged."""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import nn

from pellucid.core.backbones import Backbone
from pellucid.core.fewshot.config import PLAIN, FewShotError, ProtoConfig
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


def _pool(t: torch.Tensor) -> torch.Tensor:
    if t.ndim == 4:
        return t.mean(dim=(2, 3))
    return t.flatten(1)


class Embedder(nn.Module):
    """Normalisation + backbone + (multi-layer) pooling: images ``(B, 3, S, S)`` in [0, 1] → raw
    features ``(B, D)``, the concatenation of the pooled outputs of ``layers``.

    Args:
        backbone: a registered :class:`~pellucid.core.backbones.Backbone`.
        layers: dotted paths inside ``backbone.net`` to pool; ``()`` uses the backbone output.
        flip: average with the features of the horizontally mirrored images.
    """

    def __init__(self, backbone: Backbone, layers: Sequence[str] = (), flip: bool = False):
        super().__init__()
        self.backbone = backbone
        self.layers = tuple(layers)
        self.flip = bool(flip)
        for path in self.layers:
            try:
                backbone.module_at(path)
            except AttributeError:
                raise FewShotError(f"backbone {backbone.spec.name!r} has no layer {path!r}; its tap layers are "
                                   f"{list(backbone.spec.tap_layers)}") from None
        spec = backbone.spec
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.dims: list[int] | None = None

    @property
    def spec(self):
        return self.backbone.spec

    def _once(self, x: torch.Tensor) -> list[torch.Tensor]:
        if not self.layers:
            return [self.backbone(x)]
        taps: dict[str, torch.Tensor] = {}
        hooks = [self.backbone.module_at(p).register_forward_hook(
            lambda _m, _i, out, p=p: taps.__setitem__(p, out)) for p in self.layers]
        try:
            self.backbone(x)
        finally:
            for h in hooks:
                h.remove()
        return [_pool(taps[p]) for p in self.layers]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw features ``(B, D)`` of images ``(B, 3, S, S)`` in [0, 1]."""
        x = (x - self.mean) / self.std
        blocks = self._once(x)
        if self.flip:
            blocks = [(a + b) / 2 for a, b in zip(blocks, self._once(x.flip(3)))]
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

    Attributes:
        prototypes: ``(n_way, D)`` transformed class prototypes.
        support_embeddings: ``(n_support, D)`` transformed support embeddings.
        support_labels: ``(n_support,)`` class indices.
        center: ``(D,)`` the support mean subtracted before normalisation (zeros when unused).
        support_items: ``[(path, label)]`` of the support images, when known (example explanations).
    """

    def __init__(self, backbone: Backbone, config: ProtoConfig = PLAIN, *, learn_scale: bool = False):
        super().__init__()
        self.config = config
        self.embedder = Embedder(backbone, config.layers, config.flip)
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
        is the mirror of row ``i``)."""
        raw = raw.detach().float()
        if mirrored is not None:
            raw = torch.cat([raw, mirrored.detach().float().to(raw.device)])
            labels = torch.cat([labels, labels])
        dims = self._dims(raw.shape[1])
        self.dims = torch.tensor(dims, dtype=torch.long, device=raw.device)
        pre = _pre_transform(raw, dims, self.config)
        self.center = pre.mean(0) if self.config.center else torch.zeros(raw.shape[1], device=raw.device)
        emb = _post_transform(pre, self.center if self.config.center else None, self.config)
        self.support_labels = labels.long().to(raw.device)
        self.support_embeddings = emb
        self.prototypes = compute_prototypes(emb, self.support_labels, n_way)

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

    def _resize_buffers(self, state: Mapping[str, torch.Tensor]) -> None:
        for name in ("prototypes", "support_embeddings", "support_labels", "center", "dims"):
            if name in state:
                setattr(self, name, torch.empty_like(state[name]))
