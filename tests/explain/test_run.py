"""``explain_paths``: files in, overlays + JSON + score rows out, through a real model folder."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from pellucid.core.modelfolder import save_model
from pellucid.explain import score_table
from pellucid.explain.overlay import LEGEND_MIN_WIDTH
from pellucid.explain.run import explain_paths, heatmap_stats
from tests.explain.conftest import tiny_classifier


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    model = tiny_classifier("test_resnet")
    spec = model.spec
    card = {
        "kind": "classifier", "task": "toy-explain", "classes": ["normal", "lesion"], "positive_class": "lesion",
        "backbone": spec.to_dict(),
        "preprocessing": {"image_size": 64, "channels_in": 3, "resize": "squash", "input_range": [0.0, 1.0],
                          "mean": list(spec.mean), "std": list(spec.std)},
        "threshold": {}, "calibration": {},
    }
    save_model(folder, model, card)
    return folder


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    sizes = {"a.png": (90, 120), "b.png": (64, 64), "sub/a.png": (50, 40)}
    for name, (h, w) in sizes.items():
        path = root / name
        path.parent.mkdir(exist_ok=True)
        PILImage.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(path)
    (root / "notes.txt").write_text("not an image")
    return root, sizes


def test_explain_paths_writes_overlays_json_and_rows(model_folder, image_files, tmp_path):
    root, sizes = image_files
    out = tmp_path / "out"
    rows = explain_paths(model_folder, [root], ["gradcam", "gradcam++"], out_dir=out, score=True,
                         metrics=("ad_ic", "deletion"), batch_size=2)
    assert len(rows) == len(sizes) * 2
    assert {r["method"] for r in rows} == {"gradcam", "gradcam++"}
    for r in rows:
        assert r["target_name"] in ("normal", "lesion")
        assert 0 <= r["deletion_auc"] <= 1 and "ad_100" in r
        with PILImage.open(r["overlay"]) as im:
            h, w = sizes[r["path"]]  # named relative to the folder given
            k = -(-LEGEND_MIN_WIDTH // w)  # small images are enlarged by a whole factor for the legend
            assert im.size[0] == w * k and im.size[1] > h * k  # the colour bar sits under the map
            _assert_colour_bar(np.asarray(im.convert("RGB"))[h * k:])
    # Same stem in two folders: the second gets a suffix instead of overwriting.
    assert sorted(p.name for p in out.glob("*.json")) == ["a.json", "a_1.json", "b.json"]
    record = json.loads((out / "b.json").read_text())
    assert record["original_size"] == [64, 64]
    assert set(record["prediction"]["probabilities"]) == {"normal", "lesion"}
    entry = record["explanations"][0]
    assert entry["method"] == "gradcam" and entry["extras"]["layer"] == "backbone.net.layer4"
    assert set(entry["heatmap"]) == {"mean", "max", "frac_above_0.5", "centroid", "empty"}
    assert "deletion_auc" in entry["scores"]
    reading = entry["reading"]  # the same plain words as the web app and the report
    assert reading["legend"]["high"] == f"more influence on “{entry['target_name']}”"
    assert reading["sentence"].startswith("Grad-CAM shows where") and len(reading["scores_text"]) >= 2
    assert any(s.startswith("Removing the highlighted regions first") for s in reading["scores_text"])
    assert ["method", "gradcam"] in reading["details"]
    assert (out / "b_gradcamplusplus.png").exists()
    assert "| gradcam | 3 |" in score_table(rows)


def _assert_colour_bar(strip: np.ndarray) -> None:
    """Some row of ``strip`` runs through the colour map: dark blue at its left end, dark red at its right."""
    from pellucid.explain.overlay import colorize

    lo, hi = (np.round(colorize(np.array([[v]]))[0, 0] * 255) for v in (0.0, 1.0))
    ok = [row for row in strip if row.shape[0] > 20 and np.abs(row[8].astype(float) - lo).max() < 30
          and np.abs(row[-9].astype(float) - hi).max() < 30]
    assert ok, "no colour bar under the overlay"


def test_explain_paths_bare_overlays_and_progress(model_folder, image_files, tmp_path, capsys):
    """``legend=False`` keeps the bare overlay at the original size; ``progress`` draws one bar per image."""
    root, sizes = image_files
    rows = explain_paths(model_folder, [root / "a.png"], ["gradcam"], out_dir=tmp_path, legend=False,
                         progress=True)
    with PILImage.open(rows[0]["overlay"]) as im:
        assert im.size == (sizes["a.png"][1], sizes["a.png"][0])
    err = capsys.readouterr().err
    assert "explaining" in err and "1/1" in err and "image" in err


def test_explain_paths_fixed_target_and_errors(model_folder, image_files, tmp_path):
    root, _ = image_files
    rows = explain_paths(model_folder, [root / "b.png"], ["eigencam"], target="lesion", out_dir=tmp_path)
    assert [r["target"] for r in rows] == [1] and "deletion_auc" not in rows[0]
    # No methods: the card's default explainers (none in this card, so Grad-CAM).
    assert [r["method"] for r in explain_paths(model_folder, [root / "b.png"], out_dir=tmp_path)] == ["gradcam"]
    with pytest.raises(KeyError, match="Did you mean 'lesion'"):
        explain_paths(model_folder, [root / "b.png"], ["gradcam"], target="lesoin", out_dir=tmp_path)
    with pytest.raises(KeyError, match="Did you mean 'gradcam'"):
        explain_paths(model_folder, [root / "b.png"], ["gradcm"], out_dir=tmp_path)


def test_heatmap_stats():
    h = np.zeros((5, 5), np.float32)
    h[0, 4] = 1.0
    s = heatmap_stats(h)
    assert s["max"] == 1 and s["mean"] == pytest.approx(1 / 25) and s["frac_above_0.5"] == pytest.approx(1 / 25)
    assert s["centroid"] == [1.0, 0.0]
    assert heatmap_stats(np.zeros((3, 3)))["centroid"] is None and heatmap_stats(np.zeros((3, 3)))["empty"]
    assert not s["empty"]


def test_card_explainer_options_apply_and_the_callers_win(image_files, tmp_path):
    """A task's ``[explainer_options.lime]`` (e.g. sonar's Quickshift) reaches LIME through the card."""
    folder = tmp_path / "model"
    model = tiny_classifier("test_resnet")
    spec = model.spec
    card = {
        "kind": "classifier", "task": "toy-explain", "classes": ["normal", "lesion"], "backbone": spec.to_dict(),
        "preprocessing": {"image_size": 64, "channels_in": 3, "resize": "squash", "input_range": [0.0, 1.0],
                          "mean": list(spec.mean), "std": list(spec.std)},
        "threshold": {}, "calibration": {}, "explainers": ["lime"],
        "explainer_options": {"lime": {"segmentation": "quickshift", "num_samples": 24, "kernel_size": 2,
                                       "max_dist": 10}},
    }
    save_model(folder, model, card)
    root, _ = image_files
    explain_paths(folder, [root / "b.png"], out_dir=tmp_path / "card")
    extras = json.loads((tmp_path / "card" / "b.json").read_text())["explanations"][0]["extras"]
    assert extras["segmentation"] == "quickshift" and extras["num_samples"] == 24
    explain_paths(folder, [root / "b.png"], out_dir=tmp_path / "mine", options={"lime": {"segmentation": "slic"}})
    extras = json.loads((tmp_path / "mine" / "b.json").read_text())["explanations"][0]["extras"]
    assert extras["segmentation"] == "slic" and extras["num_samples"] == 24


def test_cli_option_reaches_the_explainer_and_bad_options_get_one_line(model_folder, image_files, tmp_path, capsys):
    from pellucid.cli import main

    root, _ = image_files
    out = tmp_path / "cli"
    assert main(["explain", "--model", str(model_folder), "--method", "lime", "--option", "lime.num_samples=20",
                 "--option", "lime.n_segments=8", "--out", str(out), str(root / "b.png")]) == 0
    extras = json.loads((out / "b.json").read_text())["explanations"][0]["extras"]
    assert extras["num_samples"] == 20 and extras["segmentation"] == "slic"
    for bad, message in ((["--option", "lime.num_sample=20"], "Did you mean 'num_samples'"),
                         (["--option", "lime-num_samples=20"], "write METHOD.NAME=VALUE"),
                         (["--option", "gradcam.layer=x"], "not among the methods")):
        capsys.readouterr()
        assert main(["explain", "--model", str(model_folder), "--method", "lime", *bad, "--out", str(out),
                     str(root / "b.png")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1


def test_a_method_that_fails_says_why_in_its_rows_and_the_summary(model_folder, image_files, tmp_path, capsys):
    """A damaged ``ttame.safetensors`` in the model folder: the run goes on, and the summary line and each row say
    what failed and how to mend it (the summary had read "failed" alone)."""
    import shutil

    from safetensors.torch import save_file

    from pellucid.cli import main

    root, _ = image_files
    folder = tmp_path / "m"
    shutil.copytree(model_folder, folder)
    save_file({"w": torch.zeros(1)}, str(folder / "ttame.safetensors"), metadata={"pellucid_ttame": "{"})
    capsys.readouterr()
    assert main(["explain", "--model", str(folder), "--method", "ttame,gradcam", "--out", str(tmp_path / "e"),
                 str(root / "b.png")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    summary = err[err.index("1 input(s) or method(s) failed:") + 1:]
    assert len(summary) == 1 and "ttame.safetensors is damaged (JSONDecodeError)" in summary[0], err
    assert f"pellucid fit-explainer ttame --model {folder}" in summary[0]
    assert (tmp_path / "e" / "b_gradcam.png").is_file()  # the other method's map is written
    rows = explain_paths(folder, [root / "b.png"], methods=["ttame"], out_dir=tmp_path / "f")
    assert rows[0]["error"].startswith("failed (ExplanationError: ") and "is damaged" in rows[0]["error"]


def test_a_long_file_name_gets_output_files_the_file_system_accepts(model_folder, image_files, tmp_path):
    """A 250-character name is legal; ``<name>_gradcam.png`` is not: the stem is cut, the file is written."""
    root, _ = image_files
    long_name = tmp_path / "in" / ("y" * 250 + ".png")
    long_name.parent.mkdir()
    long_name.write_bytes((root / "a.png").read_bytes())
    rows = explain_paths(model_folder, [long_name], ["gradcam"], out_dir=tmp_path / "out")
    assert rows and rows[0]["overlay"] and (tmp_path / "out").is_dir()
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written and all(len(n.encode()) <= 255 and n.startswith("y" * 200) for n in written)
