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
  installed or the graph disagrees); optionally in bfloat16 autocast instead (``precision=``);
* the weighted ridge fit is lime's own ``LimeBase.explain_instance_with_data`` with lime's image
  kernel (exponential on cosine distance, width 0.25), for the target class only.

So the same image, options and seed always give the same map (lime issues #67, #477), and
different seeds give different samples. :meth:`LimeExplainer.stability` measures how much the map
moves across seeds.
"""
from __future__ import annotations

import contextlib
import itertools
import warnings
from functools import partial
from typing import Sequence

import numpy as np
import torch
from torch import nn

from pellucid.core.runtime import BACKENDS, fast_forward, model_device
from pellucid.explain.base import (
    Explainer,
    check_images,
    normalize_targets,
    preserved_model,
    probabilities,
    register_explainer,
)

__all__ = ["LimeExplainer", "segment", "lime_kernel", "heatmap_from_weights", "heatmap_from_lime", "spearman"]

SEGMENTATIONS = ("slic", "quickshift")
PRECISIONS = ("auto", "float32", "bfloat16", "int8")
INT8_CALIBRATION = 16  # perturbed images of the first explained image that calibrate the INT8 graph


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
        from pellucid.core.backbones import unknown_name_error

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
        precision: precision of the perturbation passes: ``"float32"`` (default; the same numbers
            as lime itself), ``"bfloat16"`` (CPU/GPU autocast), or ``"auto"`` — bfloat16 where the
            device computes it natively (CPUs with AVX512-BF16 or AMX, CUDA GPUs with bf16),
            float32 elsewhere. bfloat16 moves probabilities by about 0.005, well below LIME's
            sampling noise (deletion AUC unchanged in ``bench/bench_explain.py``); on the 2-core
            benchmark machine (AVX512-BF16) it ran the passes about twice as fast when the machine
            was quiet, but slower in some runs while other jobs shared the cores, so it is not the
            default. ``"int8"``: the passes run on an INT8 ONNX Runtime graph of the model (static
            quantization, calibrated on the first 16 perturbed images of the first image explained
            with that model, then cached): an approximation of the model whose maps were as faithful
            as float32's in ``bench/bench_explain.py`` (deletion AUC 0.594 vs 0.599 on Lite0) and the
            fastest on CPU once the graph is built (3.2 s vs 5.3 s there; needs ``pellucid[export]``). The explained class is always
            decided in float32.
        backend: what runs the float32 perturbation passes (:func:`pellucid.core.runtime.fast_forward`):
            ``"auto"`` (default: ONNX Runtime on CPU when installed — the model exported in memory
            once per model and image shape, checked against the model — else eager PyTorch),
            ``"torch"`` or ``"onnxruntime"``. The bfloat16 passes always run in PyTorch.
        seed: seeds the segmentation, the perturbation matrix and the ridge fit.
        progress: show a progress bar over images.
    """

    name = "lime"
    needs_gradients = False

    def __init__(self, num_samples: int = 1000, segmentation: str = "slic", n_segments: int = 50,
                 compactness: float = 10.0, kernel_size: float = 4, max_dist: float = 200, ratio: float = 0.2,
                 hide_color: float | None = None, kernel_width: float = 0.25, batch_size: int = 8,
                 precision: str = "float32", backend: str = "auto", seed: int = 0, progress: bool = False):
        if segmentation not in SEGMENTATIONS:
            from pellucid.core.backbones import unknown_name_error

            raise unknown_name_error("segmentation", segmentation, list(SEGMENTATIONS))
        if precision not in PRECISIONS:
            from pellucid.core.backbones import unknown_name_error

            raise unknown_name_error("precision", precision, list(PRECISIONS))
        if backend not in BACKENDS:
            from pellucid.core.backbones import unknown_name_error

            raise unknown_name_error("backend", backend, list(BACKENDS))
        if precision == "int8" and backend == "torch":
            raise ValueError("precision='int8' runs on ONNX Runtime: use backend='auto' or 'onnxruntime'")
        if num_samples < 2:
            raise ValueError(f"num_samples must be at least 2 (got {num_samples})")
        super().__init__(num_samples=num_samples, segmentation=segmentation, n_segments=n_segments,
                         compactness=compactness, kernel_size=kernel_size, max_dist=max_dist, ratio=ratio,
                         hide_color=hide_color, kernel_width=kernel_width, batch_size=batch_size,
                         precision=precision, backend=backend, seed=seed, progress=progress)
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
        from lime.lime_base import LimeBase
        from sklearn.metrics import pairwise_distances

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

        bf16 = self.precision == "bfloat16" or (self.precision == "auto" and native_bf16(_device_of(model)))
        if target is None:  # the predicted class, always decided in float32
            with torch.inference_mode():
                target = int(probabilities(model(img[None].to(_device_of(model)))).argmax(1)[0])
        labels = self._predict(model, img, fudged, torch.from_numpy(segments), data, bf16)
        if not 0 <= target < labels.shape[1]:
            raise ValueError(f"target class {target} out of range: the model has {labels.shape[1]} classes")

        distances = pairwise_distances(data, data[0].reshape(1, -1), metric="cosine").ravel()
        base = LimeBase(partial(lime_kernel, kernel_width=self.kernel_width),
                        random_state=np.random.RandomState(seed))
        intercept, exp, r2, local_pred = base.explain_instance_with_data(
            data, labels, distances, target, num_features=n_seg, feature_selection="none")
        weights = np.zeros(n_seg)
        for f, w in exp:
            weights[f] = w
        heat = heatmap_from_weights(segments, weights)
        extras = {"segments": segments, "weights": weights, "r2": float(r2), "intercept": float(intercept),
                  "local_pred": float(np.ravel(local_pred)[0]),
                  "precision": "bfloat16" if bf16 else ("int8" if self.precision == "int8" else "float32"),
                  "backend": "torch" if bf16 else self._backend_used}
        return heat, target, extras

    def _predict(self, model: nn.Module, image: torch.Tensor, fudged: torch.Tensor, segments: torch.Tensor,
                 data: np.ndarray, bf16: bool) -> np.ndarray:
        """Class probabilities ``(N, C)`` of the perturbed images described by ``data`` ``(N, S)``.

        Images are composed directly in channels-last layout (faster convolutions on CPU, same
        numbers) from ``(H, W, C)`` views of the image and its hidden version.
        """
        device = _device_of(model)
        image = image.to(device).permute(1, 2, 0)
        fudged = fudged.to(device).permute(1, 2, 0)
        segments = segments.to(device)
        on = torch.from_numpy(data.astype(bool)).to(device)
        chw = (image.shape[2], image.shape[0], image.shape[1])
        if bf16:
            run = None
        elif self.precision == "int8":
            calib = torch.where(on[:INT8_CALIBRATION][:, segments, None], image, fudged).permute(0, 3, 1, 2)
            run = fast_forward(model, chw, "onnxruntime", int8_calibration=calib)
        else:
            run = fast_forward(model, chw, self.backend)
        self._backend_used = getattr(run, "backend", "torch")
        autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext())
        out = []
        with torch.inference_mode(), autocast:
            for start in range(0, len(data), self.batch_size):
                keep = on[start:start + self.batch_size][:, segments, None]  # (n, H, W, 1)
                batch = torch.where(keep, image, fudged).permute(0, 3, 1, 2)  # channels-last strides
                out.append(probabilities(model(batch) if run is None else run(batch)).cpu())
        return torch.cat(out).double().numpy()

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
