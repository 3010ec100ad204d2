"""Decode-once image caches and the torch datasets that train from them.

:func:`prepare` is the single preprocessing path from a read :class:`~pellucid.datasets.readers.Image`
to the square uint8 RGB array a model sees (training, evaluation, prediction and the web app all use
it). :class:`ImageCache` decodes every file once, in parallel threads with a progress bar, and keeps
the prepared arrays in memory; unreadable files are skipped with a warning and listed in
``cache.failures`` instead of crashing an epoch. :class:`CachedDataset` serves augmented tensors from
the cache.
"""
from __future__ import annotations

import logging
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from pellucid.datasets.readers import Image, ImageReadError, read_image

__all__ = ["prepare", "to_tensor", "ImageCache", "CachedDataset", "load_prepared"]

log = logging.getLogger(__name__)


def prepare(image: Image | np.ndarray, size: int, channels: int | None = None) -> np.ndarray:
    """Image → ``(size, size, 3)`` uint8 RGB (gray replicated), resized without cropping.

    Args:
        image: an :class:`Image` or a float array ``(H, W[, C])`` in [0, 1].
        size: output side in pixels.
        channels: 1 turns colour input into luminance first (single-channel tasks such as chest
            X-rays, where colour is never signal — only a source artefact); 3 or None keep colour.
    """
    if isinstance(image, Image):
        arr = image.gray if channels == 1 else image.rgb
    else:
        arr = np.asarray(image, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[..., None]
    if channels == 1 and arr.shape[2] == 3:
        arr = (arr @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[..., None]
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    u8 = np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8)
    h, w = u8.shape[:2]
    if (h, w) != (size, size):
        interp = cv2.INTER_AREA if min(h, w) > size else cv2.INTER_LINEAR
        u8 = cv2.resize(u8, (size, size), interpolation=interp)
    return np.ascontiguousarray(u8)


def to_tensor(u8: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` uint8 → ``(3, H, W)`` float32 in [0, 1]."""
    return torch.from_numpy(u8).permute(2, 0, 1).float().div_(255.0)


def load_prepared(path: str | Path, size: int, channels: int | None = None, preprocess=None) -> np.ndarray:
    """Read a file, apply ``preprocess`` (``Image -> Image``, e.g. a lung masker) and :func:`prepare` it
    (raises :class:`ImageReadError`)."""
    image = read_image(path)
    return prepare(preprocess(image) if preprocess is not None else image, size, channels)


class ImageCache:
    """Every file decoded once and kept as a prepared uint8 array.

    Args:
        paths: image files.
        size: side of the prepared square arrays.
        workers: decoding threads.
        channels: 1 for single-channel tasks (see :func:`prepare`).
        progress: show a progress bar.
        preprocess: optional ``Image -> Image`` step applied to every decoded image before resizing
            (for example :class:`pellucid.core.segmentation.LungMasker`).

    Attributes:
        arrays: ``(N_ok, size, size, 3)`` uint8.
        index: maps a position in ``paths`` to a row of ``arrays`` (absent for failed files).
        failures: ``[(path, message)]`` of files that could not be read.
    """

    def __init__(self, paths: Sequence[str | Path], size: int, *, channels: int | None = None, workers: int = 4,
                 progress: bool = True, preprocess=None):
        from tqdm.auto import tqdm

        self.size = size
        self.paths = [str(p) for p in paths]
        out: list[np.ndarray | None] = [None] * len(self.paths)
        self.failures: list[tuple[str, str]] = []

        def work(i: int):
            try:
                return i, load_prepared(self.paths[i], size, channels, preprocess), None
            except ImageReadError as err:
                return i, None, str(err)

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            it = pool.map(work, range(len(self.paths)))
            for i, arr, err in tqdm(it, total=len(self.paths), desc="decoding images", disable=not progress,
                                    leave=False):
                if err is None:
                    out[i] = arr
                else:
                    self.failures.append((self.paths[i], err))
        self.index = {i: k for k, i in enumerate(i for i, a in enumerate(out) if a is not None)}
        kept = [a for a in out if a is not None]
        self.arrays = np.stack(kept) if kept else np.zeros((0, size, size, 3), np.uint8)
        if self.failures:  # one line however many: callers that list them all read ``failures``
            warnings.warn(f"skipped {len(self.failures)} unreadable file(s); the first: {self.failures[0][1]}",
                          stacklevel=2)
        log.info("decoded %d images at %d px (%d skipped)", len(kept), size, len(self.failures))

    def __len__(self) -> int:
        return len(self.arrays)

    def ok(self, positions: Sequence[int]) -> list[int]:
        """The positions among ``positions`` whose file was read."""
        return [p for p in positions if p in self.index]

    def get(self, position: int) -> np.ndarray:
        return self.arrays[self.index[position]]


class CachedDataset(Dataset):
    """``(image tensor (3, S, S) in [0, 1], label index)`` pairs served from an :class:`ImageCache`.

    Args:
        cache: the decoded images.
        positions: positions (into ``cache.paths``) of this dataset's samples; unreadable ones dropped.
        labels: label index per position in ``cache.paths``.
        augment: albumentations transform applied to the uint8 array, or None.
    """

    def __init__(self, cache: ImageCache, positions: Sequence[int], labels: Sequence[int], augment=None):
        self.cache = cache
        self.positions = cache.ok(positions)
        self.labels = labels
        self.augment = augment

    def __len__(self) -> int:
        return len(self.positions)

    def targets(self) -> np.ndarray:
        return np.array([self.labels[p] for p in self.positions])

    def __getitem__(self, i: int):
        pos = self.positions[i]
        arr = self.cache.get(pos)
        if self.augment is not None:
            arr = self.augment(image=arr)["image"]
        return to_tensor(arr), int(self.labels[pos])
