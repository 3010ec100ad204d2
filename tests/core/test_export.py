"""ONNX export: fp32 reproduces the model folder, INT8 agrees with fp32 on top-1, the sidecar says how to
feed the graph, and bad requests get one clear line."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="export tests need onnx + onnxruntime (pip install 'pellucid[export]')")

from pellucid.cli import main  # noqa: E402
from pellucid.core.export import export_onnx, onnx_session  # noqa: E402
from pellucid.core.predict import Predictor  # noqa: E402
from pellucid.datasets.readers import read_image  # noqa: E402

from tests.conftest import data_dir  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A small nuclei classifier (the in-house shallow CNN, 32 px) trained briefly on 300 real patches.

    Briefly trained rather than random: an untrained network's logits are near-ties, where any
    rounding flips the top-1 class, so agreement would measure the ties, not the quantization.
    """
    from pellucid.core.tasks import get_task
    from pellucid.core.training import TrainConfig, train

    out = tmp_path_factory.mktemp("nuclei_tiny")
    cfg = TrainConfig.from_task(get_task("nuclei"), str(data_dir("nuclei")), str(out), backbone="shallow_cnn",
                                pretrained=False, finetune="full", image_size=32, epochs=2, max_images=300,
                                batch_size=32, lr=3e-3, head_lr=3e-3, balance="weights", progress=False, n_boot=0)
    return train(cfg)


@pytest.fixture(scope="module")
def exported(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "nuclei.onnx"
    return export_onnx(model_dir, out, int8=True, calib_images=24)


def _batch(pred: Predictor, n: int = 60) -> np.ndarray:
    """``n`` sample patches, ``n // 4`` of each class, prepared as the model folder does."""
    src = data_dir("nuclei")
    files = [f for c in pred.classes for f in sorted((src / c).iterdir())[-(n // 4):]]
    return np.stack([pred.preprocess(read_image(f)).numpy() for f in files])


def test_fp32_reproduces_the_model_folder(exported, model_dir):
    pred = Predictor(model_dir)
    x = _batch(pred, 12)
    logits = onnx_session(exported["fp32"]).run(None, {"image": x})[0]
    side = json.loads(open(exported["sidecar"]).read())
    z = logits / side["temperature"]
    probs = np.exp(z - z.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    import torch

    np.testing.assert_allclose(probs, pred.probabilities(torch.from_numpy(x)), atol=1e-4)
    assert exported["max_abs_diff"] < 1e-3


def test_int8_agrees_with_fp32_on_top1(exported, model_dir):
    x = _batch(Predictor(model_dir), 80)
    fp32 = onnx_session(exported["fp32"]).run(None, {"image": x})[0]
    int8 = onnx_session(exported["int8"]).run(None, {"image": x})[0]
    agree = float((fp32.argmax(1) == int8.argmax(1)).mean())
    assert agree >= 0.95, agree
    assert exported["int8_method"] == "static"
    assert exported["int8_bytes"] < exported["fp32_bytes"] / 2


def test_sidecar_describes_input_and_calibration(exported, model_dir):
    side = json.loads(open(exported["sidecar"]).read())
    card = json.loads((model_dir / "card.json").read_text())
    assert side["classes"] == card["classes"] and side["task"] == "nuclei"
    assert side["input"]["shape"] == ["batch", 3, 32, 32] and side["input"]["range"] == [0.0, 1.0]
    assert side["input"]["channels_in"] == card["preprocessing"]["channels_in"]
    assert side["temperature"] == pytest.approx(card["calibration"]["temperature"])
    assert side["quantization"]["method"] == "static" and side["quantization"]["calibration_images"] == 24
    choice = side["quantization"]["calibration_choice"]  # chosen on validation images: the best agreement won
    agree = choice["top1_agreement_with_fp32"]
    assert choice["validation_images"] > 0 and set(agree) == {"MinMax", "Percentile"}
    assert side["quantization"]["calibration"] == max(agree, key=lambda k: agree[k])
    assert side["files"] == {"fp32": "nuclei.onnx", "int8": "nuclei.int8.onnx"}


def test_dynamic_batch_and_dynamic_quantization(model_dir, tmp_path):
    res = export_onnx(model_dir, tmp_path / "m.onnx", int8=True, int8_method="dynamic")
    assert res["int8_method"] == "dynamic"
    sess = onnx_session(res["int8"])
    for n in (1, 5):
        out = sess.run(None, {"image": np.random.default_rng(n).random((n, 3, 32, 32), dtype=np.float32)})[0]
        assert out.shape == (n, 4) and np.isfinite(out).all()


@pytest.mark.parametrize("fmt, expect", [("onx", "Did you mean 'onnx'"), ("tflite", "unknown export format 'tflite'")])
def test_cli_bad_format(model_dir, fmt, expect, capsys):
    assert main(["export", "--model", str(model_dir), "--format", fmt]) == 2
    err = capsys.readouterr().err.strip()
    assert expect in err and "\n" not in err


def test_cli_export_writes_files(model_dir, tmp_path, capsys):
    out = tmp_path / "cli.onnx"
    assert main(["export", "--model", str(model_dir), "--format", "onnx", "--out", str(out)]) == 0
    assert out.exists() and out.with_suffix(".json").exists()
    assert "fp32:" in capsys.readouterr().out


def test_histogram_calibration_images_fit_a_pixel_budget():
    from pellucid.core.export import HISTOGRAM_PIXEL_BUDGET, _within_pixels

    at = lambda size: [np.zeros((8, 3, size, size), np.float32) for _ in range(32)]  # noqa: E731 - 256 images
    assert sum(len(b) for b in _within_pixels(at(224), HISTOGRAM_PIXEL_BUDGET)) == 128
    assert sum(len(b) for b in _within_pixels(at(320), HISTOGRAM_PIXEL_BUDGET)) == 56
    assert len(_within_pixels(at(2000), HISTOGRAM_PIXEL_BUDGET)) == 1  # always at least one batch
