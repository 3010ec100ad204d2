"""Benchmarks of the task apps: export quality/size/latency, and a table of trained runs.

    python bench/bench_apps.py export --model runs/waste-default [--threads 1] [--repeats 50]
        Exports the model folder to ONNX fp32, INT8 static (QDQ, calibrated on training images) and
        INT8 dynamic; scores each on the model folder's held-out test split (accuracy and macro-F1
        with bootstrap intervals, top-1 agreement with fp32); measures file size and single-image CPU
        latency (median and p90 over ``--repeats`` runs after warm-up, batch 1) beside the plain
        torch forward pass; prints a Markdown table and writes ``bench/results/export-<task>.json``.

    python bench/bench_apps.py runs runs/mpox-k5 runs/snow-default ...
        One Markdown row per run folder (model folder, ensemble or k-fold folder): headline metrics
        with intervals (or mean ± sd over folds) and the training wall time from the card.

Benchmarks are not tests: they take minutes and their numbers depend on the machine.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from pellucid.core.export import export_onnx, onnx_session
from pellucid.core.metrics import classification_metrics
from pellucid.core.card import ModelCard, read_card
from pellucid.core.modelfolder import load_model
from pellucid.datasets.splits import load_split
from pellucid.datasets.torchdata import ImageCache

RESULTS = Path(__file__).resolve().parent / "results"


def _test_split(model_dir: Path, card: ModelCard) -> tuple[np.ndarray, np.ndarray]:
    rows = load_split(model_dir).test
    size = int(card.image_size)
    cache = ImageCache([r.path for r in rows], size, channels=card.preprocessing.channels_in, progress=False)
    ok = cache.ok(range(len(rows)))
    x = cache.arrays.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    y = np.array([card.classes.index(rows[i].label) for i in ok])
    return x, y


def _latency(fn, x1: np.ndarray, repeats: int) -> dict:
    for _ in range(5):
        fn(x1)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(x1)
        times.append((time.perf_counter() - t) * 1000)
    return {"median_ms": float(np.median(times)), "p90_ms": float(np.percentile(times, 90))}


def _softmax(z: np.ndarray, T: float) -> np.ndarray:
    z = z / T
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def bench_export(model_dir: Path, threads: int, repeats: int) -> dict:
    torch.set_num_threads(threads)
    model, card = load_model(model_dir)
    T = card.temperature
    x, y = _test_split(model_dir, card)
    out_dir = model_dir / "export"  # beside the model: large files stay out of the repository
    static = export_onnx(model_dir, out_dir / "model.onnx", int8=True, int8_method="static")
    dynamic = export_onnx(model_dir, out_dir / "dyn.onnx", int8=True, int8_method="dynamic")
    variants = {"torch fp32 (eager)": None, "ONNX fp32": static["fp32"], "ONNX INT8 static (QDQ)": static["int8"],
                "ONNX INT8 dynamic": dynamic["int8"]}
    sizes = {"torch fp32 (eager)": (model_dir / "model.safetensors").stat().st_size,
             "ONNX fp32": static["fp32_bytes"], "ONNX INT8 static (QDQ)": static["int8_bytes"],
             "ONNX INT8 dynamic": dynamic["int8_bytes"]}
    rows, ref = {}, None
    for name, path in variants.items():
        if path is None:
            def run(a):
                with torch.inference_mode():
                    return model(torch.from_numpy(a)).numpy()
        else:
            sess = onnx_session(path, threads=threads)
            run = lambda a, s=sess: s.run(None, {"image": a})[0]  # noqa: E731
        logits = np.concatenate([run(x[i:i + 32]) for i in range(0, len(x), 32)])
        m = classification_metrics(y, _softmax(logits, T), card.classes, n_boot=1000, seed=0)
        pred = logits.argmax(1)
        ref = pred if ref is None else ref
        rows[name] = {"accuracy": m["metrics"]["accuracy"], "macro_f1": m["metrics"]["macro_f1"],
                      "agreement_with_torch": float((pred == ref).mean()), "bytes": sizes[name],
                      **_latency(run, x[:1], repeats)}
    return {"model": str(model_dir), "task": card.task, "n_test": int(len(y)), "threads": threads,
            "repeats": repeats, "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
            "quantization": {"static": static["int8_method"], "dynamic": dynamic["int8_method"]}, "rows": rows}


def export_table(res: dict) -> str:
    fp32 = res["rows"]["ONNX fp32"]
    lines = [f"Model `{res['model']}` (task {res['task']}), test split n={res['n_test']}, "
             f"{res['threads']} thread(s), batch 1, median of {res['repeats']} runs.", "",
             "| variant | accuracy [95% CI] | macro-F1 | top-1 agreement with torch | file size | size vs ONNX fp32 "
             "| latency median (p90) |",
             "|---|---|---|---|---|---|---|"]
    for name, r in res["rows"].items():
        a = r["accuracy"]
        lines.append(f"| {name} | {a['value']:.3f} [{a['low']:.3f}, {a['high']:.3f}] | {r['macro_f1']['value']:.3f} | "
                     f"{r['agreement_with_torch']:.3f} | {r['bytes'] / 1e6:.2f} MB | "
                     f"{fp32['bytes'] / r['bytes']:.1f}x smaller | {r['median_ms']:.1f} ms ({r['p90_ms']:.1f}) |")
    return "\n".join(lines)


def _fmt(m: dict | None) -> str:
    if not m or m.get("value") is None:
        return "n/a"
    if m.get("low") is None:
        return f"{m['value']:.3f}"
    return f"{m['value']:.3f} [{m['low']:.3f}, {m['high']:.3f}]"


def runs_table(folders: list[Path]) -> str:
    lines = ["| run | kind | n test | accuracy | macro-F1 | AUROC | balanced acc. | wall time |",
             "|---|---|---|---|---|---|---|---|"]
    for f in folders:
        if (f / "summary.json").exists():
            s = json.loads((f / "summary.json").read_text())
            cell = lambda n: (f"{s['summary'][n]['mean']:.3f} ± {s['summary'][n]['sd']:.3f}"  # noqa: E731
                              if s["summary"].get(n, {}).get("mean") is not None else "n/a")
            lines.append(f"| `{f}` | {s['k']}-fold mean ± sd | {s['n']} (all, once) | {cell('accuracy')} | "
                         f"{cell('macro_f1')} | {cell('auroc')} | {cell('balanced_accuracy')} | "
                         f"{s['seconds'] / 60:.1f} min |")
            continue
        card = read_card(f)
        m = card.metrics["metrics"]
        lines.append(f"| `{f}` | {card.kind} | {card.metrics['n']} | {_fmt(m['accuracy'])} | "
                     f"{_fmt(m['macro_f1'])} | {_fmt(m['auroc'])} | {_fmt(m['balanced_accuracy'])} | "
                     f"{card.training.seconds / 60:.1f} min |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    e = sub.add_parser("export")
    e.add_argument("--model", required=True)
    e.add_argument("--threads", type=int, default=1)
    e.add_argument("--repeats", type=int, default=50)
    r = sub.add_parser("runs")
    r.add_argument("folders", nargs="+")
    args = p.parse_args(argv)
    if args.what == "export":
        res = bench_export(Path(args.model), args.threads, args.repeats)
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"export-{res['task']}.json").write_text(json.dumps(res, indent=1))
        print(export_table(res))
    else:
        print(runs_table([Path(f) for f in args.folders]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
