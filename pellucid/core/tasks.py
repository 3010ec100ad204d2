"""Task specifications: each task's classes, preprocessing, recipe and policies, read from TOML.

A :class:`TaskSpec` is data, not code: a ``task.toml`` says which classes exist and in which order,
the positive class, the modality and channels, the image size, the default backbone and fine-tuning
recipe, the augmentation preset, the headline metrics, the threshold policy, the default explainers
and the intended-use text. Specs are validated when loaded, with messages that name the file and
the key. :func:`get_task` finds a task by name along a search path: tasks registered in this process
(:func:`register_task`, e.g. one the command line built from a data folder), then the current
folder (``<name>.toml``, ``<name>/task.toml`` or any ``*.toml`` whose ``name`` is the task's), then
each folder of ``PELLUCID_TASKS`` (``os.pathsep``-separated) the same way, then the apps shipped in
``pellucid/apps/<task>/task.toml``. :func:`task_toml` writes a spec back as an editable TOML file,
and a model folder's card carries its spec (``task_spec``), read back by :func:`task_of_card`.
This module imports nothing heavy: the backbone named by a recipe is checked (which imports torch)
only when ``check_backbone`` is true, so the command line can validate names and paths first.
"""
from __future__ import annotations

import json
import os
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Mapping

from pellucid.registry import did_you_mean, unknown_name_error

__all__ = ["TaskSpec", "TaskSpecError", "get_task", "list_tasks", "load_task_file", "task_from_dict", "DEFAULT_RECIPE",
           "TASKS_ENV", "register_task", "unregister_task", "task_dirs", "find_task_file", "task_toml",
           "task_of_card", "TTA_CHOICES", "TTA_TEXT", "check_tta", "TASK_NAME"]

#: Environment variable: extra folders of task specs, separated by ``os.pathsep``.
TASKS_ENV = "PELLUCID_TASKS"

#: the test-time view sets a recipe's ``tta`` may name besides "none" (defined in pellucid.core.views)
TTA_CHOICES = ("flip", "dihedral")
#: how model cards, reports and the web app describe each view set
TTA_TEXT = {"dihedral": "logits averaged over the image's 8 rotations and mirror images (tta: dihedral)",
            "flip": "logits averaged over the image and its mirror image (tta: flip)"}


def check_tta(value: object, where: str = "the recipe") -> str:
    """``value`` as a view-set name ("" for none: ``"none"``, ``""``, ``None``); a one-line ValueError otherwise."""
    if value in (None, False, "", "none"):
        return ""
    if value not in TTA_CHOICES:
        raise ValueError(f"tta must be one of none, {', '.join(TTA_CHOICES)}, got {str(value)[:40]!r}; fix {where}")
    return str(value)


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
    "probe_patience": 2,       # stop a fine-tune that has not beaten its probe's val loss after this many epochs
    "probe_flip": False,       # the linear probe also fits mirrored copies of the training images
    "ema": 0.0,                # fine-tune: average the weights with this time constant in epochs (0: off)
    "swa": 0.0,                # fine-tune: equal average of the epoch-end weights from this fraction of the epochs on (0: off)
    "snapshots": 0,            # fine-tune: a snapshot ensemble of this many cosine cycles over the epochs (0: off)
    "test_size": 0,            # predict at this input size instead of image_size (0: the same; see TrainConfig)
    "tta": "none",             # test-time views the logits are averaged over: none, flip, dihedral (pellucid.core.views)
    "probe_layers": [],        # linear probe: inner layers pooled beside the embedding (e.g. ["blocks.3", "blocks.4"])
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

    def to_toml_dict(self) -> dict:
        """The spec in ``task.toml`` form (``task_from_dict`` reads it back to an equal spec); keys
        whose value is None are left out (TOML has no null; the defaults restore them)."""
        out = {"name": self.name, "title": self.title, "classes": list(self.classes),
               "positive_class": self.positive_class, "modality": self.modality, "channels": self.channels,
               "image_size": self.image_size, "augment": self.augment, "default_data": self.default_data,
               "metrics": list(self.metrics), "explainers": list(self.explainers),
               "intended_use": self.intended_use,
               "threshold": {"policy": self.threshold_policy, "target_sensitivity": self.target_sensitivity},
               "recipe": {k: v for k, v in self.recipe.items() if v is not None},
               "explainer_options": {m: dict(o) for m, o in self.explainer_options.items()},
               "aliases": dict(self.aliases)}
        return {k: v for k, v in out.items() if v is not None}


