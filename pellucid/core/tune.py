"""Recipe search: candidate recipes scored by grouped k-fold cross-validation on the dev data.

``pellucid tune TASK`` (or ``python -m bench.recipes TASK``) makes ``k`` grouped, stratified folds
of the task's data once (:func:`pellucid.datasets.splits.kfold_splits`, each fold with its own
grouped validation hold-out) and scores every candidate on the same folds: the validation part
chooses the head's L2 strength, the temperature and the decision threshold, the fold's test part
only scores. The table (``recipes-<task>.md`` + ``.json``) gives each candidate's mean ± sd over
folds and its paired difference to the two baselines every recipe has to beat:

* **A** — frozen EfficientNet-Lite0 + a linear (logistic-regression) head: ``probe:lite0``;
* **B** — a plain full fine-tune of Lite0 (AdamW, warm-up + cosine, the task's augmentation).

Three kinds of candidates:

* ``probe`` — linear heads on cached frozen features (:mod:`pellucid.core.features`), one backbone or
  a soft vote of several (what ``finetune = "linear-probe"`` trains); seconds per fold;
* ``train`` — a full training run per fold through :func:`pellucid.core.training.train` (what
  ``pellucid train`` runs); minutes per fold, so they run last and only while the time budget allows
  (the table says on how many folds; paired differences use the folds both sides ran);
* ``hybrid`` — a soft vote of a probe and a ``train`` candidate, scored from both one's folds.

The winner (one-standard-error rule, :func:`_choose`) ran on every fold; ``--write-recipe`` writes it
as a TOML recipe beside the table. Files that keep an official split in their names (``train_*`` /
``val_*``) get a second, shift-aware check: fitted on ``train_*``, scored on ``val_*``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pellucid.core.tune_candidates import CANDIDATE_KINDS, Candidate, _same_recipe, default_candidates
from pellucid.core.tune_report import _cpu_line, _recipe_toml, render_table

__all__ = ["Candidate", "default_candidates", "tune", "run_cli", "render_table", "CANDIDATE_KINDS"]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- scoring
def _scores(task, logits_val: Sequence[torch.Tensor], y_val: np.ndarray, logits_test: Sequence[torch.Tensor],
            y_test: np.ndarray, weights: Sequence[float] | None = None) -> dict[str, float | None]:
    """Headline metrics of the test part, calibrated (temperature) and thresholded on validation the
    way a model folder is; several logit sets are a soft vote (``weights``, default equal) of their
    calibrated probabilities, as in an ensemble folder."""
    from pellucid.core import calibration, metrics
    from pellucid.core.scoring import choose_split_threshold

    pv, pt = [], []
    for lv, lt in zip(logits_val, logits_test):
        T = calibration.fit_temperature(lv, y_val)
        pv.append(calibration.apply_temperature(lv, T))
        pt.append(calibration.apply_temperature(lt, T))
    probs_val, probs_test = np.average(pv, 0, weights=weights), np.average(pt, 0, weights=weights)
    thr = choose_split_threshold(y_val, probs_val, len(task.classes), task.positive_index, task.threshold_policy,
                                 task.target_sensitivity)
    m = metrics.classification_metrics(y_test, probs_test, list(task.classes), threshold=thr,
                                       positive_index=task.positive_index if task.binary else None, n_boot=0)
    return {k: v["value"] for k, v in m["metrics"].items()}


class _Data:
    """The task's samples, labels and the embeddings the probe candidates share."""

    def __init__(self, task, samples, recipe: dict, progress: bool):
        self.task, self.samples, self.progress = task, samples, progress
        index = {c: i for i, c in enumerate(task.classes)}
        self.y = np.array([index[s.label] for s in samples])
        self.recipe = recipe
        self._emb: dict = {}
        self.embed_seconds = 0.0
        self.seed: int | None = None

    def embeddings(self, backbone: str, size: int, flip: bool, layers: Sequence[str] = ()):
        from pellucid.core.features import embed_samples

        flip = bool(flip)  # mirrored features serve TTA and fitting alike
        key = (backbone, size, flip, tuple(layers))
        if key not in self._emb:
            emb = embed_samples(self.samples, backbone, size, channels=self.task.channels, flip=flip,
                                preprocess=self.recipe.get("preprocess", "none"),
                                segmenter=self.recipe.get("segmenter"), progress=self.progress, layers=layers)
            self.embed_seconds += emb.seconds
            self._emb[key] = emb
        return self._emb[key]


