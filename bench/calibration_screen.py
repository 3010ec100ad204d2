"""``python -m bench.calibration_screen TASK --hybrid NAME`` — how honest a default vote's probabilities are.

Every member of a vote, and the vote itself, is calibrated by a temperature fitted on its validation part
(:func:`pellucid.core.calibration.fit_temperature`). Where the validation part is ranked all right the plain
NLL fit has no minimum and ends near T = 0 (probabilities of 0 or 1); the fit now smooths its targets there
instead. This screen scores both fits on the recipe search's own grouped folds (``--seeds``, default both
draws), from the members' kept fold logits, nothing trained: each member calibrated on the fold's validation
part, the probabilities averaged with the hybrid's weights and calibrated again on the log of that mean, as
an ensemble folder does. It pools the test parts and reports NLL, ECE, accuracy at the argmax (a binary
task's threshold policy is not applied, so tb's accuracy here is not its table's), the confidence on wrong
answers, the share of answers at 0.999 or more, and how many fits were ranked all right. The fine-tunes' fold
models are read from ``runs/tune/<name>[-seed<k>]/`` (``bench.recipes`` keeps them there); a fold without them
is left out and said so. Writes ``bench/results/calibration-<name>.md``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from bench import sample_data, write_table

MODES = (("plain", 0.0), ("smoothed", None))  # label_smoothing passed to fit_temperature (None: the default)


def vote_probs(val: list, test: list, y_val: np.ndarray, weights: list[float], smoothing: float | None):
    """Test probabilities of a vote calibrated the ensemble folder's way, and how many of its fits
    (members, then the vote) were ranked all right on validation."""
    from pellucid.core import calibration as cal

    separated, pv, pt = 0, [], []
    for lv, lt in zip(val, test):
        separated += cal.default_smoothing(lv, y_val) > 0
        t = cal.fit_temperature(lv, y_val, label_smoothing=smoothing)
        pv.append(cal.apply_temperature(lv, t))
        pt.append(cal.apply_temperature(lt, t))
    lv = np.log(np.average(pv, 0, weights=weights) + 1e-12)
    lt = np.log(np.average(pt, 0, weights=weights) + 1e-12)
    separated += cal.default_smoothing(lv, y_val) > 0
    return cal.apply_temperature(lt, cal.fit_temperature(lv, y_val, label_smoothing=smoothing)), separated


def summarise(probs: np.ndarray, y: np.ndarray) -> dict:
    from pellucid.core.calibration import expected_calibration_error

    top, wrong = probs.max(1), probs.argmax(1) != y
    return {"n": int(len(y)), "accuracy": float(1 - wrong.mean()),
            "nll": float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, 1)).mean()),
            "ece": float(expected_calibration_error(probs, y)),
            "top_wrong": float(top[wrong].mean()) if wrong.any() else None, "n_wrong": int(wrong.sum()),
            "certain": float((top >= 0.999).mean())}


def _aligned(parts: list[dict], part: str) -> tuple[list[int], list]:
    """The samples every member scored on ``part``, and each member's logits in that order."""
    common = set.intersection(*[set(int(i) for i in p[part][0]) for p in parts])
    order = [int(i) for i in parts[0][part][0] if int(i) in common]
    out = []
    for p in parts:
        where = {int(i): r for r, i in enumerate(p[part][0])}
        out.append(np.asarray(p[part][1])[[where[i] for i in order]])
    return order, out


