"""End to end in a real headless Chromium: `streamlit run` the app, upload a chest X-ray, see the
predicted label, and every explanation with its colour bar, its legend and its plain-language caption.

Needs Debian's ``chromium`` (``apt-get install chromium``) and the ``playwright`` Python package (its
bundled driver only; no browser download: Debian's Chromium is launched by path). Skips, saying
which is missing, where either is absent.
"""
from __future__ import annotations

import re
import time

import pytest
from PIL import Image as PILImage

from pellucid.ui.headless import CHROMIUM_ARGS, find_chromium, predict_page, serve_app
from tests.conftest import data_dir


def chromium_path() -> str:
    """Debian's Chromium, or skip."""
    found = find_chromium()
    if found is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium); the browser test needs it")
    return found


@pytest.fixture
def server(model_dir, tmp_path):
    """``streamlit run`` on a free localhost port with the tiny model; yields the URL."""
    with serve_app(model_dir, tmp_path, timeout=30) as url:
        yield url


@pytest.mark.timeout(120)
def test_upload_shows_label_legend_and_plain_captions(model_dir, server):
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
            page = predict_page(browser, server, [image], timeout_ms=60_000)
            heading = page.get_by_role("heading", name=re.compile(r"^Predicted"))
            assert heading.first.inner_text().strip() == f"Predicted: {expected}"
            # every map: an image whose caption is its legend, and a colour bar drawn under the map
            maps = page.locator('[data-testid="stImage"]').filter(has_text=re.compile(r"^Grad-CAM — red: "))
            assert maps.count() == 1  # the card's one explainer
            caption = maps.first.inner_text()
            assert re.search(r"red: more influence on “(normal|tuberculosis)”; blue: less influence", caption)
            img = maps.first.locator("img")
            width, height = img.evaluate("img => [img.naturalWidth, img.naturalHeight]")
            with PILImage.open(image) as im:
                aspect = im.height / im.width
            assert width >= 320 and height > width * aspect + 20  # the colour bar strip under the map
            # the plain-language caption, the scores in words, the jargon behind "details"; the score
            # sentences are drawn after the map in the same slot, so they get the same wait as the map
            page.locator("small").filter(has_text="Removing the highlighted regions first").first.wait_for(
                timeout=30_000)
            body = page.locator("body").inner_text()
            assert "Grad-CAM shows where the network's last feature maps raised its score" in body
            assert "Removing the highlighted regions first" in body
            assert page.get_by_text("details", exact=True).count() >= 1
            assert page.get_by_text("How to read the explanations").count() == 1
            assert "deletion AUC" not in body  # closed expander: the numbers are one click away
            assert page.get_by_text("Deploy", exact=True).count() == 0  # Streamlit's developer toolbar is off
            page.get_by_text("details", exact=True).first.click()
            page.get_by_text("deletion AUC ↓").first.wait_for(timeout=10_000)
        finally:
            browser.close()
    assert time.monotonic() - start < 90


@pytest.mark.timeout(120)
def test_a_file_name_written_in_markdown_is_shown_as_it_is(model_dir, server, tmp_path):
    """A name is text, not Markdown: no link, no bold, no Streamlit colour directive in the page."""
    executable = chromium_path()
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (its driver only)")
    image = sorted((data_dir("tb_cxr") / "normal").glob("*.png"))[0]
    name = "[scan](mailto:x@example.com) www.example.com y@example.com **b** :red[c] $x$.png"
    hostile = tmp_path / name
    hostile.write_bytes(image.read_bytes())
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = predict_page(browser, server, [hostile], timeout_ms=60_000)
            heading = page.locator('[data-testid="stHeading"]').filter(has_text="scan").first
            assert heading.inner_text().strip().replace("\u2060", "") == name
            assert heading.locator("a[href*='example.com'], strong, b, .katex").count() == 0, heading.inner_html()
            assert page.locator("a[href*='example.com']").count() == 0
        finally:
            browser.close()
