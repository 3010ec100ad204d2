"""Builders shared by the UI and report tests: a tiny model folder, sample images, a DICOM file."""
from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["tiny_model_folder", "write_png", "write_dicom", "PATIENT_NAME", "PATIENT_ID", "INTENDED_USE",
           "write_lungs_png", "bright_segmenter", "tiny_segmenter_folder", "tiny_masked_model_folder"]

PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "SECRET123"
INTENDED_USE = "Research use only: test model, not a diagnostic device."


def tiny_model_folder(folder: Path, *, with_plots: bool = True) -> Path:
    """An untrained ``test_resnet`` TB classifier (64 px) saved as a model folder with a full card."""
    import torch

    import pellucid
    from pellucid.core.model import build_classifier
    from pellucid.core.modelfolder import save_model

    torch.manual_seed(0)
    model, info = build_classifier("test_resnet", 2, pretrained=False)
    metric = {"value": 0.8, "low": 0.7, "high": 0.9}
    card = {
        "kind": "classifier", "pellucid_version": pellucid.__version__, "created": "2026-01-01T00:00:00+00:00",
        "task": "tb", "title": "Tuberculosis on chest X-ray", "classes": ["normal", "tuberculosis"],
        "positive_class": "tuberculosis", "modality": "CXR", "intended_use": INTENDED_USE,
        "explainers": ["gradcam"], "backbone": model.spec.to_dict(), "weights": info,
        "preprocessing": {"image_size": 64, "channels_in": 1, "resize": "squash", "input_range": [0.0, 1.0],
                          "mean": list(model.spec.mean), "std": list(model.spec.std)},
        "threshold": {"policy": "youden", "value": 0.5, "positive_class": "tuberculosis"},
        "calibration": {"temperature": 1.0, "ece_before": 0.1, "ece_after": 0.05},
        "metrics": {"n": 20, "metrics": {"accuracy": metric, "auroc": metric},
                    "confusion_matrix": [[8, 2], [2, 8]], "per_class": {}},
        "split": {"hash": "abc123", "train": 40, "val": 10, "test": 20},
        "training": {"seconds": 1.0, "data": "tb_cxr (test)"},
        "recipe": {},
    }
    save_model(folder, model, card)
    if with_plots:
        from pellucid.core.plots import plot_confusion

        plot_confusion(np.array([[8, 2], [2, 8]]), card["classes"], Path(folder) / "plots" / "confusion.png")
    return Path(folder)


def write_png(path: Path, seed: int = 0, colour: bool = False, size: int = 80) -> Path:
    """A seeded random image (grey unless ``colour``), as PNG."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    if colour:
        arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    else:
        g = rng.integers(0, 256, (size, size), dtype=np.uint8)
        arr = np.stack([g, g, g], axis=2)
    Image.fromarray(arr).save(path)
    return path


def write_dicom(path: Path, *, pixels: bool = True, seed: int = 0, burned_in: str | None = None) -> Path:
    """A small CT-like DICOM with patient tags ``Doe^Jane`` / ``SECRET123`` (no pixels if asked; ``burned_in``:
    its Burned In Annotation, ``"YES"`` or ``"NO"``)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = "19700101"
    ds.InstitutionName = "Hospital of Secrets"
    ds.ReferringPhysicianName = "House^Gregory"
    if burned_in is not None:
        ds.BurnedInAnnotation = burned_in
    if pixels:
        rng = np.random.default_rng(seed)
        yy, xx = np.mgrid[0:64, 0:64]
        arr = (1000 * np.exp(-((yy - 32) ** 2 + (xx - 32) ** 2) / 300.0) + rng.normal(0, 30, (64, 64)) - 500)
        arr = arr.astype(np.int16)
        ds.Rows, ds.Columns = arr.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope = 1
        ds.RescaleIntercept = 0
        ds.WindowCenter = 0
        ds.WindowWidth = 1000
        ds.PixelData = arr.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)
    return path


# --------------------------------------------------------------------------------------------
# lung segmenters for the outline / lung-share tests

def write_lungs_png(path: Path, seed: int = 0, size: int = 80) -> Path:
    """A grey 'chest X-ray': dark background, two bright upright rectangles (the 'lungs'), noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    g = rng.uniform(0.0, 0.2, (size, size))
    a, b = size // 8, size // 2 - size // 16
    g[a:size - a, a:b] = rng.uniform(0.8, 1.0, (size - 2 * a, b - a))
    g[a:size - a, size - b:size - a] = rng.uniform(0.8, 1.0, (size - 2 * a, b - a))
    arr = (g * 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.stack([arr] * 3, axis=2)).save(path)
    return path


def bright_segmenter():
    """A stand-in lung segmenter module: bright pixels (> 0.5) are 'lung' (same interface as the
    U-Net: ``(B, 1, S, S)`` in [0, 1] → logits, ``image_size`` attribute)."""
    import torch
    from torch import nn

    class BrightSegmenter(nn.Module):
        image_size = 32

        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.tensor(40.0))

        def forward(self, x):
            return (x - 0.5) * self.gain

    return BrightSegmenter().eval()


def tiny_segmenter_folder(folder: Path) -> Path:
    """An untrained tiny MONAI U-Net (32 px) saved as a segmentation model folder."""
    import torch

    from pellucid.core.modelfolder import save_model
    from pellucid.core.segmentation import build_unet

    torch.manual_seed(0)
    arch = {"channels": [4, 8], "strides": [2], "num_res_units": 0}
    model = build_unet(**arch)
    card = {"kind": "segmentation", "task": "tb-lungseg", "title": "Lung segmentation on chest X-ray",
            "classes": ["background", "lung"], "modality": "CXR", "image_size": 32, "architecture": arch,
            "preprocessing": {"image_size": 32, "channels_in": 1, "resize": "squash", "input_range": [0.0, 1.0]}}
    return save_model(folder, model, card)


def tiny_masked_model_folder(folder: Path, segmenter_folder: Path) -> Path:
    """:func:`tiny_model_folder` trained as if with ``--preprocess lung-mask --segmenter SEG``."""
    import json

    tiny_model_folder(folder, with_plots=False)
    card = json.loads((folder / "card.json").read_text())
    card["preprocessing"].update({"preprocess": "lung-mask", "segmenter": str(Path(segmenter_folder).resolve())})
    (folder / "card.json").write_text(json.dumps(card, indent=1))
    return Path(folder)
