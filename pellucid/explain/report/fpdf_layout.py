"""The hand-built PDF layout of a report (fpdf2, A4, DejaVu fonts from matplotlib so any text renders),
drawn from the same report context as the HTML (:func:`~.context.build_context`): the same sections,
texts, tables and figures, in a layout of its own. :mod:`.pdf` uses it when no Chromium is there to
print the HTML itself.
"""
from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Sequence

import pellucid
from pellucid.core.fonts import fallback_fonts
from pellucid.explain.report.card import probability_text

__all__ = ["render_pdf_layout"]

_OUTLINE_TEXT = ("Magenta line: the lungs as segmented by {name}. Lung share: the share of the map's mass "
                 "inside them (compare with the lung area, a uniform map's share); border share: on the "
                 "image's outer 8% band, where markers and burned-in text sit.")
_LUNG_SHARE_TEXT = ("Lungs segmented by {name}. Means over the explained inputs; all-zero maps have no share "
                    "and are counted apart. A model that looks at the lungs puts well more than the lung area "
                    "inside them.")


class _PDF:
    """A thin layer over fpdf2 with the report's few building blocks."""

    def __init__(self, title: str, footer: str, texts: Sequence[str] = ()):
        from fpdf import FPDF
        from matplotlib import get_data_path

        fonts = Path(get_data_path()) / "fonts" / "ttf"
        outer = self

        class Doc(FPDF):
            def footer(self):  # noqa: D401 - fpdf2 hook
                self.set_y(-12)
                self.set_font("DejaVu", "", 7)
                self.set_text_color(120)
                self.cell(0, 5, f"{outer.footer_text}  ·  page {self.page_no()}/{{nb}}", align="C")
                self.set_text_color(0)

        self.footer_text = footer
        self.pdf = Doc(format="A4")
        self.pdf.set_title(title)
        self.pdf.set_creator(f"pellucid {pellucid.__version__}")
        self.pdf.add_font("DejaVu", "", str(fonts / "DejaVuSans.ttf"))
        self.pdf.add_font("DejaVu", "B", str(fonts / "DejaVuSans-Bold.ttf"))
        # characters DejaVu lacks (a file or class named in Chinese or Hindi) from installed fonts that have them
        fallbacks = []
        for i, path in enumerate(fallback_fonts(list(texts))):
            try:
                self.pdf.add_font(f"Fallback{i}", "", path)
                fallbacks.append(f"Fallback{i}")
            except Exception as err:  # noqa: BLE001 - a font fpdf2 cannot embed is passed over
                logging.getLogger(__name__).debug("font %s not usable in the PDF (%s)", path, type(err).__name__)
        if fallbacks:
            self.pdf.set_fallback_fonts(fallbacks, exact_match=False)
        self.pdf.set_auto_page_break(True, margin=15)
        self.pdf.set_margins(15, 15, 15)
        self.pdf.add_page()
        self.width = self.pdf.w - 30

    def heading(self, text: str, size: int = 13) -> None:
        if self.pdf.will_page_break(20):
            self.pdf.add_page()
        self.pdf.ln(2)
        self.pdf.set_font("DejaVu", "B", size)
        self.pdf.multi_cell(0, size * 0.5, text, new_x="LMARGIN", new_y="NEXT")
        self.pdf.ln(1)

    def text(self, text: str, size: int = 9, bold: bool = False, colour: tuple[int, int, int] | None = None) -> None:
        self.pdf.set_font("DejaVu", "B" if bold else "", size)
        if colour:
            self.pdf.set_text_color(*colour)
        self.pdf.multi_cell(0, size * 0.5, text, new_x="LMARGIN", new_y="NEXT")
        self.pdf.set_text_color(0)

    def banner(self, text: str, fill: tuple[int, int, int], colour: tuple[int, int, int]) -> None:
        self.pdf.set_font("DejaVu", "B", 9)
        self.pdf.set_fill_color(*fill)
        self.pdf.set_text_color(*colour)
        self.pdf.multi_cell(0, 5.5, text, fill=True, padding=2, new_x="LMARGIN", new_y="NEXT")
        self.pdf.set_text_color(0)
        self.pdf.set_fill_color(255)
        self.pdf.ln(2)

    def table(self, rows: Sequence[Sequence[str]], widths: Sequence[float] | None = None, header: bool = True,
              size: int = 8) -> None:
        if not rows:
            return
        self.pdf.set_font("DejaVu", "", size)
        with self.pdf.table(col_widths=widths, first_row_as_headings=header, line_height=size * 0.55,
                            text_align="LEFT", borders_layout="HORIZONTAL_LINES",
                            headings_style=_headings_style()) as t:
            for r in rows:
                row = t.row()
                for cell in r:
                    row.cell(str(cell))
        self.pdf.ln(2)

    def images(self, items: Sequence[tuple[bytes, str]], max_h: float = 70.0) -> None:
        """PNG images side by side, each with a caption under it."""
        from PIL import Image as PILImage

        items = [(png, cap) for png, cap in items if png]
        if not items:
            return
        gap = 4.0
        n = len(items)
        slot = (self.width - gap * (n - 1)) / n
        sizes = []
        for png, _ in items:
            w, h = PILImage.open(io.BytesIO(png)).size
            dw = min(slot, max_h * w / h)
            sizes.append((dw, dw * h / w))
        lines = max(cap.count("\n") + 1 for _, cap in items)
        row_h = max(h for _, h in sizes) + 3 + 3.5 * lines
        if self.pdf.will_page_break(row_h):
            self.pdf.add_page()
        y0 = self.pdf.get_y()
        x = self.pdf.l_margin
        for (png, cap), (w, h) in zip(items, sizes):
            self.pdf.image(io.BytesIO(png), x=x + (slot - w) / 2, y=y0, w=w, h=h)
            self.pdf.set_xy(x, y0 + h + 1)
            self.pdf.set_font("DejaVu", "", 7)
            self.pdf.multi_cell(slot, 3.3, cap, align="C")
            x += slot + gap
        self.pdf.set_xy(self.pdf.l_margin, y0 + row_h)

    def output(self) -> bytes:
        # fontTools logs every table of the font subset at INFO; quiet it for this call only
        quiet = logging.getLogger("fontTools")
        level = quiet.level
        quiet.setLevel(max(level, logging.WARNING))
        try:
            return bytes(self.pdf.output())
        finally:
            quiet.setLevel(level)


