"""T-TAME: a trainable attention explainer fitted once per model, then one forward pass per map.

Ntrougkas, Gkalelis & Mezaris, "T-TAME: Trainable Attention Mechanism for Explaining Convolutional
Networks and Vision Transformers", IEEE Access 12, 2024 (doi:10.1109/ACCESS.2024.3405788); written
here from the paper, not from its (non-commercial) code.

Forward hooks tap the feature maps of several late stages of the frozen classifier (the backbone
spec's ``tap_layers``, shallow to deep). Each tap goes through a *feature branch* (1×1 convolution
keeping the channel count, batch norm, skip connection, ReLU); the branches are upsampled
bilinearly to the largest tap's resolution, concatenated, and a *fusion* 1×1 convolution makes one
map per class; a sigmoid puts the maps in [0, 1] (:class:`TTAMEAttention`). The map of the explained
class, upsampled to the input size, is the explanation — computed in the same forward pass that
gives the model's prediction.

Training (:meth:`TTAME.fit`, on Lightning, with the classifier frozen and left bit-identical): each
image is multiplied by the upsampled map of the class the model predicts for it, and the loss is
(:func:`ttame_loss`)

    ``λ_ce · CE(f(x ⊙ up(A_ŷ)), ŷ) + λ_area · mean_b (mean_ij A_ŷ)^p + λ_tv · TV(A_ŷ)``

— cross-entropy of the classifier on the masked image against its own prediction, an area term
(the paper's power form, exponent ``p``) that keeps masks small, and a total-variation term that
keeps them smooth. The area and smoothness terms are taken on the attention map at its own
resolution (before the upsampling to the input size). The frozen taps and predictions of the
training images are computed once and cached, so one step costs one forward + one backward pass of
the classifier on the masked batch.

The attention weights live in the model folder as ``ttame.safetensors`` (no pickles) and are
recorded in ``card.json`` under ``explainers_fitted.ttame``; :func:`load_ttame` reads them back and
``get_explainer("ttame")`` finds them through ``folder=`` or the folder a model was loaded from.
``pellucid fit-explainer ttame --model DIR`` (:func:`run_cli`) fits on the training part of the
folder's ``split.json``.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pellucid.explain.base import (
    Explainer,
    ExplanationError,
    check_images,
    is_ensemble,
    n_outputs,
    normalize_map,
    preserved_model,
    register_explainer,
    targets_from_output,
)

__all__ = [
    "LossWeights",
    "area_loss",
    "variation_loss",
    "masked_ce_loss",
    "ttame_loss",
    "FeatureBranch",
    "TTAMEAttention",
    "TTAME",
    "default_tap_layers",
    "save_ttame",
    "load_ttame",
    "has_ttame",
    "WEIGHTS_FILE",
    "run_cli",
]

log = logging.getLogger(__name__)

WEIGHTS_FILE = "ttame.safetensors"
_FORMAT = 1
_FIT_HINT = "pellucid fit-explainer ttame --model {folder}"


# --------------------------------------------------------------------------- the loss (pure)
@dataclass(frozen=True)
class LossWeights:
    """Weights of the T-TAME loss terms (defaults from the paper's experiments).

    Attributes:
        ce: weight of the cross-entropy of the masked image against the model's prediction.
        area: weight of the area term.
        tv: weight of the total-variation (smoothness) term.
        area_power: exponent ``p`` of the area term ``(mean mask)^p``; below 1 it pushes hardest on
            masks that are already small.
    """

    ce: float = 1.5
    area: float = 2.0
    tv: float = 0.01
    area_power: float = 0.3

    def __post_init__(self):
        for name in ("ce", "area", "tv", "area_power"):
            value = getattr(self, name)
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"loss weight {name} must be a finite number >= 0; got {value}")


def _as_maps(masks: torch.Tensor) -> torch.Tensor:
    if masks.ndim == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.ndim != 3:
        raise ValueError(f"masks must have shape (B, h, w) or (B, 1, h, w); got {tuple(masks.shape)}")
    return masks


def area_loss(masks: torch.Tensor, power: float = 0.3) -> torch.Tensor:
    """Area term: the batch mean of ``(mean of each mask)^power``.

    Args:
        masks: ``(B, h, w)`` or ``(B, 1, h, w)`` in [0, 1].
        power: exponent ``p`` (1 is the plain mean area).

    Returns:
        A scalar tensor.
    """
    masks = _as_maps(masks)
    area = masks.flatten(1).mean(1).clamp_min(1e-12)
    return area.pow(power).mean()


def variation_loss(masks: torch.Tensor) -> torch.Tensor:
    """Total-variation (smoothness) term: per mask, the mean squared difference of vertically
    adjacent values plus that of horizontally adjacent values; averaged over the batch.

    Args:
        masks: ``(B, h, w)`` or ``(B, 1, h, w)``.

    Returns:
        A scalar tensor (0 for a constant mask).
    """
    masks = _as_maps(masks)
    b = masks.shape[0]
    zero = masks.new_zeros(b)
    dv = (masks[:, 1:, :] - masks[:, :-1, :]).pow(2).flatten(1).mean(1) if masks.shape[1] > 1 else zero
    dh = (masks[:, :, 1:] - masks[:, :, :-1]).pow(2).flatten(1).mean(1) if masks.shape[2] > 1 else zero
    return (dv + dh).mean()


def masked_ce_loss(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of model outputs ``(B, C)`` against class indices ``(B,)``.

    Multi-column outputs are logits (or log-probabilities); a one-column output is a binary
    sigmoid logit, scored with binary cross-entropy.
    """
    targets = targets.long()
    if output.shape[-1] == 1:
        return F.binary_cross_entropy_with_logits(output[:, 0].float(), targets.float())
    return F.cross_entropy(output.float(), targets)


def ttame_loss(output: torch.Tensor, targets: torch.Tensor, masks: torch.Tensor,
               weights: LossWeights = LossWeights()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The T-TAME training loss.

    Args:
        output: classifier outputs ``(B, C)`` on the masked images ``x ⊙ up(masks)``.
        targets: the classes the model predicts on the unmasked images, ``(B,)``.
        masks: the attention maps of those classes ``(B, h, w)`` in [0, 1], at the attention
            resolution.
        weights: the term weights and the area exponent.

    Returns:
        ``(total, {"ce": ..., "area": ..., "tv": ...})`` — the unweighted terms in the dict.
    """
    parts = {"ce": masked_ce_loss(output, targets), "area": area_loss(masks, weights.area_power),
             "tv": variation_loss(masks)}
    total = weights.ce * parts["ce"] + weights.area * parts["area"] + weights.tv * parts["tv"]
    return total, parts


# --------------------------------------------------------------------------- the attention module
class FeatureBranch(nn.Module):
    """One tap's branch: ``relu(bn(conv1x1(x)) + x)``, channels kept.

    Args:
        channels: channels of the tapped feature map.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)) + x)


