"""Ensembles: a model folder of member model folders, soft-voting their calibrated probabilities.

An ensemble folder holds ``card.json`` (kind ``"ensemble"``, the task's classes, ``members``:
relative paths of member model folders *inside* it, and their ``weights``) and the members under
``members/``. :func:`load_ensemble` returns an :class:`Ensemble` module whose forward pass is the
log of the weighted mean of the members' temperature-calibrated probabilities, so everything that
takes a model — :class:`~pellucid.core.predict.Predictor`, ``pellucid eval``, explainers, reports,
the web app — works on an ensemble unchanged. Explainers that need per-member maps combine them
with :attr:`Ensemble.members` and :attr:`Ensemble.weights`.

:func:`build_ensemble` assembles the folder from trained member folders and, when the members share
one validation/test partition (same ``split.json``), fits the ensemble's own temperature and
threshold on validation and scores it on test with bootstrap intervals, like a single model.
:func:`pellucid.core.ensemble_train.train_ensemble` trains a recipe's ``members`` on one shared
partition and builds the folder with it, and a snapshot-ensemble fine-tune
(:mod:`pellucid.core.training`) builds one from its snapshots.
"""
from __future__ import annotations

import datetime as _dt
import logging
import math
import shutil
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from pellucid.core.card import Calibration, ModelCard, SplitSummary, Threshold, TrainingInfo, write_card
from pellucid.core.modelfolder import ModelFolderError, load_model, read_card
from pellucid.datasets.splits import Split, load_split, split_file

if TYPE_CHECKING:
    from pellucid.core.tasks import TaskSpec

__all__ = ["Ensemble", "build_ensemble", "load_ensemble"]

log = logging.getLogger(__name__)

# Files of a member folder copied into the ensemble (checkpoints and logs stay behind).
#: members an ensemble folder may list (the apps' default recipes have 4 to 5; each is a network to load and run)
MAX_MEMBERS = 32

_MEMBER_FILES = ("card.json", "MODEL_CARD.md", "model.safetensors", "ood.safetensors", "metrics.json", "split.json",
                 "config.json", "history.json")


