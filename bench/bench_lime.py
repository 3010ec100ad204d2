"""LIME on trained task models: the lime package with its defaults vs pellucid's LIME in float32 and
with INT8 or bfloat16 passes (checked against float32 on every image), same model, same images.

``python -m bench.bench_lime --model runs/waste-v3 --model runs/sonar-v3 [--images 8]``: for each model
folder, ``--images`` test images of its ``split.json`` (the explained class is the model's
prediction), 1000 samples each, run one after another: the lime package with its defaults (Quickshift,
batch_size=10, top_labels=5; ``classifier_fn`` = the eager model), ``LimeExplainer(precision="float32")`` and
``LimeExplainer(precision="int8")`` and ``precision="bfloat16"`` (SLIC, pellucid's
default) and float32 and bfloat16 with lime's Quickshift segmentation. Times are totals over the images
and include pellucid's one-off export (and quantization or compilation) on the first image. Faithfulness: mean deletion AUC of the maps, scored with
the float32 model. Writes ``bench/results/lime-models.md``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from bench import write_table

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).parent / "results" / "lime-models.md"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, action="append", help="trained model folder (repeatable)")
    parser.add_argument("--images", type=int, default=8, help="test images per model")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--allocator", choices=["default", "tuned"], default="tuned",
                        help="glibc malloc thresholds for this process, so for both sides: tune_allocator() "
                             "(default, as the pellucid command runs; eager PyTorch, so the lime package, gains "
                             "most) or glibc's defaults")
    parser.add_argument("--only", action="append", help="run only these pellucid variants (repeatable; e.g. "
                        "'defaults', 'float32', 'float32, every sample'); the lime package always runs")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv if argv is not None else [])
    os.environ.setdefault("PELLUCID_OFFLINE", "1")
    if args.allocator == "tuned":
        from pellucid.core.runtime import tune_allocator

        if not tune_allocator():
            print("note: tune_allocator() did not apply here (not glibc, or PELLUCID_MALLOC_TUNING=0)")
    if not args.model:
        print("skipped: give trained model folders, e.g. python -m bench.bench_lime --model runs/waste-v3")
        return
    if args.threads:
        torch.set_num_threads(args.threads)

    from lime import lime_image

    from bench.bench_ttame import _test_images
    from pellucid.core.modelfolder import load_model
    from pellucid.core.quantize import cpu_features
    from pellucid.explain import get_explainer
    from pellucid.explain.base import probabilities
    from pellucid.explain.lime import heatmap_from_lime
    from pellucid.explain.metrics import deletion_insertion

    load_before = os.getloadavg()[0]
    rows = []
    for folder in args.model:
        model, card = load_model(folder)
        model.eval()
        x, _ = _test_images(folder, card, args.images, seed=0)
        with torch.inference_mode():
            targets = probabilities(model(x)).argmax(1).tolist()

        def classifier_fn(batch: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                t_ = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float()
                return probabilities(model(t_)).numpy()

        result = {}
        variants = {"lime package": None, "defaults": {},
                    "float32, every sample": {"precision": "float32", "converge": None},
                    "float32": {"precision": "float32"}, "int8": {"precision": "int8"},
                    "bfloat16": {"precision": "bfloat16"},
                    "float32, Quickshift": {"precision": "float32", "segmentation": "quickshift"},
                    "bfloat16, Quickshift": {"precision": "bfloat16", "segmentation": "quickshift"}}
        variants = {k: v for k, v in variants.items() if not args.only or k == "lime package" or k in args.only}
        for name, options in variants.items():
            maps, checks, t0 = [], [], time.perf_counter()
            explainer = None if options is None else get_explainer("lime", num_samples=args.samples, **options)
            for i in range(len(x)):
                if explainer is None:
                    exp = lime_image.LimeImageExplainer(random_state=0).explain_instance(
                        x[i].permute(1, 2, 0).numpy().astype(np.float64), classifier_fn, num_samples=args.samples)
                    maps.append(heatmap_from_lime(exp, targets[i]))
                else:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # the INT8 fallback warning: counted below instead
                        res = explainer.explain(model, x[i:i + 1], [targets[i]])[0]
                    maps.append(res.heatmap)
                    checks.append(res.extras)
            secs = time.perf_counter() - t0
            auc = deletion_insertion(model, x, maps, targets, "deletion", steps=20)
            result[name] = (secs, float(np.mean(auc)), checks)
        base = result["lime package"][0]
        for name, (secs, auc, checks) in result.items():
            used = [e["samples_used"] for e in checks if "samples_used" in e]
            note = f"samples run: {min(used)}–{max(used)} (mean {np.mean(used):.0f}); " if used else ""
            prec = name.split(",")[0]
            if prec in ("int8", "bfloat16"):
                found = [e[f"{prec}_check"] for e in checks if f"{prec}_check" in e]
                passed = [c for c in found if c["passed"]]
                diffs = [c["mean_abs_diff"] for c in found]
                runner = found[0].get("backend", "?") if found else "?"
                note += (f"{prec} ({runner}) used on {len(passed)} of {len(checks)} images (mean |Δp| on the check: "
                        f"{min(diffs):.3f}–{max(diffs):.3f})") if found else ""
            rows.append((Path(folder).name, card.task or "?", name, secs, base / secs, auc, note))
    load_after = os.getloadavg()[0]
    lines = [
        "# LIME on trained task models (CPU)",
        "",
        f"{args.images} test images per model ({args.samples} samples each); torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), CPU: {cpu_features().summary()}; malloc thresholds: "
        f"{'tune_allocator()' if args.allocator == 'tuned' else 'glibc defaults'}; load average "
        f"{load_before:.1f} before, {load_after:.1f} after. Time: total over the images, pellucid's one-off export "
        "and quantization included. Deletion AUC: mean over the images, float32 model (lower is more faithful). "
        "Pellucid rows stop sampling once the fit has converged (``converge``) unless marked 'every sample'; "
        "'defaults' is precision='auto' (checked bfloat16 where the CPU has it natively, else float32).",
        "",
        "| model | task | LIME | total s | speed-up vs lime | deletion AUC ↓ | note |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for model_name, task, name, secs, speed, auc, note in rows:
        lines.append(f"| {model_name} | {task} | {name} | {secs:.1f} | {speed:.2f}× | {auc:.4f} | {note} |")
    write_table(lines, args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
