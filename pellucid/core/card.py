"""The model card (``card.json``) as typed dataclasses, with its one writer and its one reader.

This module owns the shape of ``card.json``: :class:`ModelCard` and its sections
(:class:`Backbone`, :class:`WeightSource`, :class:`Preprocessing`, :class:`Threshold`,
:class:`Calibration`, :class:`SplitSummary`, :class:`TrainingInfo`), :func:`write_card` (the only
code that writes a ``card.json``, and the ``MODEL_CARD.md`` beside it), :func:`read_card` (the only
code that parses one) and the set of card kinds a reader accepts (:func:`card_kinds`, from the kind → loader table :data:`KIND_LOADERS`
that ``pellucid.core.modelfolder.register_kind`` fills and ``load_model`` uses).

Compatibility rules:

* every section keeps the keys it does not model in its ``extra`` dict (kind-specific keys such as
  an ensemble's ``members``, a few-shot folder's ``fewshot``/``support`` or a segmenter's
  ``architecture`` live in :attr:`ModelCard.extra`), so a card written by any pellucid version
  loads, and writes back, with nothing lost;
* optional keys an old card lacks get their defaults (``None``, or an empty list/dict);
* :meth:`ModelCard.to_dict` leaves out optional keys whose value is ``None``.

:class:`ModelCard` also offers a read-only mapping interface (``card["classes"]``,
``card.get("task")``, ``"kind" in card``, ``card.keys()``), backed by :meth:`ModelCard.to_dict`.
It is the compatibility path for library users' code written when cards were plain dicts; code in
this package uses the attributes.

This module imports no other ``pellucid.core`` module at import time (the task check in
:func:`read_card` imports ``pellucid.core.tasks`` and :func:`write_card` imports
``pellucid.core.modelcard_md`` when they run), so every module may use it.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pellucid.registry import Registry, unknown_name_error

__all__ = ["ModelFolderError", "CardError", "ModelCard", "Backbone", "WeightSource", "Preprocessing",
           "Threshold", "Calibration", "SplitSummary", "TrainingInfo", "CARD_FILE", "CARD_KINDS",
           "KIND_LOADERS", "MAX_INPUT_SIDE", "card_kinds", "finite_number", "read_card", "write_card", "as_card"]

#: The card's file name inside a model folder.
CARD_FILE = "card.json"

#: The kinds pellucid itself writes (:func:`card_kinds` adds the registered ones).
CARD_KINDS = ("classifier", "ensemble", "prototypes", "segmentation")

#: Kind → loader of a folder of that kind, or the loader's ``"module:function"`` path (imported on
#: first use by ``pellucid.core.modelfolder``, which fills and calls this table; the strings import
#: nothing here). "classifier" is built into modelfolder and is not in the table.
KIND_LOADERS: Registry[Any] = Registry("model-folder kind")
KIND_LOADERS.register("ensemble", "pellucid.core.ensemble:load_ensemble")
KIND_LOADERS.register("prototypes", "pellucid.core.fewshot:load_prototypes")
KIND_LOADERS.register("segmentation", "pellucid.core.segmentation:load_segmenter")


class ModelFolderError(ValueError):
    """A model folder that is missing, incomplete, or disagrees with its task."""


class CardError(ModelFolderError):
    """A ``card.json`` that is missing, not JSON, or lacks what every card has (one-line message)."""


def card_kinds() -> tuple[str, ...]:
    """Every kind :func:`read_card` accepts: ``classifier`` and those with a loader in :data:`KIND_LOADERS`."""
    return ("classifier", *KIND_LOADERS.names())


# --------------------------------------------------------------------------- sections
S = TypeVar("S", bound="_Section")


@dataclass
class _Section:
    """A card section: named fields plus ``extra`` for every other key, round-tripped as written."""

    #: fields written even when ``None``
    _ALWAYS: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_dict(cls: type[S], data: Mapping[str, Any] | None) -> S:
        """Build the section from its JSON object (keys it does not name go to ``extra``)."""
        data = dict(data or {})
        names = [f.name for f in fields(cls) if f.name != "extra"]
        kwargs = {n: data.pop(n) for n in names if n in data}
        return cls(**kwargs, extra=data)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: named fields (``None`` left out unless always written), then ``extra``."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if value is not None or f.name in self._ALWAYS:
                out[f.name] = value
        out.update(self.extra)
        return out


@dataclass
class Backbone(_Section):
    """The network the model is built on (``pellucid.core.backbones.BackboneSpec.to_dict`` plus extras)."""

    name: str | None = None
    input_size: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class WeightSource(_Section):
    """Where the starting weights came from (``source``: timm, checkpoint, random, members, ...)."""

    source: str | None = None
    pretrained: bool | None = None
    detail: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Preprocessing(_Section):
    """How an image becomes the model's input: size, channels, resize rule, normalisation and the
    optional lung-mask chain (``preprocess``, ``segmenter``)."""

    image_size: int | None = None
    channels_in: int | None = None
    resize: str | None = None
    input_range: list[float] | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    preprocess: str | None = None
    segmenter: str | None = None
    tta: str | None = None  # test-time views the logits are averaged over (pellucid.core.views); None: one pass
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Threshold(_Section):
    """The decision rule: ``policy`` (youden, sensitivity, argmax, ...) and its ``value`` (None: argmax)."""

    _ALWAYS: ClassVar[tuple[str, ...]] = ("policy", "value")
    policy: str | None = None
    value: float | None = None
    positive_class: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Calibration(_Section):
    """Probability calibration: ``method`` and ``temperature`` (None or absent: 1)."""

    method: str | None = None
    temperature: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SplitSummary(_Section):
    """The card's record of the partition: its ``hash``, ``seed``, part sizes and ``file``."""

    hash: str | None = None
    seed: int | None = None
    train: int | None = None
    val: int | None = None
    test: int | None = None
    file: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainingInfo(_Section):
    """How the model was trained: ``seconds``, ``data`` folder, ``device``, plus the run's other facts."""

    seconds: float | None = None
    data: str | None = None
    device: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- the card
