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
