"""Evaluation of a model folder on a labelled data folder: metrics JSON with intervals, and plots.

``pellucid eval --model DIR --data DIR`` runs :func:`evaluate`: every image is predicted with the
card's preprocessing, calibration and threshold; metrics carry 95 % intervals (Wilson for
proportions, bootstrap for the rest) or, with too few labelled inputs, a note that says so instead
(:mod:`pellucid.core.intervals`); the ROC curve, confusion matrix and reliability diagram are
written as PNG beside ``metrics.json``. :func:`pellucid.core.metrics.format_metrics` renders the result.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from pellucid.core import metrics as M
from pellucid.core import plots
from pellucid.core.predict import Predictor, write_predictions_csv
from pellucid.datasets.samples import load_samples

__all__ = ["evaluate"]

log = logging.getLogger(__name__)


def evaluate(model_dir: str | Path, data_dir: str | Path, out: str | Path | None = None,
             n_boot: int = 1000, progress: bool = False) -> dict:
    """Score ``model_dir`` on every labelled image of ``data_dir``.

    Returns:
        The metrics dict (also written to ``out/metrics.json`` with plots and predictions.csv).
    """
    pred = Predictor(model_dir)
    aliases = {}
    try:
        from pellucid.core.tasks import task_of_card

        aliases = task_of_card(pred.card).aliases  # the spec the folder carries, else the task by name
    except KeyError:
        pass  # a model of a task without an app folder
    samples = load_samples(data_dir, classes=pred.classes, aliases=aliases)
    results = list(pred.pipeline(keep_images=False).from_paths([s.path for s in samples]))
    by_path = {str(r.path): r for r in results}
    ok = [(s, by_path[str(s.path)]) for s in samples
          if str(s.path) in by_path and not by_path[str(s.path)].error and by_path[str(s.path)].probs]
    if not ok:
        raise ValueError(f"{data_dir}: none of the {len(samples)} images could be read")
    y = np.array([pred.classes.index(s.label) for s, _ in ok])
    probs = np.array([[r.probs[c] for c in pred.classes] for _, r in ok])
    result = M.classification_metrics(y, probs, pred.classes, threshold=pred.threshold,
                                      positive_index=pred.positive_index, n_boot=n_boot)
    result["skipped"] = [r.error for r in results if r.error]
    out = Path(out) if out else Path(model_dir) / "eval" / Path(data_dir).name
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=1))
    write_predictions_csv(out / "predictions.csv", results, pred.classes)
    plots.plot_roc(y, probs, pred.classes, out / "roc.png", positive_index=pred.positive_index)
    plots.plot_confusion(np.array(result["confusion_matrix"]), pred.classes, out / "confusion.png")
    plots.plot_reliability(probs, y, out / "reliability.png")
    result["out"] = str(out)
    return result
