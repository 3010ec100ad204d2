"""Split policies and the k-fold driver: no group ever on two sides, recordings cut in time, split files
reused exactly, and a k-fold run that reports mean ± sd over its folds."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from pellucid.core.kfold import kfold_splits, make_split, split_from_file, temporal_split, train_kfold
from pellucid.core.tasks import get_task
from pellucid.core.training import TrainConfig
from pellucid.datasets.samples import DataError, Sample, load_samples
from pellucid.datasets.splits import save_split

from tests.conftest import data_dir


def _groups(samples, idx):
    return {samples[i].group for i in idx}


def _synthetic(n_groups=30, per_group=3, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.choice(["a", "b", "c"], size=n_groups, p=[0.5, 0.3, 0.2])
    return [Sample(f"/x/g{g}_{k}.png", str(labels[g]), f"g{g}") for g in range(n_groups) for k in range(per_group)]


@pytest.mark.parametrize("k", [3, 5])
def test_kfold_splits_never_put_a_group_on_two_sides(k):
    samples = _synthetic()
    folds = kfold_splits(samples, k, val_fraction=0.15, seed=0)
    assert len(folds) == k
    tested = np.concatenate([f["test"] for f in folds])
    assert sorted(tested) == list(range(len(samples)))  # every sample tested exactly once
    for f in folds:
        tr, va, te = (_groups(samples, f[p]) for p in ("train", "val", "test"))
        assert not (tr & va) and not (tr & te) and not (va & te)
        assert len(f["train"]) + len(f["val"]) + len(f["test"]) == len(samples)
        assert len(f["val"]) > 0 and len(f["hash"]) == 16


def test_kfold_on_real_nuclei_groups():
    samples = load_samples(data_dir("nuclei"))
    folds = kfold_splits(samples, 5, seed=0)
    for f in folds:
        assert not (_groups(samples, f["train"]) & _groups(samples, f["test"]))
    sizes = [len(_groups(samples, f["test"])) for f in folds]
    assert sum(sizes) == len({s.group for s in samples})


def test_kfold_refuses_too_few_groups():
    samples = _synthetic(n_groups=4)
    with pytest.raises(DataError, match="4 groups cannot make 5 folds"):
        kfold_splits(samples, 5)


def test_temporal_split_cuts_recordings_in_time():
    samples = load_samples(data_dir("sonar"))
    out, split = temporal_split(samples, val_fraction=0.15, test_fraction=0.2, seed=0)
    info = split["temporal"]
    assert set(info) == {"fish_seq_a", "mine_seq_a"}
    for label in ("fish", "mine"):
        frames = {p: sorted(int(out[i].path.rsplit("_", 1)[1].split(".")[0]) for i in split[p]
                            if out[i].label == label) for p in ("train", "val", "test")}
        assert frames["train"] and frames["val"] and frames["test"]
        assert max(frames["train"]) < min(frames["val"]) and max(frames["val"]) < min(frames["test"])
    for p, q in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not (_groups(out, split[p]) & _groups(out, split[q]))
    left_out = len(out) - sum(len(split[p]) for p in ("train", "val", "test"))
    assert left_out == sum(v["left_out"] for v in info.values()) > 0


def test_split_file_round_trip_and_errors(tmp_path):
    samples = _synthetic()
    cfg = TrainConfig(task="mpox", data="/x", out=str(tmp_path))
    used, split = make_split(samples, cfg)
    save_split(tmp_path / "split.json", used, split)
    again, split2 = split_from_file(samples, tmp_path)  # a folder holding split.json works too
    for p in ("train", "val", "test"):
        assert sorted(again[i].path for i in split2[p]) == sorted(used[i].path for i in split[p])
    with pytest.raises(DataError, match="names 3 file"):
        split_from_file(samples[3:], tmp_path / "split.json")
    with pytest.raises(DataError, match="not found"):
        split_from_file(samples, tmp_path / "nope.json")
    with pytest.raises(KeyError, match="Did you mean 'temporal'"):
        make_split(samples, replace(cfg, split="temporl"))


def test_train_kfold_writes_folds_and_mean_sd(tmp_path):
    src = data_dir("mpox")
    cfg = TrainConfig.from_task(get_task("mpox"), str(src), str(tmp_path / "k"), backbone="test_resnet",
                                pretrained=False, finetune="linear-probe", members=[], image_size=32, max_images=40,
                                progress=False, n_boot=50)
    out = train_kfold(cfg, 3)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["k"] == 3 and len(summary["folds"]) == 3
    accs = [f["metrics"]["accuracy"] for f in summary["folds"]]
    assert summary["summary"]["accuracy"]["mean"] == pytest.approx(np.mean(accs))
    assert summary["summary"]["accuracy"]["sd"] == pytest.approx(np.std(accs, ddof=1))
    tests = []
    for i in range(3):
        fold = json.loads((out / "folds" / f"fold_{i}.json").read_text())
        used = json.loads((out / f"fold_{i}" / "split.json").read_text())
        assert [r["path"] for r in used["test"]] == [r["path"] for r in fold["test"]]  # trained on its fold
        groups = {p: {r["group"] for r in fold[p]} for p in ("train", "val", "test")}
        assert not (groups["train"] & groups["test"]) and not (groups["val"] & groups["test"])
        tests += [r["path"] for r in fold["test"]]
    assert len(tests) == len(set(tests)) == 40
