"""The one place pellucid builds a Lightning ``Trainer``, and the one module that imports Lightning.

:func:`make_trainer` holds the choices every training loop in the project shares: no model summary,
no sanity validation, bf16-mixed precision only when asked for *and* on CUDA (32-bit otherwise),
one experiment logger (:func:`make_logger`: Lightning's CSV log under ``<log_dir>/logs/version_N``,
TensorBoard under ``<log_dir>/logs/version_N``, or an MLflow run) or none, checkpointing on exactly when the
caller hands in a :class:`ModelCheckpoint`, and a tqdm progress bar (refresh every step) or none.
:func:`seed_everything` seeds Python, NumPy, torch and the loader workers the same way for every
loop, and :func:`quiet_warnings` silences Lightning hints that are noise for a given loop.
:func:`fit` runs ``Trainer.fit`` and, when it continues from a checkpoint, has Lightning load it
with ``weights_only=True`` (Lightning passes None to ``torch.load`` otherwise, leaving the choice to
torch's default); callers check the checkpoint themselves first (see
:func:`pellucid.core.training.check_checkpoint`). :func:`log_run` finishes a training run's record in
the same logger: the resolved configuration, the final test metrics with their intervals and, for
MLflow, the plots and the model folder as artifacts (also for a run that never called ``fit``).

MLflow reads its server from the standard ``MLFLOW_TRACKING_URI``; without it, runs go to
``./mlruns`` (a file store in the current folder; ``mlflow ui --backend-store-uri ./mlruns``
shows them) and the experiment is the task's name (``MLFLOW_EXPERIMENT_NAME`` overrides it).

Its users are classifier training (:mod:`pellucid.core.training`), the lung segmenter
(:mod:`pellucid.core.segmentation`), episodic few-shot fine-tuning
(:mod:`pellucid.core.fewshot.finetune`) and the T-TAME attention (:mod:`pellucid.explain.ttame`).
Lightning is imported here at module level: importing this module is the cost of training. Modules
that also serve inference (training's ``TrainConfig``, segmentation's ``LungMasker``, the T-TAME
explainer) import it inside the functions that train, so predicting never loads Lightning; they take
the Lightning classes they subclass (:class:`LightningModule`, :class:`Callback`) from here too.
"""
from __future__ import annotations

import importlib.util
import inspect
import json
import logging
import math
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.callbacks.weight_averaging import EMAWeightAveraging, WeightAveraging
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger

from pellucid.core.runs import TrainingError
from pellucid.registry import unknown_name_error

__all__ = [
    "make_trainer", "fit", "seed_everything", "quiet_warnings", "uses_cuda", "FEW_WORKERS_WARNING", "LEAFSPEC_WARNING",
    "LightningModule", "Callback", "EarlyStopping", "ModelCheckpoint", "LOGGERS", "TrackingError",
    "make_logger", "log_run", "tracking_uri", "final_metrics", "ema_callback", "swa_callback",
    "swa_start_epoch", "snapshot_every",
]

log = logging.getLogger(__name__)

#: Experiment loggers ``--logger`` accepts, and the package each needs.
LOGGERS: dict[str, str | None] = {"csv": None, "tensorboard": "tensorboard", "mlflow": "mlflow"}


class TrackingError(ValueError):
    """An experiment logger that cannot be used here (its package is missing)."""

LightningModule = L.LightningModule

