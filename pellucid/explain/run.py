"""``pellucid explain``: explain image files with a model folder, write overlays and JSON.

:func:`explain_paths` reads every file (folders expand recursively; DICOM is windowed by the
reader), preprocesses it exactly as the model card says, explains it with each requested method in
batches, and writes, into ``out_dir``:

* ``<stem>_<method>.png`` — the heatmap over the original image with its colour bar underneath (what
  red and blue mean for that method; :func:`pellucid.explain.overlay.with_colorbar`): the image at its
  original resolution, enlarged by a whole factor when narrower than
  :data:`~pellucid.explain.overlay.LEGEND_MIN_WIDTH` so the legend can be read (``legend=False``: the
  bare overlay at the original resolution);
* ``<stem>.json`` — the prediction, and per method the explained class, heatmap statistics (mean,
  max, share of pixels above 0.5, mass centroid as ``(x, y)`` fractions of width and height, whether
  the map is empty), with ``score=True`` the faithfulness scores, and ``reading``: the same plain
  words the web app and the report show (:mod:`pellucid.explain.captions`: the method in one
  sentence, one sentence per score, notes on a blank map or one on the border or outside the lungs,
  and the legend); each note is also logged as a warning;
* with ``score=True`` and a lung segmenter (``lung_segmenter=`` or the model card's), each map's
  lung and border shares (:mod:`pellucid.explain.lungshare`), the lung outline drawn on the overlays,
  and ``lung_shares.json``: the means per method over the maps that have mass, with the number of
  empty maps (all-zero maps have no share; they are named in a warning and never averaged as NaN).

It returns one row per image × method (the same fields, flat), which
:func:`pellucid.explain.score_table` turns into the method × metric table. Reading, prediction, the
domain check and the explanations all come from the one case pipeline
(:mod:`pellucid.core.pipeline`, :mod:`pellucid.explain.pipeline`), batch by batch, so a folder of any
size runs in bounded memory; an unreadable input gets an ``error`` row (written once). With
``progress=True`` one bar on stderr counts the images done and names the step under way
("lime: explaining image 3 of 8"), so a slow explainer is never silent.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

from pellucid.core.pipeline import Case, CasePipeline
from pellucid.core.runs import refuse_model_folder
from pellucid.explain.base import explainer_for
from pellucid.explain.captions import read_case_result, reading_dict
from pellucid.explain.metrics import DEFAULT_METRICS
from pellucid.explain.overlay import save_overlay
from pellucid.explain.pipeline import explain_cases, resolve_target

__all__ = ["explain_paths", "heatmap_stats"]

log = logging.getLogger(__name__)


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


#: Bytes of an input's name kept in its output files' names: a file system allows 255 for a whole name,
#: and ``_<n>_<method>.png`` follows the stem.
_STEM_BYTES = 200


def _file_stem(name: str, seen: dict[str, int]) -> str:
    stem = Path(name).stem.encode("utf-8")[:_STEM_BYTES].decode("utf-8", "ignore") or "image"
    n = seen.get(stem, 0)
    seen[stem] = n + 1
    return stem if n == 0 else f"{stem}_{n}"


def _batches(cases: Iterator[Case], size: int) -> Iterator[list[Case]]:
    chunk: list[Case] = []
    for c in cases:
        chunk.append(c)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _segmenter(predictor, model_dir, lung_segmenter, score: bool):
    """The lung segmenter for lung shares (only with scores), or None."""
    if not (score and (lung_segmenter or predictor.card.preprocessing.segmenter)):
        return None
    from pellucid.explain.lungshare import resolve_segmenter

    masker = getattr(predictor, "masker", None)
    return masker.model if masker is not None and not lung_segmenter else resolve_segmenter(lung_segmenter or model_dir)


def _lung_shares(segmenter, cases: Sequence[Case], share_rows: list[dict]) -> None:
    """Lung and border shares of every map of ``cases`` into its scores (masks from the originals)."""
    from pellucid.explain.lungshare import mask_shares
    from pellucid.explain.report.lungs import attach_lung_masks

    attach_lung_masks(segmenter, cases)
    for c in cases:
        for r in c.explanations:
            if c.lung_mask is None or r.heatmap is None:
                continue
            shares = mask_shares(r.heatmap, c.lung_mask)
            r.scores.update({k: shares[k] for k in ("lung_share", "border_share", "lung_fraction")})
            share_rows.append({"method": r.method, **shares})
            if shares["empty"]:
                log.warning("%s, %s of %r: the map is all zero (no region raises that class's score; the decision "
                            "comes from elsewhere, e.g. the head's bias): lung and border shares undefined, left out "
                            "of the means", c.name, r.method, r.extras.get("target_name"))


def _write_case(case: Case, out: Path, stem: str, classes: Sequence[str], alpha: float,
                legend: bool = True) -> tuple[dict, list[dict]]:
    """One input's overlays and JSON record; its rows (one per method, or one error row)."""
    record = {"image": case.name, "error": case.error or None, "explanations": []}
    if case.error:
        return record, [{"path": case.name, "method": "", "error": case.error}]
    record["original_size"] = list(case.image.array.shape[:2])
    record["prediction"] = {"label": case.label, "decided": classes[case.index], "probabilities": dict(case.probs),
                            "domain": case.row(classes)["domain"], "domain_reasons": list(case.ood.reasons)}
    rows = []
    for r in case.explanations:
        if r.heatmap is None:
            rows.append({"path": case.name, "method": r.method, "error": r.note})
            continue
        reading = read_case_result(case, r)
        png = save_overlay(out / f"{stem}_{r.method.replace('+', 'plus')}.png", case.image, r.heatmap, alpha,
                           outline=case.lung_mask, legend=reading.legend if legend else None)
        for note in reading.notes:
            log.warning("%s, %s: %s", case.name, r.method, note)
        target, name = r.extras.get("target"), r.extras.get("target_name")
        entry = {"method": r.method, "target": target, "target_name": name, "overlay": str(png),
                 "heatmap": heatmap_stats(r.heatmap), "scores": dict(r.scores),
                 "extras": {k: v for k, v in r.extras.items() if k not in ("target", "target_name")},
                 "reading": reading_dict(reading)}
        record["explanations"].append(entry)
        rows.append({"path": case.name, "method": r.method, "target": target, "target_name": name, "overlay": str(png),
                     **{f"heatmap_{k}": v for k, v in entry["heatmap"].items()}, **r.scores})
    return record, rows


