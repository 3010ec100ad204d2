"""The ``pellucid`` command line: train, eval, predict, explain, report, ui, list, demo, ...

One parser with subcommands. ``train`` reads defaults from the task's recipe, then a ``--config``
TOML file, then flags (flags win); the resolved configuration is saved beside the outputs. Errors a
user can fix (missing folder, bad file, unknown name, card/task mismatch) end the command with one
line on stderr and exit status 2 — never a traceback. ``PELLUCID_DEBUG=1`` shows tracebacks.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import logging
import os
import sys
import tomllib
from pathlib import Path

__all__ = ["main", "build_parser", "train_entry", "UserError"]

log = logging.getLogger("pellucid")


class UserError(Exception):
    """An error the user can fix; printed as one line."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from pellucid.core.fewshot.config import FewShotError
    from pellucid.core.modelfolder import ModelFolderError
    from pellucid.core.pipeline import PipelineError
    from pellucid.core.tasks import TaskSpecError
    from pellucid.core.training import TrainingError
    from pellucid.core.weights import WeightSourceError
    from pellucid.datasets.readers import ImageReadError
    from pellucid.datasets.samples import DataError

    extra: list[type[BaseException]] = []
    try:
        from pellucid.explain.report import ReportError

        extra.append(ReportError)
    except ImportError:
        pass
    try:
        from pellucid.explain import ExplanationError

        extra.append(ExplanationError)
    except ImportError:
        pass
    return (*extra, UserError, FewShotError, ModelFolderError, PipelineError, TaskSpecError, TrainingError,
            WeightSourceError, ImageReadError,
            DataError, KeyError, FileNotFoundError)


def _default_data_root() -> Path:
    env = os.environ.get("PELLUCID_DATA")
    return Path(env) if env else Path("../shared/data")


def _resolve_data(task, data: str | None) -> Path:
    if data:
        return Path(data)
    root = _default_data_root()
    # PELLUCID_DATA may point at the task folder itself or at the folder of all tasks.
    for cand in (root / task.default_data, root):
        if (cand / "manifest.csv").exists() or (cand.is_dir() and any(
                (cand / c).is_dir() for c in task.classes)):
            return cand
    raise UserError(f"no data for task {task.name!r}: looked in {root / task.default_data} and {root}; "
                    f"pass --data DIR or set PELLUCID_DATA=DIR (a folder with manifest.csv or one sub-folder per class)")


# ----------------------------------------------------------------------------- commands
def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="data folder (manifest.csv or class sub-folders)")
    p.add_argument("--out", help="model folder to write (default runs/<task>-<time>)")
    p.add_argument("--backbone", help="registered backbone (see `pellucid list backbones`)")
    p.add_argument("--pretrained", help="weights: auto (default), random, timm, lite0-wheel")
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
    p.add_argument("--preprocess", choices=["none", "lung-mask", "lung-crop"],
                   help="classify segmented lungs (needs --segmenter)")
    p.add_argument("--segmenter", help="segmentation model folder (pellucid train tb-lungseg)")


def _train_overrides(args: argparse.Namespace) -> dict:
    over: dict = {}
    if args.config:
        try:
            over.update(tomllib.loads(Path(args.config).read_text()))
        except FileNotFoundError:
            raise UserError(f"config file {args.config} not found") from None
        except tomllib.TOMLDecodeError as err:
            raise UserError(f"config file {args.config} is not valid TOML: {err}") from None
    for key in ("backbone", "checkpoint", "finetune", "epochs", "image_size", "batch_size", "lr", "seed",
                "max_images", "accelerator", "num_nodes", "strategy", "preprocess", "segmenter"):
        v = getattr(args, key, None)
        if v is not None:
            over[key] = v
    if args.devices is not None:
        over["devices"] = int(args.devices) if str(args.devices).isdigit() else args.devices
    if args.pretrained is not None:
        over["pretrained"] = {"auto": True, "true": True, "random": False, "false": False}.get(
            args.pretrained.lower(), args.pretrained)
    if args.no_resume:
        over["resume"] = False
    if args.no_progress:
        over["progress"] = False
    return over


