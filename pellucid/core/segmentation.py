"""Lung segmentation of chest X-rays: a MONAI U-Net, trained, scored, saved and applied.

This module owns the model folders of kind ``"segmentation"``. :func:`train_segmenter` reads a
``manifest.csv`` (``path,mask,label,group,source``, the layout of the ``tb_lungs`` data set), makes
the project's grouped split, trains MONAI's 2-D :class:`~monai.networks.nets.UNet` (Ronneberger et
al., "U-Net: Convolutional Networks for Biomedical Image Segmentation", MICCAI 2015, with residual
units after Kerfoot et al., 2018) with :class:`~monai.losses.DiceCELoss` on a Lightning ``Trainer``
(light MONAI augmentation, early stopping on validation Dice), then scores the held-out test split at
each mask's own resolution with MONAI's :class:`~monai.metrics.DiceMetric` and
:class:`~monai.metrics.HausdorffDistanceMetric` (95th percentile, in pixels), with percentile
bootstrap intervals over images. :func:`segment` turns one :class:`~pellucid.datasets.readers.Image`
into a boolean mask at the image's original size (sigmoid > 0.5, the two largest connected
components kept); :func:`predict_masks` serves ``pellucid predict`` on a segmentation folder;
:func:`apply_lung_mask` is the ``lung-mask`` / ``lung-crop`` preprocessing for TB classification.
"""
from __future__ import annotations

import csv
import json
import logging
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from pellucid.core.card import ModelCard, as_card
from pellucid.datasets.readers import Image, ImageReadError, read_image
from pellucid.datasets.samples import read_manifest
from pellucid.registry import did_you_mean

__all__ = [
    "SEG_CLASSES", "SEG_TASK", "SegmentationError", "SegConfig", "build_unet", "train_segmenter",
    "load_segmenter", "segment", "segment_many", "predict_masks", "apply_lung_mask", "dice_scores",
    "hd95_scores", "segmentation_metrics", "bootstrap_interval", "keep_largest_components",
    "read_seg_manifest", "LungMasker", "PREPROCESS_CHOICES",
]

log = logging.getLogger(__name__)

SEG_CLASSES = ["background", "lung"]
SEG_TASK = "tb-lungseg"
PREPROCESS_MODES = ("mask", "crop")
#: recipe / card values of ``preprocess`` and the :func:`apply_lung_mask` mode each one means
PREPROCESS_CHOICES = {"none": None, "lung-mask": "mask", "lung-crop": "crop"}


class SegmentationError(ValueError):
    """A segmentation data set, model folder or request that cannot be used as given."""


@dataclass
class SegConfig:
    """Everything that decides a segmenter training run (saved as ``config.json``)."""

    image_size: int = 128
    epochs: int = 18
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 1e-4
    patience: int = 6
    channels: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int, ...] = (2, 2, 2)
    num_res_units: int = 1
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    seed: int = 0
    max_images: int | None = None
    n_boot: int = 1000
    augment: bool = True
    progress: bool = True
    threads: int | None = None


# ----------------------------------------------------------------------------- model
def build_unet(channels: Sequence[int] = (16, 32, 64, 128), strides: Sequence[int] = (2, 2, 2),
               num_res_units: int = 1) -> nn.Module:
    """MONAI 2-D U-Net: ``(B, 1, S, S)`` grayscale in [0, 1] → ``(B, 1, S, S)`` lung logits.

    ``S`` must be divisible by ``prod(strides)``.
    """
    from monai.networks.nets import UNet

    if len(strides) != len(channels) - 1:
        raise SegmentationError(f"a U-Net with {len(channels)} channel levels needs {len(channels) - 1} strides, "
                                f"got {len(strides)}")
    return UNet(spatial_dims=2, in_channels=1, out_channels=1, channels=tuple(channels), strides=tuple(strides),
                num_res_units=num_res_units)


def _arch(card: ModelCard) -> dict:
    arch = card.extra.get("architecture") or {}
    return {"channels": tuple(arch.get("channels", (16, 32, 64, 128))),
            "strides": tuple(arch.get("strides", (2, 2, 2))),
            "num_res_units": int(arch.get("num_res_units", 1))}


