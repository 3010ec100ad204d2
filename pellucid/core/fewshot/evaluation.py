"""Few-shot evaluation over episodes of cached features (no backbone runs here):
:func:`evaluate_episodes` (mean accuracy with a 95 % interval), :func:`shot_table` (one row per
shot count, degrading gracefully when a class cannot provide enough queries) and
:func:`format_shot_table` (the rows as a Markdown table)."""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch

from pellucid.core.fewshot.config import PLAIN, FewShotError, ProtoConfig
from pellucid.core.fewshot.episodes import EpisodeSampler
from pellucid.core.fewshot.maths import prototype_logits

__all__ = [
    "evaluate_episodes",
    "shot_table",
    "evaluate_fit",
    "fit_shot_table",
    "format_shot_table",
    "most_confused",
]


def _as_features(features) -> tuple[torch.Tensor, list[int] | None]:
    if isinstance(features, Mapping):
        blocks = [torch.as_tensor(v, dtype=torch.float32) for v in features.values()]
        return torch.cat(blocks, dim=1), [b.shape[1] for b in blocks]
    return torch.as_tensor(features, dtype=torch.float32), None


def _summary(accs: np.ndarray, sampler: EpisodeSampler) -> dict:
    std = float(accs.std(ddof=1)) if len(accs) > 1 else 0.0
    return {"accuracy": float(accs.mean()), "ci95": 1.96 * std / math.sqrt(len(accs)), "std": std,
            "episodes": len(accs), "n_way": sampler.n_way, "n_shot": sampler.n_shot, "n_query": sampler.n_query}


def evaluate_episodes(features, labels: Sequence, groups: Sequence | None = None, *, n_way: int | None = None,
                      n_shot: int = 5, n_query: int = 10, n_episodes: int = 500, seed: int = 0,
                      config: ProtoConfig = PLAIN, dims: Sequence[int] | None = None,
                      classes: Sequence | None = None) -> dict:
    """Few-shot accuracy over episodes of cached features (no backbone runs here).

    Args:
        features: raw features of shape (N, D), or a mapping of named blocks (N, D_i) concatenated in
            order (their widths become ``dims``).
        labels: class label per image (N,).
        groups: group per image (N,), or None.
        n_way, n_shot, n_query, n_episodes, seed, classes: see :class:`EpisodeSampler`.
        config: transforms and distance (:class:`ProtoConfig`).
        dims: widths of the layer blocks concatenated in ``features``.

    Returns:
        ``{"accuracy": mean, "ci95": 1.96 * std / sqrt(n), "std": std, "episodes": n, "n_way", "n_shot",
        "n_query"}``, accuracy in [0, 1].
    """
    feats, block_dims = _as_features(features)
    dims = list(dims) if dims is not None else block_dims
    sampler = EpisodeSampler(labels, groups, n_way, n_shot, n_query, n_episodes, seed, classes)
    accs = np.empty(len(sampler))
    with torch.no_grad():
        for i, ep in enumerate(sampler):
            logits = prototype_logits(feats[ep.support], torch.from_numpy(ep.support_labels), feats[ep.query],
                                      sampler.n_way, config=config, dims=dims)
            accs[i] = float((logits.argmax(1).numpy() == ep.query_labels).mean())
    return _summary(accs, sampler)


def _shot_rows(labels, groups, shots, n_way, n_query, seed, run) -> list[dict]:
    rows = []
    for k in shots:
        q = n_query
        note = ""
        try:
            EpisodeSampler(labels, groups, n_way, k, q, 1, seed)
        except FewShotError as err:
            q = min(n_query, EpisodeSampler.max_query(labels, groups, k))
            if q < 1:
                rows.append({"n_shot": int(k), "error": str(err)})
                continue
            note = f"{q} queries per class (the most every class allows with {k} shots)"
        try:
            res = run(int(k), q)
        except FewShotError as err:
            rows.append({"n_shot": int(k), "error": str(err)})
            continue
        rows.append({**res, "note": note})
    return rows


def shot_table(features, labels: Sequence, groups: Sequence | None = None, *, shots: Sequence[int] = (1, 5, 10),
               n_way: int | None = None, n_query: int = 10, n_episodes: int = 500, seed: int = 0,
               config: ProtoConfig = PLAIN, dims: Sequence[int] | None = None) -> list[dict]:
    """:func:`evaluate_episodes` for each shot count.

    When some class cannot provide ``n_query`` queries beside ``k`` shots, the row uses the largest
    query count every class allows and says so in ``note``; when even that is impossible the row
    carries the reason in ``error`` instead of numbers.

    Returns:
        One dict per shot count: the :func:`evaluate_episodes` result plus ``note`` / ``error``.
    """
    return _shot_rows(labels, groups, shots, n_way, n_query, seed, lambda k, q: evaluate_episodes(
        features, labels, groups, n_way=n_way, n_shot=k, n_query=q, n_episodes=n_episodes, seed=seed,
        config=config, dims=dims))


