"""Few-shot prototypical networks: recognise a class from a handful of labelled examples.

This package owns the prototypical network of Snell, Swersky & Zemel, "Prototypical Networks for
Few-shot Learning" (NeurIPS 2017) on any registered backbone, and everything around it, one concern
per module (every public name is re-exported here, so ``from pellucid.core.fewshot import X``
works for all of them):

- :mod:`~pellucid.core.fewshot.config` — :class:`ProtoConfig`, the presets :data:`PLAIN` and
  :data:`IMPROVED`, :func:`improved_config`, :func:`default_config` (what ``fewshot fit`` fits, on
  :data:`DEFAULT_BACKBONE`) and :class:`FewShotError`;
- :mod:`~pellucid.core.fewshot.maths` — the maths as pure functions: :func:`compute_prototypes`,
  :func:`pairwise_distances` and :func:`prototype_logits` (with the feature transforms that make
  frozen ImageNet features work better: power transform, per-layer L2 normalisation of
  multi-layer pooled features, centering on the support mean and L2 normalisation, "CL2N" of
  Wang et al., "SimpleShot", arXiv:1911.04623), and :func:`refine_prototypes`, the opt-in
  transductive soft k-means of the prototypes on a query batch;
- :mod:`~pellucid.core.fewshot.head` — the logistic head (``ProtoConfig.head = "logistic"``):
  :func:`fit_logistic` on the support embeddings and its leave-one-out logits
  (:func:`loo_logistic_logits`) for the logit scale;
- :mod:`~pellucid.core.fewshot.network` — :class:`Embedder` and :class:`PrototypicalNetwork`, the
  ``nn.Module`` served by model folders of kind ``"prototypes"``: images ``(B, 3, S, S)`` in
  [0, 1] in, logits ``(B, n_way)`` = scaled negative distances to the prototypes out, so
  prediction, evaluation and CAM explanations work unchanged;
- :mod:`~pellucid.core.fewshot.episodes` — :class:`EpisodeSampler`, N-way K-shot Q-query episodes
  that never put one ``group`` in both the support and the query set, checked for feasibility
  before the first episode;
- :mod:`~pellucid.core.fewshot.features` — frozen-feature mode: :func:`extract_features` runs the
  backbone once per image and caches the pooled features in memory and on disk
  (:data:`DEFAULT_CACHE_DIR`);
- :mod:`~pellucid.core.fewshot.evaluation` — :func:`evaluate_episodes` (one fixed embedding and the
  nearest prototype, over hundreds of episodes of cached features in milliseconds),
  :func:`evaluate_fit` (the model ``fewshot fit`` would fit, refitted on each episode's support set:
  what ``pellucid fewshot eval`` reports), :func:`shot_table`, :func:`fit_shot_table` and
  :func:`format_shot_table`;
- :mod:`~pellucid.core.fewshot.finetune` — episodic fine-tuning of a backbone's last stages on
  Lightning (:class:`EpisodicFineTuner`, :func:`finetune_episodic`), trained from cached
  activations of the frozen trunk;
- :mod:`~pellucid.core.fewshot.folder` — the product side: :func:`fit_prototypes` writes a model
  folder (:func:`fit_and_choose` is its fitting step on features, over the
  :func:`candidate_embeddings`; :func:`fit_support` fits one embedding; with ``auto_backbones``
  :func:`select_embedding` picks the embedding — Lite0 alone or concatenated with more backbones,
  :func:`embedding_config` — by leave-one-out on the support set), :func:`load_prototypes` reads
  it, and :func:`nearest_support` gives the support images closest to a query as an
  example-based explanation.

The command line (``pellucid fewshot {fit,eval}``) lives in :mod:`pellucid.core.fewshot_cli`.
"""
from __future__ import annotations

from pellucid.core.backbones import Backbone, create_backbone  # noqa: F401 (re-exported)
from pellucid.core.fewshot.config import (
    DISTANCES,
    IMPROVED,
    PLAIN,
    FewShotError,
    DEFAULT_BACKBONE,
    ProtoConfig,
    default_config,
    improved_config,
    weight_candidates,
    embedding_weight_candidates,
    layer_groups,
    BACKBONE_CANDIDATES,
    HEADS,
    HEAD_C,
)
from pellucid.core.fewshot.maths import (  # noqa: F401 (the private transforms are used by tests and bench)
    _logits_from_distances,
    _post_transform,
    _pre_transform,
    compute_prototypes,
    pairwise_distances,
    prototype_logits,
    refine_prototypes,
)
from pellucid.core.fewshot.head import fit_logistic, logistic_logits, loo_logistic_logits
from pellucid.core.fewshot.network import Embedder, PrototypicalNetwork
from pellucid.core.fewshot.episodes import Episode, EpisodeSampler, split_single_group_classes
from pellucid.core.fewshot.features import DEFAULT_CACHE_DIR, clear_memory_cache, extract_features
from pellucid.core.fewshot.evaluation import (evaluate_episodes, evaluate_fit, fit_shot_table,
                                             format_shot_table, shot_table)
from pellucid.core.fewshot.finetune import (
    EpisodicFineTuner,
    extract_trunk_maps,
    finetune_episodic,
    split_backbone,
)
from pellucid.core.fewshot.folder import (
    CRITERIA,
    Choice,
    candidate_embeddings,
    embedding_config,
    embedding_features,
    fit_and_choose,
    fit_head_scale,
    fit_prototypes,
    fit_support,
    load_prototypes,
    luminance_task,
    nearest_support,
    select_embedding,
    support_channels,
)
from pellucid.registry import unknown_name_error  # noqa: F401 (re-exported)

__all__ = [
    "FewShotError",
    "ProtoConfig",
    "PLAIN",
    "IMPROVED",
    "improved_config",
    "default_config",
    "weight_candidates",
    "embedding_weight_candidates",
    "layer_groups",
    "BACKBONE_CANDIDATES",
    "DEFAULT_BACKBONE",
    "DISTANCES",
    "HEADS",
    "HEAD_C",
    "DEFAULT_CACHE_DIR",
    "compute_prototypes",
    "pairwise_distances",
    "prototype_logits",
    "refine_prototypes",
    "Embedder",
    "PrototypicalNetwork",
    "Episode",
    "EpisodeSampler",
    "split_single_group_classes",
    "extract_features",
    "clear_memory_cache",
    "evaluate_episodes",
    "evaluate_fit",
    "fit_shot_table",
    "shot_table",
    "format_shot_table",
    "split_backbone",
    "extract_trunk_maps",
    "EpisodicFineTuner",
    "finetune_episodic",
    "fit_prototypes",
    "support_channels",
    "luminance_task",
    "fit_support",
    "fit_and_choose",
    "Choice",
    "candidate_embeddings",
    "embedding_features",
    "fit_head_scale",
    "fit_logistic",
    "logistic_logits",
    "loo_logistic_logits",
    "select_embedding",
    "embedding_config",
    "CRITERIA",
    "load_prototypes",
    "nearest_support",
]
