"""``python -m bench.recipes_summary`` — one row per app from ``bench/results/recipes-<task>.json`` (or,
where the searches were repeated on other folds, ``repeated-<task>.json``, ``bench.recipes_repeated``):
the winner's k-fold mean ± sd of the two headline metrics and its paired margin over both baselines
(Markdown, for the README and docs/recipes.md)."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _fmt(entry: dict | None, signed: bool = False) -> str:
    if not entry or entry.get("mean") is None:
        return "—"
    m = f"{entry['mean']:+.3f}" if signed else f"{entry['mean']:.3f}"
    sd = f" ± {entry['sd']:.3f}" if entry.get("sd") is not None else ""
    n = (f" ({entry['n']} fold{'s' if entry['n'] != 1 else ''})" if signed and entry.get("n") is not None else "")
    return m + sd + n


def _single(pattern: str | None, task: str, metric: str) -> str:
    """The headline metric of one trained model folder of the default recipe (its own test split)."""
    if not pattern:
        return ""
    path = Path(pattern.format(task=task)) / "metrics.json"
    if not path.exists():
        return " not run |"
    m = json.loads(path.read_text())
    e = m["metrics"].get(metric) or {}
    ci = f" [{e['low']:.3f}, {e['high']:.3f}]" if e.get("low") is not None else ""
    return f" {e.get('value', float('nan')):.3f}{ci} (n={m['n']}) |"


def _adopted(recipe: dict, won: dict) -> bool:
    """Whether a task's ``[recipe]`` trains the search's winner: the same strategy, and the same
    members (backbone, size, strategy) for an ensemble."""
    def members(r):
        return [(m.get("backbone"), m.get("image_size"), m.get("finetune", r.get("finetune")))
                for m in r.get("members") or []]
    return recipe.get("finetune") == won.get("finetune") and members(recipe) == members(won)


def rows(folder: Path = Path("bench/results"), single: str | None = None) -> list[str]:
    out = ["| app | default recipe (k-fold winner) | headline, mean ± sd | second metric | Δ vs A (probe) | Δ vs B (fine-tune) |"
           + (" one split, same recipe |" if single else ""),
           "|---|---|---|---|---|---|" + ("---|" if single else "")]
    for path in sorted(folder.glob("recipes-*.json")):
        r = json.loads(path.read_text())
        repeated = folder / f"repeated-{r.get('name') or r['task']}.json"
        if repeated.exists():  # searches on more than one draw of the folds, pooled (bench.recipes_repeated)
            r = json.loads(repeated.read_text())
        win = next((c for c in r["candidates"] if c["name"] == r["winner"]), None)
        if win is None:
            continue
        p, s = r["metrics"]
        from pellucid.core.tasks import get_task

        label = r.get("name") or r["task"]
        if label == r["task"] and not _adopted(get_task(r["task"]).recipe, win["recipe"]):
            continue  # the app did not adopt the search's winner (nuclei): its row is written by hand
        name = f"`{win['name']}`"
        out.append(f"| {label} | {name} | {p} {_fmt(win['summary'][p])} | {s} {_fmt(win['summary'][s])} | "
                   f"{_fmt(win.get('vs_A'), True) if win['role'] != 'A' else '(is A)'} | "
                   f"{_fmt(win.get('vs_B'), True) if win['role'] != 'B' else '(is B)'} |"
                   + _single(single, label, p))
    return out


if __name__ == "__main__":
    # python -m bench.recipes_summary [RESULTS_DIR] [MODEL_FOLDER_PATTERN, e.g. runs/default-{task}]
    print("\n".join(rows(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("bench/results"),
                          sys.argv[2] if len(sys.argv) > 2 else None)))
