"""Tests for pellucid.core.fewshot: prototype maths, episode sampling, the feature cache, episodic
fine-tuning and the prototypes model folder (fit → predict → explain), all on tiny inputs."""
from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pellucid.core import fewshot as fs
from pellucid.core.fewshot import (
    EpisodeSampler,
    FewShotError,
    ProtoConfig,
    compute_prototypes,
    pairwise_distances,
    prototype_logits,
)
from tests.conftest import data_dir


# ----------------------------------------------------------------------------- helpers
def _write_images(root: Path, per_class: int = 6, size: int = 40, classes=("red", "green", "blue")) -> Path:
    """A class-folder data set of small synthetic PNGs whose colour gives the class away."""
    import cv2

    rng = np.random.default_rng(0)
    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 60, size=(size, size, 3)).astype(np.uint8)
            img[..., k] = 200 + rng.integers(0, 50)
            cv2.imwrite(str(root / c / f"{c}_{i:02d}.png"), img[..., ::-1])  # cv2 writes BGR
    return root


class _Counter:
    """Counts images through a module's forward (a forward hook)."""

    def __init__(self, module: torch.nn.Module):
        self.images = 0
        self.calls = 0
        self.handle = module.register_forward_hook(self)

    def __call__(self, _module, inputs, _output):
        self.calls += 1
        self.images += inputs[0].shape[0]


@pytest.fixture()
def tiny_backbone():
    torch.manual_seed(0)
    return fs.create_backbone("test_resnet", pretrained=False)


# ----------------------------------------------------------------------------- maths
def test_compute_prototypes_golden_values():
    support = torch.tensor([[1.0, 0.0], [3.0, 2.0], [0.0, 4.0], [10.0, 10.0], [2.0, 6.0]])
    labels = torch.tensor([0, 0, 1, 2, 1])
    protos = compute_prototypes(support, labels)
    assert protos.shape == (3, 2)
    torch.testing.assert_close(protos, torch.tensor([[2.0, 1.0], [1.0, 5.0], [10.0, 10.0]]))


def test_compute_prototypes_refuses_an_empty_class():
    with pytest.raises(FewShotError, match=r"class\(es\) \[1\]"):
        compute_prototypes(torch.ones(3, 2), torch.tensor([0, 0, 2]), n_way=3)


@pytest.mark.parametrize("distance,expected", [
    ("euclidean", [[1.0, 1.0], [0.0, 2.0]]),          # squared Euclidean
    ("cosine", [[1.0 - 2 ** -0.5, 1.0 - 2 ** -0.5], [0.0, 1.0]]),
])
def test_pairwise_distances_golden(distance, expected):
    q = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    d = pairwise_distances(q, p, distance)
    torch.testing.assert_close(d, torch.tensor(expected), atol=1e-6, rtol=0)


def test_unknown_distance_suggests_a_name():
    with pytest.raises(KeyError, match="Did you mean 'cosine'"):
        ProtoConfig(distance="cosin")


def test_prototype_logits_plain_and_cl2n():
    support = torch.tensor([[2.0, 0.0], [4.0, 0.0], [0.0, 2.0], [0.0, 4.0]])
    labels = torch.tensor([0, 0, 1, 1])
    query = torch.tensor([[3.0, 1.0]])
    # plain: prototypes (3,0) and (0,3); squared distances 1 and 13
    torch.testing.assert_close(prototype_logits(support, labels, query), torch.tensor([[-1.0, -13.0]]))
    # CL2N: support mean (1.5, 1.5) is subtracted, then rows are L2-normalised
    cfg = ProtoConfig(center=True, normalize=True)
    logits = prototype_logits(support, labels, query, config=cfg)
    s = torch.nn.functional.normalize(support - 1.5, dim=1)
    protos = torch.stack([s[:2].mean(0), s[2:].mean(0)])
    q = torch.nn.functional.normalize(query - 1.5, dim=1)
    torch.testing.assert_close(logits, -((q[:, None] - protos[None]) ** 2).sum(-1))
    assert logits.argmax(1).item() == 0


def test_per_layer_normalisation_balances_blocks():
    # block 2 is 100x larger; with per-block L2 normalisation both blocks count equally
    a = torch.tensor([[1.0, 0.0, 0.0, 100.0]])
    x = fs._pre_transform(a, [2, 2], ProtoConfig(layers=("a", "b"), normalize=True))
    torch.testing.assert_close(x, torch.tensor([[1.0, 0.0, 0.0, 1.0]]))
    cfg = ProtoConfig(layers=("a", "b"), normalize=True, layer_weights=(0.5, 1.0), power=0.5)
    x = fs._pre_transform(torch.tensor([[4.0, 0.0, 0.0, 9.0]]), [2, 2], cfg)
    torch.testing.assert_close(x, torch.tensor([[0.5, 0.0, 0.0, 1.0]]))


def test_config_validation_and_round_trip():
    with pytest.raises(FewShotError, match=r"layer_weights has 1 values for 2 layer\(s\)"):
        ProtoConfig(layers=("a", "b"), layer_weights=(1.0,))
    with pytest.raises(FewShotError, match="scale must be a number above 0"):
        ProtoConfig(scale=0.0)
    cfg = fs.improved_config(fs.create_backbone("test_resnet")[0].spec)
    assert cfg.layers == ("layer2", "layer3", "layer4") and cfg.layer_weights == (0.5, 0.5, 1.0)
    assert cfg.image_size == 64 and cfg.center and cfg.normalize and cfg.power == 0.5
    assert ProtoConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("fields, message", [
    ({"head": "prototypes", "transductive": 10**7}, "transductive must be a whole number of steps from 0 to 50"),
    ({"scales": list(range(8, 4000, 8))}, "scales lists 499 input sides; at most 8"),
    ({"layers": ["a"] * 3000}, "layers must be at most 64 layer names"),
    ({"layers": ["a", "a", "b"]}, "layers lists a layer twice"),
    ({"power": 1e308}, "power must be a number above 0 and at most 4"),
    ({"scale": float("inf")}, "scale must be a number above 0"),
    ({"layers": ["a", "b"], "layer_weights": [1.0, float("nan")]}, "layer_weights must be finite numbers"),
])
def test_a_hand_made_fewshot_card_is_refused_before_its_numbers_are_used(fields, message):
    """A few-shot model folder may come from anyone: 10**7 transductive steps held `pellucid predict` for good, a
    power of 1e308 gave NaN probabilities under a class label, a repeated layer ended in a RuntimeError traceback."""
    base = {"layers": ["a", "b"], "layer_weights": [1.0, 1.0], "power": 0.5, "head": "logistic"}
    with pytest.raises(FewShotError, match=re.escape(message)):
        ProtoConfig.from_dict({**base, **fields})


