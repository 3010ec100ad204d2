"""Probability calibration: temperature scaling and top-label calibration error.

This module owns how raw logits become calibrated probabilities and how calibration is measured.
Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017) fits one
scalar T > 0 on held-out logits by minimising the negative log-likelihood of
``softmax(logits / T)``; it never changes the argmax, so accuracy is untouched. The expected
calibration error is the top-label ECE over equal-width confidence bins (k/M, (k+1)/M], as in that
paper; it equals torchmetrics' ``MulticlassCalibrationError(norm='l1')`` except for confidences
lying exactly on a bin edge, which torchmetrics puts in the upper bin. :func:`reliability_bins`
exposes the per-bin numbers for plots.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "default_smoothing",
    "fit_temperature",
    "apply_temperature",
    "expected_calibration_error",
    "reliability_bins",
]


def _as_logits(logits: np.ndarray | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(logits) if not isinstance(logits, torch.Tensor) else logits)
    t = t.detach().to(device="cpu", dtype=torch.float64)
    if t.ndim != 2 or t.shape[1] < 2:
        raise ValueError(f"logits must have shape (N, C) with C >= 2; got shape {tuple(t.shape)}.")
    return t


def _as_targets(y: np.ndarray | torch.Tensor, n: int, n_classes: int) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y).detach().cpu()
    t = t.reshape(-1)
    if t.numel() != n:
        raise ValueError(f"Got {n} rows of logits but {t.numel()} labels; expected one label each.")
    if t.is_floating_point() and not torch.all(t == t.round()):
        raise ValueError("y must hold integer class indices.")
    t = t.long()
    if n and (int(t.min()) < 0 or int(t.max()) >= n_classes):
        raise ValueError(
            f"y holds indices in [{int(t.min())}, {int(t.max())}]; expected [0, {n_classes - 1}]."
        )
    return t


def _separated(z: torch.Tensor, target: torch.Tensor) -> bool:
    """True when no case has a wrong class's logit strictly above its own class's: then the NLL of
    ``softmax(z / T)`` keeps falling as T → 0 and has no minimum."""
    own = z.gather(1, target[:, None])
    return bool((z <= own).all())


def default_smoothing(logits: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> float:
    """The label smoothing :func:`fit_temperature` uses by default on these cases: ``1 / (N + 1)`` when the
    N cases are ranked all right (the plain fit has no minimum), else 0."""
    z = _as_logits(logits)
    target = _as_targets(y, z.shape[0], z.shape[1])
    return 1.0 / (z.shape[0] + 1) if z.shape[0] and _separated(z, target) else 0.0


def fit_temperature(
    logits: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, max_iter: int = 200,
    label_smoothing: float | None = None,
) -> float:
    """Fit the temperature T > 0 that minimises the NLL of ``softmax(logits / T)``.

    Optimises log T with L-BFGS (strong Wolfe line search) in float64 on the CPU, starting at T = 1.

    Args:
        logits: Held-out logits of shape (N, C).
        y: True class indices of shape (N,).
        max_iter: Maximum L-BFGS iterations.
        label_smoothing: Weight in [0, 1) of the uniform distribution mixed into the targets.
            ``None`` (the default) smooths only when the plain fit has no minimum: when no case
            ranks a wrong class above its own (a small validation part that the model gets all
            right), the NLL falls without end as T → 0 and the plain fit returns a T near 0 whose
            probabilities are all 0 or 1. Then the targets get ``1 / (N + 1)`` of smoothing, so
            that N right answers out of N are taken as a small chance of error, not as none (the
            rule of succession); a fit with at least one ranked-wrong case is left unsmoothed.

    Returns:
        The fitted temperature; values > 1 soften over-confident predictions.

    Raises:
        ValueError: Mismatched shapes, labels out of range, or no cases.
    """
    z = _as_logits(logits)
    target = _as_targets(y, z.shape[0], z.shape[1])
    if z.shape[0] == 0:
        raise ValueError("fit_temperature needs at least one case; got 0.")
    if label_smoothing is None:
        label_smoothing = default_smoothing(z, target)
    if not 0.0 <= float(label_smoothing) < 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1); got {label_smoothing}.")
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), target, label_smoothing=label_smoothing)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    if not math.isfinite(temperature) or temperature <= 0.0:
        raise ValueError(
            f"Temperature fitting diverged (T = {temperature}); check that the logits are finite."
        )
    return temperature


def apply_temperature(logits: np.ndarray | torch.Tensor, T: float) -> np.ndarray:
    """Calibrated probabilities ``softmax(logits / T)``.

    Args:
        logits: Logits of shape (N, C).
        T: Temperature, > 0 (from :func:`fit_temperature`).

    Returns:
        Probabilities of shape (N, C), float64, rows summing to 1.
    """
    if not T > 0 or not math.isfinite(T):
        raise ValueError(f"Temperature must be a finite number > 0; got {T}.")
    z = _as_logits(logits)
    return torch.softmax(z / float(T), dim=1).numpy()


def _top_label(probs: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"probs must have shape (N, C); got shape {p.shape}.")
    labels = np.asarray(y).reshape(-1)
    if labels.size != p.shape[0]:
        raise ValueError(f"Got {p.shape[0]} rows of probs but {labels.size} labels.")
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == labels).astype(np.float64)
    return confidence, correct


def reliability_bins(probs: np.ndarray, y: np.ndarray, n_bins: int = 15) -> dict:
    """Per-bin top-label accuracy and confidence over equal-width confidence bins.

    Bin k covers (k / n_bins, (k + 1) / n_bins]; a confidence of exactly 0 falls in the first bin.

    Args:
        probs: Probabilities of shape (N, C).
        y: True class indices of shape (N,).
        n_bins: Number of equal-width bins on [0, 1].

    Returns:
        Dict of numpy arrays of shape (n_bins,) — ``centers``, ``accuracy`` and ``confidence``
        (NaN in empty bins), ``counts`` — plus ``edges`` of shape (n_bins + 1,) and the scalar
        ``ece``.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1; got {n_bins}.")
    confidence, correct = _top_label(probs, y)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    counts = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.bincount(index, weights=correct, minlength=n_bins) / counts
        mean_conf = np.bincount(index, weights=confidence, minlength=n_bins) / counts
    n = counts.sum()
    gaps = np.where(counts > 0, np.abs(accuracy - mean_conf), 0.0)
    ece = float((counts * gaps).sum() / n) if n else math.nan
    return {
        "edges": edges,
        "centers": (edges[:-1] + edges[1:]) / 2.0,
        "accuracy": accuracy,
        "confidence": mean_conf,
        "counts": counts,
        "ece": ece,
    }


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, n_bins: int = 15) -> float:
    """Top-label expected calibration error with equal-width bins.

    ECE = sum over bins of (n_bin / N) * |accuracy_bin - mean confidence_bin|.

    Args:
        probs: Probabilities of shape (N, C).
        y: True class indices of shape (N,).
        n_bins: Number of equal-width bins on [0, 1].

    Returns:
        ECE in [0, 1]; NaN for zero cases.
    """
    return reliability_bins(probs, y, n_bins)["ece"]
