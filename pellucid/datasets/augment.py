"""Augmentation presets (albumentations), named in each TaskSpec.

Each preset is a function ``size -> albumentations.Compose`` that works on uint8 RGB arrays of shape
``(size, size, 3)`` and returns the same shape. Presets are chosen for their modality: small
geometric and contrast changes for chest X-rays, skin-tone-widening colour jitter for skin photos,
stain/colour jitter and rotations for H&E patches, speckle-like noise for sonar.
"""
from __future__ import annotations

from typing import Callable

import albumentations as A

from pellucid.core.backbones import unknown_name_error

__all__ = ["get_augment", "list_augments", "register_augment"]

_PRESETS: dict[str, Callable[[int], A.Compose]] = {}


def register_augment(name: str):
    """Decorator registering an augmentation preset factory ``size -> Compose``."""
    def deco(fn):
        _PRESETS[name] = fn
        return fn
    return deco


def list_augments() -> list[str]:
    return sorted(_PRESETS)


def get_augment(name: str, size: int) -> A.Compose:
    """The preset ``name`` for square images of side ``size``."""
    if name not in _PRESETS:
        raise unknown_name_error("augmentation preset", name, list(_PRESETS))
    return _PRESETS[name](size)


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
