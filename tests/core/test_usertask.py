"""A new task from a data folder: its classes read cheaply, the rest borrowed from a task or the
general recipe, and bad folders refused in one line."""
from __future__ import annotations

import pytest

from pellucid.core.tasks import TaskSpecError, get_task
from pellucid.core.usertask import GENERAL_TASK, data_labels, label_mismatch, new_task, sanitise_name


def _folders(root, *names):
    for n in names:
        (root / n).mkdir(parents=True)
        (root / n / "a.png").write_bytes(b"")
    return root


def test_data_labels_from_folders_and_manifest(tmp_path):
    root = _folders(tmp_path / "f", "snowy_road", "clear_road", ".cache")
    assert data_labels(root) == ["clear_road", "snowy_road"]  # sorted, hidden folders left out
    (root / "manifest.csv").write_text("path,label,group\na.png, wet ,g1\nb.png,dry,g2\nc.png,dry,g3\n")
    assert data_labels(root) == ["dry", "wet"]  # the manifest wins


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", "data folder .* not found"),
    (lambda p: (p / "f.txt").write_text("x") and p / "f.txt", "is a file, not a folder"),
    (lambda p: p, "no class sub-folders and no manifest.csv"),
    (lambda p: (p / "manifest.csv").write_text("file,class\n") and p, "needs columns path,label"),
])
def test_data_labels_refuses_unusable_folders(tmp_path, make, message):
    with pytest.raises(TaskSpecError, match=message):
        data_labels(make(tmp_path))


def test_new_task_general_recipe():
    t = new_task(["clear_road", "snowy_road"], name="roads", data="/some/where")
    assert t.classes == ("clear_road", "snowy_road") and t.positive_class is None
    assert t.recipe["backbone"] == GENERAL_TASK["recipe"]["backbone"] == "efficientnet_lite0"
    assert t.modality == "photo" and t.threshold_policy == "argmax" and t.channels == 3
    assert t.default_data == "/some/where" and "clear_road, snowy_road" in t.intended_use


def test_new_task_like_borrows_everything_but_the_classes():
    tb, snow = get_task("tb"), get_task("snow")
    t = new_task(["healthy", "sick"], name="lungs", like=tb, positive_class="sick")
    assert (t.modality, t.channels, t.image_size, t.augment) == (tb.modality, tb.channels, tb.image_size, tb.augment)
    assert t.recipe == tb.recipe and t.explainers == tb.explainers and t.metrics == tb.metrics
    assert t.threshold_policy == tb.threshold_policy == "youden" and t.positive_class == "sick"
    assert t.aliases == {}  # the app's aliases name its own classes
    # no positive class: a policy that needs one falls back to argmax
    assert new_task(["healthy", "sick"], name="lungs", like=tb).threshold_policy == "argmax"
    # the liked task's positive class is kept when it is one of the new classes; members come along
    s = new_task(["no_snow", "snow"], name="s2", like=snow)
    assert s.positive_class == "snow" and len(s.recipe["members"]) == len(get_task("snow").recipe["members"])


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "bad name!"}, "a task name is letters"),
    ({"name": "ok", "positive_class": "z"}, "--positive-class 'z' is not one of"),
])
def test_new_task_refusals(kwargs, message):
    with pytest.raises(TaskSpecError, match=message):
        new_task(["a", "b"], **kwargs)


def test_label_mismatch_uses_aliases():
    tb = get_task("tb")
    assert label_mismatch(tb, ["normal", "tuberculosis"]) == ([], [])
    if tb.aliases:
        alias = next(iter(tb.aliases))
        assert label_mismatch(tb, sorted({"normal", "tuberculosis", alias})) == ([], [])
    assert label_mismatch(tb, ["cat", "normal"]) == (["tuberculosis"], ["cat"])


@pytest.mark.parametrize("text, name", [("My Roads (2024)", "my-roads-2024"), ("  ", "my-task"),
                                        ("snow_data", "snow_data"), ("Ünïcode", "n-code")])
def test_sanitise_name(text, name):
    assert sanitise_name(text) == name
