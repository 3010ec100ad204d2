"""``pellucid train`` and ``pellucid init-task``: the options, the checks made before any heavy import,
and the commands.

:func:`check_train` runs first (from :func:`pellucid.cli.main`, before torch is imported): it finds
the task along the task search path (:func:`pellucid.core.tasks.get_task`), or builds a new task
from the classes of ``--data`` (:mod:`pellucid.core.usertask`, ``--like``, ``--name``), checks the
data folder and its labels, the config file, ``--logger`` and ``--backbone`` against an ensemble
recipe's members, so a typo or a missing folder is answered in a fraction of a second.
:func:`cmd_train` then registers a new task for this process and trains. ``init-task`` writes an
editable task.toml that ``pellucid train NAME`` finds.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import logging
import tomllib
from pathlib import Path

from pellucid.cli_common import UserError, default_data_root, print_summary, resolve_data

__all__ = ["add_train_commands", "check_train", "cmd_train", "cmd_init_task", "LOGGERS", "SEGMENTATION_TASKS"]

log = logging.getLogger("pellucid")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="data folder (manifest.csv or class sub-folders)")
    p.add_argument("--out", help="model folder to write (default runs/<task>-<time>)")
    p.add_argument("--backbone", help="registered backbone (see `pellucid list backbones`)")
    p.add_argument("--pretrained", help="weights: auto (default), random, timm, lite-wheel")
    p.add_argument("--checkpoint", help="start from this weights file or model folder")
    p.add_argument("--finetune", choices=["linear-probe", "full", "progressive"])
    p.add_argument("--epochs", type=int)
    p.add_argument("--image-size", type=int, dest="image_size")
    p.add_argument("--batch-size", type=int, dest="batch_size")
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--max-images", type=int, dest="max_images", help="use a random subset (smoke runs)")
    p.add_argument("--config", help="TOML file of training options (flags override it)")
    p.add_argument("--accelerator", help="Lightning accelerator: auto, cpu, gpu")
    p.add_argument("--devices", help="Lightning devices (e.g. 1, 2, auto)")
    p.add_argument("--num-nodes", type=int, dest="num_nodes")
    p.add_argument("--strategy", help="Lightning strategy (auto, ddp, ...)")
    p.add_argument("--no-resume", action="store_true", help="ignore checkpoints of an interrupted run in --out")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--folds", type=int, help="grouped stratified k-fold: one model per fold + summary.json (mean ± sd)")
    p.add_argument("--final", action="store_true",
                   help="the model to ship: train on every image but the validation part (no test part is held "
                        "out, so the card has no test score; estimate the recipe first, without --final)")
    p.add_argument("--preprocess", choices=["none", "lung-mask", "lung-crop"],
                   help="classify segmented lungs (needs --segmenter)")
    p.add_argument("--segmenter", help="segmentation model folder (pellucid train tb-lungseg)")
    p.add_argument("--logger", choices=list(LOGGERS),
                   help="experiment tracking: csv (default: <out>/logs/version_N/metrics.csv), tensorboard "
                        "(<out>/logs), mlflow (MLFLOW_TRACKING_URI, default ./mlruns)")


def _train_overrides(args: argparse.Namespace) -> dict:
    over: dict = {}
    if args.config:
        try:
            over.update(tomllib.loads(Path(args.config).read_text()))
        except FileNotFoundError:
            raise UserError(f"config file {args.config} not found") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as err:  # nested too deep: RecursionError
            reason = str(err) if isinstance(err, tomllib.TOMLDecodeError) else type(err).__name__
            raise UserError(f"config file {args.config} is not valid TOML ({reason}); fix it and run the command "
                            "again") from None
        except OSError as err:
            reason = err.strerror or type(err).__name__
            raise UserError(f"config file {args.config} cannot be read ({reason})") from None
    for key in ("backbone", "checkpoint", "finetune", "epochs", "image_size", "batch_size", "lr", "seed",
                "max_images", "accelerator", "num_nodes", "strategy", "preprocess", "segmenter", "logger"):
        v = getattr(args, key, None)
        if v is not None:
            over[key] = v
    if args.devices is not None:
        over["devices"] = int(args.devices) if str(args.devices).isdigit() else args.devices
    if args.pretrained is not None:
        over["pretrained"] = {"auto": True, "true": True, "random": False, "false": False}.get(
            args.pretrained.lower(), args.pretrained)
    if getattr(args, "final", False):
        over["test_fraction"] = 0.0
    if args.no_resume:
        over["resume"] = False
    if args.no_progress:
        over["progress"] = False
    return over


SEGMENTATION_TASKS = ("tb-lungseg",)
LOGGERS = ("csv", "tensorboard", "mlflow")  # pellucid.core.trainer.LOGGERS (kept here: no torch import)


def cmd_train_segmenter(args: argparse.Namespace) -> int:
    data = Path(args.data) if args.data else default_data_root() / "tb_lungs"
    if not (data / "manifest.csv").exists():
        raise UserError(f"no segmentation data at {data}: pass --data DIR with a manifest.csv of path,mask,label,group")
    new = [f for f, v in (("--like", args.like), ("--name", args.name), ("--positive-class", args.positive_class),
                          ("--logger", args.logger), ("--final", getattr(args, "final", False) or None)) if v is not None]
    if new:
        raise UserError(f"{new[0]} does not apply to the lung segmenter ({args.task}): drop it")
    from pellucid.core.segmentation import SegConfig, train_segmenter

    over = _train_overrides(args)
    out = args.out or over.pop("out", None) or f"runs/tb-lungseg-{_dt.datetime.now():%Y%m%d-%H%M%S}"
    classifier_only = {"backbone", "pretrained", "checkpoint", "finetune", "accelerator", "devices", "num_nodes",
                       "strategy", "resume", "preprocess", "segmenter"}
    ignored = sorted(set(over) & classifier_only)
    if ignored:
        log.warning("options %s do not apply to the segmenter and are ignored", ", ".join(ignored))
    known = set(SegConfig.__dataclass_fields__)
    bad = sorted(set(over) - known - classifier_only)
    if bad:
        from pellucid.registry import close_matches

        close = close_matches(bad[0], sorted(known), n=1)
        raise UserError(f"unknown segmentation option {bad[0]!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
    folder = train_segmenter(data, out, **{k: v for k, v in over.items() if k in known})
    from pellucid.core.card import read_card

    card = read_card(folder)
    m = card.metrics
    print(f"model folder: {folder}")
    print(f"test Dice {m['dice']['value']:.4f} [{m['dice']['low']:.4f}, {m['dice']['high']:.4f}]; "
          f"HD95 {m['hd95']['value']:.2f} px [{m['hd95']['low']:.2f}, {m['hd95']['high']:.2f}] (n={m['dice']['n']})")
    print(f"time: {card.training.seconds} s")
    return 0


# keys of a task.toml that are not training options: in a --config they would be refused as unknown
_TASK_KEYS = {"name", "title", "classes", "positive_class", "modality", "channels", "augment", "metrics", "threshold",
              "explainers", "explainer_options", "intended_use", "default_data", "aliases"}


def check_train(args: argparse.Namespace) -> None:
    """What ``pellucid train`` can check before importing torch: the task (or the new task built from
    ``--data``), the data folder and its labels, the config file, and ``--backbone`` against an
    ensemble recipe's members. Sets ``args.task_spec``, ``args.data_dir`` and ``args.overrides``."""
    from pellucid.core.tasks import get_task
    from pellucid.core.usertask import data_labels, label_mismatch

    if args.task and args.task.replace("_", "-") in SEGMENTATION_TASKS:
        return
    new = [f for f, v in (("--like", args.like), ("--name", args.name), ("--positive-class", args.positive_class))
           if v is not None]
    if args.task and new:
        raise UserError(f"{new[0]} makes a new task from --data: drop the task name {args.task!r} "
                        f"(pellucid train --data DIR {new[0]} ...), or drop {new[0]}")
    if getattr(args, "final", False) and args.folds:
        raise UserError("--final trains the one model to ship on every image but the validation part; --folds "
                        "estimates a recipe on k held-out folds: run them one after the other, not together")
    over = _train_overrides(args)
    spec_keys = sorted(set(over) & _TASK_KEYS)
    if spec_keys:
        raise UserError(f"--config {args.config}: {spec_keys[0]!r} belongs to the task, not to training: classes come "
                        "from --data (pellucid train --data DIR), other task keys from a task file "
                        "(pellucid init-task NAME --data DIR writes one to edit)")
    if args.task:
        try:
            task = get_task(args.task, check_backbone=False)
        except KeyError:
            if Path(args.task).is_dir():
                raise UserError(f"{args.task!r} is a folder, not a task: to train a new task on its classes run "
                                f"`pellucid train --data {args.task}` (add --like TASK to borrow a task's recipe)") from None
            raise
        data = resolve_data(task, args.data)
        missing, unexpected = label_mismatch(task, data_labels(data))
        if missing or unexpected:
            parts = ([f"missing class(es) {missing}"] if missing else []) + (
                [f"unexpected label(s) {unexpected}"] if unexpected else [])
            raise UserError(f"{data}: labels do not match the task {task.name!r} ({'; '.join(parts)}; it expects "
                            f"{list(task.classes)}); to train a new task on these classes run "
                            f"`pellucid train --data {data} --like {task.name}`")
    else:
        if not args.data:
            raise UserError("give a task (see `pellucid list tasks`) or --data DIR to train a new task on the "
                            "classes of DIR's sub-folders (or its manifest.csv)")
        data = Path(args.data)
        task = _new_task(args, data, data_labels(data))
    _check_member_backbones(task, over, args.backbone)
    _check_logger(over.get("logger"))
    members = over.get("members", task.recipe.get("members")) or []
    if args.folds and members:  # k-fold trains one model per fold: the ensemble's first member, said so
        first = members[0]
        log.warning("k-fold trains one model per fold: the first member of the %s recipe's ensemble (%s%s)",
                    task.name, first.get("backbone", task.recipe.get("backbone")),
                    f", {first['image_size']} px" if first.get("image_size") else "")
        over.update({k: v for k, v in first.items() if k in ("backbone", "image_size", "finetune", "epochs")})
        over["members"] = []
    args.task_spec, args.data_dir, args.overrides = task, data, over


