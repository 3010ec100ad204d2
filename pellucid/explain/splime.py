"""SP-LIME for images: a few representative explanations per class across a folder.

Submodular pick (Ribeiro et al., KDD 2016, section 4) chooses ``B`` explanations that together cover
the most important features: with ``W[i, j]`` the importance of feature ``j`` in explanation ``i``
and the global importance ``I_j = sqrt(sum_i |W[i, j]|)``, it greedily adds the explanation that
most increases the coverage ``sum_j I_j * [some picked explanation uses feature j]``. lime's own
``SubmodularPick`` cannot do this for images (lime issues #395, #553): each image's LIME features are
its own superpixels, so feature ``j`` of one image has nothing to do with feature ``j`` of another.

How features are made comparable here: every explanation is projected onto one fixed
``grid × grid`` lattice of cells over the model's input frame (images are already resized to the
same square input). Cell ``j``'s importance in image ``i`` is the mean positive LIME evidence (the
superpixel coefficients painted on their pixels, not the per-image rescaled heatmap, so magnitudes
stay comparable across images) inside that cell. Only each explanation's ``top_k`` cells are kept, as
SP-LIME keeps K features per explanation; everything else is 0. A feature is therefore "evidence at
this place in the frame" — meaningful for aligned images such as chest X-rays, where the same cell is
the same anatomy; for unaligned photos it measures where the model looks, not what it looks at.

The pick runs separately for each class (the explained class of each image), so the result is ``B``
representative images per class plus the share of that class's importance they cover.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from pellucid.explain.base import Explanation, check_images, get_explainer

__all__ = ["SPLimeResult", "grid_features", "submodular_pick", "sp_lime", "sp_lime_paths"]


@dataclass
class SPLimeResult:
    """Representative explanations per class.

    Attributes:
        picks: class index → picked image indices, in pick order.
        coverage: class index → share (0..1) of that class's global importance the picks cover.
        features: ``(N, grid * grid)`` sparsified cell importances, one row per image.
        explanations: the LIME explanation of every image.
        grid: cells per side of the shared lattice.
    """

    picks: dict[int, list[int]]
    coverage: dict[int, float]
    features: np.ndarray
    explanations: list[Explanation]
    grid: int
    names: list[str] = field(default_factory=list)


def grid_features(explanation: Explanation, grid: int = 8, top_k: int | None = 6) -> np.ndarray:
    """Cell importances ``(grid * grid,)`` of one explanation on the shared lattice.

    Uses the raw positive superpixel evidence when the explanation carries LIME's ``segments`` and
    ``weights``, else the heatmap. Only the ``top_k`` strongest cells are kept (None keeps all).
    """
    ex = explanation.extras
    if "segments" in ex and "weights" in ex:
        evidence = np.maximum(np.asarray(ex["weights"], dtype=np.float64), 0)[ex["segments"]]
    else:
        evidence = np.asarray(explanation.heatmap, dtype=np.float64)
    h, w = evidence.shape
    if h < grid or w < grid:
        raise ValueError(f"a {grid}x{grid} grid does not fit a {h}x{w} map: use grid <= {min(h, w)}")
    rows = np.array_split(np.arange(h), grid)
    cols = np.array_split(np.arange(w), grid)
    cells = np.array([[evidence[np.ix_(r, c)].mean() for c in cols] for r in rows]).ravel()
    if top_k is not None and top_k < cells.size:
        cut = np.argsort(-cells, kind="stable")[top_k:]
        cells[cut] = 0.0
    return cells


def submodular_pick(weights: np.ndarray, budget: int) -> tuple[list[int], float]:
    """Greedy submodular pick of ``budget`` rows of ``weights`` ``(n, d)`` maximising coverage.

    Returns:
        ``(picked row indices, covered share of the total importance in [0, 1])``. Ties go to the
        row with more total importance, then the lower index; rows adding nothing are still picked
        (distinct) until the budget is spent.
    """
    w = np.abs(np.asarray(weights, dtype=np.float64))
    if w.ndim != 2:
        raise ValueError(f"weights must be (n_explanations, n_features); got shape {w.shape}")
    n = w.shape[0]
    importance = np.sqrt(w.sum(axis=0))
    used = w > 0
    covered = np.zeros(w.shape[1], dtype=bool)
    picked: list[int] = []
    row_total = used @ importance
    for _ in range(min(budget, n)):
        gains = (used & ~covered) @ importance
        gains[picked] = -np.inf
        best = max((i for i in range(n) if i not in picked), key=lambda i: (gains[i], row_total[i], -i))
        picked.append(best)
        covered |= used[best]
    total = importance.sum()
    return picked, float(importance[covered].sum() / total) if total > 0 else 0.0


def sp_lime(model: nn.Module, images: torch.Tensor, budget: int = 2, targets: Sequence[int] | None = None, *,
            grid: int = 8, top_k: int | None = 6, explanations: Sequence[Explanation] | None = None,
            **lime_options) -> SPLimeResult:
    """SP-LIME over a batch of images ``(N, 3, H, W)`` in [0, 1].

    Args:
        budget: representative images per class.
        targets: class per image (None: predicted).
        grid, top_k: the shared lattice and the cells kept per explanation (see module docstring).
        explanations: LIME explanations already computed for ``images`` (skips LIME).
        lime_options: options of the ``lime`` explainer (``num_samples``, ``seed``, ...).
    """
    if budget < 1:
        raise ValueError(f"budget must be >= 1; got {budget}")
    images = check_images(images)
    if explanations is None:
        explanations = get_explainer("lime", **lime_options).explain(model, images, targets)
    if len(explanations) != images.shape[0]:
        raise ValueError(f"got {len(explanations)} explanations for {images.shape[0]} images")
    feats = np.stack([grid_features(e, grid, top_k) for e in explanations])
    picks: dict[int, list[int]] = {}
    coverage: dict[int, float] = {}
    for c in sorted({e.target for e in explanations}):
        idx = [i for i, e in enumerate(explanations) if e.target == c]
        chosen, cov = submodular_pick(feats[idx], budget)
        picks[c] = [idx[i] for i in chosen]
        coverage[c] = min(1.0, cov)  # a ratio of float sums can round above 1
    return SPLimeResult(picks=picks, coverage=coverage, features=feats, explanations=list(explanations), grid=grid)


def sp_lime_paths(model_dir: str | Path, paths: Sequence[str | Path], budget: int = 2, *, grid: int = 8,
                  top_k: int | None = 6, batch_size: int = 16, **lime_options) -> SPLimeResult:
    """SP-LIME over image files or folders with a model folder; ``result.names`` lists the files
    (``picks`` index into it). Targets are the model's decisions under the card's threshold policy."""
    from pellucid.explain.run import load_batches

    predictor, batches = load_batches(model_dir, paths, batch_size)
    explainer = get_explainer("lime", **lime_options)
    exps: list[Explanation] = []
    names: list[str] = []
    images = []
    for batch in batches:
        exps.extend(explainer.explain(predictor.model, batch.tensor, batch.targets))
        names.extend(batch.names)
        images.append(batch.tensor)
    for e in exps:
        e.target_name = predictor.classes[e.target]
    result = sp_lime(predictor.model, torch.cat(images), budget, grid=grid, top_k=top_k, explanations=exps)
    result.names = names
    return result
