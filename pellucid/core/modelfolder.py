"""The model folder: ``model.safetensors`` + ``card.json`` + ``MODEL_CARD.md`` (+ metrics, plots, split, logs).

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

The card itself — its typed fields, its one writer and its one reader — is
:mod:`pellucid.core.card`; this module re-exports :func:`read_card`, :func:`write_card`,
:class:`ModelCard` and :class:`ModelFolderError` from there.
"""
from __future__ import annotations

import datetime as _dt
import importlib
import platform
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

import pellucid
from pellucid.core.card import (CARD_KINDS, KIND_LOADERS, Backbone, Calibration, CardError, ModelCard,
                                ModelFolderError, Preprocessing, SplitSummary, Threshold, TrainingInfo, WeightSource,
                                card_kinds, read_card, write_card)
from pellucid.core.model import Classifier, build_classifier
from pellucid.core.tasks import TaskSpec
from pellucid.registry import Registry

__all__ = ["ModelFolderError", "weights_mismatch", "CardError", "ModelCard", "build_card", "save_model", "load_model",
           "read_card", "write_card", "CARD_KINDS", "register_kind", "card_kinds"]

#: A loader of one folder kind: ``(folder, card) -> model in eval mode``.
KindLoader = Callable[[Path, ModelCard], torch.nn.Module]

# Kind → loader, or the "module:function" path of the loader (imported when a folder of that kind is
# loaded). "classifier" is built in below and is not in this table. The table is the card module's,
# so that read_card knows the kinds without importing this module.
_KIND_LOADERS: Registry[KindLoader | str] = KIND_LOADERS


def weights_mismatch(weights: Path, card: ModelCard, err: RuntimeError) -> ModelFolderError:
    """One line for a weights file that does not fit the network its card describes: PyTorch's first line says
    only "Error(s) in loading state_dict for Classifier:"; the first mismatch it lists comes along."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    detail = (lines[1] if len(lines) > 1 else lines[0] if lines else type(err).__name__).rstrip(".")
    if len(detail) > 200:
        detail = detail[:197] + "..."
    n = len(card.classes)
    return ModelFolderError(f"{weights} does not fit backbone {card.backbone_name!r} with the card's {n} "
                            f"class{'' if n == 1 else 'es'} ({detail}): the folder's card and weights do not belong "
                            "together; use the card training wrote, or retrain")


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


def _kind_loader(kind: str) -> KindLoader:
    loader = _KIND_LOADERS.get(kind)
    if isinstance(loader, str):
        module, _, attr = loader.partition(":")
        loader = getattr(importlib.import_module(module), attr)
    return loader


def build_card(*, task: TaskSpec, model: Classifier, weight_info: dict, image_size: int, threshold: dict,
               calibration: dict, metrics: dict, split: dict, training: dict, recipe: dict,
               kind: str = "classifier") -> ModelCard:
    """The :class:`~pellucid.core.card.ModelCard` of a trained classifier."""
    spec = model.spec
    return ModelCard(
        kind=kind,
        pellucid_version=pellucid.__version__,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        task=task.name,
        title=task.title,
        classes=list(task.classes),
        positive_class=task.positive_class,
        modality=task.modality,
        intended_use=task.intended_use,
        explainers=list(task.explainers),
        explainer_options=dict(task.explainer_options),
        backbone=Backbone.from_dict({**spec.to_dict(),  # the pooled inner layers the head also reads, if any
                                     **({"probe_layers": list(model.taps)} if getattr(model, "taps", ()) else {})}),
        weights=WeightSource.from_dict(weight_info),
        preprocessing=Preprocessing(image_size=image_size, channels_in=task.channels, resize="squash",
                                    input_range=[0.0, 1.0], mean=list(spec.mean), std=list(spec.std)),
        threshold=Threshold.from_dict(threshold),
        calibration=Calibration.from_dict(calibration),
        metrics=metrics,
        split=SplitSummary.from_dict(split),
        training=TrainingInfo.from_dict({**training, "python": platform.python_version(), "torch": torch.__version__}),
        recipe=recipe,
        extra={"task_spec": task.to_toml_dict()},  # the whole task: the folder needs no installed app
    )


def save_model(folder: str | Path, model: torch.nn.Module, card: ModelCard | dict) -> Path:
    """Write ``model.safetensors`` and ``card.json`` (through :func:`~pellucid.core.card.write_card`, which
    also writes the human-readable ``MODEL_CARD.md``) into ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "inner", model)  # a view-averaging model stores its network; the card names the views
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"pellucid_version": pellucid.__version__})
    write_card(folder, card)
    return folder


def load_model(folder: str | Path, *, map_location: str | torch.device = "cpu") -> tuple[torch.nn.Module, ModelCard]:
    """Load a model folder: ``(model in eval mode, card)``.

    Classifier folders are rebuilt from the backbone registry (no pickles); other kinds (ensemble,
    prototypes, segmentation, or one added with :func:`register_kind`) go to their own loaders,
    called as ``loader(folder, card)`` with the :class:`~pellucid.core.card.ModelCard`.
    """
    folder = Path(folder)
    try:
        card = read_card(folder)
    except CardError as err:
        msg = str(err)
        if "is not valid JSON" in msg or "cannot be read" in msg:  # truncated or damaged on disk
            raise CardError(f"{msg}; the model folder {folder} is damaged: copy it again or retrain") from None
        raise
    if card.kind != "classifier":
        return _kind_loader(card.kind)(folder, card), card
    weights = folder / "model.safetensors"
    if not weights.exists():
        raise ModelFolderError(f"{folder} has no model.safetensors: the training run did not finish; retrain")
    from safetensors.torch import load_file

    if not card.backbone_name:
        raise CardError(f"{folder / 'card.json'}: missing required field 'backbone.name' for a classifier")
    taps = card.backbone.extra.get("probe_layers") or []
    if not isinstance(taps, list) or not all(isinstance(t, str) for t in taps):
        raise CardError(f"{folder / 'card.json'}: 'backbone.probe_layers' must be a list of layer names, got "
                        f"{str(taps)[:80]}; the model folder is damaged: copy it again or retrain")
    try:
        model, _ = build_classifier(card.backbone_name, len(card.classes), pretrained=False, taps=taps)
    except ValueError as err:  # a tap the backbone does not have
        raise CardError(f"{folder / 'card.json'}: {err}; the model folder is damaged: copy it again or retrain") from None
    pre = card.preprocessing
    if pre.mean and pre.std:
        model.backbone.spec = replace(model.backbone.spec, mean=tuple(pre.mean), std=tuple(pre.std))
        model.mean.copy_(torch.tensor(pre.mean).view(1, 3, 1, 1))
        model.std.copy_(torch.tensor(pre.std).view(1, 3, 1, 1))
    try:
        state = load_file(str(weights))
    except Exception as err:  # SafetensorError (truncated, not safetensors), OSError (unreadable)
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise ModelFolderError(f"{weights} cannot be loaded ({reason}): the model folder {folder} is damaged; "
                               f"copy it again or retrain") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise weights_mismatch(weights, card, err) from err
    model._pellucid_folder = str(folder)  # folder-bound add-ons (ttame.safetensors, ood.safetensors) live here
    if pre.tta:
        from pellucid.core.views import ViewAverage, check_tta

        try:
            model = ViewAverage(model, check_tta(pre.tta, f"{folder / 'card.json'}"))
        except ValueError as err:
            raise CardError(f"{err} (preprocessing.tta); the model folder is damaged: copy it again or retrain") from None
    return model.to(map_location).eval(), card