def load_segmenter(folder: str | Path, card: ModelCard) -> nn.Module:
    """Rebuild the U-Net described by ``card`` and load ``model.safetensors`` (no pickles).

    The returned module is in eval mode and carries ``image_size`` and ``card`` attributes, which
    :func:`segment` uses.
    """
    from safetensors.torch import load_file

    from pellucid.core.modelfolder import ModelFolderError

    folder = Path(folder)
    weights = folder / "model.safetensors"
    if not weights.exists():
        raise ModelFolderError(f"{folder} has no model.safetensors: the segmenter training did not finish; retrain")
    model = build_unet(**_arch(card))
    try:
        model.load_state_dict(load_file(str(weights)))
    except RuntimeError as err:
        raise ModelFolderError(f"{weights} does not fit the U-Net of its card ({_arch(card)}): "
                               f"{str(err).splitlines()[0]}") from err
    model.image_size = int(card.image_size)
    model.card = card
    model._pellucid_folder = str(folder)
    return model.eval()


def _as_segmenter(model_or_folder) -> nn.Module:
    if isinstance(model_or_folder, nn.Module):
        return model_or_folder
    from pellucid.core.modelfolder import load_model

    model, card = load_model(model_or_folder)
    if card.kind != "segmentation":
        raise SegmentationError(f"{model_or_folder} is a {card.kind!r} model folder; "
                                "give a segmentation folder (written by `pellucid train tb-lungseg`)")
    return model


# ----------------------------------------------------------------------------- pixels
def _gray(image: Image | np.ndarray) -> np.ndarray:
    """``(H, W)`` float32 in [0, 1] from an Image or array (colour → luminance)."""
    if isinstance(image, Image):
        return image.gray[..., 0]
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr[..., 0] if arr.shape[2] == 1 else arr[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)
    return arr


def _resize(arr: np.ndarray, size: int) -> np.ndarray:
    import cv2

    h, w = arr.shape[:2]
    if (h, w) == (size, size):
        return arr.astype(np.float32)
    interp = cv2.INTER_AREA if min(h, w) > size else cv2.INTER_LINEAR
    return cv2.resize(arr.astype(np.float32), (size, size), interpolation=interp)


def keep_largest_components(mask: np.ndarray, n: int = 2) -> np.ndarray:
    """Boolean ``(H, W)`` mask with only its ``n`` largest 8-connected components."""
    from skimage.measure import label

    lab = label(mask, connectivity=2)
    if lab.max() <= n:
        return mask.astype(bool)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    keep = np.argsort(sizes)[::-1][:n]
    return np.isin(lab, keep)


@torch.inference_mode()
def segment_many(model: nn.Module | str | Path, images: Sequence[Image | np.ndarray], *, threshold: float = 0.5,
                 components: int = 2, batch_size: int = 16) -> list[np.ndarray]:
    """Lung masks for several images, each ``(H, W)`` bool at that image's original size."""
    import torch.nn.functional as F

    model = _as_segmenter(model)
    size = int(getattr(model, "image_size", 128))
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[np.ndarray] = []
    grays = [_gray(im) for im in images]
    for i in range(0, len(grays), batch_size):
        chunk = grays[i:i + batch_size]
        x = torch.from_numpy(np.stack([_resize(g, size) for g in chunk]))[:, None].to(device)
        prob = torch.sigmoid(model(x).float())
        for g, p in zip(chunk, prob):
            p = F.interpolate(p[None], size=g.shape, mode="bilinear", align_corners=False)[0, 0]
            m = (p > threshold).cpu().numpy()
            out.append(keep_largest_components(m, components) if components else m)
    model.train(was)
    return out


def segment(model: nn.Module | str | Path, image: Image | np.ndarray, *, threshold: float = 0.5,
            components: int = 2) -> np.ndarray:
    """The lung mask of one image: ``(H, W)`` ``np.bool_`` at the image's ORIGINAL resolution.

    The image is resized (squashed) to the model's input size, the U-Net's sigmoid is resized back
    bilinearly, thresholded at ``threshold``, and only the ``components`` largest connected regions
    are kept (two lungs).
    """
    return segment_many(model, [image], threshold=threshold, components=components)[0]