def _need(data: dict, key: str, kind: type, where: str):
    if key not in data:
        raise TaskSpecError(f"{where}: missing key {key!r}")
    value = data[key]
    if not isinstance(value, kind):
        raise TaskSpecError(f"{where}: {key!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


def load_task_file(path: str | Path, *, check_backbone: bool = True) -> TaskSpec:
    """Read and validate one ``task.toml`` (``check_backbone``: see :func:`task_from_dict`)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError) as err:
        raise TaskSpecError(f"{path}: cannot read task spec ({str(err) or type(err).__name__})") from err
    return task_from_dict(data, where=str(path), check_backbone=check_backbone)


def task_from_dict(data: dict, where: str = "task spec", *, check_backbone: bool = True) -> TaskSpec:
    """Validate a parsed task dict (the contents of a task.toml) into a :class:`TaskSpec`.

    ``check_backbone``: also check that the recipe's backbone is registered (imports torch); the
    command line passes False to answer name and path errors before the heavy imports.
    """
    if not isinstance(data, Mapping):
        raise TaskSpecError(f"{where}: a task spec must be a table, got {type(data).__name__}")
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
    ema = recipe.get("ema", 0.0)
    if isinstance(ema, bool) or not isinstance(ema, (int, float)) or not 0 <= ema <= 1000:
        raise TaskSpecError(f"{where}: recipe key 'ema' must be a time constant in epochs, 0 (off) to 1000, got {ema!r}")
    swa = recipe.get("swa", 0.0)
    if isinstance(swa, bool) or not isinstance(swa, (int, float)) or not 0 <= swa < 1:
        raise TaskSpecError(f"{where}: recipe key 'swa' must be the fraction of the epochs after which the weights "
                            f"are averaged, 0 (off) up to but not including 1, got {swa!r}")
    if swa and ema:
        raise TaskSpecError(f"{where}: recipe keys 'ema' and 'swa' are two ways to average the weights; set one of them")
    snaps = recipe.get("snapshots", 0)
    if isinstance(snaps, bool) or not isinstance(snaps, int) or snaps == 1 or not 0 <= snaps <= 100:
        raise TaskSpecError(f"{where}: recipe key 'snapshots' must be the number of learning-rate cycles of a "
                            f"snapshot ensemble, 0 (off) or 2 to 100, got {snaps!r}")
    if snaps and (ema or swa):
        raise TaskSpecError(f"{where}: recipe keys 'snapshots', 'ema' and 'swa' are three ways to combine the "
                            "weights of one fine-tune; set one of them")
    if snaps and int(recipe.get("epochs", 0)) % snaps:
        raise TaskSpecError(f"{where}: recipe key 'snapshots' ({snaps}) must divide 'epochs' ({recipe.get('epochs')}), "
                            "so every cycle has the same number of epochs")
    test_size = recipe.get("test_size", 0)
    if isinstance(test_size, bool) or not isinstance(test_size, int) or not (test_size == 0 or 16 <= test_size <= 1024):
        raise TaskSpecError(f"{where}: recipe key 'test_size' must be the input size the model predicts at, 0 (the "
                            f"training image_size) or 16 to 1024 px, got {test_size!r}")
    if test_size and snaps:
        raise TaskSpecError(f"{where}: recipe keys 'test_size' and 'snapshots' do not go together: a snapshot "
                            "ensemble's members predict at the training image_size")
    try:
        if check_tta(recipe.get("tta", "none"), "the recipe key 'tta'") and snaps:
            raise ValueError("recipe keys 'tta' and 'snapshots' do not go together: a snapshot ensemble's members "
                             "predict in one view")
    except ValueError as err:
        raise TaskSpecError(f"{where}: {err}") from None
    taps = recipe.get("probe_layers", [])
    if not isinstance(taps, list) or len(taps) > 16 or not all(isinstance(t, str) and t for t in taps):
        raise TaskSpecError(f"{where}: recipe key 'probe_layers' must be a list of up to 16 layer names of the "
                            f"backbone, such as [\"blocks.3\", \"blocks.4\"], got {str(taps)[:80]}")
    if taps and recipe.get("finetune") != "linear-probe":
        raise TaskSpecError(f"{where}: recipe key 'probe_layers' is for linear-probe recipes; this one fine-tunes "
                            f"({recipe.get('finetune')!r}): set it on the probe members instead")
    if check_backbone:
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


# ----------------------------------------------------------------------------- the search path
_REGISTERED: dict[str, TaskSpec] = {}


def _key(name: str) -> str:
    return str(name).replace("_", "-")


def register_task(spec: TaskSpec) -> TaskSpec:
    """Make ``spec`` the task of its name in this process (first on the search path); returns it."""
    _REGISTERED[_key(spec.name)] = spec
    return spec


def unregister_task(name: str) -> None:
    """Forget a task registered with :func:`register_task` (no error when there is none)."""
    _REGISTERED.pop(_key(name), None)


def task_dirs() -> list[Path]:
    """The folders searched for user task specs, in order: the current folder, then ``PELLUCID_TASKS``."""
    extra = [Path(p).expanduser() for p in os.environ.get(TASKS_ENV, "").split(os.pathsep) if p.strip()]
    return [Path.cwd(), *extra]


def _spec_name(path: Path) -> str | None:
    """The ``name`` of a TOML file that looks like a task spec (``name`` and ``classes``), else None."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError):  # not a task spec
        return None
    name = data.get("name")
    return name if isinstance(name, str) and isinstance(data.get("classes"), list) else None


def _user_task_files(directory: Path) -> Iterator[tuple[str, Path]]:
    """``(name, file)`` of every task spec in ``directory``: ``*.toml`` and ``*/task.toml``."""
    if not directory.is_dir():
        return
    for path in sorted([*directory.glob("*.toml"), *directory.glob("*/task.toml")]):
        name = _spec_name(path)
        if name is not None:
            yield name, path


def find_task_file(name: str) -> Path | None:
    """The task spec file of ``name`` on the search path (user folders, then the apps), or None."""
    key = _key(name)
    for directory in task_dirs():
        for path in (directory / f"{name}.toml", directory / name / "task.toml"):
            if path.is_file() and _spec_name(path) is not None and _key(_spec_name(path)) == key:
                return path
        for found, path in _user_task_files(directory):
            if _key(found) == key:
                return path
    path = _apps_root() / name.replace("-", "_") / "task.toml"
    return path if path.is_file() else None


def list_tasks(*, include_user: bool = True) -> list[str]:
    """Names of the known tasks: the apps that ship a task.toml and (``include_user``) the tasks
    registered in this process or found in the user folders of :func:`task_dirs`."""
    names = {p.parent.name.replace("_", "-") for p in _apps_root().glob("*/task.toml")}
    if include_user:
        names |= set(_REGISTERED)
        for directory in task_dirs():
            names |= {_key(n) for n, _ in _user_task_files(directory)}
    return sorted(names)


def get_task(name: str, *, check_backbone: bool = True) -> TaskSpec:
    """The validated :class:`TaskSpec` of task ``name`` along the search path (see the module
    docstring); did-you-mean on a typo. ``check_backbone``: see :func:`task_from_dict`."""
    if _key(name) in _REGISTERED:
        return _REGISTERED[_key(name)]
    path = find_task_file(name)
    if path is None:
        raise unknown_name_error("task", name, list_tasks())
    return load_task_file(path, check_backbone=check_backbone)


def task_of_card(card: Mapping[str, Any], *, check_backbone: bool = False) -> TaskSpec:
    """The task of a model folder from its card: the spec the card carries (``task_spec``, written
    by training), else the task of the card's name on the search path (``KeyError`` when unknown)."""
    spec = card.get("task_spec")
    if isinstance(spec, Mapping):
        return task_from_dict(dict(spec), where=f"the card's task_spec of {card.get('task')!r}",
                              check_backbone=check_backbone)
    return get_task(str(card.get("task")), check_backbone=check_backbone)


#: what a task name made by a user may be: letters, digits, '-' and '_', starting with a letter or digit
#: (``pellucid train --data DIR --name``, ``pellucid init-task NAME``, ``pellucid fewshot fit --task``)
TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


# ----------------------------------------------------------------------------- TOML out
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key, ensure_ascii=False)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value if v is not None) + "]"
    if isinstance(value, Mapping):
        inner = ", ".join(f"{_toml_key(str(k))} = {_toml_value(v)}" for k, v in value.items() if v is not None)
        return "{ " + inner + " }" if inner else "{}"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} to TOML")


