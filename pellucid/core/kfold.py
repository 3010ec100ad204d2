"""The k-fold cross-validation driver and the dispatch of ``pellucid train``.

:func:`train_kfold` runs grouped stratified k-fold cross-validation (each fold's training part
gets its own grouped validation hold-out for early stopping, calibration and the threshold), writes
one model folder per fold and a ``summary.json`` with every headline metric per fold and as
mean ± sd over folds. :func:`run_training` is what ``pellucid train`` dispatches to: k-fold, an
ensemble (a recipe with ``members``) or one model.

The output folder is checked like a single run's (:func:`pellucid.core.runs.check_run_folder`,
kind ``kfold-<k>``): another run there is refused unless ``overwrite``; each fold folder is a run of
its own, so an interrupted k-fold run continues fold by fold.

The split policies a run uses (:func:`make_split`, :func:`split_from_file`, :func:`temporal_split`,
:func:`kfold_splits`) live in :mod:`pellucid.datasets.splits`, below training, and are re-exported
here for existing callers; this module sits above training and ensembles and nothing in core
imports it.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pellucid.datasets.splits import (
    SPLIT_POLICIES,
    kfold_splits,
    make_split,
    save_split,
    split_from_file,
    temporal_split,
)

if TYPE_CHECKING:
    from pellucid.core.training import TrainConfig

__all__ = ["SPLIT_POLICIES", "make_split", "split_from_file", "temporal_split", "kfold_splits", "train_kfold",
           "kfold_summary_text", "run_training"]

log = logging.getLogger(__name__)


def _mean_sd(values: list[float | None]) -> dict:
    v = np.array([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if v.size == 0:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else None, "n": int(v.size)}


def train_kfold(cfg: TrainConfig, k: int = 5) -> Path:
    """Grouped stratified k-fold cross-validation of one recipe.

    Writes ``cfg.out/folds/fold_<i>.json`` (the partitions), ``cfg.out/fold_<i>/`` (a complete model
    folder per fold, trained with ``split_file`` set to its partition) and ``cfg.out/summary.json``::

        {"task", "k", "seed", "seconds",
         "folds": [{"fold", "folder", "n_train", "n_val", "n_test", "metrics": {name: value},
                    "intervals": {name: [low, high]}}],
         "summary": {name: {"mean", "sd", "n"}}}           # sd over folds (ddof = 1)

    Returns:
        ``cfg.out``.
    """
    from pellucid.core.tasks import get_task
    from pellucid.core.training import check_run_folder, train
    from pellucid.datasets.samples import load_samples

    if cfg.split != "grouped" or cfg.split_file:
        raise ValueError(f"k-fold makes its own grouped folds; it cannot combine with split={cfg.split!r}"
                         + (f" or split_file={cfg.split_file!r}" if cfg.split_file else ""))
    if cfg.members:
        raise ValueError("k-fold of an ensemble recipe is not supported: pass a config with members = [] "
                         "or train the ensemble without --folds")
    run_folder = check_run_folder(cfg, kind=f"kfold-{k}")  # one-line refusals before any work
    t0 = time.time()
    task = get_task(cfg.task)
    out = Path(cfg.out)
    samples = load_samples(cfg.data, classes=task.classes)
    run_folder.start()
    (out / "folds").mkdir(parents=True, exist_ok=True)
    if cfg.max_images:
        rng = np.random.default_rng(cfg.seed)
        samples = [samples[i] for i in sorted(rng.permutation(len(samples))[: cfg.max_images])]
    folds = kfold_splits(samples, k, val_fraction=cfg.val_fraction, seed=cfg.seed)
    rows = []
    for fold in folds:
        i = fold["fold"]
        split_path = out / "folds" / f"fold_{i}.json"
        save_split(split_path, samples, fold)
        log.info("fold %d/%d: train %d, val %d, test %d", i + 1, k, len(fold["train"]), len(fold["val"]),
                 len(fold["test"]))
        folder = train(replace(cfg, out=str(out / f"fold_{i}"), split_file=str(split_path), max_images=None,
                               overwrite=False))  # --overwrite already cleared the fold folders
        m = json.loads((Path(folder) / "metrics.json").read_text())
        rows.append({"fold": i, "folder": f"fold_{i}", "n_train": len(fold["train"]), "n_val": len(fold["val"]),
                     "n_test": len(fold["test"]), "split_hash": fold["hash"],
                     "metrics": {n: v["value"] for n, v in m["metrics"].items()},
                     "intervals": {n: [v["low"], v["high"]] for n, v in m["metrics"].items()},
                     "per_class_f1": {c: v["f1"] for c, v in m.get("per_class", {}).items()}})
    names = list(rows[0]["metrics"]) if rows else []
    summary = {
        "task": task.name, "k": k, "seed": cfg.seed, "data": str(Path(cfg.data).resolve()),
        "n": len(samples), "seconds": round(time.time() - t0, 1), "folds": rows,
        "summary": {n: _mean_sd([r["metrics"][n] for r in rows]) for n in names},
        "per_class_f1": {c: _mean_sd([r["per_class_f1"].get(c) for r in rows]) for c in task.classes},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    log.info("k-fold written to %s in %.0f s", out, summary["seconds"])
    return out


def kfold_summary_text(folder: str | Path) -> str:
    """``summary.json`` of :func:`train_kfold` as a small text table (mean ± sd, then per fold)."""
    s = json.loads((Path(folder) / "summary.json").read_text())

    def fmt(x):
        return "n/a" if x is None else f"{x:.3f}"

    names = list(s["summary"])
    lines = [f"{s['task']}: {s['k']}-fold grouped cross-validation, n={s['n']}, {s['seconds']:.0f} s  ({folder})",
             f"{'metric':<18} {'mean':>6} {'± sd':>6}   " + " ".join(f"fold{r['fold']:<2}" for r in s["folds"])]
    for n in names:
        m = s["summary"][n]
        lines.append(f"{n:<18} {fmt(m['mean']):>6} {fmt(m['sd']):>6}   "
                     + " ".join(f"{fmt(r['metrics'][n]):>6}" for r in s["folds"]))
    return "\n".join(lines)


def run_training(cfg: TrainConfig, folds: int | None = None) -> Path:
    """What ``pellucid train`` runs: k-fold when ``folds``, an ensemble when the recipe has
    ``members``, else one model. Returns the output folder."""
    if folds:
        return train_kfold(cfg, folds)
    if cfg.members:
        from pellucid.core.ensemble_train import train_ensemble

        return train_ensemble(cfg)
    from pellucid.core.training import train

    return train(cfg)
