"""Ensemble model folders: round trip, soft voting of calibrated members, calibration on the shared
split, and the errors a broken folder gets."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from pellucid.core.ensemble import Ensemble, build_ensemble
from pellucid.core.model import build_classifier
from pellucid.core.modelfolder import ModelFolderError, build_card, load_model, save_model
from pellucid.core.predict import Predictor
from pellucid.core.tasks import get_task
from pellucid.datasets.readers import read_image
from pellucid.datasets.samples import load_samples

from tests.conftest import data_dir


def _shared_split(n: int = 6) -> dict:
    samples = load_samples(data_dir("snow"))
    by = {c: [s for s in samples if s.label == c] for c in ("no_snow", "snow")}
    rows = lambda ss: [{"path": s.path, "label": s.label, "group": s.group} for s in ss]  # noqa: E731
    return {"seed": 0, "hash": "0" * 16, "train": rows(by["snow"][:2]),
            "val": rows(by["no_snow"][:n] + by["snow"][2:2 + n]),
            "test": rows(by["no_snow"][n:2 * n] + by["snow"][2 + n:2 + 2 * n])}


def _member(folder, size: int, seed: int, temperature: float, task: str = "snow", split: dict | None = None):
    torch.manual_seed(seed)
    t = get_task(task)
    model, info = build_classifier("test_resnet", len(t.classes), pretrained=False)
    with torch.no_grad():
        model.head.weight.mul_(20.0)  # spread the logits so calibration has something to do
    card = build_card(task=t, model=model, weight_info=info, image_size=size,
                      threshold={"policy": "argmax", "value": None, "positive_class": t.positive_class},
                      calibration={"method": "temperature", "temperature": temperature}, metrics={},
                      split={}, training={}, recipe={})
    save_model(folder, model, card)
    if split is not None:
        (folder / "split.json").write_text(json.dumps(split))
    return folder


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    root = tmp_path_factory.mktemp("members")
    split = _shared_split()
    return [_member(root / "a", 32, 0, 2.0, split=split), _member(root / "b", 48, 1, 0.5, split=split)]


def _members_mean(folder, x: torch.Tensor, weights) -> torch.Tensor:
    card = json.loads((folder / "card.json").read_text())
    p = 0
    for entry, w in zip(card["members"], weights):
        m, mc = load_model(folder / entry["path"])
        size = mc["preprocessing"]["image_size"]
        xi = x if x.shape[-1] == size else F.interpolate(x, size=(size, size), mode="bilinear",
                                                          align_corners=False, antialias=True)
        with torch.no_grad():
            p = p + w * torch.softmax(m(xi) / mc["calibration"]["temperature"], 1)
    return p


def test_round_trip_is_a_weighted_mean_of_calibrated_members(members, tmp_path):
    out = build_ensemble(members, tmp_path / "ens", weights=[3, 1], n_boot=50)
    model, card = load_model(out)
    assert isinstance(model, Ensemble) and card["kind"] == "ensemble"
    assert [m["path"] for m in card["members"]] == ["members/a", "members/b"]
    assert model.weights == pytest.approx([0.75, 0.25]) and len(model.members) == 2
    assert model.temperatures == [2.0, 0.5] and model.image_sizes == [32, 48]
    assert card["preprocessing"]["image_size"] == 48
    x = torch.rand(4, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = torch.exp(model(x))
    torch.testing.assert_close(got, _members_mean(out, x, [0.75, 0.25]), atol=1e-5, rtol=1e-4)
    # the members were copied in (weights and card, no checkpoints) and the originals are not needed
    for m in members:
        assert (out / "members" / m.name / "model.safetensors").exists()


def test_shared_split_calibrates_and_scores_the_ensemble(members, tmp_path):
    out = build_ensemble(members, tmp_path / "ens", n_boot=50)
    card = json.loads((out / "card.json").read_text())
    assert card["calibration"]["method"] == "temperature" and card["calibration"]["temperature"] > 0
    assert card["metrics"]["n"] == 12 and (out / "metrics.json").exists() and (out / "split.json").exists()
    assert card["split"]["val"] == 12 and card["threshold"]["policy"] == "argmax"
    pred = Predictor(out)
    files = [r["path"] for r in _shared_split()["test"]][:5]
    res = pred.predict_paths(files)
    probs = np.array([[r.probs[c] for c in pred.classes] for r in res])
    assert np.allclose(probs.sum(1), 1.0, atol=1e-6) and not np.isnan(probs).any()
    x = torch.stack([pred.preprocess(read_image(f)) for f in files])
    expect = torch.softmax(torch.log(_members_mean(out, x, [0.5, 0.5])) / pred.temperature, 1).numpy()
    assert np.allclose(probs, expect, atol=1e-5)


def test_without_a_shared_split_the_ensemble_is_uncalibrated(tmp_path):
    a = _member(tmp_path / "a", 32, 0, 1.5)
    b = _member(tmp_path / "b", 32, 1, 1.0)
    with pytest.warns(UserWarning, match="do not share one validation/test partition"):
        out = build_ensemble([a, b], tmp_path / "ens")
    pred = Predictor(out)
    assert pred.temperature == 1.0
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(torch.as_tensor(pred.probabilities(x)).float(), _members_mean(out, x, [0.5, 0.5]),
                               atol=1e-5, rtol=1e-4)


def test_errors(members, tmp_path):
    tb = _member(tmp_path / "tb", 32, 0, 1.0, task="tb")
    with pytest.raises(ModelFolderError, match="is for task 'tb'"):
        build_ensemble([members[0], tb], tmp_path / "mixed")
    with pytest.raises(ValueError, match="3 weights for 2 members"):
        build_ensemble(members, tmp_path / "w", weights=[1, 1, 1])
    with pytest.raises(ValueError, match="non-negative"):
        Ensemble([torch.nn.Identity()], weights=[-1.0])
    out = build_ensemble(members, tmp_path / "ens", n_boot=0)
    card = json.loads((out / "card.json").read_text())
    card["members"][0]["path"] = "../../a"
    (out / "card.json").write_text(json.dumps(card))
    with pytest.raises(ModelFolderError, match="points outside the ensemble folder"):
        load_model(out)
    shutil.rmtree(out / "members" / "b")
    card["members"][0]["path"] = "members/a"
    (out / "card.json").write_text(json.dumps(card))
    with pytest.raises(ModelFolderError, match="not found"):
        load_model(out)


def test_a_hand_made_ensemble_card_is_one_line_and_loads_each_member_once(members, tmp_path):
    """A model folder may come from anyone: one member listed 400 times had `pellucid predict` load it 400 times
    (6.8 GB and four and a half minutes for one image), a member entry without a path was "error: path", a string
    in place of the list was read letter by letter, and an ensemble inside an ensemble multiplies its members."""
    out = build_ensemble(members, tmp_path / "ens", n_boot=0)
    card = json.loads((out / "card.json").read_text())
    first = card["members"][0]

    def refused(members_entry) -> str:
        (out / "card.json").write_text(json.dumps({**card, "members": members_entry}))
        with pytest.raises(ModelFolderError) as err:
            load_model(out)
        assert "\n" not in str(err.value) and "card.json" in str(err.value)
        return str(err.value)

    assert "more than the 32" in refused([first] * 400)
    assert "is listed twice" in refused([first, {**first, "path": "members/../members/a"}])
    assert "member 2 names no folder" in refused([first, {"weight": 1.0}])
    assert "member 1 names no folder" in refused([3])
    assert "needs a non-empty 'members' list" in refused("members/a")
    assert "weights must be numbers of 0 or more" in refused([{**first, "weight": "heavy"}])
    nested = build_ensemble(members, out / "members" / "inner", n_boot=0)
    assert "is itself an ensemble" in refused([first, {"path": str(nested.relative_to(out)), "weight": 1.0}])
    (out / "card.json").write_text(json.dumps(card))
    assert len(load_model(out)[0].members) == 2  # the folder as written still loads


def _photos(paths, size: int) -> torch.Tensor:
    """Sample photographs as a batch at ``size`` px, as a member's preprocessing gives them."""
    from pellucid.datasets.torchdata import ImageCache, to_tensor

    cache = ImageCache([str(p) for p in paths], size, progress=False)
    return torch.stack([to_tensor(cache.get(i)) for i in cache.ok(range(len(paths)))])


