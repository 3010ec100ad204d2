"""The human-readable model card: ``MODEL_CARD.md`` beside ``card.json`` in every model folder.

:func:`render_model_card` turns a typed :class:`~pellucid.core.card.ModelCard` into Markdown with the
sections of a Hugging Face model card (Mitchell et al., "Model Cards for Model Reporting", FAT* 2019;
https://huggingface.co/docs/hub/model-cards): model details, intended and out-of-scope use,
training data, training procedure, evaluation (metrics with their intervals, or the "too few
labelled inputs" note), calibration, limitations and how to use it. :func:`write_model_card_md`
writes it; :func:`pellucid.core.card.write_card` calls it, so every folder that gets a ``card.json``
(single models, ensembles, few-shot and segmentation folders) gets the Markdown too, and the two
never disagree.

Privacy: the card names the training data by its folder name only; paths in free text are cut to
their last part, and image file names are replaced by ``<image>``. Nothing from ``split.json`` but
per-class counts and the number of groups appears.

This module imports :mod:`pellucid.core.card` only for type checking (``card`` imports this one).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pellucid.core.metric_text import INTERVAL_KINDS, interval_text, value_text
from pellucid.core.tasks import TTA_TEXT

if TYPE_CHECKING:
    from pellucid.core.card import ModelCard

__all__ = ["MODEL_CARD_FILE", "SECTIONS", "render_model_card", "write_model_card_md", "redact_paths",
           "strip_front_matter"]

#: The Markdown card's file name inside a model folder.
MODEL_CARD_FILE = "MODEL_CARD.md"
#: The second-level headings, in order.
SECTIONS = ("Model details", "Intended use", "Training data", "Training procedure", "Evaluation", "Calibration",
            "Limitations", "How to use")

_DEFAULT_USE = "Research use only. Not a diagnostic device; every result needs review by a qualified person."
_IMAGE_SUFFIX = r"\.(?:png|jpe?g|bmp|tiff?|dcm|dicom|nii(?:\.gz)?|gif|webp)"
_PATH = re.compile(r"(?<![\w:/])(?:~|[A-Za-z]:)?[/\\][^\s,;:()'\"]+")
_IMAGE = re.compile(r"[^\s,;:()'\"/\\]+" + _IMAGE_SUFFIX + r"\b", re.IGNORECASE)


def redact_paths(text: Any) -> str:
    """``text`` with each file-system path cut to its last part and each image file name replaced by
    ``<image>`` (URLs are kept): ``/data/site/Normal-12.png`` → ``<image>``, ``/models/a.pth`` → ``a.pth``."""
    text = _PATH.sub(lambda m: re.split(r"[/\\]", m.group(0).rstrip("/\\"))[-1] or m.group(0), str(text))
    return _IMAGE.sub("<image>", text)


_MD_SPECIAL = re.compile(r"([\\`*\[\]<>$~]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9]))")  # "no_snow" stays as it is


def _md_name(text: Any) -> str:
    """A name from the data (a class, the task's title) as Markdown shows it, not as Markdown it could be
    read as: a class folder named ``![x](http://host/p.png)`` or ``**b**`` was Markdown for an image from
    that host, or bold text, where the card is rendered (the web app's Model page). Each character that
    could start a link, an image, emphasis, code, HTML or a formula gets a backslash; a table's ``|`` is
    escaped by the table."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


def _fmt(x: Any, digits: int = 3) -> str:
    return value_text({"value": x}, digits)


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
    cell = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]]


def _data_name(card: ModelCard) -> str | None:
    data = card.training.data if card.training is not None else None
    return Path(str(data).rstrip("/\\")).name if data else None


# ------------------------------------------------------------------------------------------ sections
def _front_matter(card: ModelCard) -> list[str]:
    tags = ["pellucid", card.task, *([card.modality] if card.modality else []), card.kind]
    return ["---", "library_name: pellucid", "pipeline_tag: image-classification"
            if card.kind != "segmentation" else "pipeline_tag: image-segmentation",
            "tags:", *[f"- {json.dumps(str(t))}" for t in tags], "---", ""]


def _details(card: ModelCard) -> list[str]:
    weights = card.weights if not isinstance(card.weights, list) else None
    source = " — ".join(redact_paths(x) for x in (getattr(weights, "source", None), getattr(weights, "detail", None))
                        if x)
    thr = card.threshold
    if thr is not None and thr.value is not None:
        pos = thr.positive_class or card.positive_class
        decision = (f"{_md_name(pos)} when P({_md_name(pos)}) ≥ {float(thr.value):.3f}, else the other class "
                    f"(policy: {thr.policy})")
    else:
        decision = "the class with the highest probability"
    rows = [("Task", f"{_md_name(card.title or card.task)} (`{card.task}`)"), ("Kind", card.kind),
            ("Classes", ", ".join(map(_md_name, card.classes))),
            ("Positive class", _md_name(card.positive_class) if card.positive_class else "none"),
            ("Modality", card.modality or "not stated"), ("Backbone", _backbone_text(card)),
            ("Input", _input_text(card)), ("Weights", source or "not recorded"), ("Decision", decision),
            ("pellucid version", card.pellucid_version or "not recorded"), ("Created", card.created or "not recorded")]
    return ["## Model details", "", *_table(["field", "value"], [list(r) for r in rows]), ""]


def _backbone_text(card: ModelCard) -> str:
    bb = card.backbone
    if bb is None:
        return "not recorded"
    members = bb.extra.get("members")
    if members:
        return f"ensemble of {len(members)}: " + ", ".join(str(m) for m in members)
    arch = bb.extra.get("arch")
    return f"{bb.name}" + (f" ({arch})" if arch and arch != bb.name else "")


def _input_text(card: ModelCard) -> str:
    pre = card.preprocessing
    parts = [f"{card.image_size} px" if card.image_size else None,
             f"{pre.channels_in} channel(s)" if pre.channels_in else None,
             f"resize: {pre.resize}" if pre.resize else None,
             f"lung mask: {pre.preprocess}" if pre.preprocess and pre.preprocess != "none" else None,
             TTA_TEXT.get(pre.tta or "")]
    return ", ".join(p for p in parts if p) or "not recorded"


def _intended_use(card: ModelCard) -> list[str]:
    modality = card.modality or "the modality it was trained on"
    return ["## Intended use", "", redact_paths(card.intended_use or _DEFAULT_USE), "",
            "### Out-of-scope use", "",
            "- Diagnosis, triage or treatment decisions without review by a qualified person; this is not a "
            "medical device.",
            f"- Images other than {modality}, or of findings other than the classes above "
            f"({', '.join(map(_md_name, card.classes))}): the model always answers with one of its classes.",
            "- Populations, scanners, sites or acquisition settings not represented in the training data, "
            "without first measuring performance there (`pellucid eval`).", ""]


def _split_counts(folder: Path | None, classes: list[str]) -> tuple[list[list[Any]], dict[str, int]] | None:
    """Per-class counts of each part and the number of groups per part, from the folder's ``split.json``
    (labels and groups only; no path leaves this function). None without a readable split file."""
    if folder is None or not (Path(folder) / "split.json").is_file():
        return None
    from pellucid.datasets.samples import DataError
    from pellucid.datasets.splits import SPLIT_PARTS, load_split

    try:
        split = load_split(Path(folder) / "split.json")
    except DataError:
        return None
    parts = [p for p in SPLIT_PARTS if split.part(p)]
    rows = [[_md_name(c), *[sum(r.label == c for r in split.part(p)) for p in parts]] for c in classes]
    rows.append(["**total**", *[len(split.part(p)) for p in parts]])
    groups = {p: len({r.group or r.path for r in split.part(p)}) for p in parts}
    return [["class", *parts], *rows], groups


def _training_data(card: ModelCard, folder: Path | None) -> list[str]:
    lines = ["## Training data", ""]
    name = _data_name(card)
    lines.append(f"- Data folder: `{name}`" if name else "- Data folder: not recorded in the card")
    split, recipe = card.split, card.recipe or {}
    if split is not None and any(isinstance(getattr(split, k), int) for k in ("train", "val", "test")):
        sizes = ", ".join(f"{k} {getattr(split, k)}" for k in ("train", "val", "test")
                          if isinstance(getattr(split, k), int))
        lines.append(f"- Split: {sizes} (seed {split.seed}, hash `{split.hash}`)")
    policy = recipe.get("split")
    counts = _split_counts(folder, card.classes)
    if policy:
        how = {"grouped": "grouped: no patient/group appears in two parts"}.get(str(policy), str(policy))
        lines.append(f"- Split policy: {how}")
    if counts:
        lines.append("- Groups (patients, or images without a group) per part: "
                     + ", ".join(f"{p} {n}" for p, n in counts[1].items()))
    if card.kind == "ensemble":
        lines.append("- Each member's data and split: `members/<name>/MODEL_CARD.md`.")
    if counts:
        lines += ["", "Inputs per class and part:", "", *_table(*_head_rows(counts[0]))]
    return [*lines, ""]


def _head_rows(table: list[list[Any]]) -> tuple[list[str], list[list[Any]]]:
    return [str(h) for h in table[0]], table[1:]


_RECIPE_KEYS = ("finetune", "epochs", "probe_epochs", "batch_size", "lr", "head_lr", "weight_decay", "image_size",
                "balance", "mixing", "label_smoothing", "dropout", "patience", "preprocess", "seed")


def _procedure(card: ModelCard) -> list[str]:
    t = card.training
    extra = t.extra if t is not None else {}
    weights = card.weights if not isinstance(card.weights, list) else None
    lines = ["## Training procedure", "", f"- Backbone: {_backbone_text(card)}",
             f"- Starting weights: {getattr(weights, 'source', None) or 'not recorded'}"
             + (" (random initialisation: no pretrained weights)" if getattr(weights, "pretrained", None) is False
                else "")]
    strategy = extra.get("finetune") or (card.recipe or {}).get("finetune")
    if strategy:
        lines.append(f"- Fine-tune strategy: {strategy}")
    epochs = extra.get("epochs")
    if epochs is not None:
        run = extra.get("epochs_run")
        lines.append(f"- Epochs: {epochs}" + (f" ({run} run" + (", stopped early" if extra.get("stopped_early")
                                                                else "") + ")" if run is not None else ""))
    if t is not None:
        lines.append(f"- Training time: {t.seconds if t.seconds is not None else 'n/a'} s on "
                     f"{t.device or 'an unrecorded device'}")
    if extra.get("kept"):
        lines.append(f"- Weights kept: {extra['kept']}" + (f" ({redact_paths(extra['kept_reason'])})"
                                                           if extra.get("kept_reason") else ""))
    recipe = {k: (card.recipe or {}).get(k) for k in _RECIPE_KEYS if (card.recipe or {}).get(k) is not None}
    if recipe:
        lines += ["", "Recipe:", "", *_table(["setting", "value"], [[k, v] for k, v in recipe.items()])]
    members = card.extra.get("members") or []
    if members:
        lines += ["", "Members:", "", *_table(["member", "backbone", "input px", "weight", "temperature"], [
            [Path(str(m.get("path", "?"))).name, m.get("backbone"), m.get("image_size"), _fmt(m.get("weight")),
             _fmt(m.get("temperature"), 2)] for m in members])]
    return [*lines, ""]


def _metric_entries(metrics: dict) -> dict[str, dict]:
    """``{name: entry}`` of a card's metrics: a classification result's ``metrics``, or the top-level
    entries that carry a ``value`` (segmentation's dice, hd95)."""
    rows = metrics.get("metrics")
    if isinstance(rows, dict):
        return {k: v for k, v in rows.items() if isinstance(v, dict)}
    return {k: v for k, v in metrics.items() if isinstance(v, dict) and "value" in v}


def _evaluation(card: ModelCard) -> list[str]:
    m = card.metrics or {}
    entries = _metric_entries(m)
    lines = ["## Evaluation", ""]
    if not entries:
        why = redact_paths(m["note"]) if m.get("note") else "no test metrics are recorded in this card"
        return [*lines, f"Not evaluated: {why}.", ""]
    n = m.get("n") or next((e.get("n") for e in entries.values() if e.get("n")), None)
    level = m.get("ci", 0.95)
    lines.append(f"On the held-out test part ({n if n is not None else 'an unrecorded number of'} labelled inputs), "
                 f"with the decision rule above. Intervals are {round(float(level) * 100)} % confidence intervals.")
    lines += ["", *_table(["metric", "value", f"{round(float(level) * 100)} % CI or note"],
                          [[name, value_text(e), interval_text(e) or "not computed"] for name, e in entries.items()])]
    kinds = sorted({e.get("interval") for e in entries.values() if e.get("interval") in INTERVAL_KINDS})
    if kinds:
        resamples = f", {m['n_boot']} resamples" if m.get("n_boot") else ""
        lines += ["", "Intervals: " + "; ".join(f"{k} = {INTERVAL_KINDS[k]}" + (resamples if k == "bootstrap" else "")
                                                for k in kinds) + "."]
    if any(e.get("note", "").startswith("too few") for e in entries.values()):
        counts = m.get("min_counts") or {}
        lines += ["", "A metric without an interval had too few labelled inputs for one"
                  + (f" (fewer than {counts['overall']} overall, or fewer than {counts['per_class']} in a class "
                     "it depends on)" if counts else "") + "; its value alone says little."]
    cm = m.get("confusion_matrix")
    if isinstance(cm, list) and len(cm) == len(card.classes):
        lines += ["", "Confusion matrix (rows: true class, columns: predicted):", "",
                  *_table(["", *map(_md_name, card.classes)],
                          [[_md_name(c), *row] for c, row in zip(card.classes, cm)])]
    return [*lines, ""]


def _calibration(card: ModelCard) -> list[str]:
    cal = card.calibration
    lines = ["## Calibration", ""]
    if cal is None or (cal.temperature is None and not cal.method):
        return [*lines, "Not calibrated: probabilities are the network's softmax outputs.", ""]
    if cal.method == "temperature" or cal.temperature is not None:
        lines.append(f"- Method: {cal.method or 'temperature'} scaling, fitted on the validation part; "
                     f"temperature {_fmt(cal.temperature, 3)}")
    else:
        lines.append(f"- Method: {cal.method}")
    before, after = cal.extra.get("ece_before"), cal.extra.get("ece_after")
    if before is not None or after is not None:
        lines.append(f"- Expected calibration error on the test part: {_fmt(before)} before, {_fmt(after)} after")
    if cal.extra.get("note"):
        lines.append(f"- Note: {redact_paths(cal.extra['note'])}")
    return [*lines, ""]


def _shortcut_lines(card: ModelCard) -> list[str]:
    """What the card records of a shortcut check (where the explanations look), else how to run one."""
    check = card.extra.get("shortcut_check") or card.extra.get("lung_shares")
    if isinstance(check, dict):
        check = [{"method": k, **v} if isinstance(v, dict) else {"method": k, "value": v} for k, v in check.items()]
    if isinstance(check, list) and check:
        keys = [k for k in ("lung_share", "lung_fraction", "border_share") if any(k in r for r in check)]
        if keys:
            return ["- Shortcut check (share of each explanation map's mass; a map that favours the lungs has a "
                    "lung share above the lung area):", "",
                    *_table(["method", *[k.replace("_", " ") for k in keys]],
                            [[r.get("method", "?"), *[_fmt(r.get(k)) for k in keys]] for r in check]), ""]
    return ["- No shortcut check is recorded: a model can score well by reading text markers, borders or "
            "devices instead of the anatomy (DeGrave et al., Nature Machine Intelligence 2021). Look at where "
            "its explanations fall (`pellucid explain --score` gives the border share, and the lung share "
            "with `--segmenter` for chest X-rays) before trusting it."]


def _limitations(card: ModelCard) -> list[str]:
    lines = ["## Limitations", ""]
    known = card.extra.get("limitations")
    for item in [known] if isinstance(known, str) else (known or []):
        lines.append(f"- {redact_paths(item)}")
    m = card.metrics or {}
    n = m.get("n")
    too_few = any(str(e.get("note", "")).startswith("too few") for e in _metric_entries(m).values())
    if isinstance(n, int) and too_few:
        lines.append(f"- Tested on only {n} labelled inputs: too few for confidence intervals; the values "
                     "measured are no evidence of how the model performs on new data.")
    elif isinstance(n, int) and n < 100:
        lines.append(f"- Tested on only {n} labelled inputs: the intervals are wide, and performance on new data "
                     "may differ by more than they suggest.")
    weights = card.weights if not isinstance(card.weights, list) else None
    if getattr(weights, "pretrained", None) is False:
        lines.append("- Trained from random initialisation (no pretrained weights).")
    extra = card.training.extra if card.training is not None else {}
    if extra.get("skipped_files"):
        lines.append(f"- {len(extra['skipped_files'])} unreadable training file(s) were skipped.")
    cal = card.calibration
    before, after = (cal.extra.get("ece_before"), cal.extra.get("ece_after")) if cal is not None else (None, None)
    if isinstance(before, (int, float)) and isinstance(after, (int, float)) and after > before:
        lines.append(f"- Temperature scaling did not improve calibration on the test part (ECE {_fmt(before)} → "
                     f"{_fmt(after)}); read the probabilities as rough.")
    policy = (f"policy `{card.domain_policy}`" if card.domain_policy else
              "its label withheld for radiology and pathology models, kept beside the flag otherwise")
    lines.append("- Domain check: each input is checked against the modality (DICOM headers, image statistics) "
                 "and, where the folder holds `ood.safetensors`, against the training images' embeddings; an "
                 f"input that fails is flagged ({policy}). The check catches gross mismatches, not "
                 "subtle shifts between sites or scanners.")
    return [*lines, *_shortcut_lines(card), ""]


def _how_to_use(card: ModelCard) -> list[str]:
    lines = ["## How to use", "", "`MODEL_DIR` is this folder.", "", "```bash",
             "pellucid predict --model MODEL_DIR --out predictions.csv IMAGE_OR_FOLDER ...",
             "pellucid eval --model MODEL_DIR --data LABELLED_FOLDER      # metrics with intervals",
             "pellucid explain --model MODEL_DIR --out explanations IMAGE ...",
             "pellucid report --model MODEL_DIR --out report IMAGE_OR_FOLDER ...",
             "pellucid ui --model MODEL_DIR                               # the web app", "```", "",
             "From Python:", "", "```python", "import pellucid", "",
             'predictions = pellucid.predict_paths("MODEL_DIR", ["image.png"])', "```"]
    if card.kind == "segmentation":
        lines[4:9] = ["pellucid predict --model MODEL_DIR --out masks IMAGE ...    # one mask PNG per input"]
    return [*lines, ""]


def render_model_card(card: ModelCard, folder: str | Path | None = None) -> str:
    """The Markdown model card of ``card``.

    Args:
        card: The folder's :class:`~pellucid.core.card.ModelCard` (a card dict: convert it with
            :func:`pellucid.core.card.as_card` first).
        folder: The model folder, to count the classes of each part from its ``split.json``; without it
            the training-data section gives the part sizes only.

    Returns:
        Markdown: YAML front matter (``library_name``, ``pipeline_tag``, ``tags``), a title, the
        intended-use notice, then the sections of :data:`SECTIONS` in order.
    """
    folder = Path(folder) if folder is not None else None
    title = f"# {_md_name(card.title or card.task)} — pellucid {card.kind} model"
    notice = f"> {redact_paths(card.intended_use or _DEFAULT_USE)}"
    parts = [_front_matter(card), [title, "", notice, ""], _details(card), _intended_use(card),
             _training_data(card, folder), _procedure(card), _evaluation(card), _calibration(card),
             _limitations(card), _how_to_use(card),
             ["---", "", "Generated by pellucid from `card.json` (the machine-readable card) whenever it is written."]]
    return "\n".join(line for part in parts for line in part) + "\n"


def write_model_card_md(folder: str | Path, card: ModelCard) -> Path:
    """Write ``folder/MODEL_CARD.md`` from ``card`` (replaced atomically). Returns the file."""
    folder = Path(folder)
    path = folder / MODEL_CARD_FILE
    tmp = folder / (MODEL_CARD_FILE + ".tmp")
    tmp.write_text(render_model_card(card, folder), encoding="utf-8")
    tmp.replace(path)
    return path


def strip_front_matter(text: str) -> str:
    """The Markdown without its leading YAML front matter (``---`` … ``---``), for showing it on a page."""
    if text.startswith("---\n"):
        end = text.find("\n---\n", 4)
        if end != -1:
            return text[end + 5:].lstrip("\n")
    return text