# ----------------------------------------------------------------------------- episodes
def test_sampler_names_class_and_counts_when_too_few_images():
    labels = ["cat"] * 30 + ["human"] * 16
    with pytest.raises(FewShotError, match=r"class 'human' has 16 images in 16 groups; 10-shot \+ 10-query "
                                           r"needs 20 images"):
        EpisodeSampler(labels, None, n_way=2, n_shot=10, n_query=10, n_episodes=5)


def test_sampler_names_class_and_groups_when_groups_block_the_split():
    labels = ["cat"] * 30 + ["human"] * 16
    groups = [f"c{i}" for i in range(30)] + ["a"] * 12 + ["b"] * 2 + ["c"] * 2
    with pytest.raises(FewShotError) as err:
        EpisodeSampler(labels, groups, n_way=2, n_shot=5, n_query=10, n_episodes=5)
    msg = str(err.value)
    assert "class 'human' has 16 images in 3 groups (largest 12)" in msg
    assert "5-shot + 10-query" in msg and "leaves 4 query images" in msg
    assert "cat" not in msg


def test_sampler_single_group_class_is_refused_and_block_split_helps():
    from pellucid.datasets.samples import Sample

    samples = [Sample(f"/x/fish/image_{i}.jpg", "fish", "rec") for i in range(40)]
    samples += [Sample(f"/x/ship/{i}.jpg", "ship", f"s{i}") for i in range(40)]
    labels, groups = [s.label for s in samples], [s.group for s in samples]
    with pytest.raises(FewShotError, match=r"class 'fish' has 40 images in 1 group; .*at least 2 groups"):
        EpisodeSampler(labels, groups, n_shot=5, n_query=10)
    with pytest.warns(UserWarning, match=r"\['fish'\] are one group each"):
        split = fs.split_single_group_classes(samples, n_blocks=4)
    fish_groups = [s.group for s in split if s.label == "fish"]
    assert sorted(set(fish_groups)) == ["rec#0", "rec#1", "rec#2", "rec#3"]
    # contiguous blocks in frame order: image_0..image_9 form block 0 and image_10 starts block 1
    # (a plain string sort would put image_10 right after image_1)
    assert fish_groups[:10] == ["rec#0"] * 10 and fish_groups[10] == "rec#1"
    EpisodeSampler([s.label for s in split], [s.group for s in split], n_shot=5, n_query=10, n_episodes=3)


def test_sampler_rejects_impossible_way_and_counts():
    labels = ["a"] * 20 + ["b"] * 20
    with pytest.raises(FewShotError, match="3-way episodes need between 2 and 2 classes; the data has 2: a, b"):
        EpisodeSampler(labels, n_way=3)
    with pytest.raises(FewShotError, match="n_shot must be at least 1, got 0"):
        EpisodeSampler(labels, n_shot=0)


def test_support_and_query_never_share_a_group():
    rng = np.random.default_rng(1)
    labels = np.repeat(["a", "b", "c", "d"], 60)
    groups = np.array([f"{lab}{g}" for lab, g in zip(labels, rng.integers(0, 15, size=240))])
    sampler = EpisodeSampler(labels, groups, n_way=3, n_shot=5, n_query=7, n_episodes=200, seed=3)
    for ep in sampler:
        assert len(ep.support) == 15 and len(ep.query) == 21
        assert not set(groups[ep.support]) & set(groups[ep.query])
        assert len(set(ep.support) | set(ep.query)) == 36
        for idx, lab in ((ep.support, ep.support_labels), (ep.query, ep.query_labels)):
            assert [ep.classes[k] for k in lab] == list(labels[idx])


def test_awkward_group_sizes_still_give_valid_episodes():
    # only {5} or {5, 1} can hold the 5-shot support while 10 queries remain
    labels = ["x"] * 16 + ["y"] * 16
    groups = ["big"] * 10 + ["mid"] * 5 + ["one"] + [f"y{i}" for i in range(16)]
    sampler = EpisodeSampler(labels, groups, n_shot=5, n_query=10, n_episodes=100, seed=0)
    g = np.array(groups)
    for ep in sampler:
        assert not set(g[ep.support]) & set(g[ep.query])


def test_episodes_are_deterministic_under_a_seed():
    labels = np.repeat(["a", "b", "c", "d", "e"], 30)
    mk = lambda seed: EpisodeSampler(labels, None, n_way=3, n_shot=2, n_query=4, n_episodes=20, seed=seed)
    a, b, c = list(mk(7)), list(mk(7)), list(mk(8))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.support, y.support)
        np.testing.assert_array_equal(x.query, y.query)
        assert x.classes == y.classes
    assert any(not np.array_equal(x.support, z.support) for x, z in zip(a, c))
    # episode i does not depend on the episodes drawn before it
    np.testing.assert_array_equal(mk(7).episode(13).query, a[13].query)


def test_evaluate_episodes_on_separable_embeddings():
    rng = np.random.default_rng(0)
    centres = np.eye(4, 16) * 5
    feats = torch.tensor(np.concatenate([c + rng.normal(size=(25, 16)) for c in centres]), dtype=torch.float32)
    labels = np.repeat(list("abcd"), 25)
    res = fs.evaluate_episodes(feats, labels, n_shot=5, n_query=5, n_episodes=50)
    assert res["episodes"] == 50 and res["n_way"] == 4
    assert res["accuracy"] > 0.95 and 0 <= res["ci95"] < 0.05
    noise = torch.tensor(rng.normal(size=(100, 16)), dtype=torch.float32)
    chance = fs.evaluate_episodes(noise, labels, n_shot=5, n_query=5, n_episodes=200)
    assert abs(chance["accuracy"] - 0.25) < 0.06
    assert chance["ci95"] == pytest.approx(1.96 * chance["std"] / np.sqrt(200))


