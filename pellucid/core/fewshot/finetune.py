"""Episodic fine-tuning of a backbone's last stages on Lightning: :func:`split_backbone` cuts a
backbone into a frozen trunk and a trainable tail (checked numerically), :func:`extract_trunk_maps`
caches the trunk's activations once per image, and :class:`EpisodicFineTuner` /
:func:`finetune_episodic` train the tail with the prototypical loss, one episode per step."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pellucid.core.backbones import Backbone
from pellucid.core.fewshot.config import IMPROVED, FewShotError, ProtoConfig
from pellucid.core.fewshot.episodes import EpisodeSampler
from pellucid.core.fewshot.features import (
    DEFAULT_CACHE_DIR,
    _cache_key,
    _cached,
    _run_batches,
    _weights_fingerprint,
)
from pellucid.core.fewshot.maths import prototype_logits
from pellucid.core.fewshot.network import _pool
from pellucid.core.trainer import FEW_WORKERS_WARNING, LightningModule, make_trainer, quiet_warnings, seed_everything
from pellucid.registry import unknown_name_error

__all__ = [
    "split_backbone",
    "extract_trunk_maps",
    "EpisodicFineTuner",
    "finetune_episodic",
]


def _ordered_modules(net: nn.Module, stages: Sequence[str]) -> list[tuple[str, nn.Module]]:
    """Top-level modules of ``net`` in definition order, descending into containers that hold stages."""
    out: list[tuple[str, nn.Module]] = []

    def walk(mod: nn.Module, prefix: str):
        for name, child in mod.named_children():
            path = f"{prefix}{name}"
            if any(s.startswith(path + ".") for s in stages):
                walk(child, path + ".")
            else:
                out.append((path, child))

    walk(net, "")
    return out


class _Tail(nn.Module):
    """The trainable end of a backbone: trunk activations → raw (multi-layer pooled) features.

    Holds the backbone's own tail modules (shared, not copied), so training it trains the backbone.
    """

    def __init__(self, trunk_layer: str, modules: list[tuple[str, nn.Module]], layers: Sequence[str]):
        super().__init__()
        self.trunk_layer = trunk_layer
        self.paths = [p for p, _ in modules]
        self.stages = nn.ModuleList([m for _, m in modules])
        self.layers = tuple(layers)
        self.dims: list[int] | None = None

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """Raw features ``(B, D)`` of trunk activations ``(B, C, H, W)``."""
        x = maps
        taps = {self.trunk_layer: x}
        for p, m in zip(self.paths, self.stages):
            x = m(x)
            taps[p] = x
        blocks = [_pool(taps[p]) for p in self.layers] if self.layers else [_pool(x)]
        self.dims = [b.shape[1] for b in blocks]
        return torch.cat(blocks, dim=1)


def split_backbone(backbone: Backbone, train_from: str, layers: Sequence[str] = ()) -> tuple[str, _Tail]:
    """Split a backbone before the stage ``train_from`` into a frozen trunk and a trainable tail.

    Args:
        backbone: the backbone (its modules are shared, not copied: training the tail trains it).
        train_from: a dotted stage path from ``backbone.spec.stages``; it and every later module train.
        layers: layers the tail pools into its output (each must be the trunk's last layer or lie in
            the tail); ``()`` gives the backbone's pooled embedding.

    Returns:
        ``(trunk_layer, tail)``: the path whose output feeds the tail, and the tail module mapping
        those activations ``(B, C, H, W)`` to raw features ``(B, D)``.

    Raises:
        FewShotError: the backbone cannot be split there (checked numerically on a small input).
    """
    spec = backbone.spec
    if train_from not in spec.stages:
        raise unknown_name_error("stage", train_from, list(spec.stages))
    mods = _ordered_modules(backbone.net, spec.stages)
    names = [p for p, _ in mods]
    k = names.index(train_from)
    if k == 0:
        raise FewShotError(f"train_from={train_from!r} is the first stage: nothing is left to cache; "
                           "pick a later stage")
    tail_mods = [(p, m) for p, m in mods[k:] if not isinstance(m, nn.Identity) and p not in ("classifier", "fc", "head")]
    trunk_layer = names[k - 1]
    bad = [p for p in layers if p != trunk_layer and p not in [q for q, _ in tail_mods]]
    if bad:
        raise FewShotError(f"layer(s) {bad} are not at or after the trunk output {trunk_layer!r}; "
                           f"tail layers: {[trunk_layer] + [q for q, _ in tail_mods]}")
    tail = _Tail(trunk_layer, tail_mods, layers)
    # check: trunk hook + tail must reproduce the backbone's own embedding
    was = backbone.training
    backbone.eval()
    captured = {}
    h = backbone.module_at(trunk_layer).register_forward_hook(lambda _m, _i, o: captured.__setitem__("x", o))
    try:
        with torch.no_grad():
            x = torch.rand(2, 3, min(spec.input_size, 64), min(spec.input_size, 64),
                           generator=torch.Generator().manual_seed(0))
            ref = backbone(x)
            got = _Tail(trunk_layer, tail_mods, ())(captured["x"])
    finally:
        h.remove()
        backbone.train(was)
    if got.shape != ref.shape or not torch.allclose(got, ref, atol=1e-4, rtol=1e-3):
        raise FewShotError(f"backbone {spec.name!r} cannot be split before {train_from!r} for episodic fine-tuning "
                           "(its forward is not a plain chain of stages); choose another stage or backbone")
    return trunk_layer, tail


def extract_trunk_maps(backbone: Backbone, trunk_layer: str, paths: Sequence[str | Path], *,
                       image_size: int | None = None, weight_info: dict | None = None,
                       cache_dir: str | Path | None = DEFAULT_CACHE_DIR, batch_size: int = 32,
                       progress: bool = False) -> torch.Tensor:
    """Activations of ``trunk_layer`` for image files, once per image and cached (float16).

    Returns:
        Activations of shape (N, C, H, W), float16 (they are the frozen trunk's output; training
        the tail from them needs no backbone pass through the trunk).
    """
    paths = [str(p) for p in paths]
    spec = backbone.spec
    size = int(image_size or spec.input_size)
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    desc = {"backbone": spec.name, "size": size, "trunk": trunk_layer, "mean": list(spec.mean), "std": list(spec.std)}
    key = _cache_key("trunk", desc, weight_info or {}, paths, _weights_fingerprint(backbone))

    def run(x: torch.Tensor) -> torch.Tensor:
        captured = {}
        h = backbone.module_at(trunk_layer).register_forward_hook(lambda _m, _i, o: captured.__setitem__("x", o))
        try:
            backbone((x - mean) / std)
        finally:
            h.remove()
        return captured["x"].half().contiguous()

    def compute() -> torch.Tensor:
        was = backbone.training
        backbone.eval()
        try:
            with torch.no_grad():
                return {"maps": _run_batches(run, paths, size, batch_size, progress).clone()}
        finally:
            backbone.train(was)

    return _cached(key, None if cache_dir is None else Path(cache_dir), compute, {**desc, "n": len(paths)})["maps"]


class _EpisodeMaps(torch.utils.data.Dataset):
    def __init__(self, maps: torch.Tensor, sampler: EpisodeSampler, flip: bool, seed: int):
        self.maps, self.sampler, self.flip, self.seed = maps, sampler, flip, seed

    def __len__(self) -> int:
        return len(self.sampler)

    def __getitem__(self, i: int):
        ep = self.sampler.episode(i)
        idx = np.concatenate([ep.support, ep.query])
        x = self.maps[torch.from_numpy(idx)].float()
        if self.flip:  # mirror half of the activations: a cheap stand-in for image flips
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
            m = torch.rand(len(idx), generator=g) < 0.5
            x[m] = x[m].flip(3)
        return x, torch.from_numpy(ep.support_labels), torch.from_numpy(ep.query_labels), len(ep.support)


class EpisodicFineTuner(LightningModule):
    """Episodic training of a backbone's tail with the prototypical loss (Snell et al., 2017).

    Each training step is one episode: the tail embeds the cached trunk activations of its support
    and query images, prototypes are built from the support, and the loss is the cross-entropy of the
    query logits. BatchNorm statistics stay frozen (episodes are small); the logit scale is learnt.

    Args:
        tail: the trainable tail from :func:`split_backbone`.
        config: transforms and distance (as in frozen mode; ``config.scale`` initialises the scale).
        lr: AdamW learning rate of the tail.
        weight_decay: AdamW weight decay.
    """

    def __init__(self, tail: nn.Module, config: ProtoConfig = IMPROVED, lr: float = 1e-4, weight_decay: float = 1e-4):
        super().__init__()
        self.tail = tail
        self.config = config
        self.lr, self.weight_decay = lr, weight_decay
        self.log_scale = nn.Parameter(torch.tensor(math.log(config.scale), dtype=torch.float32))
        self.dims: list[int] | None = None

    def on_train_batch_start(self, batch, batch_idx) -> None:
        for m in self.tail.modules():  # frozen BatchNorm statistics (Lightning switches to train mode)
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()

    def training_step(self, batch, batch_idx):
        x, s_lab, q_lab, n_sup = batch
        raw = self.tail(x)
        logits = prototype_logits(raw[:n_sup], s_lab, raw[n_sup:], int(s_lab.max()) + 1, config=self.config,
                                  dims=self.dims, scale=self.log_scale.exp())
        loss = F.cross_entropy(logits, q_lab)
        acc = (logits.argmax(1) == q_lab).float().mean()
        self.log_dict({"train_loss": loss, "train_acc": acc}, prog_bar=True, batch_size=1)
        return loss

    def configure_optimizers(self):
        params = [p for p in self.tail.parameters() if p.requires_grad]
        return torch.optim.AdamW([{"params": params, "lr": self.lr, "weight_decay": self.weight_decay},
                                  {"params": [self.log_scale], "lr": 1e-2, "weight_decay": 0.0}])


def finetune_episodic(tail: nn.Module, maps: torch.Tensor, labels: Sequence, groups: Sequence | None = None, *,
                      config: ProtoConfig = IMPROVED, n_way: int | None = None, n_shot: int = 5, n_query: int = 10,
                      episodes: int = 200, lr: float = 1e-4, seed: int = 0, flip: bool = True,
                      progress: bool = False, dims: Sequence[int] | None = None) -> EpisodicFineTuner:
    """Train ``tail`` (in place) with episodes drawn from ``maps`` on a Lightning Trainer (CPU or GPU).

    Args:
        tail: from :func:`split_backbone`.
        maps: cached trunk activations of the training images, (N, C, H, W).
        labels, groups: per training image; episodes respect groups as in :class:`EpisodeSampler`.
        config: transforms and distance used in the loss.
        n_way, n_shot, n_query: episode shape.
        episodes: training steps (one episode each).
        lr: learning rate of the tail.
        seed: seeds the episodes and Lightning.
        flip: randomly mirror activations (augmentation).
        progress: show Lightning's progress bar.
        dims: widths of the tail's layer blocks.

    Returns:
        The trained :class:`EpisodicFineTuner` (its ``tail`` shares modules with the backbone).
    """
    sampler = EpisodeSampler(labels, groups, n_way, n_shot, n_query, episodes, seed)
    module = EpisodicFineTuner(tail, config, lr=lr)
    module.dims = list(dims) if dims is not None else None
    loader = torch.utils.data.DataLoader(_EpisodeMaps(maps, sampler, flip, seed), batch_size=None, shuffle=False)
    seed_everything(seed)
    with quiet_warnings(FEW_WORKERS_WARNING, ".*GPU available but not used.*"):
        trainer = make_trainer(max_epochs=1, progress=progress, deterministic=False)
        trainer.fit(module, loader)
    module.eval()
    return module
