"""Evaluation figures as PNG files: ROC, confusion, training curves, reliability, probabilities.

This module owns the pictures that go into model folders, reports and the web app. Every function
draws on its own :class:`matplotlib.figure.Figure` (Agg canvas, never pyplot), so importing or
calling it changes no global matplotlib state, selects no backend and leaks no open figures; each
writes one PNG (parent folders are created) and returns its :class:`~pathlib.Path`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import auc, roc_curve

from pellucid.core.calibration import reliability_bins
from pellucid.core.fonts import cover_scripts

__all__ = [
    "plot_roc",
    "plot_confusion",
    "plot_training_curves",
    "plot_reliability",
    "plot_probabilities",
]

_DPI = 100


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    cover_scripts(fig)  # class names in Chinese, Hindi, ...: drawn, not boxes
    fig.tight_layout()
    fig.savefig(out, format="png", dpi=_DPI)
    return out


def _check_probs(probs: Any, classes: Sequence[str]) -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != len(classes):
        raise ValueError(
            f"probs has shape {p.shape}; expected (N, {len(classes)}) for classes {list(classes)}."
        )
    return p


def plot_roc(
    y_true: np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    path: str | Path,
    positive_index: int | None = None,
) -> Path:
    """ROC curve(s) with the AUC in the legend.

    Binary tasks get one curve for the positive class (``positive_index``, default 1); more classes
    get one one-vs-rest curve each. A class with no positive or no negative cases has no ROC curve:
    it is left out with a warning.

    Args:
        y_true: True class indices of shape (N,).
        probs: Probabilities of shape (N, C).
        classes: Class names in column order.
        path: Output PNG path.
        positive_index: Positive class column for a binary task.

    Returns:
        The PNG path.
    """
    p = _check_probs(probs, classes)
    y = np.asarray(y_true).reshape(-1)
    if y.size != p.shape[0]:
        raise ValueError(f"Got {y.size} labels for {p.shape[0]} rows of probs.")
    if len(classes) == 2:
        columns = [1 if positive_index is None else int(positive_index)]
    else:
        columns = list(range(len(classes)))
    fig = _new_figure(5.0, 4.5)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="chance")
    for c in columns:
        is_pos = y == c
        if is_pos.all() or not is_pos.any():
            warnings.warn(
                f"No ROC curve for class {classes[c]!r}: {int(is_pos.sum())} of {y.size} cases are "
                "positive, and a ROC curve needs both.",
                stacklevel=2,
            )
            continue
        fpr, tpr, _ = roc_curve(is_pos, p[:, c])
        ax.plot(fpr, tpr, linewidth=1.5, label=f"{classes[c]} (AUC = {auc(fpr, tpr):.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title("ROC" if len(columns) == 1 else "ROC, one-vs-rest")
    ax.legend(loc="lower right", fontsize="small")
    return _save(fig, path)


def plot_confusion(
    cm: np.ndarray | Sequence[Sequence[int]],
    classes: Sequence[str],
    path: str | Path,
    normalize: bool = True,
) -> Path:
    """Confusion-matrix heatmap, rows = true class, columns = predicted class, counts annotated.

    Args:
        cm: Counts of shape (C, C).
        classes: Class names in order.
        path: Output PNG path.
        normalize: Colour by the fraction of each true class (row) and annotate it under the count;
            otherwise colour by raw counts.

    Returns:
        The PNG path.
    """
    counts = np.asarray(cm, dtype=np.float64)
    k = len(classes)
    if counts.shape != (k, k):
        raise ValueError(
            f"cm has shape {counts.shape}; expected ({k}, {k}) for classes {list(classes)}."
        )
    if normalize:
        rows = counts.sum(axis=1, keepdims=True)
        shown = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
        vmax = 1.0
    else:
        shown = counts
        vmax = max(float(counts.max()), 1.0)
    size = max(4.0, 1.0 + 0.8 * k)
    fig = _new_figure(size + 1.0, size)
    ax = fig.add_subplot()
    image = ax.imshow(shown, cmap="Blues", vmin=0.0, vmax=vmax)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    for i in range(k):
        for j in range(k):
            text = f"{int(counts[i, j])}"
            if normalize:
                text += f"\n{shown[i, j]:.0%}"
            colour = "white" if shown[i, j] > 0.6 * vmax else "black"
            ax.text(j, i, text, ha="center", va="center", color=colour, fontsize="small")
    tilt = k > 3
    ax.set_xticks(
        range(k), labels=list(classes), rotation=45 if tilt else 0, ha="right" if tilt else "center"
    )
    ax.set_yticks(range(k), labels=list(classes))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix" + (" (row-normalised)" if normalize else ""))
    return _save(fig, path)


def _series(history: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, row in enumerate(history):
        value = row.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
            continue
        if not math.isfinite(float(value)):
            continue
        x = row.get("epoch", i)
        xs.append(float(x) if isinstance(x, (int, float, np.number)) else float(i))
        ys.append(float(value))
    return xs, ys


def plot_training_curves(history: list[dict], path: str | Path) -> Path:
    """Training curves from per-epoch history rows.

    Rows look like ``{'epoch': 0, 'train_loss': ..., 'val_loss': ..., 'val_acc': ..., 'lr': ...}``;
    whichever numeric keys exist are drawn: keys containing ``loss`` on one axis, ``lr`` on a
    log-scale axis, every other key on a metrics axis. Missing or non-finite values are skipped.

    Args:
        history: One dict per epoch; ``epoch`` is the x axis (row index when absent).
        path: Output PNG path.

    Returns:
        The PNG path.

    Raises:
        ValueError: ``history`` is empty or has no numeric values besides ``epoch`` / ``step``.
    """
    keys: list[str] = []
    for row in history:
        for key in row:
            if key not in keys and key not in ("epoch", "step"):
                keys.append(key)
    keys = [k for k in keys if _series(history, k)[1]]
    if not keys:
        raise ValueError(
            f"history has no numeric values to plot ({len(history)} rows); expected rows like "
            "{'epoch': 0, 'train_loss': 0.7, 'val_loss': 0.6, 'val_acc': 0.8}."
        )
    groups = {
        "loss": [k for k in keys if "loss" in k],
        "metric": [k for k in keys if "loss" not in k and k != "lr"],
        "learning rate": [k for k in keys if k == "lr"],
    }
    groups = {name: ks for name, ks in groups.items() if ks}
    fig = _new_figure(4.0 * len(groups) + 1.0, 3.8)
    for n, (name, ks) in enumerate(groups.items(), start=1):
        ax = fig.add_subplot(1, len(groups), n)
        for key in ks:
            xs, ys = _series(history, key)
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=key)
        if name == "learning rate" and all(v > 0 for v in _series(history, "lr")[1]):
            ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return _save(fig, path)


def plot_reliability(
    probs: np.ndarray,
    y: np.ndarray,
    path: str | Path,
    n_bins: int = 15,
    T: float | None = None,
) -> Path:
    """Reliability diagram: top-label accuracy against confidence per bin, with the ECE.

    Args:
        probs: Probabilities of shape (N, C), as they will be reported (already temperature-scaled
            if scaling is used).
        y: True class indices of shape (N,).
        path: Output PNG path.
        n_bins: Number of equal-width confidence bins.
        T: The temperature that produced ``probs``, shown in the title when given.

    Returns:
        The PNG path.
    """
    bins = reliability_bins(probs, y, n_bins)
    width = 1.0 / n_bins
    filled = bins["counts"] > 0
    fig = _new_figure(5.0, 5.0)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.5", linewidth=1, label="perfect calibration")
    centers = bins["centers"][filled]
    accuracy = bins["accuracy"][filled]
    confidence = bins["confidence"][filled]
    ax.bar(
        centers,
        accuracy,
        width=width,
        color="tab:blue",
        edgecolor="black",
        linewidth=0.5,
        alpha=0.8,
        label="accuracy",
    )
    ax.vlines(centers, accuracy, confidence, color="tab:red", linewidth=1.5)
    ax.plot(centers, confidence, "o", color="tab:red", markersize=4, label="mean confidence")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("confidence (top-label probability)")
    ax.set_ylabel("accuracy")
    title = f"Reliability, ECE = {bins['ece']:.3f}"
    if T is not None:
        title += f" (T = {T:.2f})"
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize="small")
    return _save(fig, path)


def _bar_text(p: float) -> str:
    """A bar's probability label that never claims certainty (``> 99.9%``, ``< 0.1%``)."""
    if 0.999 < p < 1.0:
        return "> 99.9%"
    if 0.0 < p < 0.001:
        return "< 0.1%"
    return f"{p:.1%}"


