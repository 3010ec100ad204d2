"""How a training run partitions its data, and the k-fold cross-validation driver.

:func:`make_split` is the one place a run's train/validation/test partition is decided, by the
recipe's ``split`` policy:

* ``grouped`` — grouped, stratified hold-out (:func:`~pellucid.datasets.splits.grouped_split`);
* ``temporal`` — the same, except that a group holding a whole recording (``min_frames`` or more
  files, e.g. the one fish and the one mine sonar sequence) is cut *in time*: frames in file-name
  order, the first part trains, the next validates, the last tests, with a few frames dropped at
  each cut so neighbouring frames never sit on two sides;
* ``split_file`` (a run option, not a policy) — reuse the partition saved by another run
  (``split.json`` or a model folder holding one), matched by file path; ensembles and k-fold folds
  use it so every member or fold sees exactly the partition it was given.

:func:`train_kfold` runs grouped stratified k-fold cross-validation (each fold's training part
gets its own grouped validation hold-out for early stopping, calibration and the threshold), writes
one model folder per fold and a ``summary.json`` with every headline metric per fold and as
mean ± sd over folds. :func:`run_training` is what ``pellucid train`` dispatches to: k-fold, an
ensemble (a recipe with ``members``) or one model.
"""
from __future__ import annotations

import json
import logging
import math
import re
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from pellucid.core.backbones import unknown_name_error
from pellucid.datasets.samples import DataError, Sample
from pellucid.datasets.splits import check_no_leakage, grouped_kfold, grouped_split, save_split, split_hash

if TYPE_CHECKING:
    from pellucid.core.training import TrainConfig

__all__ = ["SPLIT_POLICIES", "make_split", "split_from_file", "temporal_split", "kfold_splits", "train_kfold",
           "kfold_summary_text", "run_training"]

log = logging.getLogger(__name__)

SPLIT_POLICIES = ("grouped", "temporal")


def _natural_key(path: str) -> list:
    """Sort key that orders ``image_9`` before ``image_10``."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", Path(path).name)]


def make_split(samples: list[Sample], cfg: TrainConfig) -> tuple[list[Sample], dict]:
    """The train/val/test partition of a run, by ``cfg.split_file`` or the ``cfg.split`` policy.

    Returns:
        ``(samples, split)``: the samples the run uses (a subset when a split file names fewer; with
        recording groups renamed to their time segment under ``temporal``) and the split dict
        (``train``/``val``/``test`` index lists into those samples, ``seed``, ``hash``).
    """
    if cfg.split_file:
        return split_from_file(samples, cfg.split_file)
    policy = cfg.split
    if policy == "grouped":
        return samples, grouped_split(samples, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction,
                                      seed=cfg.seed)
    if policy == "temporal":
        return temporal_split(samples, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=cfg.seed)
    raise unknown_name_error("split policy", policy, list(SPLIT_POLICIES))


def split_from_file(samples: list[Sample], path: str | Path) -> tuple[list[Sample], dict]:
    """Reuse a partition written by :func:`~pellucid.datasets.splits.save_split`.

    Args:
        samples: the samples read from the data folder.
        path: a ``split.json`` file, or a model folder that holds one.

    Returns:
        ``(used, split)`` where ``used`` holds only the samples the file names (in file order: train,
        val, test) and ``split`` indexes into it.

    Raises:
        DataError: the file is missing, or names files (or labels) the data folder does not have.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "split.json"
    if not path.exists():
        raise DataError(f"split file {path} not found: give a split.json written by `pellucid train` "
                        "or the model folder that holds one")
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"split file {path} is not valid JSON ({err.msg} at line {err.lineno})") from err
    by_path = {str(Path(s.path).resolve()): s for s in samples}
    # Fallback for a split file written elsewhere (another machine, another data location, another
    # working directory): match on "<folder>/<file name>" when that is unique in the data folder.
    tails: dict[str, Sample | None] = {}
    for s in samples:
        key = "/".join(Path(s.path).parts[-2:])
        tails[key] = None if key in tails else s
    used: list[Sample] = []
    split: dict = {"seed": saved.get("seed"), "from_file": str(path.resolve())}
    missing: list[str] = []
    for part in ("train", "val", "test"):
        idx = []
        for row in saved.get(part, []):
            s = by_path.get(str(Path(row["path"]).resolve())) or tails.get("/".join(Path(row["path"]).parts[-2:]))
            if s is None:
                missing.append(row["path"])
                continue
            if s.label != row["label"]:
                raise DataError(f"split file {path}: {row['path']} is labelled {row['label']!r} there but "
                                f"{s.label!r} in the data folder")
            # keep the file's group (it may be a time segment of a recording)
            used.append(Sample(s.path, s.label, row.get("group", s.group)))
            idx.append(len(used) - 1)
        split[part] = idx
    if missing:
        raise DataError(f"split file {path} names {len(missing)} file(s) the data folder lacks "
                        f"(first: {missing[0]}); train on the same data folder or drop the split file")
    if not split["train"] or not split["test"]:
        raise DataError(f"split file {path} has an empty train or test part")
    check_no_leakage(used, split)
    split["hash"] = split_hash(used, split)
    if len(used) < len(samples):
        log.info("split file %s uses %d of the %d samples in the data folder", path, len(used), len(samples))
    return used, split


