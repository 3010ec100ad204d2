"""The records a report is made of: :class:`Case` (one input on its way to a report), :class:`MethodResult`
(one explainer's output for one case), :class:`ReportError` and the ``Progress`` callback type. They
hold data only; the case pipeline (:mod:`.cases`) fills them and every other module of the report reads
them, so they sit apart from any one step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from pellucid.core.ood import OODCheck
from pellucid.datasets.readers import Image

__all__ = ["Case", "MethodResult", "Progress", "ReportError"]

Progress = Callable[[float, str], None]


class ReportError(ValueError):
    """A report cannot be made as asked (no images, an unknown explainer name)."""


@dataclass(eq=False)
class MethodResult:
    """One explainer's output for one case.

    Attributes:
        method: explainer name.
        heatmap: ``(h, w)`` float in [0, 1] at the model's input resolution, or None if it failed.
        scores: faithfulness scores by metric name.
        note: why the heatmap or scores are missing (empty when all went well).
        detail: how the map was computed, where that varies per image (LIME: the precision of its
            passes and the check that chose it; see :func:`method_detail`).
    """

    method: str
    heatmap: np.ndarray | None
    scores: dict[str, float] = field(default_factory=dict)
    note: str = ""
    detail: str = ""


@dataclass(eq=False)
class Case:
    """One input on its way to a report.

    Attributes:
        name: display name, safe to show (hashed for DICOM unless identifiers were asked for).
        sha256: SHA-256 of the input file's bytes.
        is_dicom: whether the input was DICOM.
        image: the image as read (DICOM windowed), or None when unreadable or released.
        label / index / probs: predicted class, its index, calibrated probabilities by class.
        logits: raw logits ``(C,)``.
        true_label: the class from the folder layout, when the parent folder names a class.
        ood: the out-of-domain check.
        explanations: one :class:`MethodResult` per requested method.
        identifiers: DICOM identifying tags; filled only when identifiers were asked for.
        error: one line when the input could not be read.
        path: where the file is (never rendered for DICOM unless identifiers were asked for).
        window: DICOM window ``(center, width)`` the image was read with, None for the file's own.
        lung_mask: ``(H, W)`` bool lung mask at the image's resolution, when a lung segmenter ran.
    """

    name: str
    sha256: str
    is_dicom: bool = False
    image: Image | None = None
    label: str | None = None
    index: int | None = None
    probs: dict[str, float] = field(default_factory=dict)
    logits: np.ndarray | None = None
    true_label: str | None = None
    ood: OODCheck | None = None
    explanations: list[MethodResult] = field(default_factory=list)
    identifiers: dict[str, str] = field(default_factory=dict)
    error: str = ""
    path: Path | None = None
    window: tuple[float, float] | None = None
    meta: dict = field(default_factory=dict)
    lung_mask: np.ndarray | None = None

    @property
    def confidence(self) -> float:
        """Probability of the predicted class (NaN when there is no prediction)."""
        return self.probs.get(self.label, math.nan) if self.label else math.nan
