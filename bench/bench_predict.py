"""Predict at scale: ``pellucid predict`` on thousands of files against the raw forward pass.

A quick model (linear probe, the task's default backbone; nuclei by default) is trained for the bench
into ``runs/bench-predict-<task>`` (reused when it is there), then, in one run on this machine:

* **throughput** — ``pellucid predict --model M --out CSV --workers W DIR`` as a subprocess (the real
  CLI: start-up, model load, decoding, preprocessing, forward pass, calibration, domain check, CSV)
  on ``--images`` files (a temporary folder of symlinks to the task's sample data) for each
  ``--workers`` value, against the plain forward pass of the same model on the same images, decoded
  and preprocessed beforehand (batch 32, ``torch.inference_mode``, channels-last), measured before and
  after the CLI runs. Reported: images/s of both and their ratio, end to end and without the CLI's
  start-up (a one-image run of the CLI);
* **memory** — peak resident memory of the CLI at ``--images`` and at ``--small`` inputs: the main
  process's (``/usr/bin/time -v``: "Maximum resident set size") and that of the process tree (main +
  decoding workers, ``/proc`` polled every 50 ms). Streaming should keep the two within 10 %;
* **resume** — a CLI run killed (SIGKILL) once its CSV holds half the rows, then rerun with the same
  ``--out``: rows the rerun skipped (as it reports them), its wall time against a full run, and
  whether the final CSV has exactly one well-formed row per input.

Writes ``bench/results/predict.md`` (CPU, load average and thread count included: the numbers are
only comparable within one run).
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import write_table

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
OUT = Path(__file__).parent / "results" / "predict.md"
TIME = Path("/usr/bin/time")


# ----------------------------------------------------------------------------- inputs and processes
def input_files(data: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` image files of a data folder's ``manifest.csv`` (seeded random draw, in manifest order)."""
    with (data / "manifest.csv").open(newline="") as fh:
        paths = [data / r["path"] for r in csv.DictReader(fh)]
    if len(paths) < n:
        raise SystemExit(f"{data} has {len(paths)} images; the bench needs {n}")
    keep = sorted(random.Random(seed).sample(range(len(paths)), n))
    return [paths[i] for i in keep]


