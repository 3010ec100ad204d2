"""T-TAME on a task model: fit time, faithfulness against Grad-CAM (and LIME), and map cost.

For the newest complete ``tb`` model folder under ``runs/`` (or any task's ``--model DIR``, with
``--out bench/results/ttame-<task>.md``):

* fits T-TAME with its defaults (``pellucid fit-explainer`` does the same) on the folder's
  ``split.json`` train/val parts and reports the fit time; by default into a scratch copy of the
  folder (``--in-place`` writes ``ttame.safetensors`` and the card entry into the folder itself);
* explains ``--images`` test images of ``split.json`` with T-TAME (min–max scaled, and the raw
  sigmoid map), Grad-CAM and, unless ``--lime-samples 0``, LIME, and scores every map with the one
  harness in :mod:`pellucid.explain.metrics` (Average Drop / Increase in Confidence at 100/50/15 %,
  deletion and insertion AUC; ``--all-metrics`` adds ROAD and the sanity check);
* times the plain forward pass of the batch, T-TAME's maps and Grad-CAM's maps (best of several
  interleaved repeats, same run, same thread count) — the target is T-TAME ≤ 1.2× the forward.

Writes ``bench/results/ttame.md`` and prints it. Skips with a message when no trained tb model
folder exists. Torch runs on ``--threads`` threads (default 1: on a shared, loaded 2-core machine one
thread is several times faster than two); the load average is recorded.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench import write_table
from pellucid.core.card import ModelCard, read_card

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).parent / "results" / "ttame.md"
_COPY = ("card.json", "model.safetensors", "split.json", "config.json")


def find_tb_model(runs: Path) -> Path | None:
    """Newest folder under ``runs`` (any depth) with a ``tb`` classifier card and its weights."""
    found = []
    for card_path in runs.glob("**/card.json"):
        try:
            card = read_card(card_path.parent)
        except (OSError, ValueError):  # CardError is a ValueError
            continue
        if card.task == "tb" and card.kind == "classifier" and \
                (card_path.parent / "model.safetensors").is_file():
            found.append((card_path.stat().st_mtime, card_path.parent))
    return max(found)[1] if found else None


def _best(fns: dict, repeat: int) -> dict[str, float]:
    """Best time of each function over ``repeat`` interleaved rounds (after one warm-up each)."""
    for fn in fns.values():
        fn()
    best = {k: float("inf") for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t)
    return best


def _test_images(folder: Path, card: ModelCard, n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    from pellucid.explain.ttame import _decode, _resolve_paths, _split_of

    paths, _ = _resolve_paths(_split_of(folder, card).test)
    rng = np.random.default_rng(seed)
    if len(paths) > n:
        paths = [paths[i] for i in sorted(rng.choice(len(paths), n, replace=False))]
    x = _decode(paths, int(card.image_size or 224), card.preprocessing.channels_in, progress=False)
    return x.float() / 255.0, paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="tb model folder (default: newest complete runs/**/card.json)")
    parser.add_argument("--images", type=int, default=16, help="test images to explain and score")
    parser.add_argument("--epochs", type=int, help="T-TAME epochs (default: the explainer's)")
    parser.add_argument("--max-images", type=int, help="T-TAME training images (default: the explainer's)")
    parser.add_argument("--lr", type=float, help="T-TAME peak learning rate (default: the explainer's)")
    parser.add_argument("--lime-samples", type=int, default=200, help="LIME samples per image; 0 skips LIME")
    parser.add_argument("--repeat", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--all-metrics", action="store_true", help="also ROAD and the sanity check")
    parser.add_argument("--in-place", action="store_true", help="save the fitted T-TAME into the model folder")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv if argv is not None else [])
    os.environ.setdefault("PELLUCID_OFFLINE", "1")

    folder = args.model or find_tb_model(ROOT / "runs")
    if folder is None or not (Path(folder) / "card.json").is_file():
        print(f"skipped: no trained tb model folder under {ROOT / 'runs'} (train one with `pellucid train tb`)")
        return
    folder = Path(folder)
    torch.set_num_threads(args.threads)

    from pellucid.core.modelfolder import load_model
    from pellucid.explain import get_explainer, score_explanations, score_table
    from pellucid.explain.ttame import TTAME

    scratch = None
    work = folder
    if not args.in_place:
        scratch = tempfile.TemporaryDirectory(prefix="bench_ttame_")
        work = Path(scratch.name) / folder.name
        work.mkdir()
        for name in _COPY:
            if (folder / name).is_file():
                shutil.copy2(folder / name, work / name)
    try:
        model, card = load_model(work)
        load_before = os.getloadavg()[0]
        options = {k: v for k, v in (("epochs", args.epochs), ("max_images", args.max_images), ("lr", args.lr))
                   if v is not None}
        ttame = TTAME(**options)
        ttame.fit(model, work)  # the model folder: split.json train/val, saved into `work`
        fit = ttame.fit_info

        x, paths = _test_images(work, card, args.images, seed=0)
        with torch.inference_mode():
            targets = model(x).argmax(1).tolist()
        raw = TTAME(normalize=False)
        raw.attention = ttame.attention
        explainers = {"ttame": ttame, "ttame-raw": raw, "gradcam": get_explainer("gradcam")}
        if args.lime_samples > 0:
            explainers["lime"] = get_explainer("lime", num_samples=args.lime_samples)
        exps, seconds = [], {}
        for name, explainer in explainers.items():
            t = time.perf_counter()
            out = explainer.explain(model, x, targets)
            seconds[name] = time.perf_counter() - t
            for e in out:
                e.method = name
            exps.extend(out)
        metrics = ("ad_ic", "deletion", "insertion") + (("road", "sanity") if args.all_metrics else ())
        by_method = {"ttame": TTAME(folder=str(work)), "ttame-raw": TTAME(folder=str(work), normalize=False),
                     "gradcam": explainers["gradcam"], **({"lime": explainers["lime"]} if "lime" in explainers else {})}
        t = time.perf_counter()
        rows = score_explanations(model, x, exps, metrics, explainers=by_method)
        score_seconds = time.perf_counter() - t

        def forward():
            with torch.inference_mode():
                model(x)

        timing = _best({"forward": forward, "ttame": lambda: ttame.explain(model, x, targets),
                        "ttame_predicted": lambda: ttame.explain(model, x),
                        "gradcam": lambda: explainers["gradcam"].explain(model, x, targets)}, args.repeat)
        load_after = os.getloadavg()[0]
    finally:
        if scratch is not None:
            scratch.cleanup()

    n = len(x)
    per = {k: 1000 * v / n for k, v in timing.items()}
    counts = {c: targets.count(i) for i, c in enumerate(card.classes)}
    lines = [
        f"# T-TAME on the {card.task} model (CPU)",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M')} by `PELLUCID_OFFLINE=1 .venv/bin/python bench/bench_ttame.py"
        f"{' ' + ' '.join(argv) if argv else ''}`; model folder `{folder}` ({card.backbone_name}, "
        f"{card.image_size} px, classes {card.classes}); torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), {platform.machine()}, shared machine: load average "
        f"{load_before:.1f} before, {load_after:.1f} after.",
        "",
        "## Fit",
        "",
        f"{fit['train_images']} training / {fit['val_images']} validation images from {fit['source']}; "
        f"{fit['epochs_run']} of at most {fit['epochs']} epochs (best epoch {fit['best_epoch'] + 1}, validation loss "
        f"{fit['best_val_loss']:.4f}{', stopped early' if fit['stopped_early'] else ''}); batch {fit['batch_size']}, "
        f"peak lr {fit['lr']}, loss weights {fit['loss_weights']}.",
        "",
        f"**Fit time {fit['fit_seconds']:.0f} s** (decode + frozen taps {fit['precompute_seconds']:.0f} s, "
        f"training {fit['train_seconds']:.0f} s); target ≤ 600 s.",
        "",
        f"## Faithfulness on {n} test images of split.json",
        "",
        f"Explained class = the model's argmax ({', '.join(f'{c}: {k}' for c, k in counts.items())}). "
        "`ttame` is min–max scaled (the default), `ttame-raw` the sigmoid attention itself"
        f"{f'; LIME with {args.lime_samples} samples' if 'lime' in explainers else ''}. Scoring took "
        f"{score_seconds:.0f} s.",
        "",
        score_table(rows),
        "",
        "## Cost of one map",
        "",
        f"Batch of {n}, best of {args.repeat} interleaved rounds; ms per image.",
        "",
        "| | ms / image | × forward |",
        "|---|---:|---:|",
        f"| plain forward (inference) | {per['forward']:.1f} | 1.00 |",
        f"| ttame, given targets | {per['ttame']:.1f} | {timing['ttame'] / timing['forward']:.2f} |",
        f"| ttame, predicted targets | {per['ttame_predicted']:.1f} | {timing['ttame_predicted'] / timing['forward']:.2f} |",
        f"| gradcam (lean) | {per['gradcam']:.1f} | {timing['gradcam'] / timing['forward']:.2f} |",
        *([f"| lime, {args.lime_samples} samples (one pass) | {1000 * seconds['lime'] / n:.0f} | "
           f"{seconds['lime'] / timing['forward']:.0f} |"] if "lime" in seconds else []),
        "",
        "Target: a T-TAME map ≤ 1.2× the plain forward pass.",
    ]
    write_table(lines, args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
