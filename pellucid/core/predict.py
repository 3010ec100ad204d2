"""Prediction with a model folder: files in, calibrated probabilities and decisions out.

:class:`Predictor` loads a model folder once and holds exactly the card's preprocessing, temperature
and threshold policy; reading, batching, the domain check and the domain policy are the case
pipeline's (:mod:`pellucid.core.pipeline`), which every door uses. :func:`predict_paths` serves the
library: every input gets a row — unreadable files get their error in the ``error`` column instead of
stopping the run — written as CSV ``path,label,prob_<class>...,domain,domain_reason,error``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from pellucid.core.calibration import apply_temperature
from pellucid.core.metrics import decide
from pellucid.core.modelfolder import load_model
from pellucid.core.pipeline import Case, CasePipeline, CaseWriter
from pellucid.datasets.readers import Image
from pellucid.datasets.torchdata import prepare, to_tensor

__all__ = ["Prediction", "Predictor", "predict", "predict_paths", "write_predictions_csv"]

log = logging.getLogger(__name__)


#: A prediction is a :class:`~pellucid.core.pipeline.Case` (kept as a name for library users).
Prediction = Case


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
        self.classes: list[str] = list(self.card.classes)
        self.image_size: int = int(self.card.image_size)
        self.channels: int | None = self.card.preprocessing.channels_in
        self.temperature: float = self.card.temperature
        self.threshold: float | None = self.card.threshold.value if self.card.threshold is not None else None
        pos = self.card.positive_class
        self.positive_index: int | None = self.classes.index(pos) if pos in self.classes else None
        from pellucid.core.segmentation import LungMasker

        self.masker = LungMasker.from_card(self.card) if self.card.kind != "segmentation" else None
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

    def pipeline(self, **options) -> CasePipeline:
        """The case pipeline over this predictor (options: see :class:`~pellucid.core.pipeline.CasePipeline`)."""
        return CasePipeline(self, **options)

    def predict_images(self, images: Sequence[Image | np.ndarray], names: Sequence[str] | None = None,
                       batch_size: int = 32, **options) -> list[Case]:
        """Cases of already-read images (through the one pipeline)."""
        return self.pipeline(batch_size=batch_size, **options).from_images(images, names)

    def predict_paths(self, paths: Iterable[str | Path], batch_size: int = 32, progress: bool = False,
                      **options) -> list[Case]:
        """Cases of files (folders expand recursively); unreadable files get an error Case."""
        from pellucid.core.pipeline import PipelineError

        try:
            return list(self.pipeline(batch_size=batch_size, **options).from_paths(paths))
        except PipelineError:
            return []


def write_predictions_csv(path: str | Path, cases: Sequence[Case], classes: Sequence[str]) -> Path:
    """Write ``path,label,prob_<class>...,domain,domain_reason,error`` rows."""
    with CaseWriter(path, classes) as w:
        for c in cases:
            w.write(c)
    return Path(path)


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