# ----------------------------------------------------------------------------- lung-mask preprocessing
def apply_lung_mask(image: Image | np.ndarray, mask: np.ndarray, mode: str = "mask", margin: float = 0.05) -> Image:
    """Classify-the-lungs preprocessing.

    Args:
        image: ``(H, W, C)`` Image (or array) in [0, 1].
        mask: ``(H, W)`` boolean lung mask at the image's resolution (e.g. from :func:`segment`).
        mode: ``"mask"`` zeroes every pixel outside the lungs (shape kept); ``"crop"`` cuts the
            lungs' bounding box, widened by ``margin`` of the image side on each edge, then masks.
        margin: crop margin as a fraction of the image height / width.

    Returns:
        A new :class:`Image` (float32 ``(h, w, C)`` in [0, 1]); ``meta['notes']`` says what was done.
        An empty mask leaves the image unchanged, with a warning.
    """
    if mode not in PREPROCESS_MODES:
        raise SegmentationError(f"unknown lung-mask mode {mode!r}"
                                + did_you_mean(str(mode), PREPROCESS_MODES, clause=True)
                                + f" (available: {', '.join(PREPROCESS_MODES)})")
    src = image if isinstance(image, Image) else Image(np.asarray(image, dtype=np.float32))
    arr = src.array
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != arr.shape[:2]:
        raise SegmentationError(f"mask shape {mask.shape} does not match the image's {arr.shape[:2]}; "
                                "segment the image at its own resolution (segment() does)")
    meta = {**src.meta, "notes": [*src.meta.get("notes", [])]}
    if not mask.any():
        warnings.warn("empty lung mask: the image is left unmasked", stacklevel=2)
        meta["notes"].append("lung mask empty: not applied")
        return Image(arr.copy(), meta)
    out = arr * mask[..., None]
    meta["notes"].append(f"lung mask applied ({mode}), {mask.mean():.1%} of pixels kept")
    if mode == "crop":
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        h, w = mask.shape
        dy, dx = int(round(margin * h)), int(round(margin * w))
        y0, y1 = max(0, rows[0] - dy), min(h, rows[-1] + 1 + dy)
        x0, x1 = max(0, cols[0] - dx), min(w, cols[-1] + 1 + dx)
        out = out[y0:y1, x0:x1]
        meta["lung_box"] = [int(y0), int(x0), int(y1), int(x1)]
    return Image(np.ascontiguousarray(out, dtype=np.float32), meta)


class LungMasker:
    """``Image -> Image`` preprocessing step: segment the lungs, then :func:`apply_lung_mask`.

    Built once per run and called on every image (thread-safe: inference only), so training's image
    cache and the predictor apply exactly the same step.

    Args:
        segmenter: a segmentation model folder or a loaded segmenter.
        mode: ``"mask"`` or ``"crop"`` (see :func:`apply_lung_mask`).
    """

    def __init__(self, segmenter: str | Path | nn.Module, mode: str = "mask"):
        if mode not in PREPROCESS_MODES:
            apply_lung_mask(np.zeros((1, 1), np.float32), np.ones((1, 1), bool), mode)  # raises did-you-mean
        self.folder = None if isinstance(segmenter, nn.Module) else str(Path(segmenter).resolve())
        self.model = _as_segmenter(segmenter)
        self.mode = mode

    def __call__(self, image: Image | np.ndarray) -> Image:
        return apply_lung_mask(image, segment(self.model, image), self.mode)

    def card_entry(self) -> dict:
        """What a classifier's card records under ``preprocessing``."""
        name = {v: k for k, v in PREPROCESS_CHOICES.items()}[self.mode]
        return {"preprocess": name, "segmenter": self.folder}

    @classmethod
    def from_settings(cls, preprocess: str | None, segmenter: str | Path | None) -> LungMasker | None:
        """From a recipe / card: ``preprocess`` in :data:`PREPROCESS_CHOICES`; None for ``"none"``."""
        key = preprocess or "none"
        if key not in PREPROCESS_CHOICES:
            raise SegmentationError(f"unknown preprocess {key!r}" + did_you_mean(key, PREPROCESS_CHOICES, clause=True)
                                    + f" (available: {', '.join(PREPROCESS_CHOICES)})")
        if PREPROCESS_CHOICES[key] is None:
            return None
        if not segmenter:
            raise SegmentationError(f"preprocess {key!r} needs a segmenter: pass --segmenter DIR (a folder written "
                                    "by `pellucid train tb-lungseg`)")
        return cls(segmenter, PREPROCESS_CHOICES[key])

    @classmethod
    def from_card(cls, card: ModelCard | dict) -> LungMasker | None:
        """The masker a classifier card asks for (``card.preprocessing.preprocess``), or None."""
        pre = as_card(card).preprocessing
        return cls.from_settings(pre.preprocess, pre.segmenter)


