"""Tests for few-shot models that read their images as luminance (``channels = 1``): the channels a fit
takes (``support_channels``: a registered task's own, or the caller's), a fit on colour images that
equals a fit on their gray versions, predictions that ignore colour through the card's
``preprocessing.channels_in``, and the command line's ``--task`` / ``--channels``."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pellucid.core import fewshot as fs
from pellucid.core.fewshot import FewShotError
from tests.core.test_fewshot_resolution import BASE

LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _images(root: Path, gray: bool, per_class: int = 3) -> Path:
    """A support folder of tb's two classes: blurred noise, the tuberculosis images tinted blue (a
    source artefact); with ``gray`` the same images saved as their luminance."""
    rng = np.random.default_rng(0)
    for label in ("normal", "tuberculosis"):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            base = rng.random((40, 40, 1)).astype(np.float32) * 0.6 + (0.3 if label == "normal" else 0.1)
            rgb = np.repeat(base, 3, axis=2)
            if label == "tuberculosis" and i % 2 == 0:
                rgb[..., 2] = np.clip(rgb[..., 2] + 0.3, 0, 1)
            u8 = np.clip(rgb * 255 + 0.5, 0, 255).astype(np.uint8)
            if gray:
                lum = u8.astype(np.float32) / 255 @ LUMA
                Image.fromarray(np.clip(lum * 255 + 0.5, 0, 255).astype(np.uint8), "L").save(root / label / f"{i}.png")
            else:
                Image.fromarray(u8, "RGB").save(root / label / f"{i}.png")
    return root


def test_support_channels_follow_the_task_unless_given():
    assert fs.support_channels("tb") == 1  # the tb app reads X-rays as luminance
    assert fs.support_channels("waste") == 3
    assert fs.support_channels("fewshot") == 3  # no registered task: colour, as before
    assert fs.support_channels("tb", 3) == 3 and fs.support_channels("fewshot", 1) == 1
    for bad in (2, 0, True, "1"):
        with pytest.raises(FewShotError, match="channels must be 1 .luminance. or 3 .colour."):
            fs.support_channels("fewshot", bad)


def test_a_luminance_fit_equals_a_fit_on_the_gray_images_and_ignores_colour_when_predicting(tmp_path):
    from pellucid.core.modelfolder import load_model
    from pellucid.core.predict import Predictor

    colour, gray = _images(tmp_path / "colour", False), _images(tmp_path / "gray", True)
    kw = dict(backbone="test_resnet", pretrained=False, config=BASE, cache_dir=tmp_path / "cache")
    torch.manual_seed(0)
    lum = fs.fit_prototypes(colour, tmp_path / "lum", task="tb", **kw)  # the task's channels: 1
    torch.manual_seed(0)
    ref = fs.fit_prototypes(gray, tmp_path / "ref", channels=3, **kw)
    torch.manual_seed(0)
    rgb = fs.fit_prototypes(colour, tmp_path / "rgb", channels=3, **kw)
    card = json.loads((lum / "card.json").read_text())
    assert card["preprocessing"]["channels_in"] == 1 and card["task"] == "tb"
    assert json.loads((rgb / "card.json").read_text())["preprocessing"]["channels_in"] == 3
    m_lum, m_ref, m_rgb = (load_model(f)[0] for f in (lum, ref, rgb))
    assert torch.allclose(m_lum.prototypes, m_ref.prototypes, atol=1e-5)
    assert not torch.allclose(m_rgb.prototypes, m_ref.prototypes, atol=1e-3)  # colour reached the colour model
    # a tinted image and its gray version: one answer from the luminance model, two from the colour one
    tinted, its_gray = colour / "tuberculosis" / "0.png", gray / "tuberculosis" / "0.png"
    p_lum = [r.probs for r in Predictor(lum).predict_paths([tinted, its_gray])]
    p_rgb = [r.probs for r in Predictor(rgb).predict_paths([tinted, its_gray])]
    assert all(p_lum[0][c] == pytest.approx(p_lum[1][c], abs=1e-5) for c in p_lum[0])
    assert any(abs(p_rgb[0][c] - p_rgb[1][c]) > 1e-4 for c in p_rgb[0])


def _cli(tmp_path, *extra):
    from pellucid.cli import build_parser

    args = build_parser().parse_args(["fewshot", *extra, "--backbone", "test_resnet"])
    return argparse.Namespace(**{**vars(args), "pretrained": False})


def test_cli_task_and_channels(tmp_path, monkeypatch, capsys):
    from pellucid.core import fewshot_cli

    monkeypatch.chdir(tmp_path)  # the feature cache goes under runs/ of the working folder
    support = _images(tmp_path / "support", False)
    assert fewshot_cli.run(_cli(tmp_path, "fit", "--support", str(support), "--out", "m", "--task", "tb")) == 0
    assert json.loads(Path("m/card.json").read_text())["preprocessing"]["channels_in"] == 1
    assert "input:        luminance" in capsys.readouterr().out
    assert fewshot_cli.run(_cli(tmp_path, "fit", "--support", str(support), "--out", "m3", "--task", "tb",
                                "--channels", "3")) == 0
    assert json.loads(Path("m3/card.json").read_text())["preprocessing"]["channels_in"] == 3
    assert "luminance" not in capsys.readouterr().out
    with pytest.raises(FewShotError, match="task name 'waste' belongs to the registered task"):
        fewshot_cli.run(_cli(tmp_path, "fit", "--support", str(support), "--out", "m4", "--task", "waste"))
    with pytest.raises(SystemExit):  # argparse refuses other channel counts
        _cli(tmp_path, "fit", "--support", str(support), "--channels", "2")
    # eval reads the data as the fitted model would, and says so
    assert fewshot_cli.run(_cli(tmp_path, "eval", "--data", str(support), "--shots", "1", "--episodes", "2",
                                "--task", "tb", "--out", "ev")) == 0
    assert json.loads(Path("ev/fewshot_eval.json").read_text())["channels"] == 1
    assert "images read as luminance (gray)" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["x" * 65, "a\nb", "../tb", "", " tb", "<b>tb</b>"])
def test_an_unusable_task_name_gets_one_line_before_any_work(tmp_path, name):
    support = _images(tmp_path / "support", False, per_class=2)
    with pytest.raises(FewShotError, match="a task name is 1 to 64 letters, digits, '-' and '_'") as err:
        fs.fit_prototypes(support, tmp_path / "m", backbone="test_resnet", pretrained=False, config=BASE,
                          task=name, cache_dir=tmp_path / "cache")
    assert "\n" not in str(err.value) and len(str(err.value)) < 200
    assert not (tmp_path / "m" / "card.json").exists()


def test_a_colour_fit_of_a_luminance_apps_classes_points_to_its_task(tmp_path, monkeypatch, capsys):
    from pellucid.core import fewshot_cli

    assert fs.luminance_task(["normal", "tuberculosis"]) == "tb"
    assert fs.luminance_task(["cardboard", "glass", "metal", "paper", "plastic", "trash"]) is None  # waste: colour
    assert fs.luminance_task(["cats", "dogs"]) is None
    monkeypatch.chdir(tmp_path)
    support = _images(tmp_path / "support", False, per_class=2)
    assert fewshot_cli.run(_cli(tmp_path, "fit", "--support", str(support), "--out", "m")) == 0
    assert "the tb app has these classes and reads its images as luminance" in capsys.readouterr().out
    for extra in (["--task", "tb"], ["--channels", "3"]):  # asked for: no pointer
        assert fewshot_cli.run(_cli(tmp_path, "fit", "--support", str(support), "--out", "m", "--overwrite",
                                    *extra)) == 0
        assert "the tb app has these classes" not in capsys.readouterr().out
