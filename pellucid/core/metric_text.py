"""The one text rendering of a metric: value, then its interval or the note that replaces it.

Every place that shows a metric in words — ``pellucid train`` and ``pellucid eval`` output, the
model card ``MODEL_CARD.md``, the report's metric table and the web app — uses these functions, so
a metric with too few labelled inputs reads the same everywhere: ``accuracy  1.000  too few labelled
inputs (n=6; need ≥ 10)`` instead of a made-up ``[1.000, 1.000]``. Entries are the ``metrics`` rows
of :func:`pellucid.core.metrics.classification_metrics` (``value``, ``low``, ``high``, ``interval``
and an optional ``note``). Standard library only, so any layer may import it cheaply.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["value_text", "interval_text", "format_metric", "format_metrics", "INTERVAL_KINDS"]

#: What each ``interval`` kind means, for legends under metric tables.
INTERVAL_KINDS = {
    "wilson": "Wilson score interval (a proportion of cases)",
    "bootstrap": "percentile bootstrap over the inputs",
}


def _number(x: Any, digits: int) -> str:
    if x is None or isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(float(x)):
        return "n/a"
    return f"{float(x):.{digits}f}"


def value_text(entry: Mapping[str, Any] | None, digits: int = 3) -> str:
    """The metric's point value, ``0.700``; ``n/a`` when it is undefined or missing."""
    return _number((entry or {}).get("value"), digits)


def interval_text(entry: Mapping[str, Any] | None, digits: int = 3) -> str:
    """``[low, high]``, or the entry's note when it has one (``too few labelled inputs (n=6; need ≥ 10)``),
    or ``""`` when there is neither (intervals not computed)."""
    entry = entry or {}
    if entry.get("note"):
        return str(entry["note"])
    low, high = entry.get("low"), entry.get("high")
    if low is None and high is None:
        return ""
    return f"[{_number(low, digits)}, {_number(high, digits)}]"


def format_metric(name: str, entry: Mapping[str, Any] | None, digits: int = 3) -> str:
    """One metric in one line: ``accuracy 0.700 [0.397, 0.892]`` or ``accuracy 1.000 — too few
    labelled inputs (n=6; need ≥ 10)``."""
    interval = interval_text(entry, digits)
    if interval and (entry or {}).get("note"):
        interval = f"— {interval}"
    return f"{name} {value_text(entry, digits)} {interval}".rstrip()


def format_metrics(result: Mapping[str, Any]) -> str:
    """Render the ``metrics`` of a :func:`~pellucid.core.metrics.classification_metrics` result as a
    small text table.

    Args:
        result: A dict returned by ``classification_metrics`` (or loaded back from JSON).

    Returns:
        Lines ``metric  value  [low, high]`` (or the note that replaces the interval); undefined
        values print as ``n/a``.
    """
    rows = result.get("metrics") or {}
    width = max([len("metric")] + [len(name) for name in rows])
    level = result.get("ci")
    ci_head = f"{round(level * 100):d}% CI" if level is not None else "CI"
    lines = [f"{'metric':<{width}}  {'value':>5}  [low, high] ({ci_head})"]
    for name, row in rows.items():
        lines.append(f"{name:<{width}}  {value_text(row):>5}  {interval_text(row)}".rstrip())
    return "\n".join(lines)
