"""``python -m bench.recipes_repeated TASK [--runs bench/results,bench/results/seed1]`` — repeated
cross-validation: the recipe searches of one task on different folds (``python -m bench.recipes TASK
--seed 1 --out bench/results/seed1``) pooled into one table, and the default chosen on the pooled
folds by the search's own rule.

One grouped 5-fold CV of 93 photos (mpox) or of a few recordings (sonar) moves by more than the
differences between the best candidates; a second draw of the folds halves the rule's standard error
(sd / √10) and shows whether a margin holds on other folds. Every candidate that ran on every fold of
every search is pooled: its folds are keyed ``s<seed>:<fold>``, so the paired margins over baselines A
and B pair each fold with the same fold of the baseline, and :func:`pellucid.core.tune._summarise`
applies the one-standard-error rule with k = the pooled fold count. Writes
``bench/results/repeated-<task>.md`` and ``.json`` (the same schema as a search's table, so
``bench.recipes_summary`` reads it in place of the single search)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

OUT = Path("bench/results")


def pool(task_name: str, runs: list[Path], name: str | None = None) -> dict:
    """The pooled result of the searches ``<run>/recipes-<name>.json`` (one per fold seed)."""
    from pellucid.core.tasks import get_task
    from pellucid.core.tune import _mean_sd, _summarise

    name = name or task_name
    tables = []
    for run in runs:
        path = Path(run) / f"recipes-{name}.json"
        if not path.exists():
            raise SystemExit(f"{path}: no search there; run python -m bench.recipes {task_name} --seed S --out {run}")
        tables.append(json.loads(path.read_text()))
    seeds = [t["seed"] for t in tables]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"the searches share a fold seed ({seeds}): pooling the same folds twice proves nothing")
    if len({t["n"] for t in tables}) != 1:
        raise SystemExit(f"the searches scored different data (n = {[t['n'] for t in tables]})")
    per = [{r["name"]: r for r in t["candidates"] if r.get("n_folds") == t["k"]} for t in tables]
    common = [n for n in per[0] if all(n in p for p in per[1:])]
    rows = []
    for cand in common:
        first = per[0][cand]
        folds = {f"s{t['seed']}:{f}": v for t, p in zip(tables, per) for f, v in p[cand]["folds"].items()}
        row = {k: first[k] for k in ("name", "kind", "role", "about", "recipe")}
        by_seed = {str(t["seed"]): {m: dict(zip(("mean", "sd"), _mean_sd(
            [f["metrics"].get(m) for f in p[cand]["folds"].values()]))) for m in t["metrics"]}
            for t, p in zip(tables, per)}
        row.update({"folds": folds, "official": None, "stopped": None, "by_seed": by_seed})
        rows.append(row)
    k = sum(t["k"] for t in tables)
    task = get_task(task_name)
    result = _summarise(task, rows, k, seeds[0], tables[0]["data"], [None] * tables[0]["n"],
                        sum(t["seconds"] for t in tables), sum(t["embed_seconds"] for t in tables), False)
    result.update({"name": name, "seeds": seeds, "runs": [str(r) for r in runs],
                   "cpu": "; ".join(dict.fromkeys(t.get("cpu", "") for t in tables))})
    return result


def _fmt(entry: dict | None, signed: bool = False) -> str:
    if not entry or entry.get("mean") is None:
        return "—"
    m = f"{entry['mean']:+.3f}" if signed else f"{entry['mean']:.3f}"
    return m + (f" ± {entry['sd']:.3f}" if entry.get("sd") is not None else "")


def render(result: dict) -> str:
    p, s = result["metrics"]
    seeds = result["seeds"]
    lines = [f"# Repeated cross-validation: {result['name']}", "",
             f"{len(seeds)} grouped {result['k'] // len(seeds)}-fold cross-validations of the dev data "
             f"(fold seeds {', '.join(map(str, seeds))}; n = {result['n']}), pooled: {result['k']} folds per "
             f"candidate. Only candidates that ran on every fold of every search. Paired margins pair each fold "
             f"with the same fold of the baseline. Searches: {', '.join(result['runs'])}. CPU: {result['cpu']}.", "",
             f"Command: `python -m bench.recipes_repeated {result['task']}"
             + (f" --name {result['name']}" if result["name"] != result["task"] else "") + "`", "",
             f"| candidate | {p} (mean ± sd, {result['k']} folds) | "
             + " | ".join(f"{p}, seed {x}" for x in seeds) + f" | {s} | Δ{p} vs A | Δ{p} vs B |",
             "|---|---|" + "---|" * len(seeds) + "---|---|---|"]
    for r in result["candidates"]:
        tag = f" [{r['role']}]" if r.get("role") in ("A", "B") else ""
        win = " **(winner)**" if r["name"] == result["winner"] else ""
        lines.append(f"| `{r['name']}`{tag}{win} | {_fmt(r['summary'][p])} | "
                     + " | ".join(_fmt(r["by_seed"][str(x)][p]) for x in seeds)
                     + f" | {_fmt(r['summary'][s])} | {'—' if r.get('role') == 'A' else _fmt(r.get('vs_A'), True)} | "
                     f"{'—' if r.get('role') == 'B' else _fmt(r.get('vs_B'), True)} |")
    lines += ["", f"Winner: `{result['winner']}` — {result['rule']}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("task")
    ap.add_argument("--name", help="the searches' table name (default the task's; tb_lungs for tb on tb_lungs)")
    ap.add_argument("--runs", default="bench/results,bench/results/seed1",
                    help="comma-separated folders holding recipes-<name>.json, one per fold seed")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    result = pool(args.task, [Path(r) for r in args.runs.split(",") if r.strip()], args.name)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"repeated-{result['name']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    stem.with_suffix(".md").write_text(render(result))
    print(render(result))
    print(f"written: {stem.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
