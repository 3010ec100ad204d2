"""Run the benchmarks: ``python -m bench`` runs every ``bench/bench_*.py``; names select some.

Each benchmark module has a ``main()`` that measures against the plain model on this machine in the
same run, prints a markdown table and writes it under ``bench/results/``.
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    os.environ.setdefault("PELLUCID_OFFLINE", "1")
    here = Path(__file__).parent
    names = sorted(p.stem for p in here.glob("bench_*.py"))
    wanted = [n if n.startswith("bench_") else f"bench_{n}" for n in argv] or names
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        print(f"unknown benchmark(s) {unknown}; available: {', '.join(names)}", file=sys.stderr)
        return 2
    failed = []
    for name in wanted:
        t = time.time()
        print(f"== {name}")
        try:
            fn = importlib.import_module(f"bench.{name}").main
            fn([]) if inspect.signature(fn).parameters else fn()
        except SystemExit as stop:  # a benchmark that needs arguments says so through argparse
            if stop.code not in (0, None):
                failed.append(f"{name}: needs arguments (python -m bench.{name} --help)")
        except Exception as err:  # report and go on with the other benchmarks
            failed.append(f"{name}: {type(err).__name__}: {err}")
        print(f"== {name} done in {time.time() - t:.0f} s\n")
    for f in failed:
        print(f"FAILED {f}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
