"""Tests for pellucid.core.plots: each figure is a readable PNG; global matplotlib state is kept."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image

from pellucid.core import plots


def _probs(n: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 2.0 * np.eye(k)[y]
    return y, np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)


HISTORY = [
    {"epoch": e, "train_loss": 1.0 / (e + 1), "val_loss": 1.2 / (e + 1), "val_acc": 0.5 + 0.1 * e,
     "lr": 1e-3 * 0.5**e}
    for e in range(4)
]

CASES: dict[str, Callable[[Path], Path]] = {
    "roc_binary": lambda p: plots.plot_roc(*_probs(80, 2), ["normal", "tb"], p),
    "roc_multiclass": lambda p: plots.plot_roc(*_probs(90, 3), ["a", "b", "c"], p),
    "confusion": lambda p: plots.plot_confusion([[5, 2], [1, 7]], ["normal", "tb"], p),
    "confusion_counts": lambda p: plots.plot_confusion(
        np.array([[5, 2, 0], [1, 7, 3], [0, 0, 0]]), ["a", "b", "c"], p, normalize=False
    ),
    "training_curves": lambda p: plots.plot_training_curves(HISTORY, p),
    "training_curves_partial": lambda p: plots.plot_training_curves(
        [{"epoch": 0, "train_loss": 0.9}, {"epoch": 1, "train_loss": 0.7, "val_loss": None}], p
    ),
    "reliability": lambda p: plots.plot_reliability(_probs(200, 3)[1], _probs(200, 3)[0], p, T=1.7),
    "probabilities": lambda p: plots.plot_probabilities(
        [0.2, 0.8], ["normal", "tb"], p, threshold=0.35
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_plot_writes_png(name: str, tmp_path: Path) -> None:
    backend = matplotlib.get_backend()
    target = tmp_path / "nested" / f"{name}.png"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean input draws without any warning
        out = CASES[name](target)
    assert out == target
    assert out.stat().st_size > 1000
    with Image.open(out) as image:
        assert image.format == "PNG"
        width, height = image.size
    assert width > 100 and height > 100
    assert matplotlib.get_backend() == backend


def test_no_pyplot_figures_left_open(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    for name, make in CASES.items():
        make(tmp_path / f"{name}.png")
    assert plt.get_fignums() == before


def test_figure_size_scales_with_panels(tmp_path: Path) -> None:
    losses = [{"epoch": 0, "loss": 1.0}, {"epoch": 1, "loss": 0.5}]
    one = plots.plot_training_curves(losses, tmp_path / "a.png")
    three = plots.plot_training_curves(HISTORY, tmp_path / "b.png")
    with Image.open(one) as a, Image.open(three) as b:
        assert b.size[0] > 2 * a.size[0] - 200


def test_roc_skips_class_without_positives(tmp_path: Path) -> None:
    y, probs = _probs(60, 3)
    y = np.where(y == 2, 0, y)
    with pytest.warns(UserWarning, match="No ROC curve for class 'c': 0 of 60"):
        out = plots.plot_roc(y, probs, ["a", "b", "c"], tmp_path / "roc.png")
    assert out.stat().st_size > 1000


def test_bad_inputs_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="history has no numeric values"):
        plots.plot_training_curves([], tmp_path / "h.png")
    with pytest.raises(ValueError, match=r"expected \(2, 2\)"):
        plots.plot_confusion([[1, 2, 3]], ["a", "b"], tmp_path / "c.png")
    with pytest.raises(ValueError, match="expected 3"):
        plots.plot_probabilities([0.5, 0.5], ["a", "b", "c"], tmp_path / "p.png")
    with pytest.raises(ValueError, match=r"expected \(N, 2\)"):
        plots.plot_roc(np.zeros(4), np.zeros((4, 3)), ["a", "b"], tmp_path / "r.png")
