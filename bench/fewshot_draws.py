"""Few-shot over many support draws: what ``pellucid fewshot fit`` would score on unseen images.

For tb_cxr (2-way), waste (6-way) and sonar (6-way) from ``../shared/data/<name>`` this draws, many
times with a seed, ``--shots`` random support images per class; the query set is every other image
that shares no ``group`` with the support. Each draw fits exactly what ``fewshot fit`` fits — the
package's own functions: :func:`~pellucid.core.fewshot.extract_features` (with its disk cache),
:meth:`~pellucid.core.fewshot.PrototypicalNetwork.set_support` and the leave-one-out logit scale of
:func:`~pellucid.core.fewshot.folder.fit_support` — and scores the queries in batches of
``--batch`` images (what ``pellucid predict`` passes the model at once; it matters only for the
transductive variants). The report gives, per data set and variant, the mean accuracy over draws,
its 95 % interval (1.96 · sd / √draws) and the sd over draws.

Variants (the levers of issue 17, point 3): the backbone (EfficientNet-Lite0 / Lite1 / Lite2, and the
concatenation of two), support augmentation (``support_flip``: mirrored support images as extra
support embeddings), test-time flip (``flip``) and transductive refinement of the prototypes on the
query batch (``transductive``: soft k-means steps). The levers are chosen on the *dev* draws (seed
0); the chosen setting and the old default are then scored again on fresh *confirm* draws (seed 1),
so the reported margin is not the maximum of many noisy comparisons.

``--study embedding`` measures instead the embedding chosen per support set (``auto_backbones``):
Lite0 alone, Lite0 + Lite2 and Lite0 + Lite1 + Lite2 concatenated (features as a model folder
computes them: the images at 260 px, resized inside the model for Lite0 and Lite1), and the rules
that pick one of them by leave-one-out NLL or accuracy on the support set
(:func:`~pellucid.core.fewshot.folder.select_embedding`); it writes
``bench/results/fewshot-embedding.md``.

``--study resolution`` measures the input side of the embedding: the current default's candidates
(Lite0 at 224 px; Lite0 + Lite2 from 260 px) against Lite0 and Lite0 + Lite2 with every backbone fed
the images at each of ``--sizes`` (:attr:`~pellucid.core.fewshot.ProtoConfig.resolution`), and rules
that let the support set choose the size too; it writes ``bench/results/fewshot-resolution.md``.

Every image goes through each backbone twice (as is and mirrored); the features are cached under
``runs/.cache/features`` so reruns skip the backbones. Run from the repository root::

    OMP_NUM_THREADS=1 PELLUCID_OFFLINE=1 .venv/bin/python -m bench.fewshot_draws
    OMP_NUM_THREADS=1 PELLUCID_OFFLINE=1 .venv/bin/python -m bench.fewshot_draws --study embedding
    OMP_NUM_THREADS=1 PELLUCID_OFFLINE=1 .venv/bin/python -m bench.fewshot_draws --study resolution
"""
from __future__ import annotations

import argparse
import datetime as _dt
import logging
import math
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

__all__ = ["main"]

log = logging.getLogger("pellucid.bench.fewshot_draws")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data"
DATASETS = ("tb_cxr", "waste", "sonar")
BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
TARGETS = {"tb_cxr": 0.90, "waste": 0.65, "sonar": 0.90}
OUT = ROOT / "bench" / "results" / "fewshot-draws.md"


