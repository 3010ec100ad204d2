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

from pellucid.explain.base import check_images, n_outputs, targets_from_output
from pellucid.explain.ttame.taps import _Taps

__all__ = [
    "folder_images",
]


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