# ----------------------------------------------------------------------------- metrics
def _to_tensor_masks(masks) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(masks)).float()
    if t.ndim == 2:
        t = t[None]
    return t[:, None]  # (N, 1, H, W)


def dice_scores(pred, target) -> np.ndarray:
    """Per-image Dice of binary masks ``(N, H, W)`` (or one ``(H, W)``) with MONAI's DiceMetric.

    An image whose reference mask is empty gets NaN (Dice is undefined there).
    """
    from monai.metrics import DiceMetric

    metric = DiceMetric(include_background=True, reduction="none", ignore_empty=True)
    return metric(_to_tensor_masks(pred), _to_tensor_masks(target)).numpy()[:, 0].astype(np.float64)


def hd95_scores(pred, target) -> np.ndarray:
    """Per-image 95th-percentile symmetric Hausdorff distance in pixels (MONAI), ``(N,)``.

    NaN (with MONAI's warning) where the prediction or the reference is empty.
    """
    from monai.metrics import HausdorffDistanceMetric

    metric = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(all 0|empty).*")
        # MONAI 1.5-1.6 warns about its own internal call (get_mask_edges); nothing a caller can change
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        vals = metric(_to_tensor_masks(pred), _to_tensor_masks(target)).numpy()[:, 0].astype(np.float64)
    vals[~np.isfinite(vals)] = np.nan
    return vals


def bootstrap_interval(values: Sequence[float], *, n_boot: int = 1000, seed: int = 0, level: float = 0.95
                       ) -> dict:
    """Mean of per-image scores with a percentile bootstrap interval (images resampled).

    Returns:
        ``{"value", "low", "high", "n"}``; NaN scores are left out (with a warning); all NaN → NaNs.
    """
    v = np.asarray(values, dtype=np.float64)
    ok = v[np.isfinite(v)]
    if len(ok) < len(v):
        warnings.warn(f"{len(v) - len(ok)} of {len(v)} per-image scores undefined (NaN), left out", stacklevel=2)
    if len(ok) == 0:
        return {"value": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0}
    rng = np.random.default_rng(seed)
    means = ok[rng.integers(0, len(ok), size=(n_boot, len(ok)))].mean(1)
    a = (1 - level) / 2
    return {"value": float(ok.mean()), "low": float(np.quantile(means, a)), "high": float(np.quantile(means, 1 - a)),
            "n": int(len(ok))}


def segmentation_metrics(preds: Sequence[np.ndarray], targets: Sequence[np.ndarray], *, n_boot: int = 1000,
                         seed: int = 0) -> dict:
    """Dice and HD95 (pixels) of paired masks of any sizes (each pair the same size), with 95 % intervals.

    Returns:
        ``{"dice": {...}, "hd95": {...}, "per_image": {"dice": [...], "hd95": [...]}}``.
    """
    dice = np.array([dice_scores(p, t)[0] for p, t in zip(preds, targets)])
    hd = np.array([hd95_scores(p, t)[0] for p, t in zip(preds, targets)])
    return {"dice": bootstrap_interval(dice, n_boot=n_boot, seed=seed),
            "hd95": {**bootstrap_interval(hd, n_boot=n_boot, seed=seed), "unit": "pixels at the mask's resolution"},
            "per_image": {"dice": [float(x) for x in dice], "hd95": [float(x) for x in hd]}}


