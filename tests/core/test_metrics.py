"""Tests for pellucid.core.metrics: golden values, intervals, thresholds, undefined metrics."""

from __future__ import annotations

import json
import time
import warnings

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from pellucid.core import metrics as M
from pellucid.core.metrics import (
    METRIC_NAMES,
    THRESHOLD_POLICIES,
    choose_threshold,
    classification_metrics,
    decide,
    format_metrics,
)

# Hand-made binary case: 6 negatives, 4 positives.
#   at 0.5: TP=3 (0.9, 0.8, 0.6), FN=1 (0.45), FP=2 (0.55, 0.65), TN=4.
#   AUROC: positives beat 6 + 6 + 4 + 5 = 21 of 24 negative pairs.
Y_BIN = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
P_POS = np.array([0.1, 0.2, 0.3, 0.55, 0.65, 0.05, 0.9, 0.8, 0.45, 0.6])
PROBS_BIN = np.stack([1 - P_POS, P_POS], axis=1)
GOLDEN_BIN = {
    "accuracy": 0.7,
    "sensitivity": 0.75,
    "specificity": 4 / 6,
    "precision": 0.6,
    "f1": 6 / 9,
    "balanced_accuracy": (0.75 + 4 / 6) / 2,
    "macro_f1": (8 / 11 + 6 / 9) / 2,
    "auroc": 21 / 24,
}


