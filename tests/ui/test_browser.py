"""End to end in a real headless Chromium: `streamlit run` the app, upload a chest X-ray, see the
predicted label and an explanation overlay.

Needs Debian's ``chromium`` (``apt-get install chromium``) and the ``playwright`` Python package (its
bundled driver only; no browser download: Debian's Chromium is launched by path). Skips, saying
which is missing, where either is absent.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import data_dir

APP = Path(__file__).resolve().parents[2] / "pellucid" / "ui" / "app.py"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


def chromium_path() -> str:
    """Debian's Chromium, or skip."""
    for candidate in (os.environ.get("PELLUCID_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and Path(candidate).exists():
            return candidate
    pytest.skip("Chromium is not installed (Debian: apt-get install chromium); the browser test needs it")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with {proc.returncode}: {proc.stdout.read()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.read().strip() == b"ok":
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"streamlit did not answer on {url} within {timeout:.0f} s")


@pytest.fixture
def server(model_dir, tmp_path):
    """``streamlit run`` on a free localhost port with the tiny model; yields the URL."""
    port = _free_port()
    env = dict(os.environ, PELLUCID_MODEL=str(model_dir), PELLUCID_RUNS=str(tmp_path / "runs"),
               PELLUCID_OFFLINE="1")
    cmd = [sys.executable, "-m", "streamlit", "run", str(APP), "--server.port", str(port),
           "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false",
           "--server.fileWatcherType", "none", "--global.developmentMode", "false"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, timeout=30)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(120)
def test_upload_shows_label_and_overlay(model_dir, server):
    executable = chromium_path()
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (its driver only)")
    from pellucid.core.predict import Predictor
    from pellucid.explain.report import available_methods

    if "gradcam" not in available_methods():
        pytest.skip(f"the gradcam explainer is not available (have: {available_methods()})")
    image = sorted((data_dir("tb_cxr") / "tuberculosis").glob("*.png"))[0]
    expected = Predictor(model_dir).predict_paths([image])[0].label
    start = time.monotonic()
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(server, wait_until="domcontentloaded")
            page.get_by_text("Intended use.").first.wait_for(timeout=30_000)
            page.locator("input[type=file]").first.set_input_files(str(image))
            heading = page.get_by_role("heading", name=re.compile(r"^Predicted"))
            heading.first.wait_for(timeout=40_000)
            assert heading.first.inner_text().strip() == f"Predicted: {expected}"
            overlay = page.locator('[data-testid="stImage"]').filter(has_text=re.compile(r"^gradcam"))
            overlay.first.wait_for(timeout=40_000)
            img = overlay.first.locator("img")
            img.wait_for()
            page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=img.element_handle(),
                                   timeout=10_000)
            assert img.evaluate("img => img.naturalWidth") >= 64
        finally:
            browser.close()
    assert time.monotonic() - start < 60
