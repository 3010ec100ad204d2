"""Task specifications: each app's classes, preprocessing, recipe and policies, read from TOML.

A :class:`TaskSpec` is data, not code: ``pellucid/apps/<task>/task.toml`` says which classes exist
and in which order, the positive class, the modality and channels, the image size, the default
backbone and fine-tuning recipe, the augmentation preset, the headline metrics, the threshold
policy, the default explainers and the intended-use text. Specs are validated when loaded, with
messages that name the file and the key.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from pellucid.registry import did_you_mean, unknown_name_error

__all__ = ["TaskSpec", "TaskSpecError", "get_task", "list_tasks", "load_task_file", "DEFAULT_RECIPE"]

DEFAULT_RECIPE: dict[str, Any] = {
    "backbone": "efficientnet_lite0",
    "pretrained": True,
    "checkpoint": None,
    "finetune": "progressive",
    "epochs": 6,
    "probe_epochs": 30,
    "batch_size": 32,
    "lr": 1e-3,
    "head_lr": 3e-3,
    "lr_decay": 0.5,
    "stages_per_epoch": 2,
    "max_stages": 4,
    "weight_decay": 1e-4,
    "label_smoothing": 0.0,
    "dropout": 0.2,
    "patience": 4,
    "balance": "weights",
    "val_fraction": 0.15,
    "test_fraction": 0.2,
    "mixing": "none",
    "num_workers": 0,
    "split": "grouped",
    "members": [],
    "preprocess": "none",       # none | lung-mask | lung-crop (pellucid.core.segmentation.PREPROCESS_CHOICES)
    "segmenter": None,          # segmentation model folder used by lung-mask / lung-crop
}

_MODALITIES = {"CXR", "photo", "dermoscopy", "histopathology", "sonar", "other"}
_POLICIES = {"argmax", "youden", "sensitivity"}


class TaskSpecError(ValueError):
    """A task.toml that is missing a key or holds an impossible value."""


@dataclass(frozen=True)
class TaskSpec:
    """One task app's configuration (see module docstring)."""

    name: str
    title: str
    classes: tuple[str, ...]
    positive_class: str | None
    modality: str
    channels: int
    image_size: int
    augment: str
    metrics: tuple[str, ...]
    threshold_policy: str
    target_sensitivity: float
    explainers: tuple[str, ...]
    intended_use: str
    default_data: str
    recipe: dict = field(default_factory=dict, hash=False, compare=False)
    explainer_options: dict = field(default_factory=dict, hash=False, compare=False)
    aliases: dict = field(default_factory=dict, hash=False, compare=False)
    source: str = ""

    @property
    def positive_index(self) -> int | None:
        return self.classes.index(self.positive_class) if self.positive_class else None

    @property
    def binary(self) -> bool:
        return len(self.classes) == 2

    def to_dict(self) -> dict:
        return {
            "name": self.name, "title": self.title, "classes": list(self.classes),
            "positive_class": self.positive_class, "modality": self.modality, "channels": self.channels,
            "image_size": self.image_size, "augment": self.augment, "metrics": list(self.metrics),
            "threshold_policy": self.threshold_policy, "target_sensitivity": self.target_sensitivity,
            "explainers": list(self.explainers), "explainer_options": dict(self.explainer_options),
            "intended_use": self.intended_use,
            "default_data": self.default_data, "recipe": dict(self.recipe),
        }


