"""Model card text for reports and the web app: the intended-use notice, the decision rule in words, the
card summary and metric rows, and the number formatting (``n/a`` for missing or non-finite values) that
every report section shares.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["DEFAULT_INTENDED_USE", "card_rows", "intended_use", "metric_rows", "threshold_text"]

DEFAULT_INTENDED_USE = "Research use only. Not a diagnostic device; every result needs review by a qualified person."


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.number)) and not isinstance(v, bool)


def intended_use(card: dict) -> str:
    """The card's intended-use text, or the default research-use notice."""
    return str(card.get("intended_use") or DEFAULT_INTENDED_USE)


def threshold_text(card: dict) -> str:
    """How the decision is made, e.g. ``tuberculosis if P(tuberculosis) >= 0.430 (policy: youden)``."""
    thr = card.get("threshold") or {}
    value, policy = thr.get("value"), thr.get("policy") or "argmax"
    pos = thr.get("positive_class") or card.get("positive_class")
    if value is None or pos is None:
        return f"highest probability wins (policy: {policy})"
    return f"{pos} if P({pos}) ≥ {float(value):.3f}, else the other class (policy: {policy})"


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{digits}f}" if _is_number(v) else str(v)


def card_rows(card: dict) -> list[tuple[str, str]]:
    """The model card summary as ``(field, value)`` rows for reports and the web app."""
    bb = card.get("backbone") or {}
    weights = card.get("weights") or {}
    training = card.get("training") or {}
    split = card.get("split") or {}
    cal = card.get("calibration") or {}
    pre = card.get("preprocessing") or {}
    rows = [("Task", f"{card.get('title') or card.get('task')} ({card.get('task')})"),
            ("Classes", ", ".join(card.get("classes", []))),
            ("Modality", str(card.get("modality") or "n/a")),
            ("Backbone", f"{bb.get('name', 'n/a')}" + (f" ({bb['family']})" if bb.get("family") else "")
             + (f", {pre['image_size']} px input" if pre.get("image_size") else "")),
            ("Weights", " — ".join(str(x) for x in (weights.get("source"), weights.get("detail")) if x) or "n/a")]
    if training.get("data"):
        rows.append(("Training data", str(training["data"])))
    if split:
        parts = [f"{k} {split[k]}" for k in ("train", "val", "test") if isinstance(split.get(k), int)]
        rows.append(("Split", ", ".join(parts) + (f" (hash {split['hash']})" if split.get("hash") else "")))
    if cal.get("temperature") is not None:
        ece = ""
        if cal.get("ece_before") is not None and cal.get("ece_after") is not None:
            ece = f"; ECE {_fmt(cal['ece_before'])} → {_fmt(cal['ece_after'])}"
        rows.append(("Calibration", f"temperature {_fmt(cal['temperature'], 2)}{ece}"))
    rows.append(("Decision", threshold_text(card)))
    rows.append(("Model pellucid version", str(card.get("pellucid_version", "n/a"))))
    if card.get("created"):
        rows.append(("Model created", str(card["created"])))
    return rows


def metric_rows(metrics: dict | None) -> list[tuple[str, str, str]]:
    """``(name, value, "[low, high]")`` rows of a metrics dict as :func:`classification_metrics` writes it."""
    rows = []
    for name, m in ((metrics or {}).get("metrics") or {}).items():
        if not isinstance(m, dict):
            continue
        ci = f"[{_fmt(m.get('low'))}, {_fmt(m.get('high'))}]" if m.get("low") is not None else ""
        rows.append((name, _fmt(m.get("value")), ci))
    return rows
