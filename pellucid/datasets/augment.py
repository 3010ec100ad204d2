"""Augmentation presets (albumentations), named in each TaskSpec.

Each preset is a function ``size -> albumentations.Compose`` that works on uint8 RGB arrays of shape
``(size, size, 3)`` and returns the same shape. Presets are chosen for their modality: small
geometric and contrast changes for chest X-rays, skin-tone-widening colour jitter for skin photos,
stain/colour jitter and rotations for H&E patches, speckle-like noise for sonar.
"""
from __future__ import annotations

import random
from typing import Callable

import albumentations as A
import numpy as np

from pellucid.registry import unknown_name_error

__all__ = ["get_augment", "list_augments", "register_augment", "seed_augment", "seed_worker_augment"]

_PRESETS: dict[str, Callable[[int], A.Compose]] = {}


def register_augment(name: str):
    """Decorator registering an augmentation preset factory ``size -> Compose``."""
    def deco(fn):
        _PRESETS[name] = fn
        return fn
    return deco


def list_augments() -> list[str]:
    return sorted(_PRESETS)


def get_augment(name: str, size: int, seed: int | None = None) -> A.Compose:
    """The preset ``name`` for square images of side ``size``.

    ``seed`` seeds the pipeline's random generators. albumentations 2 draws augmentations from
    generators inside each ``Compose``, seeded from the operating system unless given a seed —
    ``random.seed``, ``numpy.random.seed`` and ``torch.manual_seed`` do not reach them — so without
    it two training runs with the same recipe seed see different augmentations (on the waste recipe
    at 320 px, two such runs ended 5.4 points apart in test accuracy). The seed goes in through
    :func:`seed_augment`, not albumentations' own ``seed=``: that gives every transform its own
    generator with the *same* seed, so transforms draw the same numbers in lockstep (with a
    horizontal and a vertical flip of p=0.5 each, one happened exactly when the other did).
    """
    if name not in _PRESETS:
        raise unknown_name_error("augmentation preset", name, list(_PRESETS))
    compose = _PRESETS[name](size)
    if seed is not None:
        seed_augment(compose, seed)
    return compose


def seed_augment(compose: A.Compose, seed: int) -> A.Compose:
    """Seed a pipeline with one numpy and one Python generator shared by all its transforms, so they
    draw one after another from a single reproducible stream (independent of each other)."""
    compose.set_random_state(np.random.default_rng(int(seed)), random.Random(int(seed)))
    return compose


def seed_worker_augment(worker_id: int) -> None:
    """``DataLoader`` ``worker_init_fn``: every worker reseeds its copy of the dataset's augmentation
    with its own torch seed (the loader's base seed, drawn from the seeded main process, plus the
    worker id), so workers neither repeat each other's augmentations nor lose reproducibility."""
    import torch

    info = torch.utils.data.get_worker_info()
    augment = getattr(getattr(info, "dataset", None), "augment", None)
    if isinstance(augment, A.BaseCompose):
        seed_augment(augment, torch.initial_seed() % 2 ** 32)


@register_augment("none")
def _none(size: int) -> A.Compose:
    return A.Compose([])


@register_augment("cxr")
def _cxr(size: int) -> A.Compose:
    return A.Compose([
        A.Affine(scale=(0.9, 1.1), translate_percent=(-0.05, 0.05), rotate=(-7, 7), p=0.7),
        A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=0.7),
        A.RandomGamma(gamma_limit=(85, 115), p=0.3),
    ])


@register_augment("natural")
def _natural(size: int) -> A.Compose:
    return A.Compose([
        A.RandomResizedCrop(size=(size, size), scale=(0.6, 1.0), p=1.0),
        A.HorizontalFlip(p=0.5),
        A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=0.7),
    ])


@register_augment("skin")
def _skin(size: int) -> A.Compose:
    # Wide hue/saturation/value shifts widen the range of skin tones seen in training.
    return A.Compose([
        A.RandomResizedCrop(size=(size, size), scale=(0.6, 1.0), p=1.0),
        A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.2),
        A.HueSaturationValue(hue_shift_limit=12, sat_shift_limit=30, val_shift_limit=30, p=0.8),
        A.RandomBrightnessContrast(0.25, 0.25, p=0.5),
    ])


@register_augment("histo")
def _histo(size: int) -> A.Compose:
    return A.Compose([
        A.RandomRotate90(p=1.0), A.HorizontalFlip(p=0.5),
        A.HueSaturationValue(hue_shift_limit=8, sat_shift_limit=20, val_shift_limit=12, p=0.8),
        A.RandomBrightnessContrast(0.15, 0.15, p=0.5),
    ])


@register_augment("sonar")
def _sonar(size: int) -> A.Compose:
    return A.Compose([
        A.HorizontalFlip(p=0.5),
        A.Affine(scale=(0.9, 1.1), rotate=(-10, 10), p=0.5),
        A.MultiplicativeNoise(multiplier=(0.8, 1.2), per_channel=False, elementwise=True, p=0.5),
        A.RandomBrightnessContrast(0.2, 0.2, p=0.5),
    ])


