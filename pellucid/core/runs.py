"""Run folders: a run's identity, and the checks that keep two runs from mixing in one folder.

Training writes ``run.json`` (task, resolved data folder, seed, the hash of the resolved training
configuration without :data:`NOT_IDENTITY`) when a run starts and stamps every checkpoint with it.
:func:`check_run_folder` compares a new run with what a folder holds before any work: the same run
continues (its checkpoint loaded ``weights_only`` and checked to carry this identity), another run is
refused in one line unless overwritten. :func:`check_out_path` / :func:`check_data_path` give one-line
errors for output and data paths that cannot be used. Training, k-fold, ensembles and the lung
segmenter all check their folders here (so none of them imports another to do it).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from pellucid.core.training import TrainConfig

__all__ = ["TrainingError", "RunFolder", "check_run_folder", "run_identity", "check_checkpoint", "check_out_path",
           "check_data_path", "claim_out_folder", "refuse_model_folder", "RUN_FILE", "RUN_FILES", "RUN_DIRS", "NOT_IDENTITY"]

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. no readable images in a split)."""


# ----------------------------------------------------------------------------- run folders
#: The run record pellucid writes into a model folder when a run starts.
RUN_FILE = "run.json"

#: TrainConfig keys outside a run's identity: where it is written and how it reports, how it may be
#: continued, how long it goes on (an interrupted run may be continued with more epochs or
#: patience; the schedule is recomputed from the new length), and the input size the finished model
#: predicts at (``test_size`` changes no training step).
NOT_IDENTITY = ("out", "resume", "overwrite", "progress", "logger", "num_workers", "epochs", "patience", "test_size",
                "tta")

#: TrainConfig options newer than most runs, left out of the identity while they are off (0 or empty).
_OFF_BY_DEFAULT = ("ema", "swa", "snapshots", "probe_layers")

#: Files pellucid writes into a model folder (training, k-fold, ensembles, T-TAME, export).
RUN_FILES = (RUN_FILE, "config.json", "split.json", "card.json", "model.safetensors", "metrics.json", "history.json",
             "ood.safetensors", "ttame.safetensors", "ttame.safetensors.tmp", "summary.json")
#: Folders pellucid writes into a model folder (plus ``fold_<i>/`` of k-fold).
RUN_DIRS = ("checkpoints", "logs", "plots", "export", "folds", "members")
_FOLD_DIR = re.compile(r"fold_\d+")
_CHECKPOINT_KEY = "pellucid_run"
_SHORT = ("kind", "task", "data", "seed", "config_hash")


def _resolved(path: str | None) -> str | None:
    return None if path in (None, "") else str(Path(path).expanduser().resolve())


def run_identity(cfg: TrainConfig, kind: str = "classifier") -> dict:
    """The identity of the run ``cfg`` describes: ``{"kind", "task", "data", "seed", "config_hash",
    "config"}``, where ``config`` is the resolved configuration without :data:`NOT_IDENTITY` (paths
    resolved) and ``config_hash`` the first 16 hex digits of its SHA-256 (with ``kind``)."""
    config = {k: v for k, v in asdict(cfg).items() if k not in NOT_IDENTITY}
    for key in _OFF_BY_DEFAULT:  # an option left off keeps the identity runs had before it existed
        if key in config and not config[key]:
            config.pop(key)
    config["data"] = _resolved(cfg.data)
    config["split_file"] = _resolved(cfg.split_file)
    blob = json.dumps({"kind": kind, **config}, sort_keys=True, default=str)
    return {"kind": kind, "task": cfg.task, "data": config["data"], "seed": cfg.seed,
            "config_hash": hashlib.sha256(blob.encode()).hexdigest()[:16],
            "config": json.loads(json.dumps(config, default=str))}


def _held(out: Path) -> list[str]:
    """What pellucid wrote in ``out`` (names, folders with a trailing ``/``), sorted."""
    if not out.is_dir():
        return []
    names = []
    for entry in out.iterdir():
        if entry.is_dir() and not entry.is_symlink() and (entry.name in RUN_DIRS or _FOLD_DIR.fullmatch(entry.name)):
            names.append(entry.name + "/")
        elif entry.name in RUN_FILES and (entry.is_file() or entry.is_symlink()):
            names.append(entry.name)
    return sorted(names)


