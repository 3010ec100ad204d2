"""One faithfulness harness for every explainer, so Grad-CAM, LIME and T-TAME are compared on the
same images the same way.

Metrics (all on class probabilities of the explained class):

* **Average Drop / Increase in Confidence** at 100 %, 50 % and 15 % of the map kept, following the
  T-TAME protocol (Ntrougkas, Gkalelis & Mezaris, "T-TAME: Trainable Attention Mechanism for
  Explaining Convolutional Networks and Vision Transformers", IEEE Access 2024; AD/IC from
  Chattopadhay et al., WACV 2018): the input is ``image * map`` for 100 %; for 50 % and 15 % only the
  top-p % pixels of the map keep their map value and the rest are zeroed. Per image,
  ``AD = 100 * max(0, Y - O) / Y`` and ``IC = 100 * [O > Y]`` (Y original, O masked probability);
  their means over images are the published numbers. AD lower is better, IC higher.
* **Deletion / insertion AUC** (Petsiuk, Das & Saenko, "RISE", BMVC 2018): pixels are removed
  (set to 0) or inserted (into a blurred copy) in order of the map, ``steps`` at a time, and the
  area under the probability curve is taken. Deletion lower is better, insertion higher. Pixels of
  equal map value keep raster order.
* **ROAD** (Rong et al., "A Consistent and Efficient Evaluation Strategy for Attribution Methods",
  ICML 2022) through pytorch-grad-cam's ``ROADCombined``: noisy linear imputation of the most and
  least relevant pixels at several percentiles; ``(LeRF - MoRF) / 2``, higher is better.
* **Sanity check** (Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018): the explainer
  is rerun on a deep copy of the model with re-initialised weights; the Spearman rank correlation of
  the two maps must stay below a threshold (default 0.5). A map that ignores the model (an edge map,
  a fixed blob) correlates fully and fails.

:func:`score_explanations` returns one row per explanation (and stores the values in
``Explanation.scores``); :func:`score_table` prints method × metric means as a markdown table.
"""
from __future__ import annotations

import copy
import math
import warnings
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from pellucid.core.runtime import fast_forward
from pellucid.explain.base import (
    Explainer,
    Explanation,
    ExplanationError,
    check_images,
    get_explainer,
    preserved_model,
    probabilities,
)
from pellucid.explain.lime import spearman
from pellucid.registry import unknown_name_error

__all__ = [
    "METRICS",
    "DEFAULT_METRICS",
    "average_drop_increase",
    "deletion_insertion",
    "road_scores",
    "randomized_copy",
    "sanity_check",
    "score_explanations",
    "score_table",
    "top_fraction_map",
]

METRICS = ("ad_ic", "deletion", "insertion", "road", "sanity")
DEFAULT_METRICS = METRICS
KEEP_FRACTIONS = (1.0, 0.5, 0.15)

# column → (header, higher is better?)
_COLUMNS: dict[str, tuple[str, bool]] = {
    "ad_100": ("AD 100% ↓", False),
    "ic_100": ("IC 100% ↑", True),
    "ad_50": ("AD 50% ↓", False),
    "ic_50": ("IC 50% ↑", True),
    "ad_15": ("AD 15% ↓", False),
    "ic_15": ("IC 15% ↑", True),
    "deletion_auc": ("deletion ↓", False),
    "insertion_auc": ("insertion ↑", True),
    "road": ("ROAD ↑", True),
    "sanity_rho": ("sanity ρ ↓", False),
    "sanity_pass": ("sanity pass ↑", True),
}


# --------------------------------------------------------------------------- helpers
def _target_probs(model: nn.Module, x: torch.Tensor, targets: Sequence[int], batch_size: int = 64) -> np.ndarray:
    """Probability of ``targets[i]`` for each image ``x[i]`` (chunked, no autograd)."""
    idx = torch.as_tensor(list(targets), dtype=torch.long)
    out = []
    # The harness runs dozens of masked copies per image: an eval-mode model goes through the cached
    # fast runner (ONNX Runtime on CPU when installed, checked against the model; channels-last torch).
    run = fast_forward(model, tuple(x.shape[1:])) if not model.training else model
    with torch.inference_mode():
        for s in range(0, x.shape[0], batch_size):
            chunk = x[s:s + batch_size].contiguous(memory_format=torch.channels_last)  # faster convs, same numbers
            p = probabilities(run(chunk)).cpu()
            out.append(p.gather(1, idx[s:s + batch_size, None])[:, 0])
    return torch.cat(out).double().numpy()


