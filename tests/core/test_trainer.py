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
