"""Grouped, stratified splits: train/validation/test and k-fold, with no group on two sides, and the
split policies a training run chooses between.

Built on scikit-learn's :class:`~sklearn.model_selection.StratifiedGroupKFold`. A split is a dict of
lists of sample indices plus a short SHA-256 hash of its contents, saved beside the model so the
exact partition can be checked and reused.

:func:`make_split` is the one place a run's train/validation/test partition is decided, by the
recipe's ``split`` policy:

* ``grouped`` — grouped, stratified hold-out (:func:`grouped_split`);
* ``temporal`` — the same, except that a group holding a whole recording (``min_frames`` or more
  files, e.g. the one fish and the one mine sonar sequence) is cut *in time*: frames in file-name
  order, the first part trains, the next validates, the last tests, with a few frames dropped at
  each cut so neighbouring frames never sit on two sides;
* ``split_file`` (a run option, not a policy) — reuse the partition saved by another run
  (``split.json`` or a model folder holding one), matched by file path; ensembles and k-fold folds
  use it so every member or fold sees exactly the partition it was given.

:func:`kfold_splits` makes the folds of k-fold cross-validation, each with its own validation
hold-out. Training (``pellucid.core.training``) and the k-fold driver (``pellucid.core.kfold``)
use these; this module imports nothing from core.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from pellucid.datasets.samples import DataError, Sample
from pellucid.registry import unknown_name_error

__all__ = ["grouped_split", "grouped_kfold", "split_hash", "save_split", "load_split", "split_file", "Split",
           "SplitRow", "SPLIT_FILE", "SPLIT_PARTS", "check_no_leakage",
           "SPLIT_POLICIES", "SplitSettings", "make_split", "split_from_file", "temporal_split", "kfold_splits"]

log = logging.getLogger(__name__)


def _arrays(samples: list[Sample]) -> tuple[np.ndarray, np.ndarray]:
    labels = np.array([s.label for s in samples])
    groups = np.array([s.group for s in samples])
    return labels, groups


def _n_splits_for(fraction: float) -> int:
    return max(2, int(round(1.0 / fraction)))


def _check_stratifiable(labels: np.ndarray, n_splits: int, what: str,
                        fix: str = "add images (a few dozen per class)") -> None:
    """A one-line DataError where scikit-learn's stratified folds would raise: every class smaller than
    ``n_splits``."""
    _, counts = np.unique(labels, return_counts=True)
    if counts.size and (counts < n_splits).all():
        raise DataError(f"every class has fewer than {n_splits} images here (the largest {int(counts.max())}): too "
                        f"few to {what}; {fix}")


def _one_fold(idx: np.ndarray, labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int):
    """Split ``idx`` into (rest, held) with ~``fraction`` held out, grouped and stratified."""
    n_splits = _n_splits_for(fraction)
    n_groups = len(np.unique(groups[idx]))
    if n_groups < n_splits:
        raise DataError(f"only {n_groups} groups: too few to hold out {fraction:.0%} by group")
    _check_stratifiable(labels[idx], n_splits, f"hold out {fraction:.0%} by group")
    cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class")
        rest, held = next(cv.split(idx, labels[idx], groups[idx]))
    return idx[rest], idx[held]


def grouped_split(samples: list[Sample], *, val_fraction: float = 0.15, test_fraction: float = 0.2,
                  seed: int = 0) -> dict:
    """Grouped, stratified train/val/test indices (``test_fraction`` 0: no test part, a final fit).

    Returns:
        ``{"train": [...], "val": [...], "test": [...], "seed": seed, "hash": str}``; no group appears
        in two parts, and class proportions are kept as far as the groups allow.
    """
    labels, groups = _arrays(samples)
    idx = np.arange(len(samples))
    if test_fraction > 0:
        rest, test = _one_fold(idx, labels, groups, test_fraction, seed)
    else:  # a final fit: every image but the validation part trains
        rest, test = idx, idx[:0]
    train, val = _one_fold(rest, labels, groups, val_fraction / (1 - test_fraction), seed + 1)
    split = {"train": sorted(map(int, train)), "val": sorted(map(int, val)), "test": sorted(map(int, test)),
             "seed": seed}
    for part in ("train", "val", "test") if test_fraction > 0 else ("train", "val"):
        missing = set(labels) - set(labels[split[part]])
        if missing:
            warnings.warn(f"{part} split has no samples of class(es) {sorted(map(str, missing))}: too few groups",
                          stacklevel=2)
    check_no_leakage(samples, split)
    split["hash"] = split_hash(samples, split)
    return split


def grouped_kfold(samples: list[Sample], k: int = 5, *, seed: int = 0) -> list[dict]:
    """``k`` grouped, stratified folds: each a dict ``{"train": [...], "test": [...], "fold": i, "hash": str}``."""
    labels, groups = _arrays(samples)
    if len(np.unique(groups)) < k:
        raise DataError(f"{len(np.unique(groups))} groups cannot make {k} folds; lower k")
    _check_stratifiable(labels, k, f"make {k} folds", "add images (a few dozen per class), or lower k")
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
            h.update(f"{part}\t{Path(s.path).name}\t{s.label}\t{s.group}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:16]


SPLIT_FILE = "split.json"
SPLIT_PARTS = ("train", "val", "test")


def split_file(path: str | Path) -> Path:
    """The ``split.json`` meant by ``path``: the file itself, or ``path/split.json`` for a folder."""
    path = Path(path)
    return path / SPLIT_FILE if path.is_dir() else path


@dataclass(frozen=True)
class SplitRow:
    """One file of a saved split: ``path`` as resolved by :func:`load_split` (``written`` as in the file)."""

    path: str
    label: str | None = None
    group: str | None = None
    written: str = ""
    found: bool = False

    def to_dict(self) -> dict:
        """The row as :func:`save_split` writes it (the path as written)."""
        out: dict = {"path": self.written or self.path}
        if self.label is not None:
            out["label"] = self.label
        if self.group is not None:
            out["group"] = self.group
        return out


@dataclass
class Split:
    """A saved partition: rows of the ``train``/``val``/``test`` parts, its ``hash`` and ``seed``, the
    ``file`` it was read from, and every other key of the file in ``extra`` (``fold``, ``temporal``...)."""

    train: list[SplitRow] = field(default_factory=list)
    val: list[SplitRow] = field(default_factory=list)
    test: list[SplitRow] = field(default_factory=list)
    hash: str | None = None
    seed: int | None = None
    file: Path | None = None
    extra: dict = field(default_factory=dict)

    def part(self, name: str) -> list[SplitRow]:
        """The rows of part ``name`` (``train``, ``val`` or ``test``)."""
        if name not in SPLIT_PARTS:
            raise unknown_name_error("split part", name, SPLIT_PARTS)
        return getattr(self, name)

    def paths(self, name: str) -> list[str]:
        """The resolved paths of part ``name``."""
        return [r.path for r in self.part(name)]

    def to_dict(self) -> dict:
        """The JSON object of ``split.json`` (paths as they were written)."""
        out = {**self.extra, "seed": self.seed}
        if self.hash is not None:
            out["hash"] = self.hash
        for name in SPLIT_PARTS:
            out[name] = [r.to_dict() for r in getattr(self, name)]
        return out

    def save(self, path: str | Path) -> Path:
        """Write this split as JSON to ``path`` (a file, or a folder to hold ``split.json``)."""
        path = split_file(path)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path


def save_split(path: str | Path, samples: list[Sample], split: dict) -> None:
    """Write the split as JSON with the file names per part (readable, and re-checkable by hash).

    The one writer of ``split.json`` (with :meth:`Split.save`, which this calls)."""
    parts = {part: [SplitRow(samples[i].path, samples[i].label, samples[i].group, written=samples[i].path)
                    for i in split[part]] for part in SPLIT_PARTS if part in split}
    extra = {k: v for k, v in split.items() if k not in SPLIT_PARTS and k not in ("hash", "seed")}
    Split(**parts, hash=split.get("hash"), seed=split.get("seed"), extra=extra).save(path)


def _candidates(written: str, base: Path, data_root: str | None, data_as_given: str | None) -> list[Path]:
    cands = [Path(written)]
    if not Path(written).is_absolute():
        cands.append(base / written)
    if data_root:
        if data_as_given and written.startswith(str(data_as_given)):
            cands.append(Path(data_root) / written[len(str(data_as_given)):].lstrip("/\\"))
        parts = Path(written).parts
        root_name = Path(data_root).name
        if root_name in parts:
            i = len(parts) - 1 - parts[::-1].index(root_name)
            cands.append(Path(data_root).joinpath(*parts[i + 1:]))
    return cands


def load_split(path: str | Path, *, data_root: str | Path | None = None,
               data_as_given: str | None = None) -> Split:
    """Read a ``split.json`` (written by :func:`save_split`): the one reader of split files.

    Path rule: each row's path is tried, in order, (1) as written (absolute, or relative to the
    current directory, which is how ``pellucid train`` writes the paths of a data folder given
    relative), (2) relative to the folder holding ``split.json``, and, with ``data_root`` (the
    training data folder, a card's ``training.data``), (3) with ``data_as_given`` (the data folder
    as the run was given it, ``config.json`` ``data``) replaced by ``data_root`` and (4) re-rooted
    under ``data_root`` after the last path part named like it (the data folder was moved). The first
    candidate that is a file wins (``row.found``); when none is, the path stays as written.

    Args:
        path: a ``split.json`` file, or a folder (a model folder) holding one.
        data_root: the training data folder, for rules (3) and (4).
        data_as_given: the data folder as written in the run's settings, for rule (3).

    Raises:
        DataError: the file is missing, is not valid JSON, or is not a split (rows without ``path``).
    """
    path = split_file(path)
    if not path.is_file():
        raise DataError(f"split file {path} not found: give a split.json written by `pellucid train` "
                        "or the model folder that holds one")
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"split file {path} is not valid JSON ({err.msg} at line {err.lineno})") from err
    except (RecursionError, UnicodeDecodeError) as err:  # nested too deeply, or not text: no split is so
        raise DataError(f"split file {path} is not a split ({type(err).__name__}): give a split.json written by "
                        "`pellucid train`") from None
    if not isinstance(saved, dict):
        raise DataError(f"split file {path} is not a split (a JSON object with train/val/test parts)")
    base = path.parent
    parts: dict[str, list[SplitRow]] = {}
    for part in SPLIT_PARTS:
        rows = []
        for row in saved.pop(part, None) or []:
            if isinstance(row, dict):
                if "path" not in row:
                    raise DataError(f"split file {path}: a {part} row has no 'path' ({row!r})")
                written, label, group = str(row["path"]), row.get("label"), row.get("group")
            else:
                written, label, group = str(row), None, None
            hit = next((c for c in _candidates(written, base, data_root and str(data_root), data_as_given)
                        if c.is_file()), None)
            rows.append(SplitRow(str(hit) if hit is not None else written, label, group, written=written,
                                 found=hit is not None))
        parts[part] = rows
    return Split(**parts, hash=saved.pop("hash", None), seed=saved.pop("seed", None), file=path, extra=saved)


# --------------------------------------------------------------------------- split policies of a run
SPLIT_POLICIES = ("grouped", "temporal")


class SplitSettings(Protocol):
    """What :func:`make_split` reads from a run's settings (a ``pellucid.core.training.TrainConfig``)."""

    split: str
    split_file: str | None
    val_fraction: float
    test_fraction: float
    seed: int


