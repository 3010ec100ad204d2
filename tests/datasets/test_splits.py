"""Grouped stratified splits: deterministic, no group leakage, class balance, saved with a hash."""
from __future__ import annotations

import json

import pytest

from pellucid.datasets.samples import DataError, Sample, load_samples
from pellucid.datasets.splits import check_no_leakage, grouped_kfold, grouped_split, save_split

from tests.conftest import data_dir


def _toy(n_groups=40, per_group=3):
    return [Sample(f"/x/{g}_{i}.png", "a" if g % 3 else "b", f"g{g}") for g in range(n_groups) for i in range(per_group)]


def test_split_is_deterministic_and_grouped():
    s = _toy()
    a, b = grouped_split(s, seed=3), grouped_split(s, seed=3)
    assert a == b
    assert grouped_split(s, seed=4)["hash"] != a["hash"]
    groups = {p: {s[i].group for i in a[p]} for p in ("train", "val", "test")}
    assert not (groups["train"] & groups["test"]) and not (groups["train"] & groups["val"])
    assert not (groups["val"] & groups["test"])
    assert sorted(a["train"] + a["val"] + a["test"]) == list(range(len(s)))
    assert 0.1 < len(a["test"]) / len(s) < 0.3


def test_leakage_is_detected():
    s = _toy()
    with pytest.raises(DataError, match="is in both"):
        check_no_leakage(s, {"train": [0], "test": [1]})  # samples 0 and 1 share group g0


def test_kfold_covers_everything_once():
    s = _toy()
    folds = grouped_kfold(s, k=4, seed=0)
    tests = sorted(i for f in folds for i in f["test"])
    assert tests == list(range(len(s)))
    for f in folds:
        assert not ({s[i].group for i in f["train"]} & {s[i].group for i in f["test"]})


def test_real_manifest_split_has_no_group_on_two_sides(tmp_path):
    root = data_dir("nuclei")
    samples = load_samples(root)
    split = grouped_split(samples, seed=0)
    check_no_leakage(samples, split)
    save_split(tmp_path / "split.json", samples, split)
    saved = json.loads((tmp_path / "split.json").read_text())
    assert saved["hash"] == split["hash"] and len(saved["test"]) == len(split["test"])


def test_load_samples_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_samples(tmp_path / "missing")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"")
    with pytest.raises(DataError, match="class folder 'b' holds no images"):
        load_samples(tmp_path)
    (tmp_path / "b" / "y.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"missing class\(es\) \['c'\]"):
        load_samples(tmp_path, classes=["a", "b", "c"])
    with pytest.raises(DataError, match=r"unexpected label\(s\) \['b'\]"):
        load_samples(tmp_path, classes=["a", "c"])


def test_label_aliases_map_other_spellings(tmp_path):
    for d in ("normal", "tb"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "x.png").write_bytes(b"")
    samples = load_samples(tmp_path, classes=["normal", "tuberculosis"], aliases={"tb": "tuberculosis"})
    assert sorted({s.label for s in samples}) == ["normal", "tuberculosis"]


def test_too_few_images_per_class_is_one_line_not_a_library_traceback():
    samples = [Sample(f"{c}{i}.png", c, f"{c}{i}") for c in ("a", "b", "c", "d") for i in range(3)]
    with pytest.raises(DataError, match="every class has fewer than 5 images here"):
        grouped_split(samples)
    with pytest.raises(DataError, match="make 5 folds"):
        grouped_kfold(samples, 5)


def test_file_names_that_are_not_utf8_are_hashed_and_split(tmp_path):
    """A Linux name may hold any bytes: the split, its hash and the feature caches' keys take it (they had
    raised UnicodeEncodeError, stopping `pellucid train` and `pellucid fewshot fit`)."""
    import os

    from pellucid.core.features import _key
    from pellucid.core.fewshot.features import _files_fingerprint
    from pellucid.datasets.splits import split_hash

    names = [os.fsdecode(os.fsencode(tmp_path) + b"/x\xff" + str(i).encode() + b".png") for i in range(20)]
    for n in names:
        with open(n, "wb") as fh:
            fh.write(b"x")
    samples = [Sample(n, "ab"[i % 2], f"g{i}") for i, n in enumerate(names)]
    split = grouped_split(samples)
    assert split["hash"] == split_hash(samples, split)
    assert _key(samples, "efficientnet_lite0", 64, 3, False, "none", None) != \
        _key(samples[:10], "efficientnet_lite0", 64, 3, False, "none", None)
    assert len(_files_fingerprint(names)) == 16
