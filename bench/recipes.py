"""``python -m bench.recipes TASK [--folds K] [--budget MIN] ...`` — the recipe search of
``pellucid tune`` (:mod:`pellucid.core.tune`), writing ``bench/results/recipes-<task>.md``."""
from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    from pellucid.core.tune import run_cli

    p = argparse.ArgumentParser(prog="python -m bench.recipes", description=__doc__)
    p.add_argument("task")
    p.add_argument("--data")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--budget", type=float, default=15.0, help="minutes")
    p.add_argument("--candidates", help="comma-separated candidate names (baselines A and B always run)")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write-recipe", action="store_true")
    p.add_argument("--skip", help="comma-separated candidate names not to run (baselines always run)")
    p.add_argument("--train-folds", type=int, help="run training candidates on the first N folds only")
    p.add_argument("--fine-tune-epochs", type=int, default=6, help="epochs of baseline B and LP-FT")
    p.add_argument("--name", help="results table name (default: the task's)")
    p.add_argument("--resume", action="store_true", help="reuse the fine-tunes' folds of an earlier table")
    p.add_argument("--jobs", type=int, default=1, help="fine-tune folds trained at once, one process each")
    p.add_argument("--refit", help="comma-separated training candidates whose folds train again under --resume "
                   "(the earlier table's scores of them are replaced; hybrids of two fine-tunes need their models)")
    p.add_argument("--rescore", action="store_true",
                   help="recompute summaries and winner of bench/results/recipes-TASK.json (nothing is run)")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = p.parse_args(argv)
    if args.rescore:
        from pathlib import Path

        from pellucid.core.tune import rescore

        r = rescore(Path(args.out) / f"recipes-{args.name or args.task}.json")
        print(f"{args.task}: winner {r['winner']} ({r['rule']})")
        return 0
    return run_cli(args)


if __name__ == "__main__":
    sys.exit(main())