def _random_multiclass(n: int = 200, k: int = 3, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, probs


def _random_binary(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = np.clip(0.35 * y + 0.65 * rng.random(n), 0, 1)
    return y, np.stack([1 - p, p], axis=1)


def test_binary_golden_values() -> None:
    result = classification_metrics(Y_BIN, PROBS_BIN, ["normal", "tb"], n_boot=200)
    for name, expected in GOLDEN_BIN.items():
        assert result["metrics"][name]["value"] == pytest.approx(expected, abs=1e-12), name
    assert result["confusion_matrix"] == [[4, 2], [1, 3]]
    assert result["per_class"]["tb"] == pytest.approx(
        {"precision": 0.6, "sensitivity": 0.75, "f1": 6 / 9, "support": 4}
    )
    assert result["per_class"]["normal"]["support"] == 6
    assert result["n"] == 10 and result["classes"] == ["normal", "tb"]
    assert result["threshold"] is None and result["positive_index"] == 1


def test_binary_threshold_and_positive_index() -> None:
    result = classification_metrics(Y_BIN, PROBS_BIN, ["normal", "tb"], threshold=0.45, n_boot=0)
    assert result["threshold"] == 0.45
    assert result["metrics"]["sensitivity"]["value"] == 1.0
    assert result["metrics"]["specificity"]["value"] == pytest.approx(4 / 6)
    assert result["metrics"]["accuracy"]["low"] is None  # n_boot=0: no interval
    # Swapping which column is positive swaps sensitivity and specificity.
    swapped = classification_metrics(Y_BIN, PROBS_BIN, ["normal", "tb"], positive_index=0, n_boot=0)
    assert swapped["metrics"]["sensitivity"]["value"] == pytest.approx(4 / 6)
    assert swapped["metrics"]["specificity"]["value"] == pytest.approx(0.75)
    assert swapped["metrics"]["auroc"]["value"] == pytest.approx(21 / 24)


def test_labels_may_be_class_names() -> None:
    names = np.array(["normal", "tb"])[Y_BIN]
    result = classification_metrics(names, PROBS_BIN, ["normal", "tb"], n_boot=0)
    assert result["metrics"]["accuracy"]["value"] == pytest.approx(0.7)


def test_multiclass_matches_sklearn() -> None:
    y, probs = _random_multiclass()
    pred = probs.argmax(axis=1)
    result = classification_metrics(y, probs, ["a", "b", "c"], n_boot=100)
    m = {k: v["value"] for k, v in result["metrics"].items()}
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["precision"] == pytest.approx(precision_score(y, pred, average="macro"))
    assert m["sensitivity"] == pytest.approx(recall_score(y, pred, average="macro"))
    assert m["f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["macro_f1"] == m["f1"]
    assert m["auroc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    # Macro specificity: mean over classes of recall of "not c".
    spec = np.mean([recall_score(y != c, pred != c) for c in range(3)])
    assert m["specificity"] == pytest.approx(spec)
    assert np.array(result["confusion_matrix"]).sum() == 200


def test_multiclass_rejects_threshold() -> None:
    y, probs = _random_multiclass()
    with pytest.raises(ValueError, match="binary tasks only"):
        classification_metrics(y, probs, ["a", "b", "c"], threshold=0.5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"classes": ["a", "b", "c"]}, r"expected \(10, 3\)"),
        ({"ci": 1.5}, "ci must be in"),
        ({"positive_index": 2}, "positive_index must be 0 or 1"),
    ],
)
def test_bad_inputs_raise(kwargs: dict, match: str) -> None:
    args = {"classes": ["normal", "tb"], **kwargs}
    with pytest.raises(ValueError, match=match):
        classification_metrics(Y_BIN, PROBS_BIN, **args)


def test_labels_out_of_range_raise() -> None:
    with pytest.raises(ValueError, match=r"expected indices in \[0, 1\]"):
        classification_metrics(np.array([0, 2]), np.full((2, 2), 0.5), ["a", "b"])


@pytest.mark.parametrize("kind", ["binary", "multiclass"])
def test_intervals_are_ordered_and_contain_value(kind: str) -> None:
    if kind == "binary":
        y, probs = _random_binary()
        classes = ["neg", "pos"]
    else:
        y, probs = _random_multiclass()
        classes = ["a", "b", "c"]
    result = classification_metrics(y, probs, classes, n_boot=1000, seed=0)
    assert list(result["metrics"]) == list(METRIC_NAMES)
    for name, row in result["metrics"].items():
        assert row["low"] <= row["value"] <= row["high"], (name, row)
        assert row["high"] - row["low"] > 0.01, name  # 200 cases cannot give a point interval
        assert 0.0 <= row["low"] and row["high"] <= 1.0


def test_wider_coverage_gives_wider_intervals() -> None:
    y, probs = _random_binary()
    narrow = classification_metrics(y, probs, ["neg", "pos"], ci=0.5)["metrics"]["auroc"]
    wide = classification_metrics(y, probs, ["neg", "pos"], ci=0.99)["metrics"]["auroc"]
    assert wide["low"] < narrow["low"] and wide["high"] > narrow["high"]


def test_bootstrap_is_deterministic_under_seed() -> None:
    y, probs = _random_binary()
    a = classification_metrics(y, probs, ["neg", "pos"], seed=3)
    b = classification_metrics(y, probs, ["neg", "pos"], seed=3)
    c = classification_metrics(y, probs, ["neg", "pos"], seed=4)
    assert a == b
    assert a["metrics"]["auroc"]["low"] != c["metrics"]["auroc"]["low"]


def test_bootstrap_is_fast() -> None:
    y, probs = _random_multiclass(n=200)
    start = time.perf_counter()
    classification_metrics(y, probs, ["a", "b", "c"], n_boot=1000)
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize("k", [2, 3])
def test_bootstrap_engine_matches_sklearn_on_weighted_cases(k: int) -> None:
    """The vectorised resample metrics equal scikit-learn on the data each resample stands for."""
    rng = np.random.default_rng(7)
    n = 60
    y = rng.integers(0, k, n)
    probs = rng.dirichlet(np.ones(k), size=n).round(1)  # rounding creates tied scores
    probs = probs + 1e-9 * np.eye(k)[np.argmax(probs, axis=1)]
    pred = probs.argmax(axis=1)
    positive = 1 if k == 2 else None
    counts = rng.integers(0, 3, size=(4, n)).astype(float)
    counts[0] = 1.0  # the identity resample
    cm = M._grouped_sum(counts, y * k + pred, k * k).reshape(-1, k, k)
    fast = M._metrics_from_confusion(cm, positive)
    fast["auroc"] = M._auroc_from_counts(y, probs, counts, positive)
    for b in range(counts.shape[0]):
        idx = np.repeat(np.arange(n), counts[b].astype(int))
        yb, pb, sb = y[idx], pred[idx], probs[idx]
        avg = "binary" if k == 2 else "macro"
        assert fast["accuracy"][b] == pytest.approx(accuracy_score(yb, pb))
        assert fast["balanced_accuracy"][b] == pytest.approx(balanced_accuracy_score(yb, pb))
        assert fast["precision"][b] == pytest.approx(precision_score(yb, pb, average=avg))
        assert fast["sensitivity"][b] == pytest.approx(recall_score(yb, pb, average=avg))
        assert fast["f1"][b] == pytest.approx(f1_score(yb, pb, average=avg))
        assert fast["macro_f1"][b] == pytest.approx(f1_score(yb, pb, average="macro"))
        if k == 2:
            assert fast["auroc"][b] == pytest.approx(roc_auc_score(yb, sb[:, 1]))
        else:
            # Macro one-vs-rest, as roc_auc_score(multi_class="ovr") computes it (rows sum to 1)
            ovr = np.mean([roc_auc_score(yb == c, sb[:, c]) for c in range(k)])
            assert fast["auroc"][b] == pytest.approx(ovr)


def test_auroc_with_one_class_is_nan_with_warning() -> None:
    y = np.zeros(8, dtype=int)
    probs = np.stack([np.linspace(0.9, 0.2, 8), np.linspace(0.1, 0.8, 8)], axis=1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        result = classification_metrics(y, probs, ["normal", "tb"], n_boot=50)
    messages = [str(w.message) for w in record]
    assert any("auroc: only one class present in y_true (8 cases)" in m for m in messages)
    # No positives either: sensitivity is undefined, specificity is not.
    assert any("sensitivity: no case of the positive class 'tb'" in m for m in messages)
    assert not any("specificity" in m for m in messages)
    assert all(w.category is UserWarning and w.filename == __file__ for w in record)  # stacklevel
    assert len(record) == 1  # one warning for all undefined metrics, not one each
    assert result["metrics"]["auroc"] == {"value": None, "low": None, "high": None, "interval": None,
                                          "note": "undefined: only one class present in y_true (8 cases)"}
    assert result["metrics"]["sensitivity"]["value"] is None
    assert result["metrics"]["specificity"]["value"] == pytest.approx(5 / 8)
    json.dumps(result, allow_nan=False)  # NaN became None


def test_multiclass_auroc_with_absent_class_is_nan() -> None:
    y = np.array([0, 1, 0, 1, 0, 1])
    probs = np.full((6, 3), 1 / 3)
    with pytest.warns(UserWarning, match=r"classes \['c'\] are absent"):
        result = classification_metrics(y, probs, ["a", "b", "c"], n_boot=20)
    assert result["metrics"]["auroc"]["value"] is None


def test_skipped_resamples_give_one_warning_but_interval_survives() -> None:
    # One positive in 20: about a third of resamples have no positive, where AUROC is undefined. With
    # the minimum per class lowered to 1 the bootstrap runs anyway, and says so in one warning.
    y = np.zeros(20, dtype=int)
    y[16] = 1
    p = np.linspace(0.05, 0.95, 20)
    probs = np.stack([1 - p, p], axis=1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        result = classification_metrics(y, probs, ["neg", "pos"], n_boot=500, min_per_class=1)
    messages = [str(w.message) for w in record]
    assert len(messages) == 1 and "resamples where the metric is undefined were skipped" in messages[0]
    skipped = int(messages[0].split("auroc ")[1].split()[0])
    assert 120 < skipped < 250  # about 500 * (19/20)**20 = 179
    row = result["metrics"]["auroc"]
    assert row["value"] == pytest.approx(16 / 19)
    assert row["low"] is not None and row["low"] <= row["value"] <= row["high"]
    assert row["interval"] == "bootstrap" and "note" not in row


def test_one_positive_gets_a_note_instead_of_a_bootstrap_and_no_warning() -> None:
    """The same data at the default minimum: no interval for what depends on the positive class, and
    nothing to warn about (the note says it)."""
    y = np.zeros(20, dtype=int)
    y[16] = 1
    p = np.linspace(0.05, 0.95, 20)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        m = classification_metrics(y, np.stack([1 - p, p], axis=1), ["neg", "pos"], n_boot=500)["metrics"]
    assert record == []
    for name in ("auroc", "sensitivity", "f1", "balanced_accuracy", "macro_f1"):
        assert m[name]["note"] == "too few labelled inputs of 'pos' (n=1; need ≥ 5)", name
        assert m[name]["low"] is None and m[name]["high"] is None and m[name]["interval"] is None
    assert m["auroc"]["value"] == pytest.approx(16 / 19)  # the value is kept
    assert m["specificity"]["interval"] == "wilson" and "note" not in m["specificity"]  # 19 negatives


def test_result_is_json_serialisable() -> None:
    result = classification_metrics(Y_BIN, PROBS_BIN, ["normal", "tb"], n_boot=100)
    assert json.loads(json.dumps(result, allow_nan=False)) == result


def test_format_metrics_table() -> None:
    result = classification_metrics(Y_BIN, PROBS_BIN, ["normal", "tb"], n_boot=100)
    text = format_metrics(result)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["metric", "value", "[low,"]
    assert "95% CI" in lines[0]
    assert len(lines) == 1 + len(METRIC_NAMES)
    acc = next(line for line in lines if line.startswith("accuracy "))
    low, high = result["metrics"]["accuracy"]["low"], result["metrics"]["accuracy"]["high"]
    assert acc.split(None, 2) == ["accuracy", "0.700", f"[{low:.3f}, {high:.3f}]"]
    result["metrics"]["auroc"] = {"value": None, "low": None, "high": None}
    assert format_metrics(result).splitlines()[-2].split() == ["auroc", "n/a"]


# --------------------------------------------------------------------------------------------------
# thresholds


def test_decide_argmax_and_threshold() -> None:
    assert decide(PROBS_BIN, None, None).tolist() == [0, 0, 0, 1, 1, 0, 1, 1, 0, 1]
    assert decide(PROBS_BIN, 0.45, 1).tolist() == [0, 0, 0, 1, 1, 0, 1, 1, 1, 1]
    # positive_index=0: class 0 is predicted when its probability >= threshold.
    assert decide(PROBS_BIN, 0.9, 0).tolist() == [0, 1, 1, 1, 1, 0, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="binary task"):
        decide(np.full((2, 3), 1 / 3), 0.5, None)


def test_threshold_policies_on_hand_made_case() -> None:
    # ROC points (threshold: tpr, fpr): 0.8: 0.5, 0; 0.6: 0.75, 1/6; 0.45: 1, 2/6.
    # Youden J: 0.5, 0.583, 0.667 -> max at 0.45; the next lower score is 0.3, so the middle of the
    # interval (0.3, 0.45] that gives the same J: 0.375.
    assert choose_threshold(Y_BIN, P_POS, "argmax") == 0.5
    assert choose_threshold(Y_BIN, P_POS, "youden") == pytest.approx(0.375)
    assert choose_threshold(Y_BIN, P_POS, "sensitivity", target_sensitivity=0.95) == 0.45
    assert choose_threshold(Y_BIN, P_POS, "sensitivity", target_sensitivity=0.75) == 0.6
    assert choose_threshold(Y_BIN, P_POS, "sensitivity", target_sensitivity=0.5) == 0.8
    assert choose_threshold(Y_BIN, P_POS, "sensitivity", target_sensitivity=1.0) == 0.45


def test_sensitivity_policy_meets_target() -> None:
    y, probs = _random_binary(n=500, seed=5)
    t = choose_threshold(y, probs[:, 1], "sensitivity", target_sensitivity=0.9)
    result = classification_metrics(y, probs, ["neg", "pos"], threshold=t, n_boot=0)
    assert result["metrics"]["sensitivity"]["value"] >= 0.9
    # The next higher score as threshold would miss the target.
    higher = np.min(probs[:, 1][probs[:, 1] > t])
    sens_higher = (probs[y == 1, 1] >= higher).mean()
    assert sens_higher < 0.9


def test_unknown_policy_suggests_closest() -> None:
    with pytest.raises(ValueError) as err:
        choose_threshold(Y_BIN, P_POS, "youdn")
    message = str(err.value)
    assert "Did you mean 'youden'?" in message
    for policy in THRESHOLD_POLICIES:
        assert repr(policy) in message


def test_threshold_needs_both_classes() -> None:
    with pytest.raises(ValueError, match="0 positive and 3 negative"):
        choose_threshold(np.zeros(3), np.array([0.1, 0.2, 0.3]), "youden")
    with pytest.raises(ValueError, match="binary labels"):
        choose_threshold(np.array([0, 2]), np.array([0.1, 0.2]), "youden")


def test_no_runtime_warnings_from_nan_handling() -> None:
    y = np.zeros(8, dtype=int)
    probs = np.tile([0.7, 0.3], (8, 1))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        classification_metrics(y, probs, ["a", "b"], n_boot=50)
    assert not [w for w in record if issubclass(w.category, RuntimeWarning)]


def test_proportions_get_score_intervals_that_do_not_collapse() -> None:
    """10 of 10 correct is not proof of perfection: accuracy, sensitivity, specificity and precision get
    Wilson intervals (10/10 → [0.72, 1.00], 5/5 → [0.57, 1.00]); the other metrics keep the bootstrap."""
    y = [0] * 5 + [1] * 5
    probs = np.array([[0.9, 0.1]] * 5 + [[0.1, 0.9]] * 5)
    m = classification_metrics(y, probs, ["a", "b"], n_boot=200)["metrics"]
    assert m["accuracy"]["interval"] == "wilson" and m["accuracy"]["low"] == pytest.approx(0.7225, abs=1e-4)
    for name in ("sensitivity", "specificity", "precision"):  # 5 of 5
        assert m[name]["interval"] == "wilson" and m[name]["low"] == pytest.approx(0.5655, abs=1e-4)
        assert m[name]["high"] == 1.0
    assert m["auroc"]["interval"] == "bootstrap"
    assert not any("note" in row for row in m.values())


def test_six_inputs_say_too_few_instead_of_a_point_interval() -> None:
    """`pellucid eval` on 6 images printed [1.000, 1.000] for every metric (issue 18)."""
    y = [0, 0, 0, 1, 1, 1]
    probs = np.array([[0.9, 0.1]] * 3 + [[0.1, 0.9]] * 3)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        result = classification_metrics(y, probs, ["a", "b"], n_boot=1000)
    assert record == []  # no bootstrap warnings at tiny n
    assert result["min_counts"] == {"overall": 10, "per_class": 5}
    for name, row in result["metrics"].items():
        assert row["value"] == 1.0 and row["low"] is None and row["high"] is None, name
        assert row["interval"] is None and row["note"] == "too few labelled inputs (n=6; need ≥ 10)"
    text = format_metrics(result)
    assert "[1.000, 1.000]" not in text and "1.000, 1.000" not in text
    assert text.count("too few labelled inputs (n=6; need ≥ 10)") == len(METRIC_NAMES)
    json.loads(json.dumps(result, allow_nan=False))


def test_notes_are_given_without_intervals_too() -> None:
    m = classification_metrics([0, 1, 1], np.tile([0.2, 0.8], (3, 1)), ["a", "b"], n_boot=0)["metrics"]
    assert m["accuracy"]["note"] == "too few labelled inputs (n=3; need ≥ 10)"
    assert m["accuracy"]["interval"] is None


def test_precision_needs_enough_positive_predictions() -> None:
    # 10 negatives, 10 positives; only 3 cases predicted positive.
    y = np.array([0] * 10 + [1] * 10)
    p = np.array([0.1] * 10 + [0.9] * 3 + [0.2] * 7)
    m = classification_metrics(y, np.stack([1 - p, p], axis=1), ["neg", "pos"], n_boot=100)["metrics"]
    assert m["precision"]["value"] == 1.0
    assert m["precision"]["note"] == "too few inputs predicted 'pos' (n=3; need ≥ 5)"
    assert m["sensitivity"]["interval"] == "wilson" and m["auroc"]["interval"] == "bootstrap"


def test_minimums_are_settable() -> None:
    y = [0, 0, 0, 1, 1, 1]
    probs = np.array([[0.9, 0.1]] * 3 + [[0.1, 0.9]] * 3)
    result = classification_metrics(y, probs, ["a", "b"], n_boot=100, min_n=6, min_per_class=3)
    assert result["min_counts"] == {"overall": 6, "per_class": 3}
    assert result["metrics"]["accuracy"]["low"] == pytest.approx(0.6097, abs=1e-4)  # Wilson, 6 of 6
    assert not any("note" in row for row in result["metrics"].values())


def test_multiclass_rare_class_blocks_the_macro_intervals_only() -> None:
    y, probs = _random_multiclass(n=60, k=3, seed=2)
    keep = np.flatnonzero(y != 2)
    keep = np.concatenate([keep, np.flatnonzero(y == 2)[:3]])  # 3 inputs of class 'c'
    m = classification_metrics(y[keep], probs[keep], ["a", "b", "c"], n_boot=200)["metrics"]
    assert m["accuracy"]["interval"] == "wilson"
    for name in ("balanced_accuracy", "precision", "sensitivity", "specificity", "f1", "auroc", "macro_f1"):
        assert m[name]["note"] == "too few labelled inputs of 'c' (n=3; need ≥ 5)", name


@pytest.mark.parametrize(
    "entry, line",
    [
        ({"value": 0.7, "low": 0.3971, "high": 0.8922, "interval": "wilson"}, "accuracy 0.700 [0.397, 0.892]"),
        ({"value": 1.0, "low": None, "high": None, "interval": None,
          "note": "too few labelled inputs (n=6; need ≥ 10)"},
         "accuracy 1.000 — too few labelled inputs (n=6; need ≥ 10)"),
        ({"value": None, "low": None, "high": None}, "accuracy n/a"),
        ({"value": 0.5}, "accuracy 0.500"),
    ],
)
def test_format_metric_one_line(entry: dict, line: str) -> None:
    assert M.format_metric("accuracy", entry) == line