def _new_task(args: argparse.Namespace, data: Path, labels: list[str]):
    """The task ``pellucid train --data DIR [--like TASK] [--name NAME]`` trains (see
    :func:`pellucid.core.usertask.new_task`); refused when a task file (an app, a user spec on the
    search path) already has its name."""
    from pellucid.core.tasks import find_task_file, get_task, load_task_file
    from pellucid.core.usertask import new_task, sanitise_name

    like = get_task(args.like, check_backbone=False) if args.like else None
    name = args.name or sanitise_name(data.resolve().name)
    if len(labels) < 2:
        raise UserError(f"--data {data}: found one class {labels}; a classifier needs at least two "
                        "(one sub-folder per class)")
    task = new_task(labels, name=name, like=like, positive_class=args.positive_class, data=data)
    path = find_task_file(name)  # a task file of that name (one registered by an earlier run here is no conflict)
    if path is not None:
        taken = load_task_file(path, check_backbone=False)
        same = list(taken.classes) == list(task.classes)
        hint = (f"to train that task run `pellucid train {taken.name} --data {data}`; " if same else "") + \
            "to make a new task give it another name with --name NAME"
        raise UserError(f"task name {name!r} is taken by {path} (classes "
                        f"{list(taken.classes)}); {hint}")
    return task