def screen(task_name: str, hybrid: str, *, name: str | None = None, data: str | None = None, folds: int = 5,
           seeds: tuple[int, ...] = (0, 1)) -> dict:
    from pellucid.core.tasks import get_task
    from pellucid.core.tune import _Data, _probe_parts, _train_fold_logits, search_folds
    from pellucid.core.tune_candidates import default_candidates

    t0 = time.time()
    task = get_task(task_name)
    name = name or task.name
    data = data or f"../shared/data/{task.default_data or name}"
    cands = {c.name: c for c in default_candidates(task)}
    cand = cands.get(hybrid)
    if cand is None or cand.kind != "hybrid":
        raise SystemExit(f"{hybrid!r} is not a hybrid candidate of {task.name}")
    probe, trained = cands[cand.parts[0]], cand.parts[1:]
    probs = {m: [] for m, _ in MODES}
    separated = {m: 0 for m, _ in MODES}
    ys, missing, fits = [], [], 0
    for seed in seeds:
        samples, _, splits = search_folds(task, data, folds, seed)
        d = _Data(task, samples, task.recipe, False)
        d.seed = seed
        work = Path("runs/tune") / (name if seed == 0 else f"{name}-seed{seed}")
        for s in splits:
            dirs = [work / t.replace(":", "_") / f"fold_{s['fold']}" for t in trained]
            if not all((x / "card.json").exists() for x in dirs):
                missing.append(f"seed {seed} fold {s['fold']}")
                continue
            parts = _probe_parts(d, probe, s) + [_train_fold_logits(task, x, samples, s) for x in dirs]
            weights = [1.0] * len(probe.members) + [cand.train_weight] * len(trained)
            order_v, val = _aligned(parts, "val")
            order_t, test = _aligned(parts, "test")
            fits += len(parts) + 1
            for mode, smoothing in MODES:
                p, sep = vote_probs(val, test, d.y[order_v], weights, smoothing)
                probs[mode].append(p)
                separated[mode] += sep
            ys.append(d.y[order_t])
    if not ys:
        raise SystemExit(f"no fold of {hybrid!r} has its fine-tunes' fold models under runs/tune/{name}: "
                         f"run `python -m bench.recipes {task.name}` first")
    y = np.concatenate(ys)
    return {"task": task.name, "name": name, "hybrid": hybrid, "seeds": list(seeds), "folds": folds,
            "scored": len(ys), "missing": missing, "fits": fits, "separated": separated["plain"],
            "rows": {m: summarise(np.concatenate(probs[m]), y) for m, _ in MODES},
            "seconds": round(time.time() - t0, 1)}


def render(res: dict) -> str:
    from pellucid.core.tune_report import _cpu_line

    cmd = (f"python -m bench.calibration_screen {res['task']} --hybrid \"{res['hybrid']}\""
           + (f" --name {res['name']}" if res["name"] != res["task"] else "")
           + (f" --seeds {','.join(map(str, res['seeds']))}" if list(res["seeds"]) != [0, 1] else ""))
    lines = [f"# Calibration of a vote's probabilities: {res['name']}", "",
             f"`{res['hybrid']}` on {res['scored']} grouped folds of the recipe search (fold seeds "
             f"{', '.join(map(str, res['seeds']))}), from the members' kept fold logits; each member calibrated on "
             f"the fold's validation part, then the vote on the log of its weighted mean, as an ensemble folder does; "
             f"the test parts pooled. **{res['separated']} of {res['fits']} temperature fits** (members and votes) "
             f"had a validation part ranked all right, where the plain fit has no minimum. CPU: {_cpu_line()}. "
             f"{res['seconds']:.0f} s (`{cmd}`).", "",
             "| temperature fit | n | accuracy (argmax) | NLL | ECE | mean top probability on wrong answers | "
             "answers at ≥ 0.999 |", "|---|---|---|---|---|---|---|"]
    labels = {"plain": "plain NLL", "smoothed": "smoothed where ranked all right (the default)"}
    for mode, r in res["rows"].items():
        wrong = f"{r['top_wrong']:.3f} ({r['n_wrong']})" if r["top_wrong"] is not None else "— (0)"
        lines.append(f"| {labels[mode]} | {r['n']} | {r['accuracy']:.3f} | {r['nll']:.3f} | {r['ece']:.3f} | "
                     f"{wrong} | {r['certain']:.2f} |")
    if res["missing"]:
        lines += ["", f"Left out (no fold models kept): {', '.join(res['missing'])}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.calibration_screen", description=__doc__.split("\n")[0])
    p.add_argument("task")
    p.add_argument("--hybrid", required=True, help="a hybrid candidate of the task's recipe search")
    p.add_argument("--name", help="the data set's name under ../shared/data (default: the task's)")
    p.add_argument("--data")
    p.add_argument("--seeds", default="0,1", help="fold draws, comma-separated")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)
    data = sample_data(args.task, args.name, args.data)
    if data is None:
        return 0
    res = screen(args.task, args.hybrid, name=args.name, data=str(data),
                 seeds=tuple(int(x) for x in args.seeds.split(",")))
    write_table(render(res).splitlines(), Path(args.out) / f"calibration-{res['name']}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
