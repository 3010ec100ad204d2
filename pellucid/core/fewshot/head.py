"""The logistic head of a few-shot model: multinomial logistic regression fitted on the support
embeddings, the classifier that replaces the nearest prototype when ``ProtoConfig.head`` is
``"logistic"``.

A nearest-prototype rule weighs every direction of the embedding alike; a linear classifier fitted
on the same support embeddings learns which directions separate the classes (as in Tian et al.,
"Rethinking Few-Shot Image Classification", ECCV 2020, where logistic regression on frozen
embeddings beats the prototypes). On the default embedding, 5 shots per class, it gained +0.006
(tb_cxr), +0.015 (waste) and +0.005 (sonar) over 50 dev support draws and +0.006, +0.016, +0.004
over 50 confirm draws (bench/results/fewshot-head*.md). The fit is scikit-learn's L2-penalised
``LogisticRegression`` (L-BFGS); its logits are then scaled by a temperature fitted on leave-one-out
logits of the support set (:func:`pellucid.core.fewshot.folder.calibrated_scale`), so the
probabilities of a model fitted on 5 images per class are not the near-certain ones of a
separable training set.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

__all__ = ["fit_logistic", "logistic_logits", "loo_logistic_logits"]


def fit_logistic(emb: torch.Tensor, labels: torch.Tensor, n_way: int, c: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights ``(n_way, D)`` and bias ``(n_way,)`` of a logistic regression on ``emb`` ``(N, D)``.

    ``c`` is scikit-learn's inverse L2 strength. Every class in 0..n_way-1 needs a support row. Two
    classes: the binary model's ``w, b`` become the logit pair ``(-w/2, w/2)``, ``(-b/2, b/2)``
    (same softmax)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    x = emb.detach().double().cpu().numpy()
    y = labels.detach().long().cpu().numpy()
    present = np.unique(y)
    if len(present) != n_way or present.min() != 0 or present.max() != n_way - 1:
        from pellucid.core.fewshot.config import FewShotError

        raise FewShotError(f"the logistic head needs support images of every class 0..{n_way - 1}; "
                           f"got {sorted(present.tolist())}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        lr = LogisticRegression(C=float(c), max_iter=3000).fit(x, y)
    w = torch.from_numpy(lr.coef_).float()
    b = torch.from_numpy(lr.intercept_).float()
    if n_way == 2:
        w, b = torch.cat([-w / 2, w / 2]), torch.cat([-b / 2, b / 2])
    return w, b


def logistic_logits(emb: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Unscaled logits ``(B, n_way)`` of embeddings ``(B, D)``."""
    return emb @ weight.T + bias


def loo_logistic_logits(emb: torch.Tensor, labels: torch.Tensor, n_way: int, c: float,
                        n_images: int | None = None) -> torch.Tensor | None:
    """Leave-one-out logits ``(n_images, n_way)`` of the support set: each image scored by the head
    fitted without it (and without its augmented copies: row ``i + k * n_images`` belongs to image
    ``i``). None when some class has a single image (leaving it out would remove the class)."""
    n_images = len(emb) if n_images is None else int(n_images)
    labels = labels.long()
    if bool((torch.bincount(labels[:n_images], minlength=n_way) < 2).any()):
        return None
    owner = torch.arange(len(emb)) % n_images
    out = torch.empty(n_images, n_way)
    for i in range(n_images):
        keep = owner != i
        w, b = fit_logistic(emb[keep], labels[keep], n_way, c)
        out[i] = logistic_logits(emb[i:i + 1].float(), w, b)[0]
    return out
