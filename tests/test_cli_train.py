"""``pellucid train`` on a user's own data, and the command line's early answers.

A new task from a folder of class sub-folders (``--data`` with no task name, ``--like``, ``--name``)
trains, and its model folder carries the whole task, so predict and eval work where the task is not
installed; ``init-task`` writes a spec the search path finds; a typo, a missing folder or a flag that
cannot be honoured is answered in one line before torch is imported.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from pellucid.cli import build_parser, main
from pellucid.cli_train import check_train
from pellucid.core.tasks import get_task

from tests.conftest import data_dir

REPO = Path(__file__).resolve().parents[1]
_PLAIN_FORMAT = warnings.formatwarning
_TINY = ["--backbone", "test_resnet", "--pretrained", "random", "--image-size", "32", "--max-images", "24",
         "--epochs", "1", "--batch-size", "8", "--no-progress"]


def _roads(root: Path, per_class: int = 12) -> Path:
    """A data folder with the user's own class names: links to the snow sample images (none copied)."""
    src = data_dir("snow")
    for theirs, ours in (("no_snow", "clear_road"), ("snow", "snowy_road")):
        (root / ours).mkdir(parents=True)
        for f in sorted((src / theirs).iterdir())[:per_class]:
            (root / ours / f.name).symlink_to(f)
    return root