def test_shot_table_lowers_queries_and_reports_impossible_rows():
    feats = torch.randn(46, 8)
    labels = ["a"] * 30 + ["b"] * 16
    rows = fs.shot_table(feats, labels, shots=(1, 10, 20), n_query=10, n_episodes=10)
    assert [r["n_shot"] for r in rows] == [1, 10, 20]
    assert rows[0]["n_query"] == 10 and not rows[0]["note"]
    assert rows[1]["n_query"] == 6 and "6 queries per class" in rows[1]["note"]
    assert "error" in rows[2] and "class 'b' has 16 images" in rows[2]["error"]
    table = fs.format_shot_table(rows)
    assert "| 10 | 2 | 6 | 10 |" in table and "n/a" in table


# ----------------------------------------------------------------------------- feature cache
def test_backbone_runs_once_per_image_and_the_cache_is_used(tmp_path, tiny_backbone):
    bb, info = tiny_backbone
    root = _write_images(tmp_path / "data", per_class=8)
    from pellucid.datasets.samples import load_samples

    samples = load_samples(root)
    paths, labels = [s.path for s in samples], [s.label for s in samples]
    net = fs.PrototypicalNetwork(bb, ProtoConfig(layers=("layer3", "layer4")))
    counter = _Counter(bb.net)
    cache = tmp_path / "cache"
    fs.clear_memory_cache()
    feats = fs.extract_features(net, paths, image_size=32, weight_info=info, cache_dir=cache, batch_size=5)
    assert feats.shape[0] == 24 and counter.images == 24
    assert net.embedder.dims == [192, 96] and feats.shape == (24, 288)  # pooled layer3 + layer4
    res = fs.evaluate_episodes(feats, labels, n_shot=5, n_query=3, n_episodes=500, dims=net.embedder.dims)
    assert res["episodes"] == 500
    assert counter.images == 24  # 500 episodes, no backbone pass
    again = fs.extract_features(net, paths, image_size=32, weight_info=info, cache_dir=cache)
    assert counter.images == 24 and torch.equal(again, feats)
    fs.clear_memory_cache()
    from_disk = fs.extract_features(net, paths, image_size=32, weight_info=info, cache_dir=cache)
    assert counter.images == 24 and torch.equal(from_disk, feats)
    assert len(list(cache.glob("*.safetensors"))) == 1
    # a changed file, another size or other weights are misses
    os.utime(paths[0], ns=(1, 1))
    fs.extract_features(net, paths, image_size=32, weight_info=info, cache_dir=cache)
    assert counter.images == 48
    fs.extract_features(net, paths, image_size=48, weight_info=info, cache_dir=cache)
    assert counter.images == 72
    with torch.no_grad():
        next(bb.parameters()).add_(1.0)
    fs.extract_features(net, paths, image_size=48, weight_info=info, cache_dir=cache)
    assert counter.images == 96
    counter.handle.remove()