# ----------------------------------------------------------------------------- data
def read_seg_manifest(data_dir: str | Path) -> list[dict]:
    """Rows of ``data_dir/manifest.csv`` (``path,mask,label,group,source``) with absolute paths."""
    data_dir = Path(data_dir)
    manifest = data_dir / "manifest.csv"
    if not manifest.exists():
        raise SegmentationError(f"{data_dir} has no manifest.csv: a segmentation data set needs one with columns "
                                "path,mask,label,group (the tb_lungs layout)")
    rows = read_manifest(manifest, ("path", "mask", "group"), SegmentationError)
    if not rows:
        raise SegmentationError(f"{manifest}: has no rows; list one image per line (path,mask,label,group)")
    for r in rows:
        r["path"] = str(data_dir / r["path"])
        r["mask"] = str(data_dir / r["mask"])
        r.setdefault("label", "")
    return rows


def _read_mask(path: str | Path) -> np.ndarray:
    """A binary mask (gray above one half), read through the same door as the images: its pixel budget,
    its decoders and its one-line refusals (``ImageReadError``)."""
    return read_image(path, channels=1).array[..., 0] > 0.5


def _load_pairs(rows: list[dict], size: int, progress: bool) -> tuple[np.ndarray, np.ndarray, list[int], list[str]]:
    """Images ``(N, S, S)`` float32 and masks ``(N, S, S)`` float32 at training size; skipped rows."""
    from tqdm.auto import tqdm

    xs, ys, ok, bad = [], [], [], []
    for i, r in enumerate(tqdm(rows, desc="reading images", disable=not progress, leave=False)):
        try:
            img = _gray(read_image(r["path"], channels=1))
            m = _read_mask(r["mask"]).astype(np.float32)
        except ImageReadError as err:
            bad.append(str(err))
            continue
        xs.append(_resize(img, size))
        ys.append((_resize(m, size) > 0.5).astype(np.float32))
        ok.append(i)
    if not xs:
        return np.zeros((0, size, size), np.float32), np.zeros((0, size, size), np.float32), ok, bad
    return np.stack(xs), np.stack(ys), ok, bad


class _PairDataset(torch.utils.data.Dataset):
    def __init__(self, x: np.ndarray, y: np.ndarray, augment: bool, seed: int):
        self.x, self.y = torch.from_numpy(x)[:, None], torch.from_numpy(y)[:, None]
        self.tf = None
        if augment:
            from monai.transforms import Compose, RandAdjustContrastd, RandAffined, RandGaussianNoised

            self.tf = Compose([
                RandAffined(keys=("image", "label"), prob=0.7, rotate_range=0.15, scale_range=(0.1, 0.1),
                            translate_range=(0.06 * x.shape[-1], 0.06 * x.shape[-1]),
                            mode=("bilinear", "nearest"), padding_mode="zeros"),
                RandAdjustContrastd(keys="image", prob=0.5, gamma=(0.7, 1.5)),
                RandGaussianNoised(keys="image", prob=0.2, std=0.02),
            ])
            self.tf.set_random_state(seed)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        x, y = self.x[i], self.y[i]
        if self.tf is not None:
            d = self.tf({"image": x, "label": y})
            x, y = torch.as_tensor(d["image"]).float().clamp(0, 1), torch.as_tensor(d["label"]).float()
        return x, y


def _make_module(model: nn.Module, cfg: SegConfig):
    from monai.losses import DiceCELoss
    from monai.metrics import DiceMetric

    from pellucid.core.trainer import LightningModule

    class SegmenterModule(LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model
            self.loss = DiceCELoss(sigmoid=True)
            self.dice = DiceMetric(include_background=True, reduction="mean")

        def forward(self, x):
            return self.model(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = self.loss(self.model(x), y)
            self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(x))
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            logits = self.model(x)
            self.log("val_loss", self.loss(logits, y), prog_bar=True, batch_size=len(x))
            self.dice((logits > 0).float(), y)

        def on_validation_epoch_end(self):
            self.log("val_dice", self.dice.aggregate().item(), prog_bar=True)
            self.dice.reset()

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
            total = max(1, int(self.trainer.estimated_stepping_batches))
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=0.15)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return SegmenterModule()