class TTAMEAttention(nn.Module):
    """The T-TAME attention mechanism: feature branches → upsample → concatenate → fusion → sigmoid.

    Args:
        channels: channels of each tapped feature map, shallow to deep.
        n_classes: number of classes (one map each).
        layers: dotted names (from the model root) of the tapped layers, in the same order; kept
            so a saved module knows where it hooks.

    The fusion is a 1×1 convolution over the concatenated, upsampled branches. Bilinear upsampling
    acts on each channel alone and linearly, so it commutes with the 1×1 convolution: the forward
    pass applies each branch's slice of the fusion weights at the branch's own resolution and
    upsamples only the ``n_classes`` partial maps — the same result as concatenating first
    (:meth:`forward_concat`), with far less upsampling.
    """

    def __init__(self, channels: Sequence[int], n_classes: int, layers: Sequence[str] = ()):
        super().__init__()
        if not channels or any(int(c) < 1 for c in channels):
            raise ValueError(f"channels must be positive channel counts, one per tap; got {list(channels)}")
        if n_classes < 1:
            raise ValueError(f"n_classes must be >= 1; got {n_classes}")
        if layers and len(layers) != len(channels):
            raise ValueError(f"{len(layers)} layer names for {len(channels)} channel counts")
        self.channels = [int(c) for c in channels]
        self.n_classes = int(n_classes)
        self.layers = list(layers)
        self.branches = nn.ModuleList(FeatureBranch(c) for c in self.channels)
        self.fusion = nn.Conv2d(sum(self.channels), self.n_classes, 1)

    def config(self) -> dict:
        """What it takes to rebuild the module (stored beside the weights)."""
        return {"channels": list(self.channels), "n_classes": self.n_classes, "layers": list(self.layers),
                "format": _FORMAT}

    def _check(self, feats: Sequence[torch.Tensor]) -> None:
        if len(feats) != len(self.branches):
            raise ExplanationError(f"T-TAME attention has {len(self.branches)} branches but got {len(feats)} feature maps")
        got = [int(f.shape[1]) if f.ndim == 4 else None for f in feats]
        if got != self.channels:
            shapes = [tuple(f.shape) for f in feats]
            raise ExplanationError(
                f"T-TAME attention was fitted on feature maps with {self.channels} channels at layers {self.layers}, "
                f"but this model gives {shapes}: it was fitted for another model; refit it for this one")

    @staticmethod
    def _size(feats: Sequence[torch.Tensor]) -> tuple[int, int]:
        return tuple(max((tuple(f.shape[-2:]) for f in feats), key=lambda s: s[0] * s[1]))

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """Class maps ``(B, n_classes, h, w)`` in [0, 1] from the tapped feature maps ``(B, C_s, h_s, w_s)``;
        ``(h, w)`` is the largest tap's resolution."""
        self._check(feats)
        size = self._size(feats)
        weight = self.fusion.weight
        total = None
        start = 0
        for branch, f, c in zip(self.branches, feats, self.channels):
            part = F.conv2d(branch(f), weight[:, start:start + c])
            start += c
            if tuple(part.shape[-2:]) != size:
                part = F.interpolate(part, size=size, mode="bilinear", align_corners=False)
            total = part if total is None else total + part
        return torch.sigmoid(total + self.fusion.bias.view(1, -1, 1, 1))

    def forward_concat(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """The paper's literal order (upsample every branch, concatenate, fuse); same result as
        :meth:`forward`, kept as its reference."""
        self._check(feats)
        size = self._size(feats)
        ups = []
        for branch, f in zip(self.branches, feats):
            b = branch(f)
            ups.append(b if tuple(b.shape[-2:]) == size else
                       F.interpolate(b, size=size, mode="bilinear", align_corners=False))
        return torch.sigmoid(self.fusion(torch.cat(ups, dim=1)))


# --------------------------------------------------------------------------- taps
def _backbone(model: nn.Module) -> tuple[str, Any] | None:
    """``(prefix of its network's modules, Backbone)`` of the first pellucid Backbone in ``model``."""
    from pellucid.core.backbones import Backbone

    for name, mod in model.named_modules():
        if isinstance(mod, Backbone):
            return (f"{name}.net." if name else "net."), mod
    return None


def default_tap_layers(model: nn.Module) -> list[str]:
    """Dotted names (from ``model``) of the late stages the backbone spec lists for trainable
    explainers (``spec.tap_layers``), shallow to deep."""
    found = _backbone(model)
    if found is not None:
        prefix, backbone = found
        return [prefix + t for t in backbone.spec.tap_layers]
    raise ExplanationError(
        f"{type(model).__name__} has no pellucid Backbone, so there are no default T-TAME taps: pass "
        "layers=[...] (dotted module names, shallow to deep, as listed by model.named_modules())")


def _resolve_layers(model: nn.Module, layers: Sequence[str] | None) -> list[tuple[str, nn.Module]]:
    import difflib

    names = list(layers) if layers else default_tap_layers(model)
    modules = dict(model.named_modules())
    found = _backbone(model)
    bb_prefix = found[0] if found is not None else None  # names may also be given inside the backbone
    out = []
    for n in names:
        for cand in (n, bb_prefix + n if bb_prefix else None):
            if cand and cand in modules:
                out.append((cand, modules[cand]))
                break
        else:
            close = difflib.get_close_matches(n, [m for m in modules if m], n=3, cutoff=0.6)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ExplanationError(f"no layer {n!r} to tap in {type(model).__name__}.{hint} T-TAME taps dotted module "
                                   "names as listed by model.named_modules()")
    return out


class _Taps:
    """Forward hooks that keep a copy of each tapped layer's output while ``active``."""

    def __init__(self, layers: Sequence[tuple[str, nn.Module]]):
        self.layers = list(layers)
        self.out: dict[str, torch.Tensor] = {}
        self.active = True
        self.handles = []

    def __enter__(self) -> "_Taps":
        for name, module in self.layers:
            self.handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if not self.active:
                return None
            if not isinstance(output, torch.Tensor) or output.ndim != 4:
                what = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
                raise ExplanationError(f"T-TAME needs convolutional feature maps (B, C, h, w); layer {name!r} gives "
                                       f"{what}: pick other layers with layers=[...]")
            # A copy: a later in-place op (ReLU, residual add) must not change what was tapped.
            self.out[name] = output.detach().clone()
            return None
        return hook

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def features(self) -> list[torch.Tensor]:
        missing = [n for n, _ in self.layers if n not in self.out]
        if missing:
            raise ExplanationError(f"T-TAME tapped layer(s) {missing} did not run in the forward pass")
        return [self.out[n] for n, _ in self.layers]


# --------------------------------------------------------------------------- saving and loading
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def has_ttame(folder: str | Path) -> bool:
    """True when the model folder holds fitted T-TAME weights."""
    return (Path(folder) / WEIGHTS_FILE).is_file()


def save_ttame(folder: str | Path, attention: TTAMEAttention, info: dict | None = None) -> Path:
    """Write ``attention`` into a model folder: ``ttame.safetensors`` (weights + rebuild config)
    and ``card['explainers_fitted']['ttame']`` (config + ``info``), both replaced atomically.

    Returns:
        The weights file.
    """
    from safetensors.torch import save_file

    import pellucid
    from pellucid.core.modelfolder import read_card

    folder = Path(folder)
    read_card(folder)  # a real model folder, or a clear ModelFolderError
    card_path = folder / "card.json"
    target = folder / WEIGHTS_FILE
    tmp = folder / (WEIGHTS_FILE + ".tmp")
    state = {k: v.detach().cpu().contiguous() for k, v in attention.state_dict().items()}
    save_file(state, str(tmp), metadata={"pellucid_ttame": json.dumps(attention.config()),
                                         "pellucid_version": pellucid.__version__})
    os.replace(tmp, target)
    entry = {"file": WEIGHTS_FILE, **attention.config(), "sha256": _sha256(target),
             "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
             "pellucid_version": pellucid.__version__, "paper": "Ntrougkas, Gkalelis & Mezaris, IEEE Access 2024"}
    weights = folder / "model.safetensors"
    if weights.is_file():
        entry["model_sha256"] = _sha256(weights)
    entry.update(info or {})
    card = json.loads(card_path.read_text())  # read-modify-write the raw card
    card.setdefault("explainers_fitted", {})["ttame"] = entry
    _atomic_write_text(card_path, json.dumps(card, indent=1))
    return target


def load_ttame(folder: str | Path, *, check_model: bool = True) -> TTAMEAttention:
    """The T-TAME attention stored in a model folder, in eval mode.

    Args:
        folder: model folder holding ``ttame.safetensors``.
        check_model: warn when ``model.safetensors`` changed since the attention was fitted.

    Raises:
        ExplanationError: the folder has no fitted T-TAME (the message says how to fit it) or the
            file is not a T-TAME weights file.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    folder = Path(folder)
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise ExplanationError(f"ttame: model folder {folder} has no fitted T-TAME attention ({WEIGHTS_FILE}). "
                               f"Fit it first: `{_FIT_HINT.format(folder=folder)}`")
    with safe_open(str(path), framework="pt") as fh:
        meta = (fh.metadata() or {}).get("pellucid_ttame")
    if not meta:
        raise ExplanationError(f"{path} is not a pellucid T-TAME weights file (no 'pellucid_ttame' metadata); refit with "
                               f"`{_FIT_HINT.format(folder=folder)}`")
    cfg = json.loads(meta)
    if cfg.get("format", 1) > _FORMAT:
        raise ExplanationError(f"{path} has T-TAME format {cfg['format']}, newer than this pellucid reads ({_FORMAT}); "
                               "upgrade pellucid or refit")
    att = TTAMEAttention(cfg["channels"], cfg["n_classes"], cfg.get("layers", ()))
    try:
        att.load_state_dict(load_file(str(path)))
    except RuntimeError as err:
        raise ExplanationError(f"{path} does not match its own config: {str(err).splitlines()[0]}; refit") from err
    att.info = {}
    card_path = folder / "card.json"
    if card_path.is_file():
        try:
            att.info = json.loads(card_path.read_text()).get("explainers_fitted", {}).get("ttame", {})
        except json.JSONDecodeError:
            att.info = {}
    known = att.info.get("model_sha256")
    if check_model and known and (folder / "model.safetensors").is_file() and \
            _sha256(folder / "model.safetensors") != known:
        warnings.warn(f"{folder}/model.safetensors changed since T-TAME was fitted on it; its maps may no longer "
                      f"explain this model. Refit: `{_FIT_HINT.format(folder=folder)}`", stacklevel=2)
    return att.eval()


# --------------------------------------------------------------------------- training data
def _resolve_paths(folder: Path, card: dict, rows: Sequence) -> tuple[list[str], int]:
    """Files of ``split.json`` rows as found from here: as written, relative to the model folder, or
    moved under the card's training data folder. Returns ``(found, n_missing)``."""
    data_root = card.get("training", {}).get("data")
    config_data = None
    cfg_path = folder / "config.json"
    if cfg_path.is_file():
        try:
            config_data = json.loads(cfg_path.read_text()).get("data")
        except json.JSONDecodeError:
            config_data = None
    found, missing = [], 0
    for row in rows:
        p = str(row["path"] if isinstance(row, dict) else row)
        cands = [Path(p)]
        if not Path(p).is_absolute():
            cands.append(folder / p)
        if data_root:
            if config_data and p.startswith(str(config_data)):
                cands.append(Path(data_root) / p[len(str(config_data)):].lstrip("/\\"))
            parts = Path(p).parts
            root_name = Path(data_root).name
            if root_name in parts:
                i = len(parts) - 1 - parts[::-1].index(root_name)
                cands.append(Path(data_root).joinpath(*parts[i + 1:]))
        hit = next((c for c in cands if c.is_file()), None)
        if hit is None:
            missing += 1
        else:
            found.append(str(hit))
    return found, missing


def _subset(paths: list[str], n: int | None, seed: int) -> list[str]:
    if n is None or len(paths) <= n:
        return paths
    rng = np.random.default_rng(seed)
    return [paths[i] for i in sorted(rng.choice(len(paths), n, replace=False))]


def _decode(paths: Sequence[str], size: int, channels: int | None, progress: bool) -> torch.Tensor:
    """Files → ``(N, 3, size, size)`` uint8, through the same preprocessing as training."""
    from pellucid.datasets.torchdata import ImageCache

    cache = ImageCache(paths, size, channels=channels, workers=2, progress=progress)
    return torch.from_numpy(cache.arrays).permute(0, 3, 1, 2).contiguous()


def folder_images(folder: str | Path, *, data: str | Path | None = None, max_images: int | None = 512,
                  max_val: int | None = 128, val_fraction: float = 0.15, seed: int = 0,
                  progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Training and validation images for fitting T-TAME to a model folder.

    The train and val parts of the folder's ``split.json`` (never its test part), or, with
    ``data``, every image under that folder split ``1 - val_fraction`` / ``val_fraction``.
    Images are prepared at the card's image size and channel policy.

    Returns:
        ``(train (N, 3, S, S) uint8, val (M, 3, S, S) uint8, description of the source)``.

    Raises:
        ModelFolderError: no ``split.json`` (and no ``data``), or none of its images can be read.
    """
    from pellucid.core.modelfolder import ModelFolderError, read_card

    folder = Path(folder)
    card = read_card(folder)
    pre = card.get("preprocessing", {})
    size = int(pre.get("image_size") or card.get("backbone", {}).get("input_size") or 224)
    channels = pre.get("channels_in")
    if data is not None:
        from pellucid.datasets.samples import find_images

        files = [str(p) for p in find_images([data])]
        if len(files) < 2:
            raise ModelFolderError(f"--data {data}: found {len(files)} image(s); T-TAME needs a folder of training images")
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(files))
        n_val = max(1, int(round(val_fraction * len(files))))
        val_paths = [files[i] for i in sorted(order[:n_val])]
        train_paths = [files[i] for i in sorted(order[n_val:])]
        source = f"{data} ({len(files)} images)"
    else:
        split_path = folder / "split.json"
        if not split_path.is_file():
            raise ModelFolderError(f"{folder} has no split.json, so its training images are unknown: give them with "
                                   f"`pellucid fit-explainer ttame --model {folder} --data DIR`")
        split = json.loads(split_path.read_text())
        train_paths, miss_t = _resolve_paths(folder, card, split.get("train", []))
        val_paths, miss_v = _resolve_paths(folder, card, split.get("val", []))
        if not train_paths:
            first = (split.get("train") or [{}])[0]
            raise ModelFolderError(f"none of the {miss_t} training images listed in {split_path} can be found from here "
                                   f"(first: {first.get('path') if isinstance(first, dict) else first}); run from the "
                                   "folder training ran in, or give the images with --data DIR")
        if miss_t or miss_v:
            warnings.warn(f"{miss_t + miss_v} image(s) listed in {split_path} were not found and are skipped",
                          stacklevel=2)
        source = f"{split_path.name} train/val (split {split.get('hash', '?')})"
    train_paths = _subset(train_paths, max_images, seed)
    val_paths = _subset(val_paths, max_val, seed + 1)
    train = _decode(train_paths, size, channels, progress)
    val = _decode(val_paths, size, channels, progress) if val_paths else train[:0]
    if len(train) == 0:
        raise ModelFolderError(f"no training image of {folder} could be read ({source})")
    return train, val, source


def _collect(data: Any) -> torch.Tensor:
    """An image tensor or an iterable of batches (tensors or ``(images, ...)`` tuples) → one
    ``(N, 3, H, W)`` float tensor in [0, 1]."""
    if isinstance(data, torch.Tensor):
        return check_images(data)
    parts = []
    for batch in data:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        parts.append(check_images(x).cpu())
    if not parts:
        raise ValueError("T-TAME got no training images (the data iterable is empty)")
    shapes = {tuple(p.shape[1:]) for p in parts}
    if len(shapes) > 1:
        raise ValueError(f"training batches have different image shapes {sorted(shapes)}: resize them to one size")
    return torch.cat(parts)


def _to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


@torch.no_grad()
def _precompute(model: nn.Module, layers: list[tuple[str, nn.Module]], images: torch.Tensor, batch_size: int,
                device: torch.device, progress: bool, desc: str) -> tuple[list[torch.Tensor], torch.Tensor, int]:
    """Frozen taps (stored as float16) and predicted classes of ``images``; also the class count."""
    from tqdm.auto import tqdm

    feats: list[list[torch.Tensor]] = [[] for _ in layers]
    preds, n_cls = [], 0
    with _Taps(layers) as taps:
        for s in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress, leave=False):
            x = _to_float(images[s:s + batch_size].to(device))
            out = model(x)
            n_cls = n_outputs(out)
            preds.append(torch.as_tensor(targets_from_output(out, None), dtype=torch.long))
            for i, f in enumerate(taps.features()):
                feats[i].append(f.to("cpu", torch.float16))
            taps.out.clear()
    return [torch.cat(f) for f in feats], torch.cat(preds), n_cls


# --------------------------------------------------------------------------- Lightning
def _lightning_module(attention: TTAMEAttention, classifier: nn.Module, weights: LossWeights, lr: float,
                      weight_decay: float):
    """The LightningModule that trains ``attention`` against the frozen ``classifier``."""
    import lightning as L

    class TTAMEModule(L.LightningModule):
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


# --------------------------------------------------------------------------- the explainer
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
        import lightning as L
        from lightning.pytorch.callbacks import EarlyStopping, TQDMProgressBar
        from torch.utils.data import DataLoader, TensorDataset

        if val is None or len(val) == 0:
            if len(train) >= 8:
                g = torch.Generator().manual_seed(self.seed)
                order = torch.randperm(len(train), generator=g)
                n_val = max(1, int(round(0.15 * len(train))))
                val, train = train[order[:n_val].sort().values], train[order[n_val:].sort().values]
            else:
                val = train
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
            g = torch.Generator().manual_seed(self.seed)
            train_dl = DataLoader(TensorDataset(train, tr_y, *tr_feats), batch_size=self.batch_size, shuffle=True,
                                  generator=g, drop_last=len(train) > self.batch_size)
            val_dl = DataLoader(TensorDataset(val, va_y, *va_feats), batch_size=max(self.batch_size, 32))
            callbacks = [EarlyStopping(monitor="val_loss", patience=self.patience, mode="min")]
            if self.progress:
                callbacks.append(TQDMProgressBar(refresh_rate=1))
            on_gpu = device.type == "cuda"
            with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
                # Cached tensors need no loader workers; Lightning's hint about them is noise here.
                warnings.filterwarnings("ignore", message=".*does not have many workers.*")
                warnings.filterwarnings("ignore", message=".*LeafSpec.*")
                trainer = L.Trainer(
                    max_epochs=self.epochs, accelerator="gpu" if on_gpu else "cpu",
                    devices=[device.index or 0] if on_gpu else 1, logger=False, enable_checkpointing=False,
                    callbacks=callbacks, enable_progress_bar=self.progress, enable_model_summary=False,
                    num_sanity_val_steps=0, default_root_dir=tmp, log_every_n_steps=max(1, len(train_dl)),
                    deterministic=False)
                t_fit = time.perf_counter()
                trainer.fit(module, train_dl, val_dl)
                fit_seconds = time.perf_counter() - t_fit
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


# --------------------------------------------------------------------------- CLI
def run_cli(args) -> int:
    """``pellucid fit-explainer ttame --model DIR [--data DIR] [--epochs N]``: fit T-TAME on the
    model folder's training images (or ``--data``), save it into the folder, print where and how
    long it took."""
    from pellucid.core.modelfolder import ModelFolderError, load_model

    folder = Path(args.model)
    epochs = getattr(args, "epochs", None)
    if epochs is not None and epochs < 1:
        raise ModelFolderError(f"--epochs must be >= 1; got {epochs}")
    model, card = load_model(folder)
    if card.get("kind", "classifier") != "classifier":
        raise ModelFolderError(f"{folder} is a {card.get('kind')} folder; T-TAME is fitted to one classifier "
                               "(fit it to each member's folder)")
    explainer = TTAME(progress=True, **({"epochs": epochs} if epochs else {}))
    t0 = time.perf_counter()
    data = getattr(args, "data", None)
    train, val, source = folder_images(folder, data=data, max_images=explainer.max_images,
                                       max_val=explainer.max_val, seed=explainer.seed, progress=True)
    explainer._fit_tensors(model, train, val, source)
    seconds = time.perf_counter() - t0
    explainer.fit_info["fit_seconds"] = round(seconds, 1)
    path = explainer.save(folder)
    info = explainer.fit_info
    print(f"T-TAME attention saved to {path} ({path.stat().st_size / 1e6:.1f} MB), recorded in {folder / 'card.json'}")
    print(f"fitted in {seconds:.0f} s on {info['train_images']} training / {info['val_images']} validation images "
          f"from {source}: {info['epochs_run']} epoch(s), best validation loss {info['best_val_loss']:.4f} "
          f"(epoch {info['best_epoch'] + 1})")
    print(f"explain with: pellucid explain --model {folder} --method ttame IMAGES...")
    return 0