def _stored_identity(out: Path, config_type: type | None = None) -> dict | None:
    """The identity of the run ``out`` holds: its ``run.json``, else (a folder of an older pellucid)
    the identity of its ``config.json`` read as ``config_type`` (the run's ``TrainConfig`` class, which
    this module cannot import: training imports it); None when neither says."""
    try:
        stored = json.loads((out / RUN_FILE).read_text())
        if isinstance(stored, dict) and stored.get("config_hash"):
            return stored
    except (OSError, ValueError, RecursionError):  # unreadable, not JSON, or nested too deeply to parse
        pass
    if config_type is None:
        return None
    try:
        raw = json.loads((out / "config.json").read_text())
        known = set(config_type.__dataclass_fields__)
        return run_identity(config_type(**{k: v for k, v in raw.items() if k in known}),
                            "ensemble" if raw.get("members") else "classifier")
    except (OSError, ValueError, TypeError, AttributeError, RecursionError):
        return None


def _describe(ident: dict | None) -> str:
    if not ident:
        return "files of another pellucid run (no readable run.json)"
    kind = "" if ident.get("kind", "classifier") == "classifier" else f"{ident['kind']} "
    return f"a {kind}run of task {ident.get('task')} (data {ident.get('data')}, seed {ident.get('seed')})"


def _differences(old: dict | None, new: dict, at_most: int = 4) -> str:
    if not old or not isinstance(old.get("config"), dict):
        return ""
    a, b = old["config"], new["config"]
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if old.get("kind", "classifier") != new["kind"]:
        keys.insert(0, "kind")
        a, b = {**a, "kind": old.get("kind", "classifier")}, {**b, "kind": new["kind"]}
    shown = ", ".join(f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:at_most])
    return f" ({shown}{', ...' if len(keys) > at_most else ''})" if keys else ""


def check_checkpoint(path: Path, identity: dict) -> None:
    """Refuse (one-line :class:`TrainingError`) a checkpoint that does not load with
    ``torch.load(weights_only=True)`` or does not record the run ``identity``."""
    hint = "start the run over with --no-resume, or replace the folder's run with --overwrite"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, foreign pickle, unreadable file: all one answer
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise TrainingError(f"checkpoint {path} cannot be loaded safely ({reason}): it is truncated, damaged or "
                            f"holds more than weights; {hint}") from None
    stored = state.get(_CHECKPOINT_KEY) if isinstance(state, dict) else None
    if not isinstance(stored, dict):
        raise TrainingError(f"checkpoint {path} records no run identity (an older pellucid or another program "
                            f"wrote it), so it cannot be checked to belong to this run; {hint}")
    if stored.get("config_hash") != identity["config_hash"] or stored.get("kind", "classifier") != identity["kind"]:
        raise TrainingError(f"checkpoint {path} belongs to {_describe(stored)}, config {stored.get('config_hash')}, "
                            f"not to this run (config {identity['config_hash']}); {hint}")


def check_data_path(data: str | Path) -> None:
    """One-line :class:`TrainingError` when the data folder exists but cannot be read or searched."""
    path = Path(data)
    try:
        if path.is_dir() and not os.access(path, os.R_OK | os.X_OK):
            raise TrainingError(f"data folder {path} cannot be read (no read/search permission): fix its "
                                f"permissions or give another --data")
    except OSError as err:
        raise TrainingError(f"data folder {path} cannot be read ({err.strerror or err}): fix its permissions "
                            f"or give another --data") from None


def check_out_path(out: str | Path) -> None:
    """One-line :class:`TrainingError` when ``out`` is a file, or cannot be created or written."""
    out = Path(out)
    try:
        if out.exists() and not out.is_dir():
            raise TrainingError(f"--out {out} is a file, not a folder: give a folder path (created if missing)")
        probe = out
        while not probe.exists() and probe.parent != probe:
            probe = probe.parent
        if not probe.is_dir():
            raise TrainingError(f"--out {out} cannot be created: {probe} is a file; give another --out")
        if not os.access(probe, os.W_OK | os.X_OK):
            verb = "written" if probe == out else "created"
            raise TrainingError(f"--out {out} cannot be {verb}: no write/search permission on {probe}; "
                                f"give another --out")
    except OSError as err:
        raise TrainingError(f"--out {out} cannot be used ({err.strerror or err}); give another --out") from None


def refuse_model_folder(out: str | Path, what: str) -> None:
    """One-line :class:`TrainingError` when ``out``, where ``what`` (evaluation results, explanations, a
    report) is about to be written, is a model folder: its ``metrics.json``, plots or even ``card.json``
    (an input named ``card.png`` explains to ``card.json``) would be replaced."""
    out = Path(out)
    if (out / "card.json").is_file() or (out / "model.safetensors").is_file():
        raise TrainingError(f"--out {out} is a model folder: writing {what} there would replace its files; "
                            "give another --out")


