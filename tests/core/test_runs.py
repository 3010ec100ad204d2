"""Runs never mix, checkpoints load weights-only, filesystem errors are one line.

Training into a folder that holds another run is refused (``--overwrite`` replaces it, removing only
what pellucid wrote; ``--resume`` continues only the same run); checkpoints carry their run's
identity and are checked before Lightning resumes from them; a file as ``--out``, an unwritable
output folder, an unreadable data folder, a truncated checkpoint and a damaged model folder end in
one line; every ``torch.load`` in the package passes ``weights_only=True``.
"""
from __future__ import annotations

import ast
import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from pellucid.cli import main
from pellucid.core.training import TrainConfig, TrainingError, check_checkpoint, check_run_folder, run_identity, train

from tests.conftest import data_dir

REPO = Path(__file__).resolve().parents[2]
TINY = dict(backbone="test_resnet", pretrained=False, image_size=32, max_images=30, batch_size=8, progress=False,  # = TINY_ARGS
            finetune="full", epochs=1, members=[])
TINY_ARGS = ["--backbone", "test_resnet", "--pretrained", "random", "--image-size", "32", "--max-images", "30",
             "--batch-size", "8", "--finetune", "full", "--epochs", "1", "--no-progress"]


def _cfg(out: Path, **kw) -> TrainConfig:
    from pellucid.core.tasks import get_task

    return TrainConfig.from_task(get_task("tb"), str(data_dir("tb_cxr")), str(out), **{**TINY, **kw})


def _train_cli(out: Path, *extra: str) -> int:
    return main(["train", "tb", "--data", str(data_dir("tb_cxr")), "--out", str(out), *TINY_ARGS, *extra])


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def run_a(tmp_path_factory) -> Path:
    """A finished tiny run (tb, seed 0) to copy from: copies are cheaper than training again."""
    return train(_cfg(tmp_path_factory.mktemp("runs") / "a"))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------- runs never mix
def test_run_folder_records_the_identity_and_the_checkpoint_carries_it(run_a):
    record = json.loads((run_a / "run.json").read_text())
    ident = run_identity(_cfg(run_a))
    assert {k: record[k] for k in ("kind", "task", "data", "seed", "config_hash")} == \
        {k: ident[k] for k in ("kind", "task", "data", "seed", "config_hash")}
    assert record["data"] == str(data_dir("tb_cxr").resolve()) and "progress" not in record["config"]
    ckpt = torch.load(run_a / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["pellucid_run"]["config_hash"] == record["config_hash"]


def test_identity_ignores_cosmetic_keys_only(tmp_path):
    base = run_identity(_cfg(tmp_path / "x"))
    assert run_identity(_cfg(tmp_path / "y", progress=True, num_workers=2, epochs=5))["config_hash"] == \
        base["config_hash"]
    for change in ({"seed": 1}, {"lr": 1e-2}, {"image_size": 64}, {"max_images": 31}):
        assert run_identity(_cfg(tmp_path / "x", **change))["config_hash"] != base["config_hash"], change


def test_another_run_in_out_is_refused_in_one_line(run_a, tmp_path, capsys):
    out = _copy(run_a, tmp_path / "a")
    card = (out / "card.json").read_text()
    assert _train_cli(out, "--seed", "1") == 2
    err = _one_line(capsys)
    assert f"{out} holds a run of task tb" in err and "seed 0" in err and str(data_dir("tb_cxr").resolve()) in err
    assert "another --out" in err and "--overwrite" in err and "--resume" in err
    assert (out / "card.json").read_text() == card  # nothing touched


def test_a_folder_of_an_older_pellucid_without_run_json_is_described_not_a_traceback(run_a, tmp_path, capsys):
    """Folders written before run.json carry only config.json; reading their identity raised NameError."""
    out = _copy(run_a, tmp_path / "old")
    (out / "run.json").unlink()
    assert _train_cli(out, "--seed", "1") == 2
    err = _one_line(capsys)
    assert f"{out} holds a run of task tb" in err and "--overwrite" in err


def test_a_run_json_nested_too_deeply_to_parse_is_described_not_a_traceback(run_a, tmp_path, capsys):
    """run.json and config.json of brackets nested 100,000 deep had stopped `pellucid train --out` with Python's
    RecursionError; the folder is described like any run whose record cannot be read."""
    out = _copy(run_a, tmp_path / "deep")
    for name in ("run.json", "config.json"):
        (out / name).write_text("[" * 100_000 + "]" * 100_000)
    assert _train_cli(out, "--seed", "1") == 2
    err = _one_line(capsys)
    assert "holds files of another pellucid run (no readable run.json)" in err and "--overwrite" in err


def test_overwrite_leaves_only_the_new_runs_files(run_a, tmp_path, capsys, caplog):
    out = _copy(run_a, tmp_path / "a")
    (out / "plots" / "from_run_a.png").write_bytes(b"png")
    (out / "notes.txt").write_text("the user's own file")
    old_ood = (out / "ood.safetensors").stat().st_mtime_ns
    # B: another seed, and a linear probe (no Lightning phase: no checkpoints; its log holds only its
    # parameters and final test metrics)
    assert _train_cli(out, "--seed", "1", "--finetune", "linear-probe", "--overwrite") == 0
    assert json.loads((out / "run.json").read_text())["seed"] == 1
    assert json.loads((out / "card.json").read_text())["split"]["seed"] == 1
    assert not (out / "checkpoints").exists()  # A's gone
    assert [p.name for p in (out / "logs").iterdir()] == ["version_0"]  # A's epochs gone, B's record only
    assert "train_loss" not in (out / "logs" / "version_0" / "metrics.csv").read_text()
    assert not (out / "plots" / "from_run_a.png").exists()
    assert (out / "ood.safetensors").stat().st_mtime_ns != old_ood
    assert (out / "notes.txt").read_text() == "the user's own file"  # not pellucid's: kept
    removed = " ".join(r.getMessage() for r in caplog.records if "removed the previous run" in r.getMessage())
    assert "checkpoints/" in removed and "card.json" in removed and "ood.safetensors" in removed


def test_resume_continues_the_same_run(run_a, tmp_path):
    import csv

    out = _copy(run_a, tmp_path / "a")
    train(_cfg(out, epochs=2, patience=10, resume=True))
    card = json.loads((out / "card.json").read_text())
    assert card["training"]["epochs_run"] == 2
    rows = [int(r["epoch"]) for r in csv.DictReader((out / "logs" / "version_1" / "metrics.csv").open())
            if r.get("val_loss")]
    assert rows == [1]  # went on at epoch 1


def test_no_resume_starts_the_same_run_over(run_a, tmp_path):
    import csv

    out = _copy(run_a, tmp_path / "a")
    train(_cfg(out, resume=False))
    rows = [int(r["epoch"]) for r in csv.DictReader((out / "logs" / "version_1" / "metrics.csv").open())
            if r.get("val_loss")]
    assert rows == [0]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]


