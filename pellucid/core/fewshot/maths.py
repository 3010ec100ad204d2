"""Prototype maths as pure tensor functions: class prototypes (:func:`compute_prototypes`),
query-to-prototype distances (:func:`pairwise_distances`) and one episode end to end
(:func:`prototype_logits`), with the feature transforms that make frozen ImageNet features work
better — power transform, per-layer L2 normalisation of multi-layer pooled features, centering on
the support mean and L2 normalisation ("CL2N" of Wang et al., "SimpleShot", arXiv:1911.04623)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from pellucid.core.fewshot.config import DISTANCES, PLAIN, FewShotError, ProtoConfig
from pellucid.registry import unknown_name_error

__all__ = [
    "compute_prototypes",
    "pairwise_distances",
    "prototype_logits",
    "refine_prototypes",
]


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


def refine_prototypes(support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor,
                      n_way: int | None = None, *, steps: int = 1, scale: torch.Tensor | float = 1.0,
                      distance: str = "euclidean") -> torch.Tensor:
    """Transductive prototypes: soft k-means on the query batch, seeded by the support.

    The refinement of Ren et al., "Meta-Learning for Semi-Supervised Few-Shot Classification"
    (ICLR 2018): each step assigns every query softly to the classes (softmax of the scaled negative
    distances to the current prototypes) and recomputes each prototype as the weighted mean of its
    support embeddings (weight 1) and the queries (weight = their assignment to the class).

    Args:
        support: transformed support embeddings (n_support, D).
        support_labels: class index per support embedding (n_support,).
        query: transformed query embeddings (n_query, D), the batch being classified.
        n_way: number of classes (default ``support_labels.max() + 1``).
        steps: refinement steps; 0 returns the plain prototypes.
        scale: logit scale of the soft assignments (the model's fitted scale).
        distance: ``"euclidean"`` or ``"cosine"``.

    Returns:
        Refined prototypes (n_way, D).
    """
    protos = compute_prototypes(support, support_labels, n_way)
    if steps <= 0 or len(query) == 0:
        return protos
    labels = support_labels.long()
    sums = torch.zeros_like(protos).index_add(0, labels, support)
    counts = torch.bincount(labels, minlength=protos.shape[0]).to(support.dtype)
    for _ in range(int(steps)):
        # softmax is shift-invariant, so -scale * d serves both distances
        w = torch.softmax(-scale * pairwise_distances(query, protos, distance), dim=1)
        protos = (sums + w.T @ query) / (counts + w.sum(0)).unsqueeze(1)
    return protos


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
