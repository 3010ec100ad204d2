"""Tasks made from a user's data folder: classes from the folder, everything else borrowed.

A researcher with a folder of images (one sub-folder per class, or a ``manifest.csv`` of
``path,label[,group]``) trains without writing a ``task.toml``: :func:`data_labels` reads the class
names from the folder (cheaply: folder names or the manifest's label column, no image is opened),
and :func:`new_task` builds a :class:`~pellucid.core.tasks.TaskSpec` with those classes and, from
the task it is *like* (or from :data:`GENERAL_TASK`, a general photo recipe), the modality,
channels, image size, augmentation, recipe, metrics, threshold policy and explainers.
:func:`label_mismatch` says how a folder's labels differ from an existing task's classes.
Nothing here imports torch: the command line calls it before its heavy imports.
"""
from __future__ import annotations

import csv
import os
import re
from pathlib import Path

from pellucid.core.tasks import TASK_NAME, TaskSpec, TaskSpecError, task_from_dict

__all__ = ["GENERAL_TASK", "data_labels", "label_mismatch", "new_task", "sanitise_name"]

#: The spec a new task gets without ``--like``: a general photo classifier (EfficientNet-Lite0, whose
#: ImageNet weights ship offline; linear probe then progressive unfreezing; argmax decisions).
GENERAL_TASK: dict = {
    "modality": "photo",
    "channels": 3,
    "image_size": 224,
    "augment": "natural",
    "metrics": ["accuracy", "balanced_accuracy", "macro_f1", "auroc"],
    "explainers": ["gradcam", "lime"],
    "threshold": {"policy": "argmax"},
    "recipe": {"backbone": "efficientnet_lite0", "pretrained": True, "finetune": "progressive", "epochs": 10,
               "batch_size": 32, "lr": 1e-3, "head_lr": 1e-3, "lr_decay": 0.6, "stages_per_epoch": 2,
               "max_stages": 4, "label_smoothing": 0.1, "patience": 4},
}

_INTENDED_USE = ("Research use only: a model trained by its user on {data} ({classes}); not validated for any "
                 "decision. Not a medical device; not for diagnosis.")


def sanitise_name(text: str) -> str:
    """A task name from free text (e.g. a folder name): lower case, ``[a-z0-9_-]``, at most 40 characters."""
    name = re.sub(r"[^a-z0-9_-]+", "-", str(text).strip().lower()).strip("-_")[:40].strip("-_")
    return name or "my-task"


def data_labels(root: str | Path) -> list[str]:
    """The class labels of a data folder, sorted: the ``label`` column of its ``manifest.csv``, else
    the names of its sub-folders (hidden ones left out). Images are not opened.

    Raises:
        TaskSpecError: the folder is missing, is a file, cannot be read, has neither manifest nor
            sub-folders, or its manifest has no ``label`` column.
    """
    root = Path(root)
    if not root.exists():
        raise TaskSpecError(f"data folder {root} not found: pass --data DIR (a folder with one sub-folder per "
                            "class, or a manifest.csv of path,label)")
    if not root.is_dir():
        raise TaskSpecError(f"--data {root} is a file, not a folder: pass the folder that holds the class folders")
    if not os.access(root, os.R_OK | os.X_OK):
        raise TaskSpecError(f"data folder {root} cannot be read (no read/search permission): fix its permissions "
                            "or give another --data")
    manifest = root / "manifest.csv"
    if manifest.is_file():
        try:
            with manifest.open(newline="", encoding="utf-8-sig") as fh:
                reader = csv.DictReader(fh)
                if "label" not in (reader.fieldnames or []):
                    raise TaskSpecError(f"{manifest}: needs columns path,label[,group]; found {reader.fieldnames}")
                labels = {(row.get("label") or "").strip() for row in reader} - {""}
        except (OSError, UnicodeDecodeError, csv.Error) as err:
            raise TaskSpecError(f"{manifest}: cannot be read ({err})") from None
    else:
        try:
            labels = {d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")}
        except OSError as err:
            raise TaskSpecError(f"--data {root}: cannot list the folder ({err.strerror})") from None
    if not labels:
        raise TaskSpecError(f"--data {root}: no class sub-folders and no manifest.csv; lay the data out as "
                            f"{root}/<class>/<image>")
    return sorted(labels)


def label_mismatch(task: TaskSpec, labels: list[str]) -> tuple[list[str], list[str]]:
    """``(missing, unexpected)``: the task's classes absent from ``labels`` and the labels that are
    not classes of the task (after the task's aliases)."""
    found = {task.aliases.get(label, label) for label in labels}
    missing = [c for c in task.classes if c not in found]
    unexpected = sorted(label for label in labels if task.aliases.get(label, label) not in task.classes)
    return missing, unexpected


def new_task(classes: list[str], *, name: str, like: TaskSpec | None = None, positive_class: str | None = None,
             data: str | Path | None = None, check_backbone: bool = False) -> TaskSpec:
    """A task with ``classes`` whose recipe, preprocessing, metrics and explainers come from ``like``
    (default :data:`GENERAL_TASK`).

    The positive class is ``positive_class``, else ``like``'s when it is one of ``classes``; a task
    like one with a threshold policy that needs a positive class (sensitivity, Youden) keeps that
    policy only when it has one, and otherwise decides by argmax. ``default_data`` is ``data``
    (absolute), so ``pellucid train NAME`` finds it again.

    Raises:
        TaskSpecError: fewer than two classes, a positive class that is not one of them, a bad name.
    """
    if not TASK_NAME.fullmatch(name or ""):
        raise TaskSpecError(f"--name {name!r}: a task name is letters, digits, '-' and '_' (e.g. "
                            f"{sanitise_name(name)!r})")
    base = like.to_toml_dict() if like is not None else dict(GENERAL_TASK)
    for key in ("name", "title", "classes", "positive_class", "aliases", "default_data", "intended_use"):
        base.pop(key, None)
    if positive_class is None and like is not None and like.positive_class in classes:
        positive_class = like.positive_class
    if positive_class is not None and positive_class not in classes:
        raise TaskSpecError(f"--positive-class {positive_class!r} is not one of the classes {list(classes)}")
    threshold = dict(base.get("threshold", {}))
    if threshold.get("policy", "argmax") != "argmax" and (positive_class is None or len(classes) != 2):
        threshold["policy"] = "argmax"  # sensitivity / Youden thresholds need one positive class of two
    where = Path(data).resolve() if data is not None else None
    spec = {**base, "name": name, "title": name, "classes": list(classes), "threshold": threshold,
            "intended_use": _INTENDED_USE.format(data=where or "the user's data", classes=", ".join(classes))}
    if positive_class is not None:
        spec["positive_class"] = positive_class
    if where is not None:
        spec["default_data"] = str(where)
    label = f"new task {name!r}" + (f" (like {like.name!r})" if like is not None else "")
    return task_from_dict(spec, where=label, check_backbone=check_backbone)
