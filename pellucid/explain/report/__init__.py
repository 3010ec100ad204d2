"""Explanation reports: one image or a whole folder, as self-contained HTML and as PDF.

The package owns the path from files to a report, and the web app reuses every step of it; each
concern has its module:

- the one case pipeline: :func:`analyse_paths` / :func:`analyse_images` (:mod:`pellucid.core.pipeline`
  through :mod:`pellucid.explain.pipeline`) read inputs, predict them in batches (calibrated
  probabilities, the card's threshold policy) and check each one's domain; every input gets a
  :class:`Case`, unreadable ones with their error instead of stopping the run. :func:`explain_cases`
  computes the chosen explainers in batches, with their faithfulness scores (:mod:`.explainers`
  lists and checks their names).
- :mod:`.context`: :func:`build_context` turns cases + model card (:mod:`.card`) into one plain dict
  (PNG bytes for figures, :mod:`.figures`) that every renderer reads: :func:`render_html` (:mod:`.html`,
  jinja2 template, images embedded as base64) and :func:`render_pdf` (:mod:`.pdf`: that HTML printed by
  headless Chromium, or, without Chromium, the fpdf2 layout of :mod:`.fpdf_layout`).
- :mod:`.write`: :func:`write_report` (``pellucid report``) ties them together. A few inputs (up to
  ``detail_limit``) get a full section each: input, label, probability chart, threshold, overlays side
  by side with scores. More inputs get a folder summary (:mod:`.summary`): a table (also written as
  CSV), metrics with intervals and a confusion matrix when labels are known from the folder layout
  (sub-folders named like the card's classes), per-class galleries of the most and least confident
  cases, and SP-LIME picks when the explain package offers them.
- :mod:`.lungs`: chest X-ray models with a lung segmenter (the one the model card names for its
  ``lung-mask`` preprocessing, or a segmentation folder given as ``write_report(...,
  lung_segmenter=...)``) get the lung outline drawn on every explanation overlay, each overlay's lung
  share and border share beside it (:mod:`pellucid.explain.lungshare`), and, in folder reports, their
  means per explainer. Without a segmenter nothing of this appears.
- :mod:`.privacy`: DICOM identifying header values are never read into a report unless
  ``include_identifiers=True``, and a DICOM file's name is replaced by ``DICOM <sha256 prefix>`` (file
  names of clinical exports often carry names or IDs); error messages and log lines use that display
  name too.
"""
from __future__ import annotations

from pellucid.explain.report.card import (
    DEFAULT_INTENDED_USE,
    card_rows,
    intended_use,
    metric_rows,
    probability_text,
    threshold_text,
)
from pellucid.explain.pipeline import SCORE_METRICS as REPORT_METRICS
from pellucid.explain.pipeline import (
    analyse_images,
    analyse_paths,
    explain_cases,
    method_detail,
)
from pellucid.explain.report.context import build_context
from pellucid.explain.report.explainers import SCORE_LABELS, available_methods, score_items
from pellucid.explain.report.figures import overlay_rgb
from pellucid.explain.report.fpdf_layout import render_pdf_layout
from pellucid.explain.report.html import render_html
from pellucid.explain.report.lungs import attach_lung_masks, lung_segmenter_for, share_items
from pellucid.explain.report.pdf import PDF_ENGINES, chromium_path, html_to_pdf, render_pdf
from pellucid.explain.report.privacy import display_name, scrub_path, sha256_bytes
from pellucid.explain.report.records import Case, MethodResult, Progress, ReportError
from pellucid.explain.report.summary import SPLIME_LIME_SAMPLES, SPLIME_SAMPLE, select_gallery
from pellucid.explain.report.write import write_cases_csv, write_report

__all__ = [
    "DEFAULT_INTENDED_USE",
    "PDF_ENGINES",
    "REPORT_METRICS",
    "SCORE_LABELS",
    "SPLIME_LIME_SAMPLES",
    "SPLIME_SAMPLE",
    "Case",
    "MethodResult",
    "method_detail",
    "Progress",
    "ReportError",
    "analyse_images",
    "analyse_paths",
    "attach_lung_masks",
    "available_methods",
    "build_context",
    "card_rows",
    "chromium_path",
    "display_name",
    "explain_cases",
    "html_to_pdf",
    "intended_use",
    "lung_segmenter_for",
    "metric_rows",
    "overlay_rgb",
    "render_html",
    "render_pdf",
    "render_pdf_layout",
    "score_items",
    "scrub_path",
    "select_gallery",
    "share_items",
    "sha256_bytes",
    "probability_text",
    "threshold_text",
    "write_cases_csv",
    "write_report",
]
