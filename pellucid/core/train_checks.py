"""One-line refusals of training settings no run can use, checked before any work by
:func:`pellucid.core.training.train` (and so for every ensemble member, fold and final fit): sizes,
epochs, batch size, learning rates and regularisers out of range (an input of 0 or 100000 px, a learning
rate of NaN or -1 had ended in an OpenCV or temperature-fit traceback), split fractions, and the input size
a model predicts at."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pellucid.core.card import MAX_INPUT_SIDE, finite_number

if TYPE_CHECKING:
    from pellucid.core.training import TrainConfig

__all__ = ["check_numbers"]


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_numbers(cfg: TrainConfig, error: type[Exception]) -> None:
    """Raise ``error`` (one line naming the setting and its range) for a number no run can use."""
    def refuse(name: str, want: str) -> Exception:
        return error(f"{name} {getattr(cfg, name)!r} is not {want}; fix the flag or the recipe")

    wholes = {"image_size": (8, MAX_INPUT_SIDE), "epochs": (0, 10_000), "probe_epochs": (1, 10_000),
              "batch_size": (1, 65_536), "patience": (0, 10_000), "seed": (0, 2**32 - 1)}
    for name, (low, high) in wholes.items():
        value = getattr(cfg, name)
        if not (_whole(value) and low <= value <= high):
            raise refuse(name, f"a whole number from {low} to {high}")
    if cfg.max_images is not None and not (_whole(cfg.max_images) and cfg.max_images >= 1):
        raise refuse("max_images", "a whole number of at least 1 (or unset)")
    for name in ("lr", "head_lr"):
        if not (finite_number(getattr(cfg, name)) and getattr(cfg, name) > 0):  # a large one may diverge: the run says so
            raise refuse(name, "a finite learning rate above 0")
    for name, (low, high) in {"weight_decay": (0, 10), "label_smoothing": (0, 0.99), "dropout": (0, 0.99),
                              "lr_decay": (0, 1), "ema": (0, 10_000), "swa": (0, 0.99)}.items():
        if not (finite_number(getattr(cfg, name)) and low <= getattr(cfg, name) <= high):
            raise refuse(name, f"a number from {low} to {high}")
    if isinstance(cfg.test_size, bool) or not isinstance(cfg.test_size, int) or not (
            cfg.test_size == 0 or 16 <= cfg.test_size <= 1024):  # an ensemble member's keys reach here unchecked
        raise error(f"test_size must be the input size the model predicts at, 0 (image_size) or 16 to 1024 px, "
                    f"got {cfg.test_size!r}; fix the recipe")
    v, t = cfg.val_fraction, cfg.test_fraction
    if not all(finite_number(x) for x in (v, t)) or not (0 < v < 1 and 0 <= t < 1 and v + t < 0.9):
        raise error(f"val_fraction {v!r} and test_fraction {t!r} must be numbers with 0 < val_fraction, "
                    "0 <= test_fraction (0: no test part, a final fit) and their sum under 0.9; fix the recipe")
