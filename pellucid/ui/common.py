"""Streamlit helpers the pages share: the model picker, the cached model, the intended-use banner.

The model is loaded once per folder version with ``st.cache_resource`` (the key includes the
modification times of ``card.json``, the weights and the OOD reference, so a retrained or newly
referenced folder is picked up). ``app.py`` runs :func:`model_picker` and :func:`banner` on every page
and leaves the loaded model in the session for the page to fetch with :func:`loaded_model`. For chest
X-ray models the sidebar also offers a lung segmenter (the model card's own by default, or a
segmentation folder under ``runs/``); :func:`lung_segmenter` hands it to the page.

:func:`incident_guard` wraps each page: an unexpected exception is logged with its traceback and an
incident id on the server, and the visitor sees one line with that id (never a traceback or a server
path).
"""
from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import streamlit as st

from pellucid.core.card import ModelCard
from pellucid.core.ood import MemberReferences, NeighbourReference, OODReference, load_reference
from pellucid.core.predict import Predictor
from pellucid.explain.report import DEFAULT_INTENDED_USE, ReportError, intended_use
from pellucid.ui.logic import (
    NO_SEGMENTER,
    default_model,
    find_model_folders,
    load_lung_segmenter,
    md_literal,
    segmenter_choices,
)

__all__ = ["Loaded", "Segmenter", "banner", "incident_guard", "loaded_model", "lung_segmenter", "model_picker",
           "require_model", "to_uint8", "runs_root"]

log = logging.getLogger(__name__)

OTHER = "Other folder…"
_STATE = "_pellucid_loaded"
_SEG_STATE = "_pellucid_segmenter"


@dataclass
class Loaded:
    """A model ready to use: its folder, predictor, OOD reference and a key for caches."""

    folder: Path
    predictor: Predictor
    reference: OODReference | MemberReferences | NeighbourReference | None
    key: str

    @property
    def card(self) -> ModelCard:
        return self.predictor.card


def runs_root() -> Path:
    """Where model folders are looked for: ``$PELLUCID_RUNS`` or ``runs`` in the working folder."""
    return Path(os.environ.get("PELLUCID_RUNS", "runs"))


def _stamp(folder: Path) -> float:
    names = ("card.json", "model.safetensors", "ood.safetensors")
    return max((folder / n).stat().st_mtime for n in names if (folder / n).exists()) if folder.is_dir() else 0.0


@dataclass
class Segmenter:
    """The lung segmenter chosen in the sidebar: the module, its display name and a key for caches."""

    model: object
    name: str
    key: str


@st.cache_resource(show_spinner="Loading the model…", max_entries=4)
def _load(folder: str, stamp: float) -> tuple[Predictor, OODReference | MemberReferences | NeighbourReference | None]:
    return Predictor(folder), load_reference(folder)


@st.cache_resource(show_spinner="Loading the lung segmenter…", max_entries=4)
def _load_segmenter(model_key: str, choice: str, stamp: float, _predictor: Predictor):
    return load_lung_segmenter(_predictor, choice)


def _segmenter_picker(loaded: Loaded) -> None:
    """Sidebar choice of a lung segmenter for chest X-ray models (outline + lung share)."""
    st.session_state[_SEG_STATE] = None
    options = segmenter_choices(loaded.card, runs_root())
    if not options:
        return
    choice = st.sidebar.selectbox(
        "Lung segmenter", options, key="segmenter_choice",
        help="Draws the lung outline on explanations and reports the share of each map inside the lungs. "
             f"Segmentation folders (pellucid train tb-lungseg) under {runs_root()}/ are listed.")
    if choice == NO_SEGMENTER:
        return
    try:
        model, name = _load_segmenter(loaded.key, choice, _stamp(Path(choice)), loaded.predictor)
    except ReportError as err:  # already names the folder
        st.sidebar.error(str(err).splitlines()[0][:1].upper() + str(err).splitlines()[0][1:])
        return
    except (ValueError, OSError, KeyError) as err:
        st.sidebar.error(f"Cannot use {choice} as lung segmenter: {str(err).splitlines()[0]}")
        return
    if model is not None:
        st.session_state[_SEG_STATE] = Segmenter(model, name, f"{loaded.key}|{choice}")


