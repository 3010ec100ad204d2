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
    from pellucid.core.runs import refuse_model_folder

    if out:
        refuse_model_folder(out, "evaluation results")
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
    seen = _seen_in_training(model_dir, [s for s, _ in ok])
    if seen:
        result["seen_in_training"] = seen
        result["note"] = (f"{seen.get('train', 0)} of these {len(ok)} images were in the model's training part and "
                          f"{seen.get('val', 0)} in its validation part (split.json): these numbers are optimistic; "
                          "evaluate on images the model did not see")
        log.info("%s", result["note"])
    out = Path(out) if out else Path(model_dir) / "eval" / Path(data_dir).name
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=1))
    write_predictions_csv(out / "predictions.csv", results, pred.classes)
    plots.plot_roc(y, probs, pred.classes, out / "roc.png", positive_index=pred.positive_index)
    plots.plot_confusion(np.array(result["confusion_matrix"]), pred.classes, out / "confusion.png")
    plots.plot_reliability(probs, y, out / "reliability.png")
    result["out"] = str(out)
    return result


def _seen_in_training(model_dir: str | Path, samples) -> dict[str, int]:
    """How many of ``samples`` the model was trained or calibrated on: the files of its ``split.json``'s
    train and val parts, compared as resolved paths (empty when it has none or none is there)."""
    from pellucid.datasets.splits import load_split, split_file

    if not split_file(model_dir).is_file():
        return {}
    try:
        split = load_split(model_dir)
    except Exception:  # noqa: BLE001 - an unreadable split only costs this warning
        return {}
    files = {Path(s.path).resolve() for s in samples}
    seen = {part: len(files & {Path(p).resolve() for p in split.paths(part)}) for part in ("train", "val")}
    return seen if any(seen.values()) else {}
