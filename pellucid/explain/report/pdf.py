"""The PDF of a report. Where a Chromium browser is installed (Debian's ``chromium``), the PDF is the
report's own HTML (:func:`~.html.render_html`) printed by headless Chromium, so the PDF shows exactly
what the HTML shows, laid out by the same engine a reader's browser uses. Without Chromium, or when it
fails, the same report context is laid out with fpdf2 (:mod:`.fpdf_layout`). ``engine`` picks one of
the two on purpose. The HTML reaches Chromium as a file in a private temporary folder that is removed
afterwards, together with the browser profile; nothing is fetched from the network.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from pellucid.explain.report.fpdf_layout import render_pdf_layout
from pellucid.explain.report.html import render_html
from pellucid.explain.report.records import ReportError

__all__ = ["CHROMIUM_NAMES", "PDF_ENGINES", "chromium_path", "html_to_pdf", "render_pdf"]

log = logging.getLogger(__name__)

#: ``auto``: Chromium when installed, else fpdf2; ``chromium``: Chromium or an error; ``fpdf2``: the layout.
PDF_ENGINES = ("auto", "chromium", "fpdf2")
#: Executable names tried, in order, on ``PATH``.
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
_CHROMIUM_TIMEOUT = 120.0  # seconds for one report; a 3-input report takes about one


def chromium_path() -> str | None:
    """The first Chromium executable on ``PATH`` (see :data:`CHROMIUM_NAMES`), or None."""
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def html_to_pdf(html: str, browser: str, timeout: float = _CHROMIUM_TIMEOUT) -> bytes:
    """Print an HTML page to PDF bytes with headless Chromium (A4 from the page's ``@page`` rule).

    Args:
        html: a self-contained page (images embedded; nothing is fetched).
        browser: the Chromium executable, e.g. from :func:`chromium_path`.
        timeout: seconds before the browser is stopped.

    Raises:
        OSError: the browser could not be started, failed, or wrote no PDF.
        subprocess.TimeoutExpired: it did not finish within ``timeout`` (it is stopped).
    """
    with tempfile.TemporaryDirectory(prefix="pellucid-pdf-") as tmp:
        page, out = Path(tmp) / "report.html", Path(tmp) / "report.pdf"
        page.write_text(html, encoding="utf-8")
        cmd = [browser, "--headless", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
               "--disable-extensions", "--disable-dev-shm-usage", "--disable-background-networking",
               f"--user-data-dir={Path(tmp) / 'profile'}", "--no-pdf-header-footer", "--print-to-pdf-no-header",
               f"--print-to-pdf={out}", page.as_uri()]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
        rc, err = _run(cmd, timeout)
        if rc != 0 or not out.is_file() or out.stat().st_size == 0:
            last = next((line for line in reversed(err.splitlines()) if line.strip()), "no output")
            raise OSError(f"{Path(browser).name} exited with {rc} and wrote no PDF: {last[:200]}")
        return out.read_bytes()


def _run(cmd: list[str], timeout: float) -> tuple[int, str]:
    """Run ``cmd`` in its own process group; on timeout stop the whole group (the browser's helpers too)."""
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
        raise
    return proc.returncode, err.decode("utf-8", "replace")


def render_pdf(ctx: dict, engine: str = "auto") -> bytes:
    """The report as PDF bytes, from the same context as :func:`~.html.render_html`.

    Args:
        ctx: the report context of :func:`~.context.build_context`.
        engine: ``"auto"`` (the HTML printed by Chromium when it is installed and works, else the
            fpdf2 layout), ``"chromium"`` or ``"fpdf2"``.

    Raises:
        ReportError: an unknown engine, or ``engine="chromium"`` without a working Chromium.
    """
    if engine not in PDF_ENGINES:
        raise ReportError(f"unknown PDF engine {engine!r}: use one of {', '.join(PDF_ENGINES)}")
    if engine == "fpdf2":
        return render_pdf_layout(ctx)
    browser = chromium_path()
    if browser is None:
        if engine == "chromium":
            raise ReportError(f"no Chromium found on PATH (tried {', '.join(CHROMIUM_NAMES)}): install Debian's "
                              "chromium, or use engine='fpdf2'")
        return render_pdf_layout(ctx)
    try:
        return html_to_pdf(render_html({**ctx, "print": True}), browser)  # "details" printed open
    except (OSError, subprocess.SubprocessError) as err:
        if engine == "chromium":
            raise ReportError(f"Chromium could not print the report: {err}") from err
        log.warning("Chromium could not print the report (%s); using the fpdf2 layout", type(err).__name__)
        return render_pdf_layout(ctx)
