"""``python -m bench.input_screen TASK --lever clahe|lung-mask|lung-crop|lung-prior`` — does changing what the
frozen probes see help an app's vote?

Input levers for chest X-rays, screened on the probes, where they are cheap (frozen features, seconds per fold),
before any fine-tune is spent on them:

- ``clahe``: contrast-limited adaptive histogram equalisation (OpenCV's CLAHE, ``--clip``, ``--tiles``) of every
  prepared image — its luminance for colour images. Chest X-rays from different hospitals differ in contrast,
  and equalising is a common step in tuberculosis papers.
- ``lung-mask`` / ``lung-crop``: the lungs alone, as ``preprocess = "lung-mask" | "lung-crop"`` gives them
  (:func:`pellucid.core.segmentation.apply_lung_mask`), from the data set's own mask files (the manifest's
  ``mask`` column, as in ``tb_lungs``). Drawn masks are what a trained segmenter aims at, so this is the most
  masking could give the probes, without training a segmenter per fold.
- ``lung-prior``: one fixed window for every image, where the drawn masks most often are (their mean at 256 px,
  kept where it is at least 0.3: about a third of the image) — lungs without a segmenter, for aligned X-rays.

Each probe of the vote (and its first member alone) is fitted on the search's own grouped folds twice —
on the images as they are and with the lever — and the table pairs them fold by fold. The vote of both sets
(twice the members) is paired with the plain vote too, and ``--control VOTE`` adds as many plain members, so a
gain from the lever can be told from a gain from more members. ``--fine-tunes A,B`` adds the search's fold
models of those fine-tunes to the plain, the both and the control votes: the hybrid with and without the lever.
The lever's features are cached apart (``<cache>-<lever>``), never beside the plain ones. The decoding step is
swapped only inside this process, for the screen's duration. Writes
``bench/results/input-<lever>-<name>[-seed<k>].md`` / ``.json``.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

log = logging.getLogger(__name__)

LEVERS = ("clahe", "lung-mask", "lung-crop", "lung-prior")


def clahe(u8: np.ndarray, clip: float = 2.0, tiles: int = 8) -> np.ndarray:
    """CLAHE of a prepared ``(H, W, 3)`` uint8 image: of its gray level when the three planes are equal (a
    gray image stays gray), else of the L plane of CIELAB (colour kept)."""
    op = cv2.createCLAHE(clipLimit=clip, tileGridSize=(tiles, tiles))
    if np.array_equal(u8[..., 0], u8[..., 1]) and np.array_equal(u8[..., 0], u8[..., 2]):
        return np.ascontiguousarray(np.repeat(op.apply(np.ascontiguousarray(u8[..., 0]))[..., None], 3, axis=2))
    lab = cv2.cvtColor(u8, cv2.COLOR_RGB2LAB)
    lab[..., 0] = op.apply(np.ascontiguousarray(lab[..., 0]))
    return np.ascontiguousarray(cv2.cvtColor(lab, cv2.COLOR_LAB2RGB))


def manifest_masks(data: str | Path) -> dict[str, Path]:
    """Image file → its mask file, from the ``mask`` column of ``data``'s manifest (resolved paths)."""
    from pellucid.datasets.samples import read_manifest

    root = Path(data).resolve()
    rows = read_manifest(root / "manifest.csv", ("path",), SystemExit)
    if not rows or "mask" not in rows[0]:
        raise SystemExit(f"{root / 'manifest.csv'} has no 'mask' column: the lung levers need the data set's "
                         "own mask files (as tb_lungs has)")
    return {str((root / r["path"]).resolve()): root / r["mask"] for r in rows}


def read_mask(file: str | Path, image: str | Path = "") -> np.ndarray:
    """A drawn mask as 0/255 uint8 (the package's mask reader); an unreadable file is one line naming it."""
    from pellucid.core.segmentation import _read_mask
    from pellucid.datasets.readers import ImageReadError

    try:
        return _read_mask(file).astype(np.uint8) * 255
    except ImageReadError:
        raise SystemExit(f"{image or file}: {file} is not a readable mask image; "
                         "fix the manifest's mask column") from None