def test_resume_refuses_another_run(run_a, tmp_path):
    out = _copy(run_a, tmp_path / "a")
    with pytest.raises(TrainingError, match=r"--resume continues only the same run.*") as err:
        train(_cfg(out, seed=1, resume=True))
    assert "seed 0 -> 1" in str(err.value) and "\n" not in str(err.value)


def test_kfold_or_ensemble_into_a_single_runs_folder_is_refused(run_a, tmp_path):
    out = _copy(run_a, tmp_path / "a")
    for kind in ("kfold-3", "ensemble"):
        with pytest.raises(TrainingError, match="holds a run of task tb"):
            check_run_folder(_cfg(out), kind=kind)
    assert check_run_folder(_cfg(out)).resume_from == out / "checkpoints" / "last.ckpt"


def test_empty_or_new_folder_is_fine(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "readme.txt").write_text("not pellucid's")
    for name in ("empty", "foreign", "new/deeper"):
        folder = check_run_folder(_cfg(tmp_path / name))
        assert folder.previous is None and folder.resume_from is None and folder.clear == []


# ----------------------------------------------------------------------------- checkpoints
def test_checkpoint_of_another_run_is_refused(run_a, tmp_path):
    a = _copy(run_a, tmp_path / "a")
    b = train(_cfg(tmp_path / "b", seed=1))
    shutil.copy(b / "checkpoints" / "last.ckpt", a / "checkpoints" / "last.ckpt")
    with pytest.raises(TrainingError, match=r"belongs to a run of task tb .*seed 1.*--no-resume"):
        train(_cfg(a))


def test_checkpoint_without_identity_is_refused(run_a, tmp_path):
    a = _copy(run_a, tmp_path / "a")
    path = a / "checkpoints" / "last.ckpt"
    state = torch.load(path, map_location="cpu", weights_only=True)
    del state["pellucid_run"]
    torch.save(state, path)
    with pytest.raises(TrainingError, match="records no run identity.*--no-resume"):
        check_run_folder(_cfg(a))


class _NotAWeight:
    def __reduce__(self):
        return (print, ("unpickled code ran",))


def test_checkpoint_with_more_than_weights_is_refused(tmp_path):
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, "payload": _NotAWeight()}, path)
    with pytest.raises(TrainingError, match="cannot be loaded safely.*--no-resume"):
        check_checkpoint(path, run_identity(_cfg(tmp_path)))


def test_truncated_checkpoint_is_one_line_naming_no_resume(run_a, tmp_path, capsys):
    out = _copy(run_a, tmp_path / "a")
    last = out / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    assert _train_cli(out) == 2
    err = _one_line(capsys)
    assert str(last) in err and "--no-resume" in err and "--overwrite" in err
    assert _train_cli(out, "--no-resume") == 0  # the hint works


