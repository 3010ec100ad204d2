"""The evaluation tail of a trained model: calibrate, threshold, score and plot one partition.

This module owns what happens between "the model's logits on the validation and test parts" and
"the numbers and figures a model folder records": :func:`score_split` fits the temperature on
validation, chooses the decision threshold on validation by the task's policy (binary tasks; a
validation part with one class keeps argmax, with a warning), scores the test part with intervals
that hold at small n (or a "too few labelled inputs" note; :mod:`pellucid.core.intervals`), measures calibration before and after scaling, and writes ``metrics.json`` and the
ROC, confusion and reliability plots. Single models (:func:`pellucid.core.training.train`) and
ensembles (:func:`pellucid.core.ensemble.build_ensemble`) both end here, so their cards say the
same things in the same words.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pellucid.core import calibration, metrics, plots

__all__ = ["score_split", "choose_split_threshold", "FINAL_FIT_NOTE"]

#: the card's ``metrics`` note of a model fitted with no test part (``pellucid train --final``)
FINAL_FIT_NOTE = ("no test part: a final fit on every image but the validation part (`pellucid train --final`); "
                  "the recipe's held-out estimate is the same run without --final, `pellucid train --folds K`, or "
                  "the k-fold table of `pellucid tune`")


def choose_split_threshold(y_val: np.ndarray, probs_val: np.ndarray, n_classes: int, positive_index: int | None,
                           policy: str, target_sensitivity: float | None) -> float | None:
    """The decision threshold chosen on validation, or None (argmax).

    Only binary tasks with a positive class and a policy other than ``argmax`` get one; a validation
    part with a single class cannot place it, which is said with a warning (argmax is kept).
    """
    if n_classes != 2 or positive_index is None or policy == "argmax":
        return None
    yv = (np.asarray(y_val) == positive_index).astype(int)
    if 0 < yv.sum() < len(yv):
        return metrics.choose_threshold(yv, probs_val[:, positive_index], policy, target_sensitivity)
    warnings.warn(f"validation split has only one class: the {policy!r} threshold "
                  "cannot be chosen; using argmax (0.5)", stacklevel=3)
    return None


def score_split(logits_val: Any, y_val: Any, logits_test: Any, y_test: Any, classes: Sequence[str],
                out_dir: str | Path, *, positive_index: int | None, positive_class: str | None,
                policy: str = "argmax", target_sensitivity: float | None = None, n_boot: int = 1000,
                seed: int = 0) -> tuple[dict, dict, dict]:
    """Calibrate and threshold on validation, score on test, write ``metrics.json`` and the plots.

    Args:
        logits_val, logits_test: logits ``(N, C)`` (tensor or array) of the validation and test parts.
        y_val, y_test: their true class indices ``(N,)`` (tensor or array).
        classes: class names in column order.
        out_dir: the model folder; ``metrics.json`` goes there, ``roc.png``, ``confusion.png`` and
            ``reliability.png`` under ``plots/``.
        positive_index: the positive class column, used for the threshold, the metrics and the ROC
            curve (None: argmax and macro averages).
        positive_class: its name, recorded in the threshold entry.
        policy: the task's threshold policy (see :data:`pellucid.core.metrics.THRESHOLD_POLICIES`).
        target_sensitivity: the target of the ``sensitivity`` policy.
        n_boot, seed: bootstrap resamples and seed of the test intervals.

    Returns:
        ``(calibration, threshold, test_metrics)``: the card's ``calibration`` entry (temperature,
        ECE before and after scaling, on test), its ``threshold`` entry (policy, value, positive
        class, target sensitivity) and the :func:`~pellucid.core.metrics.classification_metrics`
        result.
    """
    classes = list(classes)
    y_val, y_test = np.asarray(y_val), np.asarray(y_test)
    T = calibration.fit_temperature(logits_val, y_val)
    smoothed = _smoothing_entry(logits_val, y_val)
    probs_val = calibration.apply_temperature(logits_val, T)
    if len(y_test) == 0:  # a final fit: calibrated and thresholded on validation, nothing to score
        cal, threshold, result = _unscored(probs_val, y_val, T, classes, out_dir, positive_index=positive_index,
                                           positive_class=positive_class, policy=policy,
                                           target_sensitivity=target_sensitivity)
        if smoothed:
            cal = {**cal, **smoothed, "note": f"{cal['note']}; {smoothed['note']}"}
        return cal, threshold, result
    probs_test = calibration.apply_temperature(logits_test, T)
    threshold = choose_split_threshold(y_val, probs_val, len(classes), positive_index, policy, target_sensitivity)
    test_metrics = metrics.classification_metrics(y_test, probs_test, classes, threshold=threshold,
                                                  positive_index=positive_index, n_boot=n_boot, seed=seed)
    raw_test = calibration.apply_temperature(logits_test, 1.0)
    cal = {"method": "temperature", "temperature": float(T),
           "ece_before": float(calibration.expected_calibration_error(raw_test, y_test)),
           "ece_after": float(calibration.expected_calibration_error(probs_test, y_test)), **smoothed}
    threshold_entry = {"policy": policy if threshold is not None else "argmax", "value": threshold,
                       "positive_class": positive_class,
                       "target_sensitivity": target_sensitivity if policy == "sensitivity" else None}
    out_dir = Path(out_dir)
    (out_dir / "metrics.json").write_text(json.dumps(test_metrics, indent=1))
    plot_dir = out_dir / "plots"
    plot_dir.mkdir(exist_ok=True)
    plots.plot_roc(y_test, probs_test, classes, plot_dir / "roc.png", positive_index=positive_index)
    plots.plot_confusion(np.array(test_metrics["confusion_matrix"]), classes, plot_dir / "confusion.png")
    plots.plot_reliability(probs_test, y_test, plot_dir / "reliability.png", T=T)
    return cal, threshold_entry, test_metrics


def _smoothing_entry(logits_val: Any, y_val: np.ndarray) -> dict:
    """The card's record of the temperature fit's label smoothing, when it had any (a validation part ranked
    all right: :func:`pellucid.core.calibration.default_smoothing`)."""
    eps = calibration.default_smoothing(logits_val, y_val)
    if not eps:
        return {}
    return {"label_smoothing": eps,
            "note": f"all {len(y_val)} validation images were ranked right, so the temperature was fitted with "
                    f"label smoothing 1/{len(y_val) + 1}: {len(y_val)} right of {len(y_val)} is read as a small "
                    "chance of error, not as none"}


def _unscored(probs_val: np.ndarray, y_val: np.ndarray, T: float, classes: list[str],
              out_dir: str | Path, *, positive_index: int | None, positive_class: str | None, policy: str,
              target_sensitivity: float | None) -> tuple[dict, dict, dict]:
    """:func:`score_split` without a test part: the threshold and temperature from validation;
    ``metrics.json`` holds :data:`FINAL_FIT_NOTE`, and no calibration error or test plot is recorded
    (the only labelled images left are the ones the temperature was fitted on)."""
    threshold = choose_split_threshold(y_val, probs_val, len(classes), positive_index, policy, target_sensitivity)
    cal = {"method": "temperature", "temperature": float(T),
           "note": "no test part (a final fit): its calibration error was not measured"}
    threshold_entry = {"policy": policy if threshold is not None else "argmax", "value": threshold,
                       "positive_class": positive_class,
                       "target_sensitivity": target_sensitivity if policy == "sensitivity" else None}
    result = {"note": FINAL_FIT_NOTE}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "metrics.json").write_text(json.dumps(result, indent=1))
    return cal, threshold_entry, result
