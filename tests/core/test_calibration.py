"""Tests for pellucid.core.calibration: temperature recovery, ECE golden values and agreement."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassCalibrationError

from pellucid.core.calibration import (
    apply_temperature,
    expected_calibration_error,
    fit_temperature,
    reliability_bins,
)


def _overconfident_logits(
    temperature: float = 3.0, n: int = 5000, k: int = 4, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(true_logits); the returned logits are true_logits * temperature."""
    rng = np.random.default_rng(seed)
    true_logits = rng.normal(scale=1.5, size=(n, k))
    p = np.exp(true_logits) / np.exp(true_logits).sum(axis=1, keepdims=True)
    y = (rng.random((n, 1)) > np.cumsum(p, axis=1)).sum(axis=1)
    return true_logits * temperature, y


def test_fit_temperature_recovers_scale() -> None:
    logits, y = _overconfident_logits(3.0)
    T = fit_temperature(logits, y)
    assert T == pytest.approx(3.0, abs=0.3)


def test_fit_temperature_near_one_when_calibrated() -> None:
    logits, y = _overconfident_logits(1.0)
    assert fit_temperature(logits, y) == pytest.approx(1.0, abs=0.1)


def test_fit_temperature_accepts_tensors() -> None:
    logits, y = _overconfident_logits(3.0, n=2000, seed=1)
    t_np = fit_temperature(logits, y)
    t_torch = fit_temperature(torch.tensor(logits, dtype=torch.float32), torch.tensor(y))
    assert t_torch == pytest.approx(t_np, rel=1e-3)


def test_temperature_lowers_ece_and_keeps_argmax() -> None:
    logits, y = _overconfident_logits(3.0)
    T = fit_temperature(logits, y)
    raw = apply_temperature(logits, 1.0)
    calibrated = apply_temperature(logits, T)
    assert calibrated.shape == logits.shape
    np.testing.assert_allclose(calibrated.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_array_equal(calibrated.argmax(axis=1), raw.argmax(axis=1))
    before = expected_calibration_error(raw, y)
    after = expected_calibration_error(calibrated, y)
    assert before > 0.1
    assert after < 0.03
    assert after < before / 4


def test_a_validation_part_that_is_all_right_gets_a_finite_temperature_not_certainty() -> None:
    # 12 validation cases, every one ranked right: the plain NLL has no minimum (T -> 0 makes every
    # probability 0 or 1). The default fit treats 12 of 12 right as a small chance of error.
    rng = np.random.default_rng(0)
    y = np.arange(12) % 4
    logits = rng.normal(scale=0.3, size=(12, 4))
    logits[np.arange(12), y] += 2.0 + rng.random(12)
    plain = fit_temperature(logits, y, label_smoothing=0.0)
    T = fit_temperature(logits, y)
    top = apply_temperature(logits, T).max(axis=1)
    assert plain < 0.2  # the degenerate plain fit
    assert T > 3 * plain
    assert 0.8 < top.mean() < 0.999  # confident, not certain
    assert (top < 1 - 1e-6).all()
    # one case ranked wrong: the plain fit has a minimum, and the default is exactly that fit
    logits[0, (y[0] + 1) % 4] = logits[0, y[0]] + 1.0
    assert fit_temperature(logits, y) == fit_temperature(logits, y, label_smoothing=0.0)


def test_apply_temperature_rejects_bad_temperature() -> None:
    with pytest.raises(ValueError, match="Temperature must be a finite number > 0"):
        apply_temperature(np.zeros((2, 3)), 0.0)


def test_fit_temperature_rejects_mismatch() -> None:
    with pytest.raises(ValueError, match="3 rows of logits but 2 labels"):
        fit_temperature(np.zeros((3, 2)), np.array([0, 1]))
    with pytest.raises(ValueError, match=r"expected \[0, 1\]"):
        fit_temperature(np.zeros((2, 2)), np.array([0, 2]))


def test_ece_golden_value() -> None:
    # Five bins of width 0.2. Confidences 0.9 (right), 0.75 (wrong), 0.7 (right), 0.55 (right):
    #   (0.4, 0.6]: |1 - 0.55| * 1/4 = 0.1125
    #   (0.6, 0.8]: |0.5 - 0.725| * 2/4 = 0.1125
    #   (0.8, 1.0]: |1 - 0.9| * 1/4 = 0.025
    probs = np.array([[0.9, 0.1], [0.75, 0.25], [0.3, 0.7], [0.45, 0.55]])
    y = np.array([0, 1, 1, 1])
    assert expected_calibration_error(probs, y, n_bins=5) == pytest.approx(0.25)
    bins = reliability_bins(probs, y, n_bins=5)
    np.testing.assert_array_equal(bins["counts"], [0, 0, 1, 2, 1])
    np.testing.assert_allclose(bins["centers"], [0.1, 0.3, 0.5, 0.7, 0.9])
    np.testing.assert_allclose(bins["accuracy"][2:], [1.0, 0.5, 1.0])
    np.testing.assert_allclose(bins["confidence"][2:], [0.55, 0.725, 0.9])
    assert np.isnan(bins["accuracy"][:2]).all()
    assert bins["edges"].shape == (6,)


def test_ece_is_zero_when_confidence_matches_accuracy() -> None:
    probs = np.tile([0.75, 0.25], (8, 1))
    y = np.array([0, 0, 0, 1, 0, 0, 0, 1])
    assert expected_calibration_error(probs, y) == pytest.approx(0.0)


@pytest.mark.parametrize("n_bins", [5, 15])
def test_ece_matches_torchmetrics(n_bins: int) -> None:
    rng = np.random.default_rng(3)
    logits = rng.normal(scale=2.0, size=(1000, 5))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y = rng.integers(0, 5, 1000)
    reference = MulticlassCalibrationError(num_classes=5, n_bins=n_bins, norm="l1")
    expected = float(reference(torch.tensor(probs), torch.tensor(y)))
    assert expected_calibration_error(probs, y, n_bins=n_bins) == pytest.approx(expected, abs=1e-5)