def _headings_style():
    from fpdf.fonts import FontFace

    return FontFace(emphasis="BOLD", fill_color=(235, 239, 245))


def _strings(value: object, limit: int = 100_000) -> list[str]:
    """The texts of a report context (its nested dicts and lists), at most ``limit`` of them."""
    out: list[str] = []
    stack = [value]
    while stack and len(out) < limit:
        item = stack.pop()
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return out


def render_pdf_layout(ctx: dict) -> bytes:
    """The report as PDF bytes (same content as the HTML, laid out for A4 with fpdf2)."""
    doc = _PDF(ctx["title"], f"pellucid {ctx['version']} · {ctx['generated']}", _strings(ctx))
    doc.heading(ctx["title"], 15)
    doc.banner("Intended use: " + ctx["intended_use"], (255, 243, 205), (102, 77, 3))
    doc.text(f"Generated {ctx['generated']} by pellucid {ctx['version']}.", 8, colour=(90, 90, 90))
    if ctx.get("ood_method") == "heuristic":
        doc.text("Out-of-domain check: heuristics only (this model folder has no in-domain reference).", 8,
                 colour=(90, 90, 90))
    for note in ctx.get("notes", []):
        doc.text("Note: " + note, 8, colour=(150, 60, 0))
    if ctx.get("methods") and ctx.get("how_to_read"):
        doc.text("How to read the explanations", 9, bold=True)
        for head, text in ctx["how_to_read"]:
            doc.text(f"• {head}. {text}", 8)
    s = ctx.get("summary")
    if s:
        _summary(doc, ctx, s)
    for c in ctx["cases"]:
        _case(doc, ctx, c)

    doc.heading("Model")
    doc.table([("field", "value"), *ctx["card_rows"]], widths=(40, 140))
    if ctx["card_metrics"]:
        n = f" (test split, n = {ctx['card_metrics_n']})" if ctx["card_metrics_n"] else ""
        doc.text("Held-out metrics" + n, 9, bold=True)
        doc.table([("metric", "value", "95% CI"), *ctx["card_metrics"]], widths=(40, 25, 40))
    return doc.output()