def test_cached_features_match_the_model_forward(tmp_path, tiny_backbone):
    bb, info = tiny_backbone
    root = _write_images(tmp_path / "data", per_class=3)
    from pellucid.datasets.samples import load_samples
    from pellucid.datasets.torchdata import load_prepared, to_tensor

    paths = [s.path for s in load_samples(root)]
    net = fs.PrototypicalNetwork(bb, ProtoConfig(layers=("layer2", "layer4"), flip=True)).eval()
    feats = fs.extract_features(net, paths, image_size=32, cache_dir=None)
    x = torch.stack([to_tensor(load_prepared(p, 32)) for p in paths])
    with torch.no_grad():
        torch.testing.assert_close(net.raw_features(x), feats, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- episodic fine-tuning
def test_split_backbone_reproduces_the_embedding_and_finetuning_trains_only_the_tail(tiny_backbone):
    bb, _ = tiny_backbone
    trunk, tail = fs.split_backbone(bb, "layer4", layers=("layer3", "layer4"))
    assert trunk == "layer3"
    tail_ids = {id(p) for p in tail.parameters()}
    assert tail_ids == {id(p) for p in bb.module_at("layer4").parameters()}
    with pytest.raises(KeyError, match="Did you mean 'layer4'"):
        fs.split_backbone(bb, "layer5")
    torch.manual_seed(0)
    maps = torch.randn(24, 192, 2, 2).abs().half()
    maps[:12, :64] += 1.5  # class a lights up the first channels
    labels = ["a"] * 12 + ["b"] * 12
    before_tail = {k: v.clone() for k, v in bb.module_at("layer4").state_dict().items()}
    before_trunk = {k: v.clone() for k, v in bb.module_at("layer1").state_dict().items()}
    module = fs.finetune_episodic(tail, maps, labels, n_shot=2, n_query=3, episodes=4, lr=1e-2,
                                  config=ProtoConfig(normalize=True, scale=10.0), dims=[192, 96])
    after_tail = bb.module_at("layer4").state_dict()
    assert any(not torch.equal(before_tail[k], after_tail[k]) for k in before_tail if "weight" in k)
    assert all(torch.equal(before_trunk[k], v) for k, v in bb.module_at("layer1").state_dict().items())
    # frozen BatchNorm statistics
    assert all(torch.equal(before_tail[k], after_tail[k]) for k in before_tail if "running" in k)
    assert torch.isfinite(module.log_scale).all()


# ----------------------------------------------------------------------------- model folder
def _support_manifest(tmp_path: Path, per_class: int = 4) -> Path:
    """A support folder whose manifest points at real tb_cxr images (nothing is copied)."""
    src = data_dir("tb_cxr")
    rows = ["path,label,group"]
    for label in ("normal", "tuberculosis"):
        files = sorted((src / label).iterdir())[:per_class]
        rows += [f"{f.resolve()},{label},{f.stem}" for f in files]
    support = tmp_path / "support"
    support.mkdir()
    (support / "manifest.csv").write_text("\n".join(rows) + "\n")
    return support


@pytest.fixture(scope="module")
def proto_folder(tmp_path_factory) -> Path:
    tmp_path = tmp_path_factory.mktemp("proto")
    support = _support_manifest(tmp_path)
    torch.manual_seed(0)
    return fs.fit_prototypes(support, tmp_path / "model", backbone="test_resnet", pretrained=False,
                             config=ProtoConfig(layers=("layer3", "layer4"), power=0.5, center=True, normalize=True,
                                                image_size=64), cache_dir=tmp_path / "cache")


def test_fit_then_predict_with_the_standard_predictor(proto_folder):
    from pellucid.core.modelfolder import load_model
    from pellucid.core.predict import Predictor

    card = json.loads((proto_folder / "card.json").read_text())
    assert card["kind"] == "prototypes" and card["task"] == "fewshot"
    assert card["classes"] == ["normal", "tuberculosis"]
    assert card["weights"]["source"] == "random"
    assert card["preprocessing"]["image_size"] == 64 and card["backbone"]["name"] == "test_resnet"
    assert len(card["support"]) == 8 and {s["label"] for s in card["support"]} == {"normal", "tuberculosis"}
    assert 0.0 <= card["metrics"]["support_loo_accuracy"] <= 1.0
    model, _ = load_model(proto_folder)
    assert isinstance(model, fs.PrototypicalNetwork) and not model.training
    assert model.prototypes.shape == (2, 192 + 96)
    src = data_dir("tb_cxr")
    queries = sorted((src / "normal").iterdir())[:2] + sorted((src / "tuberculosis").iterdir())[:2]
    pred = Predictor(proto_folder)
    results = pred.predict_paths(queries)
    assert len(results) == 4 and not any(r.error for r in results)
    for r in results:
        assert r.label in ("normal", "tuberculosis")
        assert sum(r.probs.values()) == pytest.approx(1.0, abs=1e-5)
    # support images are classified as their own class (their distance to their prototype is small)
    assert [r.label for r in results] == ["normal", "normal", "tuberculosis", "tuberculosis"]


def test_round_trip_gives_identical_logits(proto_folder, tmp_path):
    import shutil

    from pellucid.core.modelfolder import load_model

    copy = tmp_path / "copy"
    shutil.copytree(proto_folder, copy)
    a, _ = load_model(proto_folder)
    b, _ = load_model(copy)
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        la, lb = a(x), b(x)
    assert la.shape == (3, 2) and torch.equal(la, lb) and (la <= 0).all()  # scaled negative distances


def test_nearest_support_and_cam_gradient(proto_folder):
    from pellucid.core.modelfolder import load_model
    from pellucid.datasets.torchdata import load_prepared, to_tensor

    model, card = load_model(proto_folder)
    first = card["support"][0]
    x = to_tensor(load_prepared(first["path"], 64))
    near = fs.nearest_support(model, x, k=3)
    assert len(near) == 3
    assert near[0][0] == first["path"] and near[0][1] == first["label"] and near[0][2] == pytest.approx(0, abs=1e-4)
    assert [d for _, _, d in near] == sorted(d for _, _, d in near)
    with pytest.raises(FewShotError, match="one image"):
        fs.nearest_support(model, torch.rand(2, 3, 64, 64))
    # a CAM on the distance-to-prototype target: gradients reach the hooked layer
    acts = {}
    layer = model.backbone.module_at(model.spec.cam_layer)

    def keep(_module, _inputs, output):
        output.retain_grad()
        acts["a"] = output

    h = layer.register_forward_hook(keep)
    logits = model(x.unsqueeze(0).requires_grad_(True))
    logits[0, 1].backward()
    h.remove()
    assert acts["a"].grad is not None and acts["a"].grad.abs().sum() > 0


def test_fit_refuses_a_registered_task_name_with_other_classes(tmp_path):
    support = _support_manifest(tmp_path, per_class=2)
    (support / "manifest.csv").write_text((support / "manifest.csv").read_text().replace(",normal,", ",healthy,"))
    with pytest.raises(FewShotError, match="task name 'tb' belongs to the registered task"):
        fs.fit_prototypes(support, tmp_path / "m", backbone="test_resnet", pretrained=False, task="tb")


def test_fit_never_writes_into_another_model_or_run_unless_asked(tmp_path, proto_folder):
    """An --out holding a trained model used to be overwritten in place, leaving a folder of two models."""
    import shutil

    from pellucid.core.runs import TrainingError

    support = _support_manifest(tmp_path, per_class=2)
    target = tmp_path / "trained"
    shutil.copytree(proto_folder, target)
    (target / "history.json").write_text("{}")  # a file of a training run beside the model
    (target / "notes.txt").write_text("mine")  # not pellucid's: never touched
    before = (target / "model.safetensors").read_bytes()
    kw = dict(backbone="test_resnet", pretrained=False, cache_dir=tmp_path / "cache",
              config=ProtoConfig(layers=("layer4",), image_size=64))
    with pytest.raises(TrainingError, match="holds a model .*--overwrite to replace it"):
        fs.fit_prototypes(support, target, **kw)
    assert (target / "model.safetensors").read_bytes() == before  # refused before any work
    fs.fit_prototypes(support, target, overwrite=True, **kw)
    assert not (target / "history.json").exists() and (target / "notes.txt").read_text() == "mine"
    assert json.loads((target / "card.json").read_text())["metrics"]["n_support"] == 4


# ----------------------------------------------------------------------------- CLI
def _ns(**kw) -> argparse.Namespace:
    base = dict(action="fit", support=None, backbone="test_resnet", out=None, data=None, shots="1,5,10",
                episodes=20, pretrained=False)
    base.update(kw)
    return argparse.Namespace(**base)


def test_cli_fit_and_eval(tmp_path, capsys, monkeypatch):
    from pellucid.core import fewshot_cli

    monkeypatch.chdir(tmp_path)  # the default feature cache lives under runs/
    data = _write_images(tmp_path / "data", per_class=12)
    assert fewshot_cli.run(_ns(support=str(data), out=str(tmp_path / "m"))) == 0
    out = capsys.readouterr().out
    assert "model folder:" in out and "blue" in out
    assert json.loads((tmp_path / "m" / "card.json").read_text())["kind"] == "prototypes"
    assert fewshot_cli.run(_ns(action="eval", data=str(data), shots="1,2", episodes=30)) == 0
    out = capsys.readouterr().out
    assert "| 1 | 3 | 10 | 30 |" in out and "| 2 | 3 | 10 | 30 |" in out and "± " in out


@pytest.mark.parametrize("kw,message", [
    (dict(action="fit"), "needs --support DIR"),
    (dict(action="eval"), "needs --data DIR"),
    (dict(action="eval", data="DATA", shots="1,five"), "--shots must be comma-separated whole numbers"),
    (dict(action="eval", data="DATA", shots="40"), "class 'blue' has 8 images"),
])
def test_cli_user_errors_are_one_line(tmp_path, kw, message, monkeypatch, capsys):
    from pellucid.cli import main
    from pellucid.core import fewshot_cli
    from pellucid.core.fewshot import FewShotError

    monkeypatch.chdir(tmp_path)
    data = _write_images(tmp_path / "data", per_class=8)
    if kw.get("data") == "DATA":
        kw["data"] = str(data)
    with pytest.raises(FewShotError, match=message) as err:
        fewshot_cli.run(_ns(**kw))
    assert "\n" not in str(err.value)
    if kw["action"] == "fit":  # through the command line: one line on stderr, exit code 2
        assert main(["fewshot", "fit"]) == 2
        assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------- levers: support_flip, transductive
def test_new_config_fields_validate_and_default_off():
    cfg = ProtoConfig()
    assert cfg.support_flip is False and cfg.transductive == 0
    with pytest.raises(FewShotError, match="transductive must be a whole number of steps"):
        ProtoConfig(transductive=-1)
    cfg = ProtoConfig(support_flip=True, transductive=3)
    assert ProtoConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    # a card written before these fields existed still reads (both off)
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("support_flip", "transductive")}
    assert ProtoConfig.from_dict(old) == ProtoConfig()


