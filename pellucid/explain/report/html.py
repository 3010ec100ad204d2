"""The HTML rendering of a report: one self-contained page from the report context
(:func:`~.context.build_context`), with the jinja2 template ``pellucid/explain/templates/report.html.j2``
and every image embedded as a base64 PNG.
"""
from __future__ import annotations

import base64
from pathlib import Path

from pellucid.explain.report.card import probability_text

__all__ = ["render_html"]

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"


def _datauri(png: bytes | None) -> str:
    return "data:image/png;base64," + base64.b64encode(png or b"").decode("ascii")


def render_html(ctx: dict) -> str:
    """The report as one self-contained HTML page (images embedded as base64 PNG)."""
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    env = Environment(loader=FileSystemLoader(str(TEMPLATES)),
                      autoescape=select_autoescape(["html", "j2"]), trim_blocks=True, lstrip_blocks=True)
    env.filters["datauri"] = _datauri
    env.filters["pct"] = probability_text
    return env.get_template("report.html.j2").render(**ctx)