def _summary(doc: _PDF, ctx: dict, s: dict) -> None:
    """The folder summary: counts, metrics, galleries, lung shares, SP-LIME picks and the table."""
    doc.heading("Summary")
    doc.text(f"{s['n']} input(s): {s['n_ok']} predicted, {s['n_error']} unreadable, "
             f"{s['n_flagged']} flagged out of domain. Predicted: "
             + ", ".join(f"{k} {n}" for k, n in s["counts"]) + ".")
    if s.get("metrics"):
        m = s["metrics"]
        doc.heading(f"Metrics on {m['n']} labelled input(s) (labels from folder names)", 11)
        doc.table([("metric", "value", "95% CI"), *m["rows"]], widths=(40, 25, 40))
        for w in m["warnings"]:
            doc.text(w, 7, colour=(150, 60, 0))
        doc.images([(m["confusion_png"], "confusion matrix")], max_h=75)
    for g in s.get("galleries", []):
        doc.heading(f"Predicted {g['cls']}", 11)
        for part, cards in (("most confident", g["most"]), ("least confident", g["least"])):
            if cards:
                doc.text(part, 8, bold=True)
                doc.images([(c["png"], _card_caption(c)) for c in cards], max_h=45)
    if s.get("lung_shares"):
        doc.heading("Where the explanations fall", 11)
        doc.text(_LUNG_SHARE_TEXT.format(name=ctx.get("lung_segmenter") or "a lung segmenter"), 8)
        doc.table([("explainer", "maps", "mean lung share", "mean lung area", "mean border share", "empty maps"),
                   *[(r["method"], str(r["n"] - r["n_empty"]), r["lung_share"], r["lung_fraction"],
                      r["border_share"], str(r["n_empty"])) for r in s["lung_shares"]]],
                  widths=(30, 15, 32, 32, 35, 25))
    if s.get("splime") is not None:
        doc.heading("SP-LIME picks", 11)
        if s["splime"]["note"]:
            doc.text(s["splime"]["note"], 8)
        doc.images([(c["png"], _card_caption(c)) for c in s["splime"]["cards"]], max_h=45)
    doc.heading("All inputs", 11)
    head = ["input", "true", "predicted", *[f"P({k})" for k in s["classes"]], "check"]
    rows = [head]
    for r in s["rows"]:
        check = r["error"] or ("" if r["ood"] == "ok" else r["ood"])
        rows.append([r["name"], r["true_label"], r["label"],
                     *["" if p is None else f"{p:.3f}" for p in r["probs"]], check])
    k = len(s["classes"])
    w = min(18.0, 54.0 / k)
    doc.table(rows, widths=(50, 22, 22, *[w] * k, 180 - 94 - w * k), size=7)
    if s["rows_left_out"]:
        doc.text(f"{s['rows_left_out']} more row(s) in {s['csv_name'] or 'the CSV'}.", 8)


def _case(doc: _PDF, ctx: dict, c: dict) -> None:
    """One input's full section: prediction, checks, figures, overlays and the metadata table."""
    doc.heading(f"Input: {c['name']}")
    if c["error"]:
        doc.text("Could not be read: " + c["error"], colour=(160, 0, 0))
        return
    top = [p for _, p, is_top in c["probs"] if is_top]
    label_line = f"Predicted: {c['label']}" + (f"  ({probability_text(top[0])})" if top else "")
    if c.get("true_label"):
        label_line += f"   ·   folder label: {c['true_label']}"
    doc.text(label_line, 12, bold=True)
    ood = c.get("ood")
    if ood and ood["flagged"]:
        doc.banner("Flagged — " + ood["text"] + ". Do not use this prediction.", (248, 215, 218), (114, 28, 36))
    elif ood and ood["uncertain"]:
        doc.text("Low confidence: the top probability is close to chance.", 8, colour=(150, 60, 0))
    if c.get("burned_in"):
        doc.text(c["burned_in"], 8, colour=(150, 60, 0))
    doc.text("Decision rule: " + ctx["threshold"], 8)
    doc.images([(c.get("input_png"), "input" + (" (windowed)" if c["is_dicom"] else "")),
                (c["prob_png"], "calibrated probabilities")], max_h=60)
    if c["overlays"]:
        doc.text(f"Explanations of '{c['label']}' (overlay opacity {ctx['alpha']:.2f})", 9, bold=True)
        if ctx.get("outline") and any(o.get("shares") for o in c["overlays"]):
            doc.text(_OUTLINE_TEXT.format(name=ctx["lung_segmenter"]), 8, colour=(90, 90, 90))
        doc.images([(o.get("png"), _overlay_caption(o)) for o in c["overlays"] if o.get("png")], max_h=60)
        for o in c["overlays"]:
            if not o.get("png"):
                doc.text(f"{o['method']}: {o['note'] or 'no heatmap'}", 8, colour=(150, 60, 0))
                continue
            doc.text(f"{o.get('title', o['method'])}: " + " ".join([o.get("sentence", ""), *o.get("scores_text", [])]), 8)
            for n in o.get("notes", []):
                doc.text("Note: " + n, 8, colour=(150, 60, 0))
    rows = [("field", "value"), ("SHA-256", c["sha256"]), *c["meta"]]
    if ood:
        rows.append(("domain check", f"{ood['text']} ({ood['method']}): "
                     + ", ".join(f"{k} {v}" for k, v in ood["scores"])))
    rows.extend(c["identifiers"])
    doc.table(rows, widths=(35, 145), size=7)


def _card_caption(c: dict) -> str:
    cap = f"{c['name']}\n{c['label']} {probability_text(c['confidence'])}"
    if c["true_label"]:
        cap += f" · true {c['true_label']}" + (" ✓" if c["correct"] else " ✗")
    if c["ood"]:
        cap += "\nflagged: out of domain"
    return cap


def _overlay_caption(o: dict) -> str:
    """Under the picture: the method and the technical numbers (the plain sentences follow the row)."""
    cap = o.get("title", o["method"]) + ("\n" + ", ".join(f"{k} {v}" for k, v in o["scores"]) if o["scores"] else "")
    if o.get("shares"):
        cap += "\n" + ", ".join(f"{k} {v}" for k, v in o["shares"])
    if o.get("detail"):
        cap += "\n" + o["detail"]
    return cap
