"""Training, validation and testing of a task model, on Lightning, ending in a model folder.

:func:`train` is what ``pellucid train TASK`` runs: read the samples, make a grouped stratified
split, decode every image once, build the backbone with its recorded weight source, fit the head on
cached frozen features (linear probe), then — for ``full`` and ``progressive`` — fine-tune with a
Lightning ``Trainer`` (AdamW, linear warm-up + cosine schedule, early stopping, CSV logs, progress
bar, checkpoints to resume from, bf16 autocast and channels-last on GPU, DDP through
``--devices/--num-nodes/--strategy``). Then calibrate on validation (temperature scaling), choose the
threshold by the task's policy on validation, score the held-out test split with bootstrap intervals,
draw the plots, and write the model folder. A fine-tune may average its weights (``ema``, ``swa``) or
write a snapshot ensemble (``snapshots``: the cosine schedule restarts that many times and the weights
at the end of each cycle become one calibrated member of an ensemble folder).

Runs never mix. Before any work :func:`check_run_folder` checks the output folder and the data
folder (one-line :class:`TrainingError` for an ``out`` that is a file or cannot be written, a data
folder that cannot be read, a damaged or foreign checkpoint) and compares the run's identity —
task, resolved data folder, seed and the hash of the resolved configuration without the keys that
only say where and how long a run goes (:data:`NOT_IDENTITY`) — with the ``run.json`` of the run the
folder already holds:

* an empty or new folder: the run starts there;
* the same run (an interrupted or finished one): by default (``resume="auto"``) it continues from
  ``checkpoints/last.ckpt``, after checking that the checkpoint loads with ``weights_only=True`` and
  records this run's identity (every checkpoint pellucid writes carries it under ``"pellucid_run"``);
  ``resume=False`` (``--no-resume``) starts it over, dropping its checkpoints;
* another run: refused, unless ``overwrite`` (``--overwrite``), which first removes what pellucid
  wrote there (:data:`RUN_FILES`, :data:`RUN_DIRS`, ``fold_<i>/``) and nothing else. ``resume=True``
  (``--resume``) continues only the same run and refuses any other.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from pellucid.core.card import ModelCard, Preprocessing
from pellucid.core.finetune import Strategy, freeze_bn_of_frozen, get_strategy
from pellucid.core.model import Classifier, build_classifier
from pellucid.core.runtime import small_input_depthwise
from pellucid.core.runs import (_CHECKPOINT_KEY, _SHORT, NOT_IDENTITY, RUN_DIRS, RUN_FILE, RUN_FILES, RunFolder,
                                TrainingError, check_checkpoint, check_data_path, check_out_path, check_run_folder,
                                run_identity)
from pellucid.core.tasks import TaskSpec, get_task
from pellucid.core.train_checks import check_numbers
from pellucid.core.trainer import snapshot_every, swa_start_epoch
from pellucid.core.views import ViewAverage, check_tta
from pellucid.datasets.augment import get_augment, seed_worker_augment
from pellucid.datasets.samples import Sample, load_samples
from pellucid.datasets.splits import make_split, save_split
from pellucid.datasets.torchdata import CachedDataset, ImageCache

__all__ = ["TrainConfig", "train", "extract_features", "fit_head", "predict_logits", "TrainingError",
           "RunFolder", "check_run_folder", "run_identity", "check_checkpoint", "check_out_path", "check_data_path",
           "RUN_FILE", "RUN_FILES", "RUN_DIRS", "NOT_IDENTITY"]

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Everything that decides a training run; saved as ``config.json`` beside the outputs."""

    task: str
    data: str
    out: str
    backbone: str = "efficientnet_lite0"
    pretrained: Any = True
    checkpoint: str | None = None
    finetune: str = "progressive"
    epochs: int = 4
    probe_epochs: int = 40
    probe_flip: bool = False  # the linear probe also fits the mirrored training images (prediction unchanged)
    # inner layers of the backbone (e.g. "blocks.3") whose outputs, averaged over space, the linear probe reads
    # beside the pooled embedding (linear-probe recipes only; see pellucid.core.model.Classifier)
    probe_layers: list = field(default_factory=list)
    image_size: int = 224
    # the input size the saved model predicts at (0: image_size). A fine-tune on random resized crops sees objects
    # larger than a whole image at the same size shows them; predicting at a larger size undoes that ("FixRes",
    # Touvron et al., 2019). Calibration, threshold, test metrics and the out-of-domain reference use this size.
    test_size: int = 0
    # test-time views ("dihedral": the 8 rotations and mirror images; "flip"; "none"): the saved model averages its
    # logits over them at every door (pellucid.core.views). Calibration, threshold and test metrics use them too.
    tta: str = "none"
    batch_size: int = 32
    lr: float = 5e-4
    head_lr: float = 2e-3
    lr_decay: float = 0.5
    stages_per_epoch: int = 1
    max_stages: int = 3
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    dropout: float = 0.2
    patience: int = 4
    keep_probe_if_better: bool = True
    probe_patience: int = 2  # stop a fine-tune that has not beaten its probe's val loss after this many epochs (0: off)
    ema: float = 0.0  # exponential moving average of the fine-tuned weights, time constant in epochs (0: off)
    swa: float = 0.0  # stochastic weight averaging from this fraction of the epochs on (0: off), see swa_start_epoch
    snapshots: int = 0  # a snapshot ensemble of this many learning-rate cycles (0: off), see snapshot_every
    balance: str = "weights"
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    mixing: str = "none"
    split: str = "grouped"
    split_file: str | None = None
    members: list = field(default_factory=list)
    seed: int = 0
    num_workers: int = 0
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    resume: Any = "auto"  # "auto": continue an interrupted run of the same identity; True: only that; False: start over
    overwrite: bool = False  # replace another run's files in ``out``
    progress: bool = True
    max_images: int | None = None
    n_boot: int = 1000
    preprocess: str = "none"
    segmenter: str | None = None
    logger: str = "csv"  # experiment tracking: csv | tensorboard | mlflow (pellucid.core.trainer.make_logger)
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_task(cls, task: TaskSpec, data: str, out: str, **overrides) -> TrainConfig:
        known = set(cls.__dataclass_fields__)
        base = {k: v for k, v in task.recipe.items() if k in known}
        base["image_size"] = task.image_size
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(task=task.name, data=str(data), out=str(out), **base)