def evaluate_fit(parts: Mapping, labels: Sequence, groups: Sequence | None = None, *, n_way: int | None = None,
                 n_shot: int = 5, n_query: int = 10, n_episodes: int = 100, seed: int = 0, criterion: str = "nll",
                 batch: int = 32, progress=None) -> dict:
    """Accuracy over episodes of the model that ``pellucid fewshot fit`` would fit on each episode's
    support set: :func:`~pellucid.core.fewshot.folder.fit_and_choose` on the support features of
    every candidate embedding (embedding and layer weights chosen by leave-one-out, then the
    classifier of ``config.head``), the queries scored in batches of ``batch`` as ``pellucid
    predict`` passes them (transductive refinement, when configured, sees each batch).

    Args:
        parts: ``{name: (network, raw features (N, D) of every image, mirrored features or None)}``,
            the candidate embeddings of :func:`~pellucid.core.fewshot.folder.candidate_embeddings`
            in order, with :func:`~pellucid.core.fewshot.folder.embedding_features` of all N images.
        labels, groups, n_way, n_shot, n_query, n_episodes, seed: see :class:`EpisodeSampler`.
        progress: called with the episode number after each episode, or None.

    Returns:
        :func:`evaluate_episodes`'s keys plus ``chosen``: how often each candidate embedding was chosen;
        ``classes`` (the labels, in order) and ``confusion``: the queries of every episode pooled, rows the
        true class, columns the predicted one (counts); ``recall``: each class's share of its queries
        predicted right.
    """
    from pellucid.core.fewshot.folder import fit_and_choose

    sampler = EpisodeSampler(labels, groups, n_way, n_shot, n_query, n_episodes, seed)
    accs = np.empty(len(sampler))
    chosen = dict.fromkeys(parts, 0)
    where = {c: i for i, c in enumerate(sampler.classes)}
    confusion = np.zeros((len(where), len(where)), dtype=np.int64)
    for i, ep in enumerate(sampler):
        s = torch.as_tensor(ep.support)
        support = {k: (net, raw[s], None if m is None else m[s]) for k, (net, raw, m) in parts.items()}
        choice = fit_and_choose(support, torch.from_numpy(ep.support_labels).long(), sampler.n_way, criterion,
                                head_scale=False)
        chosen[choice.name] += 1
        net, raw = choice.net, parts[choice.name][1]
        q = torch.as_tensor(ep.query)
        with torch.no_grad():
            pred = torch.cat([net.logits(net.transform(raw[q[b:b + batch]].float())).argmax(1)
                              for b in range(0, len(q), batch)])
        accs[i] = float((pred.numpy() == ep.query_labels).mean())
        rows = [where[ep.classes[t]] for t in ep.query_labels]
        np.add.at(confusion, (rows, [where[ep.classes[p]] for p in pred.tolist()]), 1)
        if progress is not None:
            progress(i + 1)
    totals = confusion.sum(1)
    recall = {str(c): (float(confusion[i, i] / totals[i]) if totals[i] else None) for c, i in where.items()}
    return {**_summary(accs, sampler), "chosen": chosen, "classes": [str(c) for c in sampler.classes],
            "confusion": confusion.tolist(), "recall": recall}


def fit_shot_table(parts: Mapping, labels: Sequence, groups: Sequence | None = None, *,
                   shots: Sequence[int] = (1, 5, 10), n_way: int | None = None, n_query: int = 10,
                   n_episodes: int = 100, seed: int = 0, criterion: str = "nll", progress=None) -> list[dict]:
    """:func:`evaluate_fit` for each shot count, with the rows of :func:`shot_table` (``note`` /
    ``error`` where a class cannot provide the queries). ``progress(k, episode)`` when given."""
    return _shot_rows(labels, groups, shots, n_way, n_query, seed, lambda k, q: evaluate_fit(
        parts, labels, groups, n_way=n_way, n_shot=k, n_query=q, n_episodes=n_episodes, seed=seed,
        criterion=criterion, progress=None if progress is None else (lambda i: progress(k, i))))


def most_confused(row: dict, top: int = 3) -> list[tuple[str, str, float]]:
    """The ``top`` largest confusions of a :func:`evaluate_fit` row: ``(true class, predicted class, share of
    the true class's queries)``, largest first, none below 1 %."""
    cm = np.asarray(row.get("confusion") or [], dtype=np.float64)
    if cm.size == 0:
        return []
    share = np.divide(cm, cm.sum(1, keepdims=True), out=np.zeros_like(cm), where=cm.sum(1, keepdims=True) > 0)
    np.fill_diagonal(share, 0.0)
    order = np.argsort(-share, axis=None)[:top]
    classes = row["classes"]
    return [(classes[i], classes[j], float(share[i, j])) for i, j in zip(*np.unravel_index(order, share.shape))
            if share[i, j] >= 0.01]


def format_shot_table(rows: Sequence[dict], title: str = "") -> str:
    """Markdown table of :func:`shot_table` rows (accuracy ± 95 % interval half-width); rows of
    :func:`evaluate_fit` add each class's recall and the largest confusions under the table."""
    lines = ([f"**{title}**", ""] if title else []) + [
        "| shots | way | queries/class | episodes | accuracy | 95% CI |", "|---:|---:|---:|---:|---:|---|"]
    notes, per_class = [], []
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['n_shot']} | – | – | – | n/a | {r['error']} |")
            continue
        lines.append(f"| {r['n_shot']} | {r['n_way']} | {r['n_query']} | {r['episodes']} | {r['accuracy']:.3f} | "
                     f"± {r['ci95']:.3f} |")
        if r.get("note"):
            notes.append(f"{r['n_shot']}-shot: {r['note']}")
        if r.get("recall"):
            recall = ", ".join(f"{c} {v:.2f}" for c, v in r["recall"].items() if v is not None)
            mixed = "; ".join(f"{t} taken for {p} {s:.0%}" for t, p, s in most_confused(r))
            per_class.append(f"{r['n_shot']}-shot recall: {recall}" + (f"; most confused: {mixed}" if mixed else ""))
    return "\n".join(lines + ([""] + notes if notes else []) + ([""] + per_class if per_class else []))
