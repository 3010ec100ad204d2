"""Model folders round-trip through safetensors + card, and wrong cards are refused."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from pellucid.core.modelfolder import ModelFolderError, load_model, read_card


def test_round_trip_gives_identical_outputs(tiny_model_dir, tmp_path):
    model, card = load_model(tiny_model_dir)
    assert card["kind"] == "classifier" and card["task"] == "tb"
    assert card["classes"] == ["normal", "tuberculosis"]
    assert card["explainer_options"] == {}  # the tb task sets none (sonar sets Quickshift for LIME)
    for key in ("weights", "preprocessing", "threshold", "calibration", "metrics", "split", "pellucid_version"):
        assert key in card
    assert card["weights"]["source"] == "random"  # asked for in the fixture, and recorded
    x = torch.rand(3, 3, 64, 64)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    model2, _ = load_model(copy)
    with torch.no_grad():
        assert torch.equal(model(x), model2(x))
    assert not model.training


def test_card_disagreeing_with_task_is_refused(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    card = json.loads((bad / "card.json").read_text())
    card["classes"] = ["tuberculosis", "normal"]
    (bad / "card.json").write_text(json.dumps(card))
    with pytest.raises(ModelFolderError, match="disagree with task 'tb'"):
        read_card(bad)


def test_a_card_whose_classes_do_not_fit_its_weights_says_which_tensor_in_one_line(tiny_model_dir, tmp_path):
    """PyTorch's first line of a mismatch is "Error(s) in loading state_dict for Classifier:", and that was all a
    user saw of a card whose classes had been edited apart from its weights."""
    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    card = json.loads((bad / "card.json").read_text())
    card.update(task="mine", classes=["a", "b", "c"])  # a task name of no installed app: its classes go unchecked
    (bad / "card.json").write_text(json.dumps(card))
    with pytest.raises(ModelFolderError) as err:
        load_model(bad)
    message = str(err.value)
    assert "\n" not in message and "with the card's 3 classes (size mismatch for head" in message
    assert "do not belong together" in message


def test_missing_or_broken_folder(tmp_path):
    with pytest.raises(ModelFolderError, match="not found"):
        load_model(tmp_path / "nope")
    (tmp_path / "card.json").write_text("{not json")
    with pytest.raises(ModelFolderError, match="not valid JSON"):
        load_model(tmp_path)


def test_weights_file_is_not_a_pickle(tiny_model_dir):
    head = (tiny_model_dir / "model.safetensors").read_bytes()[:8]
    header_len = int.from_bytes(head, "little")
    assert 0 < header_len < 10_000_000  # safetensors header, not a pickle stream


def test_saved_folder_has_a_human_readable_model_card(tiny_model_dir):
    """save_model writes MODEL_CARD.md beside card.json (through write_card), and it agrees with the card."""
    from pellucid.core.modelcard_md import SECTIONS, render_model_card

    text = (tiny_model_dir / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert text == render_model_card(read_card(tiny_model_dir), tiny_model_dir)
    for section in SECTIONS:
        assert f"\n## {section}\n" in text, section
