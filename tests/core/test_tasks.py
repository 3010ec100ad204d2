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
    assert t.threshold_policy == "youden" and t.recipe["finetune"] == "linear-probe"
    # the recipe search's winner: a soft vote of three probes and a fine-tune weighted 3 (a hybrid); the
    # previous fine-tune is kept as a config
    members = t.recipe["members"]
    assert [m["backbone"] for m in members] == [f"efficientnet_lite{n}" for n in range(3)] + ["efficientnet_lite0"]
    assert [m["finetune"] for m in members] == ["linear-probe"] * 3 + ["full"] and members[3]["weight"] == 3.0
    import tomllib
    from pathlib import Path

    import pellucid.apps.tb as app

    old = tomllib.loads((Path(app.__file__).parent / "finetune.toml").read_text())
    assert old["finetune"] == "progressive" and old["members"] == []


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


# ----------------------------------------------------------------------------- search path, TOML, cards
import tomllib  # noqa: E402

from pellucid.core.tasks import (TASKS_ENV, find_task_file, register_task, task_of_card, task_toml,  # noqa: E402
                                 unregister_task)


@pytest.mark.parametrize("name", list_tasks(include_user=False))
def test_task_toml_round_trips_every_app(name):
    t = get_task(name)
    back = task_from_dict(tomllib.loads(task_toml(t, header="a comment\non two lines")), where=t.source)
    assert back == t
    assert (back.recipe, back.aliases, back.explainer_options) == (t.recipe, t.aliases, t.explainer_options)


def _write_spec(path, name, classes=("cat", "dog"), **extra):
    path.parent.mkdir(parents=True, exist_ok=True)
    spec = task_from_dict({"name": name, "classes": list(classes), **extra}, check_backbone=False)
    path.write_text(task_toml(spec))
    return path


def test_search_path_current_folder_then_env_then_apps(tmp_path, monkeypatch):
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    monkeypatch.chdir(here)
    monkeypatch.setenv(TASKS_ENV, str(elsewhere))
    _write_spec(elsewhere / "pets" / "task.toml", "pets")
    _write_spec(elsewhere / "birds.toml", "birds", classes=("owl", "wren"))
    (here / "pyproject.toml").write_text('[project]\nname = "x"\n')  # not a task spec: ignored
    # neither are TOML files Python's parser cannot take: nested too deeply (a RecursionError had stopped every
    # command run in their folder), or not text
    (here / "deep.toml").write_text("x = " + "[" * 100_000 + "]" * 100_000 + "\n")
    (here / "binary.toml").write_bytes(b"\xff\xfe\x00name = 1")
    assert get_task("pets").classes == ("cat", "dog") and get_task("birds").classes == ("owl", "wren")
    assert {"pets", "birds", "tb"} <= set(list_tasks()) and "x" not in list_tasks()
    assert "pets" not in list_tasks(include_user=False)
    # the current folder comes first, under any file name whose `name` is the task's
    _write_spec(here / "my-pets-spec.toml", "pets", classes=("cat", "dog", "fish"))
    assert get_task("pets").classes == ("cat", "dog", "fish")
    assert find_task_file("pets") == here / "my-pets-spec.toml"
    # a user spec may shadow an app; an app is still found without one
    _write_spec(here / "tb.toml", "tb", classes=("normal", "tuberculosis"), recipe={"epochs": 1})
    assert get_task("tb").recipe["epochs"] == 1
    (here / "tb.toml").unlink()
    assert get_task("tb").recipe["epochs"] != 1
    with pytest.raises(KeyError, match="Did you mean 'pets'"):
        get_task("pet")


def test_registered_task_comes_first_and_can_be_removed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = task_from_dict({"name": "rt-demo", "classes": ["a", "b"]})
    try:
        assert register_task(spec) is spec
        assert get_task("rt_demo") is spec and "rt-demo" in list_tasks()
    finally:
        unregister_task("rt-demo")
    with pytest.raises(KeyError):
        get_task("rt-demo")


def test_backbone_check_can_wait_but_is_made_by_default():
    data = {"name": "x", "classes": ["a", "b"], "recipe": {"backbone": "resnt50"}}
    assert task_from_dict(data, check_backbone=False).recipe["backbone"] == "resnt50"
    with pytest.raises(KeyError, match="resnet50"):
        task_from_dict(data)


def test_task_of_card_prefers_the_spec_the_card_carries():
    spec = task_from_dict({"name": "mine", "classes": ["x", "y"], "aliases": {"X": "x"}})
    card = {"task": "mine", "classes": ["x", "y"], "task_spec": spec.to_toml_dict()}
    assert task_of_card(card).to_toml_dict() == spec.to_toml_dict() and task_of_card(card).aliases == {"X": "x"}
    assert task_of_card({"task": "tb", "classes": ["normal", "tuberculosis"]}).name == "tb"
    with pytest.raises(KeyError, match="unknown task 'nowhere'"):
        task_of_card({"task": "nowhere", "classes": ["x", "y"]})


