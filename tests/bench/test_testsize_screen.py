import json

import numpy as np
import torch

from bench.testsize_screen import _mean_logits, render, size_logits


def test_size_logits_read_the_fold_at_each_size_and_keep_them_beside_the_model(tiny_model_dir):
    from pellucid.core.tasks import get_task
    from pellucid.datasets.splits import load_split

    task = get_task("tb")
    split = load_split(tiny_model_dir)
    rows = split.val + split.test  # each has .path, as a sample does
    idx = {"val": list(range(len(split.val))), "test": list(range(len(split.val), len(rows)))}
    small = size_logits(task, tiny_model_dir, rows, idx, 64)
    big = size_logits(task, tiny_model_dir, rows, idx, 96)
    for p in ("val", "test"):
        assert small[p][1].shape == big[p][1].shape == (len(idx[p]), len(task.classes))
        assert list(small[p][0]) == idx[p]
    assert not torch.allclose(small["val"][1], big["val"][1])  # another input size, other logits
    assert (tiny_model_dir / "fold_logits_96.pt").exists()
    again = size_logits(task, tiny_model_dir, rows, idx, 96)  # from the file, unchanged
    assert torch.equal(again["test"][1], big["test"][1])
    both = _mean_logits([small, big])
    assert torch.allclose(both["val"][1], (small["val"][1] + big["val"][1]) / 2)


def test_table_pairs_each_variant_with_the_training_size():
    fold = lambda a: {"accuracy": a, "macro_f1": a - 0.01}  # noqa: E731
    res = {"name": "waste", "task": "waste", "candidate": "finetune:lite0+long+ema", "vote": "probe:x", "native": 224,
           "sizes": [224, 288], "folds": 2, "seed": 0, "seconds": 3.0, "metrics": ["accuracy", "macro_f1"],
           "rows": {"fine-tune alone, 224 px": [fold(0.80), fold(0.90)],
                    "fine-tune alone, 288 px": [fold(0.84), fold(0.89)]}}
    text = render(json.loads(json.dumps(res)))
    line = next(x for x in text.splitlines() if x.startswith("| fine-tune alone, 288 px"))
    assert "+0.015 ± 0.035" in line and "| 1 / 1 |" in line
    assert np.isclose(float(line.split("|")[2].split("±")[0]), 0.865)
