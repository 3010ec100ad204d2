"""The typed model card (one writer, one reader) and the one split.json reader."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pellucid.core.card import (Calibration, CardError, ModelCard, ModelFolderError, Preprocessing, SplitSummary,
                                Threshold, WeightSource, as_card, read_card, write_card)
from pellucid.datasets.samples import DataError, Sample
from pellucid.datasets.splits import Split, load_split, save_split, split_file

CLASSIFIER = {
    "kind": "classifier", "pellucid_version": "0.1", "created": "2024-01-01T00:00:00+00:00", "task": "toy",
    "title": "Toy", "classes": ["a", "b"], "positive_class": "b", "modality": "photo", "intended_use": "tests",
    "explainers": ["gradcam"], "explainer_options": {"lime": {"segmenter": "quickshift"}},
    "backbone": {"name": "test_resnet", "input_size": 64, "arch": "resnet", "mean": [0.5] * 3, "std": [0.2] * 3},
    "weights": {"source": "random", "pretrained": False, "detail": "asked for"},
    "preprocessing": {"image_size": 64, "channels_in": 3, "resize": "squash", "input_range": [0.0, 1.0],
                      "mean": [0.5] * 3, "std": [0.2] * 3},
    "threshold": {"policy": "youden", "value": 0.42, "positive_class": "b"},
    "calibration": {"method": "temperature", "temperature": 1.3, "ece_before": 0.1, "ece_after": 0.05},
    "metrics": {"n": 10, "metrics": {"accuracy": {"value": 0.8, "low": 0.6, "high": 0.9}}},
    "split": {"hash": "abcd", "seed": 0, "train": 6, "val": 2, "test": 2, "file": "split.json"},
    "training": {"seconds": 1.5, "data": "/data/toy", "device": "cpu", "epochs_run": 1},
    "recipe": {"finetune": "progressive"},
}
ENSEMBLE = {**CLASSIFIER, "kind": "ensemble", "backbone": {"name": "ensemble", "members": ["a", "b"]},
            "weights": {"source": "members", "pretrained": True, "detail": "m0: random"},
            "members": [{"path": "members/a", "weight": 0.5}, {"path": "members/b", "weight": 0.5}],
            "preprocessing": {"image_size": 64, "channels_in": 3, "member_sizes": [48, 64], "note": "each"},
            "threshold": {"policy": "argmax", "value": None, "positive_class": "b"}}
PROTOTYPES = {**CLASSIFIER, "kind": "prototypes", "positive_class": None, "threshold": None, "split": {},
              "fewshot": {"distance": "cosine"}, "support": [{"path": "/x/a.png", "label": "a"}]}
SEGMENTATION = {"kind": "segmentation", "task": "toy-seg", "classes": ["background", "lung"], "modality": "CXR",
                "image_size": 32, "architecture": {"channels": [8, 16], "strides": [2], "num_res_units": 1},
                "preprocessing": {"image_size": 32, "channels_in": 1}, "postprocessing": {"threshold": 0.5},
                "metrics": {"dice": {"value": 0.9}}, "split": {"hash": "h", "test": 3},
                "training": {"seconds": 2.0, "best_val_dice": 0.8}}


@pytest.mark.parametrize("data", [CLASSIFIER, ENSEMBLE, PROTOTYPES, SEGMENTATION],
                         ids=["classifier", "ensemble", "prototypes", "segmentation"])
def test_every_kind_round_trips_through_the_writer_and_the_reader(data, tmp_path):
    write_card(tmp_path, data)
    card = read_card(tmp_path)
    assert isinstance(card, ModelCard) and card.kind == data["kind"] and card.classes == data["classes"]
    written = json.loads((tmp_path / "card.json").read_text())
    assert card.to_dict() == written and ModelCard.from_dict(written).to_dict() == written
    for key, value in data.items():  # nothing the card held is lost or changed
        if value is not None:
            assert written[key] == value, key
    write_card(tmp_path, card)  # writing the typed card again gives the same file
    assert json.loads((tmp_path / "card.json").read_text()) == written


def test_typed_fields_and_kind_specific_extras():
    card = ModelCard.from_dict(CLASSIFIER)
    assert card.preprocessing == Preprocessing.from_dict(CLASSIFIER["preprocessing"])
    assert card.image_size == 64 and card.preprocessing.channels_in == 3 and card.temperature == 1.3
    assert isinstance(card.threshold, Threshold) and card.threshold.value == 0.42
    assert isinstance(card.calibration, Calibration) and card.calibration.extra == {"ece_before": 0.1, "ece_after": 0.05}
    assert isinstance(card.weights, WeightSource) and card.weight_source == "random"
    assert isinstance(card.split, SplitSummary) and card.split.train == 6 and card.split.hash == "abcd"
    assert card.backbone_name == "test_resnet" and card.training.seconds == 1.5 and card.training.extra["epochs_run"] == 1
    ens = ModelCard.from_dict(ENSEMBLE)
    assert ens.extra["members"][0]["path"] == "members/a" and ens.preprocessing.extra["member_sizes"] == [48, 64]
    assert ens.threshold.value is None and ens.to_dict()["threshold"]["value"] is None
    seg = ModelCard.from_dict(SEGMENTATION)
    assert seg.image_size == 32 and seg.extra["architecture"]["num_res_units"] == 1 and seg.temperature == 1.0
    protos = ModelCard.from_dict(PROTOTYPES)
    assert protos.threshold is None and protos.extra["fewshot"] == {"distance": "cosine"}


def test_mapping_interface_is_the_read_only_compatibility_path():
    card = ModelCard.from_dict(CLASSIFIER)
    assert card["classes"] == ["a", "b"] and card.get("nope", 3) == 3 and "split" in card
    assert card["preprocessing"]["image_size"] == 64 and set(card.keys()) == set(CLASSIFIER)
    assert card == CLASSIFIER and dict(card) == card.to_dict()
    assert card.segmenter is None
    masked = ModelCard.from_dict({**CLASSIFIER, "recipe": {"segmenter": "runs/seg"}})
    assert masked.segmenter == "runs/seg"


def test_old_card_without_optional_fields_loads_with_defaults(tmp_path):
    old = {"task": "someone-elses", "classes": ["x", "y"], "backbone": {"name": "test_resnet"},
           "preprocessing": {"image_size": 64}, "a_key_from_an_old_version": 1}
    (tmp_path / "card.json").write_text(json.dumps(old))
    card = read_card(tmp_path)
    assert card.kind == "classifier" and card.explainers == [] and card.explainer_options == {}
    assert card.threshold is None and card.calibration is None and card.temperature == 1.0
    assert card.domain_policy is None and card.extra == {"a_key_from_an_old_version": 1}
    write_card(tmp_path, card)
    again = json.loads((tmp_path / "card.json").read_text())
    assert again["a_key_from_an_old_version"] == 1 and again["kind"] == "classifier"
    assert as_card({"modality": "CXR"}).modality == "CXR"  # in-memory partial cards are accepted leniently


@pytest.mark.parametrize("text, message", [
    (None, "has no card.json"),
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),  # had been a RecursionError traceback
    (json.dumps({"classes": ["a"]}), "missing required field 'task'"),
    (json.dumps({"task": "t"}), "missing required field 'classes'"),
    (json.dumps({"task": "t", "classes": "ab"}), "field 'classes' must be a list"),
    (json.dumps({"task": "t", "classes": ["a"], "preprocessing": 3}), "field 'preprocessing' must be an object"),
    (json.dumps({"task": "t", "classes": ["a"], "kind": "ensembel"}), "unknown kind 'ensembel'. Did you mean 'ensemble'"),
    # numbers no training writes: a 60000-px input had taken 11 GB before failing
    (json.dumps({"task": "t", "classes": ["a"], "preprocessing": {"image_size": 60000}}),
     r"preprocessing.image_size 60000 is not a whole number of pixels from 8 to 4096"),
    (json.dumps({"task": "t", "classes": ["a"], "preprocessing": {"image_size": 2.5}}), "image_size 2.5"),
    (json.dumps({"task": "t", "classes": ["a"], "image_size": 0}), "image_size 0"),
    (json.dumps({"task": "t", "classes": ["a"], "preprocessing": {"channels_in": 4}}), "channels_in 4 is not 1 or 3"),
    (json.dumps({"task": "t", "classes": ["a"], "preprocessing": {"std": [0.5, 0, 0.5]}}), "std .* above 0"),
    (json.dumps({"task": "t", "classes": ["a"], "preprocessing": {"mean": [0.5, 0.5]}}), "mean"),
    ('{"task": "t", "classes": ["a"], "calibration": {"temperature": NaN}}', "temperature nan"),
    (json.dumps({"task": "t", "classes": ["a"], "calibration": {"temperature": -1}}), "temperature -1"),
    (json.dumps({"task": "t", "classes": ["a"], "threshold": {"value": 7}}), "threshold.value 7 is not a probability"),
    (json.dumps({"task": "t", "classes": ["a", "a"]}), "must name each class once"),  # two prob_a columns before
    (json.dumps({"task": "t", "classes": ["a", " "]}), "must name each class once"),
])
def test_bad_cards_give_one_line_errors(tmp_path, text, message):
    if text is not None:
        (tmp_path / "card.json").write_text(text)
    with pytest.raises(CardError, match=message) as err:
        read_card(tmp_path)
    assert "\n" not in str(err.value) and isinstance(err.value, ModelFolderError)


def test_missing_folder_and_card_written_without_required_fields(tmp_path):
    with pytest.raises(ModelFolderError, match="not found"):
        read_card(tmp_path / "nope")
    with pytest.raises(CardError, match="missing required field 'classes'"):
        write_card(tmp_path, {"task": "t"})
    assert not (tmp_path / "card.json").exists()


# --------------------------------------------------------------------------- split.json
def _samples(root: Path) -> list[Sample]:
    out = []
    for i in range(6):
        f = root / "data" / ("a" if i % 2 else "b") / f"{i}.png"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"x")
        out.append(Sample(str(f), "a" if i % 2 else "b", f"g{i}"))
    return out


def test_split_round_trip_and_the_path_rule(tmp_path, monkeypatch):
    samples = _samples(tmp_path)
    split = {"train": [0, 1, 2, 3], "val": [4], "test": [5], "seed": 7, "hash": "h1", "fold": 2}
    model = tmp_path / "model"
    model.mkdir()
    save_split(model / "split.json", samples, split)
    s = load_split(model)  # a folder or the file itself
    assert s.file == split_file(model) == model / "split.json" and load_split(s.file).to_dict() == s.to_dict()
    assert s.hash == "h1" and s.seed == 7 and s.extra == {"fold": 2}
    assert [r.label for r in s.train] == ["b", "a", "b", "a"] and all(r.found for r in s.train + s.val + s.test)
    assert json.loads((model / "split.json").read_text())["test"] == [{"path": samples[5].path, "label": "a",
                                                                        "group": "g5"}]
    # (1) as written, relative to the current directory ...
    monkeypatch.chdir(tmp_path)
    rel = {"train": [{"path": "data/a/1.png", "label": "a"}], "val": ["data/b/0.png"], "test": []}
    (model / "split.json").write_text(json.dumps(rel))
    s = load_split(model)
    assert s.train[0].found and Path(s.train[0].path) == Path("data/a/1.png") and s.val[0].label is None
    # (2) ... else relative to the folder holding split.json ...
    local = model / "imgs" / "c.png"
    local.parent.mkdir()
    local.write_bytes(b"x")
    (model / "split.json").write_text(json.dumps({"train": [{"path": "imgs/c.png", "label": "a"}]}))
    assert load_split(model).train[0].path == str(model / "imgs" / "c.png")
    # (3)/(4) ... else re-rooted under the training data folder; nothing found keeps the path as written
    (model / "split.json").write_text(json.dumps({"train": [{"path": "/gone/old/data/a/3.png", "label": "a"},
                                                            {"path": "/gone/x.png", "label": "a"}]}))
    rows = load_split(model, data_root=tmp_path / "data").train
    assert rows[0].found and rows[0].path == str(tmp_path / "data" / "a" / "3.png")
    assert not rows[1].found and rows[1].path == rows[1].written == "/gone/x.png"
    assert not load_split(model).train[0].found


def test_bad_split_files_give_data_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_split(tmp_path)
    (tmp_path / "split.json").write_text("{bad")
    with pytest.raises(DataError, match="not valid JSON"):
        load_split(tmp_path)
    for text in ("[" * 100_000 + "]" * 100_000, "\udcff"):  # nested too deeply, not UTF-8: had been tracebacks
        (tmp_path / "split.json").write_bytes(text.encode("utf-8", "surrogateescape"))
        with pytest.raises(DataError, match="is not a split"):
            load_split(tmp_path)
    (tmp_path / "split.json").write_text(json.dumps({"train": [{"label": "a"}]}))
    with pytest.raises(DataError, match="has no 'path'"):
        load_split(tmp_path)
    with pytest.raises(KeyError, match="unknown split part 'trian'"):
        Split().part("trian")