def test_every_torch_load_is_weights_only():
    offenders = []
    for root in ("pellucid", "bench"):
        for path in sorted((REPO / root).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                        and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                    ok = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                             for k in node.keywords)
                    if not ok:
                        offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, offenders


def test_lightning_resume_is_asked_for_weights_only(monkeypatch):
    from pellucid.core import trainer as trainer_mod

    seen = {}

    class FakeTrainer:
        def fit(self, module, train_dataloaders=None, val_dataloaders=None, datamodule=None, ckpt_path=None,
                weights_only=None):
            seen.update(ckpt_path=ckpt_path, weights_only=weights_only)

    trainer_mod.fit(FakeTrainer(), None, ckpt_path=Path("x/last.ckpt"))
    assert seen == {"ckpt_path": "x/last.ckpt", "weights_only": True}


# ----------------------------------------------------------------------------- filesystem errors
def _no_work(monkeypatch):
    import pellucid.core.training as training

    def fail(*a, **k):
        raise AssertionError("work started")

    monkeypatch.setattr(training, "load_samples", fail)


def test_out_that_is_a_file_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    _no_work(monkeypatch)
    target = tmp_path / "model.txt"
    target.write_text("x")
    t = time.time()
    assert _train_cli(target) == 2
    err = _one_line(capsys)
    assert f"--out {target} is a file" in err and time.time() - t < 10
    assert _train_cli(target / "sub") == 2  # a file on the way: nothing created
    assert "cannot be created" in _one_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.txt"]


@pytest.mark.parametrize("flags, message", [
    (["--image-size", "0"], "image_size 0 is not a whole number from 8 to 4096"),
    (["--image-size", "100000"], "image_size 100000 is not a whole number from 8 to 4096"),  # 30 GB in OpenCV
    (["--lr", "nan"], "lr nan is not a finite learning rate above 0"),  # a temperature-fit traceback at the end
    (["--lr", "-1"], "lr -1.0 is not a finite learning rate above 0"),
    (["--epochs", "-1"], "epochs -1 is not a whole number from 0"),
    (["--batch-size", "0"], "batch_size 0 is not a whole number from 1"),
])
def test_settings_no_run_can_use_are_one_line_before_any_work(tmp_path, capsys, monkeypatch, flags, message):
    _no_work(monkeypatch)
    out = tmp_path / "run"
    assert _train_cli(out, *flags) == 2
    assert message in _one_line(capsys)
    assert not out.exists()


def test_unwritable_out_and_unreadable_data_are_one_line(tmp_path, capsys, monkeypatch):
    import pellucid.core.training as training

    _no_work(monkeypatch)
    locked = tmp_path / "locked"
    locked.mkdir()
    real = training.os.access
    # as root every folder is writable: stand in for the permission bits
    monkeypatch.setattr(training.os, "access", lambda p, mode: False if Path(p) == locked else real(p, mode))
    assert _train_cli(locked / "run") == 2
    err = _one_line(capsys)
    assert f"--out {locked / 'run'} cannot be created" in err and str(locked) in err
    assert _train_cli(locked) == 2
    assert "cannot be written" in _one_line(capsys)
    data = tmp_path / "data"
    data.mkdir()
    monkeypatch.setattr(training.os, "access", lambda p, mode: False if Path(p) == data else real(p, mode))
    assert main(["train", "tb", "--data", str(data), "--out", str(tmp_path / "o"), *TINY_ARGS]) == 2
    assert f"data folder {data} cannot be read" in _one_line(capsys)
    assert not (tmp_path / "o").exists()


def test_permission_error_while_reading_data_is_one_line(tmp_path, capsys, monkeypatch):
    import pellucid.core.training as training

    def denied(path, **kw):
        raise PermissionError(13, "Permission denied", str(Path(path) / "normal"))

    monkeypatch.setattr(training, "load_samples", denied)
    assert _train_cli(tmp_path / "o") == 2
    assert "normal cannot be read (permission denied)" in _one_line(capsys)


def test_damaged_model_folder_is_one_line(tiny_model_dir, tmp_path, capsys):
    from pellucid.core.modelfolder import ModelFolderError, load_model

    folder = _copy(tiny_model_dir, tmp_path / "m")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelFolderError) as err:
        load_model(folder)
    msg = str(err.value)
    assert str(weights) in msg and "damaged" in msg and "retrain" in msg and "\n" not in msg
    assert main(["predict", "--model", str(folder), str(REPO / "README.md")]) == 2
    assert "model.safetensors cannot be loaded" in _one_line(capsys)

    shutil.copy(tiny_model_dir / "model.safetensors", weights)
    card = folder / "card.json"
    card.write_text(card.read_text()[:200])
    with pytest.raises(ModelFolderError, match="not valid JSON.*damaged: copy it again or retrain"):
        load_model(folder)