#: Lightning's hint that a DataLoader has few workers: noise when batches come from cached tensors.
FEW_WORKERS_WARNING = ".*does not have many workers.*"
#: Lightning's batch flattening calls a torch 2.14 pytree class that torch deprecates: one line of Lightning's source
#: path and line under every training run, about code the user cannot change
LEAFSPEC_WARNING = r".*LeafSpec.*is deprecated.*"


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
                 logger: str = "csv", experiment: str | None = None, **extra: Any) -> L.Trainer:
    """A Lightning ``Trainer`` with the project's shared settings.

    Args:
        max_epochs: epochs to run at most.
        accelerator, devices, num_nodes, strategy: as for ``lightning.Trainer``.
        bf16: train in ``"bf16-mixed"`` precision when the trainer runs on CUDA (see :func:`uses_cuda`);
            everywhere else, and when False, ``"32-true"``.
        callbacks: Lightning callbacks; checkpointing is enabled exactly when one of them is a
            :class:`ModelCheckpoint` (so no default checkpoint is ever written behind the caller's back).
        log_dir: log the run under ``log_dir`` (``log_dir/logs/version_N``, one version per run, a
            resumed run included; MLflow: a run named after the folder); None: no logger.
        logger: which experiment logger, one of :data:`LOGGERS` (see :func:`make_logger`).
        experiment: the MLflow experiment (default ``MLFLOW_EXPERIMENT_NAME``, else ``"pellucid"``).
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
        "logger": make_logger(logger, log_dir, experiment=experiment) if log_dir is not None else False,
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
    with quiet_warnings(LEAFSPEC_WARNING):
        trainer.fit(module, train_dataloaders, val_dataloaders, **kwargs)


def ema_callback(time_constant_steps: float, start_step: int = 0) -> Callback:
    """Lightning's exponential moving average of the weights (and BatchNorm statistics) with a time
    constant of ``time_constant_steps`` optimizer steps (decay ``1 - 1 / steps``), updated from
    ``start_step`` on. Validation, the checkpoints (``state_dict``) and the weights left at the end of
    training are the averaged ones; the raw weights ride along in the checkpoint to resume from."""
    decay = 1.0 - 1.0 / max(1.0, float(time_constant_steps))
    return EMAWeightAveraging(decay=decay, update_starting_at_step=max(0, int(start_step)))


class _EpochEndAverage(WeightAveraging):
    """Lightning's weight averaging with an equal weight for the weights at the end of each epoch from
    ``start_epoch`` (0-based) on, taken after the epoch's last step, before its validation. Until the
    first of them is in the average, validation, checkpoints and the weights at the end see the trained
    weights, not the untouched copy the average starts as."""

    def __init__(self, start_epoch: int):
        super().__init__(use_buffers=True)
        self.start_epoch = max(0, int(start_epoch))
        self._swapped = False  # validation runs on the average (swapped in at its start)

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return False  # the update is in on_train_batch_end, after an epoch's last step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        # after the last step of the epoch and before its validation (Lightning validates before
        # on_train_epoch_end), so validation and the checkpoints include this epoch's weights
        if batch_idx + 1 == trainer.num_training_batches and trainer.current_epoch >= self.start_epoch:
            self._average_model.update_parameters(pl_module)

    def _averaging(self) -> bool:
        return self._average_model is not None and int(self._average_model.n_averaged) > 0

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._swapped = self._averaging()
        if self._swapped:
            self._swap_models(pl_module)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self._swapped:
            self._swap_models(pl_module)
            self._swapped = False

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if self._averaging():
            super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._averaging():
            super().on_train_end(trainer, pl_module)


def swa_callback(start_epoch: int) -> Callback:
    """Stochastic weight averaging (Izmailov et al., 2018): the equal average of the weights (and
    BatchNorm statistics) at the end of each epoch from ``start_epoch`` (0-based) on, through
    Lightning's :class:`WeightAveraging`. The learning-rate schedule is the caller's (training holds
    it constant over the averaged epochs). Validation, the checkpoints and the weights left at the
    end are the average once it holds one epoch's weights, the trained weights before."""
    return _EpochEndAverage(start_epoch)


# ----------------------------------------------------------------------------- experiment tracking
_RUN_LOGGERS: dict[str, Logger] = {}  # log_dir → the logger of its latest trainer (log_run continues it)