def _early(argv: list[str], cwd: Path, env: dict | None = None) -> tuple[int, str, list[str]]:
    """Run ``main(argv)`` in a fresh interpreter: (exit status, stderr, heavy modules it imported)."""
    code = ("import sys\nfrom pellucid.cli import main\nrc = main(sys.argv[1:])\n"
            "heavy = [m for m in ('torch', 'lightning', 'timm') if m in sys.modules]\n"
            "print('HEAVY=' + ','.join(heavy))\nraise SystemExit(rc)")
    run = subprocess.run([sys.executable, "-c", code, *argv], cwd=cwd, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
    heavy = run.stdout.split("HEAVY=")[-1].strip()
    return run.returncode, run.stderr.strip(), [m for m in heavy.split(",") if m]


@pytest.fixture(scope="module")
def roads(tmp_path_factory) -> Path:
    return _roads(tmp_path_factory.mktemp("user") / "My Roads")


@pytest.mark.parametrize("argv, expect", [
    (["train", "tbb", "--data", "x"], "unknown task 'tbb'. Did you mean 'tb'?"),
    (["train", "tb", "--data", "/nonexistent"], "data folder /nonexistent not found"),
    (["train"], "give a task (see `pellucid list tasks`) or --data DIR"),
    (["train", "snow", "--data", "{roads}"], "to train a new task on these classes run "
                                             "`pellucid train --data {roads} --like snow`"),
    (["train", "{roads}"], "is a folder, not a task: to train a new task on its classes run"),
    (["train", "tb", "--data", "{roads}", "--like", "snow"], "--like makes a new task from --data: drop the task"),
    (["train", "--data", "{roads}", "--like", "snoww"], "Did you mean 'snow'"),
    (["train", "--data", "{roads}", "--backbone", "a,b"], "the my-roads recipe trains one model; give one backbone"),
    (["train", "--data", "{roads}", "--like", "snow", "--backbone", "a,b"],
     "ensemble of {n_snow} members; give {n_snow} backbones separated by commas"),
    (["train", "snow", "--backbone", "resnet50,vgg19", "--data", "{snow}"],
     "ensemble of {n_snow} members; give {n_snow}"),
    (["train", "--data", "{snow}"], "task name 'snow' is taken by"),
    (["train", "--data", "{roads}", "--positive-class", "sunny"], "--positive-class 'sunny' is not one of"),
    (["train", "snow", "--config", "{classes_toml}"], "'classes' belongs to the task, not to training"),
    # a config nested too deeply for Python's parser, one that is not text, a folder: RecursionError,
    # UnicodeDecodeError and IsADirectoryError tracebacks before
    (["train", "snow", "--config", "{deep_toml}"], "is not valid TOML (RecursionError); fix it"),
    (["train", "snow", "--config", "{binary_toml}"], "is not valid TOML (UnicodeDecodeError); fix it"),
    (["train", "snow", "--config", "{roads}"], "cannot be read (Is a directory)"),
])
def test_early_errors_are_one_line_and_import_no_torch(argv, expect, roads, tmp_path):
    (tmp_path / "c.toml").write_text('classes = ["clear_road", "snowy_road"]\nepochs = 1\n')
    (tmp_path / "deep.toml").write_text("x = " + "[" * 100_000 + "]" * 100_000 + "\n")
    (tmp_path / "binary.toml").write_bytes(b"\xff\xfe\x00epochs = 1")
    fill = {"roads": str(roads), "snow": str(data_dir("snow")), "classes_toml": str(tmp_path / "c.toml"),
            "deep_toml": str(tmp_path / "deep.toml"), "binary_toml": str(tmp_path / "binary.toml"),
            "n_snow": len(get_task("snow").recipe["members"])}
    argv = [a.format(**fill) for a in argv]
    rc, err, heavy = _early(argv, cwd=tmp_path)
    assert rc == 2 and err.startswith("pellucid train: error: ") and "\n" not in err, err
    assert expect.format(**fill) in err
    assert heavy == [], f"imported {heavy} before refusing"


def test_snow_mismatch_names_the_labels_and_the_like_command(roads, capsys):
    assert main(["train", "snow", "--data", str(roads)]) == 2
    err = capsys.readouterr().err.strip()
    assert "missing class(es) ['no_snow', 'snow']" in err and "unexpected label(s) ['clear_road', 'snowy_road']" in err
    assert err.endswith(f"run `pellucid train --data {roads} --like snow`")


def test_ensemble_backbone_list_sets_one_backbone_per_member(roads):
    args = build_parser().parse_args(["train", "--data", str(roads), "--like", "snow", "--name", "roads2",
                                      "--backbone", "resnet50, vgg19, vgg16, resnet18"])
    check_train(args)
    members = args.overrides["members"]
    assert [m["backbone"] for m in members] == ["resnet50", "vgg19", "vgg16", "resnet18"]
    recipe = get_task("snow").recipe["members"]  # the rest of each member is the recipe's
    assert [m["image_size"] for m in members] == [m["image_size"] for m in recipe] == [224, 240, 260, 260]
    assert members[3]["finetune"] == "full" and members[3]["weight"] == recipe[3]["weight"] == 3.0


def test_one_backbone_every_member_already_uses_keeps_the_ensemble(tmp_path):
    cfg = tmp_path / "two.toml"
    cfg.write_text('[[members]]\nbackbone = "efficientnet_lite0"\n[[members]]\nbackbone = "efficientnet_lite0"\n'
                   'image_size = 160\n')
    args = build_parser().parse_args(["train", "snow", "--data", str(data_dir("snow")), "--config", str(cfg),
                                      "--backbone", "efficientnet_lite0"])
    check_train(args)
    assert [m["backbone"] for m in args.overrides["members"]] == ["efficientnet_lite0"] * 2


def test_one_backbone_or_folds_on_an_ensemble_recipe_trains_one_model_and_says_so(caplog):
    args = build_parser().parse_args(["train", "tb", "--data", str(data_dir("tb_cxr")), "--backbone", "resnet50"])
    check_train(args)
    assert args.overrides["members"] == [] and args.overrides["backbone"] == "resnet50"
    n = len(get_task("tb").recipe["members"])
    assert f"trains one resnet50 model instead of the tb recipe's ensemble of {n}" in caplog.text
    args = build_parser().parse_args(["train", "tb", "--data", str(data_dir("tb_cxr")), "--folds", "3"])
    check_train(args)
    first = get_task("tb").recipe["members"][0]
    assert args.overrides["members"] == [] and args.overrides["backbone"] == first["backbone"]
    assert args.overrides["image_size"] == first["image_size"]
    assert "k-fold trains one model per fold" in caplog.text


def test_new_task_trains_and_its_folder_needs_no_installed_task(roads, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "model"
    assert main(["train", "--data", str(roads), "--out", str(out), *_TINY]) == 0
    card = json.loads((out / "card.json").read_text())
    assert card["task"] == "my-roads" and card["classes"] == ["clear_road", "snowy_road"]
    spec = card["task_spec"]
    assert spec["classes"] == card["classes"] and spec["recipe"]["backbone"] == "efficientnet_lite0"
    assert spec["modality"] == "photo" and spec["threshold"]["policy"] == "argmax"
    # elsewhere, in a fresh process, the task is known to nobody: predict and eval read the folder
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    images = sorted((roads / "snowy_road").iterdir())[:2]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "pellucid", "predict", "--model", str(out), "--workers", "0",
                          "--out", "p.csv", *map(str, images)], cwd=elsewhere, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = list(csv.DictReader((elsewhere / "p.csv").open()))
    assert len(rows) == 2 and all(r["label"] in ("clear_road", "snowy_road") and not r["error"] for r in rows)
    run = subprocess.run([sys.executable, "-m", "pellucid", "eval", "--model", str(out), "--data", str(roads),
                          "--out", "ev"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads((elsewhere / "ev" / "metrics.json").read_text())["n"] == 24


def test_init_task_writes_a_spec_the_search_path_finds(roads, tmp_path, monkeypatch, capsys):
    tasks = tmp_path / "tasks"
    monkeypatch.chdir(tmp_path)
    assert main(["init-task", "lungs", "--like", "tb", "--data", str(roads), "--positive-class", "snowy_road",
                 "--out", str(tasks / "lungs.toml")]) == 0
    text = (tasks / "lungs.toml").read_text()
    assert text.startswith("# Task 'lungs': edit freely") and 'policy = "youden"' in text
    assert main(["init-task", "lungs", "--like", "tb", "--out", str(tasks / "lungs.toml")]) == 2
    assert "lungs.toml exists: edit it, or give --force" in capsys.readouterr().err
    # from another folder, through PELLUCID_TASKS; the data folder is remembered in the spec
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.chdir(other)
    monkeypatch.setenv("PELLUCID_TASKS", str(tasks))
    args = build_parser().parse_args(["train", "lungs"])
    check_train(args)
    assert args.task_spec.classes == ("clear_road", "snowy_road") and args.task_spec.positive_class == "snowy_road"
    assert args.data_dir == roads.resolve() and args.task_spec.recipe["finetune"] == get_task("tb").recipe["finetune"]
    rc, err, heavy = _early(["init-task", "x2"], cwd=other)
    assert rc == 2 and "give --data DIR" in err and heavy == []


@pytest.mark.timeout(300)
def test_linear_probe_only_run_logs_params_and_final_metrics_to_mlflow(roads, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    argv = ["train", "--data", str(roads), "--name", "roads-probe", "--out", str(tmp_path / "m"), *_TINY,
            "--finetune", "linear-probe", "--logger", "mlflow"]
    assert main(argv) == 0
    client = MlflowClient((tmp_path / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("roads-probe")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.params["finetune"] == "linear-probe" and run.data.params["logger"] == "mlflow"
    assert 0.0 <= run.data.metrics["test_accuracy"] <= 1.0 and "test_n" in run.data.metrics
    assert "model/card.json" in {a.path for a in client.list_artifacts(run.info.run_id, "model")}


def test_predict_exits_1_and_counts_failed_inputs(tiny_model_dir, tmp_path, capsys):
    good = sorted((data_dir("tb_cxr") / "normal").iterdir())[:2]
    argv = ["predict", "--model", str(tiny_model_dir), "--workers", "0", "--out", str(tmp_path / "p.csv"),
            *map(str, good), str(tmp_path / "missing.png")]
    assert main(argv) == 1
    assert "1 of 3 input(s) failed" in capsys.readouterr().err
    assert main(argv[:-1] + ["--no-resume"]) == 0


def test_tune_command_arguments():
    args = build_parser().parse_args(["tune", "tb"])
    assert (args.task, args.data, args.folds, args.budget, args.candidates, args.out, args.seed, args.write_recipe) \
        == ("tb", None, 5, 15.0, None, "bench/results", 0, False)
    args = build_parser().parse_args(["tune", "snow", "--data", "d", "--folds", "3", "--budget", "2.5",
                                      "--candidates", "a,b", "--out", "o", "--seed", "4", "--write-recipe"])
    assert (args.folds, args.budget, args.candidates, args.out, args.seed, args.write_recipe) == \
        (3, 2.5, "a,b", "o", 4, True)
    assert callable(args.func)


def test_a_segmenter_without_a_lung_preprocess_is_named_as_unused(tmp_path, caplog):
    import logging

    caplog.set_level(logging.WARNING, logger="pellucid")
    assert main(["train", "tb", "--data", str(data_dir("tb_cxr")), "--out", str(tmp_path / "m"),
                 "--segmenter", str(tmp_path / "seg"), "--backbone", "test_resnet", "--pretrained", "random",
                 "--finetune", "linear-probe", "--image-size", "32", "--max-images", "24", "--no-progress"]) == 0
    assert any("is not used" in r.getMessage() and "--preprocess lung-mask" in r.getMessage() for r in caplog.records)


def test_a_corrupt_training_file_is_one_warning_line_without_source_code(tmp_path):
    data = _roads(tmp_path / "roads", per_class=8)
    (data / "snowy_road" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    rc, err, _ = _early(["train", "--data", str(data), "--out", str(tmp_path / "m"), "--finetune", "linear-probe",
                         *_TINY], cwd=tmp_path)
    assert rc == 0, err
    lines = [ln for ln in err.splitlines() if "broken.jpg" in ln]
    # the decoder's one warning, then the model folder's list of what was skipped
    assert lines[0].startswith("WARNING UserWarning: skipped 1 unreadable file(s); the first: ") and len(lines) == 2
    assert "warnings.warn" not in err and "ImageCache(" not in err and ".py:" not in lines[0]
    assert main(["list", "tasks"]) == 0 and warnings.formatwarning is _PLAIN_FORMAT  # restored after main()


def test_one_line_warning_format():
    from pellucid.cli import _one_line_warning

    text = _one_line_warning("two\n  lines", UserWarning, "/x/y.py", 3, "code()")
    assert text == "WARNING UserWarning: two lines\n"
