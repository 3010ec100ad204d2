"""``python -m bench.testsize_screen TASK --candidate NAME --sizes 224,256,288`` — does a fine-tune predict
better at a larger input than it was trained at?

A fine-tune trained on random resized crops (``augment = "natural"``: a crop of 60-100 % of the image's area,
resized to the training size) sees objects larger than a whole resized image shows them at prediction. Testing
at a larger size than the training one can undo that (the "FixRes" effect, Touvron et al., 2019). The screen
takes a finished recipe search's fold models of one training candidate (``runs/tune/<name>/<candidate>/fold_k``,
as ``python -m bench.recipes`` leaves them), reads every fold's validation and test images at each size, and
scores the fine-tune alone and in its hybrid with a probe vote exactly as the search scores a hybrid (each
member calibrated on validation, the task's threshold policy). Nothing is trained; the logits of each size are
kept beside the fold's model (``fold_logits_<size>.pt``). Writes ``bench/results/testsize-<name>.md``.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)


def size_logits(task, folder: Path, samples, split: dict, size: int) -> dict:
    """``{part: (sample indices, logits)}`` of one fold's model read at ``size`` px, cached in the folder."""
    from pellucid.core.tune import _train_fold_logits

    return _train_fold_logits(task, folder, samples, split, size)


def _mean_logits(sets: list[dict]) -> dict:
    """The mean of several logit sets of the same samples (a multi-size test-time augmentation)."""
    return {p: (sets[0][p][0], torch.stack([s[p][1] for s in sets]).mean(0)) for p in ("val", "test")}


def screen(task_name: str, candidate: str, vote: str, sizes: list[int], *, name: str | None = None,
           data: str | None = None, folds: int = 5, seed: int = 0, weights: tuple[float, ...] = (1.0, 3.0),
           work: str | None = None) -> dict:
    from pellucid.core.tasks import get_task
    from pellucid.core.tune import _Data, _probe_parts, _vote, search_folds
    from pellucid.core.tune_candidates import default_candidates

    task = get_task(task_name)
    name = name or task.name
    data = data or f"../shared/data/{name}"
    samples, _, splits = search_folds(task, data, folds, seed)  # the search's own folds
    root = Path(work or Path("runs") / "tune" / (name if seed == 0 else f"{name}-seed{seed}"))
    cands = {c.name: c for c in default_candidates(task)}
    probe = cands[vote]
    trained = cands[candidate]
    native = int(trained.overrides.get("image_size", task.image_size))
    sizes = sorted(set(sizes) | {native})
    data_obj = _Data(task, samples, task.recipe, progress=False)
    t0 = time.time()
    rows: dict[str, list[dict]] = {}
    primary = task.metrics[0]
    for s in splits:
        folder = root / candidate.replace(":", "_") / f"fold_{s['fold']}"
        if not (folder / "card.json").exists():
            raise SystemExit(f"{folder}: no fold model; run the search first (python -m bench.recipes {task_name} "
                             f"--candidates {candidate})")
        probes = _probe_parts(data_obj, probe, s)
        per = {z: size_logits(task, folder, samples, s, z) for z in sizes}
        variants = {f"{z} px": per[z] for z in sizes}
        bigger = [z for z in sizes if z > native]
        if bigger:  # the native size and the next larger one, logits averaged (two passes)
            variants[f"{native} + {bigger[0]} px"] = _mean_logits([per[native], per[bigger[0]]])
        for label, part in variants.items():
            rows.setdefault(f"fine-tune alone, {label}", []).append(_vote(data_obj, [part]))
            for w in weights:
                rows.setdefault(f"`{vote}` + {w:g}x fine-tune, {label}", []).append(
                    _vote(data_obj, probes + [part], [1.0] * len(probes) + [w]))
        log.info("fold %s done (%.0f s)", s["fold"], time.time() - t0)
    return {"task": task_name, "name": name, "candidate": candidate, "vote": vote, "native": native,
            "sizes": sizes, "folds": folds, "seed": seed, "primary": primary, "metrics": list(task.metrics[:2]),
            "rows": rows, "seconds": round(time.time() - t0, 1)}


def render(res: dict) -> str:
    from pellucid.core.tune_report import _cpu_line

    m1, m2 = res["metrics"]
    native = f"{res['native']} px"
    seed_arg = f" --seed {res['seed']}" if res["seed"] else ""
    lines = [f"# Test-time input size of a fine-tune: {res['name']}", "",
             f"`{res['candidate']}` (trained at {res['native']} px) read at other sizes, alone and in its hybrid "
             f"with `{res['vote']}`; {res['folds']}-fold grouped CV (seed {res['seed']}), the recipe search's folds "
             f"and fold models. Paired differences are against the same row at the training size; up / down count "
             f"folds. CPU: {_cpu_line()}. Screen took {res['seconds']:.0f} s (`python -m bench.testsize_screen "
             f"{res['task']}{seed_arg} --candidate {res['candidate']} --vote {res['vote']} --sizes "
             f"{','.join(map(str, res['sizes']))}`).", "",
             f"| variant | {m1} (mean ± sd) | {m2} | Δ{m1} vs {native} | up / down |", "|---|---|---|---|---|"]
    for label, folds in res["rows"].items():
        a = np.array([f[m1] for f in folds])
        b = np.array([f[m2] for f in folds])
        ref_label = label.rsplit(", ", 1)[0] + f", {native}"
        ref = np.array([f[m1] for f in res["rows"][ref_label]])
        d = a - ref
        diff = "—" if ref_label == label else f"{d.mean():+.3f} ± {d.std(ddof=1):.3f}"
        updown = "—" if ref_label == label else f"{int((d > 1e-9).sum())} / {int((d < -1e-9).sum())}"
        lines.append(f"| {label} | {a.mean():.3f} ± {a.std(ddof=1):.3f} | {b.mean():.3f} ± {b.std(ddof=1):.3f} | "
                     f"{diff} | {updown} |")
    return "\n".join(lines) + "\n"


def fold_screen_parser(prog: str, doc: str, candidate_example: str) -> argparse.ArgumentParser:
    """The arguments every screen of a search's fold models takes (this one and ``bench.views_screen``)."""
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n")[0])
    p.add_argument("task")
    p.add_argument("--candidate", required=True, help=f"a training candidate of the search, e.g. {candidate_example}")
    p.add_argument("--name", help="data set / table name (default: the task's)")
    p.add_argument("--data")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results")
    p.add_argument("--work", help="the search's work folder (default runs/tune/<name>[-seed<k>])")
    return p


def write_screen(res: dict, prefix: str, out: str, seed: int, text: str) -> None:
    """``<out>/<prefix>-<name>[-seed<k>].json`` and ``.md``; the table is printed too."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{prefix}-{res['name']}" + (f"-seed{seed}" if seed else "")
    (folder / f"{stem}.json").write_text(json.dumps(res, indent=1))
    (folder / f"{stem}.md").write_text(text)
    print(text)


def main(argv: list[str] | None = None) -> int:
    p = fold_screen_parser("python -m bench.testsize_screen", __doc__, "finetune:lite0+long+ema")
    p.add_argument("--vote", default="probe:lite0@448+lite1@448+lite2@448", help="the probe vote of the hybrid")
    p.add_argument("--sizes", default="224,256,288,320", help="comma-separated input sizes, px")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = p.parse_args(argv)
    res = screen(args.task, args.candidate, args.vote, [int(z) for z in args.sizes.split(",")], name=args.name,
                 data=args.data, seed=args.seed, work=args.work)
    write_screen(res, "testsize", args.out, args.seed, render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
