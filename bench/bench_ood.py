"""Out-of-domain detection per app: does the model's domain check tell its own images from the others'?

For each app (tb, bpd, mpox, snow, nuclei, waste, sonar) a quick model is trained — linear probe on the
task's default backbone, ``--max-images`` images (400 by default), so that training writes its
out-of-domain reference ``ood.safetensors`` — into ``--models DIR/<app>`` (reused when it is there).
Then the case pipeline (:class:`pellucid.core.pipeline.CasePipeline`, as ``pellucid predict`` runs it)
scores the app's own held-out test images (the ``test`` part of the model's ``split.json``) and about
``--ood`` images drawn evenly from the OTHER apps' sample-data folders. Reported per app:

* OOD AUROC (scikit-learn ``roc_auc_score``, out-of-domain = positive) of the Mahalanobis distance
  (``check_domain``'s ``scores["mahalanobis"]``) and of the energy score (``scores["energy"]``);
* the share of own test images flagged (any reason: the reference's 99 % thresholds, the blank and
  colour heuristics; target ≤ 5 %) and of other-app images flagged, overall and per source;
* for the TB app, each DICOM of ``../shared/data/dicom``: flagged or not, and why (target: every
  non-radiograph flagged).

* synthetic inputs no app was trained on (uniform and Gaussian noise, 16-bit grey noise, a gradient,
  a checkerboard; ``--synthetic`` of each kind, made in a temporary folder), flagged or not;
* the share of other-app images that the image heuristics alone flag (what an ensemble got before its
  members' references were read together).

By default each app's bench model is a quick linear probe (an app whose recipe is an ensemble gets one
member, ``members = []``). A trained default recipe is benched by putting its folder (or a link to it)
at ``--models DIR/<app>``: an ensemble's check reads its members' references together
(:class:`pellucid.core.ood.MemberReferences`). Writes ``bench/results/ood.md`` (or ``--out``).
"""
from __future__ import annotations

import argparse
import csv
import math
import random
import sys
import tempfile
import time
from pathlib import Path

from bench import write_table
from bench.bench_predict import DATA, ROOT, set_threads, train_model

OUT = Path(__file__).parent / "results" / "ood.md"
APPS = ("tb", "bpd", "mpox", "snow", "nuclei", "waste", "sonar")
DICOM = DATA / "dicom"


def _data(app: str) -> Path:
    from pellucid.core.tasks import get_task

    return DATA / get_task(app).default_data


def manifest_files(data: Path) -> list[Path]:
    """Every image listed in ``data/manifest.csv``."""
    with (data / "manifest.csv").open(newline="") as fh:
        return [data / r["path"] for r in csv.DictReader(fh)]


def draw_ood(app: str, n: int, apps: tuple[str, ...] = APPS, seed: int = 0) -> list[tuple[Path, str]]:
    """About ``n`` images drawn evenly from the other apps' data folders: ``(path, source folder)``."""
    others = [a for a in apps if a != app]
    rng = random.Random(seed)
    out = []
    for i, other in enumerate(others):
        k = n // len(others) + (1 if i < n % len(others) else 0)
        files = manifest_files(_data(other))
        out += [(f, _data(other).name) for f in rng.sample(files, min(k, len(files)))]
    return out


def ensure_model(app: str, models: Path, *, max_images: int, backbone: str | None = None,
                 pretrained: str | None = None, extra: tuple[str, ...] = ()) -> tuple[Path, float | None]:
    """``models/<app>``, trained now (linear probe) unless it holds a model; ``(folder, training seconds or None)``."""
    folder = models / app
    if (folder / "card.json").exists():
        return folder, None
    extra = tuple(extra)
    from pellucid.core.tasks import get_task

    cfg = None
    if get_task(app).recipe.get("members"):  # an ensemble stores no OOD reference: bench one member
        cfg = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
        cfg.write("members = []\n")
        cfg.close()
        extra += ("--config", cfg.name)
    try:
        secs = train_model(app, _data(app), folder, max_images=max_images, backbone=backbone, pretrained=pretrained,
                           extra=extra)
    finally:
        if cfg is not None:
            Path(cfg.name).unlink()
    return folder, secs


