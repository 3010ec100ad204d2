"""The one ``streamlit run`` command line of the web app, shared by ``pellucid ui`` and the headless
server of the browser test and the screenshot (:func:`pellucid.ui.headless.serve_app`), so what they
show is what a user gets: no file watcher, no development mode, no usage statistics, the toolbar without
Streamlit's developer entries (its "Deploy" button), and no error details in the page (the incident id
only; the traceback goes to the server log). Imports nothing heavy: the command line calls it before
Streamlit is loaded."""
from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["APP", "streamlit_command"]

APP = Path(__file__).resolve().parent / "app.py"


def streamlit_command(port: int, host: str = "127.0.0.1") -> list[str]:
    """The argv that serves the web app on ``host:port`` with the current Python."""
    return [sys.executable, "-m", "streamlit", "run", str(APP), "--server.port", str(port),
            "--server.address", host, "--server.headless", "true", "--browser.gatherUsageStats", "false",
            "--client.toolbarMode", "minimal", "--client.showErrorDetails", "none",
            "--server.fileWatcherType", "none", "--global.developmentMode", "false"]