# ----------------------------------------------------------------------------- data and features
def load_dataset(name: str, root: Path):
    """Samples of one data set, labels (class indices), groups and the class names.

    Classes that are one group each (sonar's ``fish`` and ``mine``: one recording) are cut into 10
    contiguous blocks in frame order, as in ``bench/bench_fewshot.py``; otherwise strict group
    separation would leave no query of those classes."""
    from pellucid.core.fewshot import split_single_group_classes
    from pellucid.datasets.samples import load_samples

    samples = load_samples(root / name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        samples = split_single_group_classes(samples, n_blocks=10)
    classes = sorted({s.label for s in samples})
    labels = np.array([classes.index(s.label) for s in samples])
    groups = np.array([str(s.group) for s in samples])
    return samples, labels, groups, classes


@dataclass
class Features:
    """Raw features of every image of a data set on one backbone: as is, and mirrored."""

    backbone: str
    plain: torch.Tensor
    mirrored: torch.Tensor
    dims: list[int]
    taps: tuple[str, ...]
    seconds: float


def backbone_features(samples, backbone: str, progress: bool, size: int | None = None,
                      mirror: bool = True) -> Features:
    """Features as ``fewshot fit`` computes them (its default embedding of ``backbone``), cached: the
    images decoded at ``size`` (default: the backbone's own) and fed to the backbone at that size;
    ``mirror``: also the mirrored images' (else ``mirrored`` is empty)."""
    from pellucid.core.backbones import create_backbone
    from pellucid.core.fewshot import PrototypicalNetwork, extract_features, improved_config

    t0 = time.time()
    bb, info = create_backbone(backbone, pretrained=True)
    config = improved_config(bb.spec, size)
    net = PrototypicalNetwork(bb, config)
    paths = [s.path for s in samples]
    plain = extract_features(net, paths, image_size=config.image_size, weight_info=info, progress=progress)
    mirrored = extract_features(net, paths, image_size=config.image_size, weight_info=info, progress=progress,
                                mirror=True) if mirror else torch.zeros(0)
    return Features(backbone, plain, mirrored, list(net.embedder.dims), tuple(config.layers),
                    round(time.time() - t0, 1))


def sized_features(samples, backbone: str, size: int, progress: bool) -> Features:
    """Plain features (no mirrored pass) of ``backbone`` fed the images at ``size`` (no resize inside)."""
    return backbone_features(samples, backbone, progress, size=size, mirror=False)


def resized_features(samples, size: int, progress: bool) -> dict[str, torch.Tensor]:
    """Lite0 and Lite1 features as a multi-backbone ``fewshot fit`` model computes them: images
    decoded at ``size`` (the largest input, Lite2's 260 px) and resized inside the model to each
    backbone's own input size. (Lite2 at 260 px needs no resize: its plain features serve as they
    are.) One pass through both backbones, cached like every other feature."""
    from pellucid.core.backbones import create_backbone
    from pellucid.core.fewshot import PrototypicalNetwork, extract_features, improved_config

    bb0, info = create_backbone("efficientnet_lite0", pretrained=True)
    bb1, _ = create_backbone("efficientnet_lite1", pretrained=True)
    taps0 = tuple(bb0.spec.tap_layers)
    cfg = replace(improved_config(bb0.spec), layer_weights=None, backbones=("efficientnet_lite1",),
                  layers=taps0 + tuple(f"efficientnet_lite1:{t}" for t in bb1.spec.tap_layers))
    net = PrototypicalNetwork(bb0, cfg, extras=[bb1])
    feats = extract_features(net, [s.path for s in samples], image_size=size, weight_info=info, progress=progress)
    d0 = sum(net.embedder.dims[:len(taps0)])
    return {"efficientnet_lite0": feats[:, :d0], "efficientnet_lite1": feats[:, d0:]}


def product_pair_features(samples, progress: bool) -> Features:
    """Lite0 + Lite2 exactly as the current ``fewshot fit`` default computes them (one pass, cached):
    the images at 260 px, resized inside the model to 224 px for Lite0."""
    from pellucid.core.backbones import create_backbone
    from pellucid.core.fewshot import PrototypicalNetwork, extract_features, improved_config
    from pellucid.core.fewshot.folder import embedding_config

    t0 = time.time()
    bb0, info = create_backbone("efficientnet_lite0", pretrained=True)
    bb2, _ = create_backbone("efficientnet_lite2", pretrained=True)
    cfg = embedding_config(improved_config(bb0.spec), bb0.spec, [bb2.spec])
    net = PrototypicalNetwork(bb0, cfg, extras=[bb2])
    feats = extract_features(net, [s.path for s in samples], image_size=cfg.image_size, weight_info=info,
                             progress=progress)
    return Features("efficientnet_lite0+efficientnet_lite2", feats, torch.zeros(0), list(net.embedder.dims),
                    tuple(cfg.layers), round(time.time() - t0, 1))


def concat_features(a: Features, b: Features) -> Features:
    return Features(f"{a.backbone}+{b.backbone}", torch.cat([a.plain, b.plain], 1),
                    torch.cat([a.mirrored, b.mirrored], 1) if a.mirrored.numel() else torch.zeros(0), a.dims + b.dims,
                    a.taps + tuple(f"{b.backbone}:{t}" for t in b.taps), 0.0)


# ----------------------------------------------------------------------------- draws
def support_draws(labels: np.ndarray, groups: np.ndarray, shots: int, n_draws: int, seed: int):
    """``n_draws`` (support indices, query indices): ``shots`` random images per class in the
    support, and as queries every image whose group is not in the support."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_draws):
        support = np.concatenate([rng.choice(np.flatnonzero(labels == c), shots, replace=False)
                                  for c in range(int(labels.max()) + 1)])
        query = np.flatnonzero(~np.isin(groups, groups[support]))
        out.append((support, rng.permutation(query)))
    return out


@dataclass(frozen=True)
class Variant:
    """One setting of the levers."""

    name: str
    backbone: str  # a backbone name or "a+b"
    support_flip: bool = False
    flip: bool = False
    transductive: int = 0
    auto_weights: bool = False


def _network(feats: Features, variant: Variant):
    """A :class:`PrototypicalNetwork` configured like ``fewshot fit`` for ``variant`` (the first
    backbone's module; with two backbones the layer list names both, features come from the cache)."""
    from pellucid.core.backbones import create_backbone
    from pellucid.core.fewshot import PrototypicalNetwork, improved_config

    first = variant.backbone.split("+")[0]
    bb, _ = create_backbone(first, pretrained=False)
    net = PrototypicalNetwork(bb, improved_config(bb.spec))
    blocks = len(feats.dims) // 3
    weights = tuple(([0.5, 0.5, 1.0]) * blocks)
    net.config = replace(net.config, layers=feats.taps, layer_weights=weights, flip=variant.flip,
                         support_flip=variant.support_flip, transductive=variant.transductive,
                         auto_weights=variant.auto_weights)
    net.embedder.dims = list(feats.dims)
    net.initial_weights = weights
    return net


def score_draw(net, feats: Features, labels: np.ndarray, support: np.ndarray, query: np.ndarray,
               batch: int, views: torch.Tensor | None = None) -> float:
    """Fit on the support (as ``fewshot fit``) and return the accuracy on the queries.

    ``views``: ``(k, N, D)`` raw features of ``k`` augmented views (crops) of every image; the
    support images' views become extra support embeddings (passed as ``mirrored``)."""
    from pellucid.core.fewshot.folder import fit_support

    cfg = net.config
    if cfg.flip:  # test-time flip: the embedder averages the pooled features of image and mirror
        raw = (feats.plain + feats.mirrored) / 2
    else:
        raw = feats.plain
    mirrored = feats.mirrored[support] if cfg.support_flip and not cfg.flip else None
    if views is not None:
        mirrored = views[:, support].reshape(-1, views.shape[-1])
    y = torch.from_numpy(labels)
    net.config = replace(cfg, scale=1.0, layer_weights=net.initial_weights)
    net.log_scale.fill_(0.0)
    net.last_fit = fit_support(net, raw[support], y[support], int(labels.max()) + 1, mirrored=mirrored)
    correct = 0
    with torch.no_grad():
        for s in range(0, len(query), batch):
            q = query[s:s + batch]
            correct += int((net.logits(net.transform(raw[q])).argmax(1) == y[q]).sum())
    return correct / len(query)


def run_variant(feats: Features, variant: Variant, labels, draws, batch: int) -> dict:
    net = _network(feats, variant)
    accs = np.array([score_draw(net, feats, labels, s, q, batch) for s, q in draws])
    sd = float(accs.std(ddof=1)) if len(accs) > 1 else 0.0
    return {"variant": variant, "accs": accs, "mean": float(accs.mean()), "ci95": 1.96 * sd / math.sqrt(len(accs)), "sd": sd,
            "draws": len(accs), "queries": float(np.mean([len(q) for _, q in draws]))}


# ----------------------------------------------------------------------------- embedding study
#: The candidate embeddings of ``auto_backbones`` (Lite0 first: the fallback), as feature keys.
EMBEDDINGS = ("efficientnet_lite0", "efficientnet_lite0+efficientnet_lite2",
              "efficientnet_lite0+efficientnet_lite1+efficientnet_lite2")
#: Selection rules measured: (label, candidate embeddings, criterion).
RULES = tuple((f"auto {{{', '.join(e.replace('efficientnet_', '') for e in cands)}}} by LOO {crit}", cands, crit)
              for cands in (EMBEDDINGS[:2], EMBEDDINGS) for crit in ("nll", "accuracy"))


def product_features(feats: dict, name: str, resized: dict[str, torch.Tensor]) -> None:
    """Add the multi-backbone embeddings of :data:`EMBEDDINGS` for data set ``name`` to ``feats``,
    as a ``fewshot fit`` model folder computes them: Lite0/Lite1 from the 260-px input resized
    inside the model (``resized``), Lite2 at its own 260 px (its plain features)."""
    l2 = feats[(name, "efficientnet_lite2")]
    for key in EMBEDDINGS[1:]:
        parts = key.split("+")
        blocks = [resized[b] for b in parts[:-1]] + [l2.plain]
        dims, taps = [], []
        for b in parts:
            f = feats[(name, b)]
            dims += f.dims
            taps += [t if b == parts[0] else f"{b}:{t}" for t in f.taps]
        feats[(name, key)] = Features(key, torch.cat(blocks, 1), torch.zeros(0), dims, tuple(taps), 0.0)


def embedding_study(feats: dict, data: dict, args, seed: int) -> dict:
    """Every candidate embedding of :data:`EMBEDDINGS` with ``auto_weights`` on the same draws, then
    every rule of :data:`RULES` (:func:`choice_study`)."""
    return choice_study(feats, data, EMBEDDINGS, RULES, args, seed, lambda k: _short(k) + " +auto_weights")


def choice_study(feats: dict, data: dict, keys, rules, args, seed: int, label_of) -> dict:
    """Every candidate embedding (feature key of ``keys``, labelled ``label_of(key)``) with
    ``auto_weights`` on the same draws, then every rule ``(label, candidate keys, criterion)``
    applied per draw to the candidates' leave-one-out fits on the support set
    (:func:`~pellucid.core.fewshot.folder.select_embedding`, what ``fewshot fit`` calls).

    Returns ``{(data set, label): result}`` with, for rules, ``picked``: how often each candidate won."""
    from pellucid.core.fewshot.folder import select_embedding

    results = {}
    for name, (labels, groups, _) in data.items():
        draws = support_draws(labels, groups, args.shots, args.draws, seed)
        per = {}
        for key in keys:
            t0 = time.time()
            v = Variant(label_of(key), "efficientnet_lite0" if "@" in key else key, auto_weights=True)
            net = _network(feats[(name, key)], v)
            accs, fits = [], []
            for s_idx, q_idx in draws:
                accs.append(score_draw(net, feats[(name, key)], labels, s_idx, q_idx, args.batch))
                fits.append(net.last_fit)
            per[key] = (np.array(accs), fits)
            results[(name, v.name)] = _summary(np.array(accs), draws)
            log.warning("seed %d %s %-42s %.3f ± %.3f %.1f s", seed, name, v.name, results[(name, v.name)]["mean"],
                        results[(name, v.name)]["ci95"], time.time() - t0)
        for label, cands, crit in rules:
            accs, picked = [], {k: 0 for k in cands}
            for i in range(len(draws)):
                key = select_embedding({k: per[k][1][i] for k in cands}, crit) or cands[0]
                picked[key] += 1
                accs.append(per[key][0][i])
            results[(name, label)] = {**_summary(np.array(accs), draws), "picked": picked}
            log.warning("seed %d %s %-42s %.3f ± %.3f picked %s", seed, name, label, results[(name, label)]["mean"],
                        results[(name, label)]["ci95"], picked)
    return results


def _short(key: str) -> str:
    return "+".join(b.replace("efficientnet_", "") for b in key.split("+"))


def _summary(accs: np.ndarray, draws) -> dict:
    sd = float(accs.std(ddof=1)) if len(accs) > 1 else 0.0
    return {"accs": accs, "mean": float(accs.mean()), "ci95": 1.96 * sd / math.sqrt(len(accs)), "sd": sd,
            "draws": len(accs), "queries": float(np.mean([len(q) for _, q in draws]))}


def _paired(a: dict, b: dict) -> str:
    diff = a["accs"] - b["accs"]
    ci = 1.96 * float(diff.std(ddof=1)) / math.sqrt(len(diff)) if len(diff) > 1 else 0.0
    return f"{diff.mean():+.3f} ± {ci:.3f}"


def _choice_table(res: dict, rows, base: str, base_name: str, ds, short) -> list[str]:
    """Markdown rows: each setting's accuracy per data set, the mean, and the paired difference from
    ``base``; a rule's row says how often each candidate (named by ``short``) was picked."""
    out = ["| setting | " + " | ".join(ds) + f" | mean | paired vs {base_name} (" + ", ".join(ds) + ") |",
           "|---|" + "---:|" * (len(ds) + 2)]
    for r in rows:
        picked = ""
        if len(res[(ds[0], r)].get("picked", {})) > 1:
            picked = "<br>picked: " + "; ".join(
                f"{d} " + ", ".join(f"{short(k)} {n}" for k, n in res[(d, r)]["picked"].items()) for d in ds)
        out.append(f"| {r}{picked} | " + " | ".join(_fmt(res[(d, r)]) for d in ds)
                   + f" | {np.mean([res[(d, r)]['mean'] for d in ds]):.3f} | "
                   + ("" if r == base else ", ".join(_paired(res[(d, r)], res[(d, base)]) for d in ds)) + " |")
    return out


def render_embedding(dev: dict, confirm: dict, chosen: str, args, command: str) -> str:
    """bench/results/fewshot-embedding.md: the embedding chosen per support set by leave-one-out."""
    from pellucid.core.quantize import cpu_features

    ds = list(args.datasets)
    base = "lite0 +auto_weights"
    labels = [f"{_short(k)} +auto_weights" for k in EMBEDDINGS] + [r[0] for r in RULES]

    lines = ["# Few-shot: the embedding chosen per support set by leave-one-out (`fewshot fit`, 5-shot)", "",
             f"Generated {_dt.datetime.now():%Y-%m-%d %H:%M} by `{command}` (torch {torch.__version__}, "
             f"{torch.get_num_threads()} thread(s)).", "", f"CPU: {cpu_features().summary()}", "",
             "Draws and queries as in `bench/results/fewshot-draws.md` (same seeds: dev 0, confirm 1). Every "
             "setting uses `auto_weights`, no flips, no transduction. Multi-backbone features are what a model "
             "folder computes: the images at 260 px, resized inside the model to 224 px for Lite0 and 240 px for "
             "Lite1. An *auto* rule fits every candidate on the support set (layer weights and logit scale by "
             "leave-one-out) and keeps the one with the lowest leave-one-out NLL, or the highest leave-one-out "
             "accuracy (ties: NLL) — the support set only, never the queries. Mean accuracy over draws ± 95 % "
             "interval (sd over draws); paired: accuracy minus Lite0's on the same draws, ± 95 % interval.", "",
             f"## Dev draws (seed 0, {args.draws} per data set)", ""]
    lines += _choice_table(dev, labels, base, "lite0", ds, _short)
    lines += ["", f"Rule chosen on the dev draws (as for the levers: the one needing the fewest backbones among the "
              f"rules within {args.tolerance} of the best mean over the data sets; ties: the higher mean): "
              f"**{chosen}**. Mean over the data sets, dev: "
              + ", ".join(f"{r[0]} {np.mean([dev[(d, r[0])]['mean'] for d in ds]):.4f}" for r in RULES) + ".", "",
              f"## Confirm draws (seed 1, {args.draws} fresh draws per data set)", ""]
    lines += _choice_table(confirm, [r for r in labels if (ds[0], r) in confirm], base, "lite0", ds, _short)
    lines += ["| target | " + " | ".join(f"{TARGETS.get(d, float('nan')):.2f}" for d in ds) + " | | |"]
    return "\n".join(lines) + "\n"


def variants(backbones, concat: str | None, steps=(0, 2)) -> list[Variant]:
    """The grid: each backbone (and the concatenation) × {nothing, support_flip, flip} × {fixed,
    auto layer weights} (single backbones) × transductive steps."""
    out = []
    for bb in list(backbones) + ([concat] if concat else []):
        short = "+".join(b.replace("efficientnet_", "") for b in bb.split("+"))
        for auto in ((False, True) if "+" not in bb else (False,)):
            for aug in ("", "support_flip", "flip"):
                for t in steps:
                    name = (short + (" +auto_weights" if auto else "") + (f" +{aug}" if aug else "")
                            + (f" +transductive {t}" if t else ""))
                    out.append(Variant(name, bb, support_flip=aug == "support_flip", flip=aug == "flip",
                                       transductive=t, auto_weights=auto))
    return out


def _extract_all(args) -> tuple[dict, dict]:
    """Features of every data set on every backbone (cached on disk), and the data sets."""
    feats, data = {}, {}
    for name in args.datasets:
        samples, labels, groups, classes = load_dataset(name, Path(args.data))
        data[name] = (labels, groups, classes)
        for bb in args.backbones:
            t0 = time.time()
            feats[(name, bb)] = backbone_features(samples, bb, progress=not args.quiet)
            log.warning("%s %s: %d images, features %s in %.0f s", name, bb, len(samples),
                        tuple(feats[(name, bb)].plain.shape), time.time() - t0)
        if args.concat:
            a, b = args.concat.split("+")
            feats[(name, args.concat)] = concat_features(feats[(name, a)], feats[(name, b)])
    return feats, data


def _grid(feats, data, grid, args, seed: int) -> dict:
    """{(dataset, variant name): result} over ``args.draws`` draws of ``seed`` (same draws for every variant)."""
    results = {}
    for name, (labels, groups, _) in data.items():
        draws = support_draws(labels, groups, args.shots, args.draws, seed)
        for v in grid:
            t0 = time.time()
            r = run_variant(feats[(name, v.backbone)], v, labels, draws, args.batch)
            results[(name, v.name)] = r
            log.warning("seed %d %s %-42s %.3f ± %.3f (sd %.3f) %.1f s", seed, name, v.name, r["mean"], r["ci95"],
                        r["sd"], time.time() - t0)
    return results


def _fmt(r: dict) -> str:
    return f"{r['mean']:.3f} ± {r['ci95']:.3f} (sd {r['sd']:.3f})"


def _overall(results: dict, datasets, name: str) -> float:
    return float(np.mean([results[(d, name)]["mean"] for d in datasets]))


def _cost(v: Variant) -> float:
    """Price of a variant at prediction time (backbone size first), to break near-ties cheaply."""
    order = {"efficientnet_lite0": 1, "efficientnet_lite1": 2, "efficientnet_lite2": 3}
    bb = sum(order.get(b, 4) for b in v.backbone.split("+")) + (1 if "+" in v.backbone else 0)
    return 10 * bb + 2 * v.flip + 1 * v.support_flip + 0.5 * v.auto_weights + 1 * bool(v.transductive)


def choose(results: dict, datasets, grid, tolerance: float, transductive: bool = False,
           shippable: bool = True) -> Variant:
    """The cheapest variant whose mean accuracy over the data sets (dev draws) is within
    ``tolerance`` of the best one's: a lever is kept only when it earns more than that.
    ``transductive``: choose among transductive variants only (they are never a default);
    ``shippable``: only one backbone (a prototypes model folder holds one)."""
    pool = [v for v in grid if bool(v.transductive) == transductive and (not shippable or "+" not in v.backbone)]
    best = max(_overall(results, datasets, v.name) for v in pool)
    return min((v for v in pool if _overall(results, datasets, v.name) >= best - tolerance),
               key=lambda v: (_cost(v), -_overall(results, datasets, v.name)))


def lever_table(results: dict, datasets, grid, chosen: Variant) -> list[str]:
    """Paired effect of each lever (same draws): the chosen variant with the lever toggled, or the
    backbone swapped, minus the chosen variant; mean difference ± 95 % interval over draws."""
    by_name = {v.name: v for v in grid}
    rows = []
    for field in ("auto_weights", "support_flip", "flip", "transductive"):
        value = (2 if not chosen.transductive else 0) if field == "transductive" else not getattr(chosen, field)
        other = replace(chosen, name="", **{field: value})
        if field == "support_flip" and value:
            other = replace(other, flip=False)
        if field == "flip" and value:
            other = replace(other, support_flip=False)
        rows.append((f"{field} {'on' if value else 'off'}", other))
    for bb in sorted({v.backbone for v in grid} - {chosen.backbone}):
        rows.append((f"backbone {bb.replace('efficientnet_', '')}",
                     replace(chosen, name="", backbone=bb, auto_weights=chosen.auto_weights and "+" not in bb)))
    lines = ["| change to the chosen variant | " + " | ".join(datasets) + " |", "|---|" + "---:|" * len(datasets)]
    for label, other in rows:
        match = [v for v in by_name.values() if replace(v, name="") == other]
        if not match:
            continue
        cells = []
        for d in datasets:
            diff = results[(d, match[0].name)]["accs"] - results[(d, chosen.name)]["accs"]
            ci = 1.96 * float(diff.std(ddof=1)) / math.sqrt(len(diff)) if len(diff) > 1 else 0.0
            cells.append(f"{diff.mean():+.3f} ± {ci:.3f}")
        lines.append(f"| {label} ({match[0].name}) | " + " | ".join(cells) + " |")
    return lines


def render(dev: dict, confirm: dict, grid, chosen: dict, args, command: str, timing: dict) -> str:
    from pellucid.core.quantize import cpu_features

    ds = list(args.datasets)
    lines = ["# Few-shot over many support draws (`fewshot fit`, 5-shot)", "",
             f"Generated {_dt.datetime.now():%Y-%m-%d %H:%M} by `{command}` (torch {torch.__version__}, "
             f"{torch.get_num_threads()} thread(s)).", "", f"CPU: {cpu_features().summary()}", "",
             f"Each draw: {args.shots} random support images per class; queries = every other image sharing no "
             f"`group` with the support (sonar's one-recording classes fish and mine cut into 10 frame-order "
             f"blocks, so their support and queries come from different stretches of the recording). Each draw "
             f"fits what `pellucid fewshot fit` fits (features, prototypes, leave-one-out logit scale) and scores "
             f"the queries in batches of {args.batch}. Mean accuracy over draws ± 95 % interval "
             f"(1.96 · sd / √draws), and the sd over draws. Same draws for every variant of a data set. "
             f"Chosen default: among single-backbone, non-transductive variants (a model folder holds one "
             f"backbone; transduction is opt-in), the cheapest within {args.tolerance} of the best mean over the "
             f"data sets on the dev draws.", ""]
    lines += [f"## Dev draws (seed 0, {args.draws} draws per data set): every variant", "",
              "| variant | " + " | ".join(ds) + " | mean |", "|---|" + "---:|" * (len(ds) + 1)]
    for v in grid:
        lines.append(f"| {v.name} | " + " | ".join(_fmt(dev[(d, v.name)]) for d in ds)
                     + f" | {_overall(dev, ds, v.name):.3f} |")
    lines += ["", "Queries per draw (mean): " + ", ".join(
        f"{d} {dev[(d, grid[0].name)]['queries']:.0f}" for d in ds), ""]
    base = chosen["new default (chosen)"]
    lines += [f"## Levers: paired differences against the chosen setting ({base.name}), dev draws", "",
              "Accuracy of the variant with one lever changed minus the chosen variant's, on the same draws "
              "(mean ± 95 % interval over draws; positive = the change helps).", ""]
    lines += lever_table(dev, ds, grid, base) + [""]
    lines += [f"## Confirm draws (seed 1, {args.draws} fresh draws per data set)", "",
              "| setting | variant | " + " | ".join(ds) + " |", "|---|---|" + "---:|" * len(ds)]
    for label, v in chosen.items():
        lines.append(f"| {label} | {v.name} | " + " | ".join(_fmt(confirm[(d, v.name)]) for d in ds) + " |")
    lines.append("| target | | " + " | ".join(f"{TARGETS.get(d, float('nan')):.2f}" for d in ds) + " |")
    if all(timing[(d, b)] < 5 for d in ds for b in args.backbones):
        lines += ["", "Features came from the disk cache (`runs/.cache/features`); the backbones did not run."]
    else:
        lines += ["", "## Feature extraction (both passes: as is and mirrored; shared CPU, 1 thread)", "",
                  "| data | " + " | ".join(args.backbones) + " |", "|---|" + "---:|" * len(args.backbones)]
        for d in ds:
            lines.append(f"| {d} | " + " | ".join(f"{timing[(d, b)]:.0f} s" for b in args.backbones) + " |")
    return "\n".join(lines) + "\n"


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--datasets", nargs="+", default=list(DATASETS))
    p.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    p.add_argument("--concat", default="efficientnet_lite0+efficientnet_lite2",
                   help="two backbones whose features are concatenated as one more variant ('' for none)")
    p.add_argument("--steps", default="0,2", help="transductive steps to try")
    p.add_argument("--tolerance", type=float, default=0.003,
                   help="a lever is kept only when it raises the mean dev accuracy by more than this")
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--draws", type=int, default=50)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--extract-only", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--sizes", nargs="+", type=int, default=[192, 224, 320],
                   help="--study resolution: input sides measured against the backbones' own")
    p.add_argument("--study", choices=("levers", "embedding", "resolution", "crops"), default="levers",
                   help="levers: the grid of bench/results/fewshot-draws.md; embedding: the embedding chosen per "
                        "support set by leave-one-out (bench/results/fewshot-embedding.md)")
    return p.parse_args(argv)


#: ``--study resolution``: the current default rule (Lite0 at 224 px or Lite0 + Lite2 from 260 px).
RES_BASE = "auto {lite0@224, lite0+lite2@260} (current default)"


def resolution_rules(sizes) -> list[tuple[str, tuple[str, ...], str]]:
    """The rules of ``--study resolution`` (all by leave-one-out NLL on the support set): the current
    default; per size S the same two embeddings at S; and the size chosen too (all four)."""
    base = ("lite0@224", "lite0+lite2@260")
    rules = [(RES_BASE, base, "nll")]
    for size in sizes:
        at = (f"lite0@{size}", f"lite0+lite2@{size}")
        both = tuple(dict.fromkeys(base + at))
        rules += [(f"auto {{{', '.join(at)}}}", at, "nll"), (f"auto {{{', '.join(both)}}}", both, "nll")]
    if len(sizes) > 1:
        every = tuple(dict.fromkeys(base + tuple(f"{b}@{size}" for size in sizes for b in ("lite0", "lite0+lite2"))))
        rules.append(("auto {every candidate}", every, "nll"))
    return rules


def render_resolution(dev: dict, confirm: dict, rules, keys, chosen: str, args, command: str, timing: dict) -> str:
    """bench/results/fewshot-resolution.md: the embedding's input size."""
    from pellucid.core.quantize import cpu_features

    ds = list(args.datasets)
    rows = [f"{k} +auto_weights" for k in keys] + [r[0] for r in rules]

    mean = {r[0]: float(np.mean([dev[(d, r[0])]["mean"] for d in ds])) for r in rules}
    lines = ["# Few-shot: the input size of the embedding (`fewshot fit`, 5-shot)", "",
             f"Generated {_dt.datetime.now():%Y-%m-%d %H:%M} by `{command}` (torch {torch.__version__}, "
             f"{torch.get_num_threads()} thread(s)).", "", f"CPU: {cpu_features().summary()}", "",
             "Draws and queries as in `bench/results/fewshot-draws.md` (same seeds: dev 0, confirm 1). Every "
             "setting uses `auto_weights`, no flips, no transduction. `lite0@224` and `lite0+lite2@260` are the "
             "current default's two candidates exactly as a model folder computes them (Lite0 at its own 224 px; "
             "Lite0 + Lite2 from 260-px images, resized inside the model to 224 px for Lite0). `lite0@S` and "
             "`lite0+lite2@S`: every backbone fed the images decoded at S px (no resize inside the model). An "
             "*auto* rule fits every candidate on the support set (layer weights and logit scale by leave-one-out) "
             "and keeps the one with the lowest leave-one-out NLL — the support set only, never the queries. Mean "
             "accuracy over draws ± 95 % interval (sd over draws); paired: accuracy minus the current default's on "
             "the same draws, ± 95 % interval.", "",
             f"## Dev draws (seed 0, {args.draws} per data set)", ""]
    lines += _choice_table(dev, rows, RES_BASE, "current default", ds, str)
    lines += ["", f"Rule chosen on the dev draws (the best mean over the data sets; it replaces the current "
              f"default only when it beats it by more than {args.tolerance}; ties within {args.tolerance} of the "
              f"best: fewer candidates): **{chosen}**. Mean over the data sets, dev: "
              + ", ".join(f"{r} {m:.4f}" for r, m in mean.items()) + ".", "",
              f"## Confirm draws (seed 1, {args.draws} fresh draws per data set)", ""]
    lines += _choice_table(confirm, rows, RES_BASE, "current default", ds, str)
    lines += ["| target | " + " | ".join(f"{TARGETS.get(d, float('nan')):.2f}" for d in ds) + " | | |"]
    if all(t < 5 for d in ds for t in timing[d].values()):
        lines += ["", "Features came from the disk cache (`runs/.cache/features`); the backbones did not run."]
    else:
        lines += ["", "## Feature extraction (one pass over every image of the data set; shared CPU, 1 thread; "
                  "0 s: from the disk cache)", "", "| data | " + " | ".join(timing[ds[0]]) + " |",
                  "|---|" + "---:|" * len(timing[ds[0]])]
        for d in ds:
            lines.append(f"| {d} | " + " | ".join(f"{t:.0f} s" for t in timing[d].values()) + " |")
    return "\n".join(lines) + "\n"


def main_resolution(args, argv) -> int:
    """``--study resolution``: the embeddings at other input sizes, and rules choosing among them."""
    feats, data = _resolution_features(args)
    if args.extract_only:
        return 0
    keys = list(dict.fromkeys(["lite0@224", "lite0+lite2@260"]
                              + [f"{b}@{s}" for s in args.sizes for b in ("lite0", "lite0+lite2")]))
    rules = resolution_rules(args.sizes)
    label = lambda k: f"{k} +auto_weights"  # noqa: E731
    dev = choice_study(feats, data, keys, rules, args, 0, label)
    mean = {r[0]: float(np.mean([dev[(d, r[0])]["mean"] for d in args.datasets])) for r in rules}
    best = max(mean.values())
    chosen = min((r for r in rules if mean[r[0]] >= best - args.tolerance), key=lambda r: (len(r[1]), -mean[r[0]]))[0]
    if mean[chosen] <= mean[RES_BASE] + args.tolerance:
        chosen = RES_BASE
    confirm = choice_study(feats, data, keys, rules, args, 1, label)
    command = "OMP_NUM_THREADS=1 PELLUCID_OFFLINE=1 .venv/bin/python -m bench.fewshot_draws " + " ".join(
        argv if argv is not None else sys.argv[1:])
    extracted = list(dict.fromkeys(["lite0@224", "lite0+lite2@260"]
                                   + [f"{b}@{s}" for s in args.sizes for b in ("lite0", "lite2")]))
    timing = {d: {k: feats[(d, k)].seconds for k in extracted} for d in args.datasets}
    text = render_resolution(dev, confirm, rules, keys, chosen, args, command.strip(), timing)
    out = Path(args.out) if args.out != str(OUT) else OUT.with_name("fewshot-resolution.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return 0


def main_embedding(args, argv) -> int:
    """``--study embedding``: the candidate embeddings and the auto rules, dev then confirm draws."""
    args.backbones = list(BACKBONES)
    args.concat = ""
    feats, data = _extract_all(args)
    for name in args.datasets:
        samples = load_dataset(name, Path(args.data))[0]
        product_features(feats, name, resized_features(samples, 260, progress=not args.quiet))
    if args.extract_only:
        return 0
    dev = embedding_study(feats, data, args, seed=0)
    # as for the levers: the cheapest rule (fewest candidate backbones) within --tolerance of the best mean
    mean = {r[0]: float(np.mean([dev[(d, r[0])]["mean"] for d in args.datasets])) for r in RULES}
    best = max(mean.values())
    chosen = min((r for r in RULES if mean[r[0]] >= best - args.tolerance),
                 key=lambda r: (len({b for c in r[1] for b in c.split("+")}), -mean[r[0]]))[0]
    confirm = embedding_study(feats, data, args, seed=1)
    command = "OMP_NUM_THREADS=1 PELLUCID_OFFLINE=1 .venv/bin/python -m bench.fewshot_draws " + " ".join(
        argv if argv is not None else sys.argv[1:])
    text = render_embedding(dev, confirm, chosen, args, command.strip())
    out = Path(args.out) if args.out != str(OUT) else OUT.with_name("fewshot-embedding.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return 0


def _resolution_features(args) -> tuple[dict, dict]:
    """``--study resolution``: per data set the current default's two candidates (Lite0 at 224 px;
    Lite0 + Lite2 from 260 px) and, for each of ``--sizes``, Lite0 and Lite0 + Lite2 with every
    backbone fed the images at that size. Keys ``(data set, "lite0@224")`` etc.; cached on disk."""
    feats, data = {}, {}
    for name in args.datasets:
        samples, labels, groups, classes = load_dataset(name, Path(args.data))
        data[name] = (labels, groups, classes)
        steps = [("lite0@224", lambda: sized_features(samples, "efficientnet_lite0", 224, not args.quiet)),
                 ("lite0+lite2@260", lambda: product_pair_features(samples, not args.quiet))]
        for size in args.sizes:
            steps += [(f"lite0@{size}", lambda size=size: sized_features(samples, "efficientnet_lite0", size,
                                                                        not args.quiet)),
                      (f"lite2@{size}", lambda size=size: sized_features(samples, "efficientnet_lite2", size,
                                                                        not args.quiet))]
        for key, make in dict(steps).items():  # lite0@224 once when 224 is among the sizes
            t0 = time.time()
            feats[(name, key)] = make()
            log.warning("%s %s: %d images, features %s in %.0f s", name, key, len(samples),
                        tuple(feats[(name, key)].plain.shape), time.time() - t0)
        for size in args.sizes:
            feats[(name, f"lite0+lite2@{size}")] = concat_features(feats[(name, f"lite0@{size}")],
                                                                   feats[(name, f"lite2@{size}")])
    return feats, data


# ----------------------------------------------------------------------------- crops study
#: ``--study crops``: support crops (name, side fraction, horizontal and vertical position of the
#: crop in the free space, 0 = left/top) whose Lite0 features become extra support embeddings.
CROPS = (("centre 0.8", 0.8, 0.5, 0.5), ("top-left 0.8", 0.8, 0.0, 0.0), ("bottom-right 0.8", 0.8, 1.0, 1.0))


class _Crop:
    """``Image -> Image``: the crop ``(zoom, fx, fy)`` of the full-resolution image, before resizing."""

    def __init__(self, zoom: float, fx: float, fy: float):
        self.zoom, self.fx, self.fy = zoom, fx, fy

    def __call__(self, image):
        from pellucid.datasets.readers.image import Image

        h, w = image.array.shape[:2]
        ch, cw = max(1, round(h * self.zoom)), max(1, round(w * self.zoom))
        y0, x0 = round((h - ch) * self.fy), round((w - cw) * self.fx)
        return Image(image.array[y0:y0 + ch, x0:x0 + cw], image.meta)


def crop_features(samples, crop: tuple, progress: bool) -> torch.Tensor:
    """Lite0 features (224 px, its default embedding) of one crop of every image, disk-cached under
    a key of its own (the package's feature cache)."""
    from pellucid.core.backbones import create_backbone
    from pellucid.core.fewshot import DEFAULT_CACHE_DIR, PrototypicalNetwork, improved_config
    from pellucid.core.fewshot.features import _cache_key, _cached, _weights_fingerprint
    from pellucid.datasets.torchdata import ImageCache, to_tensor

    bb, info = create_backbone("efficientnet_lite0", pretrained=True)
    config = improved_config(bb.spec)
    embedder = PrototypicalNetwork(bb, config).embedder.eval()
    paths = [str(s.path) for s in samples]
    desc = {"backbone": bb.spec.name, "size": config.image_size, "layers": list(config.layers), "flip": False,
            "mean": list(bb.spec.mean), "std": list(bb.spec.std), "crop": list(crop[1:])}

    def compute():
        cache = ImageCache(paths, config.image_size, workers=2, progress=progress, preprocess=_Crop(*crop[1:]))
        if cache.failures:
            raise RuntimeError(f"{len(cache.failures)} unreadable image(s), first {cache.failures[0]}")
        with torch.no_grad():
            out = [embedder(torch.stack([to_tensor(a) for a in cache.arrays[b:b + 32]]))
                   for b in range(0, len(cache.arrays), 32)]
        return {"features": torch.cat(out).float()}

    key = _cache_key("pooled", desc, info, paths, _weights_fingerprint(bb))
    return _cached(key, DEFAULT_CACHE_DIR, compute, {**desc, "n": len(paths)})["features"]


def main_crops(args, argv) -> int:
    """``--study crops``: Lite0 (224 px, ``auto_weights``) with and without crops of the support
    images as extra support embeddings, dev then confirm draws; bench/results/fewshot-crops.md."""
    from pellucid.core.quantize import cpu_features

    ds = list(args.datasets)
    feats, data, views = {}, {}, {}
    for name in ds:
        samples, labels, groups, classes = load_dataset(name, Path(args.data))
        data[name] = (labels, groups)
        feats[name] = sized_features(samples, "efficientnet_lite0", 224, not args.quiet)
        for crop in CROPS:
            t0 = time.time()
            views[(name, crop[0])] = crop_features(samples, crop, not args.quiet)
            log.warning("%s crop %s: %.0f s", name, crop[0], time.time() - t0)
    if args.extract_only:
        return 0
    settings = [("lite0@224 +auto_weights", ()), (f"+ {CROPS[0][0]} crop", CROPS[:1]),
                (f"+ {len(CROPS)} crops ({', '.join(c[0] for c in CROPS)})", CROPS)]
    res: dict = {0: {}, 1: {}}
    for seed in (0, 1):
        for name in ds:
            labels, groups = data[name]
            draws = support_draws(labels, groups, args.shots, args.draws, seed)
            for label, crops in settings:
                net = _network(feats[name], Variant(label, "efficientnet_lite0", auto_weights=True))
                v = torch.stack([views[(name, c[0])] for c in crops]) if crops else None
                accs = np.array([score_draw(net, feats[name], labels, s, q, args.batch, views=v) for s, q in draws])
                res[seed][(name, label)] = _summary(accs, draws)
                log.warning("seed %d %s %-40s %.3f", seed, name, label, res[seed][(name, label)]["mean"])
    command = "OMP_NUM_THREADS=1 PELLUCID_OFFLINE=1 .venv/bin/python -m bench.fewshot_draws " + " ".join(
        argv if argv is not None else sys.argv[1:])
    lines = ["# Few-shot: crops of the support images as extra support embeddings (`fewshot fit`, 5-shot)", "",
             f"Generated {_dt.datetime.now():%Y-%m-%d %H:%M} by `{command.strip()}` (torch {torch.__version__}, "
             f"{torch.get_num_threads()} thread(s)).", "", f"CPU: {cpu_features().summary()}", "",
             "Draws and queries as in `bench/results/fewshot-draws.md` (same seeds). Lite0 at 224 px with "
             "`auto_weights`; a crop takes the given fraction of each side of the full-resolution image at the "
             "given place, resized to 224 px; the crops' embeddings join their class's support (leave-one-out "
             "leaves an image out with all its crops). Queries are never cropped. Mean accuracy over draws ± 95 % "
             "interval (sd over draws); paired: minus Lite0 without crops on the same draws.", ""]
    for seed, title in ((0, "Dev draws (seed 0"), (1, "Confirm draws (seed 1")):
        lines += [f"## {title}, {args.draws} per data set)", ""]
        lines += _choice_table(res[seed], [x[0] for x in settings], settings[0][0], "no crops", ds, str) + [""]
    text = "\n".join(lines)
    out = Path(args.out) if args.out != str(OUT) else OUT.with_name("fewshot-crops.md")
    out.write_text(text)
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    if args.study == "embedding":
        return main_embedding(args, argv)
    if args.study == "resolution":
        return main_resolution(args, argv)
    if args.study == "crops":
        return main_crops(args, argv)
    feats, data = _extract_all(args)
    if args.extract_only:
        return 0
    grid = variants(args.backbones, args.concat or None, tuple(int(t) for t in args.steps.split(",")))
    dev = _grid(feats, data, grid, args, seed=0)
    base = next(v for v in grid if v.name == "lite0")
    chosen = {"old default": base,
              "new default (chosen)": choose(dev, args.datasets, grid, args.tolerance),
              "best transductive (opt-in)": choose(dev, args.datasets, grid, args.tolerance, transductive=True),
              "best with two backbones (not shipped)": choose(dev, args.datasets, grid, args.tolerance,
                                                             shippable=False)}
    confirm = _grid(feats, data, list({v.name: v for v in chosen.values()}.values()), args, seed=1)
    command = "OMP_NUM_THREADS=1 PELLUCID_OFFLINE=1 .venv/bin/python -m bench.fewshot_draws " + " ".join(
        argv if argv is not None else sys.argv[1:])
    timing = {k: f.seconds for k, f in feats.items()}
    text = render(dev, confirm, grid, chosen, args, command.strip(), timing)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
