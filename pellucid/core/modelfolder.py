"""The model folder: ``model.safetensors`` + ``card.json`` (+ metrics, plots, split, logs).

A model folder is the unit everything else consumes: predict, eval, explain, reports, the web app.
Weights are stored with safetensors, so loading never unpickles anything; the card records the task
and its classes, the backbone and where its weights came from, preprocessing, threshold, calibration,
metrics with intervals, the split hash and the pellucid version. Loading refuses a card whose classes
disagree with the task app of the same name.

Folders of other kinds (ensembles, few-shot prototypes, segmenters) are loaded by their own modules,
found through a table of kind → loader (:func:`register_kind`). The built-in kinds are listed there
by the ``"module:function"`` path of their loader, imported on first use, so this module imports
none of them: imports flow one way (ensemble, fewshot and segmentation use this module, never the
reverse), and ``import pellucid.core.modelfolder`` stays as cheap as it was.
"""
from __future__ import annotations

import datetime as _dt
import importlib
import json
import platform
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch

import pellucid
from pellucid.core.model import Classifier, build_classifier
from pellucid.core.tasks import TaskSpec
from pellucid.registry import Registry

__all__ = ["ModelFolderError", "build_card", "save_model", "load_model", "read_card", "CARD_KINDS",
           "register_kind", "card_kinds"]

#: A loader of one folder kind: ``(folder, card) -> model in eval mode``.
KindLoader = Callable[[Path, dict], torch.nn.Module]

# Kind → loader, or the "module:function" path of the loader (imported when a folder of that kind is
# loaded). "classifier" is built in below and is not in this table.
_KIND_LOADERS: Registry[KindLoader | str] = Registry("model-folder kind")
_KIND_LOADERS.register("ensemble", "pellucid.core.ensemble:load_ensemble")
_KIND_LOADERS.register("prototypes", "pellucid.core.fewshot:load_prototypes")
_KIND_LOADERS.register("segmentation", "pellucid.core.segmentation:load_segmenter")

#: The kinds pellucid itself writes (see :func:`card_kinds` for these plus registered ones).
CARD_KINDS = ("classifier", "ensemble", "prototypes", "segmentation")


def register_kind(kind: str, loader: KindLoader | str, *, replace: bool = False) -> None:
    """Teach :func:`load_model` a folder kind: ``loader(folder, card)`` returns the model.

    ``loader`` may be the callable or its ``"package.module:function"`` path, imported on first use.
    A kind already registered raises ``ValueError`` unless ``replace`` is true.
    """
    if kind == "classifier":
        raise ValueError("kind 'classifier' is built into pellucid.core.modelfolder and cannot be replaced")
    if isinstance(loader, str) and ":" not in loader:
        raise ValueError(f"loader path {loader!r} must look like 'package.module:function'")
    _KIND_LOADERS.register(kind, loader, replace=replace)


def card_kinds() -> tuple[str, ...]:
    """Every kind :func:`read_card` accepts: ``classifier`` and the registered ones."""
    return ("classifier", *_KIND_LOADERS.names())


def _kind_loader(kind: str) -> KindLoader:
    loader = _KIND_LOADERS.get(kind)
    if isinstance(loader, str):
        module, _, attr = loader.partition(":")
        loader = getattr(importlib.import_module(module), attr)
    return loader


class ModelFolderError(ValueError):
    """A model folder that is missing, incomplete, or disagrees with its task."""


