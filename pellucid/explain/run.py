"""``pellucid explain``: explain image files with a model folder, write overlays and JSON.

:func:`explain_paths` reads every file (folders expand recursively; DICOM is windowed by the
reader), preprocesses it exactly as the model card says, explains it with each requested method in
batches, and writes, into ``out_dir``:

* ``<stem>_<method>.png`` — the heatmap over the original image, at its original resolution;
* ``<stem>.json`` — the prediction, and per method the explained class, heatmap statistics (mean,
  max, share of pixels above 0.5, mass centroid as ``(x, y)`` fractions of width and height, whether
  the map is empty) and, with ``score=True``, the faithfulness scores;
* with ``score=True`` and a lung segmenter (``lung_segmenter=`` or the model card's), each map's
  lung and border shares (:mod:`pellucid.explain.lungshare`), the lung outline drawn on the overlays,
  and ``lung_shares.json``: the means per method over the maps that have mass, with the number of
  empty maps (all-zero maps have no share; they are named in a warning and never averaged as NaN).

It returns one row per image × method (the same fields, flat), which
:func:`pellucid.explain.score_table` turns into the method × metric table.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch

from pellucid.explain.base import Explanation, explainer_for, to_original_frame
from pellucid.explain.metrics import DEFAULT_METRICS, score_explanations
from pellucid.explain.overlay import save_overlay

__all__ = ["explain_paths", "heatmap_stats", "load_batches", "ImageBatch"]

log = logging.getLogger(__name__)


@dataclass
class ImageBatch:
    """Images read and preprocessed for one model: files, originals, ``(B, 3, S, S)`` tensor,
    classes to explain, the model's decisions and calibrated probabilities ``(B, C)``."""

    names: list[str]
    originals: list
    tensor: torch.Tensor
    targets: list[int]
    decided: list[int]
    probs: np.ndarray


def _resolve_target(target: int | str | None, classes: Sequence[str]) -> int | None:
    if target is None:
        return None
    if isinstance(target, str) and target in classes:
        return list(classes).index(target)
    try:
        idx = int(target)
    except (TypeError, ValueError):
        from pellucid.core.backbones import unknown_name_error

        raise unknown_name_error("class", str(target), list(classes)) from None
    if not 0 <= idx < len(classes):
        raise ValueError(f"target class index {idx} out of range: the model has classes {list(classes)}")
    return idx


def load_batches(model_dir: str | Path, paths: Sequence[str | Path], batch_size: int = 8,
                 target: int | str | None = None):
    """Load a model folder and iterate over the readable images in batches.

    Returns:
        ``(predictor, iterator of ImageBatch)``; unreadable files are logged and skipped.
    """
    from pellucid.core.predict import Predictor
    from pellucid.datasets.readers import ImageReadError, read_image
    from pellucid.datasets.samples import find_images

    predictor = Predictor(model_dir)
    fixed = _resolve_target(target, predictor.classes)
    files = find_images(list(paths))
    if not files:
        raise FileNotFoundError(f"no image files found in {', '.join(map(str, paths))}")

    def batches() -> Iterator[ImageBatch]:
        pending: list[tuple[str, object]] = []

        def flush() -> ImageBatch:
            tensor = torch.stack([predictor.preprocess(im) for _, im in pending])
            probs = predictor.probabilities(tensor)
            decided = [int(i) for i in predictor.decide(probs)]
            batch = ImageBatch(names=[n for n, _ in pending], originals=[im for _, im in pending],
                               tensor=tensor, targets=[fixed] * len(pending) if fixed is not None else decided,
                               decided=decided, probs=np.asarray(probs))
            pending.clear()
            return batch

        for f in files:
            try:
                pending.append((str(f), read_image(f)))
            except ImageReadError as err:
                log.warning("skipped: %s", err)
                continue
            if len(pending) >= batch_size:
                yield flush()
        if pending:
            yield flush()

    return predictor, batches()


def heatmap_stats(heatmap: np.ndarray) -> dict:
    """Mean, max, share of pixels above 0.5, mass centroid ``(x, y)`` (fractions of width and
    height; None for an empty map) and ``empty`` (no positive value anywhere) of a [0, 1] heatmap."""
    h = np.asarray(heatmap, dtype=np.float64)
    total = h.sum()
    if total > 0:
        ys, xs = np.indices(h.shape)
        centroid = [float((xs * h).sum() / total / max(h.shape[1] - 1, 1)),
                    float((ys * h).sum() / total / max(h.shape[0] - 1, 1))]
    else:
        centroid = None
    return {"mean": float(h.mean()), "max": float(h.max()), "frac_above_0.5": float((h > 0.5).mean()),
            "centroid": centroid, "empty": not bool(total > 0)}


def _json_safe(extras: dict) -> dict:
    out = {}
    for k, v in extras.items():
        if isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v
        elif isinstance(v, (list, tuple)) and all(isinstance(x, (str, int, float, bool)) for x in v):
            out[k] = list(v)
        elif isinstance(v, dict):
            out[k] = _json_safe(v)
    return out


def _file_stem(name: str, seen: dict[str, int]) -> str:
    stem = Path(name).stem
    n = seen.get(stem, 0)
    seen[stem] = n + 1
    return stem if n == 0 else f"{stem}_{n}"


