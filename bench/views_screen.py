"""``python -m bench.views_screen TASK --candidate NAME [--views none,flip,dihedral] [--vote PROBES]`` — does a
fine-tune predict better when it averages its logits over turned and mirrored views of each image (``tta`` in a
recipe)?

The screen takes a finished recipe search's fold models of one training candidate
(``runs/tune/<name>/<candidate>/fold_k``, as ``python -m bench.recipes`` leaves them), reads every fold's
validation and test images once per view set, and scores each exactly as the search scores a candidate
(calibrated on validation, the task's threshold policy, scored on the fold's test part). Nothing is trained;
each view set's logits are kept beside the fold's model (``fold_logits_<views>.pt``). With ``--vote``, the
fine-tune in each view set is also scored in its hybrid with that probe vote (weighted ``--weight``), as the search
scores a hybrid, and with the vote's ``+flip`` twin (each probe fitted on the images and their mirror images,
predicting on both: ``probe_flip = true`` with ``tta = "flip"`` in a recipe). Writes
``bench/results/views-<name>.md``; paired differences are fold by fold, the fine-tune's rows against one view, the
hybrids' against the hybrid in one view with the plain vote.
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def _hybrid_label(vote: str, weight: float, views: str) -> str:
    return f"`{vote}` + {weight:g}x fine-tune, {_ABOUT[views]}"


def screen(task_name: str, candidate: str, views: list[str], *, name: str | None = None, data: str | None = None,
           folds: int = 5, seed: int = 0, work: str | None = None, vote: str | None = None,
           weight: float = 3.0) -> dict:
    from pellucid.core.tasks import get_task
    from pellucid.core.tune import _Data, _probe_parts, _train_fold_logits, _vote, search_folds
    from pellucid.core.tune_candidates import default_candidates

    task = get_task(task_name)
    name = name or task.name
    data = data or f"../shared/data/{name}"
    samples, _, splits = search_folds(task, data, folds, seed)  # the search's own folds
    root = Path(work or Path("runs") / "tune" / (name if seed == 0 else f"{name}-seed{seed}"))
    data_obj = _Data(task, samples, task.recipe, progress=False)
    views = ["none"] + [v for v in views if v != "none"]
    probes = []
    if vote:
        known = {c.name: c for c in default_candidates(task)}
        if vote not in known or known[vote].kind != "probe":
            raise SystemExit(f"--vote {vote!r} is not a probe candidate of {task_name}'s search")
        probes = [known[vote]] + ([known[vote + "+flip"]] if vote + "+flip" in known else [])
    base = {v: "none" for v in views}
    for p in probes:
        base.update({_hybrid_label(p.name, weight, v): _hybrid_label(vote, weight, "none") for v in views})
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
        per = {v: _train_fold_logits(task, folder, samples, s, tta=v) for v in views}
        for v in views:
            rows.setdefault(v, []).append(_vote(data_obj, [per[v]]))
        for p in probes:
            parts = _probe_parts(data_obj, p, s)
            for v in views:
                rows.setdefault(_hybrid_label(p.name, weight, v), []).append(
                    _vote(data_obj, parts + [per[v]], [1.0] * len(parts) + [weight]))
        log.info("fold %s done (%.0f s)", s["fold"], time.time() - t0)
    if not done:
        raise SystemExit(f"{root / candidate.replace(':', '_')}: no fold models; run the search first "
                         f"(python -m bench.recipes {task_name} --candidates {candidate})")
    return {"task": task_name, "name": name, "candidate": candidate, "views": views, "folds": folds, "seed": seed,
            "scored_folds": done,
            "metrics": list(task.metrics[:2]), "rows": rows, "base": base, "vote": vote, "weight": weight,
            "seconds": round(time.time() - t0, 1)}


_ABOUT = {"none": "one view (the image as it is)", "flip": "2 views: the image and its mirror image",
          "dihedral": "8 views: the 4 quarter turns of the image and of its mirror image"}


def render(res: dict) -> str:
    from pellucid.core.tune_report import _cpu_line

    m1, m2 = res["metrics"]
    seed_arg = f" --seed {res['seed']}" if res["seed"] else ""
    vote_arg = f" --vote {res['vote']} --weight {res['weight']:g}" if res.get("vote") else ""
    base_text = ("one view (the fine-tune's rows) and the hybrid in one view with the plain vote (the hybrids' rows; "
                 "a `+flip` vote's probes are fitted on the images and their mirror images and predict on both)"
                 if res.get("vote") else "one view")
    lines = [f"# Test-time views of a fine-tune: {res['name']}", "",
             f"`{res['candidate']}`'s fold models, their logits averaged over each view set (`tta` in a recipe); "
             f"{res['folds']}-fold grouped CV (seed {res['seed']}), the recipe search's folds and fold models "
             f"(folds scored: {', '.join(map(str, res.get('scored_folds', range(res['folds']))))}). Paired "
             f"differences are fold by fold against {base_text}; up / down count folds. CPU: {_cpu_line()}. Screen "
             f"took {res['seconds']:.0f} s (`python -m bench.views_screen {res['task']}{seed_arg} --candidate "
             f"{res['candidate']} --views {','.join(res['views'])}{vote_arg}`).", "",
             f"| views | {m1} (mean ± sd) | {m2} | Δ{m1} vs its base | Δ{m2} | up / down | per fold ({m1}) |",
             "|---|---|---|---|---|---|---|"]
    bases = res.get("base") or {}
    for v, folds in res["rows"].items():
        ref = bases.get(v, "none")
        a, b = (np.array([f[m] for f in folds]) for m in (m1, m2))
        d1, d2 = (x - np.array([f[m] for f in res["rows"][ref]]) for x, m in ((a, m1), (b, m2)))
        same = v == ref
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
    p.add_argument("--vote", help="a probe candidate: also score the fine-tune's hybrid with this vote (and its "
                                  "+flip twin)")
    p.add_argument("--weight", type=float, default=3.0, help="the fine-tune's weight in the hybrid")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = p.parse_args(argv)
    res = screen(args.task, args.candidate, args.views.split(","), name=args.name, data=args.data, seed=args.seed,
                 work=args.work, vote=args.vote, weight=args.weight)
    write_screen(res, "views", args.out, args.seed, render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