def lung_segmenter() -> Segmenter | None:
    """The lung segmenter chosen in the sidebar for the loaded model, or None."""
    return st.session_state.get(_SEG_STATE)


def model_picker() -> None:
    """Sidebar controls choosing the model folder (``runs/`` folders, ``--model``, or a typed path)."""
    found = [str(p) for p in find_model_folders(runs_root())]
    first = default_model(runs_root())
    options = list(dict.fromkeys(([first] if first else []) + found)) + [OTHER]
    st.sidebar.header("Model")
    choice = st.sidebar.selectbox("Model folder", options, key="model_choice",
                                  help=f"Folders with a card.json under {runs_root()}/, or type a path.")
    folder = st.sidebar.text_input("Model folder path", key="model_path",
                                   placeholder="runs/tb-demo-…") if choice == OTHER else choice
    st.session_state[_STATE] = None
    st.session_state[_SEG_STATE] = None
    if not folder:
        return
    path = Path(folder).expanduser()
    try:
        predictor, reference = _load(str(path.resolve()), _stamp(path))
    except (ValueError, OSError, KeyError) as err:  # ModelFolderError / TaskSpecError are ValueErrors
        st.sidebar.error(f"Cannot load {folder}: {str(err).splitlines()[0]}")
        return
    if predictor.card.kind == "segmentation":
        st.sidebar.error(f"{folder} is a lung segmentation folder, not a classifier: choose it as the lung segmenter "
                         "of a chest X-ray model")
        return
    st.session_state[_STATE] = Loaded(path, predictor, reference, f"{path.resolve()}@{_stamp(path)}")
    card = predictor.card
    st.sidebar.caption(f"**{md_literal(card.title or card.task)}** · {md_literal(card.backbone_name or '?')} "
                       f"· classes: {', '.join(map(md_literal, predictor.classes))}")
    _segmenter_picker(st.session_state[_STATE])


def loaded_model() -> Loaded | None:
    """The model the sidebar loaded in this run, or None."""
    return st.session_state.get(_STATE)


def require_model() -> Loaded:
    """The loaded model; without one, say how to choose one and stop the page."""
    loaded = loaded_model()
    if loaded is None:
        st.info("Choose a model folder in the sidebar (one written by `pellucid train`), or start the app "
                "with `pellucid ui --model DIR`.")
        st.stop()
    return loaded


@contextmanager
def incident_guard(where: str = "page") -> Iterator[None]:
    """Run a page (or the sidebar) so that an unexpected exception shows one line to the visitor.

    The traceback goes to the server log with a random incident id; the page shows "Something went
    wrong (incident <id>)". Streamlit's own control flow (``st.stop``, ``st.rerun``, page switches)
    raises ``BaseException`` subclasses and passes through.
    """
    try:
        yield
    except Exception:  # noqa: BLE001 - the last line of defence between a visitor and a traceback
        incident = secrets.token_hex(4)
        log.exception("web app incident %s in the %s", incident, where)
        st.error(f"Something went wrong (incident {incident}); the details are in the server log.",
                 icon=":material/error:")


def banner() -> None:
    """The intended-use notice of the loaded model (or the default one) at the top of every page."""
    loaded = loaded_model()
    text = intended_use(loaded.card) if loaded else DEFAULT_INTENDED_USE
    st.warning(f"**Intended use.** {text}", icon=":material/health_and_safety:")


def to_uint8(array: np.ndarray) -> np.ndarray:
    """Float ``(H, W[, 1|3])`` in [0, 1] → uint8 for ``st.image`` (single channel squeezed)."""
    a = np.asarray(array)
    if a.dtype != np.uint8:
        a = np.clip(a * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    return a
