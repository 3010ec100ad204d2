"""A tiny train → predict → eval on real sample images, the CLI's error lines, and DDP on two CPUs."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pellucid.cli import main
from pellucid.core.predict import Predictor

from tests.conftest import data_dir

REPO = Path(__file__).resolve().parents[2]


def test_tiny_training_writes_a_complete_folder(tiny_model_dir):
    for name in ("model.safetensors", "card.json", "metrics.json", "split.json", "config.json",
                 "plots/roc.png", "plots/confusion.png", "plots/reliability.png", "plots/training_curves.png"):
        assert (tiny_model_dir / name).exists(), name
    card = json.loads((tiny_model_dir / "card.json").read_text())
    m = card["metrics"]["metrics"]["accuracy"]
    # the tiny test split is below the minimum count: the value stays, the interval becomes a note
    assert 0.0 <= m["value"] <= 1.0 and (m["low"] is None and m["note"].startswith("too few")
                                         or 0.0 <= m["low"] <= m["value"] <= m["high"] <= 1.0)
    assert card["threshold"]["policy"] == "youden" and 0.0 <= card["threshold"]["value"] <= 1.0
    assert card["calibration"]["temperature"] > 0
    assert card["split"]["train"] + card["split"]["val"] + card["split"]["test"] == 40
    assert len(card["split"]["hash"]) == 16
    assert (tiny_model_dir / "logs" / "version_0" / "metrics.csv").exists()  # Lightning CSV log of the fine-tune phase


def test_predict_rows_and_bad_files(tiny_model_dir, tmp_path):
    src = data_dir("tb_cxr")
    good = sorted((src / "normal").iterdir())[:3]
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    out = tmp_path / "pred.csv"
    # one unreadable input: every row is written, and the exit code says something failed
    assert main(["predict", "--model", str(tiny_model_dir), "--out", str(out), "--domain-policy", "label",
                 *map(str, good), str(bad)]) == 1
    rows = list(csv.DictReader(out.open()))
    assert [r["path"] for r in rows] == [*map(str, good), str(bad)]
    assert list(rows[0]) == ["path", "label", "prob_normal", "prob_tuberculosis", "domain", "domain_reason", "error"]
    assert all(r["domain"] in ("ok", "uncertain", "out_of_domain") for r in rows[:3])
    assert all(bool(r["domain_reason"]) == (r["domain"] == "out_of_domain") for r in rows[:3])
    for r in rows[:3]:
        p = float(r["prob_normal"]) + float(r["prob_tuberculosis"])
        assert abs(p - 1) < 1e-4 and r["label"] in ("normal", "tuberculosis") and r["error"] == ""
    assert rows[3]["label"] == "" and "broken.png" in rows[3]["error"]


def test_predictor_is_deterministic_and_calibrated(tiny_model_dir):
    src = data_dir("tb_cxr")
    files = sorted((src / "tuberculosis").iterdir())[:4]
    pred = Predictor(tiny_model_dir)
    a = pred.predict_paths(files)
    b = pred.predict_paths(files)
    assert [r.probs for r in a] == [r.probs for r in b]
    probs = np.array([[r.probs[c] for c in pred.classes] for r in a])
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5)


def test_eval_command_writes_metrics_and_plots(tiny_model_dir, tmp_path):
    from pellucid.datasets.splits import load_split

    data_dir("tb_cxr")
    split = load_split(tiny_model_dir)
    take = {"train": 2, "val": 1, "test": 1}  # per class: 3 the model has seen, 1 it has not
    rows = [r for c in ("normal", "tuberculosis") for part, k in take.items()
            for r in [r for r in split.part(part) if r.label == c][:k]]
    sub = tmp_path / "data"
    for r in rows:
        (sub / r.label).mkdir(parents=True, exist_ok=True)
        (sub / r.label / Path(r.path).name).symlink_to(Path(r.path).resolve())
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(sub), "--out", str(tmp_path / "ev")]) == 0
    res = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert res["n"] == 8 and (tmp_path / "ev" / "roc.png").stat().st_size > 1000
    # images the model was trained or calibrated on are counted, and the metrics say they are optimistic
    assert res["seen_in_training"] == {"train": 4, "val": 2} and "these numbers are optimistic" in res["note"]


@pytest.mark.parametrize("argv, expect", [
    (["train", "tbb"], "Did you mean 'tb'"),
    (["train", "tb", "--data", "/no/such/dir"], "data folder /no/such/dir not found"),
    (["eval", "--model", "/no/model", "--data", "."], "model folder /no/model not found"),
    (["train", "tb", "--backbone", "resnet5"], "Did you mean 'resnet50'"),
])
def test_cli_errors_are_one_line(argv, expect, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert expect in err and "\n" not in err and "Traceback" not in err


def test_cli_data_with_wrong_labels(tmp_path, capsys):
    (tmp_path / "cats").mkdir()
    (tmp_path / "dogs").mkdir()
    for d in ("cats", "dogs"):
        (tmp_path / d / "a.png").write_bytes(b"")
    assert main(["train", "tb", "--data", str(tmp_path)]) == 2
    assert "labels do not match the task" in capsys.readouterr().err


def test_list_command(capsys):
    assert main(["list", "backbones"]) == 0
    out = capsys.readouterr().out
    assert "efficientnet_lite0" in out and "resnet50" in out and "vgg19" in out


def test_ddp_two_cpu_processes(tmp_path):
    src = data_dir("tb_cxr")
    out = tmp_path / "ddp"
    env = {**os.environ, "PELLUCID_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pellucid", "train", "tb", "--data", str(src), "--out", str(out),
           "--backbone", "test_resnet", "--pretrained", "random", "--finetune", "full", "--epochs", "1",
           "--image-size", "32", "--max-images", "40", "--batch-size", "8", "--accelerator", "cpu",
           "--devices", "2", "--strategy", "ddp", "--no-progress"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    card = json.loads((out / "card.json").read_text())
    assert card["training"]["epochs_run"] >= 1
    assert "distributed" in proc.stderr.lower() or "ddp" in proc.stderr.lower() or "world_size" in proc.stderr.lower() \
        or "2 processes" in proc.stderr.lower(), proc.stderr[-1500:]


def test_interrupted_run_resumes_from_last_checkpoint(tmp_path):
    from pellucid.core.tasks import get_task
    from pellucid.core.training import TrainConfig, train

    src = data_dir("tb_cxr")
    kw = dict(backbone="test_resnet", pretrained=False, image_size=32, max_images=30, batch_size=8,
              progress=False, n_boot=20, finetune="full")
    out = tmp_path / "run"
    train(TrainConfig.from_task(get_task("tb"), str(src), str(out), epochs=1, **kw))
    assert (out / "checkpoints" / "last.ckpt").exists()
    # "interrupted" after one epoch: asking for two resumes at epoch 1 instead of starting over
    train(TrainConfig.from_task(get_task("tb"), str(src), str(out), epochs=2, patience=10, **kw))
    card = json.loads((out / "card.json").read_text())
    assert card["training"]["epochs_run"] == 2
    def logged(version):
        path = out / "logs" / f"version_{version}" / "metrics.csv"
        return [int(r["epoch"]) for r in csv.DictReader(path.open()) if r.get("val_loss")]

    assert logged(0) == [0] and logged(1) == [1]  # the second run went on at epoch 1; both logs kept


@pytest.mark.parametrize("keep", [True, False])
def test_diverged_fine_tune_keeps_the_linear_probe(tmp_path, keep):
    """A fine-tune that ends worse on validation than its probe (here: a learning rate that blows
    the network up) must not replace the probe — unless asked to."""
    import torch
    from safetensors.torch import load_file

    from pellucid.core.tasks import get_task
    from pellucid.core.training import TrainConfig, train

    out = tmp_path / "run"
    cfg = TrainConfig.from_task(get_task("tb"), str(data_dir("tb_cxr")), str(out), backbone="test_resnet",
                                pretrained=False, finetune="progressive", epochs=1, image_size=32, max_images=40,
                                batch_size=8, lr=50.0, head_lr=50.0, progress=False, n_boot=10,
                                keep_probe_if_better=keep)
    train(cfg)
    card = json.loads((out / "card.json").read_text())
    hist = json.loads((out / "history.json").read_text())
    probe = next(h for h in hist if h.get("phase") == "linear-probe")
    tuned = min(h["val_loss"] for h in hist if h.get("epoch", -1) >= 0)
    assert tuned > probe["val_loss"]  # the fine-tune did diverge
    assert card["training"]["kept"] == ("linear-probe" if keep else "fine-tuned")
    weights = load_file(str(out / "model.safetensors"))
    finite = all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())
    if keep:
        assert finite and "did not beat the linear probe" in card["training"]["kept_reason"]


def test_same_recipe_and_seed_give_the_same_weights(tmp_path):
    """Training is reproducible: the augmentation pipeline is seeded from the recipe (albumentations
    ignores the global seeds), so two runs of one configuration end with identical weights."""
    import torch
    from safetensors.torch import load_file

    from pellucid.core.tasks import get_task
    from pellucid.core.training import TrainConfig, train

    weights = []
    for run in ("a", "b"):
        cfg = TrainConfig.from_task(get_task("waste"), str(data_dir("waste")), str(tmp_path / run), backbone="test_resnet",
                                    pretrained=False, finetune="full", epochs=1, image_size=32, max_images=24,
                                    batch_size=8, progress=False, n_boot=10)
        train(cfg)
        weights.append(load_file(tmp_path / run / "model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_history_gives_each_epoch_its_own_training_loss(tmp_path):
    """history.json (the training-curve plot's data) matches Lightning's own log epoch by epoch."""
    from pellucid.core.tasks import get_task
    from pellucid.core.training import TrainConfig, train

    out = tmp_path / "h"
    cfg = TrainConfig.from_task(get_task("tb"), str(data_dir("tb_cxr")), str(out), backbone="test_resnet",
                                pretrained=False, image_size=64, epochs=2, max_images=40, batch_size=8,
                                progress=False, n_boot=0, finetune="full")
    train(cfg)
    history = [r for r in json.loads((out / "history.json").read_text()) if r.get("epoch", -1) >= 0]
    logged = {int(r["epoch"]): float(r["train_loss"]) for r in csv.DictReader(open(next(out.glob("logs/*/metrics.csv"))))
              if r["train_loss"]}
    assert [r["epoch"] for r in history] == sorted(logged) == [0, 1]  # every epoch, the last one too
    for r in history:
        assert r["train_loss"] == pytest.approx(logged[r["epoch"]], rel=1e-6)


def test_cpu_fine_tune_runs_inside_small_input_depthwise(tmp_path, monkeypatch):
    """On CPU the fine-tune's epochs run inside small_input_depthwise, entered once and left after."""
    import contextlib

    from pellucid.core import training
    from pellucid.core.tasks import get_task

    seen, real = [], training.small_input_depthwise

    @contextlib.contextmanager
    def spy(model):
        with real(model) as n:
            seen.append(n)
            yield n
        seen.append("left")

    monkeypatch.setattr(training, "small_input_depthwise", spy)
    cfg = training.TrainConfig.from_task(get_task("tb"), str(data_dir("tb_cxr")), str(tmp_path / "d"),
                                         backbone="test_resnet", pretrained=False, image_size=32, epochs=1,
                                         max_images=24, batch_size=8, progress=False, n_boot=0, finetune="full",
                                         accelerator="cpu")
    training.train(cfg)
    assert seen == [0, "left"]  # entered once around the epochs (test_resnet has no depthwise layer)

def test_backbone_flag_on_an_ensemble_recipe_is_honoured_not_ignored(tmp_path, capsys, caplog):
    data_dir("snow")
    # one backbone for the snow ensemble: one model of it (here it has no offline weights: one-line error)
    assert main(["train", "snow", "--backbone", "resnet50", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    from pellucid.core.tasks import get_task

    n = len(get_task("snow").recipe["members"])
    assert f"trains one resnet50 model instead of the snow recipe's ensemble of {n}" in caplog.text
    assert "no pretrained weights for 'resnet50'" in err and "\n" not in err

def test_probe_flip_fits_the_probe_on_mirrored_copies_too(tmp_path):
    """``probe_flip``: the linear probe sees every training image and its mirror (twice the rows);
    the split and everything at prediction time stay the same."""
    from pellucid.core.tasks import get_task
    from pellucid.core.training import TrainConfig, train

    rows = {}
    for flip in (False, True):
        out = tmp_path / str(flip)
        cfg = TrainConfig.from_task(get_task("tb"), str(data_dir("tb_cxr")), str(out), backbone="test_resnet",
                                    pretrained=False, finetune="linear-probe", epochs=0, image_size=32, max_images=40,
                                    batch_size=8, progress=False, n_boot=10, probe_flip=flip)
        train(cfg)
        probe = next(h for h in json.loads((out / "history.json").read_text()) if h.get("phase") == "linear-probe")
        split = json.loads((out / "split.json").read_text())
        rows[flip] = (probe["fit_rows"], len(split["train"]))
    assert rows[False][0] == rows[False][1] and rows[True] == (2 * rows[False][1], rows[False][1])


def test_ema_keeps_the_averaged_weights(tmp_path):
    """``ema`` (time constant in epochs) averages the fine-tuned weights: a constant of one step or
    less is the plain run, weight for weight; a very long one keeps the weights near where the
    averaging started (the end of the warm-up), far from where the plain fine-tune went."""
    import torch
    from safetensors.torch import load_file

    from pellucid.core.tasks import get_task
    from pellucid.core.training import TrainConfig, train

    def run(name, **kw):
        cfg = TrainConfig.from_task(get_task("tb"), str(data_dir("tb_cxr")), str(tmp_path / name),
                                    backbone="test_resnet", pretrained=False, image_size=32, max_images=40,
                                    batch_size=8, progress=False, n_boot=0, seed=0,
                                    keep_probe_if_better=False, probe_patience=0, patience=9, **kw)
        train(cfg)
        return load_file(tmp_path / name / "model.safetensors")

    start = run("probe", finetune="linear-probe", epochs=0)
    plain = run("plain", finetune="full", epochs=3, lr=3e-3, head_lr=3e-3)
    short = run("short", finetune="full", epochs=3, lr=3e-3, head_lr=3e-3, ema=1e-6)
    long_ = run("long", finetune="full", epochs=3, lr=3e-3, head_lr=3e-3, ema=1e4)
    body = [k for k in start if k.startswith("backbone") and start[k].is_floating_point() and "running" not in k]
    assert body and all(torch.equal(plain[k], short[k]) for k in plain)

    def moved(w):
        return sum(float((w[k] - start[k]).norm()) for k in body)

    assert moved(plain) > 0 and moved(long_) < 0.5 * moved(plain), (moved(long_), moved(plain))


def _tiny_fine_tune(out, **kw):
    """Two epochs of a full fine-tune of the tiny test network on 40 real chest X-rays at 32 px."""
    from pellucid.core.tasks import get_task
    from pellucid.core.training import TrainConfig, train

    return train(TrainConfig.from_task(get_task("tb"), str(data_dir("tb_cxr")), str(out), backbone="test_resnet",
                                       pretrained=False, image_size=32, max_images=40, batch_size=8, progress=False,
                                       n_boot=0, seed=0, finetune="full", epochs=2, probe_patience=0, **kw))


def test_test_size_trains_the_same_weights_and_the_folder_predicts_at_the_larger_size(tmp_path):
    """``test_size``: training is untouched (the same weights as the plain run, the same run identity), and the
    folder is calibrated, scored and described at the larger input, so every door reads images at it."""
    import torch
    from safetensors.torch import load_file

    from pellucid.core.modelfolder import read_card
    from pellucid.core.training import TrainingError

    def run(name, **kw):
        return _tiny_fine_tune(tmp_path / name, **kw)

    plain, big = run("plain"), run("big", test_size=48)
    wp, wb = load_file(plain / "model.safetensors"), load_file(big / "model.safetensors")
    assert all(torch.equal(wp[k], wb[k]) for k in wp)
    cp, cb = read_card(plain), read_card(big)
    assert (cp.image_size, cb.image_size) == (32, 48) and cb.recipe["image_size"] == 32
    hashes = [json.loads((f / "run.json").read_text())["config_hash"] for f in (plain, big)]
    assert hashes[0] == hashes[1]
    assert cp.calibration != cb.calibration  # fitted on the validation logits of the larger input
    with pytest.raises(TrainingError, match="test_size and snapshots"):
        run("snap", test_size=48, snapshots=2)
    with pytest.raises(TrainingError, match="test_size must be"):  # an ensemble member's override, say
        run("tiny", test_size=4)


def test_tta_trains_the_same_weights_and_every_door_predicts_with_the_views(tmp_path, capsys):
    """``tta = "dihedral"``: training is untouched (same weights, same run identity); the folder is
    calibrated and scored on the views, reloads as a model that cannot tell an image from its turned or
    mirrored copy, predicts so from a file, exports the views to ONNX, and an unknown view set is one line."""
    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import load_file

    from pellucid.cli import main
    from pellucid.core.modelfolder import load_model, read_card
    from pellucid.core.predict import Predictor
    from pellucid.core.training import TrainingError
    from pellucid.core.tasks import TTA_TEXT
    from pellucid.core.views import VIEW_SETS, ViewAverage, apply_view

    def run(name, **kw):
        return _tiny_fine_tune(tmp_path / name, **kw)

    plain, viewed = run("plain"), run("viewed", tta="dihedral")
    wp, wv = load_file(plain / "model.safetensors"), load_file(viewed / "model.safetensors")
    assert wp.keys() == wv.keys() and all(torch.equal(wp[k], wv[k]) for k in wp)
    hashes = [json.loads((f / "run.json").read_text())["config_hash"] for f in (plain, viewed)]
    assert hashes[0] == hashes[1]
    cp, cv = read_card(plain), read_card(viewed)
    assert cp.preprocessing.tta is None and cv.preprocessing.tta == "dihedral"
    assert cp.calibration != cv.calibration  # fitted on the views' mean logits
    assert "8 rotations and mirror images" in (viewed / "MODEL_CARD.md").read_text()
    from pellucid.explain.report.card import card_rows  # what reports and the web app show

    assert ("Test-time views", TTA_TEXT["dihedral"]) in card_rows(cv)
    assert not [r for r in card_rows(cp) if r[0] == "Test-time views"]

    model, _ = load_model(viewed)
    assert isinstance(model, ViewAverage) and len(model.views) == 8
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        views = [(x.flip(-1) if m else x).rot90(k, (2, 3)) for k, m in VIEW_SETS["dihedral"]]
        assert all(torch.equal(apply_view(x, v), t) for v, t in zip(VIEW_SETS["dihedral"], views))
        mean = torch.stack([model.inner(t) for t in views]).mean(0)
        assert torch.allclose(out, mean, atol=1e-6)
        for turned in (torch.rot90(x, 1, (2, 3)), x.flip(-1), x.flip(-2)):
            assert torch.allclose(model(turned), out, atol=1e-5)
        assert not torch.allclose(model.inner(torch.rot90(x, 1, (2, 3))), model.inner(x), atol=1e-5)

    rgb = (np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(np.ascontiguousarray(np.rot90(rgb))).save(tmp_path / "a_turned.png")
    cases = Predictor(viewed).predict_paths([tmp_path / "a.png", tmp_path / "a_turned.png"])
    assert [c.error for c in cases] == ["", ""]
    assert list(cases[0].probs.values()) == pytest.approx(list(cases[1].probs.values()), abs=1e-4)

    assert main(["export", "--model", str(viewed), "--out", str(tmp_path / "m.onnx")]) == 0
    import onnxruntime as ort

    onnx_file = tmp_path / "m.onnx"
    sess = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert np.allclose(got, out.numpy(), atol=1e-4)

    with pytest.raises(TrainingError, match="tta must be one of none, flip, dihedral"):
        run("spin", tta="spin")


def test_probe_layers_widen_the_head_and_the_folder_reloads_and_predicts_with_them(tmp_path):
    """``probe_layers``: the linear probe reads the pooled inner layers beside the embedding (a wider head);
    the card names them and the loaded folder is built with them (the embedding last in its features), the
    run identity of a recipe without them is unchanged, and a fine-tune, a layer the network lacks or a card
    naming one is a one-line refusal."""
    import torch

    from pellucid.core.card import CardError
    from pellucid.core.modelfolder import load_model, read_card
    from pellucid.core.runs import run_identity
    from pellucid.core.tasks import get_task
    from pellucid.core.training import TrainConfig, TrainingError, train

    def cfg(name, **kw):
        kw = {"finetune": "linear-probe", "epochs": 0, **kw}
        return TrainConfig.from_task(get_task("tb"), str(data_dir("tb_cxr")), str(tmp_path / name),
                                     backbone="test_resnet", pretrained=False, image_size=32, max_images=40,
                                     batch_size=8, progress=False, n_boot=0, seed=0, **kw)

    plain, taps = train(cfg("plain")), train(cfg("taps", probe_layers=["layer2", "layer3"]))
    mp, _ = load_model(plain)
    mt, card = load_model(taps)
    assert card.backbone.extra["probe_layers"] == ["layer2", "layer3"] and "probe_layers" not in read_card(plain).backbone.extra
    assert mt.head.in_features > mp.head.in_features == mp.spec.embedding_dim
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        feats = mt.features(x)
        assert feats.shape == (3, mt.head.in_features)
        assert torch.allclose(feats[:, -mp.spec.embedding_dim:], mt.backbone(mt.normalize(x)))  # the embedding, last
    identity = run_identity(cfg("plain"))
    assert "probe_layers" not in identity["config"]  # off: the identity runs had before the option existed
    assert json.loads((plain / "run.json").read_text())["config_hash"] == identity["config_hash"]
    assert run_identity(cfg("a"))["config_hash"] != run_identity(cfg("a", probe_layers=["layer2"]))["config_hash"]
    with pytest.raises(TrainingError, match="probe_layers is for linear-probe recipes"):
        train(cfg("ft", probe_layers=["layer2"], finetune="full", epochs=1))
    with pytest.raises(TrainingError, match="has no layer 'blocks.9'"):
        train(cfg("bad", probe_layers=["blocks.9"]))
    with pytest.raises(TrainingError, match="list of layer names"):
        train(cfg("str", probe_layers=[3]))
    # a hand-edited card naming a layer the network lacks: one line, no traceback
    raw = json.loads((taps / "card.json").read_text())
    raw["backbone"]["probe_layers"] = ["nowhere"]
    (taps / "card.json").write_text(json.dumps(raw))
    with pytest.raises(CardError, match="has no layer 'nowhere'"):
        load_model(taps)


def test_swa_holds_the_rate_over_the_averaged_epochs(tmp_path):
    """``swa = 0.5`` over 4 epochs: the warm-up cosine schedule runs until epoch 2 and then holds its
    rate; the plain run's rate keeps falling; the weights written differ from the plain run's."""
    import torch
    from safetensors.torch import load_file

    from pellucid.core.tasks import get_task
    from pellucid.core.training import TrainConfig, swa_start_epoch, train

    def run(name, **kw):
        cfg = TrainConfig.from_task(get_task("tb"), str(data_dir("tb_cxr")), str(tmp_path / name),
                                    backbone="test_resnet", pretrained=False, image_size=32, max_images=40,
                                    batch_size=8, progress=False, n_boot=0, seed=0, finetune="full", epochs=4,
                                    lr=3e-3, head_lr=3e-3, keep_probe_if_better=False, probe_patience=0, patience=9,
                                    **kw)
        train(cfg)
        rows = [h for h in json.loads((tmp_path / name / "history.json").read_text()) if "lr" in h]
        return [r["lr"] for r in rows], load_file(tmp_path / name / "model.safetensors")

    assert swa_start_epoch(TrainConfig(task="tb", data="", out="", epochs=4, swa=0.5)) == 2
    assert swa_start_epoch(TrainConfig(task="tb", data="", out="", epochs=15, swa=0.95)) == 14
    assert swa_start_epoch(TrainConfig(task="tb", data="", out="", epochs=15, swa=0.01)) == 1
    plain_lr, plain = run("plain")
    swa_lr, swa = run("swa", swa=0.5)
    assert len(plain_lr) == len(swa_lr) == 4
    assert plain_lr[1] > plain_lr[2] > plain_lr[3]
    # at the end of epoch 1 the schedule has reached the start of epoch 2, where it holds
    assert swa_lr[0] == plain_lr[0] and swa_lr[1] == swa_lr[2] == swa_lr[3] == plain_lr[1]
    assert any(not torch.allclose(plain[k], swa[k]) for k in plain if plain[k].is_floating_point())


def _snapshot_config(tmp_path, name, **kw):
    from pellucid.core.tasks import get_task
    from pellucid.core.training import TrainConfig

    kw = {"finetune": "full", **kw}
    return TrainConfig.from_task(get_task("tb"), str(data_dir("tb_cxr")), str(tmp_path / name),
                                 backbone="test_resnet", pretrained=False, image_size=32, max_images=40,
                                 batch_size=8, progress=False, n_boot=0, seed=0, lr=3e-3, head_lr=3e-3,
                                 keep_probe_if_better=False, probe_patience=1, patience=1, **kw)


def test_snapshots_write_an_ensemble_of_each_cycles_last_weights(tmp_path):
    """``snapshots = 2`` over 4 epochs: the cosine restarts at the full rate after epoch 2; every cycle
    runs (patience and the probe's stop do not cut it short); the folder is an ensemble of two
    calibrated members, the weights at the end of epochs 2 and 4 (the last, as in the last checkpoint),
    and it predicts the weighted mean of their calibrated probabilities."""
    import torch
    from safetensors.torch import load_file

    from pellucid.core.modelfolder import load_model, read_card
    from pellucid.core.training import snapshot_every, train

    cfg = _snapshot_config(tmp_path, "snap", epochs=4, snapshots=2)
    assert snapshot_every(cfg) == 2
    out = Path(train(cfg))
    rows = [h for h in json.loads((out / "members" / "snapshot2_epoch4" / "history.json").read_text()) if "lr" in h]
    lr = [r["lr"] for r in rows]
    # each row holds the rate of the next step: after epoch 2 the second cycle starts at the full rate
    assert len(lr) == 4 and lr[0] < lr[1] and lr[1] == pytest.approx(3e-3) and lr[1] > lr[2] > lr[3], lr
    card = read_card(out)
    assert card.kind == "ensemble"
    paths = [e["path"] for e in card.extra["members"]]
    assert paths == ["members/snapshot1_epoch2", "members/snapshot2_epoch4"]
    assert [e["weight"] for e in card.extra["members"]] == [0.5, 0.5]
    first, last = (load_file(out / p / "model.safetensors") for p in paths)
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert all(torch.equal(last[k], ckpt["state_dict"]["model." + k]) for k in last)
    assert any(not torch.equal(first[k], last[k]) for k in last if last[k].is_floating_point())
    assert (out / "metrics.json").is_file() and all((out / p / "metrics.json").is_file() for p in paths)
    assert (out / "history.json").is_file() and (out / "plots" / "training_curves.png").is_file()
    # the snapshots are on disk beside the last checkpoint, so a continued run keeps them
    saved = [torch.load(out / "checkpoints" / f"snapshot-epoch={e}.ckpt", map_location="cpu", weights_only=True)
             for e in (1, 3)]
    assert all(torch.equal(first[k], saved[0]["state_dict"]["model." + k]) for k in first)
    assert all(torch.equal(last[k], saved[1]["state_dict"]["model." + k]) for k in last)
    model, _ = load_model(out)
    x = torch.rand(3, 3, 32, 32)
    members = [load_model(out / p) for p in paths]
    mean = sum(torch.softmax(m(x) / c.temperature, 1) for m, c in members) / 2
    assert torch.allclose(torch.softmax(model(x), 1), mean, atol=1e-5)


def test_snapshots_that_do_not_divide_the_epochs_are_refused_before_any_work(tmp_path):
    from pellucid.core.training import TrainingError, train

    with pytest.raises(TrainingError, match="multiple") as err:
        train(_snapshot_config(tmp_path, "bad", epochs=4, snapshots=3))
    assert "\n" not in str(err.value) and not (tmp_path / "bad").exists()
    with pytest.raises(TrainingError, match="three ways"):
        train(_snapshot_config(tmp_path, "bad", epochs=4, snapshots=2, ema=1.0))


def test_an_ensemble_whose_members_average_views_predicts_and_explains_with_them(tmp_path):
    """Members with their own ``tta = "flip"`` (a probe fitted with ``probe_flip`` and a fine-tune weighted 3, as in
    a vote recipe): each member folder averages the image and its mirror image, so the ensemble cannot tell a file
    from its mirrored copy at any door, and Grad-CAM's map of the mirror image is the mirrored map."""
    import torch
    from PIL import Image

    from pellucid.core.ensemble_train import train_ensemble
    from pellucid.core.modelfolder import load_model, read_card
    from pellucid.core.views import ViewAverage
    from pellucid.explain import get_explainer

    cfg = _snapshot_config(tmp_path, "ens", epochs=0, finetune="linear-probe",
                           members=[{"finetune": "linear-probe", "epochs": 0, "probe_flip": True, "tta": "flip"},
                                    {"finetune": "full", "epochs": 1, "tta": "flip", "weight": 3.0}])
    out = train_ensemble(cfg)
    entries = read_card(out).extra["members"]
    assert [read_card(out / e["path"]).preprocessing.tta for e in entries] == ["flip", "flip"]
    model, _ = load_model(out)
    assert len(model.members) == 2 and all(isinstance(m, ViewAverage) for m in model.members)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x.flip(-1)), model(x), atol=1e-5)
        tuned = model.members[1].inner
        assert not torch.allclose(tuned(x.flip(-1)), tuned(x), atol=1e-4)  # one pass of the network can tell
    maps = [np.stack([e.heatmap for e in get_explainer("gradcam").explain(model, t)]) for t in (x, x.flip(-1))]
    np.testing.assert_allclose(maps[1], maps[0][..., ::-1], atol=1e-5)

    rgb = (np.random.default_rng(1).random((40, 40, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(np.ascontiguousarray(rgb[:, ::-1])).save(tmp_path / "a_mirrored.png")
    cases = Predictor(out).predict_paths([tmp_path / "a.png", tmp_path / "a_mirrored.png"])
    assert [c.error for c in cases] == ["", ""]
    assert list(cases[0].probs.values()) == pytest.approx(list(cases[1].probs.values()), abs=1e-4)


def test_a_snapshot_member_of_an_ensemble_recipe_joins_as_its_snapshots(tmp_path):
    """A recipe member with ``snapshots = 2`` and weight 2 beside a probe: the ensemble holds the probe
    and both snapshots, each snapshot with half the member's weight (so all three weigh the same)."""
    from pellucid.core.ensemble_train import train_ensemble
    from pellucid.core.modelfolder import load_model, read_card

    cfg = _snapshot_config(tmp_path, "ens", epochs=0, finetune="linear-probe",
                           members=[{"finetune": "linear-probe", "epochs": 0},
                                    {"finetune": "full", "epochs": 2, "snapshots": 2, "weight": 2.0}])
    out = train_ensemble(cfg)
    entries = read_card(out).extra["members"]
    assert [e["path"].split("/")[-1] for e in entries] == ["m0_test_resnet_32", "snapshot1_epoch1", "snapshot2_epoch2"]
    assert [round(e["weight"], 6) for e in entries] == [round(1 / 3, 6)] * 3
    model, _ = load_model(out)
    assert len(model.members) == 3