def _two_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    query = torch.cat([centers[0] + 0.5 * torch.randn(40, 2, generator=g),
                       centers[1] + 0.5 * torch.randn(40, 2, generator=g)])
    truth = torch.tensor([0] * 40 + [1] * 40)
    # a biased support: both classes' examples sit right of their cluster
    support = torch.tensor([[2.0, 0.2], [2.0, -0.2], [4.5, 0.2], [4.5, -0.2]])
    return centers, query, truth, support, torch.tensor([0, 0, 1, 1])


def test_refine_prototypes_moves_towards_the_query_clusters():
    centers, query, truth, support, labels = _two_clusters()
    plain = fs.refine_prototypes(support, labels, query, 2, steps=0)
    torch.testing.assert_close(plain, compute_prototypes(support, labels, 2))
    refined = fs.refine_prototypes(support, labels, query, 2, steps=3, scale=1.0)
    assert ((refined - centers).norm(dim=1) < (plain - centers).norm(dim=1) / 2).all()

    def acc(p):
        return float((pairwise_distances(query, p).argmin(1) == truth).float().mean())

    assert acc(plain) < 0.7 and acc(refined) > 0.95
    # an empty batch leaves the prototypes alone
    torch.testing.assert_close(fs.refine_prototypes(support, labels, query[:0], 2, steps=3), plain)


def test_transductive_network_refines_per_batch_and_keeps_its_prototypes(tiny_backbone):
    centers, query, truth, support, labels = _two_clusters()
    bb, _ = tiny_backbone
    net = fs.PrototypicalNetwork(bb, ProtoConfig(transductive=3))
    net.set_support(support, labels, 2)
    stored = net.prototypes.clone()
    logits = net.logits(query)
    assert float((logits.argmax(1) == truth).float().mean()) > 0.95
    torch.testing.assert_close(net.prototypes, stored)
    plain = fs.PrototypicalNetwork(bb, ProtoConfig())
    plain.set_support(support, labels, 2)
    assert float((plain.logits(query).argmax(1) == truth).float().mean()) < 0.7
    # the batch matters: one query alone is scored against (nearly) the support prototypes
    assert not torch.allclose(net.logits(query[:1]), logits[:1])