# ----------------------------------------------------------------------------- training
def train_segmenter(data_dir: str | Path, out: str | Path, *, image_size: int = 128, epochs: int = 18,
                    seed: int = 0, max_images: int | None = None, **overrides) -> Path:
    """Train the lung U-Net on a ``manifest.csv`` data set and write a segmentation model folder.

    Args:
        data_dir: folder with ``manifest.csv`` (``path,mask,label,group[,source]``), e.g. tb_lungs.
        out: model folder to write (``model.safetensors``, ``card.json``, ``config.json``,
            ``split.json``, ``metrics.json``, ``logs/``).
        image_size: training side in pixels (divisible by the product of the strides).
        epochs: maximum epochs (early stopping on validation Dice, ``patience`` epochs).
        seed: split, initialisation and augmentation seed.
        max_images: use a seeded random subset of this many images (quick runs, tests).
        **overrides: other :class:`SegConfig` fields (``batch_size``, ``lr``, ``channels``, ...).

    Returns:
        The model folder path.
    """
    from pellucid.core.modelfolder import save_model
    from pellucid.core.trainer import seed_everything
    from pellucid.core.runs import check_data_path, check_out_path

    check_data_path(data_dir)  # a file as out, an unwritable or unreadable folder: one line, before any work
    check_out_path(out)
    cfg = _seg_config(image_size=image_size, epochs=epochs, seed=seed, max_images=max_images, **overrides)
    t0, c0 = time.time(), time.process_time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({"data": str(data_dir), **asdict(cfg)}, indent=1, default=str))

    rows, split = _seg_split(data_dir, cfg, out)
    x, y, ok, bad = _load_pairs(rows, cfg.image_size, cfg.progress)
    pos = {row: k for k, row in enumerate(ok)}
    parts = {p: [pos[i] for i in split[p] if i in pos] for p in ("train", "val", "test")}
    for p, idx in parts.items():
        if not idx:
            raise SegmentationError(f"the {p} split has no readable image/mask pairs; check {data_dir}")

    model, fit = _fit_unet(cfg, x, y, parts, out)
    metrics = _score_segmenter(model, [rows[ok[k]] for k in parts["test"]], cfg, out)
    card = _seg_card(cfg, split, parts, metrics, training={
        "seconds": round(time.time() - t0, 1), "fit_seconds": fit["fit_seconds"],
        "cpu_seconds": round(time.process_time() - c0, 1), "epochs_run": fit["epochs_run"],
        "max_epochs": cfg.epochs, "stopped_early": fit["stopped_early"], "best_val_dice": fit["best_val_dice"],
        "torch_threads": torch.get_num_threads(), "device": "cpu",
        "loss": "monai.losses.DiceCELoss(sigmoid=True)", "optimizer": "AdamW + OneCycle",
        "data": str(Path(data_dir).resolve()), "skipped_files": bad})
    save_model(out, model, card)
    log.info("segmentation folder %s: test Dice %.4f [%.4f, %.4f], HD95 %.2f px", out, metrics["dice"]["value"],
             metrics["dice"]["low"], metrics["dice"]["high"], metrics["hd95"]["value"])
    return out


def _seg_config(**options) -> SegConfig:
    """The :class:`SegConfig` of ``options``; did-you-mean on an unknown option, and the image size
    checked against the U-Net's strides."""
    unknown = set(options) - set(SegConfig.__dataclass_fields__)
    if unknown:
        key = sorted(unknown)[0]
        raise TypeError(f"train_segmenter() got an unknown option {key!r}"
                        + did_you_mean(key, SegConfig.__dataclass_fields__, clause=True))
    cfg = SegConfig(**options)
    if cfg.image_size % int(np.prod(cfg.strides)):
        raise SegmentationError(f"image_size {cfg.image_size} is not divisible by {int(np.prod(cfg.strides))} "
                                f"(the product of strides {cfg.strides})")
    return cfg