def lung_prior(mask_files, side: int = 256, level: float = 0.3) -> np.ndarray:
    """Where the masks most often are: their mean at ``side`` px, 1 where it is at least ``level``, else 0."""
    total, n = np.zeros((side, side), np.float64), 0
    for f in mask_files:
        total += cv2.resize(read_mask(f), (side, side), interpolation=cv2.INTER_AREA) / 255.0
        n += 1
    return (total / max(n, 1) >= level).astype(np.uint8)


def lever_decoder(lever: str, data: str | Path, clip: float = 2.0, tiles: int = 8):
    """A replacement for :func:`pellucid.datasets.torchdata.load_prepared` that applies ``lever``."""
    from pellucid.core.segmentation import apply_lung_mask
    from pellucid.datasets import torchdata
    from pellucid.datasets.readers import read_image

    plain = torchdata.load_prepared
    if lever == "clahe":
        return lambda path, size, channels=None, preprocess=None: clahe(plain(path, size, channels, preprocess),
                                                                        clip, tiles)
    if lever not in LEVERS:
        raise SystemExit(f"unknown lever {lever!r} (available: {', '.join(LEVERS)})")
    masks = manifest_masks(data)
    mode = lever.split("-")[1]
    if lever == "lung-prior":
        window = lung_prior(masks.values())

        def windowed(path, size, channels=None, preprocess=None):
            image = read_image(path)
            h, w = image.array.shape[:2]
            win = cv2.resize(window, (w, h), interpolation=cv2.INTER_NEAREST)
            return torchdata.prepare(apply_lung_mask(image, win > 0, "mask"), size, channels)

        return windowed

    def load(path, size, channels=None, preprocess=None):
        image = read_image(path)
        file = masks.get(str(Path(path).resolve()))
        if file is None:
            raise SystemExit(f"{path}: no mask row in the manifest; fix the manifest's mask column")
        mask = read_mask(file, path)
        h, w = image.array.shape[:2]
        if mask.shape != (h, w):
            mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
        return torchdata.prepare(apply_lung_mask(image, mask > 127, mode), size, channels)

    return load


@contextlib.contextmanager
def decoding(loader, cache: str):
    """Within the block, images decode through ``loader`` and features are cached under ``cache``."""
    from pellucid.datasets import torchdata

    saved, saved_cache = torchdata.load_prepared, os.environ.get("PELLUCID_CACHE")
    torchdata.load_prepared = loader
    os.environ["PELLUCID_CACHE"] = cache
    try:
        yield
    finally:
        torchdata.load_prepared = saved
        if saved_cache is None:
            os.environ.pop("PELLUCID_CACHE", None)
        else:
            os.environ["PELLUCID_CACHE"] = saved_cache


