"""The GPU check script (``bench/gpu_check.py``): its dry run exercises every step's wiring on the CPU
(train, predict, Grad-CAM, LIME, T-TAME, DDP) and writes the full table; without a GPU and without
``--dry-run`` it refuses in one line with a non-zero exit status."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bench import gpu_check
from tests.conftest import data_dir

ROOT = Path(__file__).resolve().parents[2]


def _table_rows(text: str) -> dict[str, list[str]]:
    """Step name → the cells of its row in the Markdown table."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if line.startswith("| ") and cells and cells[0] in gpu_check.STEPS:
            rows[cells[0]] = cells
    return rows


def test_dry_run_every_step_ok_and_table_written(tmp_path, capsys):
    data_dir(gpu_check.DRY.task)  # skips with a clear message when ../shared/data is absent
    out = tmp_path / "gpu_check.md"
    rc = gpu_check.main(["--dry-run", "--out", str(out)])
    printed = capsys.readouterr().out
    assert out.is_file(), "the dry run wrote no table"
    text = out.read_text()
    rows = _table_rows(text)
    assert list(rows) == list(gpu_check.STEPS), f"rows {list(rows)} in\n{text}"
    for step, cells in rows.items():
        status = cells[1]
        # the one documented skip: two processes sharing one GPU when neither NCCL nor Gloo can
        allowed = status == "ok" or (step == "ddp" and status.startswith("skipped: not possible"))
        assert allowed, f"step {step}: {status}\n{text}"
        assert len(cells) == 7, cells
    assert rc == 0, text
    assert "dry run on the CPU" in text and "- GPU:" in text and "- CPU:" in text and "torch " in text
    assert "| train | ok |" in printed  # the table is printed too
    # pellucid and its baseline both measured, in the same run
    for step in ("train", "predict", "gradcam", "lime"):
        assert rows[step][2] and rows[step][3] and rows[step][4] not in ("", "n/a"), rows[step]


def test_without_gpu_and_without_dry_run_refuses_in_one_line(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU visible, even on a GPU machine
    out = tmp_path / "never.md"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    assert proc.returncode != 0
    assert len(lines) == 1, lines
    assert "no CUDA GPU" in lines[0] and "--dry-run" in lines[0]
    assert not out.exists()


def test_dry_run_default_output_is_not_under_bench_results(monkeypatch):
    """Only a GPU run writes bench/results/gpu_check.md; a dry run without --out goes to a temp file."""
    seen = {}
    monkeypatch.setattr(gpu_check, "run_checks", lambda dry, out, *a, **k: seen.setdefault("out", Path(out)) and [])
    data_dir(gpu_check.DRY.task)
    assert gpu_check.main(["--dry-run"]) == 0
    assert gpu_check.OUT.parent not in seen["out"].parents
