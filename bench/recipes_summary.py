"""``python -m bench.recipes_summary`` — one row per app from ``bench/results/recipes-<task>.json``:
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
    n = f" ({entry['n']} folds)" if signed and entry.get("n") is not None else ""
    return m + sd + n


def rows(folder: Path = Path("bench/results")) -> list[str]:
    out = ["| app | default recipe (k-fold winner) | headline, mean ± sd | second metric | Δ vs A (probe) | Δ vs B (fine-tune) |",
           "|---|---|---|---|---|---|"]
    for path in sorted(folder.glob("recipes-*.json")):
        r = json.loads(path.read_text())
        win = next((c for c in r["candidates"] if c["name"] == r["winner"]), None)
        if win is None:
            continue
        p, s = r["metrics"]
        out.append(f"| {r['task']} | `{win['name']}` | {p} {_fmt(win['summary'][p])} | {s} {_fmt(win['summary'][s])} | "
                   f"{_fmt(win.get('vs_A'), True) if win['role'] != 'A' else '(is A)'} | "
                   f"{_fmt(win.get('vs_B'), True) if win['role'] != 'B' else '(is B)'} |")
    return out


if __name__ == "__main__":
    print("\n".join(rows(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("bench/results"))))
