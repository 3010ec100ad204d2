"""pellucid — trustworthy medical and applied image classification.

One transfer-learning core (``pellucid.core``), task apps built on it (``pellucid.apps``), readers and
datasets (``pellucid.datasets``), explanations (``pellucid.explain``) and a Streamlit app
(``pellucid.ui``). This module holds the single version number and re-exports the names most users
need; the heavy imports happen lazily, on first use, so ``import pellucid`` stays cheap.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "create_backbone": "pellucid.core.backbones",
    "list_backbones": "pellucid.core.backbones",
    "get_backbone_spec": "pellucid.core.backbones",
    "build_classifier": "pellucid.core.model",
    "get_task": "pellucid.core.tasks",
    "list_tasks": "pellucid.core.tasks",
    "train": "pellucid.core.training",
    "load_model": "pellucid.core.modelfolder",
    "save_model": "pellucid.core.modelfolder",
    "predict": "pellucid.core.predict",
    "predict_paths": "pellucid.core.predict",
    "read_image": "pellucid.datasets.readers",
    "get_explainer": "pellucid.explain",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    """Import the exported names on first access (keeps ``import pellucid`` free of torch)."""
    if name in _EXPORTS:
        module = importlib.import_module(_EXPORTS[name])
        return getattr(module, name)
    raise AttributeError(f"module 'pellucid' has no attribute {name!r}")