def build_card(*, task: TaskSpec, model: Classifier, weight_info: dict, image_size: int, threshold: dict,
               calibration: dict, metrics: dict, split: dict, training: dict, recipe: dict,
               kind: str = "classifier") -> dict:
    """Assemble the ``card.json`` contents of a trained classifier."""
    spec = model.spec
    return {
        "kind": kind,
        "pellucid_version": pellucid.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "task": task.name,
        "title": task.title,
        "classes": list(task.classes),
        "positive_class": task.positive_class,
        "modality": task.modality,
        "intended_use": task.intended_use,
        "explainers": list(task.explainers),
        "explainer_options": dict(task.explainer_options),
        "backbone": spec.to_dict(),
        "weights": weight_info,
        "preprocessing": {"image_size": image_size, "channels_in": task.channels, "resize": "squash",
                          "input_range": [0.0, 1.0], "mean": list(spec.mean), "std": list(spec.std)},
        "threshold": threshold,
        "calibration": calibration,
        "metrics": metrics,
        "split": split,
        "training": {**training, "python": platform.python_version(), "torch": torch.__version__},
        "recipe": recipe,
    }


def save_model(folder: str | Path, model: torch.nn.Module, card: dict) -> Path:
    """Write ``model.safetensors`` and ``card.json`` into ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"pellucid_version": pellucid.__version__})
    (folder / "card.json").write_text(json.dumps(card, indent=1, default=_json_default))
    return folder


def _json_default(obj: Any):
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_card(folder: str | Path) -> dict:
    """The parsed ``card.json`` of a model folder (validated for the fields every kind needs)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(f"model folder {folder} not found: give the folder written by `pellucid train`")
    card_path = folder / "card.json"
    if not card_path.exists():
        raise ModelFolderError(f"{folder} has no card.json: it is not a pellucid model folder")
    try:
        card = json.loads(card_path.read_text())
    except json.JSONDecodeError as err:
        raise ModelFolderError(f"{card_path} is not valid JSON ({err.msg} at line {err.lineno})") from err
    kind = card.get("kind", "classifier")
    kinds = card_kinds()
    if kind not in kinds:
        raise ModelFolderError(f"{card_path}: unknown kind {kind!r} (expected one of {', '.join(kinds)})")
    for key in ("classes", "task"):
        if key not in card:
            raise ModelFolderError(f"{card_path}: missing {key!r}")
    _check_task(card, card_path)
    return card


def _check_task(card: dict, card_path: Path) -> None:
    from pellucid.core.tasks import get_task, list_tasks

    name = card["task"]
    if name not in list_tasks():
        return  # a user task without an app folder (few-shot, custom)
    task = get_task(name)
    if list(task.classes) != list(card["classes"]):
        raise ModelFolderError(
            f"{card_path}: classes {card['classes']} disagree with task {name!r} {list(task.classes)}; "
            "retrain the model for this task or fix the card's task name")


def load_model(folder: str | Path, *, map_location: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Load a model folder: ``(model in eval mode, card)``.

    Classifier folders are rebuilt from the backbone registry (no pickles); other kinds (ensemble,
    prototypes, segmentation, or one added with :func:`register_kind`) go to their own loaders.
    """
    folder = Path(folder)
    card = read_card(folder)
    kind = card.get("kind", "classifier")
    if kind != "classifier":
        return _kind_loader(kind)(folder, card), card
    weights = folder / "model.safetensors"
    if not weights.exists():
        raise ModelFolderError(f"{folder} has no model.safetensors: the training run did not finish; retrain")
    from safetensors.torch import load_file

    model, _ = build_classifier(card["backbone"]["name"], len(card["classes"]), pretrained=False)
    pre = card.get("preprocessing", {})
    if pre.get("mean") and pre.get("std"):
        model.backbone.spec = replace(model.backbone.spec, mean=tuple(pre["mean"]), std=tuple(pre["std"]))
        model.mean.copy_(torch.tensor(pre["mean"]).view(1, 3, 1, 1))
        model.std.copy_(torch.tensor(pre["std"]).view(1, 3, 1, 1))
    state = load_file(str(weights))
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ModelFolderError(f"{weights} does not fit backbone {card['backbone']['name']!r}: "
                               f"{str(err).splitlines()[0]}") from err
    model._pellucid_folder = str(folder)  # folder-bound add-ons (ttame.safetensors, ood.safetensors) live here
    return model.to(map_location).eval(), card