def tracking_uri() -> str:
    """MLflow's tracking URI: ``MLFLOW_TRACKING_URI``, else the file store ``./mlruns``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or (Path.cwd() / "mlruns").as_uri()


def _require(kind: str) -> None:
    package = LOGGERS[kind]
    present = package is None or importlib.util.find_spec(package) is not None or (
        kind == "tensorboard" and importlib.util.find_spec("tensorboardX") is not None)
    if not present:
        raise TrackingError(f"--logger {kind} needs the {package} package: pip install {package} "
                            f"(or pip install 'pellucid[tracking]'), or use --logger csv")


def make_logger(kind: str, log_dir: str | Path, *, experiment: str | None = None) -> Logger:
    """A Lightning experiment logger for a run whose outputs go to ``log_dir``.

    Args:
        kind: ``"csv"`` (``log_dir/logs/version_N/metrics.csv``), ``"tensorboard"`` (event files in
            ``log_dir/logs/version_N``) or ``"mlflow"`` (a run named after ``log_dir`` in
            :func:`tracking_uri`, experiment ``MLFLOW_EXPERIMENT_NAME`` or ``experiment``).
        log_dir: the run's output folder.
        experiment: MLflow experiment name when ``MLFLOW_EXPERIMENT_NAME`` is unset (default "pellucid").

    Raises:
        KeyError: an unknown ``kind`` (did-you-mean). TrackingError: its package is not installed.
    """
    if kind not in LOGGERS:
        raise unknown_name_error("logger", kind, LOGGERS)
    _require(kind)
    if kind == "csv":
        made: Logger = CSVLogger(str(log_dir), name="logs")
    elif kind == "tensorboard":
        made = TensorBoardLogger(str(log_dir), name="logs", default_hp_metric=False)
    else:
        uri = tracking_uri()
        if uri.startswith("file:") and "MLFLOW_TRACKING_URI" not in os.environ:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for this opt-in
        made = MLFlowLogger(experiment_name=os.environ.get("MLFLOW_EXPERIMENT_NAME") or experiment or "pellucid",
                            run_name=Path(log_dir).resolve().name, tracking_uri=uri)
    _RUN_LOGGERS[str(Path(log_dir).resolve())] = made
    return made


def _flat_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config → ``{"a.b": value}`` with lists as JSON text (every logger takes these)."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flat_params(value, prefix=f"{name}."))
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(value, default=str)
        else:
            out[name] = value if isinstance(value, (int, float, str, bool)) or value is None else str(value)
    return out


def final_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """``metrics.json`` of a model folder → flat ``test_<name>`` values with ``_low`` / ``_high``
    interval ends (NaN and missing entries left out)."""
    flat: dict[str, float] = {}
    for name, entry in (metrics.get("metrics") or {}).items():
        entry = entry if isinstance(entry, Mapping) else {"value": entry}
        for suffix, key in (("", "value"), ("_low", "low"), ("_high", "high")):
            value = entry.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                flat[f"test_{name}{suffix}"] = float(value)
    if isinstance(metrics.get("n"), int):
        flat["test_n"] = float(metrics["n"])
    return flat


def log_run(out: str | Path, params: Mapping[str, Any], *, kind: str = "csv", experiment: str | None = None) -> Logger:
    """Finish the experiment record of the training run that wrote the model folder ``out``.

    Continues the logger of the run's last trainer (:func:`make_trainer` with ``log_dir=out``), or
    makes one when no trainer ran (a linear-probe-only run), and logs ``params`` (the resolved
    configuration), the final test metrics with their intervals from ``out/metrics.json`` (see
    :func:`final_metrics`) and, for MLflow, ``out/plots`` and the model folder (weights, card,
    metrics, split; not checkpoints or logs) as artifacts.

    Returns:
        The logger (finalized).
    """
    out = Path(out)
    made = _RUN_LOGGERS.pop(str(out.resolve()), None) or make_logger(kind, out, experiment=experiment)
    _RUN_LOGGERS.pop(str(out.resolve()), None)
    made.log_hyperparams(_flat_params(params))
    path = out / "metrics.json"
    metrics = json.loads(path.read_text()) if path.is_file() else {}
    flat = final_metrics(metrics)
    if flat:
        made.log_metrics(flat)
    if isinstance(made, MLFlowLogger):
        client, run = made.experiment, made.run_id
        for f in sorted(out.iterdir()):
            if f.is_file():
                client.log_artifact(run, str(f), "model")
        if (out / "plots").is_dir():
            client.log_artifacts(run, str(out / "plots"), "plots")
    made.finalize("success")
    log.info("run logged with %s (%d final metrics)%s", type(made).__name__, len(flat),
             f" to {tracking_uri()}" if isinstance(made, MLFlowLogger) else f" in {getattr(made, 'log_dir', out)}")
    return made


def swa_start_epoch(cfg) -> int:
    """The first averaged epoch (0-based) of stochastic weight averaging (``cfg.swa`` > 0): the
    epochs from ``round(swa * epochs)`` on, kept between the second epoch (the first holds the
    warm-up) and the last. From its first step the learning rate stays where the warm-up cosine schedule is then, and the
    weights at the end of each of these epochs are averaged with equal weight."""
    return min(cfg.epochs - 1, max(1, round(cfg.swa * cfg.epochs)))


def snapshot_every(cfg) -> int:
    """The length in epochs of each learning-rate cycle of a snapshot ensemble (``cfg.snapshots`` >= 2
    cycles over ``cfg.epochs``, a multiple of it): the weights at the end of each cycle become one
    member of the ensemble the run writes (Huang et al., 2017, "Snapshot ensembles: train 1, get M for
    free"). The warm-up cosine schedule restarts at the full rate at the start of every cycle.

    Raises:
        TrainingError: the snapshots do not divide the epochs, or the run trains no weights.
    """
    k = int(cfg.snapshots)
    if k < 2 or cfg.epochs < k or cfg.epochs % k:
        raise TrainingError(f"snapshots = {cfg.snapshots} needs at least 2 cycles and a number of epochs that is a "
                            f"multiple of it, got epochs = {cfg.epochs}; set epochs to a multiple or snapshots = 0")
    if cfg.finetune == "linear-probe":
        raise TrainingError("snapshots need a fine-tune (the linear probe trains once); set snapshots = 0")
    if cfg.ema or cfg.swa:
        raise TrainingError("snapshots, ema and swa are three ways to combine the weights of one run; set one of them")
    return cfg.epochs // k