def _fit_probe_logits(data: _Data, backbone: str, size: int, flip: bool, split: dict, layers: Sequence[str] = ()):
    """Fit one linear head on the fold's training features (L2 on validation); logits of val and test."""
    from pellucid.core.training import _class_weights, fit_head

    emb = data.embeddings(backbone, size, flip, layers)
    rows = {p: emb.rows_for(split[p]) for p in ("train", "val", "test")}
    ys = {p: torch.as_tensor(data.y[emb.positions[r]]) for p, r in rows.items()}
    feats = {p: emb.feats[r] for p, r in rows.items()}
    n_cls = len(data.task.classes)
    cw = _class_weights(ys["train"].numpy(), n_cls) if data.recipe.get("balance", "weights") == "weights" else None
    head = torch.nn.Linear(feats["train"].shape[-1], n_cls)
    if flip:  # fit on plain and mirrored rows; validate / predict on their mean logits (TTA) or the plain ones
        tr = feats["train"].reshape(-1, feats["train"].shape[-1])
        fit_head(head, tr, ys["train"].repeat_interleave(2), weight=cw, epochs=data.recipe.get("probe_epochs", 40),
                 label_smoothing=data.recipe.get("label_smoothing", 0.0), val=(feats["val"][:, 0], ys["val"]))
        with torch.no_grad():
            out = {p: (head(feats[p][:, 0]) if flip == "fit" else head(feats[p]).mean(1)) for p in ("val", "test")}
    else:
        fit_head(head, feats["train"], ys["train"], weight=cw, epochs=data.recipe.get("probe_epochs", 40),
                 label_smoothing=data.recipe.get("label_smoothing", 0.0), val=(feats["val"], ys["val"]))
        with torch.no_grad():
            out = {p: head(feats[p]) for p in ("val", "test")}
    return out, ys


def _probe_parts(data: _Data, cand: Candidate, split: dict) -> list[dict]:
    """Per member of a probe candidate: ``{part: (sample indices, logits)}`` for val and test."""
    parts = []
    for backbone, size in cand.members:
        out, _ = _fit_probe_logits(data, backbone, size, cand.flip, split, cand.layers)
        emb = data.embeddings(backbone, size, cand.flip, cand.layers)
        parts.append({p: (emb.positions[emb.rows_for(split[p])], out[p]) for p in ("val", "test")})
    return parts


def _vote(data: _Data, parts: list[dict], weights: Sequence[float] | None = None) -> dict:
    """Scores of a soft vote of logit sets ``{part: (sample indices, logits)}``, on the samples every
    set has (a file one reader could not decode is left out of all of them)."""
    lv, lt, ys = [], [], {}
    for p, store in (("val", lv), ("test", lt)):
        common = set.intersection(*[set(int(i) for i in part[p][0]) for part in parts])
        order = [int(i) for i in parts[0][p][0] if int(i) in common]
        for part in parts:
            where = {int(i): r for r, i in enumerate(part[p][0])}
            store.append(part[p][1][[where[i] for i in order]])
        ys[p] = data.y[order]
    return _scores(data.task, lv, ys["val"], lt, ys["test"], weights)


def _run_probe(data: _Data, cand: Candidate, split: dict) -> dict:
    t = time.time()
    metrics = _vote(data, _probe_parts(data, cand, split))
    return {"metrics": metrics, "seconds": round(time.time() - t, 2)}


def _train_fold_logits(task, folder: Path, samples, split: dict, size: int | None = None, tta: str | None = None
                       ) -> dict:
    """Raw logits of one fold's trained model folder on the fold's validation and test parts,
    ``{part: (sample indices, logits)}``; kept in ``fold_logits.pt`` beside the model (``size``: images read at
    that input instead of the card's, kept in ``fold_logits_<size>.pt``; ``tta``: the network's logits averaged
    over those test-time views instead of the card's, ``"none"`` for one view, kept in ``fold_logits_<tta>.pt``)."""
    cache = folder / ("fold_logits" + (f"_{size}" if size is not None else "") + (f"_{tta}" if tta else "") + ".pt")
    if cache.exists():
        saved = torch.load(cache, map_location="cpu", weights_only=True)
        return {p: (saved[p + "_idx"].numpy(), saved[p]) for p in ("val", "test")}
    from pellucid.core.ensemble import _logits_of
    from pellucid.core.modelfolder import load_model
    from pellucid.core.segmentation import LungMasker

    model, card = load_model(folder)
    if tta is not None:  # the network alone, then the views asked for (none: one pass)
        from pellucid.core.views import ViewAverage, check_tta

        model, views = getattr(model, "inner", model), check_tta(tta)
        model = ViewAverage(model, views) if views else model
    model.eval()
    size = int(size or card.image_size or task.image_size)
    out, flat = {}, {}
    for p in ("val", "test"):
        idx = list(split[p])
        logits, ok = _logits_of(model, [samples[i].path for i in idx], size, task.channels,
                                LungMasker.from_card(card))
        out[p] = (np.array([idx[j] for j in ok], dtype=int), logits)
        flat[p], flat[p + "_idx"] = out[p][1], torch.as_tensor(out[p][0])
    torch.save(flat, cache)
    return out


