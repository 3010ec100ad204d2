"""Frozen-feature extraction and its cache: :func:`extract_features` runs the backbone once per
image and keeps the pooled features in memory and on disk (:data:`DEFAULT_CACHE_DIR`, safetensors
files keyed by the backbone, its weights, the preprocessing and every file's path, mtime and
size), so evaluating hundreds of episodes costs milliseconds. The decoding, batching and caching
helpers here also serve the trunk activations of episodic fine-tuning."""
from __future__ import annotations

import hashlib
import json
import logging
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from pellucid.core.fewshot.config import FewShotError
from pellucid.core.fewshot.network import Embedder, PrototypicalNetwork

__all__ = [
    "DEFAULT_CACHE_DIR",
    "extract_features",
    "clear_memory_cache",
]

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path("runs/.cache/features")
_FORMAT = 1  # bump when the cached feature layout changes


_MEMORY: dict[str, torch.Tensor] = {}


def clear_memory_cache() -> None:
    """Forget the in-memory feature cache (the disk cache stays)."""
    _MEMORY.clear()


def _weights_fingerprint(module: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _files_fingerprint(paths: Sequence[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        st = Path(p).stat()
        h.update(f"{Path(p).resolve()}\t{st.st_mtime_ns}\t{st.st_size}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:16]


def _cache_key(kind: str, embedder_desc: dict, weight_info: dict, paths: Sequence[str], weights_fp: str) -> str:
    desc = {"format": _FORMAT, "kind": kind, **embedder_desc, "weights": weight_info.get("source"),
            "weights_detail": weight_info.get("detail"), "weights_fp": weights_fp,
            "files": _files_fingerprint(paths), "n": len(paths)}
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _decode(paths: Sequence[str], size: int, progress: bool, channels: int | None = None) -> np.ndarray:
    from pellucid.datasets.torchdata import ImageCache

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # failures are raised below, with their file names
        cache = ImageCache(paths, size, channels=channels, workers=2, progress=progress)
    if cache.failures:
        path, err = cache.failures[0]
        raise FewShotError(f"{len(cache.failures)} image(s) could not be read (first: {err}); remove or fix them")
    return cache.arrays


def _run_batches(fn, paths: Sequence[str], size: int, batch_size: int, progress: bool, chunk: int = 256,
                 channels: int | None = None) -> torch.Tensor:
    from pellucid.datasets.torchdata import to_tensor

    outs = []
    for start in range(0, len(paths), chunk):
        arrays = _decode(paths[start:start + chunk], size, progress, channels)
        for b in range(0, len(arrays), batch_size):
            x = torch.stack([to_tensor(a) for a in arrays[b:b + batch_size]])
            outs.append(fn(x.contiguous(memory_format=torch.channels_last)))
    return torch.cat(outs) if outs else torch.zeros(0)


def _cached(key: str, cache_dir: Path | None, compute, meta: dict) -> dict[str, torch.Tensor]:
    """``compute()`` (a dict of tensors) unless ``key`` is in memory or on disk under ``cache_dir``."""
    if key in _MEMORY:
        return _MEMORY[key]
    file = None if cache_dir is None else Path(cache_dir) / f"{key}.safetensors"
    if file is not None and file.exists():
        from safetensors.torch import load_file

        try:
            out = load_file(str(file))
            _MEMORY[key] = out
            log.info("features from disk cache %s", file)
            return out
        except Exception as err:  # a truncated file from an interrupted run: recompute
            log.warning("ignoring unreadable feature cache %s (%s)", file, err)
    out = compute()
    _MEMORY[key] = out
    if file is not None:
        from safetensors.torch import save_file

        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in out.items()}, str(tmp),
                  metadata={k: str(v) for k, v in meta.items()})
        tmp.replace(file)
    return out


def extract_features(embedder: Embedder | PrototypicalNetwork, paths: Sequence[str | Path], *,
                     image_size: int | None = None, weight_info: dict | None = None,
                     cache_dir: str | Path | None = DEFAULT_CACHE_DIR, batch_size: int = 32,
                     progress: bool = False, mirror: bool = False, channels: int | None = None) -> torch.Tensor:
    """Raw features of image files, computed once (one backbone pass per image) and cached.

    The cache key hashes the backbone name, its weight source and a fingerprint of its weights, the
    image size, the pooled layers, flip, and every file's path, modification time and size; a hit in
    memory or under ``cache_dir`` skips the backbone entirely.

    Args:
        embedder: an :class:`Embedder` or a :class:`PrototypicalNetwork` (its embedder is used).
        paths: image files (any format :func:`~pellucid.datasets.readers.read_image` reads).
        image_size: input side in pixels (default: the backbone's; with extra backbones, the largest
            of their input sizes, each backbone getting the images resized to its own).
        weight_info: the backbone's weight record (part of the key; default ``{}``).
        cache_dir: folder of the disk cache, or None for memory only.
        batch_size: images per forward pass.
        progress: show progress bars.
        mirror: features of the horizontally mirrored images instead (support augmentation,
            :attr:`ProtoConfig.support_flip`); cached under their own key.
        channels: 1 turns colour images into luminance first (gray replicated), as single-channel
            tasks' models read them (:func:`~pellucid.datasets.torchdata.prepare`); cached under
            their own key. None or 3 keep colour.

    Returns:
        Raw features of shape (len(paths), D), float32 on the CPU.
    """
    if isinstance(embedder, PrototypicalNetwork):
        embedder = embedder.embedder
    paths = [str(p) for p in paths]
    size = int(image_size or embedder.input_size)
    desc = {"backbone": embedder.spec.name, "size": size, "layers": list(embedder.layers), "flip": embedder.flip,
            "mean": list(embedder.spec.mean), "std": list(embedder.spec.std)}
    if mirror:  # only when set, so the keys of unmirrored features stay what they were
        desc["mirror"] = True
    if channels == 1:  # likewise: colour features keep their keys
        desc["channels"] = 1
    weights_fp = _weights_fingerprint(embedder.backbone)
    if embedder.resolution:  # only when set, so the keys of older embeddings stay what they were
        desc["resolution"] = embedder.resolution
    if len(embedder.extras):  # only with extra backbones, so single-backbone keys stay what they were
        desc["extras"] = [{"backbone": bb.spec.name, "size": embedder.side(bb), "mean": list(bb.spec.mean),
                           "std": list(bb.spec.std), "weights_fp": _weights_fingerprint(bb)} for bb in embedder.extras]
    key = _cache_key("pooled", desc, weight_info or {}, paths, weights_fp)

    def compute() -> torch.Tensor:
        was = embedder.training
        embedder.eval()
        try:
            with torch.no_grad():
                forward = (lambda x: embedder(x.flip(3)).float()) if mirror else (lambda x: embedder(x).float())
                feats = _run_batches(forward, paths, size, batch_size, progress, channels=channels).clone()
        finally:
            embedder.train(was)
        return {"features": feats, "dims": torch.tensor(embedder.dims or [feats.shape[1]], dtype=torch.long)}

    out = _cached(key, None if cache_dir is None else Path(cache_dir), compute, {**desc, "n": len(paths)})
    embedder.dims = out["dims"].tolist()
    return out["features"]