def plot_probabilities(
    probs_row: np.ndarray | Sequence[float],
    classes: Sequence[str],
    path: str | Path,
    threshold: float | None = None,
    positive_index: int | None = None,
) -> Path:
    """Horizontal bar chart of one prediction's class probabilities, the top class highlighted.

    Args:
        probs_row: Probabilities of shape (C,).
        classes: Class names in order.
        path: Output PNG path.
        threshold: Decision threshold on the positive class, drawn as a dashed mark across that class's
            bar only (it says nothing about the other bars).
        positive_index: Index of the class the threshold applies to; None takes the last class of a
            binary task (required with ``threshold`` for more classes).

    Returns:
        The PNG path.
    """
    p = np.asarray(probs_row, dtype=np.float64).reshape(-1)
    if p.size != len(classes):
        raise ValueError(
            f"probs_row has {p.size} values; expected {len(classes)} for {list(classes)}."
        )
    k = len(classes)
    if threshold is not None and positive_index is None:
        if k != 2:
            raise ValueError(f"a threshold on {k} classes needs positive_index (which class it applies to)")
        positive_index = 1
    if positive_index is not None and not 0 <= positive_index < k:
        raise ValueError(f"positive_index {positive_index} out of range for {k} classes {list(classes)}")
    colours = ["tab:blue" if i == int(np.argmax(p)) else "0.7" for i in range(k)]
    fig = _new_figure(5.0, max(2.0, 0.5 * k + 1.2))
    ax = fig.add_subplot()
    positions = np.arange(k)
    ax.barh(positions, p, color=colours, height=0.8)
    for pos, value in zip(positions, p):
        ax.text(min(value + 0.01, 0.88), pos, _bar_text(float(value)), va="center", fontsize="small")
    if threshold is not None:
        label = f"threshold {threshold:.2f} on P({classes[positive_index]})"
        ax.plot([threshold, threshold], [positive_index - 0.48, positive_index + 0.48], color="tab:red",
                linestyle="--", linewidth=1.5, label=label)
        ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize="small", frameon=False)
    ax.set_yticks(positions, labels=list(classes))
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("probability")
    return _save(fig, path)