def test_an_ensemble_checks_the_domain_on_its_members_references(tmp_path):
    from PIL import Image as PILImage

    from pellucid.core import ood

    split = _shared_split()
    used = {r["path"] for part in ("train", "val", "test") for r in split[part]}
    fit = [s.path for s in load_samples(data_dir("snow")) if s.path not in used][:40]
    val = [r["path"] for r in split["val"]]
    folders = []
    for name, size, seed in (("a", 32, 0), ("b", 48, 1)):
        folder = _member(tmp_path / name, size, seed, 1.0, split=split)
        model, _ = load_model(folder)
        ood.save_reference(folder, ood.fit_reference(model, [_photos(fit, size)], [_photos(val, size)]))
        folders.append(folder)
    out = build_ensemble(folders, tmp_path / "ens", n_boot=0)
    assert all((out / "members" / f.name / "ood.safetensors").exists() for f in folders)  # copied in

    # one pass gives the vote and the members' embeddings side by side
    model, _ = load_model(out)
    x = _photos(val[:5], 48)
    logits, feats = ood.forward_with_features(model, x)
    with torch.no_grad():
        np.testing.assert_allclose(logits, model(x).numpy(), atol=1e-5)
    dims = [m.spec.embedding_dim for m in model.members]
    assert feats.shape == (5, sum(dims))

    # the averaged distance: each member's distance over that member's own limit, the limit 1.0
    ref = ood.load_reference(out)
    assert isinstance(ref, ood.MemberReferences) and len(ref.references) == 2 and ref.distance_threshold == 1.0
    own = [ood.load_reference(out / "members" / f.name) for f in folders]
    expect = np.mean([r.distance(f) / r.distance_threshold
                      for r, f in zip(own, np.split(feats, [dims[0]], axis=1))], axis=0)
    np.testing.assert_allclose(ref.distance(feats), expect, rtol=1e-5)

    # through the one pipeline: saturated noise is flagged, the test photographs mostly pass
    rng = np.random.default_rng(0)
    for i in range(4):
        noise = (rng.random((48, 48, 3)) * 255).astype(np.uint8)
        noise[..., 0] = 255
        PILImage.fromarray(noise).save(tmp_path / f"noise{i}.png")
    photos = [r["path"] for r in split["test"]]
    cases = list(Predictor(out).pipeline(workers=0).from_paths([*photos, *sorted(tmp_path.glob("noise*.png"))]))
    assert all(c.ood.method == "reference" for c in cases)
    assert all(c.ood.flagged for c in cases[len(photos):])
    assert sum(c.ood.flagged for c in cases[:len(photos)]) <= 3
    assert "the 2 members' Mahalanobis distances average" in cases[-1].ood.reasons[-1]

    # a member without a reference: no reference for the ensemble (the heuristics still run)
    (out / "members" / "b" / "ood.safetensors").unlink()
    assert ood.load_reference(out) is None