def _need(data: dict, key: str, kind: type, where: str):
    if key not in data:
        raise TaskSpecError(f"{where}: missing key {key!r}")
    value = data[key]
    if not isinstance(value, kind):
        raise TaskSpecError(f"{where}: {key!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


def load_task_file(path: str | Path) -> TaskSpec:
    """Read and validate one ``task.toml``."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise TaskSpecError(f"{path}: cannot read task spec ({err})") from err
    return task_from_dict(data, where=str(path))


def task_from_dict(data: dict, where: str = "task spec") -> TaskSpec:
    """Validate a parsed task dict (the contents of a task.toml) into a :class:`TaskSpec`."""
    name = _need(data, "name", str, where)
    classes = tuple(_need(data, "classes", list, where))
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise TaskSpecError(f"{where}: 'classes' needs at least two distinct names, got {list(classes)}")
    positive = data.get("positive_class")
    if positive is not None and positive not in classes:
        raise TaskSpecError(f"{where}: positive_class {positive!r} is not one of {list(classes)}")
    modality = data.get("modality", "other")
    if modality not in _MODALITIES:
        raise TaskSpecError(f"{where}: modality {modality!r} not in {sorted(_MODALITIES)}")
    channels = int(data.get("channels", 3))
    if channels not in (1, 3):
        raise TaskSpecError(f"{where}: channels must be 1 or 3, got {channels}")
    threshold = data.get("threshold", {})
    policy = threshold.get("policy", "argmax")
    if policy not in _POLICIES:
        raise unknown_name_error("threshold policy", policy, sorted(_POLICIES))
    if policy != "argmax" and len(classes) != 2:
        raise TaskSpecError(f"{where}: threshold policy {policy!r} needs a binary task")
    recipe = {**DEFAULT_RECIPE, **data.get("recipe", {})}
    unknown = set(data.get("recipe", {})) - set(DEFAULT_RECIPE)
    if unknown:
        key = sorted(unknown)[0]
        raise TaskSpecError(f"{where}: unknown recipe key {key!r}" + did_you_mean(key, DEFAULT_RECIPE, clause=True))
    from pellucid.core.backbones import get_backbone_spec

    get_backbone_spec(recipe["backbone"])
    image_size = int(data.get("image_size", 224))
    if not 16 <= image_size <= 1024:
        raise TaskSpecError(f"{where}: image_size {image_size} outside 16..1024")
    explainers = tuple(data.get("explainers", ["gradcam"]))
    return TaskSpec(
        name=name,
        title=data.get("title", name),
        classes=classes,
        positive_class=positive,
        modality=modality,
        channels=channels,
        image_size=image_size,
        augment=data.get("augment", "natural"),
        metrics=tuple(data.get("metrics", ["accuracy", "balanced_accuracy", "auroc", "f1"])),
        threshold_policy=policy,
        target_sensitivity=float(threshold.get("target_sensitivity", 0.95)),
        explainers=explainers,
        explainer_options=_explainer_options(data.get("explainer_options", {}), explainers, where),
        intended_use=data.get("intended_use", "Research use only. Not a medical device; not for diagnosis."),
        default_data=data.get("default_data", name),
        recipe=recipe,
        aliases=_aliases(data.get("aliases", {}), classes, where),
        source=where,
    )


def _explainer_options(raw: dict, explainers: tuple[str, ...], where: str) -> dict:
    """``[explainer_options.<method>]`` tables: options of the task's default explainers (checked
    against the explainer's signature when it is built)."""
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise TaskSpecError(f"{where}: explainer_options must hold one table per method, e.g. "
                            "[explainer_options.lime] with segmentation = \"quickshift\"")
    for method in raw:
        if method not in explainers:
            raise TaskSpecError(f"{where}: explainer_options.{method} is given but {method!r} is not one of the task's "
                                f"explainers {list(explainers)}")
    return {m: dict(v) for m, v in raw.items()}


def _aliases(raw: dict, classes: tuple[str, ...], where: str) -> dict:
    for alias, target in raw.items():
        if target not in classes:
            raise TaskSpecError(f"{where}: alias {alias!r} points to {target!r}, which is not one of {list(classes)}")
    return dict(raw)


def _apps_root() -> Path:
    return Path(str(resources.files("pellucid.apps")))


def list_tasks() -> list[str]:
    """Names of the task apps that ship a task.toml."""
    return sorted(p.parent.name.replace("_", "-") for p in _apps_root().glob("*/task.toml"))


def get_task(name: str) -> TaskSpec:
    """The validated :class:`TaskSpec` of app ``name`` (did-you-mean on a typo)."""
    folder = _apps_root() / name.replace("-", "_")
    path = folder / "task.toml"
    if not path.exists():
        raise unknown_name_error("task", name, list_tasks())
    return load_task_file(path)
