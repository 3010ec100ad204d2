"""Writing a report to files (``pellucid report``): :func:`write_report` runs the case pipeline on files
and folders, builds the report context and writes the HTML, the PDF and, for several inputs, the
prediction table as CSV (:func:`write_cases_csv`).
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Sequence

from pellucid.core.card import as_card
from pellucid.core.ood import load_reference
from pellucid.core.pipeline import CaseWriter, PipelineError
from pellucid.core.runs import refuse_model_folder
from pellucid.explain.pipeline import analyse_paths, explain_cases
from pellucid.explain.report.context import build_context
from pellucid.explain.report.explainers import _check_methods, available_methods
from pellucid.explain.report.html import render_html
from pellucid.explain.report.lungs import lung_segmenter_for
from pellucid.explain.report.pdf import render_pdf
from pellucid.explain.report.records import Case, Progress, ReportError

__all__ = ["write_cases_csv", "write_report"]

log = logging.getLogger(__name__)


def write_cases_csv(path: str | Path, cases: Sequence[Case], classes: Sequence[str]) -> Path:
    """The predictions CSV of every door (:class:`~pellucid.core.pipeline.CaseWriter`), with the
    folder label and the input's SHA-256 added (display names as path)."""
    with CaseWriter(path, classes, extra=("true_label", "sha256")) as w:
        for c in cases:
            w.write(c)
    return Path(path)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "input"


def write_report(model_dir: str | Path, paths: Sequence[str | Path], methods: Sequence[str] | None = None,
                 out_dir: str | Path = "runs/report", include_identifiers: bool = False, *, alpha: float = 0.5,
                 batch_size: int = 16, detail_limit: int = 8, gallery_size: int = 3, splime_per_class: int = 2,
                 progress: Progress | None = None, lung_segmenter: str | Path | None = None) -> list[Path]:
    """Write the HTML and PDF report of images or folders (``pellucid report``).

    Args:
        model_dir: model folder.
        paths: image / DICOM files and folders (searched recursively).
        methods: explainer names; default the card's explainers that are installed.
        out_dir: where to write.
        include_identifiers: show DICOM file names and identifying tags (off by default).
        alpha: overlay opacity in [0, 1].
        detail_limit: inputs up to which every input gets its own section.
        splime_per_class: SP-LIME picks per predicted class in larger folders (0 turns them off).
        lung_segmenter: segmentation model folder for lung outlines and lung shares (chest X-ray
            models only); None uses the model card's segmenter when it names one, else none.

    Returns:
        ``[html, pdf]`` for one input (``report-<name>.html/.pdf``), ``[html, pdf, csv]`` for several
        (``report.html``, ``report.pdf``, ``predictions.csv``).

    Raises:
        ReportError: no images found, an unknown explainer name, or an unusable lung segmenter.
    """
    from pellucid.core.predict import Predictor

    if not 0.0 <= alpha <= 1.0:
        raise ReportError(f"alpha={alpha} is not an opacity: give a value in [0, 1]")
    predictor = Predictor(model_dir)
    card = predictor.card
    segmenter, segmenter_name = lung_segmenter_for(predictor, lung_segmenter)
    notes: list[str] = []
    if methods is None:
        known = available_methods()
        methods = [m for m in as_card(card).explainers if m in known]
        missing = [m for m in as_card(card).explainers if m not in known]
        if missing:
            notes.append(f"explainers not installed: {', '.join(missing)}")
    else:
        methods = _check_methods([m for m in methods if m])
    refuse_model_folder(out_dir, "a report")  # before any work
    reference = load_reference(model_dir)
    inputs = [Path(p) for p in paths]
    try:
        cases = analyse_paths(predictor, inputs, include_identifiers=include_identifiers,
                              keep_images=False, reference=reference, batch_size=batch_size, progress=progress)
    except PipelineError as err:
        raise ReportError(str(err)) from None
    log.info("report: %d input(s), %d unreadable", len(cases), sum(1 for c in cases if c.error))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    detailed = len(cases) <= detail_limit
    if detailed:
        notes.extend(explain_cases(predictor, cases, methods, batch_size=min(batch_size, 8), progress=progress))
    csv_path = out / "predictions.csv" if len(cases) > 1 else None
    ctx = build_context(predictor, cases, methods=methods, alpha=alpha, include_identifiers=include_identifiers,
                        detail_limit=detail_limit, gallery_size=gallery_size,
                        splime_per_class=0 if detailed else splime_per_class, notes=notes,
                        csv_name=csv_path.name if csv_path else None, progress=progress,
                        segmenter=segmenter, segmenter_name=segmenter_name)
    stem = "report" if len(cases) > 1 else f"report-{_slug(Path(cases[0].name).stem)}"
    html, pdf = out / f"{stem}.html", out / f"{stem}.pdf"
    html.write_text(render_html(ctx), encoding="utf-8")
    pdf.write_bytes(render_pdf(ctx))
    written += [html, pdf]
    if csv_path is not None:
        written.append(write_cases_csv(csv_path, cases, predictor.classes))
    return written
