"""The T-TAME training loop on Lightning: the LightningModule that trains the attention against the
frozen classifier (masked image → classifier → :func:`~pellucid.explain.ttame.loss.ttame_loss`,
keeping the best validation state), the validation hold-out, the data loaders over the cached
taps, and the Trainer run with early stopping on the validation loss."""
from __future__ import annotations

import tempfile
import time
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pellucid.explain.ttame.attention import TTAMEAttention
from pellucid.explain.ttame.data import _to_float
from pellucid.explain.ttame.loss import LossWeights, ttame_loss

__all__: list[str] = []


def _lightning_module(attention: TTAMEAttention, classifier: nn.Module, weights: LossWeights, lr: float,
                      weight_decay: float):
    """The LightningModule that trains ``attention`` against the frozen ``classifier``."""
    from pellucid.core.trainer import LightningModule

    class TTAMEModule(LightningModule):
        def __init__(self):
            super().__init__()
            self.attention = attention
            # A tuple, not an attribute module: Lightning must neither move, train() nor save it.
            self._frozen = (classifier,)
            self.best_val = float("inf")
            self.best_state: dict | None = None
            self.best_epoch = -1

        def _step(self, batch):
            x, y, *feats = batch
            x = _to_float(x)
            maps = self.attention([f.float() for f in feats])
            m = maps[torch.arange(len(y), device=maps.device), y]
            up = F.interpolate(m[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)
            out = self._frozen[0](x * up)
            return ttame_loss(out, y, m, weights)

        def training_step(self, batch, batch_idx):
            loss, parts = self._step(batch)
            n = len(batch[1])
            self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=n)
            return loss

        def validation_step(self, batch, batch_idx):
            loss, parts = self._step(batch)
            n = len(batch[1])
            self.log("val_loss", loss, on_epoch=True, prog_bar=True, batch_size=n)
            self.log("val_ce", parts["ce"], on_epoch=True, batch_size=n)
            self.log("val_area", parts["area"], on_epoch=True, batch_size=n)

        def on_validation_epoch_end(self):
            if self.trainer.sanity_checking:
                return
            v = float(self.trainer.callback_metrics.get("val_loss", float("inf")))
            if v < self.best_val:
                self.best_val, self.best_epoch = v, int(self.current_epoch)
                self.best_state = {k: t.detach().clone() for k, t in self.attention.state_dict().items()}

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.attention.parameters(), lr=lr, weight_decay=weight_decay)
            total = max(1, int(self.trainer.estimated_stepping_batches))
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.3)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return TTAMEModule()


def _hold_out(train: torch.Tensor, val: torch.Tensor | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, val)``; without validation images, a seeded 15 % of ``train`` is held out (under 8
    images, the training images also validate)."""
    if val is None or len(val) == 0:
        if len(train) >= 8:
            g = torch.Generator().manual_seed(seed)
            order = torch.randperm(len(train), generator=g)
            n_val = max(1, int(round(0.15 * len(train))))
            val, train = train[order[:n_val].sort().values], train[order[n_val:].sort().values]
        else:
            val = train
    return train, val


def _loaders(train: Sequence[torch.Tensor], val: Sequence[torch.Tensor], batch_size: int, seed: int):
    """Seeded, shuffled training and plain validation loaders over ``(images, targets, *taps)``."""
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(seed)
    n_train = len(train[0])
    train_dl = DataLoader(TensorDataset(*train), batch_size=batch_size, shuffle=True,
                          generator=g, drop_last=n_train > batch_size)
    val_dl = DataLoader(TensorDataset(*val), batch_size=max(batch_size, 32))
    return train_dl, val_dl


def _run_trainer(module, train_dl, val_dl, device: torch.device, *, epochs: int, patience: int,
                 progress: bool) -> tuple[Any, float]:
    """Fit ``module`` on a Lightning Trainer (on ``device``), stopping early on the validation loss;
    returns ``(trainer, seconds spent in trainer.fit)``."""
    from pellucid.core.trainer import FEW_WORKERS_WARNING, LEAFSPEC_WARNING, EarlyStopping, make_trainer, quiet_warnings

    on_gpu = device.type == "cuda"
    # Cached tensors need no loader workers; Lightning's hint about them is noise here.
    with tempfile.TemporaryDirectory() as tmp, quiet_warnings(FEW_WORKERS_WARNING, LEAFSPEC_WARNING):
        trainer = make_trainer(
            max_epochs=epochs, accelerator="gpu" if on_gpu else "cpu", devices=[device.index or 0] if on_gpu else 1,
            callbacks=[EarlyStopping(monitor="val_loss", patience=patience, mode="min")], progress=progress,
            default_root_dir=tmp, log_every_n_steps=max(1, len(train_dl)), deterministic=False)
        t_fit = time.perf_counter()
        trainer.fit(module, train_dl, val_dl)
        fit_seconds = time.perf_counter() - t_fit
    return trainer, fit_seconds
