"""``pellucid fewshot {fit,eval}``: the command-line face of :mod:`pellucid.core.fewshot`.

``fit`` turns a folder of a few labelled images per class into a model folder of kind
``"prototypes"`` that ``pellucid predict``, ``explain``, ``report`` and the web app use like any
other model. ``eval`` prints the 1/5/10-shot accuracy table (mean over episodes with a 95 %
interval) of the same embedding on a labelled data folder, respecting its groups. Mistakes a user
can fix end with one line (:class:`~pellucid.core.fewshot.FewShotError`, which the command line prints as one line).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
from pathlib import Path

from pellucid.core.fewshot.config import FewShotError

__all__ = ["run"]

log = logging.getLogger(__name__)


def _shots(text: str) -> list[int]:
    try:
        shots = [int(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise FewShotError(f"--shots must be comma-separated whole numbers such as 1,5,10; got {text!r}") from None
    if not shots or min(shots) < 1:
        raise FewShotError(f"--shots must be comma-separated whole numbers >= 1 such as 1,5,10; got {text!r}")
    return shots


def _pretrained(args: argparse.Namespace):
    value = getattr(args, "pretrained", None)
    if value is None:
        return True
    if isinstance(value, str):
        return {"auto": True, "true": True, "random": False, "false": False}.get(value.lower(), value)
    return value


def _fit(args: argparse.Namespace) -> int:
    from pellucid.core.fewshot import DEFAULT_BACKBONE, fit_prototypes

    if not args.support:
        raise FewShotError("fewshot fit needs --support DIR: a folder with one sub-folder of a few images per class")
    out = args.out or f"runs/fewshot-{_dt.datetime.now():%Y%m%d-%H%M%S}"
    config = None
    no_choice = getattr(args, "auto_backbones", None) is False  # read when the parser defines --no-auto-backbones
    resolution = getattr(args, "resolution", None)  # read when the parser defines --resolution
    head = getattr(args, "head", None)  # read when the parser defines --head
    if no_choice or resolution is not None or head is not None:
        from dataclasses import replace

        from pellucid.core.backbones import get_backbone_spec
        from pellucid.core.fewshot import default_config

        config = default_config(get_backbone_spec(args.backbone or DEFAULT_BACKBONE))
        if no_choice:
            config = replace(config, auto_backbones=())
        if resolution is not None:
            config = replace(config, resolution=resolution)
        if head is not None:
            config = replace(config, head=head)
    folder = fit_prototypes(args.support, out, backbone=args.backbone or DEFAULT_BACKBONE,
                            pretrained=_pretrained(args), task=getattr(args, "task", None) or "fewshot",
                            config=config, transductive=getattr(args, "transductive", None), progress=True)
    from pellucid.core.card import read_card

    card = read_card(folder)
    m = card.metrics
    print(f"model folder: {folder}")
    print(f"classes:      " + ", ".join(f"{c} ({m['per_class'][c]})" for c in card.classes))
    fewshot = card.extra.get("fewshot", {})
    extras = "".join(f" + {e['name']} ({e.get('weights', {}).get('source')})"
                     for e in fewshot.get("extra_backbones", []))
    print(f"backbone:     {card.backbone_name} ({card.weight_source}){extras}, {card.image_size} px")
    choice = m.get("embedding_choice")
    if choice:
        nll = ", ".join(f"{k} {v}" for k, v in choice["loo_nll"].items())
        print(f"embedding:    {choice['chosen']} chosen on the support set ({choice['criterion']}; "
              f"leave-one-out NLL: {nll})")
    if fewshot.get("backbones"):
        print("note:         several backbones: CAM explainers show the first backbone's share only "
              "(see the card's fewshot.notes)")
    print("layers:       " + ", ".join(f"{k} {fewshot.get(k)}" for k in ("layer_weights", "auto_weights", "flip",
                                                                   "support_flip", "transductive")))
    if fewshot.get("head") == "logistic":
        print(f"classifier:   logistic regression on the support embeddings (C = {fewshot.get('head_c'):g}), "
              "probabilities scaled by leave-one-out")
    else:
        print("classifier:   nearest prototype")
    if fewshot.get("transductive"):
        print("note:         transductive refinement: a prediction depends on the other images predicted with it")
    if "support_loo_accuracy" in m:
        print(f"leave-one-out accuracy on the support set: {m['support_loo_accuracy']:.3f} (n={m['n_support']})")
    print(f"predict with: pellucid predict --model {folder} IMAGES...")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from pellucid.core.backbones import create_backbone
    from pellucid.core.fewshot import (DEFAULT_BACKBONE, EpisodeSampler, PrototypicalNetwork, extract_features,
                                       format_shot_table, improved_config, shot_table)
    from pellucid.datasets.samples import class_counts, load_samples

    if not args.data:
        raise FewShotError("fewshot eval needs --data DIR: a labelled folder (class sub-folders or manifest.csv)")
    shots = _shots(args.shots)
    episodes = int(args.episodes)
    if episodes < 1:
        raise FewShotError(f"--episodes must be at least 1; got {episodes}")
    samples = load_samples(args.data)
    labels = [s.label for s in samples]
    groups = [s.group for s in samples]
    EpisodeSampler(labels, groups, None, min(shots), 1, 1)  # impossible even at the fewest shots: say so now
    bb, info = create_backbone(args.backbone or DEFAULT_BACKBONE, pretrained=_pretrained(args))
    config = improved_config(bb.spec)
    net = PrototypicalNetwork(bb, config)
    feats = extract_features(net, [s.path for s in samples], image_size=config.image_size, weight_info=info,
                             progress=True)
    rows = shot_table(feats, labels, groups, shots=shots, n_query=10, n_episodes=episodes, config=config,
                      dims=net.embedder.dims)
    if all("error" in r for r in rows):
        raise FewShotError(rows[0]["error"])
    counts = class_counts(samples)
    title = (f"{args.data}: {len(counts)}-way, {bb.spec.name} ({info.get('source')}) frozen features, "
             f"prototypes with power + CL2N transform, groups kept apart")
    table = format_shot_table(rows, title)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "fewshot_eval.md").write_text(table + "\n")
        (out / "fewshot_eval.json").write_text(json.dumps({"data": str(args.data), "classes": counts,
                                                           "config": config.to_dict(), "rows": rows}, indent=1))
        print(f"written: {out / 'fewshot_eval.md'}, {out / 'fewshot_eval.json'}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Entry point of ``pellucid fewshot {fit,eval}`` (``args`` from :func:`pellucid.cli.build_parser`)."""
    from pellucid.core.fewshot import FewShotError

    try:
        if args.action == "fit":
            return _fit(args)
        if args.action == "eval":
            return _eval(args)
        raise FewShotError(f"unknown fewshot action {args.action!r}; use fit or eval")
    except FewShotError as err:  # one line, like every other user error of the CLI
        raise FewShotError(str(err)) from None
