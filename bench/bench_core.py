"""Core speed benchmark: training steps and the feature cache, against the plain forward pass.

On EfficientNet-Lite0 at 224 px with real chest X-rays (``../shared/data/tb_cxr``), measured in one run:
plain inference forward of a batch, a progressive fine-tune step (top stages thawed), a full
fine-tune step, and the linear probe with cached features vs re-running the backbone every epoch.
Then a full fine-tune step at 64 px with the plain depthwise layers and with ``small_input_depthwise``.
Writes ``bench/results/core.md`` (``--out``: another file, e.g. one per kind of CPU); the header names the CPU.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from pellucid.core.finetune import freeze_bn_of_frozen, get_strategy
from pellucid.core.model import build_classifier
from pellucid.datasets.samples import load_samples
from pellucid.datasets.torchdata import ImageCache, to_tensor

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tb_cxr"
OUT = Path(__file__).parent / "results" / "core.md"


def _time(fn, repeat: int = 3) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help="markdown table to write (default: %(default)s)")
    out = parser.parse_args(argv).out
    if not DATA.exists():
        print(f"skipped: sample data {DATA} absent")
        return
    from pellucid.core.runtime import tune_allocator

    tune_allocator()  # as the pellucid command runs training (bench/bench_runtime.py measures the difference)
    torch.manual_seed(0)
    samples = load_samples(DATA)[:64]
    t = time.perf_counter()
    cache = ImageCache([s.path for s in samples], 224, channels=1, progress=False)
    decode_s = time.perf_counter() - t
    x = torch.stack([to_tensor(a) for a in cache.arrays[:32]])
    y = torch.randint(0, 2, (32,))
    rows = []

    model, _ = build_classifier("efficientnet_lite0", 2, pretrained=True)
    model.eval()

    def forward():
        with torch.inference_mode():
            model(x)

    base = _time(forward)
    rows.append(("plain forward, batch 32 (inference)", base))

    def step_with(strategy_name: str, **kw):
        m, _ = build_classifier("efficientnet_lite0", 2, pretrained=True)
        s = get_strategy(strategy_name, **kw)
        s.setup(m)
        s.on_epoch_start(m, 0)
        opt = torch.optim.AdamW(s.param_groups(m))
        m.train()
        freeze_bn_of_frozen(m)

        def step():
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
        return step

    rows.append(("progressive step, 2 top stages thawed", _time(step_with("progressive", stages_per_epoch=2, max_stages=5), 2)))
    rows.append(("full fine-tune step", _time(step_with("full"), 2)))

    epochs = 10
    feats_once = _time(forward, 1)
    from pellucid.core.training import fit_head

    feats = torch.randn(32, model.spec.embedding_dim)
    head_fit = _time(lambda: fit_head(torch.nn.Linear(feats.shape[1], 2), feats, y), 1)
    rows.append((f"linear probe, cached features ({epochs} epochs of 32 images)", feats_once + head_fit))
    rows.append((f"linear probe, backbone re-run every epoch ({epochs} epochs)", feats_once * epochs + head_fit))

    lines = ["| measurement | seconds | × plain forward |", "|---|---|---|"]
    for name, sec in rows:
        lines.append(f"| {name} | {sec:.3f} | {sec / base:.2f} |")
    lines.append(f"| decode + resize 64 PNGs once (ImageCache, 4 threads) | {decode_s:.3f} | — |")
    table = "\n".join(lines) + "\n\n" + _small_input_table()
    from pellucid.core.quantize import cpu_features

    header = (f"EfficientNet-Lite0, 224 px, batch 32, {torch.get_num_threads()} torch threads, CPU: "
              f"{cpu_features().summary()}; torch {torch.__version__}; malloc thresholds set by tune_allocator() "
              "as the pellucid command does\n\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header + table + "\n")
    print(header + table)


def _small_input_table() -> str:
    """A full fine-tune step at nuclei's 64 px, as training runs it (channels-last), with the plain
    depthwise layers and inside :func:`pellucid.core.runtime.small_input_depthwise` (same numbers)."""
    from pellucid.core.runtime import small_input_depthwise

    torch.manual_seed(0)
    x = torch.rand(64, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 4, (64,))
    m, _ = build_classifier("efficientnet_lite0", 4, pretrained=True)
    m = m.to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)

    def step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.step()

    plain = _time(step, 3)
    with small_input_depthwise(m) as n:
        small = _time(step, 3)
    return ("| full fine-tune step, 64 images at 64 px (nuclei), channels-last | plain layers s | "
            f"`small_input_depthwise` ({n} layers) s | speed-up |\n|---|---|---|---|\n"
            f"| EfficientNet-Lite0, 4 classes | {plain:.3f} | {small:.3f} | {plain / small:.2f}x |")


if __name__ == "__main__":
    main()
