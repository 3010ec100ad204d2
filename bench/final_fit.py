"""``python -m bench.final_fit TASK --vote NAME`` — what ``pellucid train --final`` buys: more training images.

A plain ``pellucid train`` trains on about 65 % of the images (20 % test, 15 % validation); ``--final`` trains on
every image but the validation part, about 85 %. This screen measures the gain on the recipe search's own grouped
folds (first draw unless ``--seed``), with a probe vote of the search (``--vote``, a candidate name; frozen
features, so it costs seconds once they are cached): in each fold the vote is fitted on a random 65/85 of the
fold's training part (``--reps`` draws, averaged) and on all of it, and both are scored on the same test part,
each member calibrated on the fold's validation part, as the search scores it. The fine-tunes are not run (they
cost minutes per fold) unless ``--hybrid`` names a hybrid of that vote with one training candidate: its
fine-tune is then trained on each fold twice, on the first 65/85 draw and on the whole training part
(``runs/final-fit/<name>/``), and the hybrid is scored both ways as the search scores it. Writes
``bench/results/final-fit-<name>.md``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from bench import sample_data, write_table

METRICS = ("accuracy", "macro_f1", "auroc")
PLAIN_SHARE = 0.65 / 0.85  # a plain run's training part, as a share of a final fit's


def _hybrid_fold(task, d, samples, data: str, hybrid, probe, trained, split: dict, folder: Path, seed: int) -> dict:
    """Train ``trained`` on ``split`` into ``folder``; the fine-tune's and the hybrid's test metrics."""
    from pellucid.core.tune import _run_hybrid, _run_train, _train_fold_logits
    from pellucid.datasets.splits import save_split

    folder.mkdir(parents=True, exist_ok=True)
    sp = folder.parent / f"{folder.name}.split.json"
    save_split(sp, samples, split)
    alone = _run_train(task, trained, data, sp, folder, seed)
    both = _run_hybrid(d, hybrid, probe, split, [_train_fold_logits(task, folder, samples, split)])
    return {"finetune": {m: alone["metrics"].get(m) for m in METRICS},
            "hybrid": {m: both["metrics"].get(m) for m in METRICS}, "seconds": alone["seconds"]}


def screen(task_name: str, vote: str, *, name: str | None = None, data: str | None = None, folds: int = 5,
           seed: int = 0, reps: int = 5, hybrid: str | None = None) -> dict:
    from pellucid.core.tasks import get_task
    from pellucid.core.tune import _Data, _probe_parts, _vote, search_folds
    from pellucid.core.tune_candidates import default_candidates

    t0 = time.time()
    task = get_task(task_name)
    name = name or task.name
    data = data or f"../shared/data/{task.default_data or name}"
    samples, _, splits = search_folds(task, data, folds, seed)  # the search's own folds
    cands = {c.name: c for c in default_candidates(task)}
    if vote not in cands or cands[vote].kind != "probe":
        raise SystemExit(f"{vote!r} is not a probe candidate of {task.name}; known: "
                         + ", ".join(n for n, c in cands.items() if c.kind == "probe"))
    cand = cands[vote]
    hyb = cands.get(hybrid) if hybrid else None
    if hybrid and (hyb is None or hyb.kind != "hybrid" or hyb.parts[0] != vote or len(hyb.parts) != 2):
        raise SystemExit(f"{hybrid!r} is not a hybrid of {vote!r} with one training candidate")
    d = _Data(task, samples, task.recipe, False)
    rows = []
    for s in splits:
        plain, subsets = [], []
        for rep in range(reps):
            rng = np.random.default_rng(100 + rep)
            train = np.asarray(s["train"])
            keep = rng.permutation(len(train))[: int(round(PLAIN_SHARE * len(train)))]
            subsets.append({**s, "train": [int(i) for i in train[keep]]})
            plain.append(_vote(d, _probe_parts(d, cand, subsets[-1])))
        final = _vote(d, _probe_parts(d, cand, s))
        row = {"fold": s["fold"], "n_train_final": len(s["train"]),
               "n_train_plain": int(round(PLAIN_SHARE * len(s["train"]))),
               "plain": {m: float(np.nanmean([p.get(m) if p.get(m) is not None else np.nan for p in plain]))
                         for m in METRICS},
               "final": {m: final.get(m) for m in METRICS}}
        if hyb is not None:  # the fine-tune on the first draw's share and on the whole part
            work = Path("runs") / "final-fit" / name
            trained = cands[hyb.parts[1]]
            row["hybrid"] = {k: _hybrid_fold(task, d, samples, data, hyb, cand, trained, sp,
                                             work / f"{k}_fold_{s['fold']}", seed)
                             for k, sp in (("plain", subsets[0]), ("final", s))}
        rows.append(row)
    return {"task": task.name, "name": name, "vote": vote, "hybrid": hybrid, "folds": folds, "seed": seed,
            "reps": reps, "rows": rows, "seconds": time.time() - t0}


def _summary(res: dict, metric: str, of=lambda r: (r["plain"], r["final"])) -> tuple | None:
    pairs = [(a[metric], b[metric]) for a, b in map(of, res["rows"])
             if a[metric] is not None and b[metric] is not None and not np.isnan(a[metric])]
    if not pairs:
        return None
    p, f = np.array(pairs).T
    diff = f - p
    return p.mean(), p.std(ddof=1), f.mean(), f.std(ddof=1), diff.mean(), diff.std(ddof=1), int((diff > 0).sum())


def render(res: dict) -> str:
    from pellucid.core.tune_report import _cpu_line

    r0 = res["rows"][0]
    lines = [f"# A final fit's extra images: {res['name']}", "",
             f"The probe vote `{res['vote']}` on the recipe search's {res['folds']} grouped folds (seed {res['seed']}), "
             f"fitted on a random 65/85 of each fold's training part ({res['reps']} draws, averaged; "
             f"{r0['n_train_plain']} images in fold 0: what a plain `pellucid train` trains on) and on all of it "
             f"({r0['n_train_final']}: what `pellucid train --final` trains on); the same test part. CPU: {_cpu_line()}. "
             f"{res['seconds']:.0f} s (`python -m bench.final_fit {res['task']} --vote \"{res['vote']}\""
             + (f" --name {res['name']}" if res["name"] != res["task"] else "")
             + (f" --hybrid \"{res['hybrid']}\"" if res.get("hybrid") else "") + "`).", "",
             "| metric | plain share (mean ± sd) | final fit | paired | folds up |", "|---|---|---|---|---|"]
    for m in METRICS:
        s = _summary(res, m)
        if s is not None:
            lines.append(f"| {m} | {s[0]:.3f} ± {s[1]:.3f} | {s[2]:.3f} ± {s[3]:.3f} | {s[4]:+.3f} ± {s[5]:.3f} | "
                         f"{s[6]}/{len(res['rows'])} |")
    if res.get("hybrid"):
        lines += ["", f"With the fine-tune of `{res['hybrid']}` trained on the first draw's share and on the whole "
                      "training part of each fold (the probes as above, the first draw only):", "",
                  "| model | metric | plain share (mean ± sd) | final fit | paired | folds up |", "|---|---|---|---|---|---|"]
        for part in ("finetune", "hybrid"):
            for m in METRICS:
                s = _summary(res, m, lambda r, part=part: (r["hybrid"]["plain"][part], r["hybrid"]["final"][part]))
                if s is not None:
                    lines.append(f"| {'the fine-tune alone' if part == 'finetune' else 'the hybrid'} | {m} | "
                                 f"{s[0]:.3f} ± {s[1]:.3f} | {s[2]:.3f} ± {s[3]:.3f} | {s[4]:+.3f} ± {s[5]:.3f} | "
                                 f"{s[6]}/{len(res['rows'])} |")
        secs = [r["hybrid"][k]["seconds"] for r in res["rows"] for k in ("plain", "final")]
        lines.append(f"\nFine-tune folds: {min(secs):.0f}-{max(secs):.0f} s each.")
    lines += ["", "| fold | " + " | ".join(f"{m} plain → final" for m in METRICS) + " |",
              "|---|" + "---|" * len(METRICS)]
    for r in res["rows"]:
        cells = [f"{r['plain'][m]:.3f} → {r['final'][m]:.3f}" if r["final"][m] is not None else "—" for m in METRICS]
        lines.append(f"| {r['fold']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.final_fit", description=__doc__.split("\n")[0])
    p.add_argument("task")
    p.add_argument("--vote", required=True, help="a probe candidate of the task's recipe search")
    p.add_argument("--name", help="the data set's name under ../shared/data (default: the task's)")
    p.add_argument("--data")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--hybrid", help="a hybrid of --vote with one training candidate: train its fine-tune both ways")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)
    data = sample_data(args.task, args.name, args.data)
    if data is None:
        return 0
    res = screen(args.task, args.vote, name=args.name, data=str(data), seed=args.seed, reps=args.reps,
                 hybrid=args.hybrid)
    write_table(render(res).splitlines(), Path(args.out) / f"final-fit-{res['name']}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
