import numpy as np

from bench.final_fit import render


def test_table_pairs_each_fold_plain_share_against_the_final_fit():
    row = lambda f, a, b: {"fold": f, "n_train_plain": 46, "n_train_final": 60,  # noqa: E731
                           "plain": {"accuracy": a, "macro_f1": a, "auroc": np.nan},
                           "final": {"accuracy": b, "macro_f1": b, "auroc": None}}
    res = {"task": "tb", "name": "tb_cxr", "vote": "probe:x", "folds": 3, "seed": 0, "reps": 5, "seconds": 2.0,
           "rows": [row(0, 0.80, 0.84), row(1, 0.90, 0.89), row(2, 0.70, 0.75)]}
    text = render(res)
    line = next(x for x in text.splitlines() if x.startswith("| accuracy |"))
    assert "0.800 ± 0.100" in line and "0.827 ± 0.071" in line and "+0.027 ± 0.032" in line and "2/3" in line
    assert not any(x.startswith("| auroc |") for x in text.splitlines())  # nothing to pair: no row, no crash
    assert "--name tb_cxr" in text and "| 1 | 0.900 → 0.890 |" in text
