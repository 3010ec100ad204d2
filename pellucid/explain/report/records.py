"""The records a report is made of. :class:`Case` and :class:`MethodResult` are the one pipeline's
(:mod:`pellucid.core.pipeline`), so a report shows exactly what every other door computes;
:class:`ReportError` is the report's own refusal (no images, an unknown explainer name).
"""
from __future__ import annotations

from pellucid.core.pipeline import Case, MethodResult, PipelineError, Progress

__all__ = ["Case", "MethodResult", "Progress", "ReportError"]


class ReportError(PipelineError):
    """A report cannot be made as asked (no images, an unknown explainer name)."""