def test_mirror_features_match_the_flipped_forward(tmp_path, tiny_backbone):
    bb, info = tiny_backbone
    data = _write_images(tmp_path / "d", per_class=2)
    paths = sorted(str(p) for p in data.rglob("*.png"))
    net = fs.PrototypicalNetwork(bb, ProtoConfig(layers=("layer3", "layer4"))).eval()
    fs.clear_memory_cache()
    plain = fs.extract_features(net, paths, image_size=64, weight_info=info, cache_dir=tmp_path / "c")
    mirrored = fs.extract_features(net, paths, image_size=64, weight_info=info, cache_dir=tmp_path / "c",
                                   mirror=True)
    assert len(list((tmp_path / "c").glob("*.safetensors"))) == 2  # own cache keys
    from pellucid.datasets.torchdata import load_prepared, to_tensor

    x = torch.stack([to_tensor(load_prepared(p, 64)) for p in paths])
    with torch.no_grad():
        torch.testing.assert_close(mirrored, net.raw_features(x.flip(3)), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(plain, mirrored)


def test_support_flip_adds_mirrored_support_embeddings(tmp_path):
    support = _support_manifest(tmp_path, per_class=3)
    cfg = ProtoConfig(layers=("layer3", "layer4"), power=0.5, center=True, normalize=True, image_size=64)
    torch.manual_seed(0)
    folder = fs.fit_prototypes(support, tmp_path / "m", backbone="test_resnet", pretrained=False,
                               config=replace(cfg, support_flip=True), cache_dir=tmp_path / "cache")
    from pellucid.core.modelfolder import load_model
    from pellucid.datasets.torchdata import load_prepared, to_tensor

    model, card = load_model(folder)
    assert card["fewshot"]["support_flip"] is True and any("mirror" in n for n in card["fewshot"]["notes"])
    assert len(card["support"]) == 6 and model.support_embeddings.shape[0] == 12
    assert model.support_labels.tolist() == [0, 0, 0, 1, 1, 1] * 2
    x = torch.stack([to_tensor(load_prepared(s["path"], 64)) for s in card["support"]])
    with torch.no_grad():
        torch.testing.assert_close(model.support_embeddings[6:], model.features(x.flip(3)), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(model.support_embeddings[:6], model.features(x), atol=1e-4, rtol=1e-4)
    # prototypes are the means over originals and mirrors; explanations name each image once
    torch.testing.assert_close(model.prototypes, compute_prototypes(model.support_embeddings, model.support_labels, 2))
    near = fs.nearest_support(model, x[0], k=6)
    assert len({p for p, _, _ in near}) == 6 and near[0][0] == card["support"][0]["path"]
    assert 0.0 <= card["metrics"]["support_loo_accuracy"] <= 1.0


def test_leave_one_out_drops_an_image_with_its_mirror():
    from pellucid.core.fewshot.folder import _fit_scale

    emb = torch.nn.functional.normalize(torch.randn(8, 4, generator=torch.Generator().manual_seed(1)), dim=1)
    labels = torch.tensor([0, 0, 1, 1])
    # mirrors identical to their images: leaving out both must give the same answer as no mirrors
    with_mirrors = _fit_scale(torch.cat([emb[:4], emb[:4]]), torch.cat([labels, labels]), 2, ProtoConfig(),
                              n_images=4)
    alone = _fit_scale(emb[:4], labels, 2, ProtoConfig())
    assert with_mirrors == pytest.approx(alone)


def test_defaults_are_recorded_in_the_card_and_old_folders_load(tmp_path):
    from pellucid.core.modelfolder import load_model

    support = _support_manifest(tmp_path, per_class=2)
    torch.manual_seed(0)
    folder = fs.fit_prototypes(support, tmp_path / "m", backbone="test_resnet", pretrained=False,
                               cache_dir=tmp_path / "cache")
    card = json.loads((folder / "card.json").read_text())
    spec = fs.create_backbone("test_resnet")[0].spec
    want = fs.default_config(spec)
    for key in ("layers", "flip", "support_flip", "auto_weights", "transductive", "power", "center", "normalize"):
        got = card["fewshot"][key]
        assert (tuple(got) if isinstance(got, list) else got) == getattr(want, key), key
    assert card["fewshot"]["transductive"] == 0  # never a default
    # auto_weights (the default): the chosen weighting is stored, with every candidate's leave-one-out NLL
    assert want.auto_weights and tuple(card["fewshot"]["layer_weights"]) in fs.weight_candidates(len(want.layers))
    assert len(card["metrics"]["layer_weights_loo_nll"]) == len(fs.weight_candidates(len(want.layers)))
    assert any("leave-one-out" in n for n in card["fewshot"]["notes"])
    # opt-in transduction is recorded and stated
    t = fs.fit_prototypes(support, tmp_path / "t", backbone="test_resnet", pretrained=False,
                          cache_dir=tmp_path / "cache", transductive=2)
    tcard = json.loads((t / "card.json").read_text())
    assert tcard["fewshot"]["transductive"] == 2
    assert any("depends on the other images" in n for n in tcard["fewshot"]["notes"])
    # a folder written before support_flip / transductive existed loads and predicts as before
    old = json.loads((folder / "card.json").read_text())
    for key in ("support_flip", "transductive", "notes", "backbones", "auto_backbones", "extra_backbones"):
        old["fewshot"].pop(key, None)
    (folder / "card.json").write_text(json.dumps(old))
    model, _ = load_model(folder)
    assert model.config.support_flip is False and model.config.transductive == 0
    assert model.config.backbones == () and len(model.embedder.extras) == 0
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert model(x).shape == (2, 2)


def test_auto_weights_picks_the_informative_layer_by_leave_one_out(tiny_backbone):
    bb, _ = tiny_backbone
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0] * 5 + [1] * 5)
    informative = torch.randn(10, 8, generator=g).abs() + 3.0 * torch.nn.functional.one_hot(labels, 8)
    noise = torch.randn(10, 8, generator=g).abs() * 5
    raw = torch.cat([informative, noise], 1)
    cfg = ProtoConfig(layers=("layer3", "layer4"), power=0.5, center=True, normalize=True,
                      layer_weights=(0.5, 1.0), auto_weights=True)
    net = fs.PrototypicalNetwork(bb, cfg)
    net.embedder.dims = [8, 8]
    fitted = fs.fit_support(net, raw, labels, 2)
    scores = net.weight_scores
    assert set(scores) == {"0.5,1", "1,1", "1,0.5", "0,1"}
    chosen = min(scores, key=scores.get)
    assert net.config.layer_weights == tuple(float(x) for x in chosen.split(","))
    assert max(scores, key=scores.get) == "0,1"  # the noise block alone is the worst choice
    assert net.config.layer_weights[0] == 1.0  # the informative shallow block keeps full weight
    assert fitted[1] == 1.0 and net.config.scale == pytest.approx(fitted[0])
    assert fs.weight_candidates(3)[0] == (0.5, 0.5, 1.0) and fs.weight_candidates(1) == [(1.0,)]


# ----------------------------------------------------------------------------- embedding chosen by leave-one-out
def test_embedding_weight_candidates_apply_each_weighting_to_every_backbone():
    layers = ("layer3", "layer4", "shallow_cnn:block2", "shallow_cnn:block3")
    assert fs.layer_groups(layers) == [("", ["layer3", "layer4"]),
                                       ("shallow_cnn", ["shallow_cnn:block2", "shallow_cnn:block3"])]
    assert fs.embedding_weight_candidates(layers) == [w + w for w in fs.weight_candidates(2)]
    assert fs.embedding_weight_candidates(("a", "b", "c")) == fs.weight_candidates(3)  # one backbone: unchanged


def _candidate_nets(tiny_backbone, primary_informative: bool):
    """Two candidate embeddings of one synthetic 2-way support set (10 images): the primary's two
    layer blocks alone, or the primary followed by an extra backbone's two blocks. Exactly one of
    the two backbones separates the classes (weakly, so that leave-one-out is not perfect for both
    candidates); the other is noise."""
    bb, _ = tiny_backbone
    extra, _ = fs.create_backbone("shallow_cnn", pretrained=False)
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0] * 5 + [1] * 5)

    def informative():
        return torch.randn(10, 8, generator=g).abs() + 1.0 * torch.nn.functional.one_hot(labels, 8)

    def noise():
        return torch.randn(10, 8, generator=g).abs() * 5

    primary = torch.cat([informative(), informative()] if primary_informative else [noise(), noise()], 1)
    other = torch.cat([noise(), noise()] if primary_informative else [informative(), informative()], 1)
    base = ProtoConfig(layers=("layer3", "layer4"), power=0.5, center=True, normalize=True, layer_weights=(0.5, 1.0),
                       auto_weights=True)
    alone = fs.PrototypicalNetwork(bb, fs.embedding_config(base, bb.spec))
    alone.embedder.dims = [8, 8]
    both_cfg = replace(base, layers=base.layers + ("shallow_cnn:block2", "shallow_cnn:block3"),
                       layer_weights=(0.5, 1.0, 0.5, 1.0), backbones=("shallow_cnn",))
    both = fs.PrototypicalNetwork(bb, both_cfg, extras=[extra])
    both.embedder.dims = [8, 8, 8, 8]
    fits = {"alone": fs.fit_support(alone, primary, labels, 2),
            "both": fs.fit_support(both, torch.cat([primary, other], 1), labels, 2)}
    return fits


