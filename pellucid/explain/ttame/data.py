"""Training data for T-TAME: the images of a model folder's ``split.json`` train/val parts (or of a
``--data`` folder), found from here and decoded through the same preprocessing as training
(:func:`folder_images`); image tensors or batch iterables gathered into one tensor; and the frozen
classifier's taps and predictions over those images, computed once and cached as float16."""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from pellucid.core.card import ModelCard
from pellucid.datasets.splits import Split, SplitRow, load_split, split_file
from pellucid.explain.base import check_images, n_outputs, targets_from_output
from pellucid.explain.ttame.taps import _Taps

__all__ = [
    "folder_images",
]


def _split_of(folder: Path, card: ModelCard) -> Split:
    """The folder's ``split.json`` with its rows found from here by the one path rule of
    :func:`~pellucid.datasets.splits.load_split`: as written, relative to the model folder, or moved
    under the card's training data folder (``config.json`` ``data`` says how the run named it)."""
    data_root = card.training.data if card.training is not None else None
    config_data = None
    cfg_path = folder / "config.json"
    if cfg_path.is_file():
        try:
            config_data = json.loads(cfg_path.read_text()).get("data")
        except (OSError, ValueError, AttributeError, RecursionError):  # unreadable, not a JSON object, too deep
            config_data = None
    return load_split(folder, data_root=data_root, data_as_given=config_data)


def _resolve_paths(rows: Sequence[SplitRow]) -> tuple[list[str], int]:
    """Files of ``split.json`` rows found from here. Returns ``(found, n_missing)``."""
    found = [r.path for r in rows if r.found]
    return found, len(rows) - len(found)


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
    size = int(card.image_size or (card.backbone.input_size if card.backbone is not None else None) or 224)
    channels = card.preprocessing.channels_in
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
        split_path = split_file(folder)
        if not split_path.is_file():
            raise ModelFolderError(f"{folder} has no split.json, so its training images are unknown: give them with "
                                   f"`pellucid fit-explainer ttame --model {folder} --data DIR`")
        split = _split_of(folder, card)
        train_paths, miss_t = _resolve_paths(split.train)
        val_paths, miss_v = _resolve_paths(split.val)
        if not train_paths:
            first = split.train[0].written if split.train else None
            raise ModelFolderError(f"none of the {miss_t} training images listed in {split_path} can be found from here "
                                   f"(first: {first}); run from the "
                                   "folder training ran in, or give the images with --data DIR")
        if miss_t or miss_v:
            warnings.warn(f"{miss_t + miss_v} image(s) listed in {split_path} were not found and are skipped",
                          stacklevel=2)
        source = f"{split_path.name} train/val (split {split.hash or '?'})"
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