def _seg_split(data_dir: str | Path, cfg: SegConfig, out: Path) -> tuple[list[dict], dict]:
    """The manifest rows used (a seeded subset with ``max_images``) and their grouped split, saved as
    ``out/split.json``."""
    from pellucid.datasets.samples import Sample
    from pellucid.datasets.splits import grouped_split, save_split

    if not (isinstance(cfg.test_fraction, (int, float)) and 0 < cfg.test_fraction < 0.9):
        raise SegmentationError(f"test_fraction {cfg.test_fraction!r}: the lung segmenter is scored on its test part "
                                "(Dice, HD95) and needs one; give a fraction between 0 and 0.9")
    rows = read_seg_manifest(data_dir)
    if cfg.max_images:
        keep = sorted(np.random.default_rng(cfg.seed).permutation(len(rows))[: cfg.max_images])
        rows = [rows[i] for i in keep]
    samples = [Sample(path=r["path"], label=r["label"] or "lung", group=r["group"]) for r in rows]
    split = grouped_split(samples, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=cfg.seed)
    save_split(out / "split.json", samples, split)
    log.info("split %s: train %d, val %d, test %d", split["hash"], len(split["train"]), len(split["val"]),
             len(split["test"]))
    return rows, split


def _fit_unet(cfg: SegConfig, x: np.ndarray, y: np.ndarray, parts: dict, out: Path) -> tuple[nn.Module, dict]:
    """Train the U-Net on the training part, early-stopping on validation Dice, and reload the best
    checkpoint.

    Returns:
        ``(model, facts)``: the model on the CPU in eval mode (``image_size`` set), and the card's
        training facts ``fit_seconds``, ``epochs_run``, ``stopped_early`` and ``best_val_dice``.
    """
    from pellucid.core.trainer import EarlyStopping, ModelCheckpoint, make_trainer

    model = build_unet(cfg.channels, cfg.strides, cfg.num_res_units)
    module = _make_module(model, cfg)
    dl = torch.utils.data.DataLoader
    train_dl = dl(_PairDataset(x[parts["train"]], y[parts["train"]], cfg.augment, cfg.seed),
                  batch_size=cfg.batch_size, shuffle=True, drop_last=len(parts["train"]) > cfg.batch_size,
                  generator=torch.Generator().manual_seed(cfg.seed))
    val_dl = dl(_PairDataset(x[parts["val"]], y[parts["val"]], False, cfg.seed), batch_size=32)
    ckpt = ModelCheckpoint(dirpath=out / "checkpoints", filename="best", monitor="val_dice", mode="max")
    trainer = make_trainer(
        max_epochs=cfg.epochs, accelerator="auto", devices=1, log_dir=out,
        callbacks=[ckpt, EarlyStopping(monitor="val_dice", mode="max", patience=cfg.patience)],
        progress=cfg.progress, log_every_n_steps=max(1, min(10, len(train_dl))),
        deterministic=None,  # leaves torch's global deterministic-algorithms setting as it is
    )
    t_fit = time.time()
    trainer.fit(module, train_dl, val_dl)
    fit_seconds = time.time() - t_fit
    if ckpt.best_model_path and Path(ckpt.best_model_path).exists():
        module.load_state_dict(torch.load(ckpt.best_model_path, map_location="cpu", weights_only=True)["state_dict"])
    model = module.model.cpu().eval()
    model.image_size = cfg.image_size
    best_val = ckpt.best_model_score
    return model, {"fit_seconds": round(fit_seconds, 1), "epochs_run": trainer.current_epoch,
                   "stopped_early": bool(trainer.should_stop),
                   "best_val_dice": float(best_val) if best_val is not None else None}


