"""SP-LIME: features on a shared grid, greedy coverage, distinct picks per class."""
from __future__ import annotations

import numpy as np
import pytest

from pellucid.explain import Explanation
from pellucid.explain.splime import grid_features, sp_lime, submodular_pick
from tests.explain.conftest import images_for


def test_submodular_pick_covers_complementary_features():
    w = np.array([
        [1.0, 1.0, 0.0, 0.0],   # a
        [1.0, 1.0, 0.0, 0.0],   # duplicate of a
        [0.0, 0.0, 1.0, 1.0],   # complementary
        [0.9, 0.0, 0.0, 0.0],
    ])
    picked, cov = submodular_pick(w, 2)
    assert picked == [0, 2] and cov == pytest.approx(1.0)
    picked, cov = submodular_pick(w, 1)
    assert picked == [0] and 0 < cov < 1
    # The budget is spent on distinct rows even when nothing more can be covered.
    picked, _ = submodular_pick(w, 4)
    assert sorted(picked) == [0, 1, 2, 3]


def test_grid_features_use_raw_weights_and_keep_top_k():
    seg = np.zeros((8, 8), np.int64)
    seg[:, 4:] = 1
    e = Explanation(np.zeros((8, 8), np.float32), "lime", 1,
                    extras={"segments": seg, "weights": np.array([0.2, -0.5])})
    f = grid_features(e, grid=2, top_k=None)
    np.testing.assert_allclose(f, [0.2, 0.0, 0.2, 0.0])
    assert (grid_features(e, grid=2, top_k=1) > 0).sum() == 1
    with pytest.raises(ValueError, match="grid"):
        grid_features(e, grid=16)


def test_sp_lime_picks_distinct_representatives(tiny_models):
    model = tiny_models["test_resnet"]
    x = images_for(64, 6, seed=9)
    res = sp_lime(model, x, budget=2, grid=4, top_k=4, num_samples=32, n_segments=16)
    assert res.features.shape == (6, 16)
    assert set(res.picks) == {e.target for e in res.explanations}
    for c, picked in res.picks.items():
        members = [i for i, e in enumerate(res.explanations) if e.target == c]
        assert len(picked) == len(set(picked)) == min(2, len(members))
        assert set(picked) <= set(members)
        assert 0 < res.coverage[c] <= 1
