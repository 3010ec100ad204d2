"""Few-shot prototypical networks: recognise a class from a handful of labelled examples.

This module owns the prototypical network of Snell, Swersky & Zemel, "Prototypical Networks for
Few-shot Learning" (NeurIPS 2017) on any registered backbone, and everything around it:

- the maths as pure functions — :func:`compute_prototypes`, :func:`pairwise_distances` and
  :func:`prototype_logits` (with the feature transforms that make frozen ImageNet features work
  better: power transform, per-layer L2 normalisation of multi-layer pooled features, centering on
  the support mean and L2 normalisation, "CL2N" of Wang et al., "SimpleShot", arXiv:1911.04623);
- :class:`PrototypicalNetwork`, the ``nn.Module`` served by model folders of kind ``"prototypes"``:
  images ``(B, 3, S, S)`` in [0, 1] in, logits ``(B, n_way)`` = scaled negative distances to the
  prototypes out, so prediction, evaluation and CAM explanations work unchanged;
- :class:`EpisodeSampler`, N-way K-shot Q-query episodes that never put one ``group`` in both the
  support and the query set, checked for feasibility before the first episode;
- frozen-feature mode: :func:`extract_features` runs the backbone once per image and caches the
  pooled features in memory and on disk (:data:`DEFAULT_CACHE_DIR`), so :func:`evaluate_episodes`
  over hundreds of episodes costs milliseconds;
- episodic fine-tuning of a backbone's last stages on Lightning (:class:`EpisodicFineTuner`,
  :func:`finetune_episodic`), trained from cached activations of the frozen trunk;
- the product side: :func:`fit_prototypes` writes a model folder, :func:`load_prototypes` reads it,
  and :func:`nearest_support` gives the support images closest to a query as an example-based
  explanation.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import math
import platform
import re
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pellucid.core.backbones import Backbone, create_backbone, unknown_name_error

__all__ = [
    "FewShotError",
    "ProtoConfig",
    "PLAIN",
    "IMPROVED",
    "improved_config",
    "DISTANCES",
    "DEFAULT_CACHE_DIR",
    "compute_prototypes",
    "pairwise_distances",
    "prototype_logits",
    "Embedder",
    "PrototypicalNetwork",
    "Episode",
    "EpisodeSampler",
    "split_single_group_classes",
    "extract_features",
    "clear_memory_cache",
    "evaluate_episodes",
    "shot_table",
    "format_shot_table",
    "split_backbone",
    "extract_trunk_maps",
    "EpisodicFineTuner",
    "finetune_episodic",
    "fit_prototypes",
    "load_prototypes",
    "nearest_support",
]

log = logging.getLogger(__name__)

DISTANCES = ("euclidean", "cosine")
DEFAULT_CACHE_DIR = Path("runs/.cache/features")
_FORMAT = 1  # bump when the cached feature layout changes


class FewShotError(ValueError):
    """A few-shot request that cannot be served as given (impossible episode, bad support folder)."""


# =============================================================================== configuration
@dataclass(frozen=True)
class ProtoConfig:
    """How a prototypical network embeds images and compares them.

    Attributes:
        distance: ``"euclidean"`` (squared, as in Snell et al.) or ``"cosine"``.
        layers: dotted backbone paths whose outputs are average-pooled and concatenated; ``()`` uses
            the backbone's own pooled embedding.
        flip: average the raw features of the image and its horizontal mirror (test-time
            augmentation; doubles the cost of a forward pass, and CAM explainers hooking a layer
            then see two passes — leave it off for models that will be explained).
        power: exponent of the power transform ``sign(x) |x|^p`` applied to raw features, or None.
        center: subtract the mean of the (transformed) support features before the final
            normalisation.
        normalize: L2-normalise the embedding (and, with several layers, each layer's block first).
        image_size: input side in pixels; None uses the backbone's default.
        scale: multiplier of the logits (``-scale * distance`` or ``scale * cosine``).
        layer_weights: with several layers and ``normalize``, the weight of each L2-normalised layer
            block in the concatenation (one per layer), or None for equal weights.
    """

    distance: str = "euclidean"
    layers: tuple[str, ...] = ()
    flip: bool = False
    power: float | None = None
    center: bool = False
    normalize: bool = False
    image_size: int | None = None
    scale: float = 1.0
    layer_weights: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.distance not in DISTANCES:
            raise unknown_name_error("distance", self.distance, list(DISTANCES))
        object.__setattr__(self, "layers", tuple(self.layers))
        if self.layer_weights is not None:
            object.__setattr__(self, "layer_weights", tuple(float(w) for w in self.layer_weights))
            if len(self.layer_weights) != len(self.layers):
                raise FewShotError(f"layer_weights has {len(self.layer_weights)} values for {len(self.layers)} "
                                   f"layer(s) {list(self.layers)}; give one weight per layer")
        if self.scale <= 0:
            raise FewShotError(f"scale must be > 0, got {self.scale}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = list(self.layers)
        d["layer_weights"] = None if self.layer_weights is None else list(self.layer_weights)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> ProtoConfig:
        known = set(cls.__dataclass_fields__)
        tuples = ("layers", "layer_weights")
        return cls(**{k: (tuple(v) if k in tuples and v is not None else v) for k, v in d.items() if k in known})


#: Plain prototypes (Snell et al.): pooled embedding, squared Euclidean distance.
PLAIN = ProtoConfig()
#: Power transform (p = 0.5), centering on the support mean and L2 normalisation ("CL2N") of the
#: backbone's pooled embedding; the transform of :func:`improved_config` and of episodic training.
IMPROVED = ProtoConfig(power=0.5, center=True, normalize=True, scale=10.0)


def improved_config(spec, image_size: int | None = None) -> ProtoConfig:
    """The frozen-feature variant measured best over the three dev sets (bench/bench_fewshot.py):
    :data:`IMPROVED` on the concatenated pooled outputs of the backbone's ``tap_layers`` (each
    L2-normalised, the two shallower ones at weight 0.5).

    Args:
        spec: a :class:`~pellucid.core.backbones.BackboneSpec`.
        image_size: input side (default: the spec's).
    """
    taps = tuple(spec.tap_layers)
    weights = tuple([0.5] * (len(taps) - 1) + [1.0])
    return replace(IMPROVED, layers=taps, layer_weights=weights, image_size=image_size or spec.input_size)


# =============================================================================== pure maths
def compute_prototypes(support: torch.Tensor, labels: torch.Tensor, n_way: int | None = None) -> torch.Tensor:
    """Class prototypes: the mean support embedding of each class.

    Args:
        support: support embeddings of shape (n_support, D).
        labels: class index of each support embedding, of shape (n_support,), values in 0..n_way-1.
        n_way: number of classes; defaults to ``labels.max() + 1``.

    Returns:
        Prototypes of shape (n_way, D); row ``c`` is the mean of the embeddings labelled ``c``.

    Raises:
        FewShotError: a class in 0..n_way-1 has no support embedding.
    """
    labels = labels.long()
    n_way = int(labels.max()) + 1 if n_way is None else int(n_way)
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= n_way):
        raise FewShotError(f"support labels must lie in 0..{n_way - 1}; got {sorted(set(labels.tolist()))}")
    counts = torch.bincount(labels, minlength=n_way)
    if bool((counts == 0).any()):
        empty = [i for i in range(n_way) if counts[i] == 0]
        raise FewShotError(f"prototypes need at least one support embedding per class; class(es) {empty} of "
                           f"0..{n_way - 1} have none (labels seen: {sorted(set(labels.tolist()))})")
    sums = torch.zeros(n_way, support.shape[1], dtype=support.dtype, device=support.device)
    sums = sums.index_add(0, labels, support)
    return sums / counts.to(support.dtype).unsqueeze(1)


def pairwise_distances(query: torch.Tensor, prototypes: torch.Tensor, distance: str = "euclidean") -> torch.Tensor:
    """Distances between each query and each prototype.

    Args:
        query: embeddings of shape (n_query, D).
        prototypes: embeddings of shape (n_way, D).
        distance: ``"euclidean"`` (squared Euclidean) or ``"cosine"`` (``1 - cosine similarity``,
            in [0, 2]).

    Returns:
        Distances of shape (n_query, n_way), all >= 0.
    """
    if distance == "euclidean":
        q2 = (query * query).sum(1, keepdim=True)
        p2 = (prototypes * prototypes).sum(1).unsqueeze(0)
        return (q2 + p2 - 2.0 * query @ prototypes.T).clamp_min(0.0)
    if distance == "cosine":
        return 1.0 - F.normalize(query, dim=1) @ F.normalize(prototypes, dim=1).T
    raise unknown_name_error("distance", distance, list(DISTANCES))


def _pre_transform(raw: torch.Tensor, dims: Sequence[int], cfg: ProtoConfig) -> torch.Tensor:
    """Per-image transforms that need no support statistics: power, per-layer L2 normalisation."""
    x = raw
    if cfg.power is not None:
        x = torch.sign(x) * (x.abs() + 1e-12).pow(cfg.power) if cfg.power != 1.0 else x
    if cfg.normalize and len(dims) > 1:
        weights = cfg.layer_weights if cfg.layer_weights and len(cfg.layer_weights) == len(dims) else [1.0] * len(dims)
        x = torch.cat([w * F.normalize(b, dim=1) for w, b in zip(weights, torch.split(x, list(dims), dim=1))], dim=1)
    return x


def _post_transform(x: torch.Tensor, center: torch.Tensor | None, cfg: ProtoConfig) -> torch.Tensor:
    if center is not None:
        x = x - center
    if cfg.normalize:
        x = F.normalize(x, dim=1)
    return x


def _logits_from_distances(dist: torch.Tensor, cfg: ProtoConfig, scale: torch.Tensor | float) -> torch.Tensor:
    # cosine: scale * similarity (= scale * (1 - d)); euclidean: -scale * d. Both are monotone in -d.
    return scale * (1.0 - dist) if cfg.distance == "cosine" else -scale * dist


def prototype_logits(support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor,
                     n_way: int | None = None, *, config: ProtoConfig = PLAIN, dims: Sequence[int] | None = None,
                     scale: torch.Tensor | float | None = None) -> torch.Tensor:
    """One episode, end to end: transform raw features, build prototypes, score the queries.

    Args:
        support: raw support features of shape (n_support, D).
        support_labels: episode class indices of shape (n_support,).
        query: raw query features of shape (n_query, D).
        n_way: number of classes in the episode (default ``support_labels.max() + 1``).
        config: the transforms and distance (see :class:`ProtoConfig`).
        dims: widths of the concatenated layer blocks in D (default: one block).
        scale: overrides ``config.scale`` (e.g. a learnable parameter).

    Returns:
        Logits of shape (n_query, n_way).
    """
    dims = [support.shape[1]] if dims is None else list(dims)
    s = _pre_transform(support, dims, config)
    q = _pre_transform(query, dims, config)
    center = s.mean(0, keepdim=True) if config.center else None
    s, q = _post_transform(s, center, config), _post_transform(q, center, config)
    protos = compute_prototypes(s, support_labels, n_way)
    return _logits_from_distances(pairwise_distances(q, protos, config.distance), config,
                                  config.scale if scale is None else scale)


# =============================================================================== modules
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

    def set_support(self, raw: torch.Tensor, labels: torch.Tensor, n_way: int | None = None) -> None:
        """Store the support set from raw features ``(n_support, D)`` and labels ``(n_support,)``."""
        raw = raw.detach().float()
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
        """Logits ``(n_query, n_way)`` of transformed embeddings ``(n_query, D)``."""
        if self.prototypes.numel() == 0:
            raise FewShotError("no support set: call process_support_set(images, labels) first")
        dist = pairwise_distances(embeddings, self.prototypes, self.config.distance)
        return _logits_from_distances(dist, self.config, self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(n_query, n_way)`` (scaled negative distances) of images ``(n_query, 3, S, S)``."""
        return self.logits(self.features(x))

    def _resize_buffers(self, state: Mapping[str, torch.Tensor]) -> None:
        for name in ("prototypes", "support_embeddings", "support_labels", "center", "dims"):
            if name in state:
                setattr(self, name, torch.empty_like(state[name]))


# =============================================================================== episodes
@dataclass(frozen=True)
class Episode:
    """One N-way K-shot Q-query task.

    Attributes:
        support: dataset indices of the support images, shape (n_way * n_shot,), class-major.
        support_labels: episode class index (0..n_way-1) of each support image.
        query: dataset indices of the query images, shape (n_way * n_query,), class-major.
        query_labels: episode class index of each query image.
        classes: the dataset labels of episode classes 0..n_way-1.
    """

    support: np.ndarray
    support_labels: np.ndarray
    query: np.ndarray
    query_labels: np.ndarray
    classes: tuple


def _subset_sums(sizes: Sequence[int]) -> dict[int, tuple[int, int]]:
    """Reachable subset sums of ``sizes`` → (last item index, previous sum) for reconstruction."""
    reach: dict[int, tuple[int, int]] = {0: (-1, -1)}
    for j, s in enumerate(sizes):
        for total in sorted(reach, reverse=True):
            if total + s not in reach:
                reach[total + s] = (j, total)
    return reach


def _support_sums(sizes: Sequence[int], n_shot: int, n_query: int) -> tuple[list[int] | None, int]:
    """A set of group positions whose images can hold ``n_shot`` support images while the other
    groups hold ``n_query`` query images (None if impossible), and the largest query count any
    valid support choice leaves."""
    reach = _subset_sums(sizes)
    total = sum(sizes)
    ok = sorted(s for s in reach if s >= n_shot)
    best_query = total - ok[0] if ok else -1
    fits = [s for s in ok if total - s >= n_query]
    if not fits:
        return None, best_query
    chosen, s = [], fits[0]
    while s > 0:
        j, prev = reach[s]
        chosen.append(j)
        s = prev
    return chosen, best_query


class EpisodeSampler:
    """N-way K-shot Q-query episodes in which support and query never share a ``group``.

    For each episode the sampler draws ``n_way`` classes; for each class it shuffles the class's
    groups, takes groups for the support set until they hold ``n_shot`` images, draws the support
    images from them and the query images from the remaining groups. Episode ``i`` depends only on
    ``(seed, i)``, so runs are reproducible and episodes can be drawn in any order.

    Args:
        labels: class label of every image (any hashable), length N.
        groups: group of every image (images of one group — patient, recording, near-duplicates —
            never sit in both support and query); None makes every image its own group.
        n_way: classes per episode; None uses every class.
        n_shot: support images per class.
        n_query: query images per class.
        n_episodes: episodes per iteration.
        seed: random seed.
        classes: restrict episodes to these labels (default: every label, sorted).

    Raises:
        FewShotError: before any episode is drawn, when a class cannot provide ``n_shot`` support and
            ``n_query`` query images from disjoint groups; the message names the class and counts.
    """

    def __init__(self, labels: Sequence, groups: Sequence | None = None, n_way: int | None = None, n_shot: int = 5,
                 n_query: int = 10, n_episodes: int = 500, seed: int = 0, classes: Sequence | None = None):
        self.labels = np.asarray(list(labels))
        self.groups = np.arange(len(self.labels)) if groups is None else np.asarray(list(groups))
        if len(self.groups) != len(self.labels):
            raise FewShotError(f"{len(self.labels)} labels but {len(self.groups)} groups; give one group per image")
        present = sorted(set(self.labels.tolist()))
        if classes is None:
            self.classes = present
        else:
            self.classes = list(classes)
            missing = [c for c in self.classes if c not in present]
            if missing:
                raise FewShotError(f"class(es) {missing} have no images; present: {present}")
        for name, v in (("n_shot", n_shot), ("n_query", n_query), ("n_episodes", n_episodes)):
            if int(v) < 1:
                raise FewShotError(f"{name} must be at least 1, got {v}")
        self.n_way = len(self.classes) if n_way is None else int(n_way)
        if not 2 <= self.n_way <= len(self.classes):
            raise FewShotError(f"{self.n_way}-way episodes need between 2 and {len(self.classes)} classes; the data "
                               f"has {len(self.classes)}: {', '.join(map(str, self.classes))}")
        self.n_shot, self.n_query, self.n_episodes, self.seed = int(n_shot), int(n_query), int(n_episodes), int(seed)
        self._groups: dict = {}
        self._fallback: dict = {}
        problems = []
        for c in self.classes:
            idx = np.flatnonzero(self.labels == c)
            by_group: dict = {}
            for i in idx:
                by_group.setdefault(self.groups[i], []).append(int(i))
            members = [np.array(v) for _, v in sorted(by_group.items(), key=lambda kv: str(kv[0]))]
            self._groups[c] = members
            chosen, best_query = _support_sums([len(m) for m in members], self.n_shot, self.n_query)
            if chosen is None:
                problems.append(self._infeasible(c, members, best_query))
            self._fallback[c] = chosen
        if problems:
            raise FewShotError("; ".join(problems))

    def _infeasible(self, c, members: list[np.ndarray], best_query: int) -> str:
        n, g = sum(len(m) for m in members), len(members)
        need = f"{self.n_shot}-shot + {self.n_query}-query"
        head = f"class {c!r} has {n} image{'s' * (n != 1)} in {g} group{'s' * (g != 1)}"
        if n < self.n_shot + self.n_query:
            return f"{head}; {need} needs {self.n_shot + self.n_query} images (lower the shots or queries)"
        if g == 1:
            return (f"{head}; {need} needs support and query from different groups, so at least 2 groups "
                    "(split the group, e.g. a recording into time blocks, or drop the class)")
        return (f"{head} (largest {max(len(m) for m in members)}); {need} needs support and query from disjoint "
                f"groups, and the best split leaves {max(best_query, 0)} query images for {self.n_shot} support")

    def __len__(self) -> int:
        return self.n_episodes

    def __iter__(self) -> Iterator[Episode]:
        for i in range(self.n_episodes):
            yield self.episode(i)

    def _split_class(self, c, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        members = self._groups[c]
        for _ in range(20):
            order = rng.permutation(len(members))
            taken, k = [], 0
            for j in order:
                taken.append(j)
                k += len(members[j])
                if k >= self.n_shot:
                    break
            rest = [members[j] for j in order[len(taken):]]
            if rest and sum(len(m) for m in rest) >= self.n_query:
                break
        else:  # rare: group sizes leave few valid splits; use the one found by the feasibility check
            taken = list(self._fallback[c])
            rest = [m for j, m in enumerate(members) if j not in set(taken)]
        pool_s = np.concatenate([members[j] for j in taken])
        pool_q = np.concatenate(rest)
        return (rng.choice(pool_s, self.n_shot, replace=False), rng.choice(pool_q, self.n_query, replace=False))

    def episode(self, i: int) -> Episode:
        """Episode number ``i`` (deterministic in ``(seed, i)``)."""
        rng = np.random.default_rng([self.seed, int(i)])
        picked = sorted(rng.choice(len(self.classes), self.n_way, replace=False).tolist())
        classes = tuple(self.classes[k] for k in picked)
        sup, que = [], []
        for c in classes:
            s, q = self._split_class(c, rng)
            sup.append(s)
            que.append(q)
        return Episode(support=np.concatenate(sup), support_labels=np.repeat(np.arange(self.n_way), self.n_shot),
                       query=np.concatenate(que), query_labels=np.repeat(np.arange(self.n_way), self.n_query),
                       classes=classes)

    @staticmethod
    def max_query(labels: Sequence, groups: Sequence | None, n_shot: int, classes: Sequence | None = None) -> int:
        """The largest query count per class that every class allows with ``n_shot`` support images
        (0 when some class cannot even provide the support)."""
        labels = np.asarray(list(labels))
        groups = np.arange(len(labels)) if groups is None else np.asarray(list(groups))
        best = None
        for c in (sorted(set(labels.tolist())) if classes is None else classes):
            sizes: dict = {}
            for g in groups[labels == c]:
                sizes[g] = sizes.get(g, 0) + 1
            _, q = _support_sums(list(sizes.values()), n_shot, 1)
            best = q if best is None else min(best, q)
        return max(int(best or 0), 0)


def split_single_group_classes(samples: Sequence, n_blocks: int = 10) -> list:
    """Split every class whose images all share one group into ``n_blocks`` contiguous blocks.

    Meant for classes that are frames of one recording (e.g. sonar ``fish`` and ``mine``): files
    are ordered by their name with numbers compared numerically (frame order) and cut into blocks
    named ``<group>#<k>``, so episodes can put support and query in different stretches of the
    recording. This is weaker than true group separation (neighbouring frames at block edges look
    alike); say so wherever the numbers are reported. Emits a warning naming the classes.

    Args:
        samples: :class:`~pellucid.datasets.samples.Sample` records.
        n_blocks: blocks per single-group class.

    Returns:
        New samples (same order) with the split groups.
    """
    from pellucid.datasets.samples import Sample

    def natural(path: str):
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", Path(path).name)]

    by_class: dict[str, set] = {}
    for s in samples:
        by_class.setdefault(s.label, set()).add(s.group)
    single = sorted(c for c, g in by_class.items() if len(g) == 1)
    if not single:
        return list(samples)
    warnings.warn(f"class(es) {single} are one group each; split into {n_blocks} blocks in file-name order "
                  "(weaker than group separation)", stacklevel=2)
    new_group: dict[str, str] = {}
    for c in single:
        items = sorted((s for s in samples if s.label == c), key=lambda s: natural(s.path))
        for k, s in enumerate(items):
            new_group[s.path] = f"{s.group}#{k * n_blocks // len(items)}"
    return [Sample(s.path, s.label, new_group.get(s.path, s.group)) for s in samples]


# =============================================================================== feature cache
_MEMORY: dict[str, torch.Tensor] = {}


def clear_memory_cache() -> None:
    """Forget the in-memory feature cache (the disk cache stays)."""
    _MEMORY.clear()


def _weights_fingerprint(module: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _files_fingerprint(paths: Sequence[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        st = Path(p).stat()
        h.update(f"{Path(p).resolve()}\t{st.st_mtime_ns}\t{st.st_size}\n".encode())
    return h.hexdigest()[:16]


def _cache_key(kind: str, embedder_desc: dict, weight_info: dict, paths: Sequence[str], weights_fp: str) -> str:
    desc = {"format": _FORMAT, "kind": kind, **embedder_desc, "weights": weight_info.get("source"),
            "weights_detail": weight_info.get("detail"), "weights_fp": weights_fp,
            "files": _files_fingerprint(paths), "n": len(paths)}
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _decode(paths: Sequence[str], size: int, progress: bool) -> np.ndarray:
    from pellucid.datasets.torchdata import ImageCache

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # failures are raised below, with their file names
        cache = ImageCache(paths, size, workers=2, progress=progress)
    if cache.failures:
        path, err = cache.failures[0]
        raise FewShotError(f"{len(cache.failures)} image(s) could not be read (first: {err}); remove or fix them")
    return cache.arrays


def _run_batches(fn, paths: Sequence[str], size: int, batch_size: int, progress: bool, chunk: int = 256
                 ) -> torch.Tensor:
    from pellucid.datasets.torchdata import to_tensor

    outs = []
    for start in range(0, len(paths), chunk):
        arrays = _decode(paths[start:start + chunk], size, progress)
        for b in range(0, len(arrays), batch_size):
            x = torch.stack([to_tensor(a) for a in arrays[b:b + batch_size]])
            outs.append(fn(x.contiguous(memory_format=torch.channels_last)))
    return torch.cat(outs) if outs else torch.zeros(0)


def _cached(key: str, cache_dir: Path | None, compute, meta: dict) -> dict[str, torch.Tensor]:
    """``compute()`` (a dict of tensors) unless ``key`` is in memory or on disk under ``cache_dir``."""
    if key in _MEMORY:
        return _MEMORY[key]
    file = None if cache_dir is None else Path(cache_dir) / f"{key}.safetensors"
    if file is not None and file.exists():
        from safetensors.torch import load_file

        try:
            out = load_file(str(file))
            _MEMORY[key] = out
            log.info("features from disk cache %s", file)
            return out
        except Exception as err:  # a truncated file from an interrupted run: recompute
            log.warning("ignoring unreadable feature cache %s (%s)", file, err)
    out = compute()
    _MEMORY[key] = out
    if file is not None:
        from safetensors.torch import save_file

        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in out.items()}, str(tmp),
                  metadata={k: str(v) for k, v in meta.items()})
        tmp.replace(file)
    return out


def extract_features(embedder: Embedder | PrototypicalNetwork, paths: Sequence[str | Path], *,
                     image_size: int | None = None, weight_info: dict | None = None,
                     cache_dir: str | Path | None = DEFAULT_CACHE_DIR, batch_size: int = 32,
                     progress: bool = False) -> torch.Tensor:
    """Raw features of image files, computed once (one backbone pass per image) and cached.

    The cache key hashes the backbone name, its weight source and a fingerprint of its weights, the
    image size, the pooled layers, flip, and every file's path, modification time and size; a hit in
    memory or under ``cache_dir`` skips the backbone entirely.

    Args:
        embedder: an :class:`Embedder` or a :class:`PrototypicalNetwork` (its embedder is used).
        paths: image files (any format :func:`~pellucid.datasets.readers.read_image` reads).
        image_size: input side in pixels (default: the backbone's).
        weight_info: the backbone's weight record (part of the key; default ``{}``).
        cache_dir: folder of the disk cache, or None for memory only.
        batch_size: images per forward pass.
        progress: show progress bars.

    Returns:
        Raw features of shape (len(paths), D), float32 on the CPU.
    """
    if isinstance(embedder, PrototypicalNetwork):
        embedder = embedder.embedder
    paths = [str(p) for p in paths]
    size = int(image_size or embedder.spec.input_size)
    desc = {"backbone": embedder.spec.name, "size": size, "layers": list(embedder.layers), "flip": embedder.flip,
            "mean": list(embedder.spec.mean), "std": list(embedder.spec.std)}
    key = _cache_key("pooled", desc, weight_info or {}, paths, _weights_fingerprint(embedder.backbone))

    def compute() -> torch.Tensor:
        was = embedder.training
        embedder.eval()
        try:
            with torch.no_grad():
                feats = _run_batches(lambda x: embedder(x).float(), paths, size, batch_size, progress).clone()
        finally:
            embedder.train(was)
        return {"features": feats, "dims": torch.tensor(embedder.dims or [feats.shape[1]], dtype=torch.long)}

    out = _cached(key, None if cache_dir is None else Path(cache_dir), compute, {**desc, "n": len(paths)})
    embedder.dims = out["dims"].tolist()
    return out["features"]


# =============================================================================== evaluation
def _as_features(features) -> tuple[torch.Tensor, list[int] | None]:
    if isinstance(features, Mapping):
        blocks = [torch.as_tensor(v, dtype=torch.float32) for v in features.values()]
        return torch.cat(blocks, dim=1), [b.shape[1] for b in blocks]
    return torch.as_tensor(features, dtype=torch.float32), None


def evaluate_episodes(features, labels: Sequence, groups: Sequence | None = None, *, n_way: int | None = None,
                      n_shot: int = 5, n_query: int = 10, n_episodes: int = 500, seed: int = 0,
                      config: ProtoConfig = PLAIN, dims: Sequence[int] | None = None,
                      classes: Sequence | None = None) -> dict:
    """Few-shot accuracy over episodes of cached features (no backbone runs here).

    Args:
        features: raw features of shape (N, D), or a mapping of named blocks (N, D_i) concatenated in
            order (their widths become ``dims``).
        labels: class label per image (N,).
        groups: group per image (N,), or None.
        n_way, n_shot, n_query, n_episodes, seed, classes: see :class:`EpisodeSampler`.
        config: transforms and distance (:class:`ProtoConfig`).
        dims: widths of the layer blocks concatenated in ``features``.

    Returns:
        ``{"accuracy": mean, "ci95": 1.96 * std / sqrt(n), "std": std, "episodes": n, "n_way", "n_shot",
        "n_query"}``, accuracy in [0, 1].
    """
    feats, block_dims = _as_features(features)
    dims = list(dims) if dims is not None else block_dims
    sampler = EpisodeSampler(labels, groups, n_way, n_shot, n_query, n_episodes, seed, classes)
    accs = np.empty(len(sampler))
    with torch.no_grad():
        for i, ep in enumerate(sampler):
            logits = prototype_logits(feats[ep.support], torch.from_numpy(ep.support_labels), feats[ep.query],
                                      sampler.n_way, config=config, dims=dims)
            accs[i] = float((logits.argmax(1).numpy() == ep.query_labels).mean())
    std = float(accs.std(ddof=1)) if len(accs) > 1 else 0.0
    return {"accuracy": float(accs.mean()), "ci95": 1.96 * std / math.sqrt(len(accs)), "std": std,
            "episodes": len(accs), "n_way": sampler.n_way, "n_shot": sampler.n_shot, "n_query": sampler.n_query}


def shot_table(features, labels: Sequence, groups: Sequence | None = None, *, shots: Sequence[int] = (1, 5, 10),
               n_way: int | None = None, n_query: int = 10, n_episodes: int = 500, seed: int = 0,
               config: ProtoConfig = PLAIN, dims: Sequence[int] | None = None) -> list[dict]:
    """:func:`evaluate_episodes` for each shot count.

    When some class cannot provide ``n_query`` queries beside ``k`` shots, the row uses the largest
    query count every class allows and says so in ``note``; when even that is impossible the row
    carries the reason in ``error`` instead of numbers.

    Returns:
        One dict per shot count: the :func:`evaluate_episodes` result plus ``note`` / ``error``.
    """
    rows = []
    for k in shots:
        q = n_query
        note = ""
        try:
            EpisodeSampler(labels, groups, n_way, k, q, 1, seed)
        except FewShotError as err:
            q = min(n_query, EpisodeSampler.max_query(labels, groups, k))
            if q < 1:
                rows.append({"n_shot": int(k), "error": str(err)})
                continue
            note = f"{q} queries per class (the most every class allows with {k} shots)"
        try:
            res = evaluate_episodes(features, labels, groups, n_way=n_way, n_shot=k, n_query=q,
                                    n_episodes=n_episodes, seed=seed, config=config, dims=dims)
        except FewShotError as err:
            rows.append({"n_shot": int(k), "error": str(err)})
            continue
        rows.append({**res, "note": note})
    return rows


def format_shot_table(rows: Sequence[dict], title: str = "") -> str:
    """Markdown table of :func:`shot_table` rows (accuracy ± 95 % interval half-width)."""
    lines = ([f"**{title}**", ""] if title else []) + [
        "| shots | way | queries/class | episodes | accuracy | 95% CI |", "|---:|---:|---:|---:|---:|---|"]
    notes = []
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['n_shot']} | – | – | – | n/a | {r['error']} |")
            continue
        lines.append(f"| {r['n_shot']} | {r['n_way']} | {r['n_query']} | {r['episodes']} | {r['accuracy']:.3f} | "
                     f"± {r['ci95']:.3f} |")
        if r.get("note"):
            notes.append(f"{r['n_shot']}-shot: {r['note']}")
    return "\n".join(lines + ([""] + notes if notes else []))


# =============================================================================== episodic fine-tuning
def _ordered_modules(net: nn.Module, stages: Sequence[str]) -> list[tuple[str, nn.Module]]:
    """Top-level modules of ``net`` in definition order, descending into containers that hold stages."""
    out: list[tuple[str, nn.Module]] = []

    def walk(mod: nn.Module, prefix: str):
        for name, child in mod.named_children():
            path = f"{prefix}{name}"
            if any(s.startswith(path + ".") for s in stages):
                walk(child, path + ".")
            else:
                out.append((path, child))

    walk(net, "")
    return out


class _Tail(nn.Module):
    """The trainable end of a backbone: trunk activations → raw (multi-layer pooled) features.

    Holds the backbone's own tail modules (shared, not copied), so training it trains the backbone.
    """

    def __init__(self, trunk_layer: str, modules: list[tuple[str, nn.Module]], layers: Sequence[str]):
        super().__init__()
        self.trunk_layer = trunk_layer
        self.paths = [p for p, _ in modules]
        self.stages = nn.ModuleList([m for _, m in modules])
        self.layers = tuple(layers)
        self.dims: list[int] | None = None

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """Raw features ``(B, D)`` of trunk activations ``(B, C, H, W)``."""
        x = maps
        taps = {self.trunk_layer: x}
        for p, m in zip(self.paths, self.stages):
            x = m(x)
            taps[p] = x
        blocks = [_pool(taps[p]) for p in self.layers] if self.layers else [_pool(x)]
        self.dims = [b.shape[1] for b in blocks]
        return torch.cat(blocks, dim=1)


def split_backbone(backbone: Backbone, train_from: str, layers: Sequence[str] = ()) -> tuple[str, _Tail]:
    """Split a backbone before the stage ``train_from`` into a frozen trunk and a trainable tail.

    Args:
        backbone: the backbone (its modules are shared, not copied: training the tail trains it).
        train_from: a dotted stage path from ``backbone.spec.stages``; it and every later module train.
        layers: layers the tail pools into its output (each must be the trunk's last layer or lie in
            the tail); ``()`` gives the backbone's pooled embedding.

    Returns:
        ``(trunk_layer, tail)``: the path whose output feeds the tail, and the tail module mapping
        those activations ``(B, C, H, W)`` to raw features ``(B, D)``.

    Raises:
        FewShotError: the backbone cannot be split there (checked numerically on a small input).
    """
    spec = backbone.spec
    if train_from not in spec.stages:
        raise unknown_name_error("stage", train_from, list(spec.stages))
    mods = _ordered_modules(backbone.net, spec.stages)
    names = [p for p, _ in mods]
    k = names.index(train_from)
    if k == 0:
        raise FewShotError(f"train_from={train_from!r} is the first stage: nothing is left to cache; "
                           "pick a later stage")
    tail_mods = [(p, m) for p, m in mods[k:] if not isinstance(m, nn.Identity) and p not in ("classifier", "fc", "head")]
    trunk_layer = names[k - 1]
    bad = [p for p in layers if p != trunk_layer and p not in [q for q, _ in tail_mods]]
    if bad:
        raise FewShotError(f"layer(s) {bad} are not at or after the trunk output {trunk_layer!r}; "
                           f"tail layers: {[trunk_layer] + [q for q, _ in tail_mods]}")
    tail = _Tail(trunk_layer, tail_mods, layers)
    # check: trunk hook + tail must reproduce the backbone's own embedding
    was = backbone.training
    backbone.eval()
    captured = {}
    h = backbone.module_at(trunk_layer).register_forward_hook(lambda _m, _i, o: captured.__setitem__("x", o))
    try:
        with torch.no_grad():
            x = torch.rand(2, 3, min(spec.input_size, 64), min(spec.input_size, 64),
                           generator=torch.Generator().manual_seed(0))
            ref = backbone(x)
            got = _Tail(trunk_layer, tail_mods, ())(captured["x"])
    finally:
        h.remove()
        backbone.train(was)
    if got.shape != ref.shape or not torch.allclose(got, ref, atol=1e-4, rtol=1e-3):
        raise FewShotError(f"backbone {spec.name!r} cannot be split before {train_from!r} for episodic fine-tuning "
                           "(its forward is not a plain chain of stages); choose another stage or backbone")
    return trunk_layer, tail


def extract_trunk_maps(backbone: Backbone, trunk_layer: str, paths: Sequence[str | Path], *,
                       image_size: int | None = None, weight_info: dict | None = None,
                       cache_dir: str | Path | None = DEFAULT_CACHE_DIR, batch_size: int = 32,
                       progress: bool = False) -> torch.Tensor:
    """Activations of ``trunk_layer`` for image files, once per image and cached (float16).

    Returns:
        Activations of shape (N, C, H, W), float16 (they are the frozen trunk's output; training
        the tail from them needs no backbone pass through the trunk).
    """
    paths = [str(p) for p in paths]
    spec = backbone.spec
    size = int(image_size or spec.input_size)
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    desc = {"backbone": spec.name, "size": size, "trunk": trunk_layer, "mean": list(spec.mean), "std": list(spec.std)}
    key = _cache_key("trunk", desc, weight_info or {}, paths, _weights_fingerprint(backbone))

    def run(x: torch.Tensor) -> torch.Tensor:
        captured = {}
        h = backbone.module_at(trunk_layer).register_forward_hook(lambda _m, _i, o: captured.__setitem__("x", o))
        try:
            backbone((x - mean) / std)
        finally:
            h.remove()
        return captured["x"].half().contiguous()

    def compute() -> torch.Tensor:
        was = backbone.training
        backbone.eval()
        try:
            with torch.no_grad():
                return {"maps": _run_batches(run, paths, size, batch_size, progress).clone()}
        finally:
            backbone.train(was)

    return _cached(key, None if cache_dir is None else Path(cache_dir), compute, {**desc, "n": len(paths)})["maps"]


class _EpisodeMaps(torch.utils.data.Dataset):
    def __init__(self, maps: torch.Tensor, sampler: EpisodeSampler, flip: bool, seed: int):
        self.maps, self.sampler, self.flip, self.seed = maps, sampler, flip, seed

    def __len__(self) -> int:
        return len(self.sampler)

    def __getitem__(self, i: int):
        ep = self.sampler.episode(i)
        idx = np.concatenate([ep.support, ep.query])
        x = self.maps[torch.from_numpy(idx)].float()
        if self.flip:  # mirror half of the activations: a cheap stand-in for image flips
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
            m = torch.rand(len(idx), generator=g) < 0.5
            x[m] = x[m].flip(3)
        return x, torch.from_numpy(ep.support_labels), torch.from_numpy(ep.query_labels), len(ep.support)


try:  # Lightning is a core dependency; keep the import local to this class's definition
    import lightning as L

    _LightningModule = L.LightningModule
except ImportError:  # pragma: no cover - lightning is in the project dependencies
    L = None
    _LightningModule = nn.Module


class EpisodicFineTuner(_LightningModule):
    """Episodic training of a backbone's tail with the prototypical loss (Snell et al., 2017).

    Each training step is one episode: the tail embeds the cached trunk activations of its support
    and query images, prototypes are built from the support, and the loss is the cross-entropy of the
    query logits. BatchNorm statistics stay frozen (episodes are small); the logit scale is learnt.

    Args:
        tail: the trainable tail from :func:`split_backbone`.
        config: transforms and distance (as in frozen mode; ``config.scale`` initialises the scale).
        lr: AdamW learning rate of the tail.
        weight_decay: AdamW weight decay.
    """

    def __init__(self, tail: nn.Module, config: ProtoConfig = IMPROVED, lr: float = 1e-4, weight_decay: float = 1e-4):
        super().__init__()
        self.tail = tail
        self.config = config
        self.lr, self.weight_decay = lr, weight_decay
        self.log_scale = nn.Parameter(torch.tensor(math.log(config.scale), dtype=torch.float32))
        self.dims: list[int] | None = None

    def on_train_batch_start(self, batch, batch_idx) -> None:
        for m in self.tail.modules():  # frozen BatchNorm statistics (Lightning switches to train mode)
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()

    def training_step(self, batch, batch_idx):
        x, s_lab, q_lab, n_sup = batch
        raw = self.tail(x)
        logits = prototype_logits(raw[:n_sup], s_lab, raw[n_sup:], int(s_lab.max()) + 1, config=self.config,
                                  dims=self.dims, scale=self.log_scale.exp())
        loss = F.cross_entropy(logits, q_lab)
        acc = (logits.argmax(1) == q_lab).float().mean()
        self.log_dict({"train_loss": loss, "train_acc": acc}, prog_bar=True, batch_size=1)
        return loss

    def configure_optimizers(self):
        params = [p for p in self.tail.parameters() if p.requires_grad]
        return torch.optim.AdamW([{"params": params, "lr": self.lr, "weight_decay": self.weight_decay},
                                  {"params": [self.log_scale], "lr": 1e-2, "weight_decay": 0.0}])


def finetune_episodic(tail: nn.Module, maps: torch.Tensor, labels: Sequence, groups: Sequence | None = None, *,
                      config: ProtoConfig = IMPROVED, n_way: int | None = None, n_shot: int = 5, n_query: int = 10,
                      episodes: int = 200, lr: float = 1e-4, seed: int = 0, flip: bool = True,
                      progress: bool = False, dims: Sequence[int] | None = None) -> EpisodicFineTuner:
    """Train ``tail`` (in place) with episodes drawn from ``maps`` on a Lightning Trainer (CPU or GPU).

    Args:
        tail: from :func:`split_backbone`.
        maps: cached trunk activations of the training images, (N, C, H, W).
        labels, groups: per training image; episodes respect groups as in :class:`EpisodeSampler`.
        config: transforms and distance used in the loss.
        n_way, n_shot, n_query: episode shape.
        episodes: training steps (one episode each).
        lr: learning rate of the tail.
        seed: seeds the episodes and Lightning.
        flip: randomly mirror activations (augmentation).
        progress: show Lightning's progress bar.
        dims: widths of the tail's layer blocks.

    Returns:
        The trained :class:`EpisodicFineTuner` (its ``tail`` shares modules with the backbone).
    """
    if L is None:  # pragma: no cover
        raise FewShotError("episodic fine-tuning needs the 'lightning' package: pip install lightning")
    sampler = EpisodeSampler(labels, groups, n_way, n_shot, n_query, episodes, seed)
    module = EpisodicFineTuner(tail, config, lr=lr)
    module.dims = list(dims) if dims is not None else None
    loader = torch.utils.data.DataLoader(_EpisodeMaps(maps, sampler, flip, seed), batch_size=None, shuffle=False)
    L.seed_everything(seed, workers=True, verbose=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
        trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=progress,
                            enable_model_summary=False, num_sanity_val_steps=0, deterministic=False)
        trainer.fit(module, loader)
    module.eval()
    return module


# =============================================================================== model folders
def _fit_scale(emb: torch.Tensor, labels: torch.Tensor, n_way: int, cfg: ProtoConfig) -> tuple[float, float] | None:
    """Leave-one-out over the support set: (fitted logit scale, LOO accuracy), or None when some
    class has a single support image."""
    counts = torch.bincount(labels, minlength=n_way)
    if bool((counts < 2).any()):
        return None
    from pellucid.core.calibration import fit_temperature

    sums = torch.zeros(n_way, emb.shape[1]).index_add(0, labels, emb)
    dist = torch.empty(len(emb), n_way)
    for i in range(len(emb)):
        protos = sums / counts.unsqueeze(1)
        c = labels[i]
        protos[c] = (sums[c] - emb[i]) / (counts[c] - 1)
        dist[i] = pairwise_distances(emb[i:i + 1], protos, cfg.distance)[0]
    base = _logits_from_distances(dist, cfg, 1.0)
    acc = float((base.argmax(1) == labels).float().mean())
    try:
        temperature = fit_temperature(base.double(), labels)
    except ValueError:
        return None
    return float(min(max(1.0 / temperature, 1e-2), 1e4)), acc


def fit_prototypes(support_dir: str | Path, out: str | Path, *, backbone: str = "efficientnet_lite0",
                   pretrained: bool | str = True, checkpoint: str | None = None, config: ProtoConfig | None = None,
                   task: str = "fewshot", cache_dir: str | Path | None = DEFAULT_CACHE_DIR,
                   progress: bool = False) -> Path:
    """Build a prototypes model folder from a folder of labelled support images.

    Args:
        support_dir: one sub-folder per class (or a ``manifest.csv`` with ``path,label[,group]``).
        out: model folder to write (``model.safetensors`` + ``card.json``).
        backbone: registered backbone name.
        pretrained: weight source as in :func:`~pellucid.core.backbones.create_backbone` (``False`` for
            random weights — tests only; the card records it).
        checkpoint: explicit weights file or model folder for the backbone.
        config: embedding and distance; default :func:`improved_config` of the backbone.
        task: task name written in the card; a registered task name is accepted only when its classes
            are exactly the support classes.
        cache_dir: feature cache folder (None: memory only).
        progress: show progress bars.

    Returns:
        The model folder. The card's ``support`` lists every support file with its label (for the
        nearest-example explanation) and ``metrics`` the leave-one-out accuracy on the support set.

    Raises:
        DataError: unreadable support folder. FewShotError: fewer than two classes, or a task name
        that belongs to another task.
    """
    import time

    import pellucid
    from pellucid.core.modelfolder import save_model
    from pellucid.core.tasks import get_task, list_tasks
    from pellucid.datasets.samples import class_counts, load_samples

    t0 = time.time()
    support_dir = Path(support_dir)
    samples = load_samples(support_dir)
    classes = sorted(class_counts(samples))
    if len(classes) < 2:
        raise FewShotError(f"{support_dir}: found {len(classes)} class ({', '.join(classes)}); a prototypes model "
                           "needs at least 2 class sub-folders with a few images each")
    if task in list_tasks() and list(get_task(task).classes) != classes:
        raise FewShotError(f"task name {task!r} belongs to the registered task with classes "
                           f"{list(get_task(task).classes)}, not {classes}; pick another --task name")
    bb, info = create_backbone(backbone, pretrained=pretrained, checkpoint=checkpoint)
    if config is None:
        config = improved_config(bb.spec)
    size = int(config.image_size or bb.spec.input_size)
    config = replace(config, image_size=size)
    net = PrototypicalNetwork(bb, config)
    paths = [s.path for s in samples]
    labels = torch.tensor([classes.index(s.label) for s in samples])
    raw = extract_features(net, paths, image_size=size, weight_info=info, cache_dir=cache_dir, progress=progress)
    net.set_support(raw, labels, len(classes))
    fitted = _fit_scale(net.support_embeddings, labels, len(classes), config)
    metrics: dict = {"n_support": len(samples), "per_class": class_counts(samples)}
    if fitted is None:
        warnings.warn("a class has a single support image: the logit scale is not fitted (probabilities are "
                      "uncalibrated); add a second image per class", stacklevel=2)
    else:
        scale, loo = fitted
        net.log_scale.fill_(math.log(scale))
        config = replace(config, scale=scale)
        net.config = config
        metrics["support_loo_accuracy"] = loo
    spec = bb.spec
    card = {
        "kind": "prototypes",
        "pellucid_version": pellucid.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "task": task,
        "title": f"few-shot prototypes from {support_dir.name}",
        "classes": classes,
        "positive_class": None,
        "modality": "other",
        "intended_use": "Research prototype: nearest-prototype classification from a few labelled examples; "
                        "not validated for clinical use.",
        "explainers": ["gradcam"],
        "backbone": spec.to_dict(),
        "weights": info,
        "preprocessing": {"image_size": size, "channels_in": 3, "resize": "squash", "input_range": [0.0, 1.0],
                          "mean": list(spec.mean), "std": list(spec.std)},
        "threshold": None,
        "calibration": {"temperature": 1.0, "method": "logit scale fitted by leave-one-out NLL on the support set"
                        if fitted else "none"},
        "fewshot": {**config.to_dict(), "method": "prototypical network (Snell et al., 2017)"},
        "support": [{"path": str(Path(s.path).resolve()), "label": s.label} for s in samples],
        "metrics": metrics,
        "split": {},
        "training": {"seconds": round(time.time() - t0, 1), "python": platform.python_version(),
                     "torch": torch.__version__, "support_dir": str(support_dir.resolve())},
        "recipe": {"mode": "frozen features"},
    }
    net.support_items = [(str(Path(s.path).resolve()), s.label) for s in samples]
    return save_model(out, net, card)


def load_prototypes(folder: str | Path, card: dict) -> PrototypicalNetwork:
    """Rebuild the :class:`PrototypicalNetwork` of a prototypes model folder (eval mode, CPU).

    Raises:
        ModelFolderError: missing weights, or weights that do not fit the card's backbone.
    """
    from safetensors.torch import load_file

    from pellucid.core.modelfolder import ModelFolderError

    folder = Path(folder)
    weights = folder / "model.safetensors"
    if not weights.exists():
        raise ModelFolderError(f"{folder} has no model.safetensors: rerun `pellucid fewshot fit`")
    try:
        config = ProtoConfig.from_dict(card["fewshot"])
        bb, _ = create_backbone(card["backbone"]["name"], pretrained=False)
    except (KeyError, TypeError) as err:
        raise ModelFolderError(f"{folder}/card.json: prototypes card is missing or has a bad {err}") from err
    pre = card.get("preprocessing", {})
    if pre.get("mean") and pre.get("std"):
        bb.spec = replace(bb.spec, mean=tuple(pre["mean"]), std=tuple(pre["std"]))
    net = PrototypicalNetwork(bb, config)
    state = load_file(str(weights))
    net._resize_buffers(state)
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        raise ModelFolderError(f"{weights} does not fit backbone {card['backbone']['name']!r}: "
                               f"{str(err).splitlines()[0]}") from err
    if net.n_way != len(card["classes"]):
        raise ModelFolderError(f"{weights} holds {net.n_way} prototypes but the card lists "
                               f"{len(card['classes'])} classes")
    net.support_items = [(s["path"], s["label"]) for s in card.get("support", [])]
    return net.eval()


@torch.no_grad()
def nearest_support(model: PrototypicalNetwork, image: torch.Tensor, k: int = 3) -> list[tuple[str, str, float]]:
    """The ``k`` support images closest to one query: an example-based explanation.

    Args:
        model: a loaded prototypes model (:func:`load_prototypes`).
        image: one image ``(3, S, S)`` or ``(1, 3, S, S)`` in [0, 1], preprocessed as for prediction.
        k: how many neighbours.

    Returns:
        ``[(path, label, distance)]`` nearest first, distances in the model's metric.
    """
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.ndim != 4 or image.shape[0] != 1:
        raise FewShotError(f"nearest_support explains one image (3, S, S); got shape {tuple(image.shape)}")
    if not model.support_items:
        raise FewShotError("this prototypes model does not list its support images; refit it with "
                           "`pellucid fewshot fit`")
    was = model.training
    model.eval()
    try:
        emb = model.features(image.to(model.prototypes.device))
    finally:
        model.train(was)
    dist = pairwise_distances(emb, model.support_embeddings, model.config.distance)[0]
    order = torch.argsort(dist)[:k].tolist()
    return [(model.support_items[i][0], model.support_items[i][1], float(dist[i])) for i in order]