class Ensemble(nn.Module):
    """Soft voting of calibrated members.

    ``forward(x) = log( sum_i w_i * softmax(member_i(resize_i(x)) / T_i) )`` with weights summing to 1,
    so ``softmax(forward(x))`` is the weighted mean of the members' calibrated probabilities.

    Args:
        members: member classifiers, each mapping ``(B, 3, S_i, S_i)`` in [0, 1] to logits ``(B, C)``.
        weights: one non-negative weight per member (normalised to sum 1).
        temperatures: each member's calibration temperature (from its card).
        image_sizes: each member's input side; inputs of another size are resized (bilinear,
            antialiased) before that member sees them.

    Attributes:
        members: ``nn.ModuleList`` of the members (indexable and iterable like a list).
        weights: normalised weights as a list of floats, in member order.
        temperatures: list of floats; ``image_sizes``: list of ints.
    """

    def __init__(self, members: Sequence[nn.Module], weights: Sequence[float] | None = None,
                 temperatures: Sequence[float] | None = None, image_sizes: Sequence[int | None] | None = None):
        super().__init__()
        n = len(members)
        if n == 0:
            raise ValueError("an ensemble needs at least one member, got 0")
        w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
        if w.shape != (n,) or (w < 0).any() or not w.sum() > 0 or not np.isfinite(w).all():
            raise ValueError(f"weights must be {n} non-negative numbers with a positive sum, got {list(np.ravel(w))}")
        temps = [1.0] * n if temperatures is None else [float(t) for t in temperatures]
        if len(temps) != n or not all(t > 0 and math.isfinite(t) for t in temps):
            raise ValueError(f"temperatures must be {n} finite numbers > 0, got {temps}")
        self.members = nn.ModuleList(members)
        self.weights: list[float] = [float(x) for x in w / w.sum()]
        self.temperatures: list[float] = temps
        self.image_sizes: list[int | None] = list(image_sizes) if image_sizes is not None else [None] * n
        self.register_buffer("log_weights", torch.log(torch.tensor(self.weights, dtype=torch.float32)),
                             persistent=False)
        self.num_classes = int(getattr(members[0], "num_classes", 0)) or None

    def _inputs(self, x: torch.Tensor):
        """Each member with its temperature and ``x`` at its input size."""
        for member, T, size in zip(self.members, self.temperatures, self.image_sizes):
            xi = x
            if size is not None and tuple(x.shape[-2:]) != (size, size):
                xi = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            yield member, T, xi

    def member_log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Calibrated log-probabilities of every member, ``(M, B, C)``, for images ``(B, 3, S, S)``."""
        return torch.stack([F.log_softmax(member(xi).float() / T, dim=1) for member, T, xi in self._inputs(x)])

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``forward(x)`` and the members' pooled embeddings side by side ``(B, D_1 + ... + D_M)`` in one
        pass (None when a member has no ``features`` + ``head``): what the domain check reads."""
        lps, feats = [], []
        for member, T, xi in self._inputs(x):
            if feats is not None and hasattr(member, "forward_with_features"):  # a member averaging views
                z, f = member.forward_with_features(xi)
                if f is None:
                    feats = None
                else:
                    feats.append(f.float())
            elif feats is not None and hasattr(member, "features") and hasattr(member, "head"):
                f = member.features(xi)
                feats.append(f.float())
                z = member.head(f)
            else:
                feats, z = None, member(xi)
            lps.append(F.log_softmax(z.float() / T, dim=1))
        lp = torch.stack(lps) + self.log_weights.view(-1, 1, 1).to(x.device)
        return torch.logsumexp(lp, dim=0), None if feats is None else torch.cat(feats, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Log of the weighted mean calibrated probability, ``(B, C)``, of images ``(B, 3, S, S)`` in [0, 1]."""
        lp = self.member_log_probs(x) + self.log_weights.view(-1, 1, 1).to(x.device)
        return torch.logsumexp(lp, dim=0)


def load_ensemble(folder: str | Path, card: ModelCard) -> Ensemble:
    """Build the :class:`Ensemble` of an ensemble model folder (called by ``load_model``)."""
    folder = Path(folder)
    entries = card.extra.get("members")
    if not entries or not isinstance(entries, list):
        raise ModelFolderError(f"{folder}/card.json: an ensemble card needs a non-empty 'members' list")
    if len(entries) > MAX_MEMBERS:
        raise ModelFolderError(f"{folder}/card.json: lists {len(entries)} members, more than the {MAX_MEMBERS} an "
                               "ensemble folder may hold — the folder is damaged or not pellucid's")
    members, temps, sizes, seen = [], [], [], set()
    for i, entry in enumerate(entries, start=1):
        rel = entry.get("path") if isinstance(entry, dict) else entry
        if not isinstance(rel, str) or not rel.strip():
            raise ModelFolderError(f"{folder}/card.json: member {i} names no folder (each member is a path inside "
                                   "the ensemble folder, or {'path': ..., 'weight': ...})")
        path = (folder / rel).resolve()
        if folder.resolve() not in path.parents:
            raise ModelFolderError(f"{folder}/card.json: member path {rel!r} points outside the ensemble folder")
        if path in seen:  # one member loaded hundreds of times had taken 6.8 GB and minutes per image
            raise ModelFolderError(f"{folder}/card.json: member {rel!r} is listed twice (give it a weight instead)")
        seen.add(path)
        if (path / "card.json").is_file() and read_card(path).kind == "ensemble":
            raise ModelFolderError(f"{folder}/card.json: member {rel!r} is itself an ensemble — list its members "
                                   "in this ensemble instead")
        model, mcard = load_model(path)
        if mcard.classes != card.classes:
            raise ModelFolderError(f"ensemble member {rel}: classes {mcard.classes} differ from the "
                                   f"ensemble's {card.classes}")
        members.append(model)
        temps.append(mcard.temperature)
        sizes.append(int(mcard.image_size or card.image_size))
    # Member weights live in each ``members`` entry; ``card.weights`` is, as in every model card, the
    # record of where the weights came from (a plain list there is accepted too).
    weights = card.weights if isinstance(card.weights, list) else \
        [e.get("weight", 1.0) if isinstance(e, dict) else 1.0 for e in entries]
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0
               for w in weights):
        raise ModelFolderError(f"{folder}/card.json: the member weights must be numbers of 0 or more, got "
                               f"{str(weights)[:120]}")
    if len(weights) != len(members):
        raise ModelFolderError(f"{folder}/card.json: {len(weights)} weights for {len(members)} members")
    return Ensemble(members, weights, temps, sizes).eval()


def _copy_member(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in _MEMBER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
    if (src / "plots").is_dir():
        shutil.copytree(src / "plots", dst / "plots", dirs_exist_ok=True)


def _shared_split(member_dirs: Sequence[Path]) -> Split | None:
    """The partition all members were trained on, or None when they differ or one lacks it."""
    keys, first = set(), None
    for d in member_dirs:
        if not split_file(d).is_file():
            return None
        s = load_split(d)
        key = tuple(tuple(sorted(Path(r.path).resolve().as_posix() for r in s.part(p))) for p in ("val", "test"))
        keys.add(key)
        first = first or s
    return first if len(keys) == 1 and first.val else None  # no test part: a final fit, calibrated, unscored


@torch.inference_mode()
def _logits_of(model: nn.Module, paths: list[str], size: int, channels: int | None, preprocess=None
               ) -> tuple[torch.Tensor, list[int]]:
    """Logits of the readable ``paths`` (``preprocess``: a lung masker or None) and their positions."""
    from pellucid.datasets.torchdata import ImageCache, to_tensor

    cache = ImageCache(paths, size, channels=channels, progress=False, preprocess=preprocess)
    ok = cache.ok(range(len(paths)))
    out = []
    for i in range(0, len(ok), 64):
        batch = torch.stack([to_tensor(cache.get(p)) for p in ok[i:i + 64]])
        out.append(model(batch).float())
    return (torch.cat(out) if out else torch.zeros(0, 1)), ok


def build_ensemble(member_dirs: Sequence[str | Path], out: str | Path, weights: Sequence[float] | None = None, *,
                   n_boot: int = 1000, seed: int = 0, copy: bool = True, training: dict | None = None) -> Path:
    """Assemble an ensemble model folder from trained member folders.

    Members outside ``out`` are copied into ``out/members/<name>`` (weights, card, split and metrics;
    not checkpoints or logs). When every member carries the same validation and test partition, the
    ensemble's temperature and threshold (the task's policy) are fitted on validation and its metrics
    measured on test; otherwise the card says the ensemble is uncalibrated and unscored.

    Args:
        member_dirs: model folders of one task with the same classes.
        out: the ensemble folder to write.
        weights: one weight per member (default equal; normalised to sum 1).
        n_boot: bootstrap resamples for the test intervals.
        seed: bootstrap seed.
        copy: copy members that live outside ``out`` (False: they must already be inside it).
        training: extra facts for the card's ``training`` record (e.g. the members' training time).

    Returns:
        The ensemble folder.
    """
    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    member_dirs = [Path(d) for d in member_dirs]
    if not member_dirs:
        raise ValueError("build_ensemble needs at least one member folder, got none")
    cards = [read_card(d) for d in member_dirs]
    channels_in = _check_members(member_dirs, cards)
    inside = _place_members(member_dirs, out, copy)
    rel = [p.relative_to(out.resolve()).as_posix() for p in inside]
    if weights is not None and len(weights) != len(rel):
        raise ValueError(f"{len(weights)} weights for {len(rel)} members")
    w = np.ones(len(rel)) if weights is None else np.asarray(weights, dtype=np.float64)
    task = _task_or_none(cards[0].task)
    card = _ensemble_card(cards, rel, w / w.sum(), channels_in)
    shared = _shared_split(inside)
    reason = "members do not share one validation/test partition" if shared is None else None
    if shared is not None and not any(r.found for r in shared.val):
        reason = f"the members' validation images ({shared.val[0].written}, ...) cannot be read from here"
        shared = None
    if shared is None:
        warnings.warn(f"{reason}: the ensemble is left uncalibrated (temperature 1) and unscored", stacklevel=2)
        card.calibration = Calibration(method="none", temperature=1.0, extra={"note": reason})
        card.threshold = Threshold(policy="argmax", value=None, positive_class=card.positive_class)
        card.metrics, card.split = {"note": f"not scored: {reason}"}, None
    else:
        scored = _score_ensemble(out, card, shared, task, n_boot=n_boot, seed=seed)
        card.calibration = Calibration.from_dict(scored["calibration"])
        card.threshold = Threshold.from_dict(scored["threshold"])
        card.metrics, card.split = scored["metrics"], SplitSummary.from_dict(scored["split"])
    card.training = TrainingInfo.from_dict({"seconds": round(time.time() - t0, 1), "kind": "ensemble of trained members",
                                            **(training or {})})
    card.created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    write_card(out, card)
    log.info("ensemble of %d members written to %s", len(rel), out)
    return out


def _check_members(member_dirs: Sequence[Path], cards: Sequence[ModelCard]) -> int | None:
    """Check that the members are plain models of one task with the same classes and input channels;
    return those channels (``preprocessing.channels_in``)."""
    if any(c.kind == "ensemble" for c in cards):
        raise ModelFolderError("an ensemble member may not itself be an ensemble; give its members instead")
    task_name, classes = cards[0].task, list(cards[0].classes)
    for d, c in zip(member_dirs, cards):
        if c.task != task_name or c.classes != classes:
            raise ModelFolderError(f"member {d} is for task {c.task!r} with classes {c.classes}; "
                                   f"the first member is {task_name!r} with {classes}")
    channels = {c.preprocessing.channels_in for c in cards}
    if len(channels) != 1:
        raise ModelFolderError(f"members disagree on input channels {sorted(map(str, channels))}")
    return channels.pop()


def _place_members(member_dirs: Sequence[Path], out: Path, copy: bool) -> list[Path]:
    """Resolved member folders inside ``out``: members already there stay, the others are copied to
    ``out/members/<name>`` (a name taken gets ``_`` appended)."""
    inside = []
    used_names: set[str] = set()
    for d in member_dirs:
        if out.resolve() in d.resolve().parents:
            inside.append(d.resolve())
            continue
        if not copy:
            raise ModelFolderError(f"member {d} is outside the ensemble folder {out} and copy=False")
        name = d.name
        while name in used_names or (out / "members" / name).exists():
            name += "_"
        used_names.add(name)
        _copy_member(d, out / "members" / name)
        inside.append((out / "members" / name).resolve())
    return inside


def _ensemble_card(cards: Sequence[ModelCard], rel: Sequence[str], w: np.ndarray, channels_in: int | None
                   ) -> ModelCard:
    """The ensemble's card before scoring: task facts from the first member, one ``members`` entry
    per member (path, normalised weight, backbone, size, temperature, test metrics)."""
    import pellucid

    first = cards[0]
    sizes = [int(c.image_size) for c in cards]
    return ModelCard.from_dict({
        "kind": "ensemble",
        "pellucid_version": pellucid.__version__,
        "task": first.task,
        "title": first.title if first.title is not None else first.task,
        "classes": list(first.classes),
        "positive_class": first.positive_class,
        "modality": first.modality,
        "intended_use": first.intended_use,
        "explainers": list(first.explainers),
        "explainer_options": dict(first.explainer_options),
        "backbone": {"name": "ensemble", "members": [c.backbone_name for c in cards]},
        "weights": {"source": "members", "pretrained": True,
                    "detail": "; ".join(f"{r}: {c.weight_source}" for r, c in zip(rel, cards))},
        "members": [{"path": r, "weight": float(wi), "backbone": c.backbone_name, "image_size": s,
                     "temperature": c.temperature,
                     "test_metrics": {k: v.get("value") for k, v in c.metrics.get("metrics", {}).items()}}
                    for r, wi, c, s in zip(rel, w, cards, sizes)],
        "preprocessing": {"image_size": max(sizes), "channels_in": channels_in, "resize": "squash",
                          "input_range": [0.0, 1.0], "member_sizes": sizes,
                          "note": "each member resizes the input to its own size (bilinear, antialiased)"},
        **({"task_spec": first.extra["task_spec"]} if "task_spec" in first.extra else {}),
    })


def _task_or_none(name: str) -> TaskSpec | None:
    """The members' task spec, or None for a task this installation does not know."""
    from pellucid.core.tasks import get_task

    try:
        return get_task(name)
    except KeyError:
        return None


