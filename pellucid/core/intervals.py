"""Which confidence interval a reported metric carries, and when it carries none.

This module owns the small-sample rules of :func:`pellucid.core.metrics.classification_metrics`:

* **Too few to say** — below :data:`MIN_LABELLED` labelled inputs overall, or below
  :data:`MIN_PER_CLASS` inputs in a class the metric depends on, no interval is given at all. The
  point value is kept and the metric's ``note`` says ``too few labelled inputs (n=6; need ≥ 10)``:
  six of six correct is an observation, not evidence of perfection, and the percentile bootstrap
  would print ``[1.000, 1.000]`` for it.
* **Proportions** (accuracy; for a binary task sensitivity, specificity and precision) get Wilson score
  intervals (Wilson 1927, via :meth:`scipy.stats.binomtest`), which keep their coverage at small n.
* **Everything else** (AUROC, F1, balanced accuracy, macro averages) keeps the percentile bootstrap,
  which is only valid with enough of each class (Efron & Tibshirani 1993): hence the per-class minimum.

Which counts each metric depends on is :func:`small_sample_notes`; a metric's entry is
``{"value", "low", "high", "interval": "wilson" | "bootstrap" | None}`` plus ``"note"`` when one applies.
"""
from __future__ import annotations

import numpy as np

__all__ = ["MIN_LABELLED", "MIN_PER_CLASS", "PROPORTION_METRICS", "too_few_note", "small_sample_notes",
           "proportion_counts", "apply_wilson"]

#: Fewest labelled inputs overall for which any metric gets an interval.
MIN_LABELLED = 10
#: Fewest inputs of a class (or, for precision, predicted as the positive class) for the metrics that
#: depend on that class to get an interval.
MIN_PER_CLASS = 5
#: Metrics that are a proportion of cases (Wilson intervals); for a task with more than two classes
#: only accuracy is (the others are macro averages, bootstrapped).
PROPORTION_METRICS = ("accuracy", "sensitivity", "specificity", "precision")


def too_few_note(n: int, need: int, what: str = "labelled inputs") -> str:
    """The note that replaces an interval, e.g. ``too few labelled inputs (n=6; need ≥ 10)``."""
    return f"too few {what} (n={n}; need ≥ {need})"


def small_sample_notes(y: np.ndarray, pred: np.ndarray, classes: list[str], positive_index: int | None,
                       names: tuple[str, ...], *, min_n: int = MIN_LABELLED,
                       min_per_class: int = MIN_PER_CLASS) -> dict[str, str]:
    """The metrics of ``names`` too thinly supported for an interval, with the note saying why.

    Args:
        y: True class indices of shape (N,).
        pred: Predicted class indices of shape (N,).
        classes: Class names in index order.
        positive_index: The positive class of a binary task, or None (macro averages).
        names: The metric names to judge (see :data:`pellucid.core.metrics.METRIC_NAMES`).
        min_n: Fewest labelled inputs overall.
        min_per_class: Fewest inputs per class a metric depends on.

    Returns:
        ``{metric: note}`` for each metric below its minimum (metrics with enough data are absent).
        Overall count first: with ``N < min_n`` every metric gets the overall note.
    """
    n = int(y.size)
    if n < min_n:
        return {name: too_few_note(n, min_n) for name in names}
    support = np.bincount(y, minlength=len(classes))
    rarest = int(np.argmin(support))
    every_class = (None if support[rarest] >= min_per_class
                   else too_few_note(int(support[rarest]), min_per_class, f"labelled inputs of {classes[rarest]!r}"))
    needs: dict[str, str | None] = {"accuracy": None}
    if positive_index is not None:
        pos, neg = positive_index, 1 - positive_index
        n_pred = int((pred == pos).sum())
        needs["sensitivity"] = (None if support[pos] >= min_per_class else
                                too_few_note(int(support[pos]), min_per_class, f"labelled inputs of {classes[pos]!r}"))
        needs["specificity"] = (None if support[neg] >= min_per_class else
                                too_few_note(int(support[neg]), min_per_class, f"labelled inputs of {classes[neg]!r}"))
        needs["precision"] = (None if n_pred >= min_per_class else
                              too_few_note(n_pred, min_per_class, f"inputs predicted {classes[pos]!r}"))
    notes = {}
    for name in names:
        note = needs.get(name, every_class)  # the bootstrapped metrics need enough of every class
        if note is not None:
            notes[name] = note
    return notes


def proportion_counts(cm: np.ndarray, positive_index: int | None) -> dict[str, tuple[int, int]]:
    """``{metric: (successes, trials)}`` of the metrics that are proportions of cases.

    Args:
        cm: Confusion matrix of shape (C, C), rows = true class, columns = predicted class.
        positive_index: The positive class of a binary task, or None (only accuracy is a proportion).
    """
    counts = {"accuracy": (int(np.trace(cm)), int(cm.sum()))}
    if positive_index is not None:
        pos, neg = positive_index, 1 - positive_index
        counts.update(sensitivity=(int(cm[pos, pos]), int(cm[pos].sum())),
                      specificity=(int(cm[neg, neg]), int(cm[neg].sum())),
                      precision=(int(cm[pos, pos]), int(cm[:, pos].sum())))
    return counts


def apply_wilson(metrics: dict[str, dict], cm: np.ndarray, positive_index: int | None, ci: float) -> None:
    """Give the proportion metrics of ``metrics`` Wilson score intervals, in place.

    Rows with a ``note`` (too few inputs) or an undefined value keep no interval; the others that are
    proportions get ``low``/``high`` from the Wilson score interval and ``interval: "wilson"``.
    """
    from scipy.stats import binomtest

    for name, (k, n) in proportion_counts(cm, positive_index).items():
        row = metrics.get(name)
        if row is None or row.get("note") or row.get("value") is None or n == 0:
            continue
        lo, hi = binomtest(k, n).proportion_ci(confidence_level=ci, method="wilson")
        row.update(low=float(lo), high=float(hi), interval="wilson")
