"""The shared Lightning Trainer factory (core.trainer) and the shared evaluation tail (core.scoring)."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch


def test_make_trainer_shared_defaults_are_quiet(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint as LightningCheckpoint
    from lightning.pytorch.callbacks import ProgressBar

    from pellucid.core.trainer import make_trainer

    trainer = make_trainer(max_epochs=3, accelerator="cpu", devices=1, bf16=True, default_root_dir=tmp_path)
    assert trainer.max_epochs == 3
    assert trainer.precision == "32-true"  # bf16 is asked for, but only CUDA gets it
    assert trainer.logger is None  # no log_dir: no logger
    assert not any(isinstance(c, (LightningCheckpoint, ProgressBar)) for c in trainer.callbacks)
    assert trainer.num_sanity_val_steps == 0


def test_make_trainer_checkpoints_logs_and_progress_when_asked(tmp_path):
    from lightning.pytorch.callbacks import TQDMProgressBar
    from lightning.pytorch.loggers import CSVLogger

    from pellucid.core.trainer import ModelCheckpoint, make_trainer

    ckpt = ModelCheckpoint(dirpath=tmp_path / "checkpoints", monitor="val_loss")
    trainer = make_trainer(max_epochs=1, accelerator="cpu", devices=1, callbacks=[ckpt], log_dir=tmp_path,
                           progress=True, log_every_n_steps=7)
    assert trainer.checkpoint_callback is ckpt  # the caller's checkpoint, no default one beside it
    assert isinstance(trainer.logger, CSVLogger) and trainer.logger.name == "logs"
    assert trainer.log_every_n_steps == 7
    bars = [c for c in trainer.callbacks if isinstance(c, TQDMProgressBar)]
    assert len(bars) == 1 and bars[0].refresh_rate == 1


def _tiny_module():
    """A Lightning module of two linear layers around a BatchNorm, trained with SGD at rate 0.5."""
    from pellucid.core.trainer import LightningModule

    class Tiny(LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))

        def training_step(self, batch, _):
            return torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def validation_step(self, batch, _):
            self.log("val_loss", torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1]))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

    return Tiny()


def test_swa_averages_the_epoch_end_weights_from_its_start_epoch(tmp_path):
    """``swa_callback(2)`` over 4 epochs: the weights left at the end (and in the checkpoint) are the
    equal mean of the weights at the end of epochs 2 and 3 (BatchNorm statistics too); validation of
    epochs 0 and 1 sees the trained weights, not the untouched copy the average starts as."""
    from torch.utils.data import DataLoader, TensorDataset

    from pellucid.core.trainer import Callback, ModelCheckpoint, make_trainer, swa_callback

    torch.manual_seed(0)
    x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))

    def weights(module):
        return {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}

    class Record(Callback):  # after the averaging callback: sees what validation sees
        def __init__(self):
            self.ends, self.validated = [], []

        def on_train_epoch_end(self, trainer, module):
            self.ends.append(weights(module))

        def on_validation_epoch_start(self, trainer, module):
            self.validated.append(weights(module))

    record, module = Record(), _tiny_module()
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="last", save_last=False, monitor=None)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    trainer = make_trainer(max_epochs=4, accelerator="cpu", devices=1, callbacks=[swa_callback(2), record, ckpt])
    trainer.fit(module, loader, loader)
    mean = {k: (record.ends[2][k] + record.ends[3][k]) / 2 for k in record.ends[3]}
    final = weights(module)
    assert "net.1.running_mean" in mean
    assert all(torch.allclose(final[k], mean[k], atol=1e-6) for k in mean)
    assert not torch.allclose(final["net.0.weight"], record.ends[3]["net.0.weight"])
    # validation: the epoch's own weights before the averaging, from epoch 2 on the average up to and
    # including the epoch just trained
    assert all(torch.equal(record.validated[e][k], record.ends[e][k]) for e in (0, 1, 2) for k in mean)
    assert all(torch.allclose(record.validated[3][k], mean[k], atol=1e-6) for k in mean)
    saved = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert torch.allclose(saved["net.0.weight"], mean["net.0.weight"], atol=1e-6)


def test_fit_passes_over_the_deprecation_lightning_meets_in_torch(tmp_path):
    """Every training run printed a line of Lightning's own source path about a torch pytree class it uses
    (`isinstance(treespec, LeafSpec)` is deprecated); the user can do nothing about it. Other warnings still show."""
    from torch.utils.data import DataLoader, TensorDataset

    from pellucid.core.trainer import fit, make_trainer

    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,))), batch_size=16)
    trainer = make_trainer(max_epochs=1, accelerator="cpu", devices=1, default_root_dir=tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(trainer, _tiny_module(), loader, loader)
        warnings.warn("a warning of the run's own", UserWarning)
    texts = [str(w.message) for w in caught]
    assert not [t for t in texts if "LeafSpec" in t], texts
    assert "a warning of the run's own" in texts


def test_uses_cuda_follows_the_accelerator_flag():
    from pellucid.core.trainer import uses_cuda

    assert uses_cuda("gpu") and uses_cuda("cuda") and not uses_cuda("cpu")
    assert uses_cuda("auto") == torch.cuda.is_available()


def _logits(y: np.ndarray, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    out = torch.randn(len(y), 2, generator=g)
    out[torch.arange(len(y)), torch.as_tensor(y)] += 1.5
    return out


def test_score_split_writes_metrics_and_plots_and_fills_the_card_entries(tmp_path):
    from pellucid.core.scoring import score_split

    y_val, y_test = np.array([0, 1] * 10), np.array([1, 0, 0, 1] * 5)
    cal, threshold, metrics = score_split(_logits(y_val, 0), y_val, _logits(y_test, 1), y_test, ["normal", "tb"],
                                          tmp_path, positive_index=1, positive_class="tb", policy="sensitivity",
                                          target_sensitivity=0.9, n_boot=20, seed=0)
    assert cal["method"] == "temperature" and cal["temperature"] > 0
    assert threshold["policy"] == "sensitivity" and threshold["positive_class"] == "tb"
    assert threshold["target_sensitivity"] == 0.9 and 0 <= threshold["value"] <= 1
    assert metrics["threshold"] == threshold["value"] and metrics["n"] == len(y_test)
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    for name in ("roc.png", "confusion.png", "reliability.png"):
        assert (tmp_path / "plots" / name).stat().st_size > 0


def test_score_split_says_when_a_validation_part_ranked_all_right_was_smoothed(tmp_path):
    from pellucid.core.scoring import score_split

    y_val, y_test = np.array([0, 1] * 6), np.array([1, 0, 0, 1] * 5)
    val = torch.nn.functional.one_hot(torch.as_tensor(y_val), 2).float() * 3.0  # all 12 ranked right
    cal, _, _ = score_split(val, y_val, _logits(y_test, 1), y_test, ["a", "b"], tmp_path, positive_index=1,
                            positive_class="b", n_boot=10)
    assert cal["label_smoothing"] == 1 / 13 and "all 12 validation images were ranked right" in cal["note"]
    assert 0.5 < cal["temperature"] < 10  # finite and no sharper than the logits (the plain fit went to ~0)
    final, _, _ = score_split(val, y_val, val[:0], y_val[:0], ["a", "b"], tmp_path / "final", positive_index=1,
                              positive_class="b")  # a final fit keeps its own note beside this one
    assert final["note"].startswith("no test part") and "label smoothing 1/13" in final["note"]
    # a validation part with an image ranked wrong: the plain fit, and nothing recorded
    noisy = _logits(y_val, 0)
    assert (noisy.argmax(1).numpy() != y_val).any()
    mixed, _, _ = score_split(noisy, y_val, _logits(y_test, 1), y_test, ["a", "b"], tmp_path, positive_index=1,
                              positive_class="b", n_boot=10)
    assert "label_smoothing" not in mixed and "note" not in mixed


def test_score_split_with_one_class_in_validation_keeps_argmax(tmp_path):
    from pellucid.core.scoring import score_split

    y_val, y_test = np.zeros(8, dtype=int), np.array([0, 1] * 4)
    with pytest.warns(UserWarning, match="validation split has only one class"):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*bootstrap resamples.*")
            _, threshold, metrics = score_split(_logits(y_val, 2), y_val, _logits(y_test, 3), y_test, ["a", "b"],
                                                tmp_path, positive_index=1, positive_class="b", policy="youden",
                                                n_boot=10)
    assert threshold == {"policy": "argmax", "value": None, "positive_class": "b", "target_sensitivity": None}
    assert metrics["threshold"] is None


# ----------------------------------------------------------------------------- experiment tracking
_METRICS = {"n": 40, "metrics": {"accuracy": {"value": 0.75, "low": 0.6, "high": 0.86, "interval": "wilson"},
                                 "auroc": {"value": 0.8, "low": None, "high": None, "note": "too few"},
                                 "f1": {"value": float("nan")}}}


def _fake_model_folder(root):
    out = root / "model"
    (out / "plots").mkdir(parents=True)
    (out / "metrics.json").write_text(json.dumps(_METRICS))
    (out / "card.json").write_text('{"task": "x", "classes": ["a", "b"]}')
    (out / "plots" / "roc.png").write_bytes(b"\x89PNG")
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "last.ckpt").write_bytes(b"big")
    return out


def test_final_metrics_flatten_values_and_interval_ends_and_skip_nan():
    from pellucid.core.trainer import final_metrics

    assert final_metrics(_METRICS) == {"test_accuracy": 0.75, "test_accuracy_low": 0.6, "test_accuracy_high": 0.86,
                                       "test_auroc": 0.8, "test_n": 40.0}


def test_make_logger_kinds_and_refusals(tmp_path, monkeypatch):
    import importlib.util

    from lightning.pytorch.loggers import CSVLogger

    from pellucid.core.trainer import TrackingError, make_logger, make_trainer

    assert isinstance(make_logger("csv", tmp_path), CSVLogger)
    with pytest.raises(KeyError, match="Did you mean 'mlflow'"):
        make_logger("mlflw", tmp_path)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(TrackingError, match="--logger mlflow needs the mlflow package: pip install mlflow"):
        make_trainer(max_epochs=1, accelerator="cpu", log_dir=tmp_path, logger="mlflow")


def test_log_run_csv_without_a_trainer_logs_params_and_final_metrics(tmp_path):
    from pellucid.core.trainer import log_run

    out = _fake_model_folder(tmp_path)
    made = log_run(out, {"backbone": "test_resnet", "members": [{"backbone": "a"}], "extra": {"seed": 1}})
    rows = (out / "logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header, last = rows[0].split(","), rows[-1].split(",")
    assert float(last[header.index("test_accuracy_low")]) == 0.6 and "test_f1" not in header
    hparams = (out / "logs" / "version_0" / "hparams.yaml").read_text()
    assert "backbone: test_resnet" in hparams and "extra.seed: 1" in hparams
    assert made.log_dir == str(out / "logs" / "version_0")


def test_tensorboard_logger_records_epochs_and_final_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pellucid.core.trainer import log_run, make_trainer

    out = _fake_model_folder(tmp_path)
    trainer = make_trainer(max_epochs=1, accelerator="cpu", log_dir=out, logger="tensorboard")
    trainer.logger.log_metrics({"val_loss": 0.5}, step=0)  # what Lightning logs each epoch
    log_run(out, {"lr": 0.001}, kind="tensorboard")  # continues the trainer's logger: one version
    runs = sorted((out / "logs").iterdir())
    assert [r.name for r in runs] == ["version_0"]
    events = EventAccumulator(str(runs[0]))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"val_loss", "test_accuracy", "test_accuracy_low", "test_accuracy_high"} <= tags
    assert events.Scalars("test_accuracy")[-1].value == pytest.approx(0.75)


@pytest.mark.timeout(120)
def test_mlflow_run_gets_params_metrics_plots_and_the_model_folder(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from pellucid.core.trainer import log_run, tracking_uri

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    assert tracking_uri() == (tmp_path / "mlruns").as_uri()
    out = _fake_model_folder(tmp_path)
    made = log_run(out, {"backbone": "test_resnet", "epochs": 0}, kind="mlflow", experiment="pets")
    client = MlflowClient(tracking_uri())
    run = client.get_run(made.run_id)
    assert client.get_experiment(run.info.experiment_id).name == "pets" and run.info.run_name == "model"
    assert run.data.params["backbone"] == "test_resnet"
    assert run.data.metrics["test_accuracy_high"] == pytest.approx(0.86)
    artifacts = {a.path for a in client.list_artifacts(made.run_id, "model")} | \
        {a.path for a in client.list_artifacts(made.run_id, "plots")}
    assert {"model/metrics.json", "model/card.json", "plots/roc.png"} <= artifacts
    assert not any("ckpt" in a for a in artifacts)  # checkpoints stay out