# ----------------------------------------------------------------------------- colour-space presets
class SkinToneShift(A.ImageOnlyTransform):
    """Move skin tone along the axes melanin moves it: CIELAB lightness and yellowness.

    Darker and lighter skin differ mostly in L* (lightness) and b* (yellow-blue), much less in a*
    (red-green); the individual typology angle ``atan((L* - 50) / b*)`` used to grade skin tone is
    built from those two. Scaling L* and shifting b* (and a little a*) therefore widens the range of
    skin tones a model sees, the colour-space answer of MSLD v2.0 (Ali et al., 2023) to the racial
    bias of skin-photo sets. Works on uint8 RGB ``(H, W, 3)``.

    Args:
        lightness: range of the factor applied to L*.
        a_shift, b_shift: ranges of the shifts added to a* and b* (in OpenCV's 8-bit Lab units).
        p: probability of applying the transform.
    """

    def __init__(self, lightness: tuple[float, float] = (0.6, 1.15), a_shift: tuple[float, float] = (-4.0, 8.0),
                 b_shift: tuple[float, float] = (-6.0, 14.0), p: float = 0.8):
        super().__init__(p=p)
        self.lightness = tuple(lightness)
        self.a_shift = tuple(a_shift)
        self.b_shift = tuple(b_shift)

    def get_params(self) -> dict:
        return {"lf": self.py_random.uniform(*self.lightness), "da": self.py_random.uniform(*self.a_shift),
                "db": self.py_random.uniform(*self.b_shift)}

    def apply(self, img, lf: float = 1.0, da: float = 0.0, db: float = 0.0, **params):
        import cv2
        import numpy as np

        lab = cv2.cvtColor(img, cv2.COLOR_RGB2LAB).astype(np.float32)
        lab[..., 0] *= lf
        lab[..., 1] += da
        lab[..., 2] += db
        return cv2.cvtColor(np.clip(lab + 0.5, 0, 255).astype(np.uint8), cv2.COLOR_LAB2RGB)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("lightness", "a_shift", "b_shift")


class HEDJitter(A.ImageOnlyTransform):
    """H&E stain augmentation in haematoxylin-eosin-DAB optical-density space.

    Colour deconvolution with the Ruifrok & Johnston (2001) stain vectors; each stain channel is
    scaled by ``alpha ~ U(1 - sigma, 1 + sigma)`` and shifted by ``beta ~ U(-bias, bias)``, then the
    image is recomposed — the "HED" augmentation of Tellez et al., "Quantifying the effects of data
    augmentation and stain color normalization in convolutional neural networks for computational
    pathology" (Medical Image Analysis, 2019). Works on uint8 RGB ``(H, W, 3)``.
    """

    def __init__(self, sigma: float = 0.05, bias: float = 0.05, p: float = 0.9):
        super().__init__(p=p)
        self.sigma = float(sigma)
        self.bias = float(bias)

    @staticmethod
    def _matrices():
        import numpy as np

        rgb_from_hed = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64)
        rgb_from_hed /= np.linalg.norm(rgb_from_hed, axis=1, keepdims=True)
        return rgb_from_hed, np.linalg.inv(rgb_from_hed)

    def get_params(self) -> dict:
        return {"alpha": [self.py_random.uniform(1 - self.sigma, 1 + self.sigma) for _ in range(3)],
                "beta": [self.py_random.uniform(-self.bias, self.bias) for _ in range(3)]}

    def apply(self, img, alpha=(1.0, 1.0, 1.0), beta=(0.0, 0.0, 0.0), **params):
        import numpy as np

        rgb_from_hed, hed_from_rgb = self._matrices()
        od = -np.log(np.maximum(img.astype(np.float64), 1.0) / 255.0)        # optical density, >= 0
        hed = od @ hed_from_rgb
        hed = hed * np.asarray(alpha) + np.asarray(beta)
        out = np.exp(-(hed @ rgb_from_hed)) * 255.0
        return np.clip(out + 0.5, 0, 255).astype(np.uint8)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("sigma", "bias")


@register_augment("skin_tone")
def _skin_tone(size: int) -> A.Compose:
    # Skin-tone widening in CIELAB (see SkinToneShift) on top of crops and flips.
    return A.Compose([
        A.RandomResizedCrop(size=(size, size), scale=(0.6, 1.0), p=1.0),
        A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.2),
        A.Affine(rotate=(-20, 20), p=0.4),
        SkinToneShift(p=0.8),
        A.HueSaturationValue(hue_shift_limit=5, sat_shift_limit=15, val_shift_limit=0, p=0.4),
        A.RandomBrightnessContrast(0.15, 0.15, p=0.4),
    ])


@register_augment("histo_stain")
def _histo_stain(size: int) -> A.Compose:
    # Rotations/flips (a nucleus has no orientation), H&E stain jitter (see HEDJitter), and the
    # brightness / contrast / focus changes that differ between slides and scanners.
    return A.Compose([
        A.RandomRotate90(p=1.0), A.HorizontalFlip(p=0.5),
        HEDJitter(sigma=0.15, bias=0.05, p=0.9),
        A.RandomBrightnessContrast(0.15, 0.15, p=0.5),
        A.GaussianBlur(blur_limit=(3, 3), p=0.15),
    ])


__all__ += ["SkinToneShift", "HEDJitter"]