@pytest.mark.parametrize("primary_informative,expected", [(False, "both"), (True, "alone")])
def test_leave_one_out_picks_the_backbone_set_that_separates_the_classes(tiny_backbone, primary_informative,
                                                                         expected):
    fits = _candidate_nets(tiny_backbone, primary_informative)
    assert fs.select_embedding(fits, "nll") == expected
    other = ({"alone", "both"} - {expected}).pop()
    assert fits[expected][1] > fits[other][1]  # leave-one-out accuracy agrees
    assert fs.select_embedding(fits, "accuracy") == expected


def test_select_embedding_edge_cases():
    assert fs.select_embedding({"a": (1.0, 1.0, 0.5), "b": None}) is None  # a class with one image: no choice
    assert fs.select_embedding({"a": (1.0, 0.8, 0.2), "b": (1.0, 0.9, 0.4)}, "accuracy") == "b"
    assert fs.select_embedding({"a": (1.0, 0.8, 0.2), "b": (1.0, 0.9, 0.4)}, "nll") == "a"
    with pytest.raises(KeyError, match="nll"):
        fs.select_embedding({"a": (1.0, 1.0, 0.1)}, "nlll")


def test_config_backbones_validate_and_round_trip():
    cfg = ProtoConfig(layers=("layer4", "shallow_cnn:block3"), backbones=("shallow_cnn",),
                      auto_backbones=(("shallow_cnn",), ("test_resnet", "shallow_cnn")))
    assert ProtoConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(KeyError, match="shallow_cnn"):
        ProtoConfig(backbones=("shalow_cnn",))  # did-you-mean
    with pytest.raises(FewShotError, match="twice"):
        ProtoConfig(backbones=("shallow_cnn", "shallow_cnn"))
    assert ProtoConfig().backbones == () and ProtoConfig().auto_backbones == ()


def test_two_backbone_embedder_resizes_for_each_backbone(tiny_backbone):
    bb, _ = tiny_backbone
    extra, _ = fs.create_backbone("shallow_cnn", pretrained=False)
    cfg = fs.embedding_config(ProtoConfig(layers=("layer3", "layer4"), normalize=True), bb.spec, [extra.spec])
    assert cfg.layers == ("layer3", "layer4", "shallow_cnn:block1", "shallow_cnn:block2", "shallow_cnn:block3")
    assert cfg.image_size == 64 and cfg.backbones == ("shallow_cnn",)
    net = fs.PrototypicalNetwork(bb, cfg, extras=[extra]).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        raw = net.raw_features(x)
        small = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", antialias=True)
        direct = net.embedder.extras[0].net.block1((small - net.embedder.mean1) / net.embedder.std1).mean((2, 3))
    dims = net.embedder.dims
    assert len(dims) == 5 and dims[2:] == [32, 64, 128] and raw.shape == (2, sum(dims))
    # the extra backbone saw the input resized to its own 32 px and normalised with its own statistics
    start = sum(dims[:2])
    torch.testing.assert_close(raw[:, start:start + 32], direct)
    with pytest.raises(FewShotError, match="order"):
        fs.Embedder(bb, ("shallow_cnn:block3", "layer4"), extras=[extra])
    with pytest.raises(FewShotError, match="not among the extra"):
        fs.Embedder(bb, ("layer4", "resnet18:layer4"), extras=[extra])


@pytest.fixture(scope="module")
def two_backbone_folder(tmp_path_factory) -> Path:
    """A prototypes folder whose embedding concatenates test_resnet and shallow_cnn (fixed choice)."""
    tmp_path = tmp_path_factory.mktemp("proto2")
    support = _support_manifest(tmp_path)
    torch.manual_seed(0)
    cfg = ProtoConfig(layers=("layer3", "layer4"), power=0.5, center=True, normalize=True, image_size=64,
                      auto_weights=True, backbones=("shallow_cnn",))
    return fs.fit_prototypes(support, tmp_path / "model", backbone="test_resnet", pretrained=False, config=cfg,
                             cache_dir=tmp_path / "cache")


def test_two_backbone_folder_predicts_the_same_after_reload_and_explains(two_backbone_folder, tmp_path):
    import shutil

    from pellucid.core.modelfolder import load_model
    from pellucid.core.predict import Predictor
    from pellucid.explain.base import get_explainer

    card = json.loads((two_backbone_folder / "card.json").read_text())
    assert card["fewshot"]["backbones"] == ["shallow_cnn"]
    assert card["fewshot"]["layers"][-3:] == ["shallow_cnn:block1", "shallow_cnn:block2", "shallow_cnn:block3"]
    assert [e["name"] for e in card["fewshot"]["extra_backbones"]] == ["shallow_cnn"]
    assert card["fewshot"]["extra_backbones"][0]["weights"]["source"] == "random"
    assert any("CAM explainers hook test_resnet only" in n for n in card["fewshot"]["notes"])
    a, _ = load_model(two_backbone_folder)
    copy = tmp_path / "copy"
    shutil.copytree(two_backbone_folder, copy)
    b, _ = load_model(copy)
    assert len(a.embedder.extras) == 1 and a.embedder.extras[0].spec.name == "shallow_cnn"
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    src = data_dir("tb_cxr")
    queries = sorted((src / "normal").iterdir())[:2] + sorted((src / "tuberculosis").iterdir())[:2]
    first = [r.probs for r in Predictor(two_backbone_folder).predict_paths(queries)]
    again = [r.probs for r in Predictor(copy).predict_paths(queries)]
    assert first == again and all(sum(p.values()) == pytest.approx(1.0, abs=1e-5) for p in first)
    # Grad-CAM hooks the primary backbone; it runs (no crash) and gives a finite map
    exp = get_explainer("gradcam").explain(a, x[:1])
    assert exp[0].heatmap.shape == (64, 64) and np.isfinite(exp[0].heatmap).all()
    # every door says so: the explain half notes what a CAM map of this model leaves out, LIME gets no such note
    from pellucid.explain.pipeline import explain_cases

    pred = Predictor(two_backbone_folder)
    cases = [c for c in pred.pipeline().from_paths(queries[:1]) if not c.error]
    notes = explain_cases(pred, cases, ["gradcam"], score=False)
    assert any(n.startswith("gradcam: this map follows the first backbone at its own input side only")
               and "shallow_cnn" in n
               for n in notes)
    assert np.isfinite(cases[0].explanations[0].heatmap).all()


