"""Explanation reports (HTML + PDF): contents, folder summaries, privacy of DICOM inputs."""
from __future__ import annotations

import csv
import logging
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pellucid.explain import report
from tests.conftest import data_dir
from tests.ui.helpers import INTENDED_USE, PATIENT_ID, tiny_model_folder, write_dicom, write_png

IDENTIFYING = ("Doe", "Jane", "SECRET123", "19700101", "Hospital of Secrets", "House", "Gregory")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model_folder(tmp_path_factory.mktemp("report_model") / "model")


def _methods() -> list[str]:
    known = report.available_methods()
    if "gradcam" not in known:
        pytest.skip(f"the gradcam explainer is not available (have: {known})")
    return ["gradcam"]


def _visible_text(html: str) -> str:
    """HTML without embedded images (base64 can spell anything) and without tags."""
    html = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", html)
    return re.sub(r"<[^>]+>", " ", html)


def _pdf_text(pdf: Path) -> str:
    if shutil.which("pdftotext") is None:
        pytest.skip("pdftotext (Debian package poppler-utils) is not installed")
    return subprocess.run(["pdftotext", "-layout", str(pdf), "-"], check=True, capture_output=True,
                          text=True, timeout=60).stdout


def test_single_image_report(model_dir, tmp_path):
    src = data_dir("tb_cxr") / "tuberculosis"
    image = sorted(src.glob("*.png"))[0]
    html, pdf = report.write_report(model_dir, [image], methods=_methods(), out_dir=tmp_path)
    assert html.name == f"report-{image.stem}.html" and pdf.suffix == ".pdf"
    page = html.read_text()
    text = _visible_text(page)
    from pellucid.core.predict import Predictor

    label = Predictor(model_dir).predict_paths([image])[0].label
    assert f"Predicted: {label}" in text
    assert INTENDED_USE in text
    assert report.sha256_bytes(image.read_bytes()) in text
    assert "pellucid 0." in text and "test_resnet" in text and "gradcam" in text
    assert "[0.700, 0.900]" in text  # card metrics with their interval
    # self-contained: every image is embedded, nothing is fetched
    assert not re.search(r"""(src|href)=["']?(https?:|//|file:)""", page)
    assert len(re.findall(r'src="data:image/png;base64,', page)) >= 3  # input, probabilities, overlay
    pdf_text = _pdf_text(pdf)
    assert f"Predicted: {label}" in pdf_text and "Intended use" in pdf_text and "gradcam" in pdf_text


def test_pdf_renders_to_png_with_the_label(model_dir, tmp_path):
    if shutil.which("pdftoppm") is None:
        pytest.skip("pdftoppm (Debian package poppler-utils) is not installed")
    image = write_png(tmp_path / "in" / "grey.png", seed=3)
    html, pdf = report.write_report(model_dir, [image], methods=[], out_dir=tmp_path / "out")
    subprocess.run(["pdftoppm", "-r", "50", "-f", "1", "-l", "1", "-png", str(pdf), str(tmp_path / "page")],
                   check=True, timeout=60)
    png = tmp_path / "page-1.png"
    from PIL import Image

    with Image.open(png) as im:
        assert im.size[0] > 300 and im.size[1] > 400
        assert len(set(im.convert("L").getdata())) > 10  # not a blank page
    label = re.search(r"Predicted: (\w+)", _visible_text(html.read_text())).group(1)
    assert f"Predicted: {label}" in _pdf_text(pdf)


def test_dicom_report_has_no_identifiers(model_dir, tmp_path, caplog):
    dcm = write_dicom(tmp_path / "in" / f"Doe_Jane_{PATIENT_ID}.dcm")
    caplog.set_level(logging.INFO)  # (pellucid.datasets.readers logs file names at DEBUG)
    html, pdf = report.write_report(model_dir, [dcm], methods=[], out_dir=tmp_path / "out")
    sha = report.sha256_bytes(dcm.read_bytes())
    assert html.name == f"report-DICOM_{sha[:12]}.html"
    text, pdf_text = _visible_text(html.read_text()), _pdf_text(pdf)
    for secret in IDENTIFYING:
        assert secret not in text, secret
        assert secret not in pdf_text, secret
        assert secret not in caplog.text, secret
    assert f"DICOM {sha[:12]}" in text and "Predicted:" in pdf_text and "windowed" in text
    # asked for, they are there (so the check above can fail)
    html2, pdf2 = report.write_report(model_dir, [dcm], methods=[], out_dir=tmp_path / "out2",
                                      include_identifiers=True)
    assert "Doe^Jane" in _visible_text(html2.read_text()) and PATIENT_ID in _pdf_text(pdf2)


