"""Allocator benchmark: eager PyTorch on the CPU with glibc's default malloc thresholds vs
:func:`pellucid.core.runtime.tune_allocator`.

Two fresh worker processes run the same work on EfficientNet-Lite0 at 224 px with 16 real chest
X-rays (``../shared/data/tb_cxr``): the plain inference forward pass of the batch (best of 5) and a
full fine-tune step (forward, backward, AdamW step; best of 3), one process with the default
thresholds and one after ``tune_allocator()``. Each reports its time, minor page faults and peak
memory. Writes ``bench/results/runtime.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from bench import write_table

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tb_cxr"
OUT = Path(__file__).parent / "results" / "runtime.md"


def _worker(tuned: bool, threads: int | None) -> dict:
    import resource
    import time

    import torch

    from pellucid.core.runtime import tune_allocator

    applied = tune_allocator() if tuned else False
    if threads:
        torch.set_num_threads(threads)
    from bench.bench_explain import _load_images
    from pellucid.core.model import build_classifier

    torch.manual_seed(0)
    model, _ = build_classifier("efficientnet_lite0", 2, pretrained=True)
    x, _ = _load_images(16, 224)
    y = torch.arange(16) % 2

    def faults() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def best(fn, repeat: int) -> tuple[float, int]:
        fn()  # warm-up
        times, f0 = [], faults()
        for _ in range(repeat):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times), (faults() - f0) // repeat

    model.eval()

    def forward():
        with torch.inference_mode():
            model(x)

    fw, fw_faults = best(forward, 5)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    st, st_faults = best(step, 3)
    return {"tuned": applied, "forward_s": fw, "forward_faults": fw_faults, "step_s": st, "step_faults": st_faults,
            "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--worker", choices=["default", "tuned"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv if argv is not None else [])
    if args.worker:
        print(json.dumps(_worker(args.worker == "tuned", args.threads)))
        return
    if not DATA.exists():
        print(f"skipped: sample data {DATA} absent (the allocator benchmark needs real images)")
        return
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PELLUCID_OFFLINE": "1", "PYTHONPATH": str(root)}
    load_before = os.getloadavg()[0]
    res = {}
    for mode in ("default", "tuned", "default", "tuned"):  # interleaved, best of two processes each
        cmd = [sys.executable, "-m", "bench.bench_runtime", "--worker", mode]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, check=True).stdout
        got = json.loads(out.strip().splitlines()[-1])
        if mode not in res or got["forward_s"] + got["step_s"] < res[mode]["forward_s"] + res[mode]["step_s"]:
            res[mode] = got
    load_after = os.getloadavg()[0]
    d, t = res["default"], res["tuned"]
    if not t["tuned"]:
        print("note: tune_allocator() did not apply here (not glibc, or PELLUCID_MALLOC_TUNING=0)")
    lines = [
        "# Allocator (CPU, eager PyTorch)",
        "",
        f"EfficientNet-Lite0 (ImageNet), 224 px, batch of 16 chest X-rays from tb_cxr; {d['threads']} thread(s), "
        f"{platform.processor() or platform.machine()}; two fresh processes per setting, the faster kept; load average "
        f"{load_before:.1f} before, {load_after:.1f} after. Faults: minor page faults per call.",
        "",
        "| work | glibc defaults s | faults | `tune_allocator()` s | faults | speed-up |",
        "|---|---:|---:|---:|---:|---:|",
        f"| inference forward, batch 16 | {d['forward_s']:.3f} | {d['forward_faults']} | {t['forward_s']:.3f} | "
        f"{t['forward_faults']} | {d['forward_s'] / t['forward_s']:.2f}× |",
        f"| full fine-tune step, batch 16 | {d['step_s']:.3f} | {d['step_faults']} | {t['step_s']:.3f} | "
        f"{t['step_faults']} | {d['step_s'] / t['step_s']:.2f}× |",
        "",
        f"Peak resident memory: {d['maxrss_mb']:.0f} MB with the defaults, {t['maxrss_mb']:.0f} MB tuned.",
    ]
    write_table(lines, args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
