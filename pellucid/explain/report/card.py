"""Model card text for reports and the web app: the intended-use notice, the decision rule in words, the
card summary and metric rows, and the number formatting (``n/a`` for missing or non-finite values) that
every report section shares.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from pellucid.core.card import ModelCard, WeightSource, as_card
from pellucid.core.modelcard_md import redact_paths
from pellucid.core.tasks import TTA_TEXT

__all__ = ["DEFAULT_INTENDED_USE", "card_rows", "intended_use", "metric_rows", "probability_text", "threshold_text"]

DEFAULT_INTENDED_USE = "Research use only. Not a diagnostic device; every result needs review by a qualified person."


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.number)) and not isinstance(v, bool)


def probability_text(p: Any) -> str:
    """A probability as a percentage that never claims certainty the model does not have: above
    99.9 % and below 100 % reads "> 99.9 %", between 0 and 0.1 % "< 0.1 %" ("" for a missing value)."""
    if p is None or not _is_number(p) or not math.isfinite(float(p)):
        return ""
    p = float(p)
    if 0.999 < p < 1.0:
        return "> 99.9%"
    if 0.0 < p < 0.001:
        return "< 0.1%"
    return f"{p:.1%}"


def intended_use(card: ModelCard | dict) -> str:
    """The card's intended-use text, or the default research-use notice."""
    return str(as_card(card).intended_use or DEFAULT_INTENDED_USE)


def threshold_text(card: ModelCard | dict) -> str:
    """How the decision is made, e.g. ``tuberculosis if P(tuberculosis) >= 0.430 (policy: youden)``."""
    card = as_card(card)
    thr = card.threshold
    value, policy = (thr.value, thr.policy or "argmax") if thr is not None else (None, "argmax")
    pos = (thr.positive_class if thr is not None else None) or card.positive_class
    if value is None or pos is None:
        return f"highest probability wins (policy: {policy})"
    return f"{pos} if P({pos}) ≥ {float(value):.3f}, else the other class (policy: {policy})"


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{digits}f}" if _is_number(v) else str(v)


def card_rows(card: ModelCard | dict) -> list[tuple[str, str]]:
    """The model card summary as ``(field, value)`` rows for reports and the web app."""
    card = as_card(card)
    bb, pre, split, cal = card.backbone, card.preprocessing, card.split, card.calibration
    family = bb.extra.get("family") if bb is not None else None
    weights = card.weights if isinstance(card.weights, WeightSource) else WeightSource()
    rows = [("Task", f"{card.title or card.task} ({card.task})"),
            ("Classes", ", ".join(card.classes)),
            ("Modality", str(card.modality or "n/a")),
            ("Backbone", f"{card.backbone_name or 'n/a'}" + (f" ({family})" if family else "")
             + (f", {pre.image_size} px input" if pre.image_size else "")),
            ("Weights", " — ".join(str(x) for x in (weights.source, weights.detail) if x) or "n/a")]
    if pre.tta:
        rows.append(("Test-time views", TTA_TEXT.get(pre.tta, str(pre.tta))))
    if card.training is not None and card.training.data:
        rows.append(("Training data", str(card.training.data)))
    if split is not None and split.to_dict():
        parts = [f"{k} {getattr(split, k)}" for k in ("train", "val", "test") if isinstance(getattr(split, k), int)]
        rows.append(("Split", ", ".join(parts) + (f" (hash {split.hash})" if split.hash else "")))
    if cal is not None and cal.temperature is not None:
        ece = ""
        before, after = cal.extra.get("ece_before"), cal.extra.get("ece_after")
        if before is not None and after is not None:
            ece = f"; ECE {_fmt(before)} → {_fmt(after)}"
        eps = cal.extra.get("label_smoothing")
        if eps:  # a validation part ranked all right: the fit read n right of n as a small chance of error
            ece += f"; fitted with label smoothing 1/{round(1 / eps)} (every validation image ranked right)"
        rows.append(("Calibration", f"temperature {_fmt(cal.temperature, 2)}{ece}"))
    rows.append(("Decision", threshold_text(card)))
    metrics = card.metrics or {}
    if not metrics.get("metrics") and metrics.get("note"):  # a final fit, an unscored ensemble: say why
        rows.append(("Held-out metrics", f"none: {redact_paths(metrics['note'])}"))
    rows.append(("Model pellucid version", str(card.pellucid_version or "n/a")))
    if card.created:
        rows.append(("Model created", str(card.created)))
    return rows


def metric_rows(metrics: dict | None) -> list[tuple[str, str, str]]:
    """``(name, value, "[low, high]")`` rows of a metrics dict as :func:`classification_metrics` writes it;
    a metric below its minimum count shows its note ("too few labelled inputs ...") instead of an interval."""
    from pellucid.core.metric_text import interval_text, value_text

    rows = []
    for name, m in ((metrics or {}).get("metrics") or {}).items():
        if not isinstance(m, dict):
            continue
        rows.append((name, value_text(m), interval_text(m)))
    return rows