def _check_logger(kind: str | None) -> None:
    """``--logger`` (or ``logger`` in --config): a known name whose package is installed."""
    import importlib.util

    if kind is None or kind == "csv":
        return
    if kind not in LOGGERS:
        from pellucid.registry import unknown_name_error

        raise UserError(f"--logger: {unknown_name_error('logger', kind, LOGGERS).args[0]}")
    package = "tensorboard" if kind == "tensorboard" else "mlflow"
    if importlib.util.find_spec(package) is None and not (kind == "tensorboard" and importlib.util.find_spec("tensorboardX")):
        raise UserError(f"--logger {kind} needs the {package} package: pip install {package} "
                        f"(or pip install 'pellucid[tracking]'), or use --logger csv")


def _check_member_backbones(task, over: dict, flag: str | None) -> None:
    """``--backbone a,b`` names one backbone per member of an ensemble recipe (in order); a count that
    does not fit the recipe is refused. Sets ``over["members"]`` (and ``over["backbone"]``)."""
    if not flag:
        return
    names = [n.strip() for n in flag.split(",") if n.strip()]
    members = [dict(m) for m in over.get("members", task.recipe.get("members") or [])]
    if not members:
        if len(names) != 1:
            raise UserError(f"--backbone {flag}: the {task.name} recipe trains one model; give one backbone "
                            "(a comma-separated list is for ensemble recipes, one per member)")
        return
    if len(names) == 1 and all(m.get("backbone", names[0]) == names[0] for m in members):
        names = names * len(members)  # the members use it already (or inherit it): nothing is ignored
    elif len(names) == 1:  # one backbone for a recipe of several: one model with it, said in one line
        log.warning("--backbone %s trains one %s model instead of the %s recipe's ensemble of %d "
                    "(--backbone a,b,... sets each member)", names[0], names[0], task.name, len(members))
        over["members"] = []
        return
    if len(names) != len(members):
        raise UserError(f"--backbone {flag}: the {task.name} recipe is an ensemble of {len(members)} members; give "
                        f"{len(members)} backbones separated by commas, one per member (e.g. --backbone "
                        f"{','.join(['efficientnet_lite0'] * len(members))}), or a config with members = []")
    over["members"] = [{**m, "backbone": n} for m, n in zip(members, names)]
    over["backbone"] = names[0]


