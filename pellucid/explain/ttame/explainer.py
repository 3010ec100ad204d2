"""The T-TAME explainer: :class:`TTAME`, registered as ``"ttame"``, which fits the attention with
the classifier frozen (left bit-identical), saves it into a model folder, finds a fitted attention
in memory or in the folder a model was loaded from, and explains with one forward pass of the
model per batch of maps."""
from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pellucid.explain.base import (
    Explainer,
    ExplanationError,
    is_ensemble,
    n_outputs,
    normalize_map,
    preserved_model,
    register_explainer,
    targets_from_output,
)
from pellucid.explain.ttame.attention import TTAMEAttention
from pellucid.explain.ttame.data import _collect, _precompute, _to_float, folder_images
from pellucid.explain.ttame.loss import LossWeights
from pellucid.explain.ttame.persistence import WEIGHTS_FILE, load_ttame, save_ttame
from pellucid.explain.ttame.taps import _resolve_layers, _Taps
from pellucid.explain.ttame.training import _hold_out, _lightning_module, _loaders, _run_trainer

__all__ = [
    "TTAME",
]

log = logging.getLogger(__name__)


@register_explainer
class TTAME(Explainer):
    """T-TAME (Ntrougkas, Gkalelis & Mezaris, "T-TAME: Trainable Attention Mechanism for Explaining
    Convolutional Networks and Vision Transformers", IEEE Access 2024): an attention module trained
    on several stages' feature maps of the frozen classifier; after :meth:`fit`, a map costs one
    forward pass of the model.

    Args:
        folder: model folder whose ``ttame.safetensors`` to use; None uses the folder the model was
            loaded from (``model._pellucid_folder``) unless this explainer was fitted in memory.
        layers: dotted names of the layers to tap, shallow to deep; None uses the backbone spec's
            ``tap_layers`` (only for fitting; a fitted module knows its layers).
        normalize: min–max scale each map to [0, 1] (like the CAM methods); False keeps the raw
            sigmoid attention, which is the mask the module was trained to apply.
        epochs: maximum training epochs (early stopping on the validation loss may stop sooner).
        batch_size: images per training step.
        lr: peak learning rate of the one-cycle schedule (AdamW).
        patience: epochs without a better validation loss before stopping.
        max_images: at most this many training images (a seeded subset); None for all.
        max_val: at most this many validation images.
        lambda_ce, lambda_area, lambda_tv, area_power: the loss weights (see :class:`LossWeights`).
        seed: seeds the module's initialisation, the subsets and the batch order.
        progress: show progress bars while fitting.
    """

    name = "ttame"
    # A map needs no autograd (it works inside torch.inference_mode and on models whose features are
    # computed without gradients); fit() does need the output to depend on the input through
    # autograd and says so when it does not.
    needs_gradients = False
    trainable = True
    description = "trainable attention over several stages; one forward pass per map after fitting"

    def __init__(self, folder: str | None = None, layers: Sequence[str] | None = None, normalize: bool = True,
                 epochs: int = 5, batch_size: int = 16, lr: float = 2e-3, patience: int = 2,
                 max_images: int | None = 512, max_val: int | None = 128, lambda_ce: float = 1.5,
                 lambda_area: float = 2.0, lambda_tv: float = 0.01, area_power: float = 0.3, seed: int = 0,
                 progress: bool = False):
        for key, value in (("epochs", epochs), ("batch_size", batch_size), ("patience", patience)):
            if int(value) < 1:
                raise ValueError(f"{key} must be >= 1; got {value}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0; got {lr}")
        self.loss_weights = LossWeights(lambda_ce, lambda_area, lambda_tv, area_power)
        super().__init__(folder=None if folder is None else str(folder), layers=None if layers is None else list(layers),
                         normalize=normalize, epochs=epochs, batch_size=batch_size, lr=lr, patience=patience,
                         max_images=max_images, max_val=max_val, lambda_ce=lambda_ce, lambda_area=lambda_area,
                         lambda_tv=lambda_tv, area_power=area_power, seed=seed, progress=progress)
        self.folder = None if folder is None else str(folder)
        self.layers = None if layers is None else list(layers)
        self.normalize = normalize
        self.epochs, self.batch_size, self.lr, self.patience = int(epochs), int(batch_size), float(lr), int(patience)
        self.max_images, self.max_val, self.seed, self.progress = max_images, max_val, int(seed), progress
        self.attention: TTAMEAttention | None = None
        self.fit_info: dict = {}
        self._loaded: dict[str, tuple[float, TTAMEAttention]] = {}

    # -- fitting ------------------------------------------------------------------------------
    def fit(self, model: nn.Module, data: Any, *, val_data: Any = None,
            folder: str | Path | None = None) -> "TTAME":
        """Train the attention module with ``model`` frozen (its weights, modes, gradients and
        hooks are exactly as before afterwards).

        Args:
            model: the classifier, taking ``(B, 3, H, W)`` in [0, 1].
            data: a model folder (its ``split.json`` train part; validation from its val part; the
                fitted weights are then saved into it), an ``(N, 3, H, W)`` tensor in [0, 1], or an
                iterable of such batches (or of ``(images, labels)`` tuples; labels are ignored —
                T-TAME explains the model's own predictions).
            val_data: validation images in the same forms; None holds out 15 % of ``data`` (or,
                under 8 images, validates on the training images).
            folder: save the fitted weights into this model folder (default: ``data`` when it is
                a folder; otherwise they stay in memory — see :meth:`save`).

        Returns:
            ``self``; the module is in :attr:`attention`, timings and losses in :attr:`fit_info`.
        """
        if is_ensemble(model):
            raise ExplanationError("ttame explains one classifier; fit it on each ensemble member instead")
        _refuse_views(model)
        t0 = time.perf_counter()
        if isinstance(data, (str, Path)):
            train, val, source = folder_images(data, max_images=self.max_images, max_val=self.max_val,
                                               seed=self.seed, progress=self.progress)
            folder = data if folder is None else folder
        else:
            train = _collect(data)
            val = _collect(val_data) if val_data is not None else None
            source = "images given to fit()"
            if self.max_images is not None and len(train) > self.max_images:
                g = torch.Generator().manual_seed(self.seed)
                train = train[torch.randperm(len(train), generator=g)[: self.max_images].sort().values]
        self._fit_tensors(model, train, val, source)
        self.fit_info["fit_seconds"] = round(time.perf_counter() - t0, 1)
        if folder is not None:
            self.save(folder)
        return self

    def _fit_tensors(self, model: nn.Module, train: torch.Tensor, val: torch.Tensor | None, source: str) -> None:
        train, val = _hold_out(train, val, self.seed)
        from pellucid.explain.base import _model_device

        device = _model_device(model)
        layers = _resolve_layers(model, self.layers)
        t_pre = time.perf_counter()
        with preserved_model(model), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            tr_feats, tr_y, n_cls = _precompute(model, layers, train, 64, device, self.progress, "T-TAME taps (train)")
            va_feats, va_y, _ = _precompute(model, layers, val, 64, device, self.progress, "T-TAME taps (val)")
            pre_seconds = time.perf_counter() - t_pre
            attention = TTAMEAttention([f.shape[1] for f in tr_feats], n_cls, [n for n, _ in layers]).to(device)
            self._check_gradient(model, attention, train[:2].to(device), [f[:2].to(device).float() for f in tr_feats],
                                 tr_y[:2].to(device))
            module = _lightning_module(attention, model, self.loss_weights, self.lr, weight_decay=1e-4)
            train_dl, val_dl = _loaders((train, tr_y, *tr_feats), (val, va_y, *va_feats), self.batch_size, self.seed)
            trainer, fit_seconds = _run_trainer(module, train_dl, val_dl, device, epochs=self.epochs,
                                                patience=self.patience, progress=self.progress)
            if module.best_state is not None:
                attention.load_state_dict(module.best_state)
        self.attention = attention.eval()
        self.fit_info = {
            "train_images": int(len(train)), "val_images": int(len(val)), "image_size": list(train.shape[-2:]),
            "source": source, "epochs": self.epochs, "epochs_run": int(trainer.current_epoch),
            "best_epoch": int(module.best_epoch), "best_val_loss": round(float(module.best_val), 5),
            "stopped_early": bool(trainer.should_stop), "batch_size": self.batch_size, "lr": self.lr,
            "loss_weights": asdict(self.loss_weights), "seed": self.seed,
            "precompute_seconds": round(pre_seconds, 1), "train_seconds": round(fit_seconds, 1),
            "device": str(device),
        }
        log.info("T-TAME fitted: %s", self.fit_info)

    @staticmethod
    def _check_gradient(model, attention, x, feats, y) -> None:
        """Fail early when the classifier's output does not depend on its input through autograd
        (features computed under no_grad): the cross-entropy term could not train the maps."""
        was = attention.training
        attention.eval()  # no batch-norm statistics from this probe
        try:
            with torch.enable_grad():
                maps = attention(feats)
                m = maps[torch.arange(len(y), device=maps.device), y]
                up = F.interpolate(m[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)
                out = model(_to_float(x) * up)
        finally:
            attention.train(was)
        if not out.requires_grad:
            raise ExplanationError(
                f"ttame: the output of {type(model).__name__} does not depend on its input through autograd (features "
                "computed under torch.no_grad / inference_mode / .detach()), so T-TAME cannot be trained on it; "
                "explain it with a gradient-free method (lime, occlusion, eigencam)")

    def save(self, folder: str | Path) -> Path:
        """Store the fitted module in a model folder (``ttame.safetensors`` + card entry)."""
        if self.attention is None:
            raise ExplanationError("ttame: nothing to save; call fit() first")
        path = save_ttame(folder, self.attention, self.fit_info)
        self._loaded.pop(str(Path(folder)), None)
        log.info("T-TAME attention saved to %s", path)
        return path

    # -- explaining ---------------------------------------------------------------------------
    def _attention_for(self, model: nn.Module) -> tuple[TTAMEAttention, str]:
        if self.attention is not None:
            return self.attention, "fitted in memory"
        folder = self.folder or getattr(model, "_pellucid_folder", None)
        if folder is None:
            raise ExplanationError(
                f"ttame: no fitted T-TAME attention for this {type(model).__name__} — it was not loaded from a model "
                "folder and no folder= was given. Fit it with `pellucid fit-explainer ttame --model DIR`, then use "
                "get_explainer('ttame', folder=DIR) (or a model loaded from DIR)")
        key = str(Path(folder))
        path = Path(folder) / WEIGHTS_FILE
        mtime = path.stat().st_mtime if path.is_file() else -1.0
        if key not in self._loaded or self._loaded[key][0] != mtime:
            self._loaded[key] = (mtime, load_ttame(folder))
        return self._loaded[key][1], key

    def _explain(self, model: nn.Module, images: torch.Tensor, targets: list[int] | None):
        if is_ensemble(model):
            raise ExplanationError("ttame explains one classifier, not an ensemble; explain each member, or use "
                                   "gradcam (which combines member maps)")
        _refuse_views(model)
        attention, source = self._attention_for(model)
        device = images.device
        attention = attention.to(device).eval()
        layers = _resolve_layers(model, attention.layers or self.layers)
        # inference_mode, not no_grad: no autograd bookkeeping at all, so the map costs the forward
        # pass plus the small attention module (see bench/bench_ttame.py).
        with torch.inference_mode(), _Taps(layers) as taps:
            out = model(images)
            feats = taps.features()
        if n_outputs(out) != attention.n_classes:
            raise ExplanationError(f"T-TAME attention was fitted for {attention.n_classes} classes but the model has "
                                   f"{n_outputs(out)}: refit it for this model")
        targets = targets_from_output(out, targets)
        with torch.inference_mode():
            maps = attention(feats)
            idx = torch.as_tensor(targets, device=maps.device)
            m = maps[torch.arange(len(idx), device=maps.device), idx]
            up = F.interpolate(m[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        raw = up.float().cpu().numpy()
        heat = normalize_map(raw) if self.normalize else np.clip(raw, 0.0, 1.0)
        extras = [{"layers": list(attention.layers), "source": source,
                   "raw_range": [float(r.min()), float(r.max())]} for r in raw]
        return list(zip(heat, extras)), targets


def _refuse_views(model: nn.Module) -> None:
    """T-TAME reads one pass of one network; a model averaging test-time views (pellucid.core.views) is refused."""
    if hasattr(model, "views") and hasattr(model, "inner"):
        raise ExplanationError(f"ttame explains one pass of the network; this model averages {len(model.views)} "
                               f"turned or mirrored views of each image (tta = {getattr(model, 'tta', '?')!r}): use "
                               "gradcam, which turns each view's map back, or lime")
