import numpy as np

from bench.calibration_screen import render, summarise, vote_probs


def _member(rng, y, margin=2.0):
    z = rng.normal(size=(len(y), 3))
    z[np.arange(len(y)), y] += margin
    return z


def test_a_vote_ranked_all_right_on_a_small_validation_part_is_no_longer_certain():
    # two members about 85 % right, whose 12 validation images happen to be ranked all right
    rng = np.random.default_rng(0)
    y_val, y_test = np.arange(12) % 3, np.arange(300) % 3
    val = [_member(rng, y_val), _member(rng, y_val)]
    while not all((v.argmax(1) == y_val).all() for v in val):
        val = [_member(rng, y_val), _member(rng, y_val)]
    test = [_member(rng, y_test), _member(rng, y_test)]
    plain, sep_plain = vote_probs(val, test, y_val, [1.0, 1.0], 0.0)
    kept, sep_kept = vote_probs(val, test, y_val, [1.0, 1.0], None)
    assert sep_plain == sep_kept == 3  # two members and the vote: every fit was ranked all right
    a, b = summarise(plain, y_test), summarise(kept, y_test)
    assert a["certain"] > 0.5 and b["certain"] < 0.1  # the plain fit says 0.999+ on most images
    assert b["nll"] < 0.8 * a["nll"]
    assert b["n"] == 300 and a["n_wrong"] > 0 and b["top_wrong"] < 0.9


def test_table_names_the_command_the_counts_and_the_folds_left_out():
    row = {"n": 10, "accuracy": 0.9, "nll": 0.4, "ece": 0.05, "top_wrong": 0.7, "n_wrong": 1, "certain": 0.1}
    res = {"task": "tb", "name": "tb_cxr", "hybrid": "probe:x+finetune:y", "seeds": [0], "folds": 5, "scored": 4,
           "missing": ["seed 0 fold 4"], "fits": 20, "separated": 3, "seconds": 5.0,
           "rows": {"plain": {**row, "top_wrong": None, "n_wrong": 0}, "smoothed": row}}
    text = render(res)
    assert "--name tb_cxr" in text and "--seeds 0" in text and "**3 of 20 temperature fits**" in text
    assert "| plain NLL | 10 | 0.900 | 0.400 | 0.050 | — (0) | 0.10 |" in text
    assert "0.700 (1)" in text and "seed 0 fold 4" in text