def screen(task_name: str, lever: str, vote: str | None = None, *, name: str | None = None, data: str | None = None,
           seed: int = 0, folds: int = 5, clip: float = 2.0, tiles: int = 8, control: str | None = None,
           fine_tunes: Sequence[str] = (), work: str | None = None) -> dict:
    """Rows ``"<input>|<probe>"`` of per-fold metrics; ``both`` is the vote of the plain probes and the lever's
    (twice the members), ``control`` the vote of the plain probes and ``control``'s (as many members, all plain).
    ``fine_tunes``: training candidates of the search whose fold models (``runs/tune/<name>[-seed<k>]/<cand>/
    fold_k``, as ``python -m bench.recipes`` leaves them) join the plain vote (``hybrid``) and the ``both`` vote
    (``hybrid+lever``) and the control vote (``hybrid+control``), weight 1 each, on the folds that have them all."""
    from pellucid.core.features import cache_root
    from pellucid.core.tasks import get_task
    from pellucid.core.tune import _Data, _probe_parts, _train_fold_logits, _vote, search_folds
    from pellucid.core.tune_candidates import _probe, default_candidates

    task = get_task(task_name)
    name = name or task.name
    data = data or f"../shared/data/{task.default_data if name == task.name else name}"
    samples, _, splits = search_folds(task, data, folds, seed)
    probes = {c.name: c for c in default_candidates(task) if c.kind == "probe"}
    vote = vote or next(c.name for c in probes.values() if len(c.members) == 3 and not c.flip and not c.layers)
    if vote not in probes:
        raise SystemExit(f"--vote {vote!r} is not a probe candidate of {task_name}'s search")
    cand = probes[vote]
    if control and control not in probes:
        raise SystemExit(f"--control {control!r} is not a probe candidate of {task_name}'s search")
    single = _probe(cand.members[:1], flip=cand.flip, layers=cand.layers)
    plain_cache = str(cache_root().parent)
    lever_cache = f"{plain_cache}-{lever}" + (f"-{clip:g}-{tiles}" if lever == "clahe" else "")
    loaders = {"plain": (None, plain_cache), lever: (lever_decoder(lever, data, clip, tiles), lever_cache)}
    t0 = time.time()
    rows: dict[str, list[dict]] = {}
    kept: dict[str, list] = {}
    controls: list = []
    for tag, (loader, cache) in loaders.items():
        from pellucid.datasets import torchdata
        with decoding(loader or torchdata.load_prepared, cache):
            d = _Data(task, samples, task.recipe, progress=False)
            for s in splits:
                parts = _probe_parts(d, cand, s)
                kept.setdefault(tag, []).append(parts)
                rows.setdefault(f"{tag}|{single.name}", []).append(_vote(d, parts[:1]))
                rows.setdefault(f"{tag}|{vote}", []).append(_vote(d, parts))
                if control and tag == "plain":
                    controls.append(_probe_parts(d, probes[control], s))
                    rows.setdefault(f"control|{vote} + {control}", []).append(_vote(d, parts + controls[-1]))
        log.info("%s done (%.0f s)", tag, time.time() - t0)
    for plain, other in zip(kept["plain"], kept[lever]):  # the same folds, same sample indices
        rows.setdefault(f"both|{vote}", []).append(_vote(d, plain + other))
    root = Path(work or Path("runs") / "tune" / (name if seed == 0 else f"{name}-seed{seed}"))
    scored = []
    for k, (s, plain, other) in enumerate(zip(splits, kept["plain"], kept[lever]) if fine_tunes else ()):
        folders = [root / c.replace(":", "_") / f"fold_{s['fold']}" for c in fine_tunes]
        if not all((f / "card.json").exists() for f in folders):
            log.warning("fold %s: not every fine-tune has a fold model under %s (python -m bench.recipes %s "
                        "--candidates ... trains them); fold left out of the hybrid rows", s["fold"], root, task_name)
            continue
        fts = [_train_fold_logits(task, f, samples, s) for f in folders]
        scored.append(int(s["fold"]))
        rows.setdefault(f"hybrid|{vote}", []).append(_vote(d, plain + fts))
        rows.setdefault(f"hybrid+lever|{vote}", []).append(_vote(d, plain + other + fts))
        if controls:
            rows.setdefault(f"hybrid+control|{vote} + {control}", []).append(_vote(d, plain + controls[k] + fts))
    return {"task": task_name, "name": name, "lever": lever, "vote": vote, "control": control,
            "fine_tunes": list(fine_tunes), "hybrid_folds": scored, "folds": folds, "seed": seed,
            "clip": clip, "tiles": tiles, "metrics": list(task.metrics[:2]), "rows": rows,
            "seconds": round(time.time() - t0, 1)}


_ABOUT = {"clahe": "CLAHE (clip {clip:g}, {tiles} × {tiles} tiles)", "lung-mask": "the lungs alone (drawn masks, "
          "outside zeroed)", "lung-crop": "the lungs' box alone (drawn masks, box + 5 % margin, outside zeroed)",
          "lung-prior": "one fixed lung window for every image (the drawn masks' mean ≥ 0.3, outside zeroed)"}


