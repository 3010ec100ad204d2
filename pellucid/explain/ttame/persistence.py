"""Persistence of a fitted T-TAME attention in a model folder: ``ttame.safetensors`` (weights plus
the rebuild config as metadata, no pickles) and the ``card.json`` entry
``explainers_fitted.ttame``, both replaced atomically (:func:`save_ttame`); :func:`load_ttame`
reads them back and warns when the classifier's weights changed since fitting;
:func:`has_ttame` tells whether a folder holds them."""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import warnings
from pathlib import Path

from pellucid.explain.base import ExplanationError
from pellucid.explain.ttame.attention import _FORMAT, TTAMEAttention

__all__ = [
    "WEIGHTS_FILE",
    "has_ttame",
    "save_ttame",
    "load_ttame",
]

WEIGHTS_FILE = "ttame.safetensors"
_FIT_HINT = "pellucid fit-explainer ttame --model {folder}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def has_ttame(folder: str | Path) -> bool:
    """True when the model folder holds fitted T-TAME weights."""
    return (Path(folder) / WEIGHTS_FILE).is_file()


def save_ttame(folder: str | Path, attention: TTAMEAttention, info: dict | None = None) -> Path:
    """Write ``attention`` into a model folder: ``ttame.safetensors`` (weights + rebuild config)
    and ``card.explainers_fitted['ttame']`` (config + ``info``), both replaced atomically.

    Returns:
        The weights file.
    """
    from safetensors.torch import save_file

    import pellucid
    from pellucid.core.card import read_card, write_card

    folder = Path(folder)
    read_card(folder)  # a real model folder, or a clear ModelFolderError
    target = folder / WEIGHTS_FILE
    tmp = folder / (WEIGHTS_FILE + ".tmp")
    state = {k: v.detach().cpu().contiguous() for k, v in attention.state_dict().items()}
    save_file(state, str(tmp), metadata={"pellucid_ttame": json.dumps(attention.config()),
                                         "pellucid_version": pellucid.__version__})
    os.replace(tmp, target)
    entry = {"file": WEIGHTS_FILE, **attention.config(), "sha256": _sha256(target),
             "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
             "pellucid_version": pellucid.__version__, "paper": "Ntrougkas, Gkalelis & Mezaris, IEEE Access 2024"}
    weights = folder / "model.safetensors"
    if weights.is_file():
        entry["model_sha256"] = _sha256(weights)
    entry.update(info or {})
    card = read_card(folder)  # read-modify-write (keys the card does not model are kept in its extra)
    card.explainers_fitted = {**(card.explainers_fitted or {}), "ttame": entry}
    write_card(folder, card)
    return target


def _read_attention(path: Path, folder: Path) -> TTAMEAttention:
    """The attention in ``path``: built on the meta device and given the file's own tensors, so a config that
    asks for more than the file holds allocates nothing (a hand-made one had asked for 4e18 bytes)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as fh:
        meta = (fh.metadata() or {}).get("pellucid_ttame")
    if not meta:
        raise ExplanationError(f"{path} is not a pellucid T-TAME weights file (no 'pellucid_ttame' metadata); refit with "
                               f"`{_FIT_HINT.format(folder=folder)}`")
    cfg = json.loads(meta)
    if not isinstance(cfg, dict):
        raise TypeError("metadata")
    if cfg.get("format", 1) > _FORMAT:
        raise ExplanationError(f"{path} has T-TAME format {cfg['format']}, newer than this pellucid reads ({_FORMAT}); "
                               "upgrade pellucid or refit")
    with torch.device("meta"):
        att = TTAMEAttention(cfg["channels"], cfg["n_classes"], cfg.get("layers", ()))
    try:
        att.load_state_dict(load_file(str(path)), assign=True)
    except RuntimeError as err:
        raise ExplanationError(f"{path} does not match its own config (tensors missing, extra or of another shape); "
                               f"refit with `{_FIT_HINT.format(folder=folder)}`") from err
    return att


def load_ttame(folder: str | Path, *, check_model: bool = True) -> TTAMEAttention:
    """The T-TAME attention stored in a model folder, in eval mode.

    Args:
        folder: model folder holding ``ttame.safetensors``.
        check_model: warn when ``model.safetensors`` changed since the attention was fitted.

    Raises:
        ExplanationError: the folder has no fitted T-TAME (the message says how to fit it), or the
            file is not a T-TAME weights file or is damaged (one line each).
    """
    folder = Path(folder)
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise ExplanationError(f"ttame: model folder {folder} has no fitted T-TAME attention ({WEIGHTS_FILE}). "
                               f"Fit it first: `{_FIT_HINT.format(folder=folder)}`")
    try:
        att = _read_attention(path, folder)
    except ExplanationError:
        raise
    except Exception as err:  # noqa: BLE001 - safetensors, JSON, a missing or mistyped field: one line at every door
        raise ExplanationError(f"{path} is damaged ({type(err).__name__}); refit with "
                               f"`{_FIT_HINT.format(folder=folder)}`") from None
    from pellucid.core.card import CardError, read_card

    att.info = {}
    if (folder / "card.json").is_file():
        try:
            att.info = (read_card(folder).explainers_fitted or {}).get("ttame", {})
        except CardError:
            att.info = {}
    known = att.info.get("model_sha256")
    if check_model and known and (folder / "model.safetensors").is_file() and \
            _sha256(folder / "model.safetensors") != known:
        warnings.warn(f"{folder}/model.safetensors changed since T-TAME was fitted on it; its maps may no longer "
                      f"explain this model. Refit: `{_FIT_HINT.format(folder=folder)}`", stacklevel=2)
    return att.eval()