def test_auto_backbones_fit_records_the_choice_and_reloads(tmp_path):
    from pellucid.core.modelfolder import load_model

    support = _support_manifest(tmp_path, per_class=3)
    torch.manual_seed(0)
    cfg = ProtoConfig(layers=("layer3", "layer4"), power=0.5, center=True, normalize=True, image_size=64,
                      auto_weights=True, auto_backbones=(("shallow_cnn",),))
    folder = fs.fit_prototypes(support, tmp_path / "m", backbone="test_resnet", pretrained=False, config=cfg,
                               cache_dir=tmp_path / "cache")
    card = json.loads((folder / "card.json").read_text())
    choice = card["metrics"]["embedding_choice"]
    assert set(choice["loo_nll"]) == {"test_resnet", "test_resnet+shallow_cnn"} and choice["criterion"] == "nll"
    assert choice["chosen"] == min(choice["loo_nll"], key=choice["loo_nll"].get)
    assert card["fewshot"]["backbones"] == choice["chosen"].split("+")[1:]
    assert card["fewshot"]["auto_backbones"] == [["shallow_cnn"]]
    assert any(f"embedding {choice['chosen']} chosen by leave-one-out NLL" in n for n in card["fewshot"]["notes"])
    model, _ = load_model(folder)
    again, _ = load_model(folder)
    x = torch.rand(2, 3, card["preprocessing"]["image_size"], card["preprocessing"]["image_size"])
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    # a support set with a single image in a class cannot rank the candidates: the first one is kept
    rows = (support / "manifest.csv").read_text().splitlines()
    (support / "manifest.csv").write_text("\n".join(rows[:1] + rows[1:3] + rows[4:5]) + "\n")
    with pytest.warns(UserWarning, match="single support image"):
        one = fs.fit_prototypes(support, tmp_path / "one", backbone="test_resnet", pretrained=False, config=cfg,
                                cache_dir=tmp_path / "cache")
    ocard = json.loads((one / "card.json").read_text())
    assert ocard["fewshot"]["backbones"] == [] and ocard["metrics"]["embedding_choice"]["chosen"] == "test_resnet"


def test_default_config_lets_lite0_support_sets_choose_lite2_too():
    from pellucid.core.backbones import get_backbone_spec

    lite0 = fs.default_config(get_backbone_spec(fs.DEFAULT_BACKBONE))
    assert lite0.auto_backbones == fs.BACKBONE_CANDIDATES and lite0.backbones == () and lite0.scales == ()
    assert fs.BACKBONE_CANDIDATES == (("efficientnet_lite2",), ("efficientnet_lite2", "@320"))
    assert fs.default_config(get_backbone_spec("resnet18")).auto_backbones == ()  # other backbones: no candidates
    both = fs.embedding_config(lite0, get_backbone_spec("efficientnet_lite0"), [get_backbone_spec("efficientnet_lite2")])
    assert both.image_size == 260 and both.layer_weights == (0.5, 0.5, 1.0) * 2
    assert both.layers == ("blocks.4", "blocks.5", "bn2", "efficientnet_lite2:blocks.4", "efficientnet_lite2:blocks.5",
                           "efficientnet_lite2:bn2")


def test_cli_fit_can_turn_the_embedding_choice_off(tmp_path, monkeypatch, capsys):
    from pellucid.core import fewshot_cli

    monkeypatch.chdir(tmp_path)  # the feature cache goes under runs/ of the working folder
    support = _support_manifest(tmp_path, per_class=2)
    assert fewshot_cli.run(_ns(support=str(support), out=str(tmp_path / "m"), auto_backbones=False)) == 0
    card = json.loads((tmp_path / "m" / "card.json").read_text())
    assert card["fewshot"]["auto_backbones"] == [] and card["fewshot"]["backbones"] == []
    assert "embedding_choice" not in card["metrics"]
    assert "model folder:" in capsys.readouterr().out


def test_no_auto_backbones_flag_keeps_lite0_alone(tmp_path):
    """``pellucid fewshot fit --no-auto-backbones``: the support set does not choose Lite2 too."""
    from pellucid.cli import main

    src = data_dir("tb_cxr")
    for label in ("normal", "tuberculosis"):
        (tmp_path / "support" / label).mkdir(parents=True)
        for f in sorted((src / label).iterdir())[:3]:
            (tmp_path / "support" / label / f.name).symlink_to(f)
    assert main(["fewshot", "fit", "--support", str(tmp_path / "support"), "--out", str(tmp_path / "m"),
                 "--no-auto-backbones"]) == 0
    card = json.loads((tmp_path / "m" / "card.json").read_text())
    assert card["fewshot"]["auto_backbones"] == [] and card["fewshot"]["backbones"] == []


def test_a_fitted_few_shot_model_checks_the_domain_on_its_support_images(proto_folder, tmp_path):
    from PIL import Image as PILImage

    from pellucid.core import ood
    from pellucid.core.predict import Predictor

    ref = ood.load_reference(proto_folder)
    card = json.loads((proto_folder / "card.json").read_text())
    assert isinstance(ref, ood.NeighbourReference) and ref.n_fit == len(card["support"]) == 8
    # the limit is the support set's largest leave-one-out nearest distance + 1/n (n = 8 images)
    s = ref.support
    d = np.linalg.norm(s[:, None] - s[None], axis=2)
    np.fill_diagonal(d, np.inf)
    assert ref.margin == pytest.approx(1 / 8) and ref.distance_threshold == pytest.approx(d.min(1).max() * 1.125,
                                                                                        rel=1e-5)
    assert np.allclose(ref.distance(s), 0.0, atol=1e-3)  # a support image is its own nearest neighbour
    rng = np.random.default_rng(0)
    for i in range(3):
        noise = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
        noise[..., 0] = 255
        PILImage.fromarray(noise).save(tmp_path / f"noise{i}.png")
    support = [Path(p["path"]) for p in card["support"]][:4]
    inputs = [*support, *sorted(tmp_path.glob("*.png"))]
    cases = list(Predictor(proto_folder).pipeline(workers=0).from_paths(inputs))
    assert all(c.ood.method == "reference" for c in cases)
    assert not any(c.ood.flagged for c in cases[:4]) and all(c.ood.flagged for c in cases[4:])
    assert "embedding far from the support images" in cases[-1].ood.reasons[-1]
