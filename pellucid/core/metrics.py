"""Final classification scores, bootstrap confidence intervals and decision thresholds.

This module owns how a set of predicted probabilities becomes reportable numbers: the decision
rule (:func:`decide`, with an optional threshold on the positive class), the choice of that
threshold from validation data (:func:`choose_threshold`), and the headline metrics with
confidence intervals (:func:`classification_metrics`, rendered by :func:`format_metrics` and
:func:`format_metric` from :mod:`pellucid.core.metric_text`). Which interval a metric gets — Wilson
for proportions, the percentile bootstrap for the rest, none with a "too few labelled inputs" note
below a minimum count — is :mod:`pellucid.core.intervals`. Point estimates come from scikit-learn. The bootstrap recomputes the same
definitions from per-resample confusion matrices and weighted Mann-Whitney sums, because calling
scikit-learn once per resample and metric is two orders of magnitude too slow for 1000 resamples;
``tests/core/test_metrics.py`` checks that both paths agree.
An undefined metric (AUROC with one class present, precision with no positive predictions, ...) is
NaN with a warning, never a made-up number, and is written as ``None`` in the JSON-able result.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from pellucid.core.intervals import (MIN_LABELLED, MIN_PER_CLASS, PROPORTION_METRICS, apply_wilson,
                                    small_sample_notes)
from pellucid.core.metric_text import format_metric, format_metrics
from pellucid.registry import did_you_mean

__all__ = [
    "THRESHOLD_POLICIES",
    "METRIC_NAMES",
    "choose_threshold",
    "decide",
    "classification_metrics",
    "format_metrics",
    "format_metric",
    "MIN_LABELLED",
    "MIN_PER_CLASS",
]

THRESHOLD_POLICIES = ("argmax", "youden", "sensitivity")
"""Ways to pick the binary decision threshold: ``argmax`` (0.5), ``youden`` (max TPR - FPR),
``sensitivity`` (sensitivity >= a target at the best specificity)."""

METRIC_NAMES = (
    "accuracy",
    "balanced_accuracy",
    "precision",
    "sensitivity",
    "specificity",
    "f1",
    "auroc",
    "macro_f1",
)
"""Metric names reported by :func:`classification_metrics`, in display order."""

# Upper bound on resamples x cases held in memory at once during the bootstrap.
_BOOT_CHUNK_ELEMENTS = 2_000_000
# Warn when more than this fraction of resamples had to be skipped for a metric.
_SKIP_WARN_FRACTION = 0.1


def _did_you_mean(kind: str, given: str, available: Sequence[str]) -> str:
    hint = did_you_mean(given, available)
    listing = ", ".join(repr(a) for a in available)
    return f"Unknown {kind} {given!r}.{hint} Available: {listing}."


# --------------------------------------------------------------------------------------------------
# thresholds and decisions


def choose_threshold(
    y_true: np.ndarray,
    p_pos: np.ndarray,
    policy: str = "argmax",
    target_sensitivity: float = 0.95,
) -> float:
    """Choose a decision threshold on the positive-class probability (binary tasks only).

    Args:
        y_true: Labels of shape (N,), 1 (or True) for the positive class and 0 for the negative.
        p_pos: Positive-class probabilities of shape (N,), in [0, 1].
        policy: One of :data:`THRESHOLD_POLICIES`.

            * ``argmax``: 0.5, i.e. the class with the larger probability.
            * ``youden``: the ROC threshold maximising Youden's J = sensitivity + specificity - 1;
              among ties the highest threshold wins.
            * ``sensitivity``: the highest threshold whose sensitivity is at least
              ``target_sensitivity``, which is the one with the best specificity.
        target_sensitivity: Required sensitivity for the ``sensitivity`` policy, in (0, 1].

    Returns:
        The threshold; a case is positive when ``p_pos >= threshold``.

    Raises:
        ValueError: Unknown policy (with a did-you-mean), mismatched shapes, labels other than 0/1,
            or a data-driven policy on data without both classes.
    """
    if policy not in THRESHOLD_POLICIES:
        raise ValueError(_did_you_mean("threshold policy", str(policy), THRESHOLD_POLICIES))
    if policy == "argmax":
        return 0.5
    y = np.asarray(y_true).ravel()
    p = np.asarray(p_pos, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(
            f"y_true has {y.size} labels but p_pos has {p.size} probabilities; expected one each."
        )
    if y.dtype == bool:
        y = y.astype(int)
    values = set(np.unique(y).tolist())
    if not values <= {0, 1}:
        raise ValueError(
            f"choose_threshold needs binary labels 0/1 (1 = positive); got values {sorted(values)}."
        )
    n_pos = int((y == 1).sum())
    n_neg = int((y == 0).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            f"The {policy!r} threshold policy needs both classes; got {n_pos} positive and "
            f"{n_neg} negative cases. Use a validation set with both, or policy='argmax'."
        )
    fpr, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)
    # thresholds[0] is +inf (nothing called positive); it is never a useful operating point.
    fpr, tpr, thresholds = fpr[1:], tpr[1:], thresholds[1:]
    if policy == "youden":
        # All thresholds in a run of J-maximising ROC points, down to the next lower score, give the
        # same J on this data; take the middle of that interval rather than its upper edge, so a small
        # validation set does not push the operating point against the positive cases.
        j = tpr - fpr
        best = np.flatnonzero(j >= j.max() - 1e-12)
        end = best[0]
        while end + 1 < len(j) and j[end + 1] >= j.max() - 1e-12:
            end += 1
        upper = float(thresholds[best[0]])
        below = float(thresholds[end + 1]) if end + 1 < len(thresholds) else 0.0
        return float((upper + below) / 2.0)
    if not 0.0 < target_sensitivity <= 1.0:
        raise ValueError(f"target_sensitivity must be in (0, 1]; got {target_sensitivity}.")
    # tpr is non-decreasing as the threshold decreases, so the first hit is the highest threshold.
    hit = int(np.argmax(tpr >= target_sensitivity - 1e-12))
    return float(thresholds[hit])


def decide(
    probs: np.ndarray, threshold: float | None = None, positive_index: int | None = None
) -> np.ndarray:
    """Turn class probabilities into predicted class indices.

    Args:
        probs: Probabilities of shape (N, C).
        threshold: ``None`` for argmax. Otherwise (binary tasks only) a case is predicted positive
            when ``probs[:, positive_index] >= threshold``.
        positive_index: Column of the positive class; defaults to 1 for binary tasks.

    Returns:
        Predicted class indices of shape (N,), dtype int64.

    Raises:
        ValueError: ``probs`` is not 2-D, or a threshold is given for a task that is not binary.
    """
    p = np.asarray(probs)
    if p.ndim != 2:
        raise ValueError(f"probs must have shape (N, C); got shape {p.shape}.")
    if threshold is None:
        return np.argmax(p, axis=1).astype(np.int64)
    if p.shape[1] != 2:
        raise ValueError(
            f"A decision threshold needs a binary task (2 columns); probs has {p.shape[1]} "
            "columns. Pass threshold=None to use argmax."
        )
    pos = 1 if positive_index is None else int(positive_index)
    if pos not in (0, 1):
        raise ValueError(f"positive_index must be 0 or 1 for a binary task; got {positive_index}.")
    return np.where(p[:, pos] >= threshold, pos, 1 - pos).astype(np.int64)


# --------------------------------------------------------------------------------------------------
# vectorised definitions used by the bootstrap


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _nanmean_last(x: np.ndarray) -> np.ndarray:
    """Mean over the last axis ignoring NaN; NaN (without a RuntimeWarning) where all are NaN."""
    valid = ~np.isnan(x)
    return _safe_div(np.where(valid, x, 0.0).sum(axis=-1), valid.sum(axis=-1))


def _metrics_from_confusion(cm: np.ndarray, positive_index: int | None) -> dict[str, np.ndarray]:
    """Confusion-matrix metrics for a batch of matrices of shape (B, C, C), rows = true class.

    Same definitions as scikit-learn with ``zero_division=np.nan``: per-class ratios with a zero
    denominator are NaN, and macro averages are taken over the classes where they are defined.
    """
    cm = cm.astype(np.float64)
    tp = np.diagonal(cm, axis1=1, axis2=2)
    support = cm.sum(axis=2)
    predicted = cm.sum(axis=1)
    n = support.sum(axis=1, keepdims=True)
    fp = predicted - tp
    fn = support - tp
    tn = n - support - predicted + tp
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    specificity = _safe_div(tn, tn + fp)
    f1 = _safe_div(2 * tp, 2 * tp + fp + fn)
    out = {
        "accuracy": _safe_div(tp.sum(axis=1), n[:, 0]),
        "balanced_accuracy": _nanmean_last(recall),
        "macro_f1": _nanmean_last(f1),
    }
    if positive_index is not None:
        out["precision"] = precision[:, positive_index]
        out["sensitivity"] = recall[:, positive_index]
        out["specificity"] = specificity[:, positive_index]
        out["f1"] = f1[:, positive_index]
    else:
        out["precision"] = _nanmean_last(precision)
        out["sensitivity"] = _nanmean_last(recall)
        out["specificity"] = _nanmean_last(specificity)
        out["f1"] = out["macro_f1"]
    return out


def _grouped_sum(weights: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """Sum ``weights`` of shape (B, N) into ``n_groups`` bins given by ``groups`` of shape (N,)."""
    b = weights.shape[0]
    flat = (np.arange(b)[:, None] * n_groups + groups[None, :]).ravel()
    return np.bincount(flat, weights=weights.ravel(), minlength=b * n_groups).reshape(b, n_groups)


def _weighted_auroc(scores: np.ndarray, is_pos: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """AUROC of each resample from case multiplicities (Mann-Whitney U with ties counted as 1/2).

    Args:
        scores: Scores of shape (N,).
        is_pos: Boolean positives of shape (N,).
        counts: How often each case occurs in each resample, shape (B, N).

    Returns:
        AUROC per resample, shape (B,); NaN where a resample lacks positives or negatives.
    """
    _, group = np.unique(scores, return_inverse=True)
    group = group.ravel()
    n_groups = int(group.max()) + 1 if group.size else 0
    pos_w = _grouped_sum(counts * is_pos[None, :], group, n_groups)
    neg_w = _grouped_sum(counts * ~is_pos[None, :], group, n_groups)
    neg_below = np.cumsum(neg_w, axis=1) - neg_w
    u = (pos_w * (neg_below + 0.5 * neg_w)).sum(axis=1)
    return _safe_div(u, pos_w.sum(axis=1) * neg_w.sum(axis=1))


def _auroc_from_counts(
    y: np.ndarray, probs: np.ndarray, counts: np.ndarray, positive_index: int | None
) -> np.ndarray:
    if positive_index is not None:
        return _weighted_auroc(probs[:, positive_index], y == positive_index, counts)
    n_classes = probs.shape[1]
    per_class = np.stack(
        [_weighted_auroc(probs[:, c], y == c, counts) for c in range(n_classes)], axis=1
    )
    # Macro one-vs-rest is undefined as soon as one class is absent from the resample.
    return per_class.mean(axis=1)


def _bootstrap(
    y: np.ndarray,
    pred: np.ndarray,
    probs: np.ndarray,
    positive_index: int | None,
    n_boot: int,
    seed: int,
) -> dict[str, np.ndarray]:
    """Metric values over ``n_boot`` resamples of the cases, with replacement; NaN if undefined."""
    n, n_classes = probs.shape
    rng = np.random.default_rng(seed)
    cell = y * n_classes + pred
    chunk = max(1, _BOOT_CHUNK_ELEMENTS // max(n, 1))
    parts: list[dict[str, np.ndarray]] = []
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        idx = rng.integers(0, n, size=(b, n))
        counts = _counts(idx, n)
        cm = _grouped_sum(counts, cell, n_classes * n_classes).reshape(b, n_classes, n_classes)
        values = _metrics_from_confusion(cm, positive_index)
        values["auroc"] = _auroc_from_counts(y, probs, counts, positive_index)
        parts.append(values)
    return {k: np.concatenate([p[k] for p in parts]) for k in METRIC_NAMES}


def _counts(idx: np.ndarray, n: int) -> np.ndarray:
    """Multiplicity of each case in each resample: (B, N) indices -> (B, N) counts."""
    b = idx.shape[0]
    flat = (np.arange(b)[:, None] * n + idx).ravel()
    return np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)


# --------------------------------------------------------------------------------------------------
# point estimates (scikit-learn)


def _point_estimates(
    y: np.ndarray,
    pred: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    positive_index: int | None,
) -> tuple[dict[str, float], list[str]]:
    """Point estimates with scikit-learn, plus a reason for each metric that is undefined."""
    n_classes = len(classes)
    labels = list(range(n_classes))
    reasons: list[str] = []
    present = np.bincount(y, minlength=n_classes) > 0
    absent = [classes[c] for c in labels if not present[c]]
    with warnings.catch_warnings():
        # Undefined ratios come back as NaN (zero_division=np.nan); we explain them ourselves below.
        warnings.simplefilter("ignore")
        values: dict[str, float] = {
            "accuracy": float(accuracy_score(y, pred)),
            "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
            "macro_f1": float(
                f1_score(y, pred, labels=labels, average="macro", zero_division=np.nan)
            ),
        }
        if positive_index is not None:
            common = dict(pos_label=positive_index, average="binary", zero_division=np.nan)
            values["precision"] = float(precision_score(y, pred, **common))
            values["sensitivity"] = float(recall_score(y, pred, **common))
            values["specificity"] = float(
                recall_score(
                    y, pred, pos_label=1 - positive_index, average="binary", zero_division=np.nan
                )
            )
            values["f1"] = float(f1_score(y, pred, **common))
        else:
            common = dict(labels=labels, average="macro", zero_division=np.nan)
            values["precision"] = float(precision_score(y, pred, **common))
            values["sensitivity"] = float(recall_score(y, pred, **common))
            values["specificity"] = _macro_specificity(y, pred, n_classes)
            values["f1"] = values["macro_f1"]
    if absent:
        values["auroc"] = math.nan
        if len(absent) == n_classes - 1:
            reasons.append(f"auroc: only one class present in y_true ({len(y)} cases)")
        else:
            reasons.append(
                f"auroc: classes {absent} are absent from y_true, so one-vs-rest AUROC is "
                "undefined for them"
            )
    elif positive_index is not None:
        values["auroc"] = float(roc_auc_score(y == positive_index, probs[:, positive_index]))
    else:
        values["auroc"] = float(
            np.mean([roc_auc_score(y == c, probs[:, c]) for c in labels])
        )
    if positive_index is not None:
        positive = classes[positive_index]
        why = {
            "precision": f"no case was predicted as the positive class {positive!r}",
            "sensitivity": f"no case of the positive class {positive!r} in y_true",
            "specificity": f"no case outside the positive class {positive!r} in y_true",
            "f1": f"no case of, and no prediction of, the positive class {positive!r}",
        }
    else:
        why = {}
    for name in METRIC_NAMES:
        if name != "auroc" and math.isnan(values[name]):
            reasons.append(f"{name}: {why.get(name, 'zero denominator for every class')}")
    return values, reasons


def _macro_specificity(y: np.ndarray, pred: np.ndarray, n_classes: int) -> float:
    cm = confusion_matrix(y, pred, labels=list(range(n_classes)))
    return float(_metrics_from_confusion(cm[None], None)["specificity"][0])


# --------------------------------------------------------------------------------------------------
# public entry points


def _as_labels(y_true: Any, classes: list[str]) -> np.ndarray:
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise ValueError(f"y_true must have shape (N,); got shape {y.shape}.")
    if y.dtype.kind in "USO":
        lookup = {c: i for i, c in enumerate(classes)}
        unknown = sorted({str(v) for v in y.tolist()} - set(lookup))
        if unknown:
            raise ValueError(f"y_true has labels {unknown} that are not among classes {classes}.")
        return np.array([lookup[str(v)] for v in y.tolist()], dtype=np.int64)
    if y.dtype == bool:
        y = y.astype(np.int64)
    if y.dtype.kind not in "iu":
        if y.size and not np.all(np.equal(np.mod(y, 1), 0)):
            raise ValueError("y_true must hold integer class indices or class names.")
        y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= len(classes)):
        raise ValueError(
            f"y_true holds indices in [{y.min()}, {y.max()}] but there are {len(classes)} classes "
            f"{classes}; expected indices in [0, {len(classes) - 1}]."
        )
    return y.astype(np.int64)


def _jsonable(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def classification_metrics(
    y_true: np.ndarray | Sequence[int] | Sequence[str], probs: np.ndarray, classes: list[str], *,
    threshold: float | None = None, positive_index: int | None = None, n_boot: int = 1000, seed: int = 0,
    ci: float = 0.95, min_n: int = MIN_LABELLED, min_per_class: int = MIN_PER_CLASS,
) -> dict:
    """Headline classification metrics with confidence intervals that hold at small n.

    For a binary task precision, sensitivity, specificity, f1 and auroc are for the positive class;
    for more classes they are macro averages over classes (specificity one-vs-rest, auroc macro
    one-vs-rest). Intervals (see :mod:`pellucid.core.intervals`):

    * below ``min_n`` labelled inputs, or ``min_per_class`` inputs of a class the metric depends on,
      none: the value is kept and ``note`` says ``too few labelled inputs (n=6; need ≥ 10)``;
    * proportions (accuracy; binary sensitivity, specificity, precision): Wilson score intervals;
    * the rest: percentiles of ``n_boot`` resamples of the cases with replacement; resamples where a
      metric is undefined are skipped for it (one warning names the metrics where more than 10% were).

    Undefined metrics (NaN, written as ``None``) get one warning for all, and a ``note`` saying why.

    Args:
        y_true: True labels of shape (N,), class indices or class names.
        probs: Predicted probabilities of shape (N, C), ``C == len(classes)``.
        classes: Class names in column order.
        threshold: Binary tasks only: predict positive when ``probs[:, positive_index] >=
            threshold``. ``None`` uses argmax.
        positive_index: Positive class column for a binary task (default 1); must be ``None`` for
            more than two classes.
        n_boot: Number of bootstrap resamples; 0 skips the intervals (notes are still given).
        seed: Seed of the resampling, so results are reproducible.
        ci: Coverage of the intervals, in (0, 1).
        min_n: Fewest labelled inputs for any interval.
        min_per_class: Fewest inputs per class (or predicted positive, for precision) for the
            intervals of the metrics that depend on that class.

    Returns:
        A JSON-serialisable dict::

            {'n': N, 'classes': [...], 'threshold': float | None, 'positive_index': int | None,
             'ci': 0.95, 'n_boot': 1000, 'min_counts': {'overall': 10, 'per_class': 5},
             'metrics': {name: {'value': v, 'low': lo, 'high': hi,      # names in METRIC_NAMES
                                'interval': 'wilson' | 'bootstrap' | None,
                                'note': str}},                          # note only when it applies
             'confusion_matrix': [[...]],                              # rows true, cols predicted
             'per_class': {cls: {'precision', 'sensitivity', 'f1', 'support'}}}

    Raises:
        ValueError: Shapes or labels that do not match ``classes``, a threshold or positive index
            on a task that is not binary, or ``ci`` / ``n_boot`` out of range.
    """
    classes = [str(c) for c in classes]
    y, p, positive_index = _checked_inputs(y_true, probs, classes, threshold, positive_index, n_boot, ci)
    pred = decide(p, threshold, positive_index)
    values, reasons = _point_estimates(y, pred, p, classes, positive_index)
    if reasons:
        warnings.warn(f"Metric undefined, reported as NaN: {'; '.join(reasons)}.", stacklevel=2)
    notes = _notes(y, pred, classes, positive_index, reasons, min_n, min_per_class)
    proportions = ("accuracy",) if positive_index is None else PROPORTION_METRICS
    bootstrapped = [name for name in METRIC_NAMES if name not in proportions and name not in notes]
    boot = None
    if n_boot > 0 and bootstrapped:
        boot = _bootstrap(y, pred, p, positive_index, n_boot, seed)
    cm = confusion_matrix(y, pred, labels=list(range(len(classes))))
    metrics = _with_intervals(values, boot, bootstrapped, n_boot, ci, notes)
    if n_boot > 0:
        apply_wilson(metrics, cm, positive_index, ci)
    return {
        "n": int(y.size),
        "classes": classes,
        "threshold": None if threshold is None else float(threshold),
        "positive_index": positive_index,
        "ci": float(ci),
        "n_boot": int(n_boot),
        "min_counts": {"overall": int(min_n), "per_class": int(min_per_class)},
        "metrics": metrics,
        "confusion_matrix": cm.astype(int).tolist(),
        "per_class": _per_class(y, pred, classes),
    }


def _notes(y: np.ndarray, pred: np.ndarray, classes: list[str], positive_index: int | None,
           reasons: list[str], min_n: int, min_per_class: int) -> dict[str, str]:
    """``{metric: note}``: why an undefined metric is undefined, else why it gets no interval."""
    notes = {r.split(": ", 1)[0]: f"undefined: {r.split(': ', 1)[1]}" for r in reasons}
    for name, note in small_sample_notes(y, pred, classes, positive_index, METRIC_NAMES, min_n=min_n,
                                         min_per_class=min_per_class).items():
        notes.setdefault(name, note)
    return notes


def _checked_inputs(
    y_true: Any,
    probs: np.ndarray,
    classes: list[str],
    threshold: float | None,
    positive_index: int | None,
    n_boot: int,
    ci: float,
) -> tuple[np.ndarray, np.ndarray, int | None]:
    """Validate the arguments of :func:`classification_metrics`.

    Returns:
        ``(y, probs, positive_index)``: class indices (N,), probabilities (N, C) as float64, and the
        positive column (1 by default for a binary task, None otherwise).
    """
    n_classes = len(classes)
    if n_classes < 2:
        raise ValueError(f"Need at least 2 classes; got {classes}.")
    y = _as_labels(y_true, classes)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape != (y.size, n_classes):
        raise ValueError(
            f"probs has shape {p.shape}; expected ({y.size}, {n_classes}) for {y.size} labels and "
            f"classes {classes}."
        )
    if y.size == 0:
        raise ValueError("classification_metrics needs at least one case; got 0.")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1); got {ci}.")
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0; got {n_boot}.")
    if n_classes == 2:
        positive_index = 1 if positive_index is None else int(positive_index)
        if positive_index not in (0, 1):
            raise ValueError(
                f"positive_index must be 0 or 1 for a binary task; got {positive_index}."
            )
    elif positive_index is not None or threshold is not None:
        raise ValueError(
            f"threshold and positive_index apply to binary tasks only; this task has {n_classes} "
            f"classes {classes}. Pass threshold=None, positive_index=None."
        )
    return y, p, positive_index


def _with_intervals(
    values: dict[str, float],
    boot: dict[str, np.ndarray] | None,
    bootstrapped: list[str],
    n_boot: int,
    ci: float,
    notes: dict[str, str],
) -> dict[str, dict[str, Any]]:
    """``{name: {'value', 'low', 'high', 'interval'[, 'note']}}``, JSON-able: point estimates, with
    percentile intervals from the bootstrap for the metrics in ``bootstrapped`` (NaN resamples
    skipped; one warning names the metrics where more than 10% were) and the ``notes`` attached."""
    alpha = (1.0 - ci) / 2.0
    metrics: dict[str, dict[str, Any]] = {}
    skipped_report: list[str] = []
    for name in METRIC_NAMES:
        low = high = math.nan
        if boot is not None and name in bootstrapped:
            samples = boot[name][~np.isnan(boot[name])]
            skipped = n_boot - samples.size
            if samples.size:
                low, high = (float(q) for q in np.quantile(samples, [alpha, 1.0 - alpha]))
            if skipped > _SKIP_WARN_FRACTION * n_boot and not math.isnan(values[name]):
                skipped_report.append(f"{name} {skipped} of {n_boot}")
        row: dict[str, Any] = {"value": _jsonable(values[name]), "low": _jsonable(low), "high": _jsonable(high)}
        row["interval"] = "bootstrap" if row["low"] is not None else None
        if name in notes:
            row["note"] = notes[name]
        metrics[name] = row
    if skipped_report:
        warnings.warn(
            "Bootstrap resamples where the metric is undefined were skipped ("
            + ", ".join(skipped_report) + "); those intervals are less reliable.",
            stacklevel=3,  # the caller of classification_metrics
        )
    return metrics


def _per_class(y: np.ndarray, pred: np.ndarray, classes: list[str]) -> dict[str, dict]:
    """Precision, sensitivity, f1 (None where undefined) and support of every class."""
    labels = list(range(len(classes)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prec, rec, f1, support = precision_recall_fscore_support(
            y, pred, labels=labels, average=None, zero_division=np.nan
        )
    return {
        cls: {
            "precision": _jsonable(float(prec[i])),
            "sensitivity": _jsonable(float(rec[i])),
            "f1": _jsonable(float(f1[i])),
            "support": int(support[i]),
        }
        for i, cls in enumerate(classes)
    }
