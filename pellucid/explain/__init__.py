"""Explanations of every prediction: the Grad-CAM family, LIME, SP-LIME, occlusion, and one
faithfulness harness that scores them all the same way.

``get_explainer(name, **options).explain(model, images, targets)`` returns one
:class:`Explanation` (a ``(H, W)`` heatmap in [0, 1] and its class) per image;
``score_explanations`` measures Average Drop / Increase in Confidence, deletion and insertion AUC,
ROAD and the model-randomisation sanity check; ``score_table`` prints them method by metric;
``overlay`` draws a heatmap on the original image. Explainers leave the model exactly as they found
it and raise :class:`ExplanationError` when no gradient reaches the hooked layer.

This package owns the list of built-in explainers: importing it imports their modules (``cam``,
``lime``, ``occlusion``, ``ttame``), each of which registers its classes with
:func:`register_explainer`. :mod:`pellucid.explain.base` imports none of them, so imports flow one
way: plugins → base. Python imports this package before any of its submodules, so
``from pellucid.explain.base import get_explainer`` sees the full registry too.
"""
from __future__ import annotations

from pellucid.explain.base import (
    Explainer,
    Explanation,
    ExplanationError,
    explainer_for,
    get_explainer,
    list_explainers,
    register_explainer,
)

# The built-in explainers; each module registers its classes on import.
from pellucid.explain import cam, lime, occlusion, ttame  # noqa: E402,F401  (isort: keep after base)
from pellucid.explain.metrics import score_explanations, score_table
from pellucid.explain.overlay import overlay, save_overlay

__all__ = [
    "Explanation",
    "Explainer",
    "ExplanationError",
    "explainer_for",
    "get_explainer",
    "list_explainers",
    "register_explainer",
    "score_explanations",
    "score_table",
    "overlay",
    "save_overlay",
]
