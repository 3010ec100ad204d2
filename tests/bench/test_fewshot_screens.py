import pytest
import torch

from bench.fewshot_screens import class_block


def test_class_block_gives_logits_or_probabilities_of_the_classifier():
    g = torch.Generator().manual_seed(0)
    pooled, weight, bias = torch.rand(4, 8, generator=g), torch.randn(5, 8, generator=g), torch.randn(5, generator=g)
    logits = class_block(pooled, weight, bias, "logits")
    assert torch.allclose(logits, pooled @ weight.T + bias)
    prob = class_block(pooled, weight, bias, "prob")
    assert torch.allclose(prob.sum(1), torch.ones(4)) and torch.equal(prob.argmax(1), logits.argmax(1))
    with pytest.raises(ValueError, match="kind"):
        class_block(pooled, weight, bias, "scores")


def test_grid_features_keep_the_whole_map_blocks_and_add_the_regions(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import numpy as np
    from PIL import Image

    from bench.fewshot_screens import grid_features
    from pellucid.core.backbones import create_backbone
    from pellucid.core.fewshot import PrototypicalNetwork, extract_features, improved_config

    monkeypatch.chdir(tmp_path)  # the feature cache is a relative folder
    rng = np.random.default_rng(0)
    samples = []
    for i in range(2):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(path)
        samples.append(SimpleNamespace(path=path))
    whole, grid, taps = grid_features(samples, 2)
    bb, info = create_backbone("efficientnet_lite0", pretrained=True)
    net = PrototypicalNetwork(bb, improved_config(bb.spec))
    plain = extract_features(net, [s.path for s in samples], image_size=224, weight_info=info, cache_dir=None)
    assert taps == tuple(net.config.layers)
    assert torch.allclose(torch.cat(whole, 1), plain, atol=1e-4)  # what the default embedding pools
    assert [g.shape[1] for g in grid] == [4 * w.shape[1] for w in whole]
    # blocks.4 is a 14 x 14 map at 224 px: its four 7 x 7 quadrants average back to the whole map
    quads = grid[0].view(2, whole[0].shape[1], 4)
    assert torch.allclose(quads.mean(2), whole[0], atol=1e-5)
    again = grid_features(samples, 2)  # a second call is served from the cache, unchanged
    assert torch.equal(torch.cat(again[1], 1), torch.cat(grid, 1))