# top-level key → section class
_SECTIONS: dict[str, type[_Section]] = {"backbone": Backbone, "preprocessing": Preprocessing, "threshold": Threshold,
                                        "calibration": Calibration, "split": SplitSummary, "training": TrainingInfo}
_REQUIRED = ("task", "classes")


@dataclass(eq=False)
class ModelCard:
    """The ``card.json`` of a model folder, typed.

    ``kind``, ``task`` and ``classes`` are required; everything else is optional. Kind-specific keys
    (ensemble ``members``, few-shot ``fewshot``/``support``, segmentation ``architecture``,
    ``image_size``, ``postprocessing``) and keys of later or earlier versions live in ``extra``.

    The mapping methods (``card["key"]``, :meth:`get`, ``in``, :meth:`keys`) read
    :meth:`to_dict`: they are the compatibility path for library users' code from when cards were
    dicts, and are read-only (set attributes instead).
    """

    task: str
    classes: list[str]
    kind: str = "classifier"
    title: str | None = None
    positive_class: str | None = None
    modality: str | None = None
    intended_use: str | None = None
    explainers: list[str] = field(default_factory=list)
    explainer_options: dict[str, Any] = field(default_factory=dict)
    explainers_fitted: dict[str, Any] | None = None
    backbone: Backbone | None = None
    weights: WeightSource | list[float] | None = None
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    threshold: Threshold | None = None
    calibration: Calibration | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    split: SplitSummary | None = None
    training: TrainingInfo | None = None
    recipe: dict[str, Any] | None = None
    domain_policy: str | None = None
    pellucid_version: str | None = None
    created: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    # fields written even when None (positive_class: None says "no positive class")
    _ALWAYS: ClassVar[tuple[str, ...]] = ("kind", "task", "classes", "positive_class")

    # ----------------------------------------------------------------- conversion
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "card", strict: bool = True) -> ModelCard:
        """Build a card from its JSON object.

        Args:
            data: the parsed ``card.json`` (or a card dict built in memory).
            source: what to name in error messages (the file path).
            strict: require ``task`` and ``classes`` (``False``: partial cards, e.g. in tests or
                UI helpers, get ``""`` and ``[]``).

        Raises:
            CardError: not a JSON object, a required field missing, or a field of the wrong type.
        """
        if isinstance(data, ModelCard):
            return data
        if not isinstance(data, Mapping):
            raise CardError(f"{source}: a card must be a JSON object, got {type(data).__name__}")
        data = dict(data)
        if strict:
            for key in _REQUIRED:
                if key not in data:
                    raise CardError(f"{source}: missing required field {key!r}")
        kwargs: dict[str, Any] = {"task": data.pop("task", ""), "classes": data.pop("classes", [])}
        if kwargs["task"] is None or not isinstance(kwargs["task"], str):
            raise CardError(f"{source}: field 'task' must be a string, got {kwargs['task']!r}")
        classes = kwargs["classes"]
        if not isinstance(classes, (list, tuple)) or not all(isinstance(c, str) for c in classes):
            raise CardError(f"{source}: field 'classes' must be a list of class names, got {classes!r}")
        if len(set(classes)) != len(classes) or any(not c.strip() for c in classes):
            raise CardError(f"{source}: field 'classes' must name each class once, got {list(classes)!r}: the card is "
                            "damaged or hand-edited; use the card training wrote, or retrain")
        kwargs["classes"] = list(classes)
        names = {f.name for f in fields(cls)} - {"extra", "task", "classes"}
        for name in names:
            if name not in data:
                continue
            value = data.pop(name)
            if name in _SECTIONS and value is not None:
                if not isinstance(value, Mapping):
                    raise CardError(f"{source}: field {name!r} must be an object, got {type(value).__name__}")
                value = _SECTIONS[name].from_dict(value)
            elif name == "weights" and isinstance(value, Mapping):
                value = WeightSource.from_dict(value)
            elif name in ("explainers",) and value is None:
                value = []
            elif name in ("explainer_options", "metrics") and value is None:
                value = {}
            elif name == "kind" and value is None:
                value = "classifier"
            if name == "preprocessing" and value is None:
                value = Preprocessing()
            kwargs[name] = value
        if not isinstance(kwargs.get("kind", "classifier"), str):
            raise CardError(f"{source}: field 'kind' must be a string, got {kwargs['kind']!r}")
        card = cls(**kwargs, extra=data)
        _check_numbers(card, source)
        return card

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of ``card.json`` (optional fields that are ``None`` left out; ``extra`` last)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if value is None and f.name not in self._ALWAYS:
                continue
            if isinstance(value, _Section):
                value = value.to_dict()
            elif isinstance(value, (list, dict)):
                value = _plain(value)
            out[f.name] = value
        out.update(_plain(self.extra))
        return out

    # ----------------------------------------------------------------- derived facts
    @property
    def image_size(self) -> int | None:
        """The input side in pixels (``preprocessing.image_size``; a segmenter's top-level ``image_size``)."""
        size = self.preprocessing.image_size or self.extra.get("image_size")
        return int(size) if size else None

    @property
    def temperature(self) -> float:
        """The calibration temperature (1 when the card has none)."""
        t = self.calibration.temperature if self.calibration is not None else None
        return float(t or 1.0)

    @property
    def segmenter(self) -> str | None:
        """The lung segmenter the card names (``preprocessing.segmenter``, else ``recipe.segmenter``)."""
        return self.preprocessing.segmenter or (self.recipe or {}).get("segmenter") or None

    @property
    def backbone_name(self) -> str | None:
        """The backbone's registered name, or None."""
        return self.backbone.name if self.backbone is not None else None

    @property
    def weight_source(self) -> str | None:
        """Where the weights came from (``weights.source``), or None."""
        return self.weights.source if isinstance(self.weights, WeightSource) else None

    # ----------------------------------------------------------------- read-only mapping (compatibility)
    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def get(self, key: str, default: Any = None) -> Any:
        """``to_dict().get(key, default)`` (compatibility path; use the attributes)."""
        return self.to_dict().get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self.to_dict()

    def keys(self):
        """The keys of :meth:`to_dict` (compatibility path; use the attributes)."""
        return self.to_dict().keys()

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ModelCard):
            return self.to_dict() == other.to_dict()
        if isinstance(other, Mapping):
            return self.to_dict() == _plain(dict(other))
        return NotImplemented

    __hash__ = None  # mutable