def _toml_table(header: str, table: Mapping[str, Any]) -> list[str]:
    """``[header]`` with its scalar keys, then one ``[[header.key]]`` per entry of a list of tables."""
    lines, arrays = [f"[{header}]"], []
    for k, v in table.items():
        if isinstance(v, list) and v and all(isinstance(x, Mapping) for x in v):
            for entry in v:
                arrays += ["", f"[[{header}.{_toml_key(k)}]]"]
                arrays += [f"{_toml_key(str(a))} = {_toml_value(b)}" for a, b in entry.items() if b is not None]
        elif v is not None:
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
    return lines + arrays


def task_toml(spec: TaskSpec, header: str = "") -> str:
    """``spec`` as the text of an editable ``task.toml`` (``header``: comment lines put on top)."""
    data = spec.to_toml_dict()
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    tables = {k: data.pop(k) for k in ("threshold", "recipe", "explainer_options", "aliases")}
    lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in data.items()]
    for key in ("threshold", "recipe"):
        lines += ["", *_toml_table(key, tables[key])]
    for method, options in tables["explainer_options"].items():
        lines += ["", *_toml_table(f"explainer_options.{_toml_key(method)}", options)]
    if tables["aliases"]:
        lines += ["", *_toml_table("aliases", tables["aliases"])]
    return "\n".join(lines) + "\n"
