"""The Streamlit web app (``pellucid ui``): thin pages over the same API as the command line.

``app.py`` is the entry script (navigation, model picker, intended-use banner); ``views/`` holds the
model, predict and batch pages; :mod:`pellucid.ui.logic` holds everything testable without
Streamlit, and :mod:`pellucid.ui.common` the few Streamlit helpers the pages share (cached model
loading, the banner). Nothing here is imported by the rest of pellucid.
"""
from __future__ import annotations

__all__: list[str] = []