def _score_segmenter(model: nn.Module, test_rows: list[dict], cfg: SegConfig, out: Path) -> dict:
    """Dice and HD95 on the test rows at each mask's own resolution, after the same post-processing
    as :func:`segment`; writes ``out/metrics.json`` (with per-image scores) and returns the summary."""
    preds, targets = [], []
    for r in test_rows:
        preds.append(segment(model, read_image(r["path"], channels=1)))
        targets.append(_read_mask(r["mask"]))
    metrics = segmentation_metrics(preds, targets, n_boot=cfg.n_boot, seed=cfg.seed)
    per_image = metrics.pop("per_image")
    (out / "metrics.json").write_text(json.dumps(
        {**metrics, "per_image": [{"path": r["path"], "dice": d, "hd95": h}
                                  for r, d, h in zip(test_rows, per_image["dice"], per_image["hd95"])]}, indent=1))
    return metrics


def _seg_card(cfg: SegConfig, split: dict, parts: dict, metrics: dict, training: dict) -> ModelCard:
    """The card of a segmentation model folder."""
    import pellucid

    return ModelCard.from_dict({
        "kind": "segmentation",
        "pellucid_version": pellucid.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "task": SEG_TASK,
        "title": "Lung segmentation on chest X-ray",
        "classes": list(SEG_CLASSES),
        "modality": "CXR",
        "intended_use": "Research use only: lung fields of frontal chest radiographs, for lung-mask preprocessing "
                        "and explanation checks. Not a medical device.",
        "image_size": cfg.image_size,
        "architecture": {"name": "monai.networks.nets.UNet", "spatial_dims": 2, "in_channels": 1,
                         "out_channels": 1, "channels": list(cfg.channels), "strides": list(cfg.strides),
                         "num_res_units": cfg.num_res_units},
        "preprocessing": {"image_size": cfg.image_size, "channels_in": 1, "resize": "squash",
                          "input_range": [0.0, 1.0]},
        "postprocessing": {"activation": "sigmoid", "threshold": 0.5, "keep_largest_components": 2,
                           "resize_back": "bilinear, to the input's original size"},
        "metrics": {**metrics, "split": "test", "resolution": "each mask's own (256 px for tb_lungs)",
                    "interval": "95% percentile bootstrap over images", "n_boot": cfg.n_boot},
        "split": {"hash": split["hash"], "seed": cfg.seed, "train": len(parts["train"]), "val": len(parts["val"]),
                  "test": len(parts["test"]), "file": "split.json"},
        "training": training,
        "recipe": {k: v for k, v in asdict(cfg).items() if k not in ("progress",)},
    })


# ----------------------------------------------------------------------------- prediction
def predict_masks(folder: str | Path | nn.Module, paths: Sequence[str | Path], out_dir: str | Path, *,
                  progress: bool = False) -> list[dict]:
    """Segment files and write one mask PNG (0/255, same name and size as the input) per image.

    Also writes ``out_dir/masks.csv`` with ``path,mask_path,lung_fraction,error``; an unreadable file
    gets a row with its error instead of stopping the run. Folders in ``paths`` expand recursively.
    Mask files always get a ``.png`` suffix (``scan.dcm`` → ``scan.png``).

    Returns:
        The CSV rows as dicts.
    """
    from PIL import Image as PILImage
    from tqdm.auto import tqdm

    from pellucid.datasets.samples import find_images

    model = _as_segmenter(folder)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for f in tqdm(find_images(list(paths)), desc="segmenting", disable=not progress, leave=False):
        try:
            image = read_image(f, channels=1)
        except ImageReadError as err:
            rows.append({"path": str(f), "mask_path": "", "lung_fraction": "", "error": str(err)})
            continue
        mask = segment(model, image)
        target = out_dir / (Path(f).stem + ".png")
        PILImage.fromarray(mask.astype(np.uint8) * 255).save(target)
        rows.append({"path": str(f), "mask_path": str(target), "lung_fraction": f"{mask.mean():.6f}", "error": ""})
    with (out_dir / "masks.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "mask_path", "lung_fraction", "error"])
        w.writeheader()
        w.writerows(rows)
    bad = [r for r in rows if r["error"]]
    if bad:
        log.warning("%d of %d file(s) could not be read:\n  %s", len(bad), len(rows), "\n  ".join(r["error"] for r in bad))
    return rows
