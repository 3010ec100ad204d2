"""``pellucid fewshot {fit,eval}``: the command-line face of :mod:`pellucid.core.fewshot`.

``fit`` turns a folder of a few labelled images per class into a model folder of kind
``"prototypes"`` that ``pellucid predict``, ``explain``, ``report`` and the web app use like any
other model. ``eval`` prints the 1/5/10-shot accuracy table (mean over episodes with a 95 %
interval) on a labelled data folder, respecting its groups, of the model ``fit`` would fit: on each
episode's support set the same choice of embedding and layer weights and the same classifier
(:func:`~pellucid.core.fewshot.evaluation.evaluate_fit`), with the same options. Mistakes a user
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


def _scales(text) -> tuple[int, ...] | None:
    """``--scales``: None when not given, ``()`` for ``none``, else the comma-separated sides."""
    if text is None:
        return None
    if str(text).strip().lower() in ("none", "off", ""):
        return ()
    try:
        return tuple(int(v) for v in str(text).split(","))
    except ValueError:
        raise FewShotError(f"--scales must be comma-separated whole numbers of pixels such as 320, or 'none'; "
                           f"got {text!r}") from None


def _config(args: argparse.Namespace, spec):
    """The configuration that the options ask for: None (the default of the backbone, decided where
    it is built) unless ``--no-auto-backbones``, ``--resolution``, ``--scales`` or ``--head`` change it; with
    ``spec`` (eval) always a configuration, with ``--transductive`` applied as ``fit`` applies it."""
    from dataclasses import replace

    from pellucid.core.fewshot import DEFAULT_BACKBONE, default_config

    no_choice = getattr(args, "auto_backbones", None) is False  # read when the parser defines --no-auto-backbones
    resolution = getattr(args, "resolution", None)  # read when the parser defines --resolution
    head = getattr(args, "head", None)  # read when the parser defines --head
    scales = _scales(getattr(args, "scales", None))  # read when the parser defines --scales
    for_eval = spec is not None  # fit applies --transductive itself (fit_prototypes(transductive=))
    if not for_eval and not (no_choice or resolution is not None or head is not None or scales is not None):
        return None
    if spec is None:
        from pellucid.core.backbones import get_backbone_spec

        spec = get_backbone_spec(args.backbone or DEFAULT_BACKBONE)
    config = default_config(spec)
    if no_choice:  # the backbone alone, whatever extra backbones the default embeds with
        config = replace(config, auto_backbones=(), backbones=())
    if resolution is not None:
        config = replace(config, resolution=resolution)
    if head is not None:
        config = replace(config, head=head)
    if scales == ():  # no extra sides at all: the candidates that name one lose it
        from pellucid.core.fewshot.config import split_candidate

        cands = [split_candidate(cand)[0] for cand in config.auto_backbones]
        config = replace(config, scales=(), auto_backbones=tuple(dict.fromkeys(c for c in cands if c)))
    elif scales is not None:
        config = replace(config, scales=scales)
    steps = getattr(args, "transductive", None)
    if steps and for_eval:
        from pellucid.core.fewshot.config import with_transduction

        config = with_transduction(config, steps)
    return config


def _describe(config) -> str:
    """One line naming what is fitted: the embedding candidates and the classifier."""
    head = (f"logistic head (C = {config.head_c:g})" if config.head == "logistic" else "nearest prototype")
    if config.transductive:
        head += f", transductive refinement ({config.transductive} steps) on each batch of 32"
    return head


def _fit(args: argparse.Namespace) -> int:
    from pellucid.core.fewshot import DEFAULT_BACKBONE, fit_prototypes

    if not args.support:
        raise FewShotError("fewshot fit needs --support DIR: a folder with one sub-folder of a few images per class")
    out = args.out or f"runs/fewshot-{_dt.datetime.now():%Y%m%d-%H%M%S}"
    config = _config(args, None)
    folder = fit_prototypes(args.support, out, backbone=args.backbone or DEFAULT_BACKBONE,
                            pretrained=_pretrained(args), task=getattr(args, "task", None) or "fewshot",
                            config=config, transductive=getattr(args, "transductive", None), progress=True,
                            overwrite=bool(getattr(args, "overwrite", False)),
                            channels=getattr(args, "channels", None))
    from pellucid.core.card import read_card

    card = read_card(folder)
    m = card.metrics
    print(f"model folder: {folder}")
    print("classes:      " + ", ".join(f"{c} ({m['per_class'][c]})" for c in card.classes))
    fewshot = card.extra.get("fewshot", {})
    extras = "".join(f" + {e['name']} ({e.get('weights', {}).get('source')})"
                     for e in fewshot.get("extra_backbones", []))
    scales = "".join(f", again at {side} px" for side in fewshot.get("scales") or [])
    print(f"backbone:     {card.backbone_name} ({card.weight_source}){extras}, {card.image_size} px{scales}")
    if card.preprocessing.channels_in == 1:
        print("input:        luminance: colour images are read as gray, here and at every prediction "
              f"(task {card.task!r}; --channels 3 keeps colour)")
    elif getattr(args, "channels", None) is None:
        from pellucid.core.fewshot.folder import luminance_task

        like = luminance_task(card.classes)
        if like:
            print(f"note:         read in colour; the {like} app has these classes and reads its images as luminance "
                  f"(their colour is a source artefact there): add --task {like} to do the same")
    choice = m.get("embedding_choice")
    if choice:
        nll = ", ".join(f"{k} {v}" for k, v in choice["loo_nll"].items())
        print(f"embedding:    {choice['chosen']} chosen on the support set ({choice['criterion']}; "
              f"leave-one-out NLL: {nll})")
    if fewshot.get("scales"):
        print("note:         multi-scale: CAM explainers show the first backbone at its own input side only "
              "(see the card's fewshot.notes)")
    elif fewshot.get("backbones"):
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
    from pellucid.core.fewshot import (DEFAULT_BACKBONE, EpisodeSampler, candidate_embeddings, embedding_features,
                                       fit_shot_table, format_shot_table)
    from pellucid.datasets.samples import class_counts, load_samples

    if not args.data:
        raise FewShotError("fewshot eval needs --data DIR: a labelled folder (class sub-folders or manifest.csv)")
    shots = _shots(args.shots)
    episodes = int(args.episodes)
    if episodes < 1:
        raise FewShotError(f"--episodes must be at least 1; got {episodes}")
    samples = load_samples(args.data)
    blocks = int(getattr(args, "split_single_groups", 0) or 0)
    split = []
    if blocks:
        if blocks < 2:
            raise FewShotError(f"--split-single-groups must be at least 2 blocks; got {blocks}")
        from pellucid.core.fewshot import split_single_group_classes

        before = {s.path: s.group for s in samples}
        import warnings

        with warnings.catch_warnings():  # the table says it, below
            warnings.simplefilter("ignore")
            samples = split_single_group_classes(samples, blocks)
        split = sorted({s.label for s in samples if s.group != before[s.path]})
    labels = [s.label for s in samples]
    groups = [s.group for s in samples]
    try:  # impossible even at the fewest shots: say so now
        EpisodeSampler(labels, groups, None, min(shots), 1, 1)
    except FewShotError as err:
        if "in 1 group" not in str(err) or blocks:
            raise
        raise FewShotError(f"{err}; for frames of one recording, --split-single-groups 10 cuts such a class into "
                           "10 blocks in file-name order") from None
    from pellucid.core.backbones import create_backbone
    from pellucid.core.fewshot.folder import _check_support_classes, support_channels

    task = getattr(args, "task", None) or "fewshot"
    _check_support_classes(Path(args.data), sorted(class_counts(samples)), task)
    channels = support_channels(task, getattr(args, "channels", None))
    bb, info = create_backbone(args.backbone or DEFAULT_BACKBONE, pretrained=_pretrained(args))
    config = _config(args, bb.spec)
    paths = [s.path for s in samples]
    parts = {}
    for name, net in candidate_embeddings(bb, config, pretrained=_pretrained(args)):
        parts[name] = (net, *embedding_features(net, paths, weight_info=info, progress=True, channels=channels))
    from tqdm.auto import tqdm

    bars: dict = {}

    def progress(k: int, i: int) -> None:
        if k not in bars:
            bars[k] = tqdm(total=episodes, desc=f"{k}-shot episodes", unit="episode", leave=False)
        bars[k].update(1)
        if i == episodes:
            bars[k].close()

    rows = fit_shot_table(parts, labels, groups, shots=shots, n_query=10, n_episodes=episodes, progress=progress)
    if all("error" in r for r in rows):
        raise FewShotError(rows[0]["error"])
    counts = class_counts(samples)
    title = (f"{args.data}: {len(counts)}-way, the model `pellucid fewshot fit` fits, refitted on each episode's "
             f"support set — embedding {' or '.join(parts)} ({info.get('source')}), {_describe(config)}; "
             f"groups kept apart" + ("; images read as luminance (gray)" if channels == 1 else ""))
    table = format_shot_table(rows, title)
    if split:
        table += (f"\n\n{', '.join(split)}: one group each, cut into {blocks} blocks in file-name order "
                  "(--split-single-groups): weaker than group separation, as neighbouring frames look alike")
    if len(parts) > 1:
        table += "\n\nembedding chosen (episodes): " + "; ".join(
            f"{r['n_shot']}-shot " + ", ".join(f"{k} {v}" for k, v in r["chosen"].items())
            for r in rows if "chosen" in r)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "fewshot_eval.md").write_text(table + "\n")
        record = {"data": str(args.data), "classes": counts, "config": config.to_dict(), "candidates": list(parts),
                  "channels": channels,
                  "split_single_groups": {"blocks": blocks, "classes": split} if split else None, "rows": rows}
        (out / "fewshot_eval.json").write_text(json.dumps(record, indent=1))
        from pellucid.core.plots import plot_confusion

        plots = [plot_confusion(r["confusion"], r["classes"], out / f"confusion_{r['n_shot']}shot.png")
                 for r in rows if r.get("confusion")]  # each shot count's queries pooled over its episodes
        print(f"written: {', '.join(str(p) for p in [out / 'fewshot_eval.md', out / 'fewshot_eval.json', *plots])}")
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