@pytest.mark.parametrize("bad", [-1.0, "2", True])
def test_recipe_ema_must_be_a_time_constant(bad):
    from pellucid.core.tasks import TaskSpecError, task_from_dict

    with pytest.raises(TaskSpecError, match="'ema'"):
        task_from_dict({"name": "t", "classes": ["a", "b"], "recipe": {"ema": bad}})
    assert task_from_dict({"name": "t", "classes": ["a", "b"], "recipe": {"ema": 2}}).recipe["ema"] == 2


@pytest.mark.parametrize("bad", [-0.5, 1.0, "0.5", True])
def test_recipe_swa_must_be_a_fraction_of_the_epochs_and_not_beside_ema(bad):
    from pellucid.core.tasks import TaskSpecError, task_from_dict

    with pytest.raises(TaskSpecError, match="'swa'"):
        task_from_dict({"name": "t", "classes": ["a", "b"], "recipe": {"swa": bad}})
    with pytest.raises(TaskSpecError, match="'ema' and 'swa'"):
        task_from_dict({"name": "t", "classes": ["a", "b"], "recipe": {"swa": 0.5, "ema": 2}})
    assert task_from_dict({"name": "t", "classes": ["a", "b"], "recipe": {"swa": 0.5}}).recipe["swa"] == 0.5


@pytest.mark.parametrize("recipe, match", [
    ({"snapshots": 1}, "'snapshots' must be"), ({"snapshots": 2.0}, "'snapshots' must be"),
    ({"snapshots": True}, "'snapshots' must be"), ({"snapshots": -2}, "'snapshots' must be"),
    ({"snapshots": 3, "epochs": 4}, "must divide 'epochs'"), ({"snapshots": 2, "epochs": 4, "swa": 0.5}, "three ways"),
])
def test_recipe_snapshots_must_divide_the_epochs_and_stand_alone(recipe, match):
    with pytest.raises(TaskSpecError, match=match):
        task_from_dict({"name": "t", "classes": ["a", "b"], "recipe": recipe})
    ok = task_from_dict({"name": "t", "classes": ["a", "b"], "recipe": {"snapshots": 3, "epochs": 15}})
    assert ok.recipe["snapshots"] == 3


@pytest.mark.parametrize("recipe, match", [
    ({"test_size": 8}, "'test_size' must be"), ({"test_size": 288.0}, "'test_size' must be"),
    ({"test_size": True}, "'test_size' must be"), ({"test_size": 288, "snapshots": 3, "epochs": 15}, "do not go together"),
])
def test_recipe_test_size_is_an_input_size_and_not_beside_snapshots(recipe, match):
    with pytest.raises(TaskSpecError, match=match):
        task_from_dict({"name": "t", "classes": ["a", "b"], "recipe": recipe})
    assert task_from_dict({"name": "t", "classes": ["a", "b"], "recipe": {"test_size": 288}}).recipe["test_size"] == 288


@pytest.mark.parametrize("recipe, match", [
    ({"tta": "spin"}, "tta must be one of none, flip, dihedral, got 'spin'"), ({"tta": ["flip"]}, "tta must be one of"),
    ({"tta": "dihedral", "snapshots": 3, "epochs": 15}, "'tta' and 'snapshots' do not go together"),
])
def test_recipe_tta_names_a_view_set_and_not_beside_snapshots(recipe, match):
    with pytest.raises(TaskSpecError, match=match):
        task_from_dict({"name": "t", "classes": ["a", "b"], "recipe": recipe})
    assert task_from_dict({"name": "t", "classes": ["a", "b"], "recipe": {"tta": "flip"}}).recipe["tta"] == "flip"
    assert task_from_dict({"name": "t", "classes": ["a", "b"]}).recipe["tta"] == "none"


@pytest.mark.parametrize("recipe, match", [
    ({"probe_layers": "blocks.3", "finetune": "linear-probe"}, "'probe_layers' must be a list"),
    ({"probe_layers": [3], "finetune": "linear-probe"}, "'probe_layers' must be a list"),
    ({"probe_layers": [""], "finetune": "linear-probe"}, "'probe_layers' must be a list"),
    ({"probe_layers": ["blocks.3"], "finetune": "full"}, "is for linear-probe recipes"),
])
def test_recipe_probe_layers_is_a_list_of_names_on_a_linear_probe(recipe, match):
    with pytest.raises(TaskSpecError, match=match):
        task_from_dict({"name": "t", "classes": ["a", "b"], "recipe": recipe})
    ok = task_from_dict({"name": "t", "classes": ["a", "b"],
                         "recipe": {"probe_layers": ["blocks.3"], "finetune": "linear-probe", "epochs": 0}})
    assert ok.recipe["probe_layers"] == ["blocks.3"]
