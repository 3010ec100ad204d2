"""Training an ensemble recipe: :func:`train_ensemble` trains the ``members`` of a recipe on one shared
partition and assembles their ensemble folder with :func:`pellucid.core.ensemble.build_ensemble`
(calibrated on the shared validation part, scored on the shared test part).

It lives apart from :mod:`pellucid.core.ensemble`, which loads and builds ensembles without training
anything, because training itself builds ensembles too (a snapshot-ensemble fine-tune): training
imports the ensemble builder, and this module imports both, so no import goes in a circle.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path

from pellucid.core.card import write_card
from pellucid.core.ensemble import build_ensemble
from pellucid.core.modelfolder import read_card
from pellucid.core.tasks import TaskSpecError
from pellucid.core.training import TrainConfig, check_run_folder, train
from pellucid.registry import did_you_mean

__all__ = ["train_ensemble"]

log = logging.getLogger(__name__)


def train_ensemble(cfg: TrainConfig) -> Path:
    """Train the members of ``cfg.members`` on one shared partition and build the ensemble folder.

    Each entry of ``cfg.members`` is a table of :class:`~pellucid.core.training.TrainConfig` overrides
    (for example ``{backbone = "vgg19", image_size = 224}``) applied on top of ``cfg``; the optional
    key ``weight`` sets its voting weight (default 1). A member that writes a snapshot ensemble
    (``snapshots``) joins as its snapshots, which share its weight equally. The first member makes the partition
    (``cfg.split``/``cfg.split_file``); every later member reuses it through ``split_file``, so the
    ensemble can be calibrated on the shared validation part and scored on the shared test part.

    Returns:
        ``cfg.out``, an ensemble model folder whose members sit in ``cfg.out/members/``.
    """
    run_folder = check_run_folder(cfg, kind="ensemble")  # another run in cfg.out: one-line refusal, before any work
    t0 = time.time()
    known = set(TrainConfig.__dataclass_fields__) - {"task", "data", "out", "members"}
    out = Path(cfg.out)
    base = replace(cfg, members=[], overwrite=False)  # --overwrite clears cfg.out (members included) once
    overrides, weights = [], []
    for i, entry in enumerate(cfg.members):
        over = dict(entry)
        weights.append(float(over.pop("weight", 1.0)))
        bad = sorted(set(over) - known)
        if bad:
            raise TaskSpecError(f"ensemble member {i}: unknown training option {bad[0]!r}"
                                + did_you_mean(bad[0], sorted(known), clause=True))
        overrides.append(over)
    run_folder.start()
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1, default=str))
    dirs, flat_w = [], []
    split_file = cfg.split_file
    for i, over in enumerate(overrides):
        name = f"m{i}_{over.get('backbone', base.backbone)}_{over.get('image_size', base.image_size)}"
        mcfg = replace(base, out=str(out / "members" / name), **over)
        if split_file:
            mcfg = replace(mcfg, split_file=split_file, max_images=None)
        log.info("ensemble member %d/%d: %s", i + 1, len(overrides), name)
        folder = Path(train(mcfg))
        if not split_file:
            split_file = str(folder / "split.json")
        mcard = read_card(folder)
        if mcard.kind == "ensemble":  # a snapshot ensemble: its snapshots join as members, sharing its weight
            entries = mcard.extra["members"]
            dirs += [folder / e["path"] for e in entries]
            flat_w += [weights[i] * float(e["weight"]) for e in entries]
        else:
            dirs.append(folder)
            flat_w.append(weights[i])
    t_build = time.time()
    folder = build_ensemble(dirs, out, flat_w, n_boot=cfg.n_boot, seed=cfg.seed,
                            training={"members_seconds": round(t_build - t0, 1), "data": str(Path(cfg.data).resolve())})
    card = read_card(folder)
    card.training.seconds = round(time.time() - t0, 1)
    write_card(folder, card)
    return folder
