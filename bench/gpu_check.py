"""GPU check: every CUDA code path of pellucid, timed against plain baselines measured in the same run.

``python -m bench.gpu_check [--dry-run] [--out PATH]`` on a machine with a CUDA GPU (sized for one
H200 and well under 10 minutes). Each step runs on its own, records ``ok``, ``skipped: <reason>`` or
``failed: <one-line reason>``, and never hides the others:

1. ``train`` — one app (``waste`` by default) trained through the real entry
   (``TrainConfig.from_task`` + ``train``; Lightning, bf16-mixed and channels-last on the GPU) with
   ``finetune="full"`` so every parameter trains, as in the baseline: its fine-tune images/s
   against a plain timm loop (same architecture, AdamW, bf16 autocast, channels-last, same image
   and batch size) on the same training images, decoded once and kept on the GPU. Target ≥ 0.9×.
2. ``predict`` — the public :class:`pellucid.core.predict.Predictor` on CUDA (already-read images
   in, calibrated decisions out) against the raw forward pass of the same model on the same
   preprocessed batch; an import or API change of the predict module gives ``skipped: <reason>``.
3. ``gradcam`` — ``get_explainer("gradcam")`` time per image against one forward pass. Target ≤ 2×.
4. ``lime`` — ``get_explainer("lime")`` (perturbations composed and run on the GPU) against the
   ``lime`` package's ``LimeImageExplainer`` with its defaults (1000 samples) on the same images and
   model. Target ≥ 10×.
5. ``ttame`` — ``get_explainer("ttame").fit`` for a couple of epochs on a small image set: seconds,
   and the device it trained on (must be CUDA).
6. ``ddp`` — two processes of ``torch.distributed`` DistributedDataParallel training the project's
   classifier: NCCL on two GPUs, or on one GPU NCCL and then Gloo with CUDA tensors; when neither
   works, ``skipped: not possible on one GPU: <reason>``.

The table (GPU, torch/CUDA/cuDNN versions, CPU, then one row per step) is printed and written to
``--out`` (default ``bench/results/gpu_check.md``, only on a GPU run). ``--dry-run`` runs every step
on the CPU with tiny settings (``test_resnet`` at 64 px, a few images, one epoch, LIME with 50
samples, two Gloo processes) in well under a minute, so the tests exercise the wiring; its table
goes to ``$TMPDIR/pellucid-gpu-check/gpu_check.md`` unless ``--out`` is given (never under
``bench/results``), and its numbers mean nothing. Without a GPU and
without ``--dry-run`` the script says so in one line and exits with status 2. Exit status 1 when a
step failed.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import inspect
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
OUT = Path(__file__).parent / "results" / "gpu_check.md"
STEPS = ("train", "predict", "gradcam", "lime", "ttame", "ddp")
DRY_OUT = Path(tempfile.gettempdir()) / "pellucid-gpu-check" / "gpu_check.md"  # dry runs: never bench/results
DDP_ENV = "PELLUCID_GPU_CHECK_DDP"  # the settings a DDP worker process reads


class Skip(Exception):
    """A step that cannot run here; the message says why."""


@dataclass(frozen=True)
class Settings:
    """Sizes of every step (GPU run by default; :data:`DRY` for ``--dry-run``)."""

    task: str = "waste"
    backbone: str = "efficientnet_lite0"
    pretrained: bool = True
    image_size: int = 224
    batch_size: int = 32
    epochs: int = 8
    max_images: int | None = None
    num_workers: int = 8
    n_boot: int = 200
    plain_warmup: int = 5
    plain_steps: int = 100
    predict_images: int = 256
    forward_batch: int = 32
    cam_images: int = 32
    lime_images: int = 2
    lime_samples: int = 1000
    lime_batch: int = 250
    lime_backend: str = "auto"
    ttame_images: int = 256
    ttame_epochs: int = 2
    ttame_batch: int = 32
    ddp_steps: int = 20
    ddp_batch: int = 32
    ddp_timeout: float = 120.0
    repeat: int = 3


DRY = Settings(backbone="test_resnet", pretrained=False, image_size=64, batch_size=8, epochs=1, max_images=48,
               num_workers=0, n_boot=50, plain_warmup=1, plain_steps=3, predict_images=8, forward_batch=8,
               cam_images=4, lime_images=1, lime_samples=50, lime_batch=25, lime_backend="torch",
               ttame_images=16, ttame_epochs=1, ttame_batch=8, ddp_steps=2, ddp_batch=4, ddp_timeout=60.0,
               repeat=1)


@dataclass
class Row:
    """One step's line of the table."""

    step: str
    status: str = "not run"
    pellucid: str = ""
    baseline: str = ""
    ratio: str = ""
    target: str = ""
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