def _natural_key(path: str) -> list:
    """Sort key that orders ``image_9`` before ``image_10``."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", Path(path).name)]


def make_split(samples: list[Sample], cfg: SplitSettings) -> tuple[list[Sample], dict]:
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
    """Reuse a partition written by :func:`save_split`.

    Args:
        samples: the samples read from the data folder.
        path: a ``split.json`` file, or a model folder that holds one.

    Returns:
        ``(used, split)`` where ``used`` holds only the samples the file names (in file order: train,
        val, test) and ``split`` indexes into it.

    Raises:
        DataError: the file is missing, or names files (or labels) the data folder does not have.
    """
    saved = load_split(path)
    path = saved.file
    by_path = {str(Path(s.path).resolve()): s for s in samples}
    # Fallback for a split file written elsewhere (another machine, another data location, another
    # working directory): match on "<folder>/<file name>" when that is unique in the data folder.
    tails: dict[str, Sample | None] = {}
    for s in samples:
        key = "/".join(Path(s.path).parts[-2:])
        tails[key] = None if key in tails else s
    used: list[Sample] = []
    split: dict = {"seed": saved.seed, "from_file": str(path.resolve())}
    missing: list[str] = []
    for part in SPLIT_PARTS:
        idx = []
        for row in saved.part(part):
            s = by_path.get(str(Path(row.path).resolve())) or tails.get("/".join(Path(row.written).parts[-2:]))
            if s is None:
                missing.append(row.written)
                continue
            if s.label != row.label:
                raise DataError(f"split file {path}: {row.written} is labelled {row.label!r} there but "
                                f"{s.label!r} in the data folder")
            # keep the file's group (it may be a time segment of a recording)
            used.append(Sample(s.path, s.label, row.group if row.group is not None else s.group))
            idx.append(len(used) - 1)
        split[part] = idx
    if missing:
        raise DataError(f"split file {path} names {len(missing)} file(s) the data folder lacks "
                        f"(first: {missing[0]}); train on the same data folder or drop the split file")
    if not split["train"] or not split["val"]:
        raise DataError(f"split file {path} has an empty train or validation part")
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
    All other samples go through :func:`grouped_split`.

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
        n_test = max(1, int(round(test_fraction * n))) if test_fraction > 0 else 0  # 0: a final fit
        n_val = max(1, int(round(val_fraction * n)))
        n_train = n - n_test - n_val - (2 if n_test else 1) * gap
        if n_train < 1:
            raise DataError(f"recording group {g!r} has {n} frames: too few to cut into train/val/test in time")
        cuts = {"train": order[:n_train], "val": order[n_train + gap:n_train + gap + n_val],
                "test": order[n - n_test:] if n_test else []}
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
        _check_stratifiable(labels[rest], n_splits, f"hold out {val_fraction:.0%} of fold {fold['fold']} for validation")
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