def link_folder(files: list[Path], folder: Path) -> Path:
    """A folder of symlinks to ``files`` (unique names, so the CLI gets one flat folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(files):
        (folder / f"{i:05d}_{f.name}").symlink_to(f.resolve())
    return folder


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for t in os.listdir(f"/proc/{pid}/task")
                for c in Path(f"/proc/{pid}/task/{t}/children").read_text().split()]
    except OSError:
        return []


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(_children(p))
    return out


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _csv_rows(path: Path) -> int:
    """Complete data lines in a CSV being written (newlines minus the header's)."""
    try:
        return max(0, path.read_bytes().count(b"\n") - 1)
    except OSError:
        return 0


def run_cli(args: list[str], *, kill_at_rows: int | None = None, watch: Path | None = None,
            poll: float = 0.05) -> dict:
    """Run ``python -m pellucid ARGS`` under ``/usr/bin/time -v`` and poll the process tree's memory.

    Args:
        args: the ``pellucid`` command line.
        kill_at_rows: SIGKILL the CLI once ``watch`` (its CSV) holds this many complete rows.

    Returns:
        ``wall_s``, ``rc``, ``stdout``, ``stderr``, ``maxrss_mib`` (main process, kernel high-water
        mark), ``tree_peak_mib`` (polled sum over the CLI and its workers), ``killed``.
    """
    env = dict(os.environ, PELLUCID_OFFLINE="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "pellucid", *args]
    timed = TIME.exists()
    if timed:
        cmd = [str(TIME), "-v", *cmd]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=ROOT)
        peak, killed = 0, False
        while proc.poll() is None:
            kids = _children(proc.pid) if timed else [proc.pid]
            peak = max(peak, sum(_rss_kb(p) for k in kids for p in _tree(k)))
            if kill_at_rows is not None and not killed and watch is not None and _csv_rows(watch) >= kill_at_rows:
                for k in kids:
                    os.kill(k, signal.SIGKILL)
                killed = True
            time.sleep(poll)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    return {"wall_s": wall, "rc": proc.returncode, "stdout": stdout, "stderr": stderr, "killed": killed,
            "maxrss_mib": int(m.group(1)) / 1024 if m else float("nan"), "tree_peak_mib": peak / 1024}


def _predict_args(model: Path, folder: Path, out_csv: Path, workers: int) -> list[str]:
    return ["predict", "--model", str(model), "--out", str(out_csv), "--workers", str(workers), str(folder)]


# ----------------------------------------------------------------------------- the raw forward pass
def prepare_tensors(model: Path, files: list[Path]):
    """Decode and preprocess ``files`` exactly as the pipeline does; returns ``(predictor, tensor, seconds)``."""
    import torch

    from pellucid.core.predict import Predictor
    from pellucid.core.privacy import read_quietly

    pred = Predictor(model)
    t = time.perf_counter()
    x = torch.stack([pred.preprocess(read_quietly(f)) for f in files])
    return pred, x, time.perf_counter() - t


def raw_forward(pred, x, batch: int = 32) -> float:
    """Seconds for the plain forward pass over ``x`` in batches (inference mode, channels-last)."""
    import torch

    model = pred.model.eval()
    with torch.inference_mode():
        model(x[:batch].contiguous(memory_format=torch.channels_last))  # warm-up
        t = time.perf_counter()
        for s in range(0, len(x), batch):
            model(x[s:s + batch].contiguous(memory_format=torch.channels_last))
        return time.perf_counter() - t


# ----------------------------------------------------------------------------- resume
def check_csv(path: Path, expected: set[str]) -> dict:
    """Rows, unique paths, malformed rows (wrong field count or no probabilities without an error)
    and inputs missing from a predictions CSV."""
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    header, body = rows[0], rows[1:]
    probs = [i for i, h in enumerate(header) if h.startswith("prob_")]
    err_col = header.index("error")
    good = [r for r in body if len(r) == len(header) and (r[err_col] or all(r[i] for i in probs))]
    paths = [r[0] for r in good]
    return {"rows": len(body), "unique": len(set(paths)), "malformed": len(body) - len(good),
            "duplicates": len(paths) - len(set(paths)), "missing": len(expected - set(paths))}


def resume_check(model: Path, folder: Path, work: Path, workers: int, full_wall: float, *, kind: str = "kill",
                 full_csv: Path | None = None) -> dict:
    """Interrupt a run at half its rows, rerun it with the same ``--out``, check the final CSV.

    ``kind="kill"``: SIGKILL the CLI once its CSV holds half the rows (when the run ends first, as tiny
    runs do, its CSV is cut back to the header and half the rows). ``"cut"``: ``full_csv`` (a finished
    run's CSV) cut in the middle of the row after the first half, as a crash during a write leaves it.
    ``"half"``: ``full_csv`` cut to the header and its first half rows (no CLI run to interrupt).
    """
    expected = {p.name for p in folder.iterdir()}
    n = len(expected)
    out_csv = work / f"resume-{kind}-w{workers}.csv"
    if kind in ("cut", "half"):
        lines = full_csv.read_bytes().splitlines(keepends=True)
        tail = lines[1 + n // 2][: len(lines[1 + n // 2]) // 2] if kind == "cut" else b""
        out_csv.write_bytes(b"".join(lines[:1 + n // 2]) + tail)
        mode = ("CSV cut in the middle of a row (crash during a write)" if kind == "cut" else
                "CSV cut to half its rows")
    else:
        first = run_cli(_predict_args(model, folder, out_csv, workers), kill_at_rows=n // 2, watch=out_csv,
                        poll=0.01)
        mode = "SIGKILL once half the rows are in the CSV"
        if not first["killed"]:  # finished before the kill point (tiny runs): keep the header and half the rows
            lines = out_csv.read_bytes().splitlines(keepends=True)
            out_csv.write_bytes(b"".join(lines[:1 + n // 2]))
            mode = "CSV cut to half its rows (the run ended before the kill point)"
    raw = out_csv.read_bytes()
    before = {"complete_rows": max(0, raw.count(b"\n") - 1), "partial_last_line": bool(raw) and not raw.endswith(b"\n")}
    rerun = run_cli(_predict_args(model, folder, out_csv, workers))
    m = re.search(r"resumed: (\d+) earlier rows kept", rerun["stdout"])
    w = re.search(r"(\d+) rows written", rerun["stdout"])
    return {"mode": mode, "workers": workers, **before, "skipped": int(m.group(1)) if m else 0,
            "written": int(w.group(1)) if w else 0, "rerun_s": rerun["wall_s"], "rerun_rc": rerun["rc"],
            "full_s": full_wall, **check_csv(out_csv, expected),
            "stderr_tail": rerun["stderr"].strip().splitlines()[-3:] if rerun["rc"] else []}


# ----------------------------------------------------------------------------- the measurement
def measure(model: Path, files: list[Path], *, small: int | None, workers: tuple[int, ...] = (0, 2),
            resume_workers: int = 0, resume: tuple[str, ...] = ("kill", "cut"), startup: bool = True,
            work: Path | None = None) -> dict:
    """Everything the table shows, for ``model`` on ``files`` (the first ``small`` of them for the
    memory comparison; None: no comparison run). ``resume``: the interruptions to try (``"kill"``, ``"cut"``,
    ``"half"``: see :func:`resume_check`); ``startup``: time a one-image CLI run; ``work`` holds the symlink folders
    and CSVs (a temporary folder by default)."""
    import torch

    from pellucid.core.runtime import tune_allocator

    tune_allocator()  # as the CLI does
    own_tmp = None
    if work is None:
        own_tmp = tempfile.TemporaryDirectory(prefix="bench-predict-")
        work = Path(own_tmp.name)
    try:
        big = link_folder(files, work / f"in-{len(files)}")
        sizes = [(len(files), big)]
        if small:
            sizes.append((small, link_folder(files[:small], work / f"in-{small}")))
        one = link_folder(files[:1], work / "in-1")
        res: dict = {"n": len(files), "small": small, "threads": torch.get_num_threads(), "load_start": os.getloadavg()}
        pred, x, decode_s = prepare_tensors(model, files)
        res["decode_s"] = decode_s
        res["raw_before_s"] = raw_forward(pred, x)
        res["startup"] = run_cli(_predict_args(model, one, work / "one.csv", 0)) if startup else None
        runs = {}
        for w in workers:
            for n, folder in sizes:
                r = run_cli(_predict_args(model, folder, work / f"w{w}-{n}.csv", w))
                if r["rc"] != 0:
                    raise RuntimeError(f"pellucid predict failed (rc {r['rc']}): {r['stderr'][-2000:]}")
                r["rows"] = check_csv(work / f"w{w}-{n}.csv", {p.name for p in folder.iterdir()})
                runs[(w, n)] = r
        res["runs"] = runs
        res["raw_after_s"] = raw_forward(pred, x)
        full = runs[(resume_workers, len(files))]["wall_s"]
        res["resume"] = [resume_check(model, big, work, resume_workers, full, kind=kind,
                                      full_csv=work / f"w{resume_workers}-{len(files)}.csv") for kind in resume]
        res["load_end"] = os.getloadavg()
        return res
    finally:
        if own_tmp is not None:
            own_tmp.cleanup()


def _num(x: float, fmt: str) -> str:
    return "–" if math.isnan(x) else format(x, fmt)


def table(res: dict, model_note: str, cpu: str) -> list[str]:
    n, small = res["n"], res["small"]
    raw_s = (res["raw_before_s"] + res["raw_after_s"]) / 2
    raw_ips = n / raw_s
    start = res["startup"]["wall_s"] if res["startup"] else math.inf
    la0, la1 = res["load_start"], res["load_end"]
    lines = [
        "# Predict at scale: `pellucid predict` vs the raw forward pass",
        "",
        f"CPU: {cpu}; torch threads {res['threads']} (bench and CLI); load average (1 min) {la0[0]:.2f} at the start, "
        f"{la1[0]:.2f} at the end (the 2 cores are shared: numbers compare within this run only).",
        f"Model: {model_note}.",
        "",
        f"## Throughput ({n} images)",
        "",
        "| run | workers | images | wall s | img/s | img/s without start-up | × raw forward (end to end) "
        "| × raw forward (without start-up) |",
        "|---|---|---|---|---|---|---|---|",
        f"| raw forward pass (batch 32, inference mode, channels-last; mean of before {res['raw_before_s']:.2f} s "
        f"/ after {res['raw_after_s']:.2f} s) | – | {n} | {raw_s:.2f} | {raw_ips:.0f} | – | 1.00 | 1.00 |",
        f"| decode + preprocess only (bench process, one process, not part of the raw pass) | – | {n} "
        f"| {res['decode_s']:.2f} | {n / res['decode_s']:.0f} | – | – | – |",
    ]
    if res["startup"]:
        lines.append(f"| `pellucid predict`, one image (start-up: imports, model load, CSV) | 0 | 1 | {start:.2f} "
                     "| – | – | – | – |")
    for (w, k), r in sorted(res["runs"].items(), key=lambda kv: (-kv[0][1], kv[0][0])):
        ips = k / r["wall_s"]
        net = k / (r["wall_s"] - start) if r["wall_s"] > 1.5 * start else math.nan  # start-up noise dominates
        lines.append(f"| `pellucid predict` | {w} | {k} | {r['wall_s']:.2f} | {ips:.0f} | {_num(net, '.0f')} | "
                     f"{ips / raw_ips:.2f} | {_num(net / raw_ips, '.2f')} |")
    if small:
        lines += ["", f"## Peak memory of `pellucid predict`, {small} vs {n} images (target: within 10 %)", "",
                  "| workers | main process, " + f"{small} | main, {n} | change | process tree, {small} | tree, {n} "
                  "| change |", "|---|---|---|---|---|---|---|"]
        for w in sorted({w for w, _ in res["runs"]}):
            a, b = res["runs"][(w, small)], res["runs"][(w, n)]
            lines.append(f"| {w} | {a['maxrss_mib']:.0f} MiB | {b['maxrss_mib']:.0f} MiB | "
                         f"{(b['maxrss_mib'] / a['maxrss_mib'] - 1):+.1%} | {a['tree_peak_mib']:.0f} MiB | "
                         f"{b['tree_peak_mib']:.0f} MiB | {(b['tree_peak_mib'] / a['tree_peak_mib'] - 1):+.1%} |")
        lines += ["", "Main process: `/usr/bin/time -v` maximum resident set size (kernel high-water mark). Process "
                  "tree: the CLI and its decoding workers, summed, polled every 50 ms (pages the forked workers share "
                  "with the main process are counted in each)."]
        if res["startup"]:
            lines[-1] += f" The one-image run peaked at {res['startup']['maxrss_mib']:.0f} MiB (main process)."
    bad = [f"{k}: {r['rows']}" for k, r in res["runs"].items()
           if r["rows"]["malformed"] or r["rows"]["missing"] or r["rows"]["duplicates"]]
    lines += ["", "Every predictions CSV of the runs above has exactly one well-formed row per input." if not bad
              else f"CSV problems: {'; '.join(bad)}."]
    lines += ["", "## Resume", "",
              "| interruption | workers | complete rows before rerun | partial last line | rows skipped by the "
              "rerun | rows written by the rerun | rerun wall s | full run wall s | final rows | unique inputs "
              "| malformed rows | duplicates | missing inputs |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for rs in res["resume"]:
        lines.append(f"| {rs['mode']} | {rs['workers']} | {rs['complete_rows']} | "
                     f"{'yes' if rs['partial_last_line'] else 'no'} | {rs['skipped']} | {rs['written']} | "
                     f"{rs['rerun_s']:.2f} | {rs['full_s']:.2f} | {rs['rows']} | {rs['unique']} | {rs['malformed']} "
                     f"| {rs['duplicates']} | {rs['missing']} |")
    for rs in res["resume"]:
        if rs["rerun_rc"]:
            lines += ["", f"The rerun after \"{rs['mode']}\" exited with status {rs['rerun_rc']}: "
                      f"{' / '.join(rs['stderr_tail'])}"]
    lines += ["", "Malformed: a row with the wrong number of fields, or without probabilities and without an "
              "error. Missing: inputs with no well-formed row in the final CSV."]
    return lines


def set_threads(n: int | None) -> None:
    """Give this process and the CLI runs it starts ``n`` torch threads (``OMP_NUM_THREADS``)."""
    if n:
        import torch

        os.environ["OMP_NUM_THREADS"] = str(n)
        torch.set_num_threads(n)


def train_model(task: str, data: Path, out: Path, *, max_images: int, backbone: str | None = None,
                pretrained: str | None = None, extra: tuple[str, ...] = ()) -> float:
    """``pellucid train TASK --finetune linear-probe --epochs 1`` into ``out`` (subprocess); its wall seconds."""
    args = ["train", task, "--data", str(Path(data).resolve()), "--out", str(out), "--finetune", "linear-probe",
            "--epochs", "1", "--max-images", str(max_images), "--no-progress", *extra]
    if backbone:
        args += ["--backbone", backbone]
    if pretrained:
        args += ["--pretrained", pretrained]
    r = run_cli(args, poll=0.5)
    if r["rc"] != 0 or not (out / "card.json").exists():
        raise RuntimeError(f"training {task} failed (rc {r['rc']}):\n{r['stderr'][-3000:]}")
    return r["wall_s"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="nuclei", help="app whose sample data and model are used (default nuclei)")
    parser.add_argument("--model", type=Path, help="model folder to use (default: train runs/bench-predict-<task>)")
    parser.add_argument("--images", type=int, default=2000, help="inputs of the large run (default 2000)")
    parser.add_argument("--small", type=int, default=500, help="inputs of the memory comparison run (default 500)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="--workers values (default 0 2)")
    parser.add_argument("--threads", type=int, help="torch threads of the bench and of every CLI run it starts "
                        "(OMP_NUM_THREADS; default: torch's choice)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    set_threads(args.threads)

    from pellucid.core.quantize import cpu_features
    from pellucid.core.tasks import get_task

    task = get_task(args.task)
    data = DATA / task.default_data
    if not (data / "manifest.csv").exists():
        raise SystemExit(f"sample data {data} absent (expected ../shared/data beside the repository)")
    model = args.model
    trained = ""
    if model is None:
        model = ROOT / "runs" / f"bench-predict-{task.name}"
        if not (model / "card.json").exists():
            secs = train_model(task.name, data, model, max_images=600)
            trained = f", trained for this run in {secs:.0f} s"
    from pellucid.core.card import read_card

    card = read_card(model)
    note = (f"`{task.name}` {card.backbone_name} at "
            f"{card.image_size} px, linear probe on {card.split.train} training images "
            f"({model.relative_to(ROOT) if model.is_relative_to(ROOT) else model}{trained}); inputs: "
            f"{args.images} files of ../shared/data/{task.default_data} (seeded draw) as symlinks in one folder")
    files = input_files(data, args.images)
    res = measure(model, files, small=args.small, workers=tuple(args.workers), resume_workers=args.workers[0])
    write_table(table(res, note, cpu_features().summary()), args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