class _ImageBar:
    """One tqdm bar on stderr counting images, with the step under way as its postfix."""

    def __init__(self, paths: Sequence[str | Path], enabled: bool):
        self.enabled = enabled
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            from pellucid.datasets.samples import find_images

            total = len(find_images([Path(p) for p in paths], []))
            self.bar = tqdm(total=total or None, desc="explaining", unit="image", leave=False)

    def step(self, fraction: float, text: str) -> None:
        """``explain_cases``'s progress: the step under way (the count moves per image written)."""
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=True)

    def done(self, name: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"written {name}", refresh=False)
            self.bar.update(1)
            self.bar.refresh()  # every image shows, however quick

    def __enter__(self) -> "_ImageBar":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


def explain_paths(model_dir: str | Path, paths: Sequence[str | Path], methods: Sequence[str] | None = None,
                  target: int | str | None = None, *, out_dir: str | Path = "explanations", score: bool = False,
                  metrics: Sequence[str] = DEFAULT_METRICS, options: Mapping[str, dict] | None = None,
                  batch_size: int = 8, alpha: float = 0.5, progress: bool = False,
                  lung_segmenter: str | Path | None = None, include_identifiers: bool = False,
                  legend: bool = True) -> list[dict]:
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
        progress: show a progress bar on stderr: images done, and the step under way.
        lung_segmenter: segmentation model folder for the lung shares with ``score``; None uses the
            model card's segmenter (``preprocessing.segmenter``) when it has one.
        include_identifiers: name DICOM inputs by file name (default: ``DICOM <hash>``).
        legend: draw the colour bar under each overlay PNG (False: the bare overlay).

    Returns:
        One row per image × method: ``path``, ``method``, ``target``, ``target_name``, ``overlay``,
        the heatmap statistics and, with ``score``, the metric columns (see
        :func:`pellucid.explain.score_table`); an unreadable input or a failed method gives a row
        with ``error``.

    Raises:
        KeyError: an unknown method or class name (with did-you-mean); TypeError / ValueError: a bad
            explainer option. Both before any image is read.
    """
    from pellucid.core.predict import Predictor

    predictor = Predictor(model_dir)
    resolve_target(target, predictor.classes)  # a bad class name fails before any work
    methods = list(methods) if methods is not None else list(predictor.card.explainers or ["gradcam"])
    options = dict(options or {})
    unknown = [m for m in options if m not in methods]
    if unknown:
        raise ValueError(f"options given for {unknown}, which are not among the methods {methods}")
    for m in methods:  # bad names and options fail here, with did-you-mean, before any work
        explainer_for(m, predictor.card, **options.get(m, {}))
    segmenter = _segmenter(predictor, model_dir, lung_segmenter, score)
    out = Path(out_dir)
    refuse_model_folder(out, "explanations")
    out.mkdir(parents=True, exist_ok=True)
    pipe = CasePipeline(predictor, batch_size=batch_size, include_identifiers=include_identifiers)
    rows: list[dict] = []
    share_rows: list[dict] = []
    seen: dict[str, int] = {}
    with _ImageBar(paths, progress) as bar:
        for chunk in _batches(pipe.from_paths(paths), batch_size):
            notes = explain_cases(predictor, chunk, methods, batch_size=batch_size, score=score, metrics=metrics,
                                  options=options, target=target, progress=bar.step)
            if notes:
                log.warning("; ".join(notes))
            if segmenter is not None:
                _lung_shares(segmenter, chunk, share_rows)
            for case in chunk:
                stem = _file_stem(case.name, seen)
                record, case_rows = _write_case(case, out, stem, predictor.classes, alpha, legend)
                (out / f"{stem}.json").write_text(json.dumps(record, indent=1))
                rows.extend(case_rows)
                case.image = None  # released: memory stays bounded by one batch
                bar.done(case.name)
    if share_rows:
        from pellucid.explain.lungshare import summarize_shares

        summary = summarize_shares(share_rows)
        (out / "lung_shares.json").write_text(json.dumps(summary, indent=1))
        for m, s in summary.items():
            log.info("%s: mean lung share %.3f (uniform map %.3f), border share %.3f over %d map(s); %d empty",
                     m, s["lung_share"], s["lung_fraction"], s["border_share"], s["n"] - s["n_empty"], s["n_empty"])
    return rows