def _run_hybrid(data: _Data, cand: Candidate, probe: Candidate, split: dict, trained: Sequence[dict]) -> dict:
    t = time.time()
    probes = _probe_parts(data, probe, split)
    metrics = _vote(data, probes + list(trained), [1.0] * len(probes) + [cand.train_weight] * len(trained))
    return {"metrics": metrics, "seconds": round(time.time() - t, 2)}


def _run_train(task, cand: Candidate, data_dir: str, split_path: Path, out: Path, seed: int) -> dict:
    from pellucid.core.training import TrainConfig, train

    cfg = TrainConfig.from_task(task, data_dir, str(out), **{k: v for k, v in cand.overrides.items()
                                                            if k != "image_size"})
    if "image_size" in cand.overrides:
        cfg = replace(cfg, image_size=int(cand.overrides["image_size"]))
    # a candidate's own "seed" (a seed ensemble's twin) is an offset from the fold seed
    cfg = replace(cfg, split_file=str(split_path), seed=seed + int(cand.overrides.get("seed", 0)), n_boot=0,
                  progress=False, overwrite=True,
                  members=[] if cand.role != "current" else cfg.members)
    (out / "fold_logits.pt").unlink(missing_ok=True)  # a retrained fold must not keep the old model's logits
    t = time.time()
    if cfg.members:
        from pellucid.core.ensemble_train import train_ensemble

        folder = train_ensemble(cfg)
    else:
        folder = train(cfg)
    m = json.loads((Path(folder) / "metrics.json").read_text())
    card = json.loads((Path(folder) / "card.json").read_text())
    res = {"metrics": {k: v["value"] for k, v in m["metrics"].items()}, "seconds": round(time.time() - t, 1),
           "kept": card.get("training", {}).get("kept")}
    # kept beside the model, so that a search stopped half-way (or run in pieces) loses no fold: --resume reads it
    (out / FOLD_RESULT).write_text(json.dumps({**res, "recipe": cand.recipe(task), "split": _split_hash(split_path)},
                                              default=str))
    return res


FOLD_RESULT = "fold_result.json"


def _split_hash(split_path: Path) -> str:
    return hashlib.sha256(Path(split_path).read_bytes()).hexdigest()[:16]


def _kept_fold(folder: Path, recipe: dict, split_path: Path) -> dict | None:
    """A fold result kept beside its model (:data:`FOLD_RESULT`) when it was trained with this recipe on
    this split, else ``None``."""
    try:
        kept = json.loads((folder / FOLD_RESULT).read_text())
    except (OSError, ValueError):
        return None
    same = (folder / "card.json").exists() and kept.get("split") == _split_hash(split_path)
    same = same and _same_recipe(kept, recipe)
    return {k: kept[k] for k in ("metrics", "seconds", "kept") if k in kept} if same else None


# ----------------------------------------------------------------------------- the search
def _headline(task, res: dict) -> dict:
    return {k: round(v, 4) for k, v in res["metrics"].items() if v is not None and k in task.metrics[:2]}


def _fold_worker(task_name: str, cand: Candidate, data_dir: str, split_path: str, out: str, seed: int,
                 threads: int) -> dict:
    """One fold of a training candidate in a worker process (``--jobs``)."""
    from pellucid.core.tasks import get_task

    torch.set_num_threads(threads)
    return _run_train(get_task(task_name), cand, data_dir, Path(split_path), Path(out), seed)