def _stack_maps(heatmaps: Sequence[np.ndarray] | np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    maps = np.stack([np.asarray(h, dtype=np.float32) for h in heatmaps])
    if maps.shape[1:] != tuple(shape):
        raise ValueError(f"heatmaps have shape {maps.shape[1:]} but the images are {tuple(shape)}: explain the same "
                         "preprocessed images you score")
    return maps


def _raster_ranks(m: np.ndarray) -> np.ndarray:
    """Rank of each pixel of one map ``(H, W)``: 0 for the highest value, ties in raster order."""
    order = np.argsort(-m.ravel(), kind="stable")
    ranks = np.empty(order.size, dtype=np.int64)
    ranks[order] = np.arange(order.size)
    return ranks.reshape(m.shape)


def top_fraction_map(m: np.ndarray, fraction: float) -> np.ndarray:
    """The map with only its top ``fraction`` of pixels kept (their values), the rest 0."""
    if fraction >= 1:
        return np.asarray(m, dtype=np.float32)
    k = int(round(fraction * m.size))
    return np.where(_raster_ranks(m) < k, m, 0.0).astype(np.float32)


# --------------------------------------------------------------------------- metrics
def average_drop_increase(model: nn.Module, images: torch.Tensor, heatmaps: Sequence[np.ndarray],
                          targets: Sequence[int], keep: Sequence[float] = KEEP_FRACTIONS,
                          batch_size: int = 64) -> dict[str, np.ndarray]:
    """Per-image Average Drop and Increase in Confidence (T-TAME protocol).

    Args:
        images: ``(B, 3, H, W)`` in [0, 1]; heatmaps: ``B`` maps ``(H, W)`` in [0, 1].
        targets: explained class per image.
        keep: fractions of the map kept (1.0 = the whole map multiplies the image).

    Returns:
        ``{"ad_100": (B,), "ic_100": (B,), "ad_50": ..., ...}`` in percent.
    """
    maps = _stack_maps(heatmaps, images.shape[-2:])
    y = _target_probs(model, images, targets, batch_size)
    out: dict[str, np.ndarray] = {}
    for p in keep:
        kept = np.stack([top_fraction_map(m, p) for m in maps])
        masked = images * torch.from_numpy(kept).to(images)[:, None]
        o = _target_probs(model, masked, targets, batch_size)
        tag = f"{int(round(p * 100))}"
        out[f"ad_{tag}"] = 100.0 * np.maximum(0.0, y - o) / np.maximum(y, 1e-12)
        out[f"ic_{tag}"] = 100.0 * (o > y)
    return out


def _blurred(images: torch.Tensor) -> torch.Tensor:
    from torchvision.transforms.functional import gaussian_blur

    sigma = max(1.0, 5.0 * max(images.shape[-2:]) / 224)
    k = 2 * int(math.ceil(3 * sigma)) + 1
    return gaussian_blur(images, kernel_size=[k, k], sigma=[sigma, sigma])


def deletion_insertion(model: nn.Module, images: torch.Tensor, heatmaps: Sequence[np.ndarray],
                       targets: Sequence[int], mode: str = "deletion", steps: int = 20,
                       batch_size: int = 64, return_curves: bool = False):
    """Deletion or insertion AUC per image (RISE protocol).

    Deletion sets pixels to 0 in map order; insertion reveals them on a Gaussian-blurred copy.
    Each image's ``steps + 1`` perturbed copies are scored in batches.

    Returns:
        ``(B,)`` AUCs in [0, 1] (and the ``(B, steps + 1)`` curves with ``return_curves``).
    """
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion'; got {mode!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1; got {steps}")
    maps = _stack_maps(heatmaps, images.shape[-2:])
    n_pix = maps[0].size
    counts = torch.tensor([round(k * n_pix / steps) for k in range(steps + 1)])
    baseline = torch.zeros_like(images) if mode == "deletion" else _blurred(images)
    curves = np.zeros((len(maps), steps + 1))
    for i, m in enumerate(maps):
        ranks = torch.from_numpy(_raster_ranks(m)).to(images.device)
        changed = ranks[None] < counts.to(images.device)[:, None, None]  # (steps + 1, H, W)
        if mode == "deletion":
            batch = torch.where(changed[:, None], baseline[i], images[i])
        else:
            batch = torch.where(changed[:, None], images[i], baseline[i])
        curves[i] = _target_probs(model, batch, [targets[i]] * (steps + 1), batch_size)
    auc = np.trapezoid(curves, dx=1.0 / steps, axis=1) if hasattr(np, "trapezoid") else np.trapz(curves, dx=1.0 / steps, axis=1)
    return (auc, curves) if return_curves else auc


class _ProbabilityTarget:
    """pytorch-grad-cam target: probability of one class (handles one-column outputs)."""

    def __init__(self, category: int):
        self.category = category

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        out = output[None] if output.ndim == 1 else output
        p = probabilities(out)[:, self.category]
        return p[0] if output.ndim == 1 else p


def road_scores(model: nn.Module, images: torch.Tensor, heatmaps: Sequence[np.ndarray], targets: Sequence[int],
                percentiles: Sequence[int] = (20, 40, 60, 80), seed: int = 0) -> np.ndarray:
    """ROAD combined score per image (pytorch-grad-cam's ``ROADCombined``); higher is better."""
    from pytorch_grad_cam.metrics.road import ROADCombined

    maps = _stack_maps(heatmaps, images.shape[-2:])
    road = ROADCombined(percentiles=list(percentiles))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        scores = road(images, maps, [_ProbabilityTarget(t) for t in targets], model)
    return np.asarray(scores, dtype=np.float64).reshape(-1)


def randomized_copy(model: nn.Module, seed: int = 0) -> nn.Module:
    """A deep copy of ``model`` with every weight re-initialised (Adebayo et al.'s full model
    randomisation): modules with ``reset_parameters`` use their own initialiser (batch-norm
    statistics are reset too); any other parameter is redrawn from a normal with its own mean and
    standard deviation."""
    rnd = copy.deepcopy(model)
    done: set[int] = set()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for m in rnd.modules():
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                reset()
                done.update(id(p) for p in m.parameters(recurse=False))
        for p in rnd.parameters():
            if id(p) not in done:
                std = float(p.std()) if p.numel() > 1 else 0.0
                p.normal_(float(p.mean()), std if std > 0 else 0.02)
    return rnd.eval()


def sanity_check(model: nn.Module, explainer: Explainer, images: torch.Tensor, targets: Sequence[int] | None = None,
                 heatmaps: Sequence[np.ndarray] | None = None, threshold: float = 0.5, seed: int = 0,
                 random_model: nn.Module | None = None) -> list[dict]:
    """Model-parameter randomisation test.

    Args:
        explainer: the explainer to rerun on the randomised model.
        targets: classes to explain (None: predicted by ``model``).
        heatmaps: maps already computed on ``model`` (computed here when None).
        threshold: the test passes when the Spearman correlation is below it.
        random_model: a randomised copy to reuse (made with :func:`randomized_copy` when None).

    Returns:
        One ``{"sanity_rho": float, "sanity_pass": bool}`` per image.
    """
    images = check_images(images)
    if heatmaps is None or targets is None:
        exps = explainer.explain(model, images, targets)
        heatmaps = [e.heatmap for e in exps]
        targets = [e.target for e in exps]
    rnd = random_model if random_model is not None else randomized_copy(model, seed)
    rnd_maps = [e.heatmap for e in explainer.explain(rnd, images, list(targets))]
    out = []
    for a, b in zip(heatmaps, rnd_maps):
        rho = spearman(a, b)
        out.append({"sanity_rho": rho, "sanity_pass": bool(rho < threshold)})
    return out


# --------------------------------------------------------------------------- the harness
def score_explanations(model: nn.Module, images: torch.Tensor, explanations: Sequence[Explanation],
                       metrics: Sequence[str] = DEFAULT_METRICS, *, steps: int = 20,
                       road_percentiles: Sequence[int] = (20, 40, 60, 80), sanity_threshold: float = 0.5,
                       explainers: Mapping[str, Explainer] | None = None, batch_size: int = 64,
                       seed: int = 0) -> list[dict]:
    """Score explanations of ``images`` with every metric in ``metrics``.

    Args:
        model: the explained model (left unchanged).
        images: ``(B, 3, H, W)`` in [0, 1], the inputs that were explained.
        explanations: ``k * B`` explanations; ``explanations[j]`` explains ``images[j % B]`` — e.g.
            the concatenated outputs of several explainers on the same batch.
        metrics: any of ``"ad_ic"``, ``"deletion"``, ``"insertion"``, ``"road"``, ``"sanity"``.
        steps: deletion/insertion steps.
        road_percentiles: ROAD percentiles.
        sanity_threshold: Spearman correlation below which the sanity check passes.
        explainers: explainer per method name for the sanity check (default: rebuilt from the
            registry with the options stored in each explanation; pass fitted trainable explainers
            here). Where the explainer cannot run on the randomised copy the check is NaN, with a
            warning.
        batch_size: images per forward pass.
        seed: seeds ROAD's noise and the weight randomisation.

    Returns:
        One row per explanation: ``method``, ``image`` (index into ``images``), ``target``,
        ``target_name`` and the metric columns (also stored in ``explanation.scores``).
    """
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise unknown_name_error("metric", unknown[0], list(METRICS))
    images = check_images(images)
    b = images.shape[0]
    if len(explanations) == 0 or len(explanations) % b:
        raise ValueError(f"got {len(explanations)} explanations for {b} images: give k * {b}, explanation j for "
                         f"image j % {b}")
    from pellucid.explain.base import _model_device

    images = images.to(_model_device(model))
    rows: list[dict] = []
    random_model = None
    with preserved_model(model):
        model.eval()
        for start in range(0, len(explanations), b):
            chunk = list(explanations[start:start + b])
            targets = [e.target for e in chunk]
            maps = [e.heatmap for e in chunk]
            cols: dict[str, np.ndarray | list] = {}
            if "ad_ic" in metrics:
                cols.update(average_drop_increase(model, images, maps, targets, batch_size=batch_size))
            if "deletion" in metrics:
                cols["deletion_auc"] = deletion_insertion(model, images, maps, targets, "deletion", steps, batch_size)
            if "insertion" in metrics:
                cols["insertion_auc"] = deletion_insertion(model, images, maps, targets, "insertion", steps, batch_size)
            if "road" in metrics:
                cols["road"] = road_scores(model, images, maps, targets, road_percentiles, seed)
            if "sanity" in metrics:
                if random_model is None:
                    random_model = randomized_copy(model, seed)
                rho = [math.nan] * b
                ok: list[bool | None] = [None] * b
                for idx in _group_by_explainer(chunk).values():
                    explainer = _explainer_for(chunk[idx[0]], explainers)
                    try:
                        res = sanity_check(model, explainer, images[idx], [targets[i] for i in idx],
                                           [maps[i] for i in idx], sanity_threshold, seed, random_model)
                    except ExplanationError as err:
                        # e.g. a trainable explainer that is not fitted for the randomised copy
                        warnings.warn(f"sanity check undefined for {chunk[idx[0]].method} (reported as NaN): "
                                      f"{str(err).splitlines()[0]}", stacklevel=2)
                        continue
                    for i, r in zip(idx, res):
                        rho[i], ok[i] = r["sanity_rho"], r["sanity_pass"]
                cols["sanity_rho"], cols["sanity_pass"] = rho, ok
            for i, e in enumerate(chunk):
                values = {k: ((None if v[i] is None else bool(v[i])) if k == "sanity_pass" else float(v[i]))
                          for k, v in cols.items()}
                e.scores.update(values)
                rows.append({"method": e.method, "image": i, "target": e.target, "target_name": e.target_name,
                             **values})
    return rows


def _group_by_explainer(chunk: Sequence[Explanation]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, e in enumerate(chunk):
        opts = e.extras.get("options", {})
        groups.setdefault(f"{e.method}|{sorted(opts.items(), key=str)!r}", []).append(i)
    return groups


def _explainer_for(e: Explanation, explainers: Mapping[str, Explainer] | None) -> Explainer:
    if explainers and e.method in explainers:
        return explainers[e.method]
    return get_explainer(e.method, **e.extras.get("options", {}))


def score_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """Markdown table, one line per method, one column per metric: means over images.

    Arrows in the header say which direction is better. ``sanity pass`` is the fraction of images
    that passed. Metrics a row does not have are left blank; NaN values are skipped in the mean.
    """
    if not rows:
        return "(no scores)"
    present = [c for c in (columns or _COLUMNS) if any(c in r for r in rows)]
    methods: list[str] = []
    for r in rows:
        if r["method"] not in methods:
            methods.append(r["method"])
    header = ["method", "images", *[_COLUMNS.get(c, (c, True))[0] for c in present]]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * len(present)) + "|"]
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        cells = [m, str(len(mine))]
        for c in present:
            vals = np.array([float(r[c]) for r in mine if c in r and r[c] is not None], dtype=np.float64)
            vals = vals[~np.isnan(vals)]
            if vals.size == 0:
                cells.append("")
                continue
            mean = vals.mean()
            cells.append(f"{mean:.1f}" if c.startswith(("ad_", "ic_")) else f"{mean:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)

