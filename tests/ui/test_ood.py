"""Out-of-domain checks (pellucid.core.ood), which the web app and the reports rely on."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pellucid.core import ood


def _grey(seed=0, size=64):
    g = np.random.default_rng(seed).random((size, size, 1), dtype=np.float32)
    return np.repeat(g, 3, axis=2)


def test_colour_spread_grey_tint_and_colour():
    grey = _grey()
    assert ood.colour_spread(grey) == 0.0
    tinted = grey * np.array([0.6, 0.9, 1.0], np.float32)  # a cyan-tinted radiograph: one hue
    assert ood.colour_spread(tinted) < 0.02
    colour = np.random.default_rng(1).random((64, 64, 3), dtype=np.float32)
    assert ood.colour_spread(colour) > 0.5
    assert ood.colour_spread(np.ones((2, 2, 1), np.float32)) == 0.0


def test_energy_score_matches_definition():
    logits = np.array([[1.0, 2.0], [0.0, 0.0]])
    np.testing.assert_allclose(ood.energy_score(logits), -np.log(np.exp(logits).sum(1)), rtol=1e-12)


@pytest.mark.parametrize("modality, colourful, flagged", [
    ("CXR", True, True), ("CXR", False, False), ("photo", True, False), (None, True, False)])
def test_check_domain_colour_rule(modality, colourful, flagged):
    img = np.random.default_rng(2).random((64, 64, 3), dtype=np.float32) if colourful else _grey()
    res = ood.check_domain(img, np.array([0.1, 0.3]), np.array([0.45, 0.55]), modality=modality)
    assert res.flagged is flagged and res.method == "heuristic"
    assert res.uncertain  # 0.55 < 0.75 for two classes
    assert ("many colours" in res.summary()) is flagged


def test_check_domain_blank_and_confident():
    res = ood.check_domain(np.full((32, 32, 1), 0.5, np.float32), np.array([5.0, 0.0]), np.array([0.99, 0.01]),
                           modality="CXR")
    assert res.flagged and "almost blank" in res.reasons[0]
    assert not res.uncertain and res.scores["max_prob"] == pytest.approx(0.99)


def test_reference_flags_far_images_and_round_trips(tmp_path):
    from pellucid.core.model import build_classifier

    torch.manual_seed(0)
    model, _ = build_classifier("test_resnet", 2, pretrained=False)
    model.eval()
    gen = torch.Generator().manual_seed(0)

    def domain(n):  # smooth grey blobs: the "training domain"
        base = torch.rand(n, 1, 8, 8, generator=gen)
        x = torch.nn.functional.interpolate(base, size=64, mode="bilinear", align_corners=False)
        return x.repeat(1, 3, 1, 1)

    ref = ood.fit_reference(model, [domain(32), domain(32)], [domain(32)], quantile=0.95, source="test")
    assert ref.n_fit == 64 and ref.n_calib == 32 and ref.mean.shape == (model.spec.embedding_dim,)
    logits, feats = ood.forward_with_features(model, domain(64))
    inside = ref.distance(feats)
    assert (inside <= ref.distance_threshold).mean() > 0.8  # about 95 % pass by construction
    noise = torch.rand(16, 3, 64, 64, generator=gen)
    noise[:, 0] = 1.0  # saturated red, high-frequency: far from the blobs
    _, far = ood.forward_with_features(model, noise)
    assert (ref.distance(far) > ref.distance_threshold).all()
    res = ood.check_domain(noise[0].permute(1, 2, 0).numpy(), logits[0], np.array([0.5, 0.5]), modality="photo",
                           features=far[0], reference=ref)
    assert res.flagged and res.method == "reference" and "Mahalanobis" in res.summary()

    ood.save_reference(tmp_path, ref)
    back = ood.load_reference(tmp_path)
    np.testing.assert_allclose(back.distance(far), ref.distance(far), rtol=1e-4)
    assert back.distance_threshold == ref.distance_threshold and back.source == "test"
    assert ood.load_reference(tmp_path / "none") is None


def test_fit_reference_rejects_bad_input():
    from pellucid.core.model import build_classifier

    model, _ = build_classifier("test_resnet", 2, pretrained=False)
    with pytest.raises(ValueError, match="quantile"):
        ood.fit_reference(model, [], [], quantile=1.0)
    with pytest.raises(ValueError, match="at least 8 training"):
        ood.fit_reference(model.eval(), [torch.rand(2, 3, 64, 64)], [torch.rand(2, 3, 64, 64)])


def test_reference_from_split_needs_split(tmp_path):
    with pytest.raises(FileNotFoundError, match="split.json"):
        ood.reference_from_split(tmp_path, None, None)


def test_check_domain_flags_strips_and_thumbnails_by_the_files_own_shape():
    from pellucid.datasets.readers import Image

    probs, logits = np.array([0.1, 0.9]), np.array([0.0, 2.0])

    def check(h, w, original=None):
        arr = np.random.default_rng(3).random((h, w, 3), dtype=np.float32)
        img = Image(arr, {"original_size": original}) if original else arr
        return ood.check_domain(img, logits, probs, modality="photo")

    strip = check(1, 5000)
    assert strip.flagged and "a strip, 5000 times as long as it is wide" in strip.reasons[0]
    assert strip.scores["aspect_ratio"] == 5000
    # a view shrunk to 256 px keeps the file's shape in its meta: the reason quotes the file, not the view
    shrunk = check(1, 256, original=(6000, 1))
    assert "6000 times" in shrunk.reasons[0]
    tiny = check(5, 6)
    assert tiny.flagged and "only 5 px on its short side" in tiny.reasons[0]
    for h, w in ((54, 73), (117, 452), (28, 28), (288, 384)):  # the sample data's extremes pass
        assert not check(h, w).flagged, (h, w)
