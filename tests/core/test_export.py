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
    rounding flips the top-1 class, so agreement would measure the ties, not the quantization. One view
    (nuclei's recipe averages 8): these tests are about export, and the emulated-CPU one runs 8 times
    longer with the views (the views' export is tested in tests/core/test_training.py).
    """
    from pellucid.core.tasks import get_task
    from pellucid.core.training import TrainConfig, train

    out = tmp_path_factory.mktemp("nuclei_tiny")
    cfg = TrainConfig.from_task(get_task("nuclei"), str(data_dir("nuclei")), str(out), backbone="shallow_cnn",
                                pretrained=False, finetune="full", image_size=32, epochs=2, max_images=300,
                                batch_size=32, lr=3e-3, head_lr=3e-3, balance="weights", progress=False, n_boot=0,
                                tta="none")
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
    assert side["quantization"]["check"]["validation_images"] > 0 and set(agree) == {"MinMax", "Percentile"}
    assert side["quantization"]["calibration"] == max(agree, key=lambda k: agree[k])
    assert side["quantization"]["check"]["top1_agreement_with_fp32"] == agree[side["quantization"]["calibration"]]
    assert side["files"] == {"fp32": "nuclei.onnx", "int8": "nuclei.int8.onnx"}


def test_a_calibration_set_that_is_not_whole_batches_still_quantizes_statically(model_dir, tmp_path):
    """20 calibration images in batches of 8: the short last batch is dropped, because ONNX Runtime's
    histogram calibration stacks the batches (it failed, and the export fell back to dynamic INT8)."""
    from pellucid.core.export import calibration_batches
    from pellucid.core.modelfolder import read_card

    assert [len(b) for b in calibration_batches(model_dir, read_card(model_dir), 20)] == [8, 8]
    assert [len(b) for b in calibration_batches(model_dir, read_card(model_dir), 5)] == [5]
    side = json.loads(open(export_onnx(model_dir, tmp_path / "m.onnx", int8=True, calib_images=20)["sidecar"]).read())
    assert side["quantization"]["method"] == "static" and side["quantization"]["calibration_images"] == 16


def test_sidecar_records_portable_settings_this_cpu_and_runtime(exported):
    import onnxruntime

    from pellucid.core.quantize import cpu_features, saturation_safe

    q = json.loads(open(exported["sidecar"]).read())["quantization"]
    assert q["weight_type"] == "QUInt8" and q["per_channel"] is True and q["reduce_range"] is False
    assert q["float32_nodes"]  # the first convolution and the classifier stay in float32
    assert q["cpu"]["isa"] == cpu_features()["isa"] and q["cpu"]["int8_dot"] == cpu_features()["int8_dot"]
    assert q["onnxruntime"] == onnxruntime.__version__
    assert saturation_safe(exported["int8"])[0]


def test_local_int8_settings_follow_this_cpu():
    """LIME's in-process INT8 graphs use int8 weights, 7-bit exactly where this CPU's int8 products saturate."""
    from pellucid.core.quantize import cpu_features, local_settings

    cpu = cpu_features()
    s = local_settings()
    branch = cpu["int8_dot"]
    assert s["weight_type"] == "QInt8"
    assert s["reduce_range"] == (branch in ("saturating-int16", "unknown")), branch
    # both branches, whatever this machine is
    assert local_settings({**cpu, "int8_dot": "vnni"})["reduce_range"] is False
    assert local_settings({**cpu, "int8_dot": "saturating-int16"})["reduce_range"] is True


def test_full_range_int8_weights_are_flagged_unsafe(exported, model_dir, tmp_path):
    """The check that makes a graph portable fails on ONNX Runtime's default (full 8-bit) weights."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from pellucid.core.export import calibration_batches
    from pellucid.core.modelfolder import load_model
    from pellucid.core.quantize import CalibrationReader, saturation_safe

    full = tmp_path / "full.onnx"
    quantize_static(exported["fp32"], str(full), CalibrationReader(calibration_batches(model_dir, load_model(model_dir)[1], 8)),
                    quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    safe, why = saturation_safe(full)
    assert not safe and "overflow on CPUs without VNNI" in why
    assert saturation_safe(exported["fp32"])[0]  # float graphs hold no int8 weights
    # loading it on a CPU whose int8 products saturate warns (asserted for both kinds of CPU)
    import warnings

    from pellucid.core import export

    for dot, warns in (("saturating-int16", True), ("vnni", False)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            orig = export.cpu_features
            export.cpu_features = lambda dot=dot: {**orig(), "int8_dot": dot}
            try:
                onnx_session(full)
            finally:
                export.cpu_features = orig
        assert any("overflow" in str(w.message) for w in caught) == warns, dot


def test_int8_below_the_agreement_floor_is_refused_with_one_line(model_dir, tmp_path, monkeypatch, capsys):
    from pellucid.core import export

    monkeypatch.setattr(export, "MIN_AGREEMENT", 1.01)  # no model can reach it: the refusal path runs
    out = tmp_path / "r.onnx"
    assert main(["export", "--model", str(model_dir), "--int8", "--out", str(out)]) != 0
    err = capsys.readouterr().err.strip()
    assert "INT8 model not written" in err and "< 1.01" in err and "\n" not in err
    assert out.exists() and not out.with_name("r.int8.onnx").exists()  # fp32 kept, no INT8 file
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["files"]["int8"] is None and "INT8 model not written" in side["quantization"]["refused"]


_EMULATED = r"""
import sys, numpy as np, onnxruntime as ort
x = np.load(sys.argv[1])
for path in sys.argv[2:]:
    out = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    np.save(path + ".out.npy", out)
"""


def test_int8_model_agrees_on_an_emulated_avx2_only_cpu(exported, model_dir, tmp_path):
    """Runs the exported INT8 graph under an emulated AMD EPYC-Rome (AVX2, no VNNI, no AVX-512), where
    ONNX Runtime takes the saturating U8S8 kernel. The portable graph must give the native answer; a
    full-range control graph must not (which proves the emulation reaches the saturating kernel)."""
    import platform
    import shutil
    import subprocess
    import sys

    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from pellucid.core.export import calibration_batches
    from pellucid.core.modelfolder import load_model
    from pellucid.core.quantize import CalibrationReader

    qemu = shutil.which("qemu-x86_64")
    if qemu is None or platform.machine() != "x86_64":
        pytest.skip("needs qemu-x86_64 on an x86_64 machine (Debian package qemu-user) to emulate an AVX2-only CPU")
    full = tmp_path / "full.onnx"
    quantize_static(exported["fp32"], str(full), CalibrationReader(calibration_batches(model_dir, load_model(model_dir)[1], 24)),
                    quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    x = _batch(Predictor(model_dir), 80)
    np.save(tmp_path / "x.npy", x)
    script = tmp_path / "emulated.py"
    script.write_text(_EMULATED)
    safe = tmp_path / "safe.onnx"
    shutil.copyfile(exported["int8"], safe)
    subprocess.run([qemu, "-cpu", "EPYC-Rome", sys.executable, str(script), str(tmp_path / "x.npy"), str(safe),
                    str(full)], check=True, capture_output=True, timeout=300)
    native = {p: onnx_session(p).run(None, {"image": x})[0] for p in (safe, full)}
    emulated = {p: np.load(str(p) + ".out.npy") for p in (safe, full)}
    fp32 = onnx_session(exported["fp32"]).run(None, {"image": x})[0].argmax(1)
    np.testing.assert_allclose(emulated[safe], native[safe], atol=1e-4)
    assert float((emulated[safe].argmax(1) == fp32).mean()) >= 0.95
    # the control: full 8-bit weights overflow the int16 pairs there (on this CPU too when it lacks VNNI)
    from pellucid.core.quantize import cpu_features

    differs = float(np.abs(emulated[full] - native[full]).max()) > 1e-3
    assert differs == (cpu_features()["int8_dot"] == "vnni"), (cpu_features().summary(),
                                                               float(np.abs(emulated[full] - native[full]).max()))


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


def test_an_ensemble_whose_members_resize_is_refused_in_one_line_and_explained_on_torch(tmp_path, capfd):
    import importlib.util

    import torch

    from pellucid.core.ensemble import build_ensemble
    from pellucid.core.export import ExportError
    from pellucid.core.modelfolder import load_model
    from pellucid.core.runtime import fast_forward
    from tests.core.test_ensemble import _member

    if importlib.util.find_spec("onnxscript") is not None:
        pytest.skip("onnxscript is installed: torch's newer exporter may write the antialiased resize")
    members = [_member(tmp_path / "a", 32, 0, 1.0), _member(tmp_path / "b", 48, 1, 1.0)]
    with pytest.warns(UserWarning, match="do not share"):
        ens = build_ensemble(members, tmp_path / "ens")
    capfd.readouterr()
    with pytest.raises(ExportError, match="members read other input sizes: export each member folder") as err:
        export_onnx(ens, tmp_path / "e.onnx")
    assert "\n" not in str(err.value)
    out, errs = capfd.readouterr()
    assert "Torch IR graph" not in out + errs and len((out + errs).splitlines()) < 5  # no exporter dump
    assert main(["export", "--model", str(ens), "--out", str(tmp_path / "e2.onnx")]) == 2
    # the faithfulness scores' fast path falls back to eager torch, with the same logits, quietly
    model, _ = load_model(ens)
    runner = fast_forward(model, (3, 48, 48))
    x = torch.rand(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(runner(x), model(x).float())
    assert runner.backend == "torch" and "Torch IR graph" not in "".join(capfd.readouterr())
    export_onnx(members[0], tmp_path / "m.onnx")  # a member exports
