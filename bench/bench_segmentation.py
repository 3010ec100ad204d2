"""Lung segmentation benchmark: train the real tb_lungs U-Net once and report quality and time.

Trains :func:`pellucid.core.segmentation.train_segmenter` on ``../shared/data/tb_lungs`` (grouped
split, seed 0) and reports test Dice and HD95 with 95 % bootstrap intervals, wall and CPU time of
the whole run, and the plain inference time of one image through :func:`segment` on this machine.
Writes ``bench/results/segmentation.md`` and keeps the model folder in ``runs/tb-lungseg``.

    python -m bench.bench_segmentation [--image-size 128] [--epochs 18] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tb_lungs"
OUT = Path(__file__).parent / "results" / "segmentation.md"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "runs" / "tb-lungseg"))
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=18)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import numpy as np

    from pellucid.core.modelfolder import load_model
    from pellucid.core.segmentation import read_seg_manifest, segment, train_segmenter
    from pellucid.datasets.readers import read_image

    load = os.getloadavg()[0]
    folder = train_segmenter(args.data, args.out, image_size=args.image_size, epochs=args.epochs, seed=0,
                             threads=args.threads, progress=False)
    model, card = load_model(folder)
    img = read_image(read_seg_manifest(args.data)[0]["path"], channels=1)
    segment(model, img)
    t = time.perf_counter()
    for _ in range(10):
        segment(model, img)
    per_image_ms = (time.perf_counter() - t) / 10 * 1000
    m, tr, arch = card.metrics, card.training, card.extra["architecture"]
    lines = [
        "# Lung segmentation (tb_lungs, grouped test split)",
        "",
        f"`python -m bench.bench_segmentation --image-size {args.image_size} --epochs {args.epochs} "
        f"--threads {args.threads}`; {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load average {load:.1f} at start (machine shared with other jobs: times are upper bounds).",
        "",
        "| model | size | test images | Dice [95 % CI] | HD95 px @256 [95 % CI] | epochs | wall s | CPU s | segment() ms/image |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| MONAI UNet {tuple(arch['channels'])}, res units {arch['num_res_units']} "
        f"| {args.image_size} | {card.split.test} | {m['dice']['value']:.4f} [{m['dice']['low']:.4f}, "
        f"{m['dice']['high']:.4f}] | {m['hd95']['value']:.2f} [{m['hd95']['low']:.2f}, {m['hd95']['high']:.2f}] "
        f"| {tr.extra['epochs_run']} | {tr.seconds:.0f} | {tr.extra['cpu_seconds']:.0f} | {per_image_ms:.1f} |",
        "",
        f"Split hash {card.split.hash}; best validation Dice {tr.extra['best_val_dice']:.4f}; "
        f"early stop: {tr.extra['stopped_early']}; torch threads {tr.extra['torch_threads']}. Dice and HD95 are computed "
        "after post-processing (sigmoid > 0.5, two largest components), at each mask's own resolution (256 px).",
        "",
    ]
    worst = sorted(json.loads((Path(folder) / "metrics.json").read_text())["per_image"],
                   key=lambda r: (r["dice"] if np.isfinite(r["dice"]) else -1))[:3]
    lines += ["Worst test images: " + "; ".join(f"{Path(r['path']).name} Dice {r['dice']:.3f}" for r in worst), ""]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
