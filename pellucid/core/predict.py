"""Prediction with a model folder: files in, calibrated probabilities and decisions out.

:class:`Predictor` loads a model folder once and applies exactly the card's preprocessing,
temperature and threshold policy. :func:`predict_paths` serves ``pellucid predict``: every input
file gets a row — unreadable files get their error in the ``error`` column instead of stopping the
run — and rows are written as CSV with ``path,label,prob_<class>...,error``.
"""
from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from pellucid.core.calibration import apply_temperature
from pellucid.core.metrics import decide
from pellucid.core.modelfolder import load_model
from pellucid.datasets.readers import Image, ImageReadError, read_image
from pellucid.datasets.samples import find_images
from pellucid.datasets.torchdata import prepare, to_tensor

__all__ = ["Prediction", "Predictor", "predict", "predict_paths", "write_predictions_csv"]

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    """One image's result: label, calibrated probabilities (card's class order), and provenance."""

    path: str
    label: str | None
    probs: dict[str, float] = field(default_factory=dict)
    index: int | None = None
    error: str = ""
    meta: dict = field(default_factory=dict)

    def row(self, classes: Sequence[str]) -> dict:
        r = {"path": self.path, "label": self.label or ""}
        for c in classes:
            r[f"prob_{c}"] = "" if self.error else f"{self.probs[c]:.6f}"
        r["error"] = self.error
        return r


class Predictor:
    """A loaded model folder ready to predict.

    Args:
        folder: model folder written by ``pellucid train`` (or an ensemble / prototypes folder).
        device: torch device for inference.
    """

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu"):
        self.folder = Path(folder)
        self.model, self.card = load_model(folder, map_location=device)
        self.device = torch.device(device)
        self.classes: list[str] = list(self.card["classes"])
        self.image_size: int = int(self.card["preprocessing"]["image_size"])
        self.channels: int | None = self.card["preprocessing"].get("channels_in")
        self.temperature: float = float(self.card.get("calibration", {}).get("temperature", 1.0) or 1.0)
        thr = self.card.get("threshold") or {}
        self.threshold: float | None = thr.get("value")
        pos = self.card.get("positive_class")
        self.positive_index: int | None = self.classes.index(pos) if pos in self.classes else None
        from pellucid.core.segmentation import LungMasker

        self.masker = LungMasker.from_card(self.card) if self.card.get("kind", "classifier") != "segmentation" else None
        # A lung-crop model sees only the lungs' bounding box, not the whole X-ray.
        self.crops_input: bool = getattr(self.masker, "mode", None) == "crop"

    def preprocess(self, image: Image | np.ndarray) -> torch.Tensor:
        """Image → ``(3, S, S)`` float tensor in [0, 1], as in training (lungs segmented and masked
        first when the card's ``preprocessing.preprocess`` says so)."""
        if self.masker is not None:
            image = self.masker(image)
        return to_tensor(prepare(image, self.image_size, self.channels))

    @torch.inference_mode()
    def probabilities(self, batch: torch.Tensor) -> np.ndarray:
        """Calibrated probabilities ``(B, C)`` of a preprocessed batch ``(B, 3, S, S)``."""
        batch = batch.to(self.device)
        if batch.dim() == 4:  # channels-last: oneDNN's fast convolution layout, same numbers
            batch = batch.contiguous(memory_format=torch.channels_last)
        logits = self.model(batch).float().cpu()
        return apply_temperature(logits, self.temperature)

    def decide(self, probs: np.ndarray) -> np.ndarray:
        """Predicted class indices under the card's threshold policy."""
        return decide(probs, self.threshold, self.positive_index)

    def predict_images(self, images: Sequence[Image | np.ndarray], names: Sequence[str] | None = None,
                       batch_size: int = 32) -> list[Prediction]:
        """Predict already-read images."""
        names = list(names) if names is not None else [f"image{i}" for i in range(len(images))]
        out: list[Prediction] = []
        for i in range(0, len(images), batch_size):
            chunk = images[i:i + batch_size]
            probs = self.probabilities(torch.stack([self.preprocess(im) for im in chunk]))
            idx = self.decide(probs)
            for j, (p, k) in enumerate(zip(probs, idx)):
                im = chunk[j]
                out.append(Prediction(path=names[i + j], label=self.classes[int(k)], index=int(k),
                                      probs={c: float(v) for c, v in zip(self.classes, p)},
                                      meta=dict(im.meta) if isinstance(im, Image) else {}))
        return out

    def predict_paths(self, paths: Iterable[str | Path], batch_size: int = 32, progress: bool = False
                      ) -> list[Prediction]:
        """Predict files (folders expand recursively); unreadable files get an error row."""
        from tqdm.auto import tqdm

        files = find_images(list(paths))
        results: list[Prediction] = []
        pending: list[tuple[str, Image]] = []

        def flush():
            if pending:
                results.extend(self.predict_images([im for _, im in pending], [n for n, _ in pending]))
                pending.clear()

        for f in tqdm(files, desc="predicting", disable=not progress, leave=False):
            try:
                pending.append((str(f), read_image(f)))
            except ImageReadError as err:
                flush()
                results.append(Prediction(path=str(f), label=None, error=str(err)))
                continue
            if len(pending) >= batch_size:
                flush()
        flush()
        bad = [r for r in results if r.error]
        if bad:
            log.warning("%d of %d file(s) could not be read:\n  %s", len(bad), len(results),
                        "\n  ".join(r.error for r in bad))
        return results


def write_predictions_csv(path: str | Path, predictions: Sequence[Prediction], classes: Sequence[str]) -> Path:
    """Write ``path,label,prob_<class>...,error`` rows."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "label", *[f"prob_{c}" for c in classes], "error"])
        w.writeheader()
        for p in predictions:
            w.writerow(p.row(classes))
    return path


def predict_paths(model_dir: str | Path, paths: Sequence[str | Path], out: str | Path | None = None,
                  progress: bool = False) -> list[Prediction]:
    """Load ``model_dir``, predict ``paths``, optionally write the CSV ``out``."""
    pred = Predictor(model_dir)
    results = pred.predict_paths(paths, progress=progress)
    if out is not None:
        write_predictions_csv(out, results, pred.classes)
    return results


def predict(model_dir: str | Path, images: Sequence[Image | np.ndarray]) -> list[Prediction]:
    """Predict in-memory images with the model folder ``model_dir``."""
    return Predictor(model_dir).predict_images(images)