SEGMENTATION_TASKS = ("tb-lungseg",)


def cmd_train_segmenter(args: argparse.Namespace) -> int:
    from pellucid.core.segmentation import SegConfig, train_segmenter

    data = Path(args.data) if args.data else _default_data_root() / "tb_lungs"
    if not (data / "manifest.csv").exists():
        raise UserError(f"no segmentation data at {data}: pass --data DIR with a manifest.csv of path,mask,label,group")
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


def cmd_train(args: argparse.Namespace) -> int:
    from pellucid.core.tasks import get_task
    from pellucid.core.training import TrainConfig

    if args.task.replace("_", "-") in SEGMENTATION_TASKS:
        return cmd_train_segmenter(args)
    task = get_task(args.task)
    over = _train_overrides(args)
    if getattr(args, "resume", False) and args.no_resume:
        raise UserError("--resume and --no-resume contradict each other: give one")
    if getattr(args, "resume", False):
        over["resume"] = True
    if getattr(args, "overwrite", False):
        over["overwrite"] = True
    if over.get("backbone"):
        from pellucid.core.backbones import get_backbone_spec

        get_backbone_spec(over["backbone"])  # a typo is reported before looking for data
    data = _resolve_data(task, args.data)
    out = args.out or over.pop("out", None) or f"runs/{task.name}-{_dt.datetime.now():%Y%m%d-%H%M%S}"
    known = set(TrainConfig.__dataclass_fields__)
    bad = sorted(set(over) - known)
    if bad:
        from pellucid.registry import close_matches

        close = close_matches(bad[0], sorted(known), n=1)
        raise UserError(f"unknown training option {bad[0]!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
    cfg = TrainConfig.from_task(task, str(data), str(out), **over)
    flag = getattr(args, "backbone", None)
    if cfg.members and flag and any(dict(m).get("backbone") != flag for m in cfg.members):
        # the members name their own backbones: a different one in the flag would be silently ignored
        raise UserError(f"--backbone {flag}: the {task.name} recipe is an ensemble of "
                        f"{len(cfg.members)} members, each with its own backbone; give a config whose members "
                        "use it (see pellucid/apps/<task>/*.toml), or one with members = [] to train one model")
    from pellucid.core.kfold import run_training

    try:
        folder = run_training(cfg, folds=getattr(args, "folds", None))
    except (PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError) as err:
        raise UserError(f"{err.filename or out}: {err.strerror or err}; check the permissions of --out {out} "
                        f"and --data {data}") from None
    _print_summary(folder)
    return 0


def _print_summary(folder: Path) -> None:
    from pellucid.core.card import CARD_FILE, read_card

    if not (Path(folder) / CARD_FILE).exists():
        return
    card = read_card(folder)
    from pellucid.core.metrics import format_metrics

    print(f"model folder: {folder}")
    print(f"metrics:      {Path(folder) / 'metrics.json'} (test split, n={card.metrics.get('n')})")
    print(format_metrics(card.metrics))
    print(f"time: {card.training.seconds if card.training else None} s; weights: {card.weight_source}")


def cmd_eval(args: argparse.Namespace) -> int:
    from pellucid.core.evaluate import evaluate
    from pellucid.core.metrics import format_metrics

    res = evaluate(args.model, args.data, args.out, progress=True)
    print(format_metrics(res))
    print(f"written: {res['out']}/metrics.json (+ roc.png, confusion.png, reliability.png, predictions.csv)")
    if res["skipped"]:
        print(f"{len(res['skipped'])} file(s) skipped:", *res["skipped"], sep="\n  ")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from pellucid.core.modelfolder import read_card

    if read_card(args.model).kind == "segmentation":
        from pellucid.core.segmentation import predict_masks

        if not args.out:
            raise UserError("a segmentation model writes one mask PNG per input: give --out DIR")
        rows = predict_masks(args.model, args.paths, args.out, progress=True)
        if not rows:
            raise UserError(f"no image files found in {' '.join(args.paths)}")
        bad = [r for r in rows if r["error"]]
        print(f"{len(rows) - len(bad)} mask(s) and masks.csv written to {args.out}")
        if bad:
            print(f"{len(bad)} file(s) could not be read:", *[r["error"] for r in bad], sep="\n  ", file=sys.stderr)
        return 0
    return _predict_classifier(args)


def _predict_classifier(args: argparse.Namespace) -> int:
    """Stream Cases of the inputs into the predictions CSV (or stdout); resumable; exit 1 if any input failed."""
    from pellucid.core.pipeline import CaseWriter
    from pellucid.core.predict import Predictor

    out = _output_file(args.out, ".csv") if args.out else None
    pred = Predictor(args.model, device=args.device)
    pipe = pred.pipeline(batch_size=args.batch_size, workers=args.workers, policy=args.domain_policy,
                         include_identifiers=args.include_identifiers, keep_images=False)
    with CaseWriter(out, pred.classes, resume=not args.no_resume, stream=None if out else sys.stdout) as w:
        with _progress_bar("predicting", disable=out is None) as progress:  # no bar in a CSV on stdout
            for case in pipe.from_paths(args.paths, skip=w.done, progress=progress):
                w.write(case)
        if out is not None:
            resumed = f" (resumed: {w.resumed} earlier rows kept)" if w.resumed else ""
            print(f"{w.rows} rows written to {out}{resumed}; {w.flagged} flagged out of domain "
                  f"(policy: {pipe.policy}); {w.errors} unreadable")
        if w.errors:
            print(f"{w.errors} input(s) could not be read (see the error column)", file=sys.stderr)
    return 1 if w.errors else 0


def _output_file(path: str, suffix: str) -> Path:
    """``--out`` checked before any work: not a folder, its folder creatable and writable."""
    out = Path(path)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder: give a file name, e.g. {out / ('predictions' + suffix)}")
    parent = out.parent if str(out.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise UserError(f"--out {out}: {parent} is a file, not a folder")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--out {out}: cannot create its folder ({err.strerror})") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: the folder {parent} is not writable")
    return out


def cmd_list(args: argparse.Namespace) -> int:
    what = args.what
    if what in ("backbones", "all"):
        from pellucid.core.backbones import get_backbone_spec, list_backbones

        print("backbones:")
        for n in list_backbones(include_tests=False):  # test_resnet is a test fixture, not a choice
            s = get_backbone_spec(n)
            print(f"  {n:20s} {s.input_size:4d}px  dim {s.embedding_dim:5d}  cam {s.cam_layer:16s} "
                  f"weights: {', '.join(s.weight_sources)}")
    if what in ("tasks", "all"):
        from pellucid.core.tasks import get_task, list_tasks

        print("tasks:")
        for n in list_tasks():
            t = get_task(n)
            print(f"  {n:12s} {t.title} — classes {', '.join(t.classes)}; {t.recipe['backbone']}, {t.recipe['finetune']}")
    if what in ("explainers", "all"):
        try:
            from pellucid.explain import list_explainers

            print("explainers:\n  " + ", ".join(list_explainers()))
        except ImportError:
            pass
    return 0


def _option_value(raw: str):
    """``--option`` value: true/false, none, an int, a float, else the text."""
    low = raw.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


def _explainer_options(items: list[str] | None, methods: list[str]) -> dict[str, dict]:
    """``--option METHOD.NAME=VALUE`` items → ``{method: {name: value}}``, checked against the explainers."""
    from pellucid.explain import get_explainer

    options: dict[str, dict] = {}
    for item in items or []:
        key, eq, raw = item.partition("=")
        method, dot, name = key.strip().partition(".")
        if not eq or not dot or not method or not name.strip():
            raise UserError(f"--option {item!r}: write METHOD.NAME=VALUE, e.g. --option lime.num_samples=500")
        if method not in methods:
            raise UserError(f"--option {item!r}: {method!r} is not among the methods {methods} (add it to --method)")
        options.setdefault(method, {})[name.strip()] = _option_value(raw.strip())
    for method, opts in options.items():
        try:
            get_explainer(method, **opts)
        except (TypeError, ValueError) as err:
            raise UserError(f"--option for {method}: {err}") from None
    return options


def cmd_explain(args: argparse.Namespace) -> int:
    from pellucid.explain.run import explain_paths

    methods = [m.strip() for m in args.method.split(",") if m.strip()] if args.method else None
    if not methods:
        from pellucid.core.modelfolder import read_card

        methods = list(read_card(args.model).explainers or ["gradcam"])
    options = _explainer_options(args.option, methods)
    out = args.out or "runs/explain"
    rows = explain_paths(args.model, args.paths, methods=methods, target=args.target, out_dir=out,
                         score=args.score, lung_segmenter=args.segmenter, options=options, progress=True)
    print(f"explanations written to {out}")
    good = [r for r in rows if not r.get("error")]
    if args.score and good:
        from pellucid.explain import score_table

        print(score_table(good))
    bad = [r for r in rows if r.get("error")]
    if bad:
        print(f"{len(bad)} input(s) or method(s) failed:", *sorted({r["error"] for r in bad}), sep="\n  ",
              file=sys.stderr)
    return 1 if bad else 0


@contextlib.contextmanager
def _progress_bar(desc: str, disable: bool = False):
    """A ``progress(fraction, text)`` callback drawing one tqdm bar on stderr (closed on exit)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=1.0, desc=desc, leave=False, bar_format="{l_bar}{bar}| {elapsed} {postfix}", disable=disable)

    def progress(fraction: float, text: str) -> None:
        bar.n = min(max(float(fraction), 0.0), 1.0)
        bar.set_postfix_str(text, refresh=True)

    try:
        yield progress
    finally:
        bar.close()


def cmd_report(args: argparse.Namespace) -> int:
    from pellucid.explain.report import write_report

    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    with _progress_bar("report") as progress:  # predicting, explaining and laying out can take minutes
        paths = write_report(args.model, args.paths, methods=methods, out_dir=args.out or "runs/report",
                             include_identifiers=args.include_identifiers, lung_segmenter=args.segmenter,
                             progress=progress)
    for p in paths:
        print(f"written: {p}")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    """``streamlit run`` the web app on 127.0.0.1 (``--host`` to change; it has no login), Batch
    folders confined to ``--data-root``, error details off; the server runs in its own process group,
    stopped with this command (Ctrl-C, SIGTERM, SIGHUP)."""
    import ipaddress
    import signal
    import subprocess
    import threading
    import time

    app = Path(__file__).parent / "ui" / "app.py"
    env = dict(os.environ)
    if args.model:
        env["PELLUCID_MODEL"] = str(Path(args.model).resolve())
    data_root = getattr(args, "data_root", None) or os.environ.get("PELLUCID_DATA_ROOT")
    if data_root:
        if not Path(data_root).expanduser().is_dir():
            raise UserError(f"--data-root {data_root} is not a folder: give the folder the Batch page may read")
        env["PELLUCID_DATA_ROOT"] = os.path.realpath(Path(data_root).expanduser())
    host = getattr(args, "host", None) or "127.0.0.1"
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    cmd = [sys.executable, "-m", "streamlit", "run", str(app), "--server.port", str(args.port),
           "--server.address", host, "--server.headless", "true", "--browser.gatherUsageStats", "false",
           "--client.toolbarMode", "minimal", "--client.showErrorDetails", "none",
           "--server.fileWatcherType", "none", "--global.developmentMode", "false"]
    if not loopback:
        print(f"pellucid ui: warning: listening on {host}, reachable from other machines, and the app has no "
              "login: anyone who reaches the port can use it (bind 127.0.0.1, the default, or put an "
              "authenticating proxy in front)", file=sys.stderr)
    shown = "localhost" if loopback else host
    print(f"pellucid web app on http://{shown}:{args.port} (Ctrl-C stops it)", flush=True)
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)  # its own group: stopped with us
    stopping: list[float] = []

    def stop(signum, _frame) -> None:
        if not stopping:
            stopping.append(time.monotonic())
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    signals = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    previous = ({s: signal.signal(s, stop) for s in signals}
                if threading.current_thread() is threading.main_thread() else {})
    try:
        while True:
            try:
                code = proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if stopping and time.monotonic() - stopping[0] > 10:
                    os.killpg(proc.pid, signal.SIGKILL)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if proc.poll() is None:  # an exception here: do not leave the server behind
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return 130 if stopping else code


def cmd_demo(args: argparse.Namespace) -> int:
    from pellucid.core.tasks import get_task
    from pellucid.core.training import TrainConfig, train

    task = get_task("tb")
    data = Path(args.data) if args.data else None
    if data is None or not data.exists():
        looked = data or (_default_data_root() / task.default_data)
        raise UserError(f"no TB chest X-ray data at {looked}: set PELLUCID_DATA=DIR (a folder with manifest.csv "
                        f"or normal/ and tuberculosis/ sub-folders) and run `make demo` again")
    out = Path("runs") / f"tb-demo-{_dt.datetime.now():%Y%m%d-%H%M%S}"
    folder = train(TrainConfig.from_task(task, str(data), str(out)))
    _print_summary(folder)
    if args.no_ui:
        print(f"done. model: {folder}   metrics: {folder / 'metrics.json'}   plots: {folder / 'plots'}")
        return 0
    ns = argparse.Namespace(model=str(folder), port=args.port)
    return cmd_ui(ns)


def _lazy(module: str, func: str):
    def run(args):
        import importlib

        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name and err.name.startswith("pellucid"):
                raise UserError(f"this command is not available in this build ({err.name} is missing)") from None
            raise
        return getattr(mod, func)(args)
    return run


def build_parser() -> argparse.ArgumentParser:
    import pellucid

    parser = argparse.ArgumentParser(prog="pellucid", description="Trustworthy image classification.")
    parser.add_argument("--version", action="version", version=f"pellucid {pellucid.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    _add_model_commands(sub)
    _add_explain_and_tool_commands(sub)
    return parser


def _add_model_commands(sub) -> None:
    """``train``, ``eval``, ``predict``: the commands that make and use model folders."""
    p = sub.add_parser("train", help="train a task app's model")
    p.add_argument("task")
    _add_train_args(p)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out; refused unless it is this run (same task, data, seed, settings). "
                        "Default: an interrupted run of the same settings continues, another run is refused")
    p.add_argument("--overwrite", action="store_true",
                   help="--out holds another run: remove what pellucid wrote there (checkpoints, card, weights, "
                        "ood, plots, logs, split) and train afresh")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="score a model folder on a labelled data folder")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="predict files or folders; writes CSV")
    p.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, cuda:1 ...")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=min(4, max(0, (os.cpu_count() or 1) - 1)),
                   help="processes that decode images (0: decode in this process)")
    p.add_argument("--domain-policy", choices=["label", "withhold"],
                   help="flagged (out-of-domain) inputs: keep the label beside the flag, or withhold it "
                        "(default: the model card's; withhold for radiology and pathology models)")
    p.add_argument("--no-resume", action="store_true", help="start the CSV afresh instead of skipping rows it holds")
    p.add_argument("--include-identifiers", action="store_true",
                   help="name DICOM inputs by their file names (default: by a hash of their bytes)")
    p.add_argument("--model", required=True)
    p.add_argument("--out", help="CSV file (default: stdout)")
    p.add_argument("paths", nargs="+")
    p.set_defaults(func=cmd_predict)


def _add_explain_and_tool_commands(sub) -> None:
    """``explain``, ``report``, ``ui``, ``list``, ``demo``, ``fewshot``, ``export``, ``fit-explainer``."""
    p = sub.add_parser("explain", help="explanation overlays + JSON per image")
    p.add_argument("--model", required=True)
    p.add_argument("--method", help="comma-separated methods (default: the task's explainers)")
    p.add_argument("--target", help="class to explain (default: the predicted class)")
    p.add_argument("--out")
    p.add_argument("--score", action="store_true", help="score faithfulness; print a method × metric table")
    p.add_argument("--segmenter", help="lung segmentation folder: add lung_share / border_share to --score "
                   "(default: the model card's segmenter, if any)")
    p.add_argument("--option", action="append", metavar="METHOD.NAME=VALUE",
                   help="explainer option, repeatable; over the task's own (e.g. lime.num_samples=500, "
                        "lime.segmentation=quickshift, lime.precision=int8)")
    p.add_argument("paths", nargs="+")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("report", help="HTML + PDF explanation report for images or a folder")
    p.add_argument("--model", required=True)
    p.add_argument("--methods")
    p.add_argument("--out")
    p.add_argument("--include-identifiers", action="store_true", help="show DICOM patient tags (off by default)")
    p.add_argument("--segmenter", help="lung segmentation model folder: outline the lungs on chest X-ray overlays and "
                                       "report the share of each map inside them (default: the model's own segmenter)")
    p.add_argument("paths", nargs="+")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("ui", help="start the Streamlit web app")
    p.add_argument("--model")
    p.add_argument("--port", type=int, default=8501)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only); the app has no login")
    p.add_argument("--data-root", metavar="DIR",
                   help="the folder whose sub-folders the Batch page may read (env PELLUCID_DATA_ROOT); "
                        "without it only zip uploads are offered")
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser("list", help="list backbones, tasks, explainers")
    p.add_argument("what", nargs="?", default="all", choices=["backbones", "tasks", "explainers", "all"])
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("demo", help="train the TB app on the sample data and open the web app")
    p.add_argument("--data")
    p.add_argument("--no-ui", action="store_true")
    p.add_argument("--port", type=int, default=8501)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("fewshot", help="few-shot prototypical networks")
    p.add_argument("action", choices=["fit", "eval"])
    p.add_argument("--support", help="folder of support images (one sub-folder per class)")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--out")
    p.add_argument("--data")
    p.add_argument("--shots", default="1,5,10")
    p.add_argument("--episodes", type=int, default=500)
    p.set_defaults(func=_lazy("pellucid.core.fewshot_cli", "run"))

    p = sub.add_parser("export", help="export a model folder (ONNX, INT8)")
    p.add_argument("--model", required=True)
    p.add_argument("--format", default="onnx")
    p.add_argument("--int8", action="store_true")
    p.add_argument("--int8-method", choices=["static", "dynamic"], default="static",
                   help="static: QDQ, calibrated on training images (default); dynamic: no calibration")
    p.add_argument("--calib-images", type=int, default=256, help="training images for static INT8 calibration")
    p.add_argument("--out")
    p.set_defaults(func=_lazy("pellucid.core.export", "run"))

    p = sub.add_parser("fit-explainer", help="train a trainable explainer (T-TAME) for a model")
    p.add_argument("method", choices=["ttame"])
    p.add_argument("--model", required=True)
    p.add_argument("--data")
    p.add_argument("--epochs", type=int)
    p.set_defaults(func=_lazy("pellucid.explain.ttame", "run_cli"))

def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pydicom").setLevel(logging.ERROR)  # its warnings quote header values verbatim
    for noisy in ("PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for own_handler in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(own_handler).propagate = False  # Lightning prints through its own handler


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    from pellucid.core.runtime import tune_allocator

    tune_allocator()  # large CPU tensors reuse freed memory instead of page-faulting it back in
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        hint = {"train": "; `pellucid train` resumes from the last checkpoint in --out",
                "predict": "; run the same command again: rows already in --out are kept and skipped"}
        print(f"interrupted{hint.get(args.command, '')}", file=sys.stderr)
        return 130
    except Exception as err:  # one clear line for what a user can fix
        if os.environ.get("PELLUCID_DEBUG") == "1" or not isinstance(err, _user_errors()):
            raise
        msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"pellucid {args.command}: error: {msg}", file=sys.stderr)
        return 2


def train_entry(task: str, argv: list[str] | None = None) -> int:
    """``python -m pellucid.apps.<task>.train [options]`` — ``pellucid train <task> [options]``."""
    return main(["train", task, *(sys.argv[1:] if argv is None else argv)])
