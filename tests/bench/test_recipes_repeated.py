"""Tests of ``bench.recipes_repeated``: two searches on different folds pool into one table, margins pair
each fold with the same fold of the baseline, the search's rule chooses on the pooled folds, and
``bench.recipes_summary`` then reads the pooled table."""
from __future__ import annotations

import json

import pytest

from bench import recipes_repeated, recipes_summary


def _search(folder, seed: int, scores: dict[str, list[float]], k: int = 5, n: int = 93) -> None:
    """A minimal ``recipes-mpox.json`` whose candidates scored ``scores`` (accuracy per fold)."""
    roles = {"probe:a": "A", "finetune:b": "B"}
    rows = []
    for name, accs in scores.items():
        rows.append({"name": name, "kind": "probe" if name.startswith("probe") else "hybrid",
                     "role": roles.get(name, ""), "about": name,
                     "recipe": {"finetune": "linear-probe", "members": [{}] * (4 if "+" in name else 1)},
                     "n_folds": len(accs),
                     "folds": {str(f): {"metrics": {"accuracy": a, "macro_f1": a - 0.05}, "seconds": 1.0}
                               for f, a in enumerate(accs)}})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recipes-mpox.json").write_text(json.dumps({
        "task": "mpox", "name": "mpox", "k": k, "seed": seed, "n": n, "data": "/data", "seconds": 10.0,
        "embed_seconds": 1.0, "cpu": "test CPU", "metrics": ["accuracy", "macro_f1"], "candidates": rows}))


def test_pooled_folds_choose_what_holds_on_both_draws(tmp_path):
    s0, s1 = tmp_path / "s0", tmp_path / "s1"
    # "single" wins the first draw, loses the second; "vote+ft" holds on both
    _search(s0, 0, {"probe:a": [0.80] * 5, "finetune:b": [0.70] * 5, "single": [0.90] * 5,
                    "probe:v+ft": [0.88, 0.89, 0.88, 0.89, 0.88], "partial": [0.99] * 4})
    _search(s1, 1, {"probe:a": [0.85] * 5, "finetune:b": [0.75] * 5, "single": [0.80, 0.81, 0.80, 0.81, 0.80],
                    "probe:v+ft": [0.92] * 5, "partial": [0.99] * 5})
    res = recipes_repeated.pool("mpox", [s0, s1])
    rows = {r["name"]: r for r in res["candidates"]}
    assert "partial" not in rows  # not on every fold of every search
    assert res["k"] == 10 and rows["single"]["n_folds"] == 10
    assert rows["single"]["summary"]["accuracy"]["mean"] == pytest.approx(0.852)
    assert rows["probe:v+ft"]["vs_A"]["mean"] == pytest.approx((0.884 - 0.80 + 0.92 - 0.85) / 2)
    assert rows["probe:v+ft"]["vs_A"]["n"] == 10 and rows["single"]["by_seed"]["1"]["accuracy"]["mean"] == \
        pytest.approx(0.804)
    assert res["winner"] == "probe:v+ft" and "bar" in res["rule"]
    text = recipes_repeated.render(res)
    assert "**(winner)**" in text and "10 folds" in text and "seed 1" in text
    with pytest.raises(SystemExit, match="share a fold seed"):
        recipes_repeated.pool("mpox", [s0, s0])


def test_summary_prefers_the_pooled_table(tmp_path, monkeypatch):
    s0, s1 = tmp_path / "results", tmp_path / "results" / "seed1"
    _search(s0, 0, {"probe:a": [0.80] * 5, "finetune:b": [0.70] * 5, "probe:v+ft": [0.88] * 5})
    _search(s1, 1, {"probe:a": [0.84] * 5, "finetune:b": [0.72] * 5, "probe:v+ft": [0.90] * 5})
    monkeypatch.setattr(recipes_summary, "_adopted", lambda recipe, won: True)
    assert recipes_repeated.main(["mpox", "--runs", f"{s0},{s1}", "--out", str(s0)]) == 0
    assert (s0 / "repeated-mpox.md").exists()
    (row,) = [r for r in recipes_summary.rows(s0) if r.startswith("| mpox")]
    assert "accuracy 0.890 ± 0.011" in row and "(10 folds)" in row
