"""The web app in a headless browser: serve it on a free localhost port and drive it with Chromium.

:func:`serve_app` runs ``streamlit run`` on the app in a child process (its own session, stopped with
its whole process group on exit) and yields the URL once Streamlit answers its health check;
:func:`find_chromium` finds Debian's Chromium; :func:`predict_page` opens the Predict page in
Playwright, uploads images and waits until every explanation placeholder is filled. The browser
test (``tests/ui/test_browser.py``) and the README screenshot (``python -m bench.screenshot``) use
them. Playwright is used with its driver only: the browser is the system's Chromium, launched by path.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from pellucid.ui.server import APP, streamlit_command

__all__ = ["APP", "CHROMIUM_ARGS", "find_chromium", "predict_page", "serve_app"]

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


def find_chromium() -> str | None:
    """``$PELLUCID_CHROMIUM``, Debian's ``/usr/bin/chromium``, or a Chromium on ``PATH``; None if none."""
    for candidate in (os.environ.get("PELLUCID_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


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


@contextmanager
def serve_app(model_dir: str | Path, workdir: str | Path, *, env: Mapping[str, str] | None = None,
              timeout: float = 60.0) -> Iterator[str]:
    """``streamlit run`` the web app with ``model_dir`` on 127.0.0.1 (a free port); yields its URL.

    Args:
        model_dir: the model folder the app starts with (``PELLUCID_MODEL``).
        workdir: the server's working folder (``runs/`` under it is where it looks for models).
        env: extra environment variables.
        timeout: seconds to wait for the health check.
    """
    port = _free_port()
    scratch = tempfile.mkdtemp(prefix="pellucid-ui-")  # as ``pellucid ui``: removed once the server stops
    full = dict(os.environ, PELLUCID_MODEL=str(model_dir), PELLUCID_RUNS=str(Path(workdir) / "runs"),
                PELLUCID_OFFLINE="1", TMPDIR=scratch, **dict(env or {}))
    cmd = streamlit_command(port)  # the flags ``pellucid ui`` runs with
    proc = subprocess.Popen(cmd, env=full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=workdir, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, timeout)
        yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=5)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(scratch, ignore_errors=True)


def predict_page(browser, url: str, images: Sequence[str | Path], *, viewport=(1400, 1000),
                 timeout_ms: int = 90_000):
    """Open the Predict page in a Playwright ``browser``, upload ``images`` and wait until the
    explanations are done (the status box says "Explained with …", or there is none to wait for).

    Returns:
        The Playwright page.
    """
    page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
    page.goto(url, wait_until="domcontentloaded")
    page.get_by_text("Intended use.").first.wait_for(timeout=timeout_ms)
    page.locator("input[type=file]").first.set_input_files([str(p) for p in images])
    page.get_by_role("heading", name="Predicted").first.wait_for(timeout=timeout_ms)
    page.get_by_text("Explained with").first.wait_for(timeout=timeout_ms)
    page.wait_for_function(
        "() => [...document.querySelectorAll('img')].every(i => i.complete && i.naturalWidth > 0)",
        timeout=timeout_ms)
    return page
