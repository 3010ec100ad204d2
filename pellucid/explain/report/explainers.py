"""Which explainers a report can run and how their results read: the registered explainer names, the
check of asked-for names (with a did-you-mean). The faithfulness scores shown beside each overlay are
formatted by :mod:`pellucid.explain.captions` (re-exported here).
"""
from __future__ import annotations

from typing import Sequence

from pellucid.explain.captions import SCORE_LABELS, score_items
from pellucid.explain.report.records import ReportError
from pellucid.registry import close_matches

__all__ = ["SCORE_LABELS", "available_methods", "score_items"]


def available_methods() -> list[str]:
    """Names of the registered explainers ([] when the explain package offers none)."""
    try:
        from pellucid.explain import list_explainers
    except ImportError:
        return []
    return list(list_explainers())


def _check_methods(methods: Sequence[str]) -> list[str]:
    """``methods`` when every name is a registered explainer; a :class:`ReportError` with a
    did-you-mean (:func:`pellucid.registry.close_matches`) and the known names otherwise."""
    known = available_methods()
    for m in methods:
        if m not in known:
            close = close_matches(m, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ReportError(f"unknown explainer {m!r}: {hint}available: {', '.join(known) or 'none installed'}")
    return list(methods)