# ----------------------------------------------------------------------------- helpers
def _device_for(cfg: TrainConfig) -> torch.device:
    if cfg.accelerator in ("gpu", "cuda") or (cfg.accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def _cl(x: torch.Tensor) -> torch.Tensor:
    """Image batches in channels-last layout (faster convolutions on CPU and GPU, same numbers)."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


@torch.inference_mode()
def extract_features(model: Classifier, batches, device: torch.device | str = "cpu",
                     progress: bool = False, desc: str = "features") -> torch.Tensor:
    """Pooled backbone features ``(N, D)`` of an iterable of image batches ``(B, 3, S, S)``."""
    from tqdm.auto import tqdm

    was = model.training
    model.eval().to(device)
    out = []
    for x in tqdm(batches, desc=desc, disable=not progress, leave=False):
        x = x[0] if isinstance(x, (tuple, list)) else x
        out.append(model.features(_cl(x.to(device))).float().cpu())
    model.train(was)
    return torch.cat(out) if out else torch.zeros(0, model.spec.embedding_dim)


@torch.inference_mode()
def predict_logits(model: nn.Module, batches, device: torch.device | str = "cpu") -> torch.Tensor:
    """Logits ``(N, C)`` of an iterable of image batches (model in eval mode, restored after)."""
    was = model.training
    model.eval().to(device)
    out = [model(_cl(x[0].to(device) if isinstance(x, (tuple, list)) else x.to(device))).float().cpu()
           for x in batches]
    model.train(was)
    if not out:  # an empty part (a final fit has no test part)
        return torch.zeros(0, int(getattr(getattr(model, "head", None), "out_features", 0)
                                  or getattr(model, "num_classes", 0) or 0))
    return torch.cat(out)


def _class_weights(y: np.ndarray, n: int) -> torch.Tensor:
    counts = np.bincount(y, minlength=n).astype(np.float64)
    w = counts.sum() / np.maximum(counts, 1) / n
    return torch.tensor(w, dtype=torch.float32)


def fit_head(head: nn.Linear, feats: torch.Tensor, y: torch.Tensor, *, weight: torch.Tensor | None = None,
             l2_grid: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0), epochs: int = 40, label_smoothing: float = 0.0,
             val: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """Fit a linear head on cached features: full-batch L-BFGS on the convex weighted cross-entropy.

    A Lightning loop adds nothing to a convex fit on one in-memory tensor, so this is plain torch.
    Features are standardised inside (folded back into the head's weights afterwards). With a
    validation set, the L2 strength is chosen from ``l2_grid`` by validation loss.

    Returns:
        ``{"train_loss", "val_loss", "val_acc", "l2"}`` of the chosen fit.
    """
    mu, sd = feats.mean(0), feats.std(0).clamp_min(1e-6)
    z = (feats - mu) / sd

    def fit(lam: float) -> nn.Linear:
        lin = nn.Linear(feats.shape[1], head.out_features)
        nn.init.zeros_(lin.weight)
        nn.init.zeros_(lin.bias)
        opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=max(20, epochs * 5), history_size=20,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(lin(z), y, weight=weight, label_smoothing=label_smoothing)
            loss = loss + lam * lin.weight.pow(2).sum() / 2
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        return lin

    has_val = val is not None and len(val[1]) > 0
    grid = l2_grid if has_val else (l2_grid[len(l2_grid) // 2],)
    best = None
    for lam in grid:
        lin = fit(lam)
        with torch.no_grad():
            score = float(F.cross_entropy(lin((val[0] - mu) / sd), val[1])) if has_val else 0.0
        if best is None or score < best[0]:
            best = (score, lam, lin)
    _, lam, lin = best
    with torch.no_grad():
        w = lin.weight / sd
        head.weight.copy_(w)
        head.bias.copy_(lin.bias - (w * mu).sum(1))
        result = {"train_loss": float(F.cross_entropy(head(feats), y)), "l2": lam}
        if has_val:
            lv = head(val[0])
            result["val_loss"] = float(F.cross_entropy(lv, val[1]))
            result["val_acc"] = float((lv.argmax(1) == val[1]).float().mean())
    return result


def _batches(ds, batch_size: int):
    for i in range(0, len(ds), batch_size):
        items = [ds[j] for j in range(i, min(len(ds), i + batch_size))]
        yield torch.stack([t for t, _ in items])


# ----------------------------------------------------------------------------- Lightning module
def _history_callback():
    """A Lightning callback whose ``rows`` collect per-epoch numbers for the training-curve plot."""
    from pellucid.core.trainer import Callback

    class History(Callback):
        def __init__(self):
            self.rows: list[dict] = []

        # After the epoch's validation, when the epoch's own training loss has been reduced: recorded at
        # validation end, each row carried the previous epoch's train_loss and the first had none.
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.sanity_checking:
                return
            m = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
            row = {"epoch": trainer.current_epoch, **m}
            opt = trainer.optimizers[0] if trainer.optimizers else None
            if opt is not None:
                row["lr"] = max(g["lr"] for g in opt.param_groups)
            self.rows.append(row)

    return History()


def _beat_probe_callback(probe_val_loss: float, epochs: int):
    """Stop a fine-tune whose best validation loss has not gone below its linear probe's after
    ``epochs`` epochs: such a run ends with the probe kept anyway (see :func:`_keep_better`), so
    every further epoch is wasted time."""
    from pellucid.core.trainer import Callback

    class BeatProbe(Callback):
        def __init__(self):
            self.best = float("inf")
            self.stopped_at: int | None = None

        def on_validation_epoch_end(self, trainer, pl_module):
            if trainer.sanity_checking:
                return
            v = trainer.callback_metrics.get("val_loss")
            if v is not None and math.isfinite(float(v)):
                self.best = min(self.best, float(v))
            if trainer.current_epoch + 1 >= epochs and self.best > probe_val_loss:
                self.stopped_at = trainer.current_epoch
                log.warning("fine-tuning stopped after %d epoch(s): best val loss %.4f has not beaten the linear "
                            "probe's %.4f", trainer.current_epoch + 1, self.best, probe_val_loss)
                trainer.should_stop = True

    return BeatProbe()


def make_module(model: Classifier, strategy: Strategy, cfg: TrainConfig, class_weight: torch.Tensor | None,
                run: dict | None = None):
    """The LightningModule that fine-tunes ``model`` under ``strategy``; its checkpoints record the
    run identity ``run`` (default: :func:`run_identity` of ``cfg``) under ``"pellucid_run"``."""
    from pellucid.core.trainer import LightningModule

    stamp = {k: (run or run_identity(cfg))[k] for k in _SHORT}

    class ClassifierModule(LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model
            self.strategy = strategy
            self.register_buffer("class_weight", class_weight if class_weight is not None else torch.ones(model.num_classes))
            self.mix = None
            if cfg.mixing in ("cutmix", "mixup"):
                from torchvision.transforms import v2

                self.mix = (v2.CutMix if cfg.mixing == "cutmix" else v2.MixUp)(num_classes=model.num_classes)

        def forward(self, x):
            return self.model(x)

        def on_save_checkpoint(self, checkpoint):
            checkpoint[_CHECKPOINT_KEY] = dict(stamp)  # plain strings and ints: loads with weights_only=True

        def on_train_epoch_start(self):
            thawed = self.strategy.on_epoch_start(self.model, self.current_epoch)
            if thawed:
                log.info("epoch %d: thawed %s", self.current_epoch, ", ".join(thawed))
            freeze_bn_of_frozen(self.model, all_bn=self.strategy.bn_eval)

        def on_train_batch_start(self, batch, batch_idx):
            freeze_bn_of_frozen(self.model, all_bn=self.strategy.bn_eval)

        def training_step(self, batch, batch_idx):
            x, y = batch
            if self.mix is not None:
                x, soft = self.mix(x, y)
                logits = self.model(x)
                loss = torch.sum(-soft * F.log_softmax(logits, 1) * self.class_weight, 1).mean()
            else:
                logits = self.model(x)
                loss = F.cross_entropy(logits, y, weight=self.class_weight, label_smoothing=cfg.label_smoothing)
            self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            logits = self.model(x)
            self.log("val_loss", F.cross_entropy(logits, y), prog_bar=True, sync_dist=True)
            self.log("val_acc", (logits.argmax(1) == y).float().mean(), prog_bar=True, sync_dist=True)

        def configure_optimizers(self):
            groups = self.strategy.param_groups(self.model)
            opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
            total = max(1, int(self.trainer.estimated_stepping_batches))
            # a snapshot ensemble restarts the cosine at the full rate at the start of each cycle;
            # the warm-up is the first 10 % of the first cycle (of the whole run without snapshots)
            cycles = cfg.snapshots if cfg.snapshots >= 2 else 1
            cycle = total / cycles
            warmup = max(1, int(0.1 * cycle))

            # stochastic weight averaging: the rate holds where the cosine is when the averaged epochs begin
            hold = (swa_start_epoch(cfg) * total // max(1, cfg.epochs)) if cfg.swa > 0 else total

            def warmup_cosine(step: int) -> float:
                # A plain function, so a resumed run (even with more epochs) recomputes the schedule
                # from its own length instead of restoring a stale one from the checkpoint.
                if step < warmup:
                    return 0.1 + 0.9 * step / warmup
                c = min(cycles - 1, int(step // cycle))
                start, end = (warmup if c == 0 else c * cycle), (c + 1) * cycle
                progress = min(1.0, max(0, min(step, hold) - start) / max(1, end - start))
                return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))

            sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return ClassifierModule()


# ----------------------------------------------------------------------------- the pipeline
def _rank_zero() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0 and \
        int(os.environ.get("NODE_RANK", "0")) == 0


def train(cfg: TrainConfig) -> Path:
    """Run one training job end to end and write the model folder ``cfg.out``.

    Returns:
        The model folder path.
    """
    from pellucid.core.segmentation import LungMasker
    from pellucid.core.trainer import log_run, seed_everything

    t0 = time.time()
    check_numbers(cfg, TrainingError)  # sizes, epochs, rates, fractions: one line before any work
    try:
        tta = check_tta(cfg.tta)
    except ValueError as err:
        raise TrainingError(str(err)) from None
    if cfg.snapshots:
        snapshot_every(cfg)  # a one-line refusal of an impossible snapshot schedule, before any work
        if cfg.test_size:
            raise TrainingError("test_size and snapshots do not go together: a snapshot ensemble's members predict "
                                "at the training image_size; set one of them")
        if tta:
            raise TrainingError("tta and snapshots do not go together: a snapshot ensemble's members predict in one "
                                "view; set one of them")
    if not isinstance(cfg.probe_layers, (list, tuple)) or not all(isinstance(t, str) and t for t in cfg.probe_layers):
        raise TrainingError(f"probe_layers must be a list of layer names of the backbone, such as [\"blocks.3\"], "
                            f"got {str(cfg.probe_layers)[:80]}; fix the recipe")
    if cfg.probe_layers and cfg.finetune != "linear-probe":
        raise TrainingError(f"probe_layers is for linear-probe recipes (a frozen network's inner layers beside its "
                            f"embedding); this recipe fine-tunes ({cfg.finetune!r}): remove probe_layers or set "
                            f"finetune = \"linear-probe\"")
    folder = check_run_folder(cfg)  # one-line refusals before any work
    seed_everything(cfg.seed)
    task = get_task(cfg.task)
    out = Path(cfg.out)
    samples, split, labels = _prepare_split(cfg, task, out, folder)
    masker = LungMasker.from_settings(cfg.preprocess, cfg.segmenter)
    cache = ImageCache([s.path for s in samples], cfg.image_size, channels=task.channels, progress=cfg.progress,
                       preprocess=masker)
    try:
        model, weight_info = build_classifier(cfg.backbone, len(task.classes), pretrained=cfg.pretrained,
                                              checkpoint=cfg.checkpoint, dropout=cfg.dropout, taps=cfg.probe_layers)
    except ValueError as err:  # a probe layer the backbone does not have
        raise TrainingError(f"{err}; fix the recipe") from None
    strategy = get_strategy(cfg.finetune, lr=cfg.lr, head_lr=cfg.head_lr, weight_decay=cfg.weight_decay,
                            **({"stages_per_epoch": cfg.stages_per_epoch, "max_stages": cfg.max_stages,
                                "lr_decay": cfg.lr_decay} if cfg.finetune == "progressive" else {}))
    strategy.setup(model)
    device = _device_for(cfg)

    plain = {part: CachedDataset(cache, split[part], labels) for part in ("train", "val", "test")}
    for part, ds in plain.items():
        if len(ds) == 0 and (part != "test" or split[part]):  # a final fit has no test part by design
            raise TrainingError(f"the {part} split has no readable images; check {cfg.data}")
    y = {part: torch.as_tensor(ds.targets()) for part, ds in plain.items()}
    cw = _class_weights(y["train"].numpy(), len(task.classes)) if cfg.balance == "weights" else None

    history: list[dict] = []
    probe_info = _linear_probe(model, plain, y, cw, cfg, device, history) if strategy.probe_first else {}
    trainer_info: dict = {}
    if probe_info.get("val_loss") is not None:
        cfg = replace(cfg, extra={**cfg.extra, "probe_val_loss": probe_info["val_loss"]})
    if strategy.needs_images and cfg.epochs > 0:
        probe_state = ({k: v.detach().clone() for k, v in model.state_dict().items()}
                       if cfg.keep_probe_if_better and probe_info.get("val_loss") is not None else None)
        trainer_info = _fine_tune(model, strategy, cfg, cache, split, labels, cw, out, history, folder)
        if not _rank_zero():
            return out
        snapshots = trainer_info.pop("snapshots", None)
        if snapshots is not None:
            return _snapshot_ensemble(cfg, task, model, snapshots, weight_info, split, plain, y, cache, masker,
                                      device, history, {**trainer_info, "linear_probe": probe_info}, t0)
        trainer_info.update(_keep_better(model, probe_state, probe_info, history))

    if cfg.test_size and cfg.test_size != cfg.image_size:  # the folder predicts at test_size: read every part at it
        cache = ImageCache([s.path for s in samples], cfg.test_size, channels=task.channels, progress=cfg.progress,
                           preprocess=masker)
        plain = {part: CachedDataset(cache, split[part], labels) for part in ("train", "val", "test")}
        y = {part: torch.as_tensor(ds.targets()) for part, ds in plain.items()}
    # ---- evaluation on rank zero: calibrate on val, threshold on val, score on test (through the views, if any)
    scored = ViewAverage(model, tta) if tta else model
    cal, threshold, test_metrics = _evaluate(scored, plain, y, task, cfg, device, out, history)
    seconds = round(time.time() - t0, 1)
    card = _card(cfg, task, model, weight_info, cal, threshold, test_metrics, split, plain,
                 training={"finetune": cfg.finetune, "epochs": cfg.epochs, "seconds": seconds, "device": str(device),
                           "linear_probe": probe_info, **trainer_info, "data": str(Path(cfg.data).resolve()),
                           "skipped_files": [f"{p}: {e}" for p, e in cache.failures]})
    if masker is not None:
        # predict / explain / report / UI re-run the chain
        card.preprocessing = Preprocessing.from_dict({**card.preprocessing.to_dict(), **masker.card_entry()})
    card.preprocessing.tta = tta or None
    _write_model_folder(out, model, card, plain, cfg, cache)
    log_run(out, asdict(cfg), kind=cfg.logger, experiment=cfg.task)  # params, final metrics, artifacts
    log.info("model folder %s written in %.0f s", out, seconds)
    return out


def _snapshot_ensemble(cfg: TrainConfig, task: TaskSpec, model: Classifier, snapshots: list[dict], weight_info: dict,
                       split: dict, plain: dict, y: dict, cache: ImageCache, masker, device: torch.device,
                       history: list[dict], trainer_info: dict, t0: float) -> Path:
    """Write a snapshot ensemble: each snapshot a full model folder (calibrated on validation, scored on
    test, with its out-of-domain reference) under ``cfg.out/members/``, and ``cfg.out`` the equal-weight
    ensemble of them, calibrated and scored on the same partition."""
    import shutil

    from pellucid.core.card import write_card
    from pellucid.core.ensemble import build_ensemble
    from pellucid.core.modelfolder import read_card
    from pellucid.core.trainer import log_run

    out = Path(cfg.out)
    if not snapshots:  # a run that ended before its first cycle did (it cannot stop early otherwise)
        raise TrainingError(f"{out}: the fine-tune ended before the end of its first cycle, so it has no snapshot; "
                            "run it again with --no-resume")
    dirs = []
    for i, snap in enumerate(snapshots):
        member = out / "members" / f"snapshot{i + 1}_epoch{snap['epoch'] + 1}"
        member.mkdir(parents=True, exist_ok=True)
        shutil.copy2(out / "split.json", member / "split.json")
        model.load_state_dict(snap["state"])
        cal, threshold, test_metrics = _evaluate(model, plain, y, task, cfg, device, member, history)
        card = _card(cfg, task, model, weight_info, cal, threshold, test_metrics, split, plain,
                     training={"finetune": cfg.finetune, "epochs": snap["epoch"] + 1, "device": str(device),
                               "snapshot": i + 1, "of_snapshots": len(snapshots), **trainer_info,
                               "data": str(Path(cfg.data).resolve()), "seconds": round(time.time() - t0, 1)})
        if masker is not None:
            card.preprocessing = Preprocessing.from_dict({**card.preprocessing.to_dict(), **masker.card_entry()})
        _write_model_folder(member, model, card, plain, cfg, cache)
        dirs.append(member)
    folder = build_ensemble(dirs, out, n_boot=cfg.n_boot, seed=cfg.seed, copy=False,
                            training={"kind": f"snapshot ensemble of {len(dirs)} cycles of one fine-tune",
                                      "finetune": cfg.finetune, "epochs": cfg.epochs, **trainer_info,
                                      "data": str(Path(cfg.data).resolve()),
                                      "skipped_files": [f"{p}: {e}" for p, e in cache.failures]})
    # the run's history and training curves, one for all the snapshots
    (out / "history.json").write_text(json.dumps(history, indent=1, default=float))
    curves = dirs[-1] / "plots" / "training_curves.png"
    if curves.is_file():
        (out / "plots").mkdir(exist_ok=True)
        shutil.copy2(curves, out / "plots" / "training_curves.png")
    card = read_card(folder)
    card.training.seconds = round(time.time() - t0, 1)
    write_card(folder, card)
    log_run(out, asdict(cfg), kind=cfg.logger, experiment=cfg.task)
    log.info("snapshot ensemble of %d members written to %s in %.0f s", len(dirs), out, card.training.seconds)
    return folder


def _prepare_split(cfg: TrainConfig, task: TaskSpec, out: Path,
                   folder: RunFolder | None = None) -> tuple[list[Sample], dict, list[int]]:
    """Read the samples, start the run folder (rank zero: clear what ``folder`` says, write
    ``run.json``), write ``config.json``, make (and on rank zero save) the split.

    Returns:
        ``(samples, split, labels)``: the samples used, the split (indices per part and its hash)
        and each sample's class index.
    """
    from pellucid.core.backbones import get_backbone_spec

    get_backbone_spec(cfg.backbone)  # fail on a typo before any work
    try:
        samples = load_samples(cfg.data, classes=task.classes, aliases=task.aliases)
    except PermissionError as err:
        raise TrainingError(f"{err.filename or cfg.data} cannot be read (permission denied): fix its permissions "
                            f"or give another --data") from None
    # only once the inputs are known to be usable; other ranks find the folder rank zero started
    if folder is not None and _rank_zero():
        folder.start()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1, default=str))
    if cfg.max_images:
        rng = np.random.default_rng(cfg.seed)
        keep = sorted(rng.permutation(len(samples))[: cfg.max_images])
        samples = [samples[i] for i in keep]
    samples, split = make_split(samples, cfg)  # split policy: grouped, temporal, or a saved split file
    if _rank_zero():
        save_split(out / "split.json", samples, split)
    class_index = {c: i for i, c in enumerate(task.classes)}
    labels = [class_index[s.label] for s in samples]
    log.info("split %s: train %d, val %d, test %d", split["hash"], len(split["train"]), len(split["val"]),
             len(split["test"]))
    return samples, split, labels


def _linear_probe(model: Classifier, plain: dict, y: dict, cw: torch.Tensor | None, cfg: TrainConfig,
                  device: torch.device, history: list[dict]) -> dict:
    """Fit the head on cached frozen features of the training part (L2 chosen on validation);
    appends the probe's row to ``history`` and returns its :func:`fit_head` numbers (+ seconds)."""
    t = time.time()
    feats = {p: extract_features(model, _batches(plain[p], 64), device, cfg.progress, f"features ({p})")
             for p in ("train", "val")}
    y_train = y["train"]
    if cfg.probe_flip:  # training-time augmentation of the probe: mirrored copies of the training images
        mirrored = (torch.flip(x, dims=[3]) for x in _batches(plain["train"], 64))
        feats["train"] = torch.cat([feats["train"], extract_features(model, mirrored, device, cfg.progress,
                                                                     "features (train, mirrored)")])
        y_train = torch.cat([y_train, y_train])
    probe_info = fit_head(model.head, feats["train"], y_train, weight=cw,
                          epochs=cfg.probe_epochs, label_smoothing=cfg.label_smoothing,
                          val=(feats["val"], y["val"]))
    probe_info["seconds"] = round(time.time() - t, 1)
    probe_info["fit_rows"] = int(len(y_train))
    history.append({"epoch": -1, "phase": "linear-probe", **probe_info})
    log.info("linear probe: %s", probe_info)
    return probe_info


def _keep_better(model: Classifier, probe_state: dict | None, probe_info: dict, history: list[dict]) -> dict:
    """Which weights the folder keeps: the fine-tuned ones, unless they end worse on validation than
    the linear probe they started from (then ``probe_state`` is loaded back into ``model``).

    Returns:
        ``{"kept": "fine-tuned" | "linear-probe"}`` (+ ``"kept_reason"`` when the probe is kept).
    """
    tuned = [float(h["val_loss"]) if np.isfinite(h["val_loss"]) else float("inf")  # NaN: diverged
             for h in history if h.get("epoch", -1) >= 0 and h.get("val_loss") is not None]
    if probe_state is None or not tuned or min(tuned) <= probe_info["val_loss"]:
        return {"kept": "fine-tuned"}
    # Fine-tuning that ends worse on validation than its own starting point (a diverged or
    # collapsed run) must not replace it: keep the linear probe and say so.
    model.load_state_dict(probe_state)
    msg = (f"fine-tuning did not beat the linear probe on validation (best val loss {min(tuned):.4f} vs "
           f"{probe_info['val_loss']:.4f}); the model folder keeps the linear probe")
    log.warning(msg)
    return {"kept": "linear-probe", "kept_reason": msg}


def _evaluate(model: Classifier, plain: dict, y: dict, task: TaskSpec, cfg: TrainConfig, device: torch.device,
              out: Path, history: list[dict]) -> tuple[dict, dict, dict]:
    """Calibrate and threshold on validation, score on test (``metrics.json`` and plots), then draw
    the training curves and write ``history.json``. Returns ``(calibration, threshold, metrics)``."""
    from pellucid.core import plots
    from pellucid.core.scoring import score_split

    logits = {p: predict_logits(model, _batches(plain[p], 64), device) for p in ("val", "test")}
    cal, threshold, test_metrics = score_split(
        logits["val"], y["val"].numpy(), logits["test"], y["test"].numpy(), task.classes, out,
        positive_index=task.positive_index, positive_class=task.positive_class, policy=task.threshold_policy,
        target_sensitivity=task.target_sensitivity, n_boot=cfg.n_boot, seed=cfg.seed)
    if any("val_loss" in h for h in history):
        plots.plot_training_curves([h for h in history if h.get("epoch", -1) >= 0] or history,
                                   out / "plots" / "training_curves.png")
    (out / "history.json").write_text(json.dumps(history, indent=1, default=float))
    return cal, threshold, test_metrics


def _card(cfg: TrainConfig, task: TaskSpec, model: Classifier, weight_info: dict, cal: dict, threshold: dict,
          test_metrics: dict, split: dict, plain: dict, training: dict) -> ModelCard:
    """The model card of a trained classifier (see :func:`pellucid.core.modelfolder.build_card`)."""
    from pellucid.core.modelfolder import build_card

    return build_card(
        task=task, model=model, weight_info=weight_info, image_size=cfg.test_size or cfg.image_size,
        threshold=threshold, calibration=cal, metrics=test_metrics,
        split={"hash": split["hash"], "seed": cfg.seed, "train": len(plain["train"]), "val": len(plain["val"]),
               "test": len(plain["test"]), "file": "split.json"},
        training=training,
        recipe={k: v for k, v in asdict(cfg).items() if k not in ("out", "data", "extra", "progress", "overwrite")},
    )


def _write_model_folder(out: Path, model: Classifier, card: ModelCard, plain: dict, cfg: TrainConfig,
                        cache: ImageCache) -> None:
    """Save weights and card, the out-of-domain reference, and report unreadable files."""
    from pellucid.core.modelfolder import save_model

    save_model(out, model, card)
    _save_ood_reference(out, model, plain, cfg)
    if cache.failures:
        log.warning("%d unreadable file(s) were skipped:\n  %s", len(cache.failures),
                    "\n  ".join(e for _, e in cache.failures))


def _save_ood_reference(out: Path, model: Classifier, plain: dict, cfg: TrainConfig) -> None:
    """Store embedding statistics of training images (thresholds set on validation) for the
    out-of-domain check of the web app and reports."""
    from pellucid.core.ood import fit_reference, save_reference

    train_ds = plain["train"]
    rng = np.random.default_rng(cfg.seed)
    keep = sorted(rng.permutation(len(train_ds))[:256])
    subset = [train_ds[i] for i in keep]
    fit = [torch.stack([t for t, _ in subset[i:i + 64]]) for i in range(0, len(subset), 64)]
    try:
        model.eval()
        with torch.inference_mode():
            ref = fit_reference(model, fit, list(_batches(plain["val"], 64)),
                                source=f"{len(subset)} training / {len(plain['val'])} validation images")
        save_reference(out, ref)
    except ValueError as err:
        warnings.warn(f"no out-of-domain reference stored: {err}", stacklevel=2)


def _loaders(cfg: TrainConfig, cache: ImageCache, split: dict, labels: list[int]):
    """The fine-tuning loaders: augmented, balanced (``cfg.balance == "sampler"``) training batches
    and plain validation batches."""
    from torch.utils.data import DataLoader, WeightedRandomSampler

    aug = get_augment(get_task(cfg.task).augment, cfg.image_size, seed=cfg.seed)
    train_ds = CachedDataset(cache, split["train"], labels, augment=aug)
    val_ds = CachedDataset(cache, split["val"], labels)
    sampler = None
    if cfg.balance == "sampler":
        t = train_ds.targets()
        w = 1.0 / np.bincount(t)[t]
        sampler = WeightedRandomSampler(torch.as_tensor(w, dtype=torch.double), len(t),
                                        generator=torch.Generator().manual_seed(cfg.seed))
    dl_kw = {"num_workers": cfg.num_workers, "persistent_workers": cfg.num_workers > 0,
             "worker_init_fn": seed_worker_augment if cfg.num_workers > 0 else None}
    train_dl = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler,
                          drop_last=len(train_ds) > cfg.batch_size, **dl_kw)
    val_dl = DataLoader(val_ds, batch_size=64, **dl_kw)
    return train_dl, val_dl


def _fine_tune(model: Classifier, strategy: Strategy, cfg: TrainConfig, cache: ImageCache, split: dict,
               labels: list[int], cw: torch.Tensor | None, out: Path, history: list[dict],
               folder: RunFolder | None = None) -> dict:
    from pellucid.core.trainer import EarlyStopping, ModelCheckpoint, ema_callback, fit, make_trainer, swa_callback

    every = snapshot_every(cfg) if cfg.snapshots else 0
    train_dl, val_dl = _loaders(cfg, cache, split, labels)
    # channels-last on CPU too: oneDNN's convolutions (depthwise ones above all) run in that layout;
    # an EfficientNet-Lite0 training step at 224 px took about half the time on the 2-core benchmark
    # machine. The saved weights are converted back to the default layout below.
    model = model.to(memory_format=torch.channels_last)
    module = make_module(model, strategy, cfg, cw, folder.identity if folder is not None else None)
    ckpt_dir = out / "checkpoints"
    ckpt = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val_loss", mode="min", save_last=True)
    hist = _history_callback()
    callbacks = [ckpt, hist]
    if every:
        # a snapshot ensemble: the weights at the end of each cycle, kept on disk (a continued run keeps
        # them); every cycle runs to its end (no early stop) and they replace the best checkpoint
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="snapshot-{epoch}", monitor=None, save_top_k=-1,
                                         every_n_epochs=every, save_weights_only=True, enable_version_counter=False))
    else:
        callbacks.append(EarlyStopping(monitor="val_loss", patience=cfg.patience, mode="min"))
    if not every and cfg.probe_patience and cfg.extra.get("probe_val_loss") is not None:
        callbacks.append(_beat_probe_callback(cfg.extra["probe_val_loss"], cfg.probe_patience))
    if cfg.ema > 0:
        # averaged from the end of the warm-up on (10 % of the steps, as in the schedule), so the
        # average never holds the untrained head; validation and the best checkpoint see the average
        steps = len(train_dl)
        callbacks.append(ema_callback(cfg.ema * steps, start_step=int(0.1 * steps * cfg.epochs)))
    if cfg.swa > 0:
        callbacks.append(swa_callback(swa_start_epoch(cfg)))
    trainer = make_trainer(
        max_epochs=cfg.epochs, accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes,
        strategy=cfg.strategy, bf16=True,  # bf16 autocast on CUDA, 32-bit elsewhere
        log_dir=out, logger=cfg.logger, experiment=cfg.task,  # logs/version_N: one per (resumed) run
        callbacks=callbacks,
        progress=cfg.progress, deterministic=False, log_every_n_steps=max(1, min(10, len(train_dl))),
    )
    resume = folder.resume_from if folder is not None else None  # checked: loads weights-only, this run's
    if resume is not None:
        log.info("continuing the interrupted run from %s", resume)
    t = time.time()
    # on CPU, depthwise layers whose input is smaller than their kernel (a 64-px input's last stages) pad it
    # themselves: the same numbers through a faster oneDNN backward (runtime.small_input_depthwise)
    small = small_input_depthwise(model) if _device_for(cfg).type == "cpu" else contextlib.nullcontext()
    with small:
        fit(trainer, module, train_dl, val_dl, ckpt_path=resume)
    best = ckpt.best_model_path if not every else None
    if best and Path(best).exists():
        state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
    history.extend(hist.rows)
    model.to("cpu").to(memory_format=torch.contiguous_format)
    info = {"fine_tune_seconds": round(time.time() - t, 1), "epochs_run": trainer.current_epoch,
            "best_checkpoint": Path(best).name if best else None, "stopped_early": bool(trainer.should_stop)}
    if every:  # the classifier's own weights at each cycle's end (the module holds it as ``model``)
        info["snapshots"] = []
        for epoch in range(every - 1, cfg.epochs, every):
            path = ckpt_dir / f"snapshot-epoch={epoch}.ckpt"
            if path.is_file():
                state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
                info["snapshots"].append({"epoch": epoch, "state": {k[len("model."):]: v for k, v in state.items()
                                                                    if k.startswith("model.")}})
    return info
