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


def _random_images(folder, shape, n: int = 2) -> list:
    """``n`` random RGB PNG files of ``shape`` (rows, columns, 3) in ``folder``, as samples with a ``path``."""
    from types import SimpleNamespace

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
        samples.append(SimpleNamespace(path=path))
    return samples


def test_grid_features_keep_the_whole_map_blocks_and_add_the_regions(tmp_path, monkeypatch):
    from bench.fewshot_screens import grid_features
    from pellucid.core.backbones import create_backbone
    from pellucid.core.fewshot import PrototypicalNetwork, extract_features, improved_config

    monkeypatch.chdir(tmp_path)  # the feature cache is a relative folder
    samples = _random_images(tmp_path, (64, 80, 3))
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


def test_multiscale_features_append_each_backbone_at_320_px(tmp_path, monkeypatch):
    from bench.fewshot_screens import multiscale_features
    from pellucid.core.backbones import create_backbone
    from pellucid.core.fewshot import PrototypicalNetwork, extract_features, improved_config

    monkeypatch.chdir(tmp_path)  # the feature cache is a relative folder
    samples = _random_images(tmp_path, (300, 340, 3))
    got = multiscale_features(samples)
    l0ms, pairms = got["l0ms"], got["pairms"]
    n = len(l0ms.dims) // 2
    assert l0ms.dims[:n] == l0ms.dims[n:] and all(t.startswith("@320:") for t in l0ms.taps[n:])
    assert sum(t.startswith("efficientnet_lite2@320:") for t in pairms.taps) == 3 and len(pairms.dims) == 12
    # the 320-px half is Lite0 run on the images decoded at 320 px, as a 320-px embedding computes it
    bb, info = create_backbone("efficientnet_lite0", pretrained=True)
    at320 = extract_features(PrototypicalNetwork(bb, improved_config(bb.spec, 320)), [s.path for s in samples],
                             image_size=320, weight_info=info, cache_dir=None)
    start = sum(l0ms.dims[:n])
    torch.testing.assert_close(l0ms.plain[:, start:], at320, atol=1e-4, rtol=1e-4)
    # both candidates run Lite0 at 224 px on the same 320-px decode first
    torch.testing.assert_close(pairms.plain[:, :start], l0ms.plain[:, :start])