def render(res: dict) -> str:
    from pellucid.core.tune_report import _cpu_line

    m1, m2 = res["metrics"]
    lever = res["lever"]
    about = _ABOUT[lever].format(clip=res["clip"], tiles=res["tiles"])
    args = f" --seed {res['seed']}" if res["seed"] else ""
    args += f" --clip {res['clip']:g} --tiles {res['tiles']}" if lever == "clahe" else ""
    data = f" --name {res['name']}" if res["name"] != res["task"] else ""
    args += f" --control {res['control']}" if res.get("control") else ""
    fts = " + ".join(f"`{c}`" for c in res.get("fine_tunes") or [])
    args += f" --fine-tunes {','.join(res['fine_tunes'])}" if res.get("fine_tunes") else ""
    inputs = {"plain": "as they are", lever: lever, "both": f"both: as they are and {lever} (twice the members)",
              "control": "as they are, with the control's probes (as many members)",
              "hybrid": f"as they are, with the fine-tunes {fts} (weight 1 each; folds "
                        f"{', '.join(map(str, res.get('hybrid_folds') or []))})",
              "hybrid+lever": f"both, with the fine-tunes {fts} (against the plain hybrid)",
              "hybrid+control": f"as they are, with the control's probes and the fine-tunes {fts} (against the "
                                "plain hybrid)"}
    lines = [f"# Input lever on the probes: {res['name']}, {lever}", "",
             f"Each probe fitted on the images as they are and with {about}; {res['folds']}-fold grouped CV "
             f"(seed {res['seed']}), the recipe search's folds. Paired differences are fold by fold; up / down "
             f"count folds. CPU: {_cpu_line()}. Screen took {res['seconds']:.0f} s (`python -m bench.input_screen "
             f"{res['task']}{data} --lever {lever} --vote {res['vote']}{args}`).", "",
             f"| probe | input | {m1} (mean ± sd) | {m2} | Δ{m1} | Δ{m2} | up / down |",
             "|---|---|---|---|---|---|---|"]
    for key, folds in res["rows"].items():
        tag, cand = key.split("|", 1)
        a, b = (np.array([f[m] for f in folds]) for m in (m1, m2))
        cells = "| — | — | — |"
        if tag not in ("plain", "hybrid"):
            ref = {"hybrid+lever": "hybrid", "hybrid+control": "hybrid"}.get(tag, "plain")
            base = res["rows"][f"{ref}|{res['vote'] if tag != lever else cand}"]
            d1, d2 = (x - np.array([f[m] for f in base]) for x, m in ((a, m1), (b, m2)))
            cells = (f"| {d1.mean():+.3f} ± {d1.std(ddof=1):.3f} | {d2.mean():+.3f} ± {d2.std(ddof=1):.3f} "
                     f"| {int((d1 > 1e-9).sum())} / {int((d1 < -1e-9).sum())} |")
        lines.append(f"| `{cand}` | {inputs[tag]} | {a.mean():.3f} ± {a.std(ddof=1):.3f} "
                     f"| {b.mean():.3f} ± {b.std(ddof=1):.3f} {cells}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from bench.testsize_screen import write_screen

    p = argparse.ArgumentParser(prog="python -m bench.input_screen", description=__doc__.split("\n")[0])
    p.add_argument("task")
    p.add_argument("--lever", required=True, choices=LEVERS)
    p.add_argument("--vote", help="the probe candidate to screen (default: the search's vote of three)")
    p.add_argument("--name", help="data set / table name (default: the task's)")
    p.add_argument("--data")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clip", type=float, default=2.0, help="CLAHE's clip limit")
    p.add_argument("--tiles", type=int, default=8, help="CLAHE's tiles per side")
    p.add_argument("--control", help="a second probe candidate whose plain probes join the vote's, as a control for "
                                     "the 'both' row (a vote with as many members and no lever)")
    p.add_argument("--fine-tunes", default="", help="comma-separated training candidates of the search whose fold "
                                                     "models join the plain, the both and the control votes, weight 1 "
                                                     "each (hybrid rows)")
    p.add_argument("--work", help="the search's work folder (default runs/tune/<name>[-seed<k>])")
    p.add_argument("--out", default="bench/results")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = p.parse_args(argv)
    res = screen(args.task, args.lever, args.vote, name=args.name, data=args.data, seed=args.seed,
                 clip=args.clip, tiles=args.tiles, control=args.control,
                 fine_tunes=[c for c in args.fine_tunes.split(",") if c], work=args.work)
    write_screen(res, f"input-{args.lever}", args.out, args.seed, render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