def test_a_dicom_that_says_text_is_burned_into_its_pixels_is_reported_with_a_caveat(model_dir, tmp_path):
    """Header redaction cannot remove a name burned into the pixels (ultrasound banners, secondary captures): when
    the file says so (Burned In Annotation YES), the report says so beside its pictures, in HTML and PDF."""
    from html import unescape

    from pellucid.explain.captions import BURNED_IN_CAVEAT

    burned = write_dicom(tmp_path / "in" / "burned.dcm", burned_in="YES")
    plain = write_dicom(tmp_path / "in2" / "plain.dcm", burned_in="NO")
    html, pdf = report.write_report(model_dir, [burned], methods=[], out_dir=tmp_path / "out")
    assert BURNED_IN_CAVEAT in unescape(_visible_text(html.read_text()))
    assert "Burned-in text: this DICOM says text is burned into its pixels" in " ".join(_pdf_text(pdf).split())
    html, pdf = report.write_report(model_dir, [plain], methods=[], out_dir=tmp_path / "out2")
    assert "Burned-in text" not in _visible_text(html.read_text()) and "Burned-in text" not in _pdf_text(pdf)
    written = report.write_report(model_dir, [burned, plain], methods=[], out_dir=tmp_path / "out3")
    pdf = next(p for p in written if p.suffix == ".pdf")
    assert "1 of the 2 images say text is burned into their pixels" in " ".join(_pdf_text(pdf).split())


def test_unreadable_dicom_error_hides_file_name(model_dir, tmp_path):
    folder = tmp_path / "in"
    write_dicom(folder / f"Doe_{PATIENT_ID}.dcm", pixels=False)
    write_png(folder / "ok.png")
    html, pdf, csv_path = report.write_report(model_dir, [folder], methods=[], out_dir=tmp_path / "out")
    text = _visible_text(html.read_text()) + _pdf_text(pdf) + csv_path.read_text()
    assert "no pixel data" in text and PATIENT_ID not in text and "Doe" not in text


def test_folder_report_with_labels(model_dir, tmp_path, monkeypatch):
    from pellucid.explain.report import summary  # where the SP-LIME section reads them

    monkeypatch.setattr(summary, "SPLIME_SAMPLE", 2)  # LIME is slow on CPU; two images exercise the pick
    monkeypatch.setattr(summary, "SPLIME_LIME_SAMPLES", 20)
    src = data_dir("tb_cxr")
    folder = tmp_path / "set"
    for cls in ("normal", "tuberculosis"):
        (folder / cls).mkdir(parents=True)
        for f in sorted((src / cls).glob("*.png"))[:6]:
            shutil.copy(f, folder / cls)
    (folder / "normal" / "broken.png").write_bytes(b"not an image")
    write_png(folder / "unsorted" / "photo.png", colour=True)
    methods = _methods()
    html, pdf, csv_path = report.write_report(model_dir, [folder], methods=methods, out_dir=tmp_path / "out",
                                              gallery_size=1, splime_per_class=1)
    assert (html.name, pdf.name, csv_path.name) == ("report.html", "report.pdf", "predictions.csv")
    with csv_path.open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 14
    by_name = {r["path"]: r for r in rows}
    assert by_name["normal/broken.png"]["error"] and by_name["normal/broken.png"]["label"] == ""
    assert by_name["unsorted/photo.png"]["domain"] == "out_of_domain"  # colourful photo, CXR task
    assert "colours" in by_name["unsorted/photo.png"]["domain_reason"]
    assert by_name["unsorted/photo.png"]["true_label"] == ""
    assert sum(r["true_label"] == "tuberculosis" for r in rows) == 6
    text = _visible_text(html.read_text())
    assert "Metrics on 12 labelled input(s)" in text and "balanced_accuracy" in text
    assert "confusion matrix" in text and "most confident" in text
    assert "SP-LIME picks" in text and re.search(r"LIME \(20 samples\) on 2 of 12 in-domain inputs", text)
    assert ", lime overlay" in html.read_text()  # the picks show their LIME explanation
    pdf_text = _pdf_text(pdf)
    assert "Metrics on 12 labelled" in pdf_text and "All inputs" in pdf_text