def explain_paths(model_dir: str | Path, paths: Sequence[str | Path], methods: Sequence[str] | None = None,
                  target: int | str | None = None, *, out_dir: str | Path = "explanations", score: bool = False,
                  metrics: Sequence[str] = DEFAULT_METRICS, options: Mapping[str, dict] | None = None,
                  batch_size: int = 8, alpha: float = 0.5, progress: bool = False,
                  lung_segmenter: str | Path | None = None) -> list[dict]:
    """Explain image files with a model folder; write overlays and one JSON per image.

    Args:
        model_dir: model folder (``card.json`` + ``model.safetensors``).
        paths: image/DICOM files or folders.
        methods: explainer names (see :func:`pellucid.explain.list_explainers`); None uses the
            card's (the task's) default explainers, or ``["gradcam"]`` when it names none.
        target: class name or index to explain for every image; None explains the model's decision
            (the card's threshold policy).
        out_dir: where PNGs and JSONs go (created).
        score: also compute the faithfulness metrics.
        metrics: which metrics when ``score`` (see :data:`pellucid.explain.metrics.METRICS`).
        options: per-method explainer options, e.g. ``{"lime": {"num_samples": 500}}``.
        batch_size: images per batch.
        alpha: overlay opacity.
        progress: show a progress bar over batches.
        lung_segmenter: segmentation model folder for the lung shares with ``score``; None uses the
            model card's segmenter (``preprocessing.segmenter``) when it has one.

    Returns:
        One row per image × method: ``path``, ``method``, ``target``, ``target_name``, ``overlay``,
        the heatmap statistics and, with ``score``, the metric columns (see
        :func:`pellucid.explain.score_table`).
    """
    from tqdm.auto import tqdm

    predictor, batches = load_batches(model_dir, paths, batch_size, target)
    segmenter = None
    if score and (lung_segmenter or (predictor.card.get("preprocessing") or {}).get("segmenter")):
        from pellucid.core.segmentation import segment_many
        from pellucid.explain.lungshare import resolve_segmenter

        masker = getattr(predictor, "masker", None)
        segmenter = (masker.model if masker is not None and not lung_segmenter
                     else resolve_segmenter(lung_segmenter or model_dir))
    if methods is None:
        methods = list(predictor.card.get("explainers") or ["gradcam"])
    methods = list(methods)
    options = dict(options or {})
    unknown = [m for m in options if m not in methods]
    if unknown:
        raise ValueError(f"options given for {unknown}, which are not among the methods {methods}")
    explainers = {m: explainer_for(m, predictor.card, **options.get(m, {})) for m in methods}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    classes = predictor.classes
    rows: list[dict] = []
    share_rows: list[dict] = []
    seen: dict[str, int] = {}
    for batch in tqdm(batches, desc="explaining", disable=not progress, leave=False):
        per_method: dict[str, list[Explanation]] = {}
        for m, explainer in explainers.items():
            exps = explainer.explain(predictor.model, batch.tensor, batch.targets)
            for e in exps:
                e.target_name = classes[e.target]
            per_method[m] = exps
        masks = []
        if score:  # faithfulness is scored on the model's input, before maps move to the original frame
            flat = [e for m in methods for e in per_method[m]]
            score_explanations(predictor.model, batch.tensor, flat, metrics)
        if getattr(predictor, "crops_input", False):  # lung-crop model: its maps cover the lungs' box
            for m in methods:
                for e, original in zip(per_method[m], batch.originals):
                    e.heatmap = to_original_frame(predictor, e.heatmap, original)
        if score:
            if segmenter is not None:
                from pellucid.explain.lungshare import mask_shares

                # the masks are computed on the originals; heatmaps share their field of view (squash resize)
                masks = segment_many(segmenter, batch.originals)
                for m in methods:
                    for i, (e, mask) in enumerate(zip(per_method[m], masks)):
                        r = mask_shares(e.heatmap, mask)
                        e.scores.update({k: r[k] for k in ("lung_share", "border_share", "lung_fraction")})
                        share_rows.append({"method": m, **r})
                        if r["empty"]:
                            log.warning("%s, %s of %r: the map is all zero (no region raises that class's score; "
                                        "the decision comes from elsewhere, e.g. the head's bias): lung and border "
                                        "shares undefined, left out of the means", batch.names[i], m, e.target_name)
        for i, name in enumerate(batch.names):
            stem = _file_stem(name, seen)
            original = batch.originals[i]
            record = {
                "image": name,
                "original_size": list(original.array.shape[:2]),
                "prediction": {"label": classes[batch.decided[i]],
                               "probabilities": {c: float(p) for c, p in zip(classes, batch.probs[i])}},
                "explanations": [],
            }
            for m in methods:
                e = per_method[m][i]
                png = save_overlay(out / f"{stem}_{m.replace('+', 'plus')}.png", original, e.heatmap, alpha,
                                   outline=masks[i] if masks else None)
                entry = {"method": m, "target": e.target, "target_name": e.target_name, "overlay": str(png),
                         "heatmap": heatmap_stats(e.heatmap), "scores": dict(e.scores),
                         "extras": _json_safe(e.extras)}
                record["explanations"].append(entry)
                rows.append({"path": name, "method": m, "target": e.target, "target_name": e.target_name,
                             "overlay": str(png), **{f"heatmap_{k}": v for k, v in entry["heatmap"].items()},
                             **e.scores})
            (out / f"{stem}.json").write_text(json.dumps(record, indent=1))
    if share_rows:
        from pellucid.explain.lungshare import summarize_shares

        summary = summarize_shares(share_rows)
        (out / "lung_shares.json").write_text(json.dumps(summary, indent=1))
        for m, s in summary.items():
            log.info("%s: mean lung share %.3f (uniform map %.3f), border share %.3f over %d map(s); %d empty",
                     m, s["lung_share"], s["lung_fraction"], s["border_share"], s["n"] - s["n_empty"], s["n_empty"])
    return rows
