"""LIME wrapper: seeded, batched, and equal to lime run directly."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pellucid.core.runtime import openvino_bf16_available
from pellucid.explain import get_explainer
from pellucid.explain.lime import heatmap_from_lime, segment, spearman
from tests.explain.conftest import images_for

OPTS = {"num_samples": 64, "n_segments": 16}


def test_same_seed_same_map_other_seed_other_map(tiny_models):
    model = tiny_models["test_resnet"]
    x = images_for(64, 1, seed=4)
    a = get_explainer("lime", seed=3, **OPTS).explain(model, x, [1])[0]
    b = get_explainer("lime", seed=3, **OPTS).explain(model, x, [1])[0]
    c = get_explainer("lime", seed=4, **OPTS).explain(model, x, [1])[0]
    np.testing.assert_array_equal(a.heatmap, b.heatmap)
    np.testing.assert_array_equal(a.extras["weights"], b.extras["weights"])
    assert not np.array_equal(a.extras["weights"], c.extras["weights"])


@pytest.mark.parametrize("method", ["slic", "quickshift"])
def test_segmentations(method):
    img = images_for(64, 1, seed=2)[0].permute(1, 2, 0).numpy()
    seg = segment(img, method, n_segments=16, kernel_size=2, max_dist=10, seed=0)
    assert seg.shape == (64, 64) and seg.min() == 0
    assert np.array_equal(np.unique(seg), np.arange(seg.max() + 1))  # numbered 0..n-1
    assert seg.max() >= 3
    with pytest.raises(KeyError, match="Did you mean 'slic'"):
        segment(img, "slik")


@pytest.mark.parametrize("backend, atol", [("torch", 1e-5), ("onnxruntime", 1e-3)])
def test_matches_lime_package(tiny_models, backend, atol):
    """Same segments, seed and samples: our vectorised pipeline reproduces LimeImageExplainer —
    exactly with eager torch, to float rounding through the ONNX Runtime fast path."""
    from lime import lime_image

    if backend == "onnxruntime":
        pytest.importorskip("onnxruntime", reason="the onnxruntime backend needs pellucid[export]")
    model = tiny_models["test_resnet"]
    x = images_for(64, 1, seed=6)
    ours = get_explainer("lime", precision="float32", backend=backend, **OPTS).explain(model, x, [1])[0]
    assert ours.extras["precision"] == "float32" and ours.extras["backend"] == backend
    segments = ours.extras["segments"]

    def classifier_fn(batch):
        t = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float()
        with torch.no_grad():
            return torch.softmax(model(t), 1).numpy()

    explainer = lime_image.LimeImageExplainer(random_state=0)
    ref = explainer.explain_instance(x[0].permute(1, 2, 0).numpy().astype(np.float64), classifier_fn,
                                     labels=(1,), top_labels=None, num_samples=OPTS["num_samples"],
                                     segmentation_fn=lambda img: segments, random_seed=0)
    np.testing.assert_allclose(ours.heatmap, heatmap_from_lime(ref, 1), atol=atol)


def test_stability_score(tiny_models):
    model = tiny_models["test_resnet"]
    x = images_for(64, 1, seed=7)
    lime = get_explainer("lime", **OPTS)
    same = lime.stability(model, x[0], seeds=[5, 5])
    assert same["spearman"] == pytest.approx(1.0) and same["top_iou"] in (1.0, pytest.approx(1.0))
    varied = lime.stability(model, x[0], seeds=[0, 1, 2])
    assert -1 <= varied["spearman"] < 1 and varied["seeds"] == [0, 1, 2]
    with pytest.raises(ValueError, match="two seeds"):
        lime.stability(model, x[0], seeds=[0])


def test_spearman_edge_cases():
    a = np.arange(9.0).reshape(3, 3)
    assert spearman(a, a) == 1.0
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(a, np.zeros_like(a)) == 0.0
    assert spearman(np.ones((3, 3)), np.ones((3, 3))) == 1.0


def test_bfloat16_precision_stays_close(tiny_models):
    model = tiny_models["test_resnet"]
    x = images_for(64, 1, seed=8)
    f32 = get_explainer("lime", precision="float32", **OPTS).explain(model, x)[0]
    bf16 = get_explainer("lime", precision="bfloat16", **OPTS).explain(model, x)[0]
    assert bf16.extras["precision"] == "bfloat16" and bf16.target == f32.target
    check = bf16.extras["bfloat16_check"]
    assert check["passed"] and check["images"] == 16 and check["max_abs_diff"] <= 0.1
    assert check["backend"] == ("openvino" if openvino_bf16_available() else "torch")
    assert spearman(f32.extras["weights"], bf16.extras["weights"]) > 0.8


def test_auto_precision_is_checked_bfloat16_where_native_and_falls_back_quietly(tiny_models, monkeypatch,
                                                                              record_property):
    import warnings

    import pellucid.explain.lime as lime_mod

    model = tiny_models["test_resnet"]
    x = images_for(64, 1, seed=8)
    opts = {"num_samples": 120, "n_segments": 16}
    f32 = get_explainer("lime", precision="float32", **opts).explain(model, x, [1])[0]
    fast = get_explainer("lime", **opts).explain(model, x, [1])[0]  # precision="auto" is the default
    native = openvino_bf16_available()
    record_property("cpu_branch", "native bfloat16 (OpenVINO)" if native else "no native bfloat16: float32")
    if not native:  # this CPU's branch: auto is plain float32, the same map as asking for it
        assert fast.extras["precision"] == "float32" and "bfloat16_check" not in fast.extras
        np.testing.assert_allclose(fast.extras["weights"], f32.extras["weights"], atol=1e-9)
        return
    assert fast.extras["precision"] == "bfloat16" and fast.extras["bfloat16_check"]["passed"]
    assert fast.extras["backend"] == "openvino" and "int8_check" not in fast.extras
    monkeypatch.setattr(lime_mod, "TOL_MAX", -1.0)  # nothing can pass
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto falls back without warning; the extras say what happened
        res = get_explainer("lime", **opts).explain(model, x, [1])[0]
    assert res.extras["precision"] == "float32" and res.extras["bfloat16_check"]["passed"] is False
    np.testing.assert_allclose(res.extras["weights"], f32.extras["weights"], atol=1e-9)


def test_bad_options():
    with pytest.raises(KeyError, match="Did you mean 'quickshift'"):
        get_explainer("lime", segmentation="quickshit")
    with pytest.raises(KeyError, match="Did you mean 'bfloat16'"):
        get_explainer("lime", precision="bfloat61")
    with pytest.raises(TypeError, match="Did you mean 'num_samples'"):
        get_explainer("lime", num_sample=10)
    # `--option lime.num_samples=100000000` had asked numpy for 33 GB; a million superpixels is not a map
    with pytest.raises(ValueError, match="num_samples must be at most 100,000"):
        get_explainer("lime", num_samples=10**8)
    with pytest.raises(ValueError, match="n_segments must be from 1 to 5,000"):
        get_explainer("lime", n_segments=10**6)


def test_int8_passes_give_nearly_the_float32_map(tiny_models):
    pytest.importorskip("onnxruntime", reason="INT8 passes need pellucid[export]")
    model = tiny_models["test_resnet"]
    x = images_for(64, 1, seed=8)
    opts = {"num_samples": 200, "n_segments": 16}
    f32 = get_explainer("lime", precision="float32", **opts).explain(model, x, [1])[0]
    i8 = get_explainer("lime", precision="int8", **opts).explain(model, x, [1])[0]
    assert i8.extras["precision"] == "int8" and i8.extras["backend"] == "onnxruntime"
    check = i8.extras["int8_check"]
    assert check["passed"] and check["images"] == 16 and 0 <= check["mean_abs_diff"] <= check["max_abs_diff"] <= 0.1
    assert i8.heatmap.shape == f32.heatmap.shape and 0 <= i8.heatmap.min() and i8.heatmap.max() <= 1
    assert spearman(i8.extras["weights"], f32.extras["weights"]) > 0.8
    with pytest.raises(ValueError, match="ONNX Runtime"):
        get_explainer("lime", precision="int8", backend="torch")


def test_int8_that_disagrees_with_float32_falls_back_to_float32_with_a_warning(tiny_models, monkeypatch):
    pytest.importorskip("onnxruntime", reason="INT8 passes need pellucid[export]")
    import pellucid.explain.lime as lime_mod

    model = tiny_models["test_resnet"]
    x = images_for(64, 1, seed=8)
    opts = {"num_samples": 120, "n_segments": 16}
    f32 = get_explainer("lime", precision="float32", **opts).explain(model, x, [1])[0]
    monkeypatch.setattr(lime_mod, "TOL_MAX", -1.0)  # no INT8 graph can pass
    with pytest.warns(UserWarning, match="computed in float32"):
        res = get_explainer("lime", precision="int8", **opts).explain(model, x, [1])[0]
    assert res.extras["precision"] == "float32" and res.extras["int8_check"]["passed"] is False
    np.testing.assert_allclose(res.extras["weights"], f32.extras["weights"], atol=1e-9)


def test_device_path_checks_bfloat16_and_falls_back(tiny_models, monkeypatch):
    """The GPU path (perturbed images composed with PyTorch on the model's device), run on the CPU."""
    import pellucid.explain.lime as lime_mod

    monkeypatch.setattr(lime_mod, "_compose_on_device", lambda device: True)
    model = tiny_models["test_resnet"]
    x = images_for(64, 1, seed=8)
    opts = {"num_samples": 120, "n_segments": 16, "backend": "torch"}
    f32 = get_explainer("lime", precision="float32", **opts).explain(model, x, [1])[0]
    bf16 = get_explainer("lime", precision="bfloat16", **opts).explain(model, x, [1])[0]
    assert bf16.extras["precision"] == "bfloat16" and bf16.extras["bfloat16_check"]["passed"]
    assert spearman(f32.extras["weights"], bf16.extras["weights"]) > 0.8
    with pytest.warns(UserWarning, match="INT8 passes run on the CPU"):
        i8 = get_explainer("lime", precision="int8", num_samples=120, n_segments=16).explain(model, x, [1])[0]
    assert i8.extras["precision"] == "float32" and "int8_check" not in i8.extras
    monkeypatch.setattr(lime_mod, "TOL_MAX", -1.0)
    with pytest.warns(UserWarning, match="computed in float32"):
        res = get_explainer("lime", precision="bfloat16", **opts).explain(model, x, [1])[0]
    assert res.extras["precision"] == "float32" and res.extras["bfloat16_check"]["passed"] is False
    np.testing.assert_allclose(res.extras["weights"], f32.extras["weights"], atol=1e-9)


def test_convergence_stops_on_a_prefix_of_limes_draw(tiny_models):
    """Stopping early uses exactly the first rows of the full draw: the map equals a plain run with that
    many samples, the same seed gives the same map, and ``converge=None`` runs every sample."""
    model = tiny_models["test_resnet"]
    x = images_for(64, 1, seed=8)
    opts = {"n_segments": 16, "precision": "float32", "backend": "torch", "min_samples": 100}
    early = get_explainer("lime", num_samples=600, **opts).explain(model, x, [1])[0]
    again = get_explainer("lime", num_samples=600, **opts).explain(model, x, [1])[0]
    used = early.extras["samples_used"]
    assert 100 <= used < 600, used  # this image settles before the end (so the prefix check below means something)
    assert used % 100 == 0 and early.extras["num_samples"] == 600
    np.testing.assert_array_equal(early.heatmap, again.heatmap)
    plain = get_explainer("lime", num_samples=used, converge=None, **opts).explain(model, x, [1])[0]
    np.testing.assert_allclose(early.extras["weights"], plain.extras["weights"], atol=1e-12)
    full = get_explainer("lime", num_samples=600, converge=None, **opts).explain(model, x, [1])[0]
    assert full.extras["samples_used"] == 600
    never = get_explainer("lime", num_samples=600, converge=1.0, **opts).explain(model, x, [1])[0]
    assert never.extras["samples_used"] >= used  # a stricter bar never stops sooner
    with pytest.raises(ValueError, match="converge"):
        get_explainer("lime", converge=1.5)
