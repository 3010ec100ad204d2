"""Task specs validate, and bad specs are refused with a message naming the key."""
from __future__ import annotations

import pytest

from pellucid.core.tasks import TaskSpecError, get_task, list_tasks, task_from_dict


@pytest.mark.parametrize("name", list_tasks())
def test_every_task_toml_validates(name):
    t = get_task(name)
    assert len(t.classes) >= 2
    assert t.recipe["backbone"]
    if t.positive_class:
        assert t.classes[t.positive_index] == t.positive_class


def test_tb_spec():
    t = get_task("tb")
    assert t.classes == ("normal", "tuberculosis") and t.positive_index == 1
    assert t.threshold_policy == "youden" and t.recipe["finetune"] == "progressive"


def test_unknown_task_did_you_mean():
    with pytest.raises(KeyError, match="Did you mean 'tb'"):
        get_task("tbb")


@pytest.mark.parametrize("patch, message", [
    ({"classes": ["a"]}, "at least two"),
    ({"positive_class": "c"}, "positive_class 'c'"),
    ({"channels": 2}, "channels must be 1 or 3"),
    ({"recipe": {"epoch": 3}}, "did you mean 'epochs'"),
    ({"image_size": 4}, "image_size 4"),
])
def test_bad_spec_messages(patch, message):
    data = {"name": "x", "classes": ["a", "b"], **patch}
    with pytest.raises(TaskSpecError, match=message):
        task_from_dict(data)


def test_explainer_options_reach_the_spec_and_are_checked():
    assert get_task("sonar").explainer_options == {"lime": {"segmentation": "quickshift"}}
    assert get_task("sonar").to_dict()["explainer_options"]["lime"]["segmentation"] == "quickshift"
    base = {"name": "toy", "classes": ["a", "b"], "explainers": ["gradcam"]}
    with pytest.raises(TaskSpecError, match="explainer_options.lime is given but 'lime' is not one of"):
        task_from_dict({**base, "explainer_options": {"lime": {"segmentation": "slic"}}})
    with pytest.raises(TaskSpecError, match="one table per method"):
        task_from_dict({**base, "explainer_options": {"gradcam": "fast"}})