def _plain(obj: Any) -> Any:
    """``obj`` with tuples as lists and sections as dicts, as it reads back from JSON."""
    if isinstance(obj, _Section):
        return _plain(obj.to_dict())
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (_Section, ModelCard)):
        return obj.to_dict()
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def as_card(card: ModelCard | Mapping[str, Any]) -> ModelCard:
    """``card`` as a :class:`ModelCard` (a dict is converted leniently: missing task/classes allowed)."""
    if isinstance(card, ModelCard):
        return card
    return ModelCard.from_dict(card, strict=False)


# --------------------------------------------------------------------------- one writer, one reader
def write_card(folder: str | Path, card: ModelCard | Mapping[str, Any]) -> Path:
    """Write ``folder/card.json`` (replaced atomically) from a :class:`ModelCard` or a card dict, and
    the human-readable ``folder/MODEL_CARD.md`` beside it
    (:func:`pellucid.core.modelcard_md.render_model_card`), so the two always agree.

    A dict goes through :meth:`ModelCard.from_dict` first, so what is written always reads back.

    Returns:
        The card file.

    Raises:
        CardError: a card dict without ``task`` or ``classes``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CARD_FILE
    card = ModelCard.from_dict(card, source=str(path))
    tmp = folder / (CARD_FILE + ".tmp")
    tmp.write_text(json.dumps(card.to_dict(), indent=1, default=_json_default))
    os.replace(tmp, path)
    from pellucid.core.modelcard_md import write_model_card_md

    write_model_card_md(folder, card)
    return path


def read_card(folder: str | Path) -> ModelCard:
    """The :class:`ModelCard` of a model folder (a folder, or its ``card.json``).

    Checks what every card needs: valid JSON, ``task`` and ``classes``, a known ``kind`` and, for a
    task installed here, the task's classes in the same order.

    Raises:
        ModelFolderError: no such folder. CardError (a ModelFolderError): no ``card.json``, invalid
        JSON, a missing or mistyped required field, an unknown kind, or classes that disagree with
        the task. Every message is one line naming the file.
    """
    folder = Path(folder)
    if folder.name == CARD_FILE and folder.is_file():
        folder = folder.parent
    if not folder.is_dir():
        raise ModelFolderError(f"model folder {folder} not found: give the folder written by `pellucid train`")
    path = folder / CARD_FILE
    if not path.is_file():
        raise CardError(f"{folder} has no card.json: it is not a pellucid model folder")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CardError(f"{path} is not valid JSON ({err.msg} at line {err.lineno})") from err
    except RecursionError:  # brackets nested deeper than Python's JSON parser goes: no card is written so
        raise CardError(f"{path} is not a card: its JSON is nested too deeply to read") from None
    except (OSError, UnicodeDecodeError) as err:
        raise CardError(f"{path} cannot be read ({type(err).__name__}: {err})") from err
    card = ModelCard.from_dict(data, source=str(path))
    kinds = card_kinds()
    if card.kind not in kinds:
        raise CardError(f"{path}: {unknown_name_error('kind', card.kind, kinds).args[0]}")
    _check_task(card, path)
    return card


#: The largest input side a card may ask for: an image is resized to it before the network sees it, so a
#: damaged or hand-made card must not ask for a 60000-px square (11 GB before anything failed).
MAX_INPUT_SIDE = 4096


def finite_number(value: Any) -> bool:
    """Whether ``value`` is a finite int or float (a bool is not a number here); for checks of settings
    read from JSON and TOML."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_numbers(card: ModelCard, source: str) -> None:
    """Refuse, in one line, a card whose numbers no model folder writes: an input size outside
    8-:data:`MAX_INPUT_SIDE` px, a channel count other than 1 or 3, a normalisation that is not 1 or 3
    finite numbers (standard deviations above 0), a temperature that is not finite and above 0, a
    threshold outside [0, 1]."""
    def bad(field_name: str, value: Any, want: str) -> CardError:
        return CardError(f"{source}: {field_name} {value!r} is not {want}: the card is damaged or hand-edited; "
                         "use the card training wrote, or retrain")

    pre = card.preprocessing if isinstance(card.preprocessing, Preprocessing) else Preprocessing()
    for name, size in (("preprocessing.image_size", pre.image_size), ("image_size", card.extra.get("image_size"))):
        if size is not None and not (isinstance(size, int) and not isinstance(size, bool)
                                     and 8 <= size <= MAX_INPUT_SIDE):
            raise bad(name, size, f"a whole number of pixels from 8 to {MAX_INPUT_SIDE}")
    if pre.channels_in is not None and (isinstance(pre.channels_in, bool) or pre.channels_in not in (1, 3)):
        raise bad("preprocessing.channels_in", pre.channels_in, "1 or 3")
    for name, values in (("preprocessing.mean", pre.mean), ("preprocessing.std", pre.std)):
        if values is None:
            continue
        if not (isinstance(values, list) and len(values) in (1, 3) and all(finite_number(v) for v in values)
                and (name.endswith("mean") or all(v > 0 for v in values))):
            raise bad(name, values, "1 or 3 finite numbers" + ("" if name.endswith("mean") else " above 0"))
    temperature = card.calibration.temperature if isinstance(card.calibration, Calibration) else None
    if temperature is not None and not (finite_number(temperature) and temperature > 0):
        raise bad("calibration.temperature", temperature, "a finite number above 0")
    value = card.threshold.value if isinstance(card.threshold, Threshold) else None
    if value is not None and not (finite_number(value) and 0.0 <= value <= 1.0):
        raise bad("threshold.value", value, "a probability from 0 to 1")


def _check_task(card: ModelCard, path: Path) -> None:
    """Refuse a card whose classes disagree with the installed task of the same name."""
    from pellucid.core.tasks import get_task, list_tasks

    if card.task not in list_tasks():
        return  # a user task without an app folder (few-shot, custom)
    expected = list(get_task(card.task).classes)
    if expected != card.classes:
        raise CardError(f"{path}: classes {card.classes} disagree with task {card.task!r} {expected}; "
                        "retrain the model for this task or fix the card's task name")