def claim_out_folder(out: str | Path, overwrite: bool = False, *, what: str = "a model", clear: bool = True) -> Path:
    """The output folder of a command that writes a whole model folder at once (``fewshot fit``): a file,
    an unwritable path or a folder holding another run or model is one-line :class:`TrainingError` unless
    ``overwrite``, which removes what pellucid wrote there (nothing else in the folder is touched).
    ``clear=False`` only checks: call it before any work, and again with ``clear`` once the new model is
    ready to be written, so a failed run leaves the old one in place."""
    out = Path(out)
    check_out_path(out)
    try:
        held = _held(out)
    except OSError as err:
        raise TrainingError(f"--out {out} cannot be read ({err.strerror or err}); give another --out") from None
    if held and not overwrite:
        raise TrainingError(f"{out} holds {_describe(_stored_identity(out)) if (out / RUN_FILE).is_file() else 'a model'} "
                            f"({', '.join(held[:4])}{', …' if len(held) > 4 else ''}); give another --out, or "
                            f"--overwrite to replace it with {what}")
    if held and clear:
        RunFolder(out, {}, clear=held).start()
        (out / RUN_FILE).unlink(missing_ok=True)  # a model written at once records no run identity
    return out


@dataclass
class RunFolder:
    """The output folder of a checked run (see :func:`check_run_folder`).

    Attributes:
        path: the folder.
        identity: this run's :func:`run_identity`.
        previous: the identity of the run the folder held (None: none, or unrecorded).
        resume_from: the checked ``last.ckpt`` to continue from, or None.
        clear: what :meth:`start` removes first (names as :func:`_held` gives them).
    """

    path: Path
    identity: dict
    previous: dict | None = None
    resume_from: Path | None = None
    clear: list[str] = field(default_factory=list)

    def start(self) -> list[str]:
        """Create the folder, remove ``clear`` and write ``run.json``; returns what was removed."""
        removed = []
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            for name in self.clear:
                target = self.path / name.rstrip("/")
                if name.endswith("/"):
                    shutil.rmtree(target)
                else:
                    target.unlink(missing_ok=True)
                removed.append(name)
            import pellucid

            record = {**self.identity, "pellucid_version": pellucid.__version__,
                      "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            (self.path / RUN_FILE).write_text(json.dumps(record, indent=1, default=str))
        except OSError as err:
            raise TrainingError(f"--out {self.path} cannot be written ({err.strerror or err}: "
                                f"{err.filename or self.path}); give another --out") from None
        if removed:
            log.warning("%s: removed the previous run's %s", self.path, ", ".join(removed))
        return removed


def check_run_folder(cfg: TrainConfig, kind: str = "classifier") -> RunFolder:
    """Check ``cfg.out`` and ``cfg.data`` before any work and decide what the run does with the folder.

    Raises:
        TrainingError: (one line) ``out`` is a file or cannot be created or written; the data folder
        cannot be read; ``out`` holds another run (without ``overwrite``); ``resume=True`` and
        ``out`` holds another run; the checkpoint to continue from is damaged or not this run's.
    """
    out = Path(cfg.out)
    check_data_path(cfg.data)
    check_out_path(out)
    identity = run_identity(cfg, kind)
    try:
        held = _held(out)
    except OSError as err:
        raise TrainingError(f"--out {out} cannot be read ({err.strerror or err}); give another --out") from None
    if cfg.overwrite and cfg.resume is True:
        raise TrainingError("--overwrite and --resume contradict each other: give one")
    if not held:
        if cfg.resume is True:
            log.info("%s holds no run yet: nothing to resume, starting", out)
        return RunFolder(out, identity)
    previous = _stored_identity(out, type(cfg))
    if cfg.overwrite:
        return RunFolder(out, identity, previous, clear=held)
    same = previous is not None and previous.get("config_hash") == identity["config_hash"] \
        and previous.get("kind", "classifier") == kind
    if not same:
        if cfg.resume is True:
            raise TrainingError(f"{out} holds {_describe(previous)} with other settings{_differences(previous, identity)}: "
                                f"--resume continues only the same run; give another --out, or --overwrite to replace it")
        raise TrainingError(f"{out} holds {_describe(previous)}; give another --out, or --overwrite to replace it, "
                            f"or --resume to continue it")
    if cfg.resume is False:
        return RunFolder(out, identity, previous, clear=[n for n in held if n == "checkpoints/"])
    last = out / "checkpoints" / "last.ckpt"
    if kind == "classifier" and last.is_file():
        check_checkpoint(last, identity)
        return RunFolder(out, identity, previous, resume_from=last)
    return RunFolder(out, identity, previous)


