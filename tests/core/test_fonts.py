"""Tests for pellucid.core.fonts: text in scripts DejaVu Sans lacks is drawn, not boxes."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from pellucid.core.fonts import _dejavu, fallback_fonts, font_file_for


def _needs_cjk_font() -> None:
    if not fallback_fonts(["結核"]):
        pytest.skip("no installed font has Chinese characters (Debian package fonts-noto-cjk; `make install` "
                    "installs it as root)")


def test_latin_text_keeps_dejavu_and_needs_no_fallback() -> None:
    assert font_file_for("tuberculosis ◀ low: normal — 0.93") == _dejavu()
    assert fallback_fonts(["tuberculosis", "normal"]) == []


def test_a_colour_bar_draws_a_class_named_in_chinese_in_its_own_characters() -> None:
    """Two different characters that DejaVu lacks were drawn as the same empty box: their colour bars were the
    same picture. Drawn in a font that has them, they differ."""
    from pellucid.explain.overlay import colorbar_strip

    _needs_cjk_font()
    first, second = colorbar_strip(400, "結", "正"), colorbar_strip(400, "核", "常")
    assert first.shape == second.shape
    assert not np.array_equal(first, second)
    assert font_file_for("結核") != _dejavu()


def test_plots_draw_class_names_in_chinese_and_hindi_without_missing_glyphs(tmp_path: Path) -> None:
    from pellucid.core.plots import plot_confusion, plot_probabilities

    _needs_cjk_font()
    if not fallback_fonts(["छाती"]):
        pytest.skip("no installed font has Devanagari (Debian package fonts-noto-core)")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns "Glyph ... missing from font(s) DejaVu Sans"
        a = plot_probabilities([0.3, 0.7], ["結", "छा"], tmp_path / "a.png")
        b = plot_probabilities([0.3, 0.7], ["核", "ती"], tmp_path / "b.png")
        plot_confusion(np.array([[3, 1], [0, 4]]), ["正常", "結核"], tmp_path / "cm.png")
    assert not np.array_equal(np.asarray(PILImage.open(a)), np.asarray(PILImage.open(b)))


def test_the_fpdf2_report_embeds_a_font_for_a_file_named_in_japanese() -> None:
    pytest.importorskip("fpdf")
    from pellucid.explain.report.fpdf_layout import _PDF

    _needs_cjk_font()
    doc = _PDF("胸部X線 report", "footer", ["胸部X線_患者.png"])
    doc.heading("Input: 胸部X線_患者.png")
    pdf = bytes(doc.pdf.output())
    fonts = set(re.findall(rb"/BaseFont\s*/[A-Z]{6}\+([A-Za-z0-9-]+)", pdf))
    assert any(b"DejaVu" not in name for name in fonts), fonts
