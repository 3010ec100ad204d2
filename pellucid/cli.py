"""The ``pellucid`` command line: train, init-task, tune, eval, predict, explain, report, ui, list, demo, ...

One parser with subcommands (``train`` and ``init-task`` live in :mod:`pellucid.cli_train`); each
command may name a ``check`` that :func:`main` runs before any heavy import, so a mistyped name or a
missing folder is answered at once. ``train`` reads defaults from the task's recipe, then a ``--config``
TOML file, then flags (flags win); the resolved configuration is saved beside the outputs. Errors a
user can fix (missing folder, bad file, unknown name, card/task mismatch) end the command with one
line on stderr and exit status 2 — never a traceback. ``PELLUCID_DEBUG=1`` shows tracebacks.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import errno
import logging
import os
import sys
import warnings
from pathlib import Path

from pellucid.cli_common import UserError, default_data_root, print_summary
from pellucid.cli_train import add_train_commands

__all__ = ["main", "build_parser", "train_entry", "UserError"]

log = logging.getLogger("pellucid")


# The exception types that end a command with one line instead of a traceback, by module. Only the
# modules already imported are consulted: an exception of a class can only come from its module, and
# so an early error (a typo, a missing folder) is reported without importing torch.
_USER_ERROR_TYPES = (
    ("pellucid.explain.report", "ReportError"), ("pellucid.explain", "ExplanationError"),
    ("pellucid.core.fewshot.config", "FewShotError"), ("pellucid.core.card", "ModelFolderError"),
    ("pellucid.core.card", "CardError"), ("pellucid.core.pipeline", "PipelineError"),
    ("pellucid.core.tasks", "TaskSpecError"), ("pellucid.core.training", "TrainingError"),
    ("pellucid.core.runs", "TrainingError"),  # the same class, raised where training is not imported
    ("pellucid.core.weights", "WeightSourceError"), ("pellucid.datasets.readers", "ImageReadError"),
    ("pellucid.datasets.samples", "DataError"), ("pellucid.core.trainer", "TrackingError"),
    ("pellucid.core.segmentation", "SegmentationError"),
)


#: errno values of a disk that cannot take more: full, over quota, read-only
_FULL_DISK = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


def _user_errors() -> tuple[type[BaseException], ...]:
    found = [getattr(sys.modules[m], name, None) for m, name in _USER_ERROR_TYPES if m in sys.modules]
    return (*[t for t in found if isinstance(t, type)], UserError, KeyError, FileNotFoundError)


# ----------------------------------------------------------------------------- commands
def cmd_eval(args: argparse.Namespace) -> int:
    from pellucid.core.evaluate import evaluate
    from pellucid.core.metrics import format_metrics

    res = evaluate(args.model, args.data, args.out, progress=True)
    print(format_metrics(res))
    print(f"written: {res['out']}/metrics.json (+ roc.png, confusion.png, reliability.png, predictions.csv)")
    if res["skipped"]:
        print(f"{len(res['skipped'])} file(s) skipped:", *res["skipped"], sep="\n  ")
    if res.get("seen_in_training"):
        print(f"warning: {res['note']}")
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
            print(f"{len(bad)} of {len(rows)} input(s) failed:", *[r["error"] for r in bad], sep="\n  ",
                  file=sys.stderr)
        return 1 if bad else 0
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
            print(f"{w.errors} of {w.rows} input(s) failed (see the error column{f' of {out}' if out else ''})",
                  file=sys.stderr)
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
    import shutil
    import signal
    import subprocess
    import tempfile
    import threading
    import time

    from pellucid.ui.server import streamlit_command

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
    cmd = streamlit_command(args.port, host)
    if not loopback:
        print(f"pellucid ui: warning: listening on {host}, reachable from other machines, and the app has no "
              "login: anyone who reaches the port can use it (bind 127.0.0.1, the default, or put an "
              "authenticating proxy in front)", file=sys.stderr)
    shown = "localhost" if loopback else host
    print(f"pellucid web app on http://{shown}:{args.port} (Ctrl-C stops it)", flush=True)
    stopping: list[float] = []
    procs: list[subprocess.Popen] = []
    # the server's temporary files (unpacked zips, uploads, PDFs) live here and go when it stops, killed or not
    scratch = env["TMPDIR"] = tempfile.mkdtemp(prefix="pellucid-ui-")

    def stop(signum, _frame) -> None:
        if not stopping:
            stopping.append(time.monotonic())
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)

    signals = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    # the handlers come first: a signal that arrives while the server starts still stops it
    previous = ({s: signal.signal(s, stop) for s in signals}
                if threading.current_thread() is threading.main_thread() else {})
    try:
        proc = subprocess.Popen(cmd, env=env, start_new_session=True)  # its own group: stopped with us
        procs.append(proc)
        if stopping:
            stop(None, None)
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
        for p in procs:
            if p.poll() is None:  # an exception here: do not leave the server behind
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        shutil.rmtree(scratch, ignore_errors=True)
    return 130 if stopping else code


def demo_config(cfg):
    """The demo's recipe: the default's linear-probe members alone when the default also fine-tunes
    (a hybrid), so ``make demo`` trains in a minute or two; returns ``(config, note or None)``."""
    from dataclasses import replace

    fast = [m for m in cfg.members if m.get("finetune", cfg.finetune) == "linear-probe"]
    if not fast or len(fast) == len(cfg.members):
        return cfg, None
    return replace(cfg, members=fast), (
        f"demo: training the {len(fast)} linear-probe members of the default recipe only (the fast part; "
        f"`pellucid train {cfg.task}` trains all {len(cfg.members)}, fine-tune included)")


def cmd_demo(args: argparse.Namespace) -> int:
    from pellucid.core.kfold import run_training
    from pellucid.core.tasks import get_task
    from pellucid.core.training import TrainConfig

    task = get_task("tb")
    data = Path(args.data) if args.data else None
    if data is None or not data.exists():
        looked = data or (default_data_root() / task.default_data)
        raise UserError(f"no TB chest X-ray data at {looked}: set PELLUCID_DATA=DIR (a folder with manifest.csv "
                        f"or normal/ and tuberculosis/ sub-folders) and run `make demo` again")
    out = Path("runs") / f"tb-demo-{_dt.datetime.now():%Y%m%d-%H%M%S}"
    cfg, note = demo_config(TrainConfig.from_task(task, str(data), str(out)))  # the app's default recipe
    if note:
        print(note, flush=True)
    folder = run_training(cfg)
    print_summary(folder)
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
    """``train``, ``init-task``, ``tune``, ``eval``, ``predict``: the commands that make and use model folders."""
    add_train_commands(sub)

    p = sub.add_parser("tune", help="compare candidate recipes of a task by k-fold cross-validation")
    p.add_argument("task")
    p.add_argument("--data", help="data folder (default: the task's sample data, as for train)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--budget", type=float, default=15.0, help="minutes to spend at most (default 15)")
    p.add_argument("--candidates", help="comma-separated candidate recipe names (default: all)")
    p.add_argument("--out", default="bench/results", help="folder of the results table (default bench/results)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write-recipe", action="store_true", dest="write_recipe",
                   help="write the winning recipe as a TOML file next to the table")
    p.add_argument("--train-folds", type=int, metavar="N",
                   help="run the training candidates (fine-tunes) on the first N folds only: they cost minutes per fold")
    p.add_argument("--fine-tune-epochs", type=int, default=6, metavar="E", help="epochs of baseline B and LP-FT")
    p.add_argument("--skip", help="comma-separated candidate names not to run (the baselines always run)")
    p.add_argument("--name", help="name of the results table (default: the task's), e.g. tb_lungs for tb on another data set")
    p.add_argument("--resume", action="store_true",
                   help="reuse the fine-tunes' folds of an earlier table with the same folds and recipe")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="train N folds of a fine-tune at once, each in its own process (cores split between them)")
    p.add_argument("--refit", help="comma-separated training candidates whose folds train again under --resume "
                   "(the earlier table's scores of them are replaced; hybrids of two fine-tunes need their models)")
    p.set_defaults(func=_lazy("pellucid.core.tune", "run_cli"))

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
    p.add_argument("--overwrite", action="store_true",
                   help="fit: replace the model or run that --out holds (otherwise refused)")
    p.add_argument("--task", default=None, metavar="NAME",
                   help="the registered task these classes belong to (its classes must match): the card names it, "
                        "and its channels apply (tb: X-rays read as luminance, their colour being a source artefact)")
    p.add_argument("--channels", type=int, choices=[1, 3], default=None,
                   help="1: read every image as luminance (gray), at fitting and prediction; 3: colour "
                        "(default: the --task's own, else 3)")
    p.add_argument("--data", help="eval: a labelled folder (class sub-folders or manifest.csv with groups)")
    p.add_argument("--shots", default="1,5,10", help="eval: support images per class, comma-separated")
    p.add_argument("--episodes", type=int, default=500,
                   help="eval: episodes per shot count; each refits what `fit` fits on its support set")
    p.add_argument("--split-single-groups", type=int, default=0, metavar="N",
                   help="eval: cut a class whose images are all one group (frames of one recording) into N blocks "
                        "in file-name order, so support and queries come from different blocks")
    p.add_argument("--transductive", type=int, default=0, metavar="STEPS",
                   help="opt-in: soft k-means refinement of the prototypes on each predicted batch "
                        "(a prediction then depends on the other images in its batch)")
    p.add_argument("--no-auto-backbones", dest="auto_backbones", action="store_false", default=None,
                   help="embed with the backbone alone (default for Lite0: the support set chooses Lite0 or "
                        "Lite0 + Lite2 by leave-one-out; a two-backbone model is bigger and slower, and CAM "
                        "maps then cover Lite0's share only)")
    p.add_argument("--head", choices=["logistic", "prototypes"], default=None,
                   help="classifier on the embedding (default logistic: a logistic regression on the support "
                        "embeddings; prototypes: the nearest class prototype, as before; docs/fewshot.md)")
    p.add_argument("--resolution", type=int, default=None, metavar="PX",
                   help="opt-in: every backbone sees the images at PX pixels (320 helped everyday objects, "
                        "hurt chest X-rays and sonar; docs/fewshot.md)")
    p.add_argument("--scales", default=None, metavar="PX[,PX]",
                   help="multi-scale embedding: every backbone runs again at these sides (comma-separated "
                        "pixels) and its features are appended; 'none': one side per backbone, also for the "
                        "default's candidate that runs Lite0 + Lite2 again at 320 px (docs/fewshot.md)")
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


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as the user reads it: one line, no source code quoted (``-v`` shows where it came from)."""
    text = " ".join(str(message).split())
    return f"WARNING {category.__name__}: {text}\n"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    plain = warnings.formatwarning
    if not args.verbose and os.environ.get("PELLUCID_DEBUG") != "1":
        warnings.formatwarning = _one_line_warning  # not the file, line number and source line of the code
    try:
        if getattr(args, "check", None) is not None:
            args.check(args)  # names, paths and flags, before the heavy imports: a typo answers at once
        if not getattr(args, "light", False):
            from pellucid.core.runtime import tune_allocator

            tune_allocator()  # large CPU tensors reuse freed memory instead of page-faulting it back in
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        hint = {"train": "; `pellucid train` resumes from the last checkpoint in --out",
                "predict": "; run the same command again: rows already in --out are kept and skipped"}
        print(f"interrupted{hint.get(args.command, '')}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `pellucid predict DIR | head`: the reader left; stop quietly, as `cat` does
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141
    except Exception as err:  # one clear line for what a user can fix
        if os.environ.get("PELLUCID_DEBUG") != "1" and isinstance(err, OSError) and err.errno in _FULL_DISK:
            where = f" writing {err.filename}" if err.filename else ""
            print(f"pellucid {args.command}: error: {err.strerror or 'the disk is full'}{where}; free some space "
                  f"and run the command again", file=sys.stderr)
            return 2
        if os.environ.get("PELLUCID_DEBUG") == "1" or not isinstance(err, _user_errors()):
            raise
        msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"pellucid {args.command}: error: {msg}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = plain  # main() called in a process (tests, notebooks) leaves it as it was


def train_entry(task: str, argv: list[str] | None = None) -> int:
    """``python -m pellucid.apps.<task>.train [options]`` — ``pellucid train <task> [options]``."""
    return main(["train", task, *(sys.argv[1:] if argv is None else argv)])