def _score_ensemble(out: Path, card: ModelCard, shared: Split, task: TaskSpec | None, *, n_boot: int, seed: int) -> dict:
    """Calibrate and threshold the ensemble on the shared validation part and score it on the shared
    test part (``split.json``, ``metrics.json`` and plots written to ``out``).

    Returns:
        The card entries ``calibration``, ``threshold``, ``metrics`` and ``split``.
    """
    from pellucid.core.scoring import score_split

    shared.save(out / "split.json")
    model = load_ensemble(out, card)
    classes = card.classes
    idx = {c: i for i, c in enumerate(classes)}
    logits, y = {}, {}
    for part in ("val", "test"):
        rows = shared.part(part)
        lg, ok = _logits_of(model, [r.path for r in rows], card.image_size, card.preprocessing.channels_in)
        logits[part], y[part] = lg, np.array([idx[rows[i].label] for i in ok])
    pos = classes.index(card.positive_class) if card.positive_class in classes else None
    cal, threshold, test_metrics = score_split(
        logits["val"], y["val"], logits["test"], y["test"], classes, out,
        positive_index=pos if len(classes) == 2 else None, positive_class=card.positive_class,
        policy=task.threshold_policy if task is not None else "argmax",
        target_sensitivity=task.target_sensitivity if task is not None else None, n_boot=n_boot, seed=seed)
    split = {"hash": shared.hash, "seed": shared.seed, "train": len(shared.train),
             "val": len(shared.val), "test": len(shared.test), "file": "split.json"}
    return {"calibration": cal, "threshold": threshold, "metrics": test_metrics, "split": split}
