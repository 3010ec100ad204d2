"""``pellucid train --final``: the model to ship trains on every image but the validation part, and
every door says it has no test score instead of inventing one."""
from __future__ import annotations

import csv
import json

import pytest

from pellucid.cli import main
from pellucid.datasets.samples import Sample
from pellucid.datasets.splits import grouped_split, temporal_split

from tests.conftest import data_dir


def _samples(n_groups=20, per=3):
    return [Sample(f"/d/{c}/g{g}_{i}.png", c, f"{c}{g}") for c in ("a", "b") for g in range(n_groups) for i in range(per)]


def test_a_zero_test_fraction_keeps_the_validation_part_and_gives_the_rest_to_training():
    samples = _samples()
    plain = grouped_split(samples, val_fraction=0.15, test_fraction=0.2, seed=0)
    final = grouped_split(samples, val_fraction=0.15, test_fraction=0.0, seed=0)
    assert final["test"] == [] and final["val"]
    assert sorted(final["train"] + final["val"]) == list(range(len(samples)))
    assert len(final["train"]) > len(plain["train"])
    groups = lambda part: {samples[i].group for i in final[part]}  # noqa: E731
    assert not groups("train") & groups("val")


def test_a_temporal_split_without_a_test_part_cuts_one_gap_only():
    frames = [Sample(f"/r/rec_{i:03d}.png", "x" if i < 60 else "y", "rec" if i < 60 else "rec2") for i in range(120)]
    out, split = temporal_split(frames, val_fraction=0.15, test_fraction=0.0, seed=0)
    assert split["test"] == []
    info = split["temporal"]["rec"]
    assert info["test"] == 0 and info["train"] + info["val"] + info["left_out"] == 60 and info["left_out"] == 1
    # the validation frames follow the training frames in time, after the gap
    train = [i for i in split["train"] if i < 60]
    val = [i for i in split["val"] if i < 60]
    assert max(train) + 1 < min(val) and max(val) == 59


@pytest.fixture(scope="module")
def final_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("final") / "m"
    assert main(["train", "tb", "--data", str(data_dir("tb_cxr")), "--out", str(out), "--final", "--backbone",
                 "test_resnet", "--pretrained", "random", "--image-size", "32", "--epochs", "0", "--finetune",
                 "linear-probe", "--max-images", "40", "--no-progress"]) == 0
    return out


def test_final_fit_trains_on_all_but_validation_and_records_no_test_score(final_dir, capsys):
    card = json.loads((final_dir / "card.json").read_text())
    assert card["split"]["test"] == 0 and card["split"]["train"] + card["split"]["val"] == 40
    assert "metrics" not in card["metrics"] and card["metrics"]["note"].startswith("no test part: a final fit")
    assert json.loads((final_dir / "metrics.json").read_text()) == card["metrics"]
    # calibrated and thresholded on validation as usual; no calibration error measured on images it was fitted on
    assert card["calibration"]["temperature"] > 0 and "ece_after" not in card["calibration"]
    assert not (final_dir / "plots" / "roc.png").exists()
    text = (final_dir / "MODEL_CARD.md").read_text()
    assert "Not evaluated: no test part: a final fit" in text and "Tested on only" not in text


def test_a_final_model_predicts_like_any_other(final_dir, tmp_path):
    files = sorted((data_dir("tb_cxr") / "normal").iterdir())[:2]
    out = tmp_path / "p.csv"
    assert main(["predict", "--model", str(final_dir), "--out", str(out), *map(str, files)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 2 and all(r["label"] in ("normal", "tuberculosis") and not r["error"] for r in rows)


def test_a_final_ensemble_is_calibrated_on_validation_and_unscored(tmp_path):
    from pellucid.core.ensemble_train import train_ensemble
    from pellucid.core.modelfolder import read_card
    from pellucid.core.tasks import get_task
    from pellucid.core.training import TrainConfig

    cfg = TrainConfig.from_task(get_task("tb"), str(data_dir("tb_cxr")), str(tmp_path / "ens"),
                                backbone="test_resnet", pretrained=False, image_size=32, max_images=40, batch_size=8,
                                progress=False, n_boot=0, finetune="linear-probe", epochs=0, test_fraction=0.0,
                                members=[{"finetune": "linear-probe", "epochs": 0, "image_size": 32},
                                         {"finetune": "linear-probe", "epochs": 0, "image_size": 40}])
    card = read_card(train_ensemble(cfg))
    assert card.metrics["note"].startswith("no test part: a final fit")
    assert card.split is not None and card.split.test == 0 and card.calibration.temperature > 0


@pytest.mark.parametrize("argv, expect", [
    (["train", "tb", "--final", "--folds", "3"], "--final trains the one model to ship"),
    (["train", "tb-lungseg", "--final"], "--final does not apply to the lung segmenter"),
])
def test_final_with_what_it_cannot_join_is_one_line(argv, expect, capsys):
    assert main(argv + ["--data", str(data_dir("tb_cxr"))]) == 2
    err = capsys.readouterr().err.strip()
    assert expect in err and "\n" not in err


def test_impossible_split_fractions_are_refused_before_any_work(tmp_path):
    from pellucid.core.tasks import get_task
    from pellucid.core.training import TrainConfig, TrainingError, train

    for bad in ({"test_fraction": -0.1}, {"val_fraction": 0.0}, {"test_fraction": 0.5, "val_fraction": 0.5},
                {"test_fraction": "0"}):
        cfg = TrainConfig.from_task(get_task("tb"), str(data_dir("tb_cxr")), str(tmp_path / "x"),
                                    backbone="test_resnet", pretrained=False, **bad)
        with pytest.raises(TrainingError, match="test_fraction"):
            train(cfg)


def test_a_final_models_report_says_it_has_no_test_score(final_dir, tmp_path):
    image = sorted((data_dir("tb_cxr") / "normal").iterdir())[0]
    out = tmp_path / "r"
    assert main(["report", "--model", str(final_dir), "--methods", "gradcam", "--out", str(out), str(image)]) == 0
    html = next(out.glob("report-*.html")).read_text()
    assert next(out.glob("report-*.pdf")).stat().st_size > 0
    assert "none: no test part: a final fit" in html and "test split, n" not in html  # said, not invented


def test_the_lung_segmenter_refuses_a_zero_test_fraction_in_one_line(tmp_path, capsys):
    cfg = tmp_path / "seg.toml"
    cfg.write_text("test_fraction = 0\n")
    assert main(["train", "tb-lungseg", "--config", str(cfg), "--out", str(tmp_path / "s"),
                 "--data", str(data_dir("tb_lungs"))]) == 2
    err = capsys.readouterr().err.strip()
    assert "the lung segmenter is scored on its test part" in err and "\n" not in err
