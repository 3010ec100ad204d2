import json

import numpy as np
import torch

from bench.views_screen import render


def test_fold_logits_through_views_are_kept_beside_the_model_and_one_view_is_the_plain_pass(tiny_model_dir):
    from pellucid.core.tasks import get_task
    from pellucid.core.tune import _train_fold_logits
    from pellucid.datasets.splits import load_split

    task = get_task("tb")
    split = load_split(tiny_model_dir)
    rows = split.val + split.test  # each has .path, as a sample does
    idx = {"val": list(range(len(split.val))), "test": list(range(len(split.val), len(rows)))}
    plain = _train_fold_logits(task, tiny_model_dir, rows, idx, tta="none")
    viewed = _train_fold_logits(task, tiny_model_dir, rows, idx, tta="dihedral")
    assert (tiny_model_dir / "fold_logits_dihedral.pt").exists() and (tiny_model_dir / "fold_logits_none.pt").exists()
    for p in ("val", "test"):
        assert viewed[p][1].shape == plain[p][1].shape == (len(idx[p]), len(task.classes))
    assert not torch.allclose(plain["val"][1], viewed["val"][1])
    again = _train_fold_logits(task, tiny_model_dir, rows, idx, tta="dihedral")  # from the file, unchanged
    assert torch.equal(again["test"][1], viewed["test"][1])


def test_table_pairs_each_view_set_with_one_view():
    fold = lambda a: {"macro_f1": a, "auroc": a + 0.1}  # noqa: E731
    res = {"name": "nuclei", "task": "nuclei", "candidate": "current", "views": ["none", "dihedral"], "folds": 2,
           "seed": 0, "seconds": 3.0, "metrics": ["macro_f1", "auroc"], "scored_folds": [0, 1],
           "rows": {"none": [fold(0.66), fold(0.70)], "dihedral": [fold(0.68), fold(0.69)]}}
    text = render(json.loads(json.dumps(res)))
    line = next(x for x in text.splitlines() if x.startswith("| 8 views"))
    assert "+0.005 ± 0.021" in line and "| 1 / 1 |" in line and "0.680, 0.690" in line
    assert np.isclose(float(line.split("|")[2].split("±")[0]), 0.685)
    assert "folds scored: 0, 1" in text


def test_hybrid_rows_are_paired_with_the_hybrid_in_one_view():
    fold = lambda a: {"accuracy": a, "macro_f1": a - 0.1}  # noqa: E731
    plain, flipped = "`probe:x` + 3x fine-tune, one view (the image as it is)", \
        "`probe:x+flip` + 3x fine-tune, 2 views: the image and its mirror image"
    res = {"name": "sonar", "task": "sonar", "candidate": "ft", "views": ["none", "flip"], "folds": 2, "seed": 0,
           "seconds": 1.0, "metrics": ["accuracy", "macro_f1"], "scored_folds": [0, 1], "vote": "probe:x",
           "weight": 3.0, "rows": {"none": [fold(0.90), fold(0.92)], "flip": [fold(0.91), fold(0.92)],
                                   plain: [fold(0.95), fold(0.96)], flipped: [fold(0.97), fold(0.96)]},
           "base": {"none": "none", "flip": "none", plain: plain, flipped: plain}}
    lines = render(json.loads(json.dumps(res))).splitlines()
    row = next(x for x in lines if x.startswith("| `probe:x+flip`"))
    assert "+0.010 ± 0.014" in row and "| 1 / 0 |" in row  # against the plain hybrid, not the fine-tune alone
    assert "| — |" in next(x for x in lines if x.startswith("| `probe:x` +"))
    assert "+0.005 ± 0.007" in next(x for x in lines if x.startswith("| 2 views"))
    assert "--vote probe:x --weight 3" in "\n".join(lines)