SYNTHETIC_KINDS = ("uniform noise", "gaussian noise", "16-bit grey noise", "gradient", "checkerboard")


def synthetic_images(folder: Path, per_kind: int, seed: int = 0) -> list[tuple[Path, str]]:
    """``per_kind`` images of each of :data:`SYNTHETIC_KINDS`, written as PNG into ``folder``."""
    import numpy as np
    from PIL import Image as PILImage

    rng = np.random.default_rng(seed)
    out = []
    for i in range(per_kind):
        side = int(rng.integers(160, 400))
        yy, xx = np.mgrid[:side, :side]
        angle = rng.uniform(0, np.pi)
        ramp = (np.cos(angle) * xx + np.sin(angle) * yy)
        period = int(rng.integers(8, 64))
        arrays = {"uniform noise": (rng.random((side, side, 3)) * 255).astype(np.uint8),
                  "gaussian noise": rng.normal(128, 40, (side, side, 3)).clip(0, 255).astype(np.uint8),
                  "16-bit grey noise": (rng.random((side, side)) * 65535).astype(np.uint16),
                  "gradient": ((ramp - ramp.min()) / np.ptp(ramp) * 255).astype(np.uint8),
                  "checkerboard": (((yy // period + xx // period) % 2) * 255).astype(np.uint8)}
        for kind, arr in arrays.items():
            path = folder / f"{kind.replace(' ', '_')}_{i}.png"
            PILImage.fromarray(arr).save(path)
            out.append((path, kind))
    return out


def score(model: Path, files: list[Path]) -> list[dict]:
    """Run ``files`` through the case pipeline of ``model``; one dict per file, in order."""
    from pellucid.core.predict import Predictor

    pred = Predictor(model)
    pipe = pred.pipeline(batch_size=32, workers=0, keep_images=False)
    rows = []
    for case in pipe.from_paths(files):
        s = case.ood.scores if case.ood is not None else {}
        rows.append({"flagged": bool(case.ood is not None and case.ood.flagged),
                     "reasons": list(case.ood.reasons) if case.ood is not None else [],
                     "method": case.ood.method if case.ood is not None else "",
                     "mahalanobis": s.get("mahalanobis", math.nan), "energy": s.get("energy", math.nan),
                     "error": case.error, "modality": case.meta.get("modality", "")})
    if len(rows) != len(files):
        raise RuntimeError(f"{len(files)} inputs gave {len(rows)} cases")
    return rows


def _auroc(y: list[int], s: list[float]) -> float:
    from sklearn.metrics import roc_auc_score

    pairs = [(a, b) for a, b in zip(y, s) if not math.isnan(b)]
    if len({a for a, _ in pairs}) < 2:
        return math.nan
    return float(roc_auc_score([a for a, _ in pairs], [b for _, b in pairs]))


def evaluate_app(app: str, model: Path, *, n_ood: int = 200, max_test: int | None = None, seed: int = 0,
                 apps: tuple[str, ...] = APPS, dicom: Path | None = None, synthetic: int = 0) -> dict:
    """OOD AUROC and flag shares of one app's model (see the module docstring)."""
    from pellucid.datasets.splits import load_split

    test = [Path(p) for p in load_split(model).paths("test")]
    test = [p if p.is_absolute() else ROOT / p for p in test]
    if max_test and len(test) > max_test:
        test = sorted(random.Random(seed).sample(test, max_test))
    ood = draw_ood(app, n_ood, apps, seed)
    with tempfile.TemporaryDirectory() as tmp:
        made = synthetic_images(Path(tmp), synthetic, seed)
        t = time.perf_counter()
        rows = score(model, test + [p for p, _ in ood] + [p for p, _ in made])
        secs = time.perf_counter() - t
    rows, made_rows = rows[:len(rows) - len(made)], rows[len(rows) - len(made):]
    own, other = rows[:len(test)], rows[len(test):]
    sources = [_data(app).name] * len(own) + [s for _, s in ood]
    ok = [(r, int(i >= len(own)), s) for i, (r, s) in enumerate(zip(rows, sources)) if not r["error"]]
    y = [o for _, o, _ in ok]
    res = {"app": app, "n_test": len(own), "n_ood": len(other), "score_s": secs,
           "method": own[0]["method"] if own else "",
           "auroc_mahalanobis": _auroc(y, [r["mahalanobis"] for r, _, _ in ok]),
           "auroc_energy": _auroc(y, [r["energy"] for r, _, _ in ok]),
           "own_flagged": _share([r for r in own if not r["error"]]),
           "other_flagged": _share([r for r in other if not r["error"]]),
           "other_flagged_heuristics": _share([{"flagged": any(not _embedding_reason(x) for x in r["reasons"])}
                                               for r in other if not r["error"]]),
           "synthetic_flagged": _share([r for r in made_rows if not r["error"]]),
           "synthetic_by_kind": {k: _share([r for r, (_, kind) in zip(made_rows, made) if kind == k and not r["error"]])
                                 for k in SYNTHETIC_KINDS} if made else {},
           "errors": sum(bool(r["error"]) for r in rows),
           "by_source": {s: _share([r for r, _, src in ok if src == s]) for s in dict.fromkeys(sources)}}
    if dicom is not None and dicom.is_dir():
        files = sorted(f for f in dicom.iterdir() if f.is_file())
        res["dicom"] = [{"file": f.name, **r} for f, r in zip(files, score(model, files))]
    return res


def _embedding_reason(reason: str) -> bool:
    return "far from the training images" in reason


def _share(rows: list[dict]) -> tuple[int, int]:
    return sum(r["flagged"] for r in rows), len(rows)


def run(apps: tuple[str, ...], models: Path, *, max_images: int = 400, n_ood: int = 200, max_test: int | None = None,
        backbone: str | None = None, pretrained: str | None = None, extra: tuple[str, ...] = (),
        synthetic: int = 0) -> list[dict]:
    """Train (or reuse) and evaluate every app of ``apps``; the other apps' data are drawn from all of APPS."""
    out = []
    for app in apps:
        t = time.perf_counter()
        model, secs = ensure_model(app, models, max_images=max_images, backbone=backbone, pretrained=pretrained,
                                   extra=extra)
        res = evaluate_app(app, model, n_ood=n_ood, max_test=max_test, dicom=DICOM if app == "tb" else None,
                           synthetic=synthetic)
        from pellucid.core.card import read_card

        card = read_card(model)
        if card.extra.get("members"):  # its output is log-probabilities: -logsumexp is 0 up to rounding
            res["auroc_energy"] = math.nan
        res.update(model=model, train_s=secs, backbone=card.backbone_name, members=len(card.extra.get("members") or []),
                   image_size=card.image_size, n_train=card.split.train,
                   total_s=time.perf_counter() - t)
        print(f"{app}: AUROC Mahalanobis {res['auroc_mahalanobis']:.3f}, energy {res['auroc_energy']:.3f}; "
              f"own flagged {_pct(res['own_flagged'])}, others {_pct(res['other_flagged'])} "
              f"({res['total_s']:.0f} s)", flush=True)
        out.append(res)
    return out


def _pct(share: tuple[int, int]) -> str:
    k, n = share
    return f"{k / n:.1%} ({k}/{n})" if n else "–"


def _f(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.3f}"


def table(results: list[dict], cpu: str, command: str) -> list[str]:
    lines = ["# Out-of-domain detection per app", "",
             f"CPU: {cpu}. Command: `{command}`.",
             "Own = the app's held-out test images (the `test` part of the model's split.json); other = images drawn "
             "evenly from the other apps' sample-data folders. Flagged = any reason of the pipeline's domain check "
             "(reference thresholds at the 99 % validation quantile, blank / colour heuristics). OOD AUROC: "
             "out-of-domain = positive (targets: AUROC ≥ 0.95, own flagged ≤ 5 %).", "",
             "For an ensemble the Mahalanobis column is its members' distances over their limits, averaged; its "
             "output is log-probabilities, so it has no energy score. *Heuristics alone*: the other-app images "
             "flagged by the blank / colour / DICOM tests without the reference. *Synthetic*: noise, gradients and "
             "checkerboards.", "",
             "| app | model | own test | other | AUROC Mahalanobis | AUROC energy | own flagged | other flagged "
             "| other, heuristics alone | synthetic flagged | unreadable | time s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        trained = f"trained in {r['train_s']:.0f} s" if r["train_s"] is not None else "reused"
        what = (f"ensemble of {r['members']} members, {r['image_size']} px in, trained on {r['n_train']} images"
                if r.get("members") else
                f"{r['backbone']} {r['image_size']} px, linear probe on {r['n_train']} images")
        lines.append(f"| {r['app']} | {what} ({trained}; check: {r['method'] or 'n/a'}) | {r['n_test']} | {r['n_ood']} "
                     f"| {_f(r['auroc_mahalanobis'])} | {_f(r['auroc_energy'])} | {_pct(r['own_flagged'])} "
                     f"| {_pct(r['other_flagged'])} | {_pct(r.get('other_flagged_heuristics', (0, 0)))} "
                     f"| {_pct(r.get('synthetic_flagged', (0, 0)))} | {r['errors']} | {r['total_s']:.0f} |")
    sources = list(dict.fromkeys(s for r in results for s in r["by_source"]))
    lines += ["", "## Share flagged per source (rows: the app's model; bold: its own test images)", "",
              "| app | " + " | ".join(sources) + " |", "|---|" + "---|" * len(sources)]
    for r in results:
        own = _data(r["app"]).name
        cells = []
        for s in sources:
            k, n = r["by_source"].get(s, (0, 0))
            cell = f"{k / n:.0%} ({k}/{n})" if n else "–"
            cells.append(f"**{cell}**" if s == own else cell)
        lines.append(f"| {r['app']} | " + " | ".join(cells) + " |")
    kinds = [r for r in results if r.get("synthetic_by_kind")]
    if kinds:
        lines += ["", "## Synthetic inputs flagged, per kind", "",
                  "| app | " + " | ".join(SYNTHETIC_KINDS) + " |", "|---|" + "---|" * len(SYNTHETIC_KINDS)]
        lines += [f"| {r['app']} | " + " | ".join(_pct(r["synthetic_by_kind"][k]) for k in SYNTHETIC_KINDS) + " |"
                  for r in kinds]
    for r in results:
        if "dicom" not in r:
            continue
        lines += ["", f"## DICOM files through the {r['app']} model (target: every non-radiograph flagged)", "",
                  "| file | DICOM modality | flagged | reason / error |", "|---|---|---|---|"]
        for d in r["dicom"]:
            why = d["error"] or "; ".join(d["reasons"]) or "–"
            state = "unreadable (error row, no label)" if d["error"] else "yes" if d["flagged"] else "**no**"
            lines.append(f"| {d['file']} | {d['modality'] or '?'} | {state} | {why.replace('|', '/')} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", choices=APPS, default=list(APPS), help="apps to run (default: all)")
    parser.add_argument("--models", type=Path, default=ROOT / "runs" / "bench-ood",
                        help="folder of model folders <app>/ (trained there when absent; default runs/bench-ood)")
    parser.add_argument("--quick", action="store_true", help="fewer images: 200 training, 60 other-app, ≤ 40 test")
    parser.add_argument("--max-images", type=int, help="training images per app (default 400; 200 with --quick)")
    parser.add_argument("--ood", type=int, help="other-app images per app (default 200; 60 with --quick)")
    parser.add_argument("--synthetic", type=int, default=4,
                        help="synthetic images of each kind (noise, gradient, checkerboard...; default 4)")
    parser.add_argument("--threads", type=int, help="torch threads here and in training (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if not (DATA / "tb_cxr").is_dir():
        raise SystemExit(f"sample data {DATA} absent (expected ../shared/data beside the repository)")
    set_threads(args.threads)
    from pellucid.core.quantize import cpu_features

    max_images = args.max_images or (200 if args.quick else 400)
    n_ood = args.ood or (60 if args.quick else 200)
    results = run(tuple(args.tasks), args.models, max_images=max_images, n_ood=n_ood,
                  max_test=40 if args.quick else None, synthetic=args.synthetic)
    command = "python -m bench.bench_ood " + " ".join(argv if argv is not None else sys.argv[1:])
    write_table(table(results, cpu_features().summary(), command.strip()), args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