def cmd_train(args: argparse.Namespace) -> int:
    if args.task and args.task.replace("_", "-") in SEGMENTATION_TASKS:
        return cmd_train_segmenter(args)
    if getattr(args, "task_spec", None) is None:
        check_train(args)  # called directly, not through main()
    from pellucid.core.backbones import get_backbone_spec
    from pellucid.core.tasks import get_task, register_task, task_from_dict
    from pellucid.core.training import TrainConfig

    task, over = args.task_spec, args.overrides
    # the full check of the recipe's backbone (a registry lookup, needs torch); a new task is made
    # known to this process, so training finds it by name
    task = get_task(task.name) if args.task else register_task(
        task_from_dict(task.to_toml_dict(), where=task.source))
    if getattr(args, "resume", False) and args.no_resume:
        raise UserError("--resume and --no-resume contradict each other: give one")
    if getattr(args, "resume", False):
        over["resume"] = True
    if getattr(args, "overwrite", False):
        over["overwrite"] = True
    for member in [over] + list(over.get("members", [])):
        if member.get("backbone"):
            get_backbone_spec(member["backbone"])  # a typo is reported before looking at images
    data = args.data_dir
    out = args.out or over.pop("out", None) or f"runs/{task.name}-{_dt.datetime.now():%Y%m%d-%H%M%S}"
    known = set(TrainConfig.__dataclass_fields__)
    bad = sorted(set(over) - known)
    if bad:
        from pellucid.registry import close_matches

        close = close_matches(bad[0], sorted(known), n=1)
        raise UserError(f"unknown training option {bad[0]!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
    cfg = TrainConfig.from_task(task, str(data), str(out), **over)
    if cfg.segmenter and (cfg.preprocess or "none") == "none":
        log.warning("--segmenter %s is not used: this recipe classifies the whole image (preprocess 'none'); "
                    "add --preprocess lung-mask to classify the segmented lungs", cfg.segmenter)
    from pellucid.core.kfold import run_training

    try:
        folder = run_training(cfg, folds=getattr(args, "folds", None))
    except (PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError) as err:
        raise UserError(f"{err.filename or out}: {err.strerror or err}; check the permissions of --out {out} "
                        f"and --data {data}") from None
    print_summary(folder)
    return 0


def cmd_init_task(args: argparse.Namespace) -> int:
    """``pellucid init-task NAME [--like TASK] [--data DIR]``: write ``NAME.toml``, an editable task
    spec that ``pellucid train NAME`` finds (current folder, or a folder of ``PELLUCID_TASKS``)."""
    from pellucid.core.tasks import get_task, task_toml
    from pellucid.core.usertask import data_labels, new_task

    out = Path(args.out or f"{args.name}.toml")
    if out.exists() and not args.force:
        raise UserError(f"{out} exists: edit it, or give --force to replace it (or --out FILE)")
    like = get_task(args.like, check_backbone=False) if args.like else None
    if args.data:
        classes = data_labels(args.data)
    elif like is not None:
        classes = list(like.classes)
    else:
        raise UserError("give --data DIR (the classes are its sub-folders or manifest.csv labels) or --like TASK "
                        "(start from its classes)")
    if len(classes) < 2:
        raise UserError(f"--data {args.data}: found one class {classes}; a classifier needs at least two")
    spec = new_task(classes, name=args.name, like=like, positive_class=args.positive_class, data=args.data)
    header = (f"Task {spec.name!r}: edit freely, then `pellucid train {spec.name}"
              f"{'' if args.data else ' --data DIR'}` (run here, or put this file in a folder listed in "
              f"PELLUCID_TASKS).\nMade by `pellucid init-task`" + (f" like {like.name!r}" if like else "")
              + "; keys: see pellucid/apps/*/task.toml.")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(task_toml(spec, header=header), encoding="utf-8")
    print(f"written: {out} (classes {', '.join(spec.classes)}; recipe {spec.recipe['backbone']}, "
          f"{spec.recipe['finetune']})")
    return 0


def add_train_commands(sub) -> None:
    """The ``train`` and ``init-task`` sub-parsers."""
    p = sub.add_parser("train", help="train a task's model, or a new task on the classes of a data folder")
    p.add_argument("task", nargs="?", help="a task (see `pellucid list tasks`); leave out to train a new task on "
                                           "the classes of --data (its sub-folders or manifest.csv labels)")
    _add_train_args(p)
    p.add_argument("--like", metavar="TASK", help="new task: borrow TASK's recipe, modality, preprocessing, "
                                                  "metrics and explainers (default: a general photo recipe)")
    p.add_argument("--name", help="new task: its name (default: the data folder's name)")
    p.add_argument("--positive-class", dest="positive_class",
                   help="new task: the class that counts as positive (binary tasks; default: none, argmax decisions)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out; refused unless it is this run (same task, data, seed, settings). "
                        "Default: an interrupted run of the same settings continues, another run is refused")
    p.add_argument("--overwrite", action="store_true",
                   help="--out holds another run: remove what pellucid wrote there (checkpoints, card, weights, "
                        "ood, plots, logs, split) and train afresh")
    p.set_defaults(func=cmd_train, check=check_train)

    p = sub.add_parser("init-task", help="write an editable task.toml (NAME.toml) in the current folder")
    p.add_argument("name", help="the task's name (letters, digits, - and _)")
    p.add_argument("--like", metavar="TASK", help="start from TASK's recipe, preprocessing, metrics and explainers")
    p.add_argument("--data", help="take the classes from this folder's sub-folders (or manifest.csv labels)")
    p.add_argument("--positive-class", dest="positive_class", help="the positive class of a binary task")
    p.add_argument("--out", help="file to write (default NAME.toml)")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.set_defaults(func=cmd_init_task, light=True)  # reads and writes TOML only: no torch
