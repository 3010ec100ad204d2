"""MODEL_CARD.md: written beside every card.json, with the Hugging Face sections, the metric text of the
one formatter, and no patient data or paths beyond the data folder's name."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pellucid.core.card import as_card, read_card, write_card
from pellucid.core.metric_text import interval_text, value_text
from pellucid.core.modelcard_md import (MODEL_CARD_FILE, SECTIONS, redact_paths, render_model_card,
                                        strip_front_matter)

TOO_FEW = "too few labelled inputs (n=6; need ≥ 10)"
CARD = {
    "kind": "classifier", "task": "toy", "title": "Toy task", "classes": ["clear_road", "snowy_road"],
    "positive_class": "snowy_road", "modality": "photo", "intended_use": "Research use on road photos.",
    "backbone": {"name": "test_resnet", "arch": "resnet"},
    "weights": {"source": "checkpoint", "pretrained": True, "detail": "/home/alice/models/road_v2.pth"},
    "preprocessing": {"image_size": 64, "channels_in": 3, "resize": "squash"},
    "threshold": {"policy": "youden", "value": 0.42, "positive_class": "snowy_road"},
    "calibration": {"method": "temperature", "temperature": 1.3, "ece_before": 0.12, "ece_after": 0.05},
    "metrics": {"n": 6, "ci": 0.95, "n_boot": 1000, "min_counts": {"overall": 10, "per_class": 5},
                "metrics": {"accuracy": {"value": 1.0, "low": None, "high": None, "interval": None, "note": TOO_FEW},
                            "auroc": {"value": None, "low": None, "high": None, "interval": None,
                                      "note": "undefined: only one class present in y_true (6 cases)"}},
                "confusion_matrix": [[3, 0], [0, 3]]},
    "split": {"hash": "abcd", "seed": 0, "train": 20, "val": 4, "test": 6, "file": "split.json"},
    "training": {"seconds": 12.5, "data": "/home/alice/hospital/patient_exports/roads", "device": "cpu",
                 "finetune": "progressive", "epochs": 3, "epochs_run": 2, "stopped_early": True},
    "recipe": {"finetune": "progressive", "epochs": 3, "split": "grouped", "split_file": "/home/alice/s.json"},
}


def _sections(text: str) -> list[str]:
    return re.findall(r"^## (.+)$", text, flags=re.MULTILINE)


def test_sections_in_order_with_the_metric_text_of_the_one_formatter():
    text = render_model_card(as_card(CARD))
    assert text.startswith("---\nlibrary_name: pellucid\npipeline_tag: image-classification\n")
    assert _sections(text) == list(SECTIONS)
    assert "### Out-of-scope use" in text
    assert f"| accuracy | 1.000 | {TOO_FEW} |" in text  # the note replaces the interval
    assert "| auroc | n/a | undefined: only one class present in y_true (6 cases) |" in text
    assert "[1.000, 1.000]" not in text
    assert "temperature 1.300" in text and "0.120 before, 0.050 after" in text
    assert "snowy_road when P(snowy_road) ≥ 0.420" in text
    assert "- Epochs: 3 (2 run, stopped early)" in text and "12.5 s on cpu" in text
    assert "Tested on only 6 labelled inputs" in text
    assert "pellucid predict --model MODEL_DIR" in text


def test_no_paths_beyond_the_data_folder_name():
    text = render_model_card(as_card(CARD))
    assert "Data folder: `roads`" in text
    assert "/home" not in text and "alice" not in text and "patient_exports" not in text
    assert "road_v2.pth" in text  # the checkpoint's file name says which weights, its folder is not shown


def test_names_from_the_data_are_shown_as_text_not_read_as_markdown():
    """Class folders and titles are the user's (or a received model folder's): ``![x](http://host/p.png)`` was
    written as Markdown for an image from that host, read where the card is rendered (the web app's Model page),
    ``**b**`` as bold text and ``<img …>`` as HTML. Each is escaped; ``no_snow`` stays as it is."""
    hostile = ["![x](http://host/p.png)", "**b** <img src=x onerror=alert(1)>", "no_snow"]
    card = {**CARD, "title": "[t](http://host)", "classes": hostile, "positive_class": hostile[1],
            "threshold": {"policy": "youden", "value": 0.42, "positive_class": hostile[1]},
            "metrics": {**CARD["metrics"], "confusion_matrix": [[3, 0, 0], [0, 3, 0], [0, 0, 3]]}}
    text = render_model_card(as_card(card))
    for raw in ("![x](", "**b**", "[t](http"):
        assert raw not in text
    assert not re.search(r"(?<!\\)<img", text)  # HTML only as escaped text
    assert "!\\[x\\](http://host/p.png)" in text and "\\*\\*b\\*\\*" in text and "\\<img" in text
    assert "no_snow" in text and "no\\_snow" not in text


@pytest.mark.parametrize("given, expected", [
    ("checkpoint /home/a/b/w.pth", "checkpoint w.pth"),
    ("images (/data/site1/Patient-0042.png, ...) cannot be read", "images (<image>, ...) cannot be read"),
    ("C:\\scans\\ward3\\x.txt notes", "x.txt notes"),
    ("https://huggingface.co/timm/resnet50.a1_in1k", "https://huggingface.co/timm/resnet50.a1_in1k"),
    ("no paths here", "no paths here"),
])
def test_redact_paths(given, expected):
    assert redact_paths(given) == expected


def test_unscored_and_segmentation_cards_render():
    unscored = {**CARD, "kind": "ensemble", "metrics": {"note": "not scored: images (/d/P-1.png, ...) unreadable"},
                "calibration": {"method": "none", "temperature": 1.0, "note": "members do not share a split"}}
    text = render_model_card(as_card(unscored))
    assert "Not evaluated: not scored: images (<image>, ...) unreadable." in text and "P-1" not in text
    seg = {"kind": "segmentation", "task": "toy-seg", "classes": ["background", "lung"],
           "metrics": {"dice": {"value": 0.91, "low": 0.88, "high": 0.93, "n": 12}}}
    text = render_model_card(as_card(seg))
    assert _sections(text) == list(SECTIONS) and "pipeline_tag: image-segmentation" in text
    assert "| dice | 0.910 | [0.880, 0.930] |" in text and "12 labelled inputs" in text


def test_minimal_card_renders_every_section():
    text = render_model_card(as_card({"task": "t", "classes": ["a", "b"]}))
    assert _sections(text) == list(SECTIONS)
    assert "Not evaluated: no test metrics are recorded in this card." in text


def test_write_card_writes_the_markdown_beside_it(tmp_path):
    write_card(tmp_path, CARD)
    md = (tmp_path / MODEL_CARD_FILE).read_text(encoding="utf-8")
    assert md == render_model_card(read_card(tmp_path), tmp_path)
    assert not list(tmp_path.glob("*.tmp"))


def _assert_card_matches_folder(folder: Path) -> str:
    card = read_card(folder)
    text = (folder / MODEL_CARD_FILE).read_text(encoding="utf-8")
    assert _sections(text) == list(SECTIONS)
    for name, entry in card.metrics["metrics"].items():
        assert f"| {name} | {value_text(entry)} | {interval_text(entry) or 'not computed'} |" in text, name
    split = json.loads((folder / "split.json").read_text())
    for part in ("train", "val", "test"):
        for row in split[part]:  # no image path or file name from the split leaks
            assert Path(row["path"]).name not in text and row["path"] not in text
    data = Path(card.training.data)
    assert f"Data folder: `{data.name}`" in text
    assert str(data.parent) not in text and str(folder) not in text
    return text


def test_tiny_model_folder_has_a_model_card(tiny_model_dir):
    text = _assert_card_matches_folder(tiny_model_dir)
    card = read_card(tiny_model_dir)
    assert card.metrics["n"] < 10 and TOO_FEW.replace("6", str(card.metrics["n"])) in text
    assert "| normal |" in text and "| tuberculosis |" in text  # inputs per class and part
    assert "Split policy: grouped" in text
    assert f"Tested on only {card.metrics['n']} labelled inputs: too few for confidence intervals" in text


def test_ensemble_folder_and_its_members_have_model_cards(tiny_model_dir, tmp_path):
    from pellucid.core.ensemble import build_ensemble

    out = build_ensemble([tiny_model_dir, tiny_model_dir], tmp_path / "ens", n_boot=20)
    text = (out / MODEL_CARD_FILE).read_text(encoding="utf-8")
    assert _sections(text) == list(SECTIONS) and "ensemble of 2" in text
    assert "members/<name>/MODEL_CARD.md" in text
    for member in read_card(out).extra["members"]:
        assert (out / member["path"] / MODEL_CARD_FILE).is_file()
    assert str(tiny_model_dir) not in text


def test_strip_front_matter_for_a_web_page():
    text = render_model_card(as_card(CARD))
    body = strip_front_matter(text)
    assert body.startswith("# Toy task — pellucid classifier model") and "library_name" not in body
    assert strip_front_matter(body) == body  # nothing to strip: unchanged