def _train_parallel(task, cand: Candidate, row: dict, data_dir: str, split_list, split_paths, work: Path,
                    seed: int, jobs: int, train_folds: int | None, budget_s: float, t0: float) -> None:
    """Run a training candidate's missing folds ``jobs`` at a time in worker processes; fills
    ``row["folds"]`` and ``row["stopped"]`` as the serial loop does. A fold starts only while its
    expected end (the mean fold time so far) is inside the budget."""
    import concurrent.futures as cf
    import multiprocessing as mp
    import os
    todo = [(s, sp) for s, sp in zip(split_list, split_paths) if str(s["fold"]) not in row["folds"]]
    if train_folds is not None:
        room = max(0, train_folds - len(row["folds"]))
        if len(todo) > room:
            row["stopped"] = f"run on the first {train_folds} fold(s) only (--train-folds)"
        todo = todo[:room]
    threads = max(1, (os.cpu_count() or 1) // jobs)
    running: dict = {}
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        while todo or running:
            while todo and len(running) < jobs:
                done = [f["seconds"] for f in row["folds"].values()]
                guess = np.mean(done) if done else 0.0
                if time.time() - t0 + guess > budget_s:
                    row["stopped"] = f"time budget ({budget_s / 60:g} min) reached after {len(done)} fold(s)"
                    todo = []
                    break
                s, sp = todo.pop(0)
                fut = pool.submit(_fold_worker, task.name, cand, data_dir, str(sp),
                                  str(work / cand.name.replace(":", "_") / f"fold_{s['fold']}"), seed, threads)
                running[fut] = str(s["fold"])
            if not running:
                break
            finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for fut in finished:
                f = running.pop(fut)
                row["folds"][f] = fut.result()
                log.info("%s fold %s: %s", cand.name, f, _headline(task, row["folds"][f]))
    row["folds"] = dict(sorted(row["folds"].items()))


def _block_single_group_classes(samples, k: int):
    """Classes whose images are all one group (sonar's fish and mine: frames of one recording) would
    sit in a single fold's test part, never in its training part. They are cut into ``2k`` blocks in
    frame (file-name) order, each block a group — weaker than true group separation (frames at block
    edges look alike), which the table says. Returns ``(samples, blocked class names)``."""
    from pellucid.core.fewshot.episodes import split_single_group_classes

    groups: dict[str, set] = {}
    for s in samples:
        groups.setdefault(s.label, set()).add(s.group)
    single = sorted(c for c, g in groups.items() if len(g) == 1)
    if not single:
        return samples, []
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return split_single_group_classes(samples, n_blocks=2 * k), single


def _official_split(samples) -> dict | None:
    """Indices of an official split kept in the file names (``train_*``, ``val_*``), or None."""
    part = [re.match(r"(train|val|test)_", Path(s.path).name) for s in samples]
    names = {m.group(1) for m in part if m}
    if not {"train", "val"} <= names or any(m is None for m in part):
        return None
    idx = {n: [i for i, m in enumerate(part) if m.group(1) == n] for n in names}
    return idx


def _official_fold(samples, idx: dict, seed: int) -> dict:
    """Train on ``train_*`` (a random 15 % of its groups validates), test on ``val_*``."""
    rng = np.random.default_rng(seed)
    groups = sorted({samples[i].group for i in idx["train"]})
    held = set(rng.permutation(groups)[: max(1, len(groups) * 15 // 100)].tolist())
    train = [i for i in idx["train"] if samples[i].group not in held]
    val = [i for i in idx["train"] if samples[i].group in held]
    return {"train": train, "val": val, "test": idx["val"], "fold": "official"}


def _mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    v = np.array([x for x in values if x is not None and math.isfinite(x)], float)
    if v.size == 0:
        return None, None
    return float(v.mean()), (float(v.std(ddof=1)) if v.size > 1 else None)


def search_folds(task, data: str | Path, folds: int, seed: int) -> tuple[list, list, list[dict]]:
    """The samples of ``data``, the classes set aside (a class of one group cannot sit on both sides of a
    fold), and the grouped folds a recipe search scores on; the benches that rescore a search's folds
    (``bench.testsize_screen``, ``bench.final_fit``) take them from here, so they are the same folds."""
    from pellucid.datasets.samples import load_samples
    from pellucid.datasets.splits import kfold_splits

    samples = load_samples(data, classes=task.classes, aliases=task.aliases)
    samples, blocked = _block_single_group_classes(samples, folds)
    return samples, blocked, kfold_splits(samples, folds, val_fraction=0.15, seed=seed)


def tune(task_name: str, data: str, *, folds: int = 5, budget_min: float = 15.0,
         candidates: Sequence[str] | None = None, out: str | Path = "bench/results", seed: int = 0,
         write_recipe: bool = False, work: str | Path | None = None, fine_tune_epochs: int = 6,
         progress: bool = True, candidate_list: Sequence[Candidate] | None = None,
         train_folds: int | None = None, skip: Sequence[str] = (), name: str | None = None,
         resume: bool = False, jobs: int = 1, refit: Sequence[str] = ()) -> dict:
    """Score the task's candidates on the same grouped folds; write ``recipes-<task>.md``/``.json``.

    Args:
        train_folds: run training candidates on the first this many folds only (they cost minutes
            per fold); their paired differences then use those folds, and they cannot win.
        candidate_list: the candidates to score (default: :func:`default_candidates`); ``candidates``
            then picks names from it (the baselines always run).
        name: the table's name (default the task's): ``recipes-<name>.md``, work under
            ``runs/tune/<name>`` (``<name>-seed<k>`` for fold seed k) — for a second data set (tb on ``tb_lungs``).
        resume: reuse training candidates' (and hybrids') folds of the same recipe from an earlier
            ``recipes-<name>.json`` with the same folds (k, seed, n) — the table is the record, the models
            may be gone — or from ``fold_result.json`` beside a fold's model; only missing folds train.
        jobs: train this many folds of a training candidate at once, each in its own process with
            ``cores // jobs`` torch threads.
        refit: training candidates whose folds train again even where the earlier table holds them
            (their models are gone, and the hybrids with two fine-tunes need every part's fold models);
            a fold whose model is still there is kept.

    With ``resume``, candidates that ``skip`` or ``candidates`` leave out keep their rows of the earlier
    table, so a search of a few new candidates does not drop the others from it.

    Returns:
        The result dict written as JSON (``candidates``: per candidate its folds and summaries;
        ``winner``: the name chosen).
    """
    from pellucid.core.tasks import get_task
    from pellucid.datasets.splits import save_split

    t0 = time.time()
    task = get_task(task_name)
    samples, blocked, split_list = search_folds(task, data, folds, seed)
    cands = list(candidate_list) if candidate_list is not None else default_candidates(task, fine_tune_epochs)
    listed = [c.name for c in cands]
    if candidates:
        known = {c.name: c for c in cands}
        missing = [n for n in candidates if n not in known]
        if missing:
            raise ValueError(f"unknown candidate(s) {', '.join(missing)}; known: {', '.join(known)}")
        chosen = set(candidates) | {c.name for c in cands if c.role in ("A", "B")}
        # the hybrids of the chosen candidates come with them (they cost no training)
        cands = [c for c in cands if c.name in chosen or (c.kind == "hybrid" and set(c.parts) <= chosen)]
    cands = [c for c in cands if c.name not in set(skip) or c.role in ("A", "B")]
    by_name = {c.name: c for c in cands}
    cands = [c for c in cands if c.kind != "hybrid" or all(p in by_name for p in c.parts)]
    name = name or task.name
    out = Path(out)
    previous, earlier_cpus = _previous(out / f"recipes-{name}.json", folds, seed, len(samples)) if resume else ({}, [])
    work = Path(work or Path("runs") / "tune" / (name if seed == 0 else f"{name}-seed{seed}"))  # seeds apart
    (work / "folds").mkdir(parents=True, exist_ok=True)
    split_paths = []
    for s in split_list:
        p = work / "folds" / f"fold_{s['fold']}.json"
        save_split(p, samples, s)
        split_paths.append(p)
    data_obj = _Data(task, samples, task.recipe, progress)
    data_obj.seed = seed
    official = _official_split(samples)
    budget_s = budget_min * 60
    results, rows = [], {}
    for cand in cands:
        row = {"name": cand.name, "kind": cand.kind, "role": cand.role, "about": cand.about,
               "recipe": cand.recipe(task, by_name), "folds": {}, "official": None, "stopped": None}
        rows[cand.name] = row
        old = previous.get(cand.name)
        if cand.kind == "train" and cand.name not in set(refit) and _same_recipe(old, row["recipe"]):
            row["folds"] = dict(old["folds"])  # the table is the fold's record, even where its model is gone
        if cand.kind == "train" and resume:
            for s_, sp in zip(split_list, split_paths):
                f = str(s_["fold"])
                kept = None if f in row["folds"] else _kept_fold(work / cand.name.replace(":", "_") / f"fold_{f}",
                                                                  row["recipe"], sp)
                if kept:
                    row["folds"][f] = kept
            row["folds"] = dict(sorted(row["folds"].items()))
            if row["folds"]:
                log.info("%s: %d fold(s) reused from the earlier search", cand.name, len(row["folds"]))
        if cand.kind == "hybrid":
            _hybrid_row(row, cand, by_name, rows, data_obj, samples, split_list, work, previous.get(cand.name))
            if row["folds"] or len(cand.parts) == 2:  # a two-fine-tune hybrid is listed once it scored
                results.append(row)
            continue
        if cand.kind == "train" and jobs > 1:
            _train_parallel(task, cand, row, data, split_list, split_paths, work, seed, jobs, train_folds,
                            budget_s, t0)
        for s, sp in zip(split_list, split_paths):
            if str(s["fold"]) in row["folds"] or row["stopped"]:
                continue
            if cand.kind == "train" and train_folds is not None and len(row["folds"]) >= train_folds:
                row["stopped"] = f"run on the first {train_folds} fold(s) only (--train-folds)"
                break
            if cand.kind == "train":
                done = [f["seconds"] for f in row["folds"].values()]
                guess = (np.mean(done) if done else 0.0)
                if time.time() - t0 + guess > budget_s:
                    row["stopped"] = f"time budget ({budget_min:g} min) reached after {len(done)} fold(s)"
                    break
                res = _run_train(task, cand, data, sp, work / cand.name.replace(":", "_") / f"fold_{s['fold']}",
                                 seed)
            else:
                res = _run_probe(data_obj, cand, s)
            row["folds"][str(s["fold"])] = res
            log.info("%s fold %s: %s", cand.name, s["fold"], _headline(task, res))
        if official and cand.kind == "probe":
            row["official"] = _run_probe(data_obj, cand, _official_fold(samples, official, seed))
        if official and cand.kind == "train" and len(row["folds"]) == folds:
            # the shift-aware check for a training candidate too, once it ran on every fold
            folder = work / cand.name.replace(":", "_") / "fold_official"
            if row["folds"] and _same_recipe(old, row["recipe"]) and old.get("official"):
                row["official"] = old["official"]
            elif time.time() - t0 + float(np.mean([f["seconds"] for f in row["folds"].values()])) <= budget_s:
                off = _official_fold(samples, official, seed)
                sp = work / "folds" / "fold_official.json"
                save_split(sp, samples, off)
                row["official"] = _run_train(task, cand, data, sp, folder, seed)
        results.append(row)
    if resume:  # the earlier table's rows of candidates this search skipped stay in it
        kept = {r["name"] for r in results}
        carried = [dict(previous[n]) for n in listed if n in previous and n not in kept]
        results = sorted(results + carried, key=lambda r: listed.index(r["name"]))
    result = _summarise(task, results, folds, seed, data, samples, time.time() - t0, data_obj.embed_seconds,
                        bool(official))
    result["blocked_classes"] = blocked
    result["name"] = name
    read = [len(e.positions) for e in data_obj._emb.values()]
    result["unreadable"] = len(samples) - min(read) if read else None  # in no fold's scores (probes' count)
    # a resumed table keeps rows that earlier searches scored, maybe on another CPU: the header names those too
    result["earlier_cpus"] = [c for c in dict.fromkeys(earlier_cpus) if c != result["cpu"]]
    out.mkdir(parents=True, exist_ok=True)
    (out / f"recipes-{name}.json").write_text(json.dumps(result, indent=1, default=str))
    (out / f"recipes-{name}.md").write_text(render_table(result))
    if write_recipe and result["winner"]:
        win = next(r for r in result["candidates"] if r["name"] == result["winner"])
        (out / f"recipes-{name}.toml").write_text(_recipe_toml(win["recipe"], win["name"]))
    return result


def _previous(path: Path, k: int, seed: int, n: int) -> tuple[dict, list[str]]:
    """Rows of an earlier search with the same folds, by candidate name, and the CPUs of the searches
    that scored them: its own and those whose rows it kept (both empty when there is none)."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}, []
    if (old.get("k"), old.get("seed"), old.get("n")) != (k, seed, n):
        log.warning("%s: other folds (k, seed or n differ); nothing reused", path)
        return {}, []
    rows = {r["name"]: r for r in old.get("candidates", [])}
    return rows, [str(c) for c in [*old.get("earlier_cpus", []), old.get("cpu")] if c and rows]


def _hybrid_row(row: dict, cand: Candidate, by_name: dict, rows: dict, data_obj: _Data, samples, split_list,
                work: Path, old: dict | None = None) -> None:
    """Score a hybrid on the folds its training parts ran (nothing is trained again); with --resume, a fold
    whose models are gone (a new checkout) keeps the earlier table's score when the recipe is the same."""
    probe_name, train_names = cand.parts[0], cand.parts[1:]
    trained = [rows.get(n) for n in train_names]
    if any(t is None for t in trained) or rows.get(probe_name) is None:
        row["stopped"] = "its parts were not run"
        return
    same = _same_recipe(old, row["recipe"])
    for s in split_list:
        f = str(s["fold"])
        folders = [work / n.replace(":", "_") / f"fold_{f}" for n in train_names]
        if any(f not in t["folds"] for t in trained):
            continue
        if not all((d / "card.json").exists() for d in folders):
            if same and f in old["folds"]:
                row["folds"][f] = old["folds"][f]
            continue
        res = _run_hybrid(data_obj, cand, by_name[probe_name], s,
                          [_train_fold_logits(data_obj.task, d, samples, s) for d in folders])
        res["seconds"] = round(res["seconds"] + sum(t["folds"][f]["seconds"] for t in trained), 1)
        row["folds"][f] = res
    if len(row["folds"]) < len(split_list):
        row["stopped"] = f"scored on the {len(row['folds'])} fold(s) {' and '.join(train_names)} ran"
    folders = [work / n.replace(":", "_") / "fold_official" for n in train_names]
    official = _official_split(samples)
    ran = official and all(t.get("official") for t in trained)
    if ran and all((d / "card.json").exists() for d in folders):
        off = _official_fold(samples, official, 0 if data_obj.seed is None else data_obj.seed)
        row["official"] = _run_hybrid(data_obj, cand, by_name[probe_name], off,
                                      [_train_fold_logits(data_obj.task, d, samples, off) for d in folders])
    elif ran and same and old.get("official"):
        row["official"] = old["official"]


def rescore(json_path: str | Path) -> dict:
    """Recompute the summaries and the winner of a written search (``recipes-<task>.json``) with this
    version's rule, without running anything again; rewrites the ``.json`` and ``.md`` beside it."""
    from pellucid.core.tasks import get_task

    path = Path(json_path)
    old = json.loads(path.read_text())
    task = get_task(old["task"])
    new = _summarise(task, old["candidates"], old["k"], old["seed"], old["data"], [None] * old["n"], old["seconds"],
                     old["embed_seconds"], old["official_split"])
    new.update({k: old[k] for k in ("cpu", "earlier_cpus", "torch", "threads", "blocked_classes", "name") if k in old})
    path.write_text(json.dumps(new, indent=1, default=str))
    path.with_suffix(".md").write_text(render_table(new))
    if path.with_suffix(".toml").exists() and new["winner"]:  # a written recipe follows the new winner
        win = next(r for r in new["candidates"] if r["name"] == new["winner"])
        path.with_suffix(".toml").write_text(_recipe_toml(win["recipe"], win["name"]))
    return new


def _summarise(task, rows: list[dict], k: int, seed: int, data: str, samples, seconds: float, embed_s: float,
               has_official: bool) -> dict:
    primary = task.metrics[0]
    by_role = {r["role"]: r for r in rows if r["role"] in ("A", "B")}
    for r in rows:
        r["summary"] = {m: dict(zip(("mean", "sd"), _mean_sd([f["metrics"].get(m) for f in r["folds"].values()])))
                        for m in task.metrics}
        r["n_folds"] = len(r["folds"])
        r["fold_seconds"] = _mean_sd([f["seconds"] for f in r["folds"].values()])[0]
        for role, base in by_role.items():
            common = sorted(set(r["folds"]) & set(base["folds"]))
            diffs = [r["folds"][f]["metrics"][primary] - base["folds"][f]["metrics"][primary] for f in common
                     if r["folds"][f]["metrics"].get(primary) is not None
                     and base["folds"][f]["metrics"].get(primary) is not None]
            mean, sd = _mean_sd(diffs)
            r[f"vs_{role}"] = {"mean": mean, "sd": sd, "n": len(diffs)}
    winner, rule = _choose(rows, k, primary)
    cpu = _cpu_line()
    return {"task": task.name, "data": str(Path(data).resolve()), "n": len(samples), "k": k, "seed": seed,
            "primary": primary, "metrics": list(task.metrics[:2]), "seconds": round(seconds, 1),
            "embed_seconds": round(embed_s, 1), "cpu": cpu, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "official_split": has_official, "candidates": rows,
            "winner": winner, "rule": rule}


def _networks(r: dict) -> list[tuple[int, int]]:
    """``(input side, views)`` per network a candidate's recipe runs at prediction time. A probe row written
    before ``+flip`` recipes carried ``tta`` counts its mirrored views by its name."""
    from pellucid.core.views import VIEW_SETS  # a view set's views are its forward passes

    recipe = r["recipe"]
    old_flip = "flip" if r["kind"] == "probe" and r["name"].endswith("+flip") else "none"
    out = []
    for m in recipe.get("members") or [recipe]:
        side = m.get("image_size") or recipe.get("image_size") or 224
        out.append((int(side), len(VIEW_SETS.get(m.get("tta") or recipe.get("tta") or old_flip, ((0, False),)))))
    return out


def _passes(r: dict) -> int:
    """Forward passes per image at prediction time (a soft vote of three probes: 3; mirrored views: x2 each)."""
    return sum(views for _, views in _networks(r))


def _cost(r: dict) -> float:
    """Prediction cost per image in passes of a 224-px image: each forward pass weighs the pixels it
    sees, ``(side / 224) ** 2`` (a network's cost grows with the pixels), so a vote of three probes at
    320 px (about 6.1) is not cheaper than three probes at 224-260 px and a 224-px fine-tune (about 4.5)."""
    return round(sum((side / 224) ** 2 * views for side, views in _networks(r)), 2)


def _choose(rows: list[dict], k: int, primary: str) -> tuple[str | None, str]:
    """The one-standard-error rule: among candidates run on every fold that beat both baselines (a
    mean paired margin > 0 over A, and over B on the folds B ran; all candidates when none does),
    the best mean sets a bar one standard error (sd / sqrt(k)) below it; the winner is the cheapest candidate at or above the bar
    (least prediction cost, :func:`_cost`, then no ``probe_flip``, then the better mean). Differences inside one standard error
    are fold noise, and a cheaper model is the better default."""
    # mirrored test-time views of the probes (+flip) are a recipe too (probe_flip + tta = "flip"), at twice
    # their passes
    full = [r for r in rows if r["n_folds"] == k and r["summary"][primary]["mean"] is not None]
    if not full:
        return None, "no candidate ran on every fold"
    # a default has to beat both baselines: a mean paired margin > 0 over A and (where it ran) over B
    beats = [r for r in full if r.get("role") not in ("A", "B")
             and (r.get("vs_A") or {}).get("mean") is not None and r["vs_A"]["mean"] > 0
             and ((r.get("vs_B") or {}).get("n", 0) == 0 or r["vs_B"]["mean"] > 0)]
    full = beats or full
    best = max(full, key=lambda r: r["summary"][primary]["mean"])
    sd = best["summary"][primary]["sd"] or 0.0
    bar = best["summary"][primary]["mean"] - sd / math.sqrt(k)
    ok = [r for r in full if r["summary"][primary]["mean"] >= bar - 1e-12]
    # cheapest at prediction (forward passes weighted by their pixels), then at training (probe_flip
    # embeds the training images twice), then the better mean
    win = min(ok, key=lambda r: (_cost(r), "+flipfit" in r["name"], -r["summary"][primary]["mean"]))
    among = ("among candidates that beat both baselines (mean paired margin > 0)" if beats
             else "no candidate beat both baselines, so among all candidates")
    return win["name"], (f"{among}, the "
                         f"one-standard-error rule: best mean {primary} {best['summary'][primary]['mean']:.3f} "
                         f"({best['name']}), bar {bar:.3f}; the cheapest candidate at or above it "
                         f"({_passes(win)} forward pass(es) per image, cost {_cost(win):g} in 224-px passes)")


def run_cli(args) -> int:
    """``pellucid tune TASK [--data D] [--folds K] [--budget MIN] [--candidates a,b] [--out DIR]``."""
    from pellucid.core.tasks import get_task

    task = get_task(args.task)
    data = getattr(args, "data", None)
    if not data:
        import os

        root = Path(os.environ.get("PELLUCID_DATA", "../shared/data"))
        data = str(root / task.default_data if (root / task.default_data).is_dir() else root)

    def names(option: str) -> list[str]:  # a comma-separated list of candidate names
        return [c.strip() for c in (getattr(args, option, None) or "").split(",") if c.strip()]

    chosen = names("candidates") or None
    result = tune(task.name, data, folds=args.folds, budget_min=args.budget, candidates=chosen, out=args.out,
                  seed=args.seed, write_recipe=getattr(args, "write_recipe", False),
                  train_folds=getattr(args, "train_folds", None),
                  skip=names("skip"),
                  fine_tune_epochs=getattr(args, "fine_tune_epochs", None) or 6,
                  name=getattr(args, "name", None), resume=getattr(args, "resume", False),
                  jobs=max(1, getattr(args, "jobs", 1) or 1),
                  refit=names("refit"))
    print(render_table(result))
    print(f"written: {Path(args.out) / ('recipes-' + result['name'] + '.md')}")
    return 0
