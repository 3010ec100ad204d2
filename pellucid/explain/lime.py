"""LIME for images, wrapped: seeded end to end, batched, vectorised.

LIME (Ribeiro, Singh & Guestrin, "'Why Should I Trust You?': Explaining the Predictions of Any
Classifier", KDD 2016) splits the image into superpixels, hides random subsets of them, runs the
model on every perturbed image and fits a weighted linear model of the class probability on the
on/off pattern; a superpixel's coefficient is its evidence. The heatmap here shows the positive
coefficients, scaled so the strongest superpixel is 1.

What the ``lime`` package does and what this wrapper does:

* segmentation: SLIC (default; compact, fast) or Quickshift (lime's own default), both from
  scikit-image, seeded;
* perturbations: the on/off matrix is drawn from ``numpy.random.RandomState(seed)`` exactly as
  lime's ``LimeImageExplainer.data_labels`` draws it, but the perturbed images are composed in one
  vectorised step per chunk; lime's loop builds each image with one mask per hidden segment.
* model calls: lime's own bookkeeping is only about a tenth of its time — the 1000 forward passes
  are the rest, so how they run decides the speed. Here they run through
  :func:`pellucid.core.runtime.fast_forward`: on CPU the model exported once (in memory) to ONNX
  Runtime, which folds BatchNorm into the convolutions and runs depthwise convolutions well, checked
  against the model before use (eager PyTorch with channels-last inputs when ONNX Runtime is not
  installed or the graph disagrees); optionally in INT8 or bfloat16, each checked against float32
  on every image (``precision=``);
* the weighted ridge fit is lime's own ``LimeBase.explain_instance_with_data`` with lime's image
  kernel (exponential on cosine distance, width 0.25), for the target class only.

So the same image, options and seed always give the same map (lime issues #67, #477), and
different seeds give different samples. :meth:`LimeExplainer.stability` measures how much the map
moves across seeds.
"""
from __future__ import annotations

import itertools
import warnings
from functools import partial
from typing import Sequence

import numpy as np
import torch
from torch import nn

from pellucid.core.runtime import BACKENDS, fast_forward, model_device, openvino_bf16_available
from pellucid.explain.base import (
    Explainer,
    check_images,
    n_outputs,
    normalize_targets,
    preserved_model,
    probabilities,
    register_explainer,
)
from pellucid.registry import unknown_name_error

__all__ = ["LimeExplainer", "segment", "lime_kernel", "heatmap_from_weights", "heatmap_from_lime", "spearman"]

SEGMENTATIONS = ("slic", "quickshift")
PRECISIONS = ("auto", "float32", "bfloat16", "int8")
INT8_CALIBRATION = 16  # perturbed images of the first explained image that calibrate the INT8 graph
PRECISION_CHECK = 16  # perturbed images of every image run in the reduced precision and float32 before it is trusted
TOL_MEAN = 0.02  # largest mean |change| of the target-class probability the reduced precision may cause on them ...
TOL_MAX = 0.1  # ... and largest single change; otherwise the image is explained in float32
CONVERGE_RHO = 0.95  # stop sampling once two successive fits rank the superpixels this alike (and share the top 5)
MIN_SAMPLES = 300  # ... but never before this many perturbed images
CONVERGE_STEP = 100  # perturbed images between convergence checks
MAX_SAMPLES = 100_000  # perturbed images per image a caller may ask for (each is a forward pass)
MAX_SEGMENTS = 5_000  # superpixels per image (the perturbation matrix is samples x superpixels)


_device_of = model_device


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively (CUDA with bf16; CPU with oneDNN bf16 support)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def lime_kernel(distances: np.ndarray, kernel_width: float = 0.25) -> np.ndarray:
    """lime's image kernel: ``sqrt(exp(-d² / width²))`` of cosine distances to the original."""
    return np.sqrt(np.exp(-(distances ** 2) / kernel_width ** 2))