def test_folder_without_labels_has_no_metrics(model_dir, tmp_path):
    folder = tmp_path / "plain"
    for i in range(3):
        write_png(folder / f"{i}.png", seed=i)
    html, _, _ = report.write_report(model_dir, [folder], methods=[], out_dir=tmp_path / "out")
    text = _visible_text(html.read_text())
    assert "Summary" in text and "Metrics on" not in text
    assert text.count("Input: ") == 3  # few inputs: one full section each


def test_report_errors(model_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(report.ReportError, match="no image or DICOM files"):
        report.write_report(model_dir, [tmp_path / "empty"], out_dir=tmp_path / "out")
    with pytest.raises(report.ReportError, match="alpha"):
        report.write_report(model_dir, [tmp_path / "empty"], out_dir=tmp_path / "out", alpha=2.0)
    if "gradcam" in report.available_methods():
        with pytest.raises(report.ReportError, match="did you mean 'gradcam'"):
            report.write_report(model_dir, [write_png(tmp_path / "a.png")], methods=["gradcan"], out_dir=tmp_path)


def test_card_rows_and_threshold_text():
    card = {"task": "tb", "title": "TB", "classes": ["normal", "tuberculosis"], "positive_class": "tuberculosis",
            "threshold": {"policy": "youden", "value": 0.4321, "positive_class": "tuberculosis"},
            "backbone": {"name": "efficientnet_lite0"}, "weights": {"source": "offline", "detail": "wheel"},
            "calibration": {"temperature": 1.5, "ece_before": 0.12, "ece_after": 0.03}}
    rows = dict(report.card_rows(card))
    assert rows["Decision"] == "tuberculosis if P(tuberculosis) ≥ 0.432, else the other class (policy: youden)"
    assert rows["Weights"] == "offline — wheel" and rows["Calibration"] == "temperature 1.50; ECE 0.120 → 0.030"
    smoothed = dict(report.card_rows({**card, "calibration": {"temperature": 1.02, "label_smoothing": 1 / 16}}))
    assert smoothed["Calibration"] == ("temperature 1.02; fitted with label smoothing 1/16 (every validation image "
                                       "ranked right)")
    assert report.threshold_text({"threshold": {"policy": "argmax"}}) == "highest probability wins (policy: argmax)"
    assert report.intended_use({}) == report.DEFAULT_INTENDED_USE
    assert report.metric_rows({"metrics": {"auroc": {"value": 0.9, "low": None, "high": None}}}) == [
        ("auroc", "0.900", "")]


# ----------------------------------------------------------------------------- lung outlines and shares
def _overlay_pngs(html: str, method: str = "gradcam") -> list:
    """The decoded overlay images of ``method`` embedded in a report."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    found = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)" alt="' + re.escape(method) + r' overlay[^"]*">', html)
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB")) for b in found]


def _magenta(png) -> int:
    from pellucid.explain.overlay import OUTLINE_COLOR

    return int((png == OUTLINE_COLOR).all(axis=2).sum())


def test_report_with_lung_segmenter_shows_outline_and_shares(model_dir, tmp_path):
    from tests.ui.helpers import bright_segmenter, write_lungs_png

    methods = _methods()
    folder = tmp_path / "in"
    for i in range(2):
        write_lungs_png(folder / f"cxr{i}.png", seed=i)
    html, pdf, _ = report.write_report(model_dir, [folder], methods=methods, out_dir=tmp_path / "out",
                                       lung_segmenter=bright_segmenter())
    page = html.read_text()
    text = _visible_text(page)
    overlays = _overlay_pngs(page)
    assert len(overlays) == 2 and all(_magenta(o) > 20 for o in overlays)  # the outline on every overlay
    assert text.count("lung share:") == 2 and text.count("lung area:") == 2  # next to each overlay
    assert "Magenta line" in text and "Where the explanations fall" in text  # and the folder average
    table = re.search(r'<table class="lung-shares">(.*?)</table>', page, re.S).group(1)
    assert re.search(r"<td>gradcam</td><td class=\"num\">2</td><td class=\"num\">\d+\.\d%</td>", table)
    if shutil.which("pdftotext"):
        pdf_text = _pdf_text(pdf)
        assert "Where the explanations fall" in pdf_text and "lung share" in pdf_text


def test_report_without_segmenter_has_no_outline(model_dir, tmp_path):
    from tests.ui.helpers import write_lungs_png

    image = write_lungs_png(tmp_path / "cxr.png")
    html, _ = report.write_report(model_dir, [image], methods=_methods(), out_dir=tmp_path / "out")
    page = html.read_text()
    assert "lung share" not in page and "Magenta" not in page
    assert [_magenta(o) for o in _overlay_pngs(page)] == [0]


def test_report_uses_the_model_cards_segmenter(tmp_path):
    from pellucid.core.predict import Predictor
    from tests.ui.helpers import tiny_masked_model_folder, tiny_segmenter_folder, write_lungs_png

    seg = tiny_segmenter_folder(tmp_path / "seg")
    model = tiny_masked_model_folder(tmp_path / "model", seg)
    found, name = report.lung_segmenter_for(Predictor(model))
    assert found is not None and name == "seg"
    html, _ = report.write_report(model, [write_lungs_png(tmp_path / "cxr.png")], methods=_methods(),
                                  out_dir=tmp_path / "out")
    text = _visible_text(html.read_text())
    assert "lung area:" in text and "Magenta line" in text and re.search(r"segmented by\s+seg\b", text)


def test_lung_segmenter_refused_for_other_modalities_and_bad_folders(model_dir, tmp_path):
    from types import SimpleNamespace

    from tests.ui.helpers import bright_segmenter

    photo = SimpleNamespace(card={"modality": "photo", "task": "mpox", "preprocessing": {}}, masker=None,
                            folder=tmp_path)
    assert report.lung_segmenter_for(photo) == (None, None)  # nothing asked, nothing used
    with pytest.raises(report.ReportError, match="outlines chest X-rays"):
        report.lung_segmenter_for(photo, bright_segmenter())
    cxr = SimpleNamespace(card={"modality": "CXR", "task": "tb", "preprocessing": {}}, masker=None, folder=tmp_path)
    with pytest.raises(report.ReportError, match="without a segmenter"):
        report.lung_segmenter_for(cxr, model_dir)  # a classifier folder is not a segmenter


def test_cli_report_takes_a_segmenter(model_dir, tmp_path, capsys):
    from pellucid.cli import main
    from tests.ui.helpers import tiny_segmenter_folder, write_lungs_png

    seg = tiny_segmenter_folder(tmp_path / "seg")
    image = write_lungs_png(tmp_path / "cxr.png")
    assert main(["report", "--model", str(model_dir), "--methods", _methods()[0], "--segmenter", str(seg),
                 "--out", str(tmp_path / "out"), str(image)]) == 0
    html = next(p for p in (tmp_path / "out").rglob("*.html"))
    assert "lung area:" in _visible_text(html.read_text())
    assert main(["report", "--model", str(model_dir), "--segmenter", str(model_dir), str(image),
                 "--out", str(tmp_path / "bad")]) == 2  # a classifier folder is not a segmenter: one line
    err = capsys.readouterr().err.strip()
    assert "segmenter" in err and "\n" not in err


def test_method_detail_says_which_precision_made_the_lime_map():
    check = {"images": 16, "mean_abs_diff": 0.0061, "max_abs_diff": 0.017, "passed": True}
    assert report.method_detail({}) == ""  # Grad-CAM and friends: nothing varies per image
    assert report.method_detail({"precision": "float32"}) == "passes in float32"
    kept = report.method_detail({"precision": "bfloat16", "bfloat16_check": check})
    assert kept == "passes in bfloat16; bfloat16 check on 16 copies: mean |Δp| 0.006, max 0.017 (kept)"
    rejected = report.method_detail({"precision": "float32", "int8_check": {**check, "passed": False}})
    assert rejected.startswith("passes in float32; int8 check") and rejected.endswith("(rejected, float32 used)")


def test_lime_overlay_caption_shows_its_precision(model_dir, tmp_path):
    if "lime" not in report.available_methods():
        pytest.skip("the lime explainer is not available")
    folder = tmp_path / "in"
    write_png(folder / "a.png")
    paths = report.write_report(model_dir, [folder], methods=["lime"], out_dir=tmp_path / "out")
    html, pdf = (next(p for p in paths if p.suffix == ext) for ext in (".html", ".pdf"))
    text = _visible_text(html.read_text())
    assert re.search(r"passes in (float32|bfloat16)", text), text[-2000:]
    assert "passes in" in _pdf_text(pdf)


# ----------------------------------------------------------------------------- PDF engines
@pytest.fixture(scope="module")
def single_context(model_dir):
    """The report context of one readable image (no explainers) and its predicted label."""
    from pellucid.core.predict import Predictor
    from pellucid.explain.report import analyse_paths, build_context

    predictor = Predictor(model_dir)
    cases = analyse_paths(predictor, [sorted((data_dir("tb_cxr") / "normal").glob("*.png"))[0]])
    return build_context(predictor, cases), cases[0].label


def _bytes_text(pdf: bytes, tmp_path: Path) -> str:
    path = tmp_path / "r.pdf"
    path.write_bytes(pdf)
    return _pdf_text(path)


# what the HTML says of a single input, which every PDF must say too
_SHARED_PHRASES = ("Intended use", "Decision rule", "calibrated probabilities", "SHA-256", "Model", "Held-out metrics")


@pytest.mark.parametrize("engine", ["chromium", "fpdf2"])
def test_pdf_engines_show_the_html_content(single_context, tmp_path, engine):
    from pellucid.explain.report import chromium_path, render_html, render_pdf

    if engine == "chromium" and chromium_path() is None:
        pytest.skip("Chromium (Debian package chromium) is not installed")
    ctx, label = single_context
    pdf = render_pdf(ctx, engine=engine)
    assert pdf.startswith(b"%PDF-")
    text, html = _bytes_text(pdf, tmp_path), _visible_text(render_html(ctx))
    for phrase in (f"Predicted: {label}", *_SHARED_PHRASES):
        assert phrase in html and phrase in text, phrase
    sha = ctx["cases"][0]["sha256"]  # long monospace words may wrap in either PDF
    assert sha in html and sha in re.sub(r"\s+", "", text)
    # only fpdf2 numbers its pages in a footer: the engine asked for is the one that ran
    assert ("page 1/" in text) == (engine == "fpdf2")


def test_pdf_falls_back_to_fpdf2_without_a_working_chromium(single_context, tmp_path, monkeypatch, caplog):
    from pellucid.explain.report import ReportError, pdf, render_pdf

    ctx, label = single_context
    monkeypatch.setattr(pdf, "chromium_path", lambda: None)  # not installed
    text = _bytes_text(render_pdf(ctx), tmp_path)
    assert f"Predicted: {label}" in text and "page 1/" in text
    with pytest.raises(ReportError, match="no Chromium found"):
        render_pdf(ctx, engine="chromium")
    false = shutil.which("false")
    if false is None:
        pytest.skip("no 'false' executable to stand in for a failing browser")
    monkeypatch.setattr(pdf, "chromium_path", lambda: false)  # installed but failing
    caplog.set_level(logging.WARNING)
    text = _bytes_text(render_pdf(ctx), tmp_path)
    assert f"Predicted: {label}" in text and "page 1/" in text
    assert "Chromium could not print the report" in caplog.text
    with pytest.raises(ReportError, match="Chromium could not print"):
        render_pdf(ctx, engine="chromium")
    with pytest.raises(ReportError, match="unknown PDF engine 'weasy'"):
        render_pdf(ctx, engine="weasy")


@pytest.mark.parametrize("p, text", [(0.99997, "> 99.9%"), (0.5, "50.0%"), (0.0004, "< 0.1%"), (1.0, "100.0%"),
                                     (None, ""), (float("nan"), "")])
def test_probabilities_never_round_to_certainty(p, text):
    assert report.probability_text(p) == text


# ----------------------------------------------------------------------------- legible explanations
def test_report_overlays_have_colour_bars_plain_words_and_details(model_dir, tmp_path):
    import numpy as np

    from pellucid.explain.overlay import colorize

    image = write_png(tmp_path / "in" / "x.png", seed=3)
    html, pdf = report.write_report(model_dir, [image], methods=_methods(), out_dir=tmp_path / "out")
    page = html.read_text()
    text = _visible_text(page)
    # a colour bar under the map: some row of the picture runs from the map's blue to its red
    (png,) = _overlay_pngs(page)
    lo, hi = (np.round(colorize(np.array([[v]]))[0, 0] * 255) for v in (0.0, 1.0))
    assert any(np.abs(r[8].astype(float) - lo).max() < 30 and np.abs(r[-9].astype(float) - hi).max() < 30
               for r in png[png.shape[0] // 2:])
    assert re.search(r'alt="gradcam overlay with colour bar: red more influence on “(normal|tuberculosis)”, '
                     r'blue less influence"', page)
    # plain words first, the jargon behind "details"
    assert "Grad-CAM shows where the network" in text
    assert "Removing the highlighted regions first" in text
    details = re.search(r"<details><summary>details</summary>(.*?)</details>", page, re.S).group(1)
    assert "deletion AUC ↓" in details and "method: gradcam" in details
    assert "deletion AUC" not in _visible_text(re.sub(r"<details>.*?</details>", "", page, flags=re.S))
    assert "How to read the explanations" in text and "Not a diagnosis" in text
    if shutil.which("pdftotext"):  # printed with the details open
        assert "deletion AUC" in _pdf_text(pdf) and "Removing the highlighted" in _pdf_text(pdf)


def test_report_notes_a_blank_map(model_dir, tmp_path):
    import numpy as np

    from pellucid.core.predict import Predictor
    from pellucid.explain.report import MethodResult, analyse_paths, build_context, render_html

    predictor = Predictor(model_dir)
    (case,) = analyse_paths(predictor, [write_png(tmp_path / "b.png", seed=1)])
    case.explanations = [MethodResult("occlusion", np.zeros((80, 80), np.float32), {},
                                      extras={"target_name": case.label})]
    text = _visible_text(render_html(build_context(predictor, [case], methods=["occlusion"])))
    assert "This map is blank" in text and "barely changed when patches were hidden" in text


def test_threshold_drawn_on_the_positive_class_only(tmp_path):
    """The dashed threshold mark crosses the positive class's bar, never the other one."""
    import numpy as np
    from PIL import Image

    from pellucid.core.plots import plot_probabilities

    def mark_rows(positive: int):
        path = plot_probabilities([0.3, 0.7], ["normal", "tb"], tmp_path / f"p{positive}.png", threshold=0.2,
                                  positive_index=positive)
        a = np.asarray(Image.open(path).convert("RGB")).astype(int)
        red = (a[..., 0] > 180) & (a[..., 1] < 90) & (a[..., 2] < 90)
        col = int(np.argmax(red.sum(axis=0)))  # the vertical mark's column (the legend sample is horizontal)
        return np.nonzero(red[:, col])[0]

    top, bottom = mark_rows(0), mark_rows(1)  # the axis is inverted: class 0's bar is drawn on top
    assert len(top) > 5 and len(bottom) > 5
    assert top.max() < bottom.min()  # each mark crosses its own bar only; a full-height line would overlap
    with pytest.raises(ValueError, match="positive_index"):
        plot_probabilities([0.2, 0.3, 0.5], ["a", "b", "c"], tmp_path / "x.png", threshold=0.5)


def test_metric_rows_show_the_too_few_note_instead_of_an_interval():
    from pellucid.explain.report.card import metric_rows

    rows = metric_rows({"metrics": {"accuracy": {"value": 1.0, "low": None, "high": None,
                                                 "note": "too few labelled inputs (n=2; need ≥ 10)"},
                                    "auroc": {"value": 0.91, "low": 0.85, "high": 0.95}}})
    assert rows[0] == ("accuracy", "1.000", "too few labelled inputs (n=2; need ≥ 10)")
    assert rows[1] == ("auroc", "0.910", "[0.850, 0.950]")
