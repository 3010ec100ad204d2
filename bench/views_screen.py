"""``python -m bench.views_screen TASK --candidate NAME [--views none,flip,dihedral]`` — does a fine-tune predict
better when it averages its logits over turned and mirrored views of each image (``tta`` in a recipe)?

The screen takes a finished recipe search's fold models of one training candidate
(``runs/tune/<name>/<candidate>/fold_k``, as ``python -m bench.recipes`` leaves them), reads every fold's
validation and test images once per view set, and scores each exactly as the search scores a candidate
(calibrated on validation, the task's threshold policy, scored on the fold's test part). Nothing is trained;
each view set's logits are kept beside the fold's model (``fold_logits_<views>.pt``). Writes
``bench/results/views-<name>.md``; paired differences are against one view, fold by fold.
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def screen(task_name: str, candidate: str, views: list[str], *, name: str | None = None, data: str | None = None,
           folds: int = 5, seed: int = 0, work: str | None = None) -> dict:
    from pellucid.core.tasks import get_task
    from pellucid.core.tune import _Data, _train_fold_logits, _vote, search_folds

    task = get_task(task_name)
    name = name or task.name
    data = data or f"../shared/data/{name}"
    samples, _, splits = search_folds(task, data, folds, seed)  # the search's own folds
    root = Path(work or Path("runs") / "tune" / (name if seed == 0 else f"{name}-seed{seed}"))
    data_obj = _Data(task, samples, task.recipe, progress=False)
    views = ["none"] + [v for v in views if v != "none"]
    t0 = time.time()
    rows: dict[str, list[dict]] = {}
    done: list[int] = []
    for s in splits:
        folder = root / candidate.replace(":", "_") / f"fold_{s['fold']}"
        if not (folder / "card.json").exists():
            log.warning("%s: no fold model (python -m bench.recipes %s --candidates %s trains it); fold left out",
                        folder, task_name, candidate)
            continue
        done.append(int(s["fold"]))
        for v in views:
            rows.setdefault(v, []).append(_vote(data_obj, [_train_fold_logits(task, folder, samples, s, tta=v)]))
        log.info("fold %s done (%.0f s)", s["fold"], time.time() - t0)
    if not done:
        raise SystemExit(f"{root / candidate.replace(':', '_')}: no fold models; run the search first "
                         f"(python -m bench.recipes {task_name} --candidates {candidate})")
    return {"task": task_name, "name": name, "candidate": candidate, "views": views, "folds": folds, "seed": seed,
            "scored_folds": done,
            "metrics": list(task.metrics[:2]), "rows": rows, "seconds": round(time.time() - t0, 1)}


_ABOUT = {"none": "one view (the image as it is)", "flip": "2 views: the image and its mirror image",
          "dihedral": "8 views: the 4 quarter turns of the image and of its mirror image"}


def render(res: dict) -> str:
    from pellucid.core.tune_report import _cpu_line

    m1, m2 = res["metrics"]
    seed_arg = f" --seed {res['seed']}" if res["seed"] else ""
    lines = [f"# Test-time views of a fine-tune: {res['name']}", "",
             f"`{res['candidate']}`'s fold models, their logits averaged over each view set (`tta` in a recipe); "
             f"{res['folds']}-fold grouped CV (seed {res['seed']}), the recipe search's folds and fold models "
             f"(folds scored: {', '.join(map(str, res.get('scored_folds', range(res['folds']))))}). Paired "
             f"differences are against one view, fold by fold; up / down count folds. CPU: {_cpu_line()}. Screen "
             f"took {res['seconds']:.0f} s (`python -m bench.views_screen {res['task']}{seed_arg} --candidate "
             f"{res['candidate']} --views {','.join(res['views'])}`).", "",
             f"| views | {m1} (mean ± sd) | {m2} | Δ{m1} vs one view | Δ{m2} | up / down | per fold ({m1}) |",
             "|---|---|---|---|---|---|---|"]
    base = {m: np.array([f[m] for f in res["rows"]["none"]]) for m in (m1, m2)}
    for v, folds in res["rows"].items():
        a, b = (np.array([f[m] for f in folds]) for m in (m1, m2))
        d1, d2 = a - base[m1], b - base[m2]
        same = v == "none"
        lines.append(f"| {_ABOUT.get(v, v)} | {a.mean():.3f} ± {a.std(ddof=1):.3f} | {b.mean():.3f} ± {b.std(ddof=1):.3f} "
                     f"| {'—' if same else f'{d1.mean():+.3f} ± {d1.std(ddof=1):.3f}'} "
                     f"| {'—' if same else f'{d2.mean():+.3f} ± {d2.std(ddof=1):.3f}'} "
                     f"| {'—' if same else f'{int((d1 > 1e-9).sum())} / {int((d1 < -1e-9).sum())}'} "
                     f"| {', '.join(f'{x:.3f}' for x in a)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from bench.testsize_screen import fold_screen_parser, write_screen

    p = fold_screen_parser("python -m bench.views_screen", __doc__, "current")
    p.add_argument("--views", default="none,flip,dihedral", help="comma-separated view sets")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = p.parse_args(argv)
    res = screen(args.task, args.candidate, args.views.split(","), name=args.name, data=args.data, seed=args.seed,
                 work=args.work)
    write_screen(res, "views", args.out, args.seed, render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