def segment(image: np.ndarray, method: str = "slic", *, n_segments: int = 50, compactness: float = 10.0,
            kernel_size: float = 4, max_dist: float = 200, ratio: float = 0.2, seed: int = 0) -> np.ndarray:
    """Superpixels of an RGB image ``(H, W, 3)`` in [0, 1] → labels ``(H, W)`` numbered ``0..n-1``.

    Args:
        method: ``"slic"`` (``n_segments``, ``compactness``) or ``"quickshift"`` (``kernel_size``,
            ``max_dist``, ``ratio``; lime's defaults), seeded with ``seed``.
    """
    from skimage.segmentation import quickshift, slic

    image = np.ascontiguousarray(image, dtype=np.float64)
    if method == "slic":
        seg = slic(image, n_segments=n_segments, compactness=compactness, start_label=0, channel_axis=-1)
    elif method == "quickshift":
        seg = quickshift(image, kernel_size=kernel_size, max_dist=max_dist, ratio=ratio, rng=seed, channel_axis=-1)
    else:
        raise unknown_name_error("segmentation", method, list(SEGMENTATIONS))
    _, seg = np.unique(seg, return_inverse=True)
    return seg.reshape(image.shape[:2]).astype(np.int64)


def heatmap_from_weights(segments: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Positive superpixel weights painted on their pixels, scaled to max 1; ``(H, W)`` float32."""
    pos = np.maximum(np.asarray(weights, dtype=np.float64), 0.0)
    top = pos.max() if pos.size else 0.0
    if top <= 0:
        return np.zeros(segments.shape, dtype=np.float32)
    return (pos / top)[segments].astype(np.float32)


def heatmap_from_lime(explanation, label: int) -> np.ndarray:
    """Heatmap of a ``lime_image.ImageExplanation`` for ``label``, same convention as
    :func:`heatmap_from_weights` (used to compare against lime run directly)."""
    segments = explanation.segments
    _, dense = np.unique(segments, return_inverse=True)
    dense = dense.reshape(segments.shape)
    ids = np.unique(segments)
    weights = np.zeros(len(ids))
    lookup = {s: i for i, s in enumerate(ids)}
    for f, w in explanation.local_exp[label]:
        weights[lookup[f]] = w
    return heatmap_from_weights(dense, weights)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps (ties get average ranks).

    Identical maps give 1; if exactly one map is flat the maps share no ranking and give 0.
    """
    from scipy.stats import spearmanr

    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if np.array_equal(a, b):
        return 1.0
    flat_a, flat_b = np.ptp(a) == 0, np.ptp(b) == 0
    if flat_a or flat_b:
        return 0.0
    return float(spearmanr(a, b).statistic)


@register_explainer
class LimeExplainer(Explainer):
    """LIME on superpixels, seeded and batched.

    Args:
        num_samples: perturbed images per explained image (the first is the unperturbed image).
        segmentation: ``"slic"`` or ``"quickshift"``.
        n_segments, compactness: SLIC options.
        kernel_size, max_dist, ratio: Quickshift options (lime's defaults).
        hide_color: value hidden superpixels take; None (lime's default) uses each superpixel's
            mean colour.
        kernel_width: width of lime's exponential kernel on cosine distance.
        batch_size: perturbed images per model call. Small batches are fastest on CPU: on the
            benchmark machine EfficientNet-Lite0 at 224 px ran fastest per image in batches of 4–10
            and up to twice as slow per image in batches of 16–32 (activations fall out of cache).
            Raise it on a GPU.
        precision: precision of the perturbation passes. ``"auto"`` (default): bfloat16 where the
            device computes it natively — on the CPU through OpenVINO (AVX512-BF16 or AMX; the
            ``openvino`` extra), on GPUs with bf16 through autocast — **checked on every image** as
            below and falling back to float32 quietly (the extras say so); float32 elsewhere.
            ``"float32"``: the same numbers as lime itself. ``"bfloat16"``: always try bfloat16
            (OpenVINO on a CPU with native bfloat16, else PyTorch's autocast — on the 2-core
            benchmark CPU autocast ran slower than float32 ONNX Runtime). ``"int8"``: an INT8 ONNX
            Runtime graph (static quantization with the first convolution and the classifier left in
            float32, calibrated on the first 16 perturbed images of the first image explained with
            that model, then cached; needs ``pellucid[export]``). The check: the first 16 perturbed
            copies of each image run in the reduced precision and in float32, and it is used for the
            rest only if the target-class probability moved by at most 0.02 on average and 0.1 at most
            (``TOL_MEAN``, ``TOL_MAX``); otherwise the image is explained in float32 (with a warning
            when the precision was asked for by name). It matters on fine-tuned models: on the TB
            chest X-ray model (logits up to ±11) INT8 moved the probability by up to 0.74 and
            bfloat16 by up to 0.4 on most images (rejected there), on the waste and sonar models
            bfloat16 stayed within 0.08 (accepted on every test image benchmarked).
            ``extras["<precision>_check"]`` records each check (images, mean and max change,
            passed, runner) and ``extras["precision"]`` what was used. The explained class is
            always decided in float32.
        backend: what runs the float32 perturbation passes (:func:`pellucid.core.runtime.fast_forward`):
            ``"auto"`` (default: ONNX Runtime on CPU when installed — the model exported in memory
            once per model and image shape, checked against the model — else eager PyTorch),
            ``"torch"`` (also makes bfloat16 use autocast) or ``"onnxruntime"``.
        seed: seeds the segmentation, the perturbation matrix and the ridge fit.
        progress: show a progress bar over images.
        converge: stop drawing perturbations once the fit has settled: after ``min_samples`` and then
            every ``CONVERGE_STEP`` images the ridge fit is redone, and sampling stops when two
            successive fits rank the superpixels alike (Spearman ≥ ``converge``) with the same five
            strongest superpixels. The rows used are the first rows of lime's own draw, so the map is
            what a full run would give with that many samples, and the same seed gives the same map.
            ``None``: always ``num_samples`` (lime's behaviour). ``extras["samples_used"]`` says how
            many ran. Faithfulness of both is compared in ``bench/bench_explain.py``.
        min_samples: the fewest perturbed images before convergence is checked.
    """

    name = "lime"
    needs_gradients = False

    def __init__(self, num_samples: int = 1000, segmentation: str = "slic", n_segments: int = 50,
                 compactness: float = 10.0, kernel_size: float = 4, max_dist: float = 200, ratio: float = 0.2,
                 hide_color: float | None = None, kernel_width: float = 0.25, batch_size: int = 8,
                 precision: str = "auto", backend: str = "auto", seed: int = 0, progress: bool = False,
                 converge: float | None = CONVERGE_RHO, min_samples: int = MIN_SAMPLES):
        if segmentation not in SEGMENTATIONS:
            raise unknown_name_error("segmentation", segmentation, list(SEGMENTATIONS))
        if precision not in PRECISIONS:
            raise unknown_name_error("precision", precision, list(PRECISIONS))
        if backend not in BACKENDS:
            raise unknown_name_error("backend", backend, list(BACKENDS))
        if precision == "int8" and backend == "torch":
            raise ValueError("precision='int8' runs on ONNX Runtime: use backend='auto' or 'onnxruntime'")
        if num_samples < 2:
            raise ValueError(f"num_samples must be at least 2 (got {num_samples})")
        if num_samples > MAX_SAMPLES:  # 10**8 had asked numpy for 33 GB before a single forward pass
            raise ValueError(f"num_samples must be at most {MAX_SAMPLES:,} (got {num_samples:,}); the default is 1,000")
        if not 1 <= n_segments <= MAX_SEGMENTS:
            raise ValueError(f"n_segments must be from 1 to {MAX_SEGMENTS:,} (got {n_segments:,}); the default is 50")
        super().__init__(num_samples=num_samples, segmentation=segmentation, n_segments=n_segments,
                         compactness=compactness, kernel_size=kernel_size, max_dist=max_dist, ratio=ratio,
                         hide_color=hide_color, kernel_width=kernel_width, batch_size=batch_size,
                         precision=precision, backend=backend, seed=seed, progress=progress,
                         converge=converge, min_samples=min_samples)
        if converge is not None and not 0 < converge <= 1:
            raise ValueError(f"converge must be in (0, 1] or None (got {converge})")
        self.num_samples = num_samples
        self.segmentation = segmentation
        self.seg_options = dict(n_segments=n_segments, compactness=compactness, kernel_size=kernel_size,
                                max_dist=max_dist, ratio=ratio)
        self.hide_color = hide_color
        self.kernel_width = kernel_width
        self.batch_size = batch_size
        self.precision = precision
        self.backend = backend
        self.seed = seed
        self.progress = progress
        self.converge = converge
        self.min_samples = max(2, int(min_samples))

    # ------------------------------------------------------------------------------------------
    def _explain(self, model: nn.Module, images: torch.Tensor, targets: list[int] | None):
        from tqdm.auto import tqdm

        maps, found = [], []
        for i in tqdm(range(images.shape[0]), desc="lime", disable=not self.progress, leave=False):
            t = None if targets is None else targets[i]
            heat, target, extras = self.explain_one(model, images[i], t, seed=self.seed)
            maps.append((heat, extras))
            found.append(target)
        return maps, found

    def explain_one(self, model: nn.Module, image: torch.Tensor, target: int | None, seed: int
                    ) -> tuple[np.ndarray, int, dict]:
        """Explain one image ``(3, H, W)``; returns ``(heatmap, target, extras)``.

        ``extras`` holds ``segments`` ``(H, W)``, the superpixel ``weights``, the fit's ``r2``,
        ``intercept`` and ``local_pred``, and the ``precision`` of the perturbation passes.
        """
        img = image.detach().float().cpu()
        hwc = img.permute(1, 2, 0).numpy()
        if hwc.shape[2] == 1:
            hwc = np.repeat(hwc, 3, axis=2)
        segments = segment(hwc, self.segmentation, seed=seed, **self.seg_options)
        n_seg = int(segments.max()) + 1
        if n_seg < 4:
            warnings.warn(f"{self.segmentation} found only {n_seg} superpixel(s) in a {hwc.shape[0]}x{hwc.shape[1]} "
                          "image, so the LIME map says little; raise n_segments, lower compactness or use "
                          "segmentation='quickshift'", stacklevel=4)

        # lime's draw: randint(0, 2, num_samples * n_features), first row = the original image.
        rs = np.random.RandomState(seed)
        data = rs.randint(0, 2, self.num_samples * n_seg).reshape((self.num_samples, n_seg))
        data[0, :] = 1

        if self.hide_color is None:
            counts = np.bincount(segments.ravel(), minlength=n_seg).astype(np.float64)
            means = np.stack([np.bincount(segments.ravel(), weights=img[c].numpy().ravel().astype(np.float64),
                                          minlength=n_seg) / counts for c in range(img.shape[0])], axis=1)
            fudged = torch.from_numpy(means[segments].astype(np.float32)).permute(2, 0, 1)
        else:
            fudged = torch.full_like(img, float(self.hide_color))

        with torch.inference_mode():  # the predicted class is always decided in float32
            output = model(img[None].to(_device_of(model)))
        if target is None:
            target = int(probabilities(output).argmax(1)[0])
        n_classes = n_outputs(output)
        if not 0 <= target < n_classes:
            raise ValueError(f"target class {target} out of range: the model has {n_classes} classes")
        labels, used, checks, weights, fit = self._sample_and_fit(model, img, fudged, segments, data, target, seed)
        heat = heatmap_from_weights(segments, weights)
        extras = {"segments": segments, "weights": weights, **fit,
                  "precision": used, "backend": self._backend_used, "segmentation": self.segmentation,
                  "num_samples": self.num_samples, "samples_used": int(len(labels)), "n_superpixels": n_seg}
        for prec, check in checks.items():
            extras[f"{prec}_check"] = check
        return heat, target, extras

    def _stops(self) -> list[int]:
        """Sample counts after which the fit is checked for convergence (the last is ``num_samples``)."""
        if self.converge is None or self.num_samples <= self.min_samples:
            return [self.num_samples]
        return [*range(self.min_samples, self.num_samples, CONVERGE_STEP), self.num_samples]

    def _sample_and_fit(self, model: nn.Module, img: torch.Tensor, fudged: torch.Tensor, segments: np.ndarray,
                        data: np.ndarray, target: int, seed: int) -> tuple[np.ndarray, str, dict, np.ndarray, dict]:
        """Run the perturbed images in stages and refit after each; stop once the fit has converged.

        The rows of ``data`` are lime's draw in order, so stopping after ``k`` rows uses exactly the
        first ``k`` perturbations a full run would; with ``converge`` set, the run stops at the first
        stage (after ``min_samples``, then every ``CONVERGE_STEP``) whose superpixel weights rank like
        the previous stage's (Spearman ≥ ``converge``) with the same five strongest superpixels.

        Returns:
            ``(probabilities of the rows used, precision used, checks, weights, fit statistics)``.
        """
        segs = torch.from_numpy(segments)
        parts: list[np.ndarray] = []
        used, checks, prev = "float32", {}, None
        for stop in self._stops():
            start = sum(len(p) for p in parts)
            if not parts:
                probs, used, checks = self._predict(model, img, fudged, segs, data[:stop], target)
            else:
                probs = self._predict(model, img, fudged, segs, data[start:stop], target, fixed=used)[0]
            parts.append(probs)
            labels = np.concatenate(parts)
            weights, fit = self._fit(data[:stop], labels, target, seed, int(segments.max()) + 1)
            if prev is not None and _converged(prev, weights, self.converge):
                break
            prev = weights
        return labels, used, checks, weights, fit

    def _fit(self, data: np.ndarray, labels: np.ndarray, target: int, seed: int, n_seg: int
             ) -> tuple[np.ndarray, dict]:
        """lime's weighted ridge fit of the target-class probability on the on/off rows."""
        from lime.lime_base import LimeBase
        from sklearn.metrics import pairwise_distances

        distances = pairwise_distances(data, data[0].reshape(1, -1), metric="cosine").ravel()
        base = LimeBase(partial(lime_kernel, kernel_width=self.kernel_width),
                        random_state=np.random.RandomState(seed))
        intercept, exp, r2, local_pred = base.explain_instance_with_data(
            data, labels, distances, target, num_features=n_seg, feature_selection="none")
        weights = np.zeros(n_seg)
        for f, w in exp:
            weights[f] = w
        return weights, {"r2": float(r2), "intercept": float(intercept), "local_pred": float(np.ravel(local_pred)[0])}

    def _reduced_precision(self, device: torch.device) -> str | None:
        """The reduced precision to try (and check) on ``device``, or None for float32 throughout."""
        if self.precision in ("int8", "bfloat16"):
            return self.precision
        if self.precision == "auto" and (openvino_bf16_available() if device.type == "cpu" else native_bf16(device)):
            return "bfloat16"  # on the CPU only through OpenVINO: PyTorch's CPU autocast ran slower than float32
        return None

    def _predict(self, model: nn.Module, image: torch.Tensor, fudged: torch.Tensor, segments: torch.Tensor,
                 data: np.ndarray, target: int, fixed: str | None = None) -> tuple[np.ndarray, str, dict]:
        """Class probabilities ``(N, C)`` of the perturbed images described by ``data`` ``(N, S)``.

        Returns ``(probabilities, precision used, {precision: check})``. A reduced precision
        (INT8, bfloat16) is used only after its check: the first ``PRECISION_CHECK`` perturbed
        images run in it and in float32, and it must keep the target-class probability within
        ``TOL_MEAN`` on average and ``TOL_MAX`` at most; else float32. ``fixed`` names a precision
        already chosen for this image (a later stage of the same image): no check then.

        On the CPU the perturbed images are composed with NumPy straight into the contiguous NCHW
        batches the runner takes, and the logits are turned into probabilities once at the end: the
        loop then does nothing but compose and run, so no PyTorch thread pool wakes up between ONNX
        Runtime calls (on two cores that contention cost a third of the time). On a GPU they are
        composed there.
        """
        device = _device_of(model)
        chw = tuple(image.shape)
        on = data.astype(bool)
        prec = self._reduced_precision(device) if fixed is None else (None if fixed == "float32" else fixed)
        if _compose_on_device(device):
            if prec == "int8":
                warnings.warn(f"LIME: INT8 passes run on the CPU and this model is on {device}; the map was "
                              "computed in float32 there", stacklevel=5)
                prec = None

            def logits_of(start: int, stop: int, precision: str) -> np.ndarray:
                return self._logits_torch(model, image, fudged, segments, on[start:stop], precision == "bfloat16")
        else:
            img = np.ascontiguousarray(image.numpy(), dtype=np.float32)
            fud = np.ascontiguousarray(fudged.numpy(), dtype=np.float32)
            flat = segments.numpy().ravel()

            def compose(start: int, stop: int) -> np.ndarray:
                # the hidden-colour image, then the kept superpixels copied in: the same values as
                # np.where(mask, img, fud) at a third of its time (np.take beats fancy indexing for the mask)
                keep = np.take(on[start:stop], flat, axis=1).reshape(stop - start, 1, *chw[1:])
                out = np.empty((stop - start, *chw), dtype=np.float32)
                out[:] = fud
                np.copyto(out, img, where=keep)
                return out

            def runner(precision: str):
                if precision == "int8":  # calibrated on this image's first perturbed copies (then cached)
                    calibration = torch.from_numpy(compose(0, min(len(data), INT8_CALIBRATION)))
                    return fast_forward(model, chw, "onnxruntime", int8_calibration=calibration)
                return fast_forward(model, chw, self.backend, bfloat16=precision == "bfloat16")

            def logits_of(start: int, stop: int, precision: str) -> np.ndarray:
                run = runner(precision)
                self._backend_used = getattr(run, "backend", "torch")
                return np.concatenate([_logits(run, compose(s, min(s + self.batch_size, stop)))
                                       for s in range(start, stop, self.batch_size)])

        if prec is None:
            return _probs(logits_of(0, len(data), "float32")), "float32", {}
        if fixed is not None:
            return _probs(logits_of(0, len(data), prec)), prec, {}
        n = min(len(data), PRECISION_CHECK)
        ref = logits_of(0, n, "float32")
        float32_backend = self._backend_used
        try:
            got = logits_of(0, n, prec)
        except Exception as err:  # noqa: BLE001 - a reduced-precision runner this CPU cannot run: float32 it is
            got = np.full_like(ref, np.nan)
            warnings.warn(f"LIME: the {prec} runner failed on this CPU ({type(err).__name__}); float32 used",
                          stacklevel=5)
        check = self._check(ref, got, target, prec)
        check["backend"] = self._backend_used
        if n == len(data):  # every pass was part of the check: all of them ran in float32
            self._backend_used = float32_backend
            return _probs(ref), "float32", {prec: check}
        used = prec if check["passed"] else "float32"
        return _probs(np.concatenate([ref, logits_of(n, len(data), used)])), used, {prec: check}

    def _check(self, ref: np.ndarray, got: np.ndarray, target: int, precision: str) -> dict:
        """Compare reduced-precision logits with float32 ones on the same perturbed images (a runner
        that returns the wrong shape or non-finite values fails the check)."""
        if got.shape != ref.shape or not np.isfinite(got).all():
            got = np.full_like(ref, np.nan)
        diff = np.nan_to_num(np.abs(_probs(ref)[:, target] - _probs(got)[:, target]), nan=1.0)
        check = {"images": int(len(diff)), "mean_abs_diff": float(diff.mean()), "max_abs_diff": float(diff.max()),
                 "passed": bool(diff.mean() <= TOL_MEAN and diff.max() <= TOL_MAX)}
        if not check["passed"] and self.precision != "auto":  # auto expects to fall back; it is in the extras
            warnings.warn(
                f"LIME: {precision} moved the target-class probability of this image's first {len(diff)} perturbed "
                f"copies by {check['mean_abs_diff']:.3f} on average (max {check['max_abs_diff']:.3f}; allowed "
                f"{TOL_MEAN} / {TOL_MAX}), so the map was computed in float32", stacklevel=6)
        return check

    def _logits_torch(self, model: nn.Module, image: torch.Tensor, fudged: torch.Tensor, segments: torch.Tensor,
                      on: np.ndarray, bf16: bool) -> np.ndarray:
        """Logits of perturbed images composed on the model's device (a GPU) with PyTorch, channels-last."""
        device = _device_of(model)
        run = fast_forward(model, tuple(image.shape), self.backend, bfloat16=bf16)
        self._backend_used = getattr(run, "backend", "torch")
        image = image.to(device).permute(1, 2, 0)
        fudged = fudged.to(device).permute(1, 2, 0)
        segments = segments.to(device)
        on = torch.from_numpy(on).to(device)
        out = []
        with torch.inference_mode():
            for start in range(0, len(on), self.batch_size):
                keep = on[start:start + self.batch_size][:, segments, None]  # (n, H, W, 1)
                batch = torch.where(keep, image, fudged).permute(0, 3, 1, 2)  # channels-last strides
                out.append(run(batch).float().cpu())
        return torch.cat(out).numpy()

    # ------------------------------------------------------------------------------------------
    def stability(self, model: nn.Module, image: torch.Tensor, seeds: Sequence[int] = (0, 1, 2),
                  target: int | None = None, top_fraction: float = 0.2) -> dict:
        """How much the map of one image moves across seeds.

        Args:
            image: ``(3, H, W)`` (or ``(1, 3, H, W)``) in [0, 1].
            seeds: at least two seeds.
            target: class to explain (None: predicted).
            top_fraction: share of the image counted as each map's "top" region.

        Returns:
            ``{"spearman": mean pairwise Spearman correlation of the maps, "top_iou": mean pairwise
            IoU of the top regions, "seeds": [...]}``; 1.0 means identical maps.
        """
        if len(seeds) < 2:
            raise ValueError(f"stability needs at least two seeds; got {list(seeds)}")
        images = check_images(image)
        if images.shape[0] != 1:
            raise ValueError(f"stability explains one image; got a batch of {images.shape[0]}")
        t = normalize_targets(target, 1)
        maps = []
        with preserved_model(model):
            model.eval()
            for s in seeds:
                heat, found, _ = self.explain_one(model, images[0], None if t is None else t[0], seed=int(s))
                t = [found]
                maps.append(heat)
        rhos, ious = [], []
        for a, b in itertools.combinations(maps, 2):
            rhos.append(spearman(a, b))
            ious.append(_top_iou(a, b, top_fraction))
        return {"spearman": float(np.mean(rhos)), "top_iou": float(np.mean(ious)), "seeds": [int(s) for s in seeds]}


def _top_region(m: np.ndarray, fraction: float) -> np.ndarray:
    if m.max() <= 0:
        return np.zeros(m.shape, dtype=bool)
    cut = np.quantile(m, 1 - fraction)
    return (m >= cut) & (m > 0)


def _top_iou(a: np.ndarray, b: np.ndarray, fraction: float) -> float:
    ta, tb = _top_region(a, fraction), _top_region(b, fraction)
    union = (ta | tb).sum()
    if union == 0:
        warnings.warn("both LIME maps are empty (no positive superpixel): top-region IoU is undefined",
                      stacklevel=3)
        return float("nan")
    return float((ta & tb).sum() / union)


def _converged(prev: np.ndarray, weights: np.ndarray, rho: float, top: int = 5) -> bool:
    """Whether two successive fits agree: Spearman of the weights ≥ ``rho`` and the same ``top`` strongest."""
    k = min(top, len(weights))
    same_top = set(np.argsort(-prev)[:k]) == set(np.argsort(-weights)[:k])
    return same_top and spearman(prev, weights) >= rho


def _compose_on_device(device: torch.device) -> bool:
    """Whether LIME composes and runs its perturbed images with PyTorch on the model's device (GPUs)."""
    return device.type != "cpu"


def _logits(run, batch: np.ndarray) -> np.ndarray:
    """Logits of a runner from :func:`fast_forward` on an NCHW float32 batch, as a NumPy array."""
    return run(torch.from_numpy(batch)).detach().float().cpu().numpy()


def _probs(logits: np.ndarray) -> np.ndarray:
    """Probabilities ``(N, C)`` (float64) of logits, as :func:`pellucid.explain.base.probabilities`."""
    return probabilities(torch.from_numpy(np.asarray(logits, dtype=np.float32))).double().numpy()
