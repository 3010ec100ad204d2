"""The one place pellucid builds a Lightning ``Trainer``, and the one module that imports Lightning.

:func:`make_trainer` holds the choices every training loop in the project shares: no model summary,
no sanity validation, bf16-mixed precision only when asked for *and* on CUDA (32-bit otherwise),
a CSV log under ``<log_dir>/logs/version_N`` or no logger at all, checkpointing on exactly when the
caller hands in a :class:`ModelCheckpoint`, and a tqdm progress bar (refresh every step) or none.
:func:`seed_everything` seeds Python, NumPy, torch and the loader workers the same way for every
loop, and :func:`quiet_warnings` silences Lightning hints that are noise for a given loop.
:func:`fit` runs ``Trainer.fit`` and, when it continues from a checkpoint, has Lightning load it
with ``weights_only=True`` (Lightning passes None to ``torch.load`` otherwise, leaving the choice to
torch's default); callers check the checkpoint themselves first (see
:func:`pellucid.core.training.check_checkpoint`).

Its users are classifier training (:mod:`pellucid.core.training`), the lung segmenter
(:mod:`pellucid.core.segmentation`), episodic few-shot fine-tuning
(:mod:`pellucid.core.fewshot.finetune`) and the T-TAME attention (:mod:`pellucid.explain.ttame`).
Lightning is imported here at module level: importing this module is the cost of training. Modules
that also serve inference (training's ``TrainConfig``, segmentation's ``LungMasker``, the T-TAME
explainer) import it inside the functions that train, so predicting never loads Lightning; they take
the Lightning classes they subclass (:class:`LightningModule`, :class:`Callback`) from here too.
"""
from __future__ import annotations

import inspect
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger

__all__ = [
    "make_trainer", "fit", "seed_everything", "quiet_warnings", "uses_cuda", "FEW_WORKERS_WARNING",
    "LightningModule", "Callback", "EarlyStopping", "ModelCheckpoint",
]

LightningModule = L.LightningModule

#: Lightning's hint that a DataLoader has few workers: noise when batches come from cached tensors.
FEW_WORKERS_WARNING = ".*does not have many workers.*"


def uses_cuda(accelerator: str | None) -> bool:
    """Whether a Trainer with this ``accelerator`` flag runs on CUDA (``"auto"``: when CUDA is there)."""
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch, and the DataLoader workers, quietly (Lightning's own seeding)."""
    L.seed_everything(seed, workers=True, verbose=False)


@contextmanager
def quiet_warnings(*messages: str) -> Iterator[None]:
    """Ignore warnings whose text matches any of the ``messages`` regexes inside the block."""
    with warnings.catch_warnings():
        for message in messages:
            warnings.filterwarnings("ignore", message=message)
        yield


def make_trainer(*, max_epochs: int, accelerator: str = "auto", devices: Any = "auto", num_nodes: int = 1,
                 strategy: Any = "auto", bf16: bool = False, callbacks: Sequence[Callback] = (),
                 log_dir: str | Path | None = None, progress: bool = False, log_every_n_steps: int | None = None,
                 default_root_dir: str | Path | None = None, deterministic: bool | None = False,
                 **extra: Any) -> L.Trainer:
    """A Lightning ``Trainer`` with the project's shared settings.

    Args:
        max_epochs: epochs to run at most.
        accelerator, devices, num_nodes, strategy: as for ``lightning.Trainer``.
        bf16: train in ``"bf16-mixed"`` precision when the trainer runs on CUDA (see :func:`uses_cuda`);
            everywhere else, and when False, ``"32-true"``.
        callbacks: Lightning callbacks; checkpointing is enabled exactly when one of them is a
            :class:`ModelCheckpoint` (so no default checkpoint is ever written behind the caller's back).
        log_dir: write a CSV log to ``log_dir/logs/version_N`` (one version per run, a resumed run
            included); None: no logger.
        progress: show a tqdm progress bar refreshed every step.
        log_every_n_steps: logging interval in steps (None: Lightning's default).
        default_root_dir: Lightning's root folder (None: the working directory).
        deterministic: passed to Lightning, which calls ``torch.use_deterministic_algorithms`` with it
            unless it is None (None leaves torch's global setting alone).
        **extra: any other ``lightning.Trainer`` argument, passed through.

    Returns:
        The ``lightning.Trainer``.
    """
    callbacks = list(callbacks)
    if progress and not any(isinstance(c, TQDMProgressBar) for c in callbacks):
        callbacks.append(TQDMProgressBar(refresh_rate=1))
    options: dict[str, Any] = {
        "max_epochs": max_epochs, "accelerator": accelerator, "devices": devices, "num_nodes": num_nodes,
        "strategy": strategy, "precision": "bf16-mixed" if bf16 and uses_cuda(accelerator) else "32-true",
        "logger": CSVLogger(str(log_dir), name="logs") if log_dir is not None else False,
        "callbacks": callbacks, "enable_checkpointing": any(isinstance(c, ModelCheckpoint) for c in callbacks),
        "enable_progress_bar": progress, "enable_model_summary": False, "num_sanity_val_steps": 0,
        "default_root_dir": None if default_root_dir is None else str(default_root_dir),
        "deterministic": deterministic,
    }
    if log_every_n_steps is not None:
        options["log_every_n_steps"] = log_every_n_steps
    options.update(extra)
    return L.Trainer(**options)


def fit(trainer: L.Trainer, module: L.LightningModule, train_dataloaders: Any = None, val_dataloaders: Any = None,
        *, ckpt_path: str | Path | None = None) -> None:
    """``trainer.fit``; a checkpoint to continue from is loaded with ``weights_only=True``.

    Lightning versions whose ``fit`` has no ``weights_only`` argument leave it to ``torch.load``,
    whose default is ``weights_only=True`` from torch 2.6 on (the version pellucid requires).
    """
    kwargs: dict[str, Any] = {}
    if ckpt_path is not None:
        kwargs["ckpt_path"] = str(ckpt_path)
        if "weights_only" in inspect.signature(trainer.fit).parameters:
            kwargs["weights_only"] = True
    trainer.fit(module, train_dataloaders, val_dataloaders, **kwargs)