# --------------------------------------------------------------------------------------- helpers
def _one_line(err: BaseException, limit: int = 240) -> str:
    text = " ".join(str(err).split()) or "(no message)"
    text = f"{type(err).__name__}: {text}" if not isinstance(err, Skip) else text
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best(fn: Callable[[], Any], device, repeat: int) -> float:
    """Best wall time of ``repeat`` calls of ``fn`` (GPU work finished inside the timing)."""
    best = float("inf")
    for _ in range(max(1, repeat)):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def _ratio(value: float, base: float) -> float | None:
    return value / base if base > 0 and value > 0 else None


def _target(ratio: float | None, target: float, higher: bool, dry: bool) -> str:
    sign = "≥" if higher else "≤"
    if dry:
        return f"{sign} {target:g}× (not judged in a dry run)"
    if ratio is None:
        return f"{sign} {target:g}× (no ratio)"
    met = ratio >= target if higher else ratio <= target
    return f"{sign} {target:g}× ({'met' if met else 'MISSED'})"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device) -> list[str]:
    """Lines naming the GPU, the library versions and the CPU (a line that cannot be made says why)."""
    import torch

    def versions() -> str:
        import lightning
        import timm

        nccl = "n/a"
        if torch.cuda.is_available():
            v = torch.cuda.nccl.version()
            nccl = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        return (f"torch {torch.__version__}, CUDA {torch.version.cuda or 'n/a'}, cuDNN {cudnn or 'n/a'}, NCCL {nccl}, "
                f"timm {timm.__version__}, lightning {lightning.__version__}, Python {platform.python_version()}")

    def gpu() -> str:
        if device.type != "cuda":
            return "none (dry run on the CPU)"
        props = torch.cuda.get_device_properties(device)
        return (f"{props.name} ({props.total_memory / 2 ** 30:.0f} GiB, compute capability {props.major}.{props.minor}; "
                f"{torch.cuda.device_count()} visible)")

    def cpu() -> str:
        return f"{_cpu_name()}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}"

    lines = []
    for label, fn in (("GPU", gpu), ("software", versions), ("CPU", cpu)):
        try:
            lines.append(f"- {label}: {fn()}")
        except Exception as err:  # the table must still be written
            lines.append(f"- {label}: unknown ({_one_line(err, 120)})")
    return lines


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def render(rows: list[Row], header: list[str], settings: Settings, dry: bool) -> list[str]:
    """The Markdown lines of the report."""
    when = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    mode = ("dry run on the CPU with tiny settings: checks the wiring only, the numbers mean nothing" if dry
            else "GPU run")
    lines = [
        "# pellucid GPU check",
        "",
        f"`python -m bench.gpu_check{' --dry-run' if dry else ''}` — {mode}; {when}.",
        "",
        *header,
        f"- settings: task {settings.task}, backbone {settings.backbone}, {settings.image_size} px, batch "
        f"{settings.batch_size}, {settings.epochs} epoch(s), LIME {settings.lime_samples} samples",
        "",
        "| step | status | pellucid | baseline (same run, same tensors) | ratio | target | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        notes = "; ".join(r.notes + [f"step took {r.seconds:.1f} s"])
        lines.append("| " + " | ".join(_cell(c) for c in (r.step, r.status, r.pellucid, r.baseline, r.ratio, r.target,
                                                               notes)) + " |")
    return lines


# --------------------------------------------------------------------------------------- the run
class Check:
    """Shared state of one run: settings, device, data, the trained model folder, decoded images."""

    def __init__(self, settings: Settings, device, data: Path, work: Path, dry: bool):
        from pellucid.core.tasks import get_task

        self.s = settings
        self.device = device
        self.data = data
        self.work = work
        self.dry = dry
        self.task = get_task(settings.task)
        self.folder: Path | None = None
        self.train_error: str = ""
        self._decoded: dict[tuple[str, ...], Any] = {}

    # -- inputs ------------------------------------------------------------------------------
    def files(self, n: int, part: str = "test") -> list[str]:
        """``n`` image files: from the trained folder's split ``part`` when there is one, else a
        seeded choice from the data folder."""
        paths: list[str] = []
        from pellucid.datasets.splits import load_split, split_file

        if self.folder is not None and split_file(self.folder).is_file():
            paths = load_split(self.folder).paths(part)
        if len(paths) < n:
            import numpy as np

            from pellucid.datasets.samples import load_samples

            samples = load_samples(self.data, classes=self.task.classes, aliases=self.task.aliases)
            order = np.random.default_rng(0).permutation(len(samples))
            have = set(paths)
            paths += [samples[i].path for i in order if samples[i].path not in have]
        return paths[:n]

    def images(self, paths: list[str]):
        """``(N, 3, S, S)`` float tensor in [0, 1] on the CPU, decoded once per file list."""
        key = tuple(paths)
        if key not in self._decoded:
            import torch

            from pellucid.datasets.torchdata import ImageCache

            cache = ImageCache(paths, self.s.image_size, channels=self.task.channels, progress=False)
            if cache.failures:
                raise RuntimeError(f"{len(cache.failures)} image(s) unreadable, first: {cache.failures[0][1]}")
            self._decoded[key] = torch.from_numpy(cache.arrays).permute(0, 3, 1, 2).float().div_(255.0)
        return self._decoded[key]

    def model(self, row: Row):
        """The trained classifier on the device (eval mode); an untrained one, said in the notes,
        when the train step left no model folder."""
        if self.folder is not None:
            from pellucid.core.modelfolder import load_model

            model, _ = load_model(self.folder, map_location=self.device)
            return model.eval()
        from pellucid.core.model import build_classifier

        row.notes.append(f"untrained {self.s.backbone} (no model folder: {self.train_error or 'train step not run'})")
        model, _ = build_classifier(self.s.backbone, len(self.task.classes), pretrained=self.s.pretrained)
        return model.to(self.device).eval()

    # -- 1. training ---------------------------------------------------------------------------
    def step_train(self, row: Row) -> None:
        import torch

        from pellucid.core.modelfolder import read_card
        from pellucid.core.training import TrainConfig, train

        s = self.s
        on_gpu = self.device.type == "cuda"
        cfg = TrainConfig.from_task(
            self.task, str(self.data), str(self.work / f"{s.task}-model"), backbone=s.backbone,
            pretrained=s.pretrained, image_size=s.image_size, batch_size=s.batch_size, epochs=s.epochs,
            finetune="full", patience=s.epochs + 1, max_images=s.max_images, num_workers=s.num_workers,
            accelerator="gpu" if on_gpu else "cpu", devices=1, strategy="auto", resume=False, progress=False,
            n_boot=s.n_boot, mixing="none")
        t = time.perf_counter()
        try:
            folder = train(cfg)
        except Exception as err:
            self.train_error = _one_line(err, 120)
            raise
        total = time.perf_counter() - t
        self.folder = Path(folder)
        card = read_card(self.folder)
        training = card.training.extra if card.training is not None else {}
        n_train = int(card.split.train)
        epochs = int(training.get("epochs_run") or 0)
        per_epoch = (n_train // s.batch_size) * s.batch_size if n_train > s.batch_size else n_train
        seconds = float(training.get("fine_tune_seconds") or 0.0)
        ours = per_epoch * epochs / seconds if seconds > 0 else 0.0
        row.pellucid = (f"{ours:.0f} img/s fine-tune (Lightning, "
                        f"{'bf16-mixed' if on_gpu else '32-true'}, channels-last)")
        row.notes += [f"trained on {card.training.device if card.training else None}", f"weights {card.weight_source}",
                      f"{n_train} train images × {epochs} epoch(s) in {seconds:.1f} s (includes per-epoch validation "
                      "and checkpoints)",
                      f"whole train() {total:.1f} s = {per_epoch * epochs / total:.0f} img/s end to end (decoding, "
                      "evaluation, plots)",
                      f"num_workers={s.num_workers}, finetune=full"]
        if on_gpu and training.get("device") != "cuda":
            raise RuntimeError(f"train() ran on {training.get('device')}, not cuda")

        # the plain loop: same architecture, images and sizes, every tensor already on the device
        import timm
        from torch.nn import functional as F

        from pellucid.core.backbones import get_backbone_spec
        from pellucid.datasets.splits import load_split

        rows = load_split(self.folder).train
        index = {c: i for i, c in enumerate(self.task.classes)}
        x_all = self.images([r.path for r in rows]).to(self.device).contiguous(memory_format=torch.channels_last)
        y_all = torch.tensor([index[r.label] for r in rows], device=self.device)
        spec = get_backbone_spec(s.backbone)
        torch.manual_seed(0)
        net = timm.create_model(spec.arch, pretrained=False, num_classes=len(self.task.classes), **spec.timm_kwargs)
        net = net.to(self.device).to(memory_format=torch.channels_last).train()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
        bs = min(s.batch_size, len(x_all))
        gen = torch.Generator(device="cpu").manual_seed(0)
        order = torch.randperm(len(x_all), generator=gen)
        cursor = [0]

        def step() -> None:
            nonlocal order
            if cursor[0] + bs > len(order):
                order, cursor[0] = torch.randperm(len(x_all), generator=gen), 0
            idx = order[cursor[0]:cursor[0] + bs].to(self.device)
            cursor[0] += bs
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=on_gpu):
                loss = F.cross_entropy(net(x_all[idx].contiguous(memory_format=torch.channels_last)), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for _ in range(s.plain_warmup):
            step()
        _sync(self.device)
        t = time.perf_counter()
        for _ in range(s.plain_steps):
            step()
        _sync(self.device)
        plain = s.plain_steps * bs / (time.perf_counter() - t)
        row.baseline = f"{plain:.0f} img/s plain timm loop ({spec.arch}, AdamW, {'bf16 autocast' if on_gpu else 'fp32'})"
        r = _ratio(ours, plain)
        row.ratio = f"{r:.2f}×" if r else "n/a"
        row.target = _target(r, 0.9, True, self.dry)

    # -- 2. predict ----------------------------------------------------------------------------
    def step_predict(self, row: Row) -> None:
        import torch

        from pellucid.datasets.readers import read_image

        predictor_cls = _predictor_api()
        if self.folder is None:
            raise RuntimeError(f"no model folder to predict with (train step: {self.train_error or 'not run'})")
        s = self.s
        try:
            pred = predictor_cls(self.folder, device=self.device)
        except TypeError as err:
            raise Skip(f"Predictor(folder, device=...) no longer works: {_one_line(err)}") from None
        from pellucid.core.runtime import model_device

        model = getattr(pred, "model", None)
        if model is None:
            raise Skip("Predictor has no .model attribute; cannot time the raw forward pass")
        if model_device(model).type != self.device.type:
            raise RuntimeError(f"Predictor put the model on {model_device(model)}, asked for {self.device}")
        files = self.files(s.predict_images)
        images = [read_image(f) for f in files]
        run_images = getattr(pred, "predict_images", None)
        if run_images is None:
            raise Skip("Predictor has no predict_images(); the in-memory predict path changed")
        try:
            run_images(images[: s.forward_batch])  # warm-up (kernels, allocator)
        except TypeError as err:  # the call itself no longer fits the rewritten API
            raise Skip(f"Predictor.predict_images(images) no longer works: {_one_line(err)}") from None
        out: list = []

        def project() -> None:
            out[:] = run_images(images)

        t_proj = _best(project, self.device, s.repeat)
        bad = [p for p in out if getattr(p, "error", "")]
        if len(out) != len(images) or bad:
            raise RuntimeError(f"predict_images returned {len(out)} results for {len(images)} images, "
                               f"{len(bad)} with errors")
        # the same preprocessed batch, straight through the model (fp32, as the predictor runs it)
        prep = getattr(pred, "preprocess", None)
        if prep is not None:
            x = torch.stack([prep(im) for im in images])
        else:
            x = self.images(files)
        x = x.to(self.device)

        def raw() -> None:
            with torch.inference_mode():
                for i in range(0, len(x), s.forward_batch):
                    model(x[i:i + s.forward_batch])

        raw()
        t_raw = _best(raw, self.device, s.repeat)
        n = len(images)
        row.pellucid = f"{n / t_proj:.0f} img/s Predictor.predict_images on {model_device(model)}"
        row.baseline = f"{n / t_raw:.0f} img/s raw model forward (fp32, batch {min(n, s.forward_batch)})"
        r = _ratio(n / t_proj, n / t_raw)
        row.ratio = f"{r:.2f}×" if r else "n/a"
        row.target = "none set (reported)"
        row.notes.append(f"{n} already-read images; predict_images includes resizing on the CPU")
        probs = getattr(pred, "probabilities", None)
        if probs is not None:
            probs(x[: s.forward_batch])

            def tensors() -> None:
                for i in range(0, len(x), s.forward_batch):
                    probs(x[i:i + s.forward_batch])

            t_tensor = _best(tensors, self.device, s.repeat)
            row.notes.append(f"Predictor.probabilities on preprocessed tensors {n / t_tensor:.0f} img/s "
                             f"({(t_raw / t_tensor):.2f}× raw)")
        run_paths = getattr(pred, "predict_paths", None)
        if run_paths is not None:
            t = time.perf_counter()
            res = run_paths(files)
            _sync(self.device)
            dt = time.perf_counter() - t
            errors = sum(1 for p in res if getattr(p, "error", ""))
            row.notes.append(f"predict_paths from files (decoding included) {len(res) / dt:.0f} img/s, {errors} errors")

    # -- 3. Grad-CAM ---------------------------------------------------------------------------
    def step_gradcam(self, row: Row) -> None:
        import torch

        from pellucid.explain import get_explainer

        s = self.s
        model = self.model(row)
        x = self.images(self.files(s.cam_images)).to(self.device)
        cam = get_explainer("gradcam")
        maps = cam.explain(model, x[:2])  # warm-up
        if maps[0].heatmap.shape != tuple(x.shape[-2:]):
            raise RuntimeError(f"Grad-CAM map shape {maps[0].heatmap.shape}, expected {tuple(x.shape[-2:])}")

        def fwd(batch) -> Callable[[], None]:
            def run() -> None:
                with torch.inference_mode():
                    model(batch)
            return run

        n = len(x)
        t_cam = _best(lambda: cam.explain(model, x), self.device, s.repeat) / n
        t_fwd = _best(fwd(x), self.device, s.repeat) / n
        t_cam1 = _best(lambda: cam.explain(model, x[:1]), self.device, s.repeat)
        t_fwd1 = _best(fwd(x[:1]), self.device, s.repeat)
        r = _ratio(t_cam, t_fwd)
        row.pellucid = f"{t_cam * 1e3:.2f} ms/image Grad-CAM (batch {n})"
        row.baseline = f"{t_fwd * 1e3:.2f} ms/image forward (batch {n}, inference mode)"
        row.ratio = f"{r:.2f}×" if r else "n/a"
        row.target = _target(r, 2.0, False, self.dry)
        row.notes.append(f"one image alone: Grad-CAM {t_cam1 * 1e3:.1f} ms vs forward {t_fwd1 * 1e3:.1f} ms "
                         f"({t_cam1 / t_fwd1:.2f}×); map includes the copy to NumPy")

    # -- 4. LIME -------------------------------------------------------------------------------
    def step_lime(self, row: Row) -> None:
        import numpy as np
        import torch
        from lime import lime_image

        from pellucid.explain import get_explainer
        from pellucid.explain.base import probabilities

        s = self.s
        model = self.model(row)
        x = self.images(self.files(s.lime_images))
        ours = get_explainer("lime", num_samples=s.lime_samples, batch_size=s.lime_batch, backend=s.lime_backend,
                             seed=0)
        ours.explain(model, x[:1])  # warm-up (runner, kernels)
        _sync(self.device)
        t = time.perf_counter()
        exps = ours.explain(model, x)
        _sync(self.device)
        t_ours = time.perf_counter() - t

        def classifier_fn(batch: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                t_ = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float().to(self.device)
                return probabilities(model(t_)).cpu().numpy()

        explainer = lime_image.LimeImageExplainer(random_state=0)
        quiet = ({"progress_bar": False} if "progress_bar" in inspect.signature(explainer.explain_instance).parameters
                 else {})  # lime >= 0.2.0.2 draws a progress bar by default
        _sync(self.device)
        t = time.perf_counter()
        for img in x:
            explainer.explain_instance(img.permute(1, 2, 0).double().numpy(), classifier_fn,
                                       num_samples=s.lime_samples, random_seed=0, **quiet)
        _sync(self.device)
        t_pkg = time.perf_counter() - t
        n = len(x)
        r = _ratio(t_pkg, t_ours)
        row.pellucid = f"{t_ours / n:.2f} s/image pellucid LIME ({s.lime_samples} samples, batch {s.lime_batch})"
        row.baseline = (f"{t_pkg / n:.2f} s/image lime LimeImageExplainer (defaults: quickshift, batch 10, "
                        f"top_labels 5; {s.lime_samples} samples; model on {self.device.type})")
        row.ratio = (f"{r:.1f}× faster" if r >= 1 else f"{1 / r:.1f}× slower") if r else "n/a"
        row.target = _target(r, 10.0, True, self.dry)
        extras = exps[0].extras
        row.notes.append(f"pellucid precision {extras.get('precision')}, backend {extras.get('backend')}, "
                         f"{extras.get('n_superpixels')} SLIC superpixels; {n} image(s)")
        check = extras.get("bfloat16_check")
        if check:
            row.notes.append(f"bf16 check passed={check.get('passed')} (max |Δp| {check.get('max_abs_diff', 0):.3f})")

    # -- 5. T-TAME -----------------------------------------------------------------------------
    def step_ttame(self, row: Row) -> None:
        from pellucid.core.runtime import model_device
        from pellucid.explain import get_explainer

        s = self.s
        model = self.model(row)
        train_imgs = self.images(self.files(s.ttame_images, part="train"))
        ttame = get_explainer("ttame", epochs=s.ttame_epochs, batch_size=s.ttame_batch, patience=s.ttame_epochs,
                              max_images=None, progress=False)
        t = time.perf_counter()
        ttame.fit(model, train_imgs)
        fit_s = time.perf_counter() - t
        info = ttame.fit_info
        att_device = model_device(ttame.attention)
        x = self.images(self.files(min(8, s.cam_images))).to(self.device)
        ttame.explain(model, x[:1])
        per_map = _best(lambda: ttame.explain(model, x), self.device, s.repeat) / len(x)
        row.pellucid = f"{fit_s:.1f} s fit ({info.get('epochs_run')} epoch(s), {info.get('train_images')} images)"
        row.baseline = "—"
        row.ratio = "—"
        row.target = f"runs on {self.device.type}"
        row.notes += [f"fit device {info.get('device')}, attention on {att_device}",
                      f"taps precompute {info.get('precompute_seconds')} s, Lightning fit {info.get('train_seconds')} s",
                      f"{per_map * 1e3:.2f} ms/map after fitting (batch {len(x)})"]
        if str(info.get("device", "")).split(":")[0] != self.device.type or att_device.type != self.device.type:
            raise RuntimeError(f"T-TAME trained on {info.get('device')} (attention on {att_device}), "
                               f"expected {self.device.type}")

    # -- 6. DDP --------------------------------------------------------------------------------
    def step_ddp(self, row: Row) -> None:
        import torch

        s = self.s
        if self.device.type == "cuda":
            n_gpu = torch.cuda.device_count()
            attempts = [("nccl", "cuda", True)] if n_gpu >= 2 else [("nccl", "cuda", False), ("gloo", "cuda", False)]
        else:  # a gloo process group on a busy CPU sometimes aborts at start-up: one retry, noted in the row
            attempts = [("gloo", "cpu", False), ("gloo", "cpu", False)]
        reasons = []
        for backend, device, separate in attempts:
            t = time.perf_counter()
            result, reason = _launch_ddp({
                "backend": backend, "device": device, "separate": separate, "backbone": s.backbone,
                "image_size": s.image_size, "batch": s.ddp_batch, "steps": s.ddp_steps,
                "classes": len(self.task.classes), "timeout": s.ddp_timeout, "dry": self.dry}, s.ddp_timeout)
            took = time.perf_counter() - t
            if result is None:
                reasons.append(f"{backend} on {device}: {reason}")
                row.notes.append(f"{backend} on {device} failed after {took:.0f} s: {reason}")
                continue
            where = "two GPUs" if separate else ("one GPU shared" if device == "cuda" else "CPU")
            row.pellucid = (f"{result['img_per_s']:.0f} img/s over 2 processes ({backend}, {where}, "
                            f"{s.ddp_steps} steps of {s.ddp_batch}/process)")
            row.baseline = "—"
            row.ratio = "—"
            row.target = "gradients all-reduced, parameters equal on both ranks"
            row.notes.append(f"max |param rank0 − mean| {result['max_param_diff']:.2e} after training; "
                             f"2 processes, torch.distributed {backend}, {result['device']}")
            if result["max_param_diff"] > 1e-5:
                raise RuntimeError(f"parameters differ across ranks by {result['max_param_diff']:.2e}")
            return
        if self.device.type == "cuda" and torch.cuda.device_count() < 2:
            raise Skip("not possible on one GPU: " + "; ".join(reasons))
        raise RuntimeError("; ".join(reasons))


def _predictor_api():
    """The public ``Predictor`` class, or :class:`Skip` naming what changed."""
    try:
        mod = importlib.import_module("pellucid.core.predict")
    except Exception as err:  # another engineer is rewriting predict: say so, do not crash
        raise Skip(f"pellucid.core.predict does not import ({_one_line(err, 160)})") from None
    cls = getattr(mod, "Predictor", None)
    if cls is None:
        raise Skip("pellucid.core.predict has no Predictor any more")
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        params = {}
    if "device" not in params:
        raise Skip(f"Predictor{inspect.signature(cls) if params else ''} takes no device= argument")
    return cls


# --------------------------------------------------------------------------------------- DDP
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _last_error(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "error" in ln:
            return ln[:200]
    return (lines[-1][:200] if lines else "no output")


def _launch_ddp(settings: dict, timeout: float) -> tuple[dict | None, str]:
    """Run :func:`ddp_worker` in two processes; ``(rank 0's result, "")`` or ``(None, reason)``."""
    env = dict(os.environ)
    env.update({DDP_ENV: json.dumps(settings), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(_free_port()), "PELLUCID_OFFLINE": env.get("PELLUCID_OFFLINE", "1")})
    if settings["device"] == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    code = "import bench.gpu_check as g; raise SystemExit(g.ddp_worker())"
    with tempfile.TemporaryDirectory(prefix="gpu_check_ddp_") as tmp:
        procs, logs = [], []
        for rank in range(2):
            out = open(Path(tmp) / f"rank{rank}.out", "w+")
            err = open(Path(tmp) / f"rank{rank}.err", "w+")
            logs.append((out, err))
            procs.append(subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=out, stderr=err,
                                          env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}))
        deadline = time.monotonic() + timeout
        timed_out = False
        for p in procs:
            try:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
        for p in procs:  # only the two processes started here
            if p.poll() is None:
                p.kill()
                p.wait()
        texts = []
        for out, err in logs:
            out.seek(0)
            err.seek(0)
            texts.append((out.read(), err.read()))
            out.close()
            err.close()
    if timed_out:
        return None, f"timed out after {timeout:.0f} s ({_last_error(texts[0][1] + texts[1][1])})"
    codes = [p.returncode for p in procs]
    if any(codes):
        bad = next(i for i, c in enumerate(codes) if c)
        return None, f"rank {bad} exited {codes[bad]}: {_last_error(texts[bad][1])}"
    for line in reversed(texts[0][0].splitlines()):
        if line.startswith("{"):
            return json.loads(line), ""
    return None, "rank 0 printed no result"


def ddp_worker() -> int:
    """One rank of the DDP step (started by :func:`_launch_ddp`; settings in ``$PELLUCID_GPU_CHECK_DDP``)."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    from torch.nn import functional as F
    from torch.nn.parallel import DistributedDataParallel

    from pellucid.core.model import build_classifier

    cfg = json.loads(os.environ[DDP_ENV])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cuda = cfg["device"] == "cuda"
    device = torch.device("cuda", rank if cfg["separate"] else 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(cfg["backend"], rank=rank, world_size=world,
                            timeout=timedelta(seconds=max(10, int(cfg["timeout"]) - 10)))
    try:
        torch.manual_seed(0)  # same initial weights on both ranks (DDP also broadcasts rank 0's)
        model, _ = build_classifier(cfg["backbone"], cfg["classes"], pretrained=False)
        model = model.to(device)
        if cuda:
            model = model.to(memory_format=torch.channels_last)
        ddp = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
        opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(rank + 1)  # each rank its own batch
        s = cfg["image_size"]
        x = torch.rand(cfg["batch"], 3, s, s, generator=g).to(device)
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, cfg["classes"], (cfg["batch"],), generator=g).to(device)

        def step() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                loss = F.cross_entropy(ddp(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        step()  # warm-up
        if cuda:
            torch.cuda.synchronize(device)
        dist.barrier()
        t = time.perf_counter()
        for _ in range(cfg["steps"]):
            step()
        if cuda:
            torch.cuda.synchronize(device)
        dist.barrier()
        seconds = time.perf_counter() - t
        vec = torch.cat([p.detach().float().flatten() for p in model.parameters()])
        mean = vec.clone()
        dist.all_reduce(mean)
        diff = float((mean / world - vec).abs().max())
        if rank == 0:
            print(json.dumps({"img_per_s": world * cfg["batch"] * cfg["steps"] / seconds, "max_param_diff": diff,
                              "device": str(device), "backend": cfg["backend"]}), flush=True)
    finally:
        dist.destroy_process_group()
    return 0


# --------------------------------------------------------------------------------------- main
def run_checks(dry_run: bool, out: Path, data: Path = DATA, settings: Settings | None = None,
               steps: tuple[str, ...] = STEPS) -> list[Row]:
    """Run the steps, write and print the table; returns the rows."""
    import torch

    settings = settings or (DRY if dry_run else Settings())
    device = torch.device("cpu") if dry_run else torch.device("cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        check = Check(settings, device, Path(data) / settings.task, Path(work), dry_run)
        for name in steps:
            row = Row(step=name)
            print(f"[gpu_check] {name} ...", file=sys.stderr, flush=True)
            t = time.perf_counter()
            try:
                getattr(check, f"step_{name}")(row)
                row.status = "ok"
            except Skip as why:
                row.status = f"skipped: {_one_line(why)}"
            except Exception as err:  # one failing step must not hide the others
                row.status = f"failed: {_one_line(err)}"
            row.seconds = time.perf_counter() - t
            print(f"[gpu_check] {name}: {row.status} ({row.seconds:.1f} s)", file=sys.stderr, flush=True)
            rows.append(row)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        header = environment(device)
    lines = render(rows, header, settings, dry_run)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwritten to {out}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="every step on the CPU with tiny settings (checks the wiring; numbers mean nothing)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"Markdown table (default: {OUT.relative_to(ROOT)} on a GPU run, {DRY_OUT} for "
                             "--dry-run)")
    parser.add_argument("--data", type=Path, default=DATA, help="sample data root (default ../shared/data)")
    parser.add_argument("--task", default=None, help="app to train (default waste)")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("PELLUCID_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); run on a GPU machine, or use "
              "--dry-run to exercise the steps on the CPU", file=sys.stderr)
        return 2
    steps = tuple(s.strip() for s in args.steps.split(",") if s.strip())
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        parser.error(f"unknown step(s) {unknown}; choose from {', '.join(STEPS)}")
    settings = DRY if args.dry_run else Settings()
    if args.task:
        settings = replace(settings, task=args.task)
    if not (args.data / settings.task).is_dir():
        print(f"gpu_check: sample data {args.data / settings.task} absent (expected ../shared/data beside the "
              "repository, or give --data)", file=sys.stderr)
        return 2
    out = args.out
    if out is None:
        out = OUT if not args.dry_run else DRY_OUT
    rows = run_checks(args.dry_run, out, args.data, settings, steps)
    return 1 if any(r.status.startswith("failed") for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