def temporal_split(samples: list[Sample], *, val_fraction: float = 0.15, test_fraction: float = 0.2,
                   seed: int = 0, min_frames: int = 20, gap_fraction: float = 0.02) -> tuple[list[Sample], dict]:
    """Grouped split in which recordings (groups of ``min_frames`` or more files) are cut in time.

    Each recording's files are ordered by file name (natural order: frame 9 before frame 10); the
    first ``1 - val_fraction - test_fraction`` trains, the next ``val_fraction`` validates, the last
    ``test_fraction`` tests, and ``max(1, gap_fraction * n)`` frames at each of the two cuts are
    left out of every part. The segments become groups ``<group>#train`` / ``#val`` / ``#test``.
    All other samples go through :func:`~pellucid.datasets.splits.grouped_split`.

    Returns:
        ``(samples with recording groups renamed, split)``; the split records the recordings cut and
        the frames left out in ``"temporal"``.
    """
    by_group: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        by_group.setdefault(s.group, []).append(i)
    recordings = {g: idx for g, idx in by_group.items() if len(idx) >= min_frames}
    out = list(samples)
    split: dict = {"train": [], "val": [], "test": [], "seed": seed}
    info: dict = {}
    for g, idx in recordings.items():
        order = sorted(idx, key=lambda i: _natural_key(samples[i].path))
        n = len(order)
        gap = max(1, int(round(gap_fraction * n)))
        n_test = max(1, int(round(test_fraction * n)))
        n_val = max(1, int(round(val_fraction * n)))
        n_train = n - n_test - n_val - 2 * gap
        if n_train < 1:
            raise DataError(f"recording group {g!r} has {n} frames: too few to cut into train/val/test in time")
        cuts = {"train": order[:n_train], "val": order[n_train + gap:n_train + gap + n_val],
                "test": order[n - n_test:]}
        for part, members in cuts.items():
            for i in members:
                out[i] = Sample(samples[i].path, samples[i].label, f"{g}#{part}")
            split[part].extend(members)
        dropped = sorted(set(order) - {i for m in cuts.values() for i in m})
        for i in dropped:
            out[i] = Sample(samples[i].path, samples[i].label, f"{g}#gap")
        info[g] = {"frames": n, "train": n_train, "val": n_val, "test": n_test, "left_out": len(dropped)}
    rest = [i for i in range(len(samples)) if samples[i].group not in recordings]
    if rest:
        sub = grouped_split([samples[i] for i in rest], val_fraction=val_fraction, test_fraction=test_fraction,
                            seed=seed)
        for part in ("train", "val", "test"):
            split[part].extend(rest[j] for j in sub[part])
    for part in ("train", "val", "test"):
        split[part] = sorted(split[part])
    split["temporal"] = info
    check_no_leakage(out, split)
    split["hash"] = split_hash(out, split)
    if not recordings:
        warnings.warn(f"temporal split: no group has {min_frames}+ files, so nothing was cut in time "
                      "(the split is a plain grouped split)", stacklevel=2)
    return out, split


def kfold_splits(samples: list[Sample], k: int = 5, *, val_fraction: float = 0.15, seed: int = 0) -> list[dict]:
    """``k`` grouped, stratified folds, each with a grouped validation hold-out from its training part.

    Returns:
        ``k`` dicts ``{"train", "val", "test", "fold", "seed", "hash"}`` of indices into ``samples``;
        every sample is in exactly one fold's ``test`` and no group is ever on two sides.
    """
    if k < 2:
        raise ValueError(f"k-fold needs k >= 2 folds, got {k}")
    labels = np.array([s.label for s in samples])
    groups = np.array([s.group for s in samples])
    folds = []
    for fold in grouped_kfold(samples, k, seed=seed):
        rest = np.asarray(fold["train"])
        n_splits = max(2, int(round(1.0 / val_fraction)))
        if len(np.unique(groups[rest])) < n_splits:
            raise DataError(f"fold {fold['fold']}: {len(np.unique(groups[rest]))} training groups are too few "
                            f"to hold out {val_fraction:.0%} for validation; lower k or val_fraction")
        cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed + 1 + fold["fold"])
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The least populated class")
            tr, va = next(cv.split(rest, labels[rest], groups[rest]))
        split = {"train": sorted(map(int, rest[tr])), "val": sorted(map(int, rest[va])), "test": fold["test"],
                 "fold": fold["fold"], "seed": seed}
        check_no_leakage(samples, split)
        split["hash"] = split_hash(samples, split)
        folds.append(split)
    return folds


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
    from pellucid.core.training import train
    from pellucid.datasets.samples import load_samples

    if cfg.split != "grouped" or cfg.split_file:
        raise ValueError(f"k-fold makes its own grouped folds; it cannot combine with split={cfg.split!r}"
                         + (f" or split_file={cfg.split_file!r}" if cfg.split_file else ""))
    if cfg.members:
        raise ValueError("k-fold of an ensemble recipe is not supported: pass a config with members = [] "
                         "or train the ensemble without --folds")
    t0 = time.time()
    task = get_task(cfg.task)
    out = Path(cfg.out)
    (out / "folds").mkdir(parents=True, exist_ok=True)
    samples = load_samples(cfg.data, classes=task.classes)
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
        folder = train(replace(cfg, out=str(out / f"fold_{i}"), split_file=str(split_path), max_images=None))
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
        from pellucid.core.ensemble import train_ensemble

        return train_ensemble(cfg)
    from pellucid.core.training import train

    return train(cfg)
