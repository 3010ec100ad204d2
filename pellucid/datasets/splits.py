"""Grouped, stratified splits: train/validation/test and k-fold, with no group on two sides.

Built on scikit-learn's :class:`~sklearn.model_selection.StratifiedGroupKFold`. A split is a dict of
lists of sample indices plus a short SHA-256 hash of its contents, saved beside the model so the
exact partition can be checked and reused.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from pellucid.datasets.samples import DataError, Sample

__all__ = ["grouped_split", "grouped_kfold", "split_hash", "save_split", "load_split", "check_no_leakage"]


def _arrays(samples: list[Sample]) -> tuple[np.ndarray, np.ndarray]:
    labels = np.array([s.label for s in samples])
    groups = np.array([s.group for s in samples])
    return labels, groups


def _n_splits_for(fraction: float) -> int:
    return max(2, int(round(1.0 / fraction)))


def _one_fold(idx: np.ndarray, labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int):
    """Split ``idx`` into (rest, held) with ~``fraction`` held out, grouped and stratified."""
    n_splits = _n_splits_for(fraction)
    n_groups = len(np.unique(groups[idx]))
    if n_groups < n_splits:
        raise DataError(f"only {n_groups} groups: too few to hold out {fraction:.0%} by group")
    cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class")
        rest, held = next(cv.split(idx, labels[idx], groups[idx]))
    return idx[rest], idx[held]


def grouped_split(samples: list[Sample], *, val_fraction: float = 0.15, test_fraction: float = 0.2,
                  seed: int = 0) -> dict:
    """Grouped, stratified train/val/test indices.

    Returns:
        ``{"train": [...], "val": [...], "test": [...], "seed": seed, "hash": str}``; no group appears
        in two parts, and class proportions are kept as far as the groups allow.
    """
    labels, groups = _arrays(samples)
    idx = np.arange(len(samples))
    rest, test = _one_fold(idx, labels, groups, test_fraction, seed)
    train, val = _one_fold(rest, labels, groups, val_fraction / (1 - test_fraction), seed + 1)
    split = {"train": sorted(map(int, train)), "val": sorted(map(int, val)), "test": sorted(map(int, test)),
             "seed": seed}
    for part in ("train", "val", "test"):
        missing = set(labels) - set(labels[split[part]])
        if missing:
            warnings.warn(f"{part} split has no samples of class(es) {sorted(missing)}: too few groups", stacklevel=2)
    check_no_leakage(samples, split)
    split["hash"] = split_hash(samples, split)
    return split


def grouped_kfold(samples: list[Sample], k: int = 5, *, seed: int = 0) -> list[dict]:
    """``k`` grouped, stratified folds: each a dict ``{"train": [...], "test": [...], "fold": i, "hash": str}``."""
    labels, groups = _arrays(samples)
    if len(np.unique(groups)) < k:
        raise DataError(f"{len(np.unique(groups))} groups cannot make {k} folds; lower k")
    cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    folds = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class")
        for i, (tr, te) in enumerate(cv.split(np.zeros(len(samples)), labels, groups)):
            fold = {"train": sorted(map(int, tr)), "test": sorted(map(int, te)), "fold": i, "seed": seed}
            check_no_leakage(samples, fold)
            fold["hash"] = split_hash(samples, fold)
            folds.append(fold)
    return folds


def check_no_leakage(samples: list[Sample], split: dict) -> None:
    """Raise :class:`DataError` when one group sits in two parts of ``split``."""
    parts = [p for p in ("train", "val", "test") if p in split]
    seen: dict[str, str] = {}
    for part in parts:
        for i in split[part]:
            g = samples[i].group
            if seen.setdefault(g, part) != part:
                raise DataError(f"group {g!r} is in both {seen[g]} and {part}")


def split_hash(samples: list[Sample], split: dict) -> str:
    """Short SHA-256 over the (path, label, part) triples of a split."""
    h = hashlib.sha256()
    for part in ("train", "val", "test"):
        for i in split.get(part, []):
            s = samples[i]
            h.update(f"{part}\t{Path(s.path).name}\t{s.label}\t{s.group}\n".encode())
    return h.hexdigest()[:16]


def save_split(path: str | Path, samples: list[Sample], split: dict) -> None:
    """Write the split as JSON with the file names per part (readable, and re-checkable by hash)."""
    out = {k: v for k, v in split.items() if k not in ("train", "val", "test")}
    for part in ("train", "val", "test"):
        if part in split:
            out[part] = [{"path": samples[i].path, "label": samples[i].label, "group": samples[i].group}
                         for i in split[part]]
    Path(path).write_text(json.dumps(out, indent=1))


def load_split(path: str | Path) -> dict:
    """Read a split written by :func:`save_split`."""
    return json.loads(Path(path).read_text())
