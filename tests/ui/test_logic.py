"""The web app's Streamlit-free logic: uploads, DICOM windows, zips, model folders, caches, tables."""
from __future__ import annotations

import html
import io
import os
import re
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pellucid.ui import logic
from tests.ui.helpers import PATIENT_ID, PATIENT_NAME, write_dicom, write_png


def _bytes(path: Path) -> bytes:
    return path.read_bytes()


def test_read_upload_png(tmp_path):
    up = logic.read_upload("chest.png", _bytes(write_png(tmp_path / "a.png")))
    assert up.error == "" and up.name == "chest.png" and not up.is_dicom
    assert up.image.array.shape == (80, 80, 3) and up.image.array.dtype == np.float32
    assert 0.0 <= up.image.array.min() and up.image.array.max() <= 1.0
    assert len(up.sha256) == 64 and "path" not in up.meta


@pytest.mark.parametrize("name", ["doc.txt", "scans.zip", "frame.gif"])
def test_an_unread_file_gets_the_same_line_uploaded_as_on_disk(tmp_path, name):
    """The upload's temporary file keeps its suffix, so the web app says what the command line says of the file
    (before, an upload's "doc.txt" was "unsupported file type '(no suffix)'", and a zip was told to be converted)."""
    from pellucid.datasets.readers import ImageReadError, read_image

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("a.png", b"1")
    path = tmp_path / name
    path.write_bytes(buf.getvalue())
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    on_disk = str(err.value).replace(str(path), name)
    assert logic.read_upload(name, path.read_bytes()).error == on_disk
    assert ("is an archive" in on_disk) == name.endswith(".zip") and "(no suffix)" not in on_disk


def test_an_rle_upload_that_panics_the_compiled_decoder_is_one_line_and_its_window_sliders_are_left_out(
    tmp_path, capfd
):
    """A damaged RLE frame panics pylibjpeg-rle (Rust): the upload is the readers' line and has no window range
    (a panic passes ``except Exception``); nothing is printed."""
    from tests.conftest import rle_dicom_that_panics

    source, damaged = rle_dicom_that_panics(tmp_path)
    capfd.readouterr()
    up = logic.read_upload("scan.dcm", damaged.read_bytes())
    assert "could not be decoded (PanicException)" in up.error and up.image is None and up.dicom_range is None
    assert capfd.readouterr().err == ""
    assert logic.read_upload("scan.dcm", source.read_bytes()).dicom_range is not None


def test_the_window_sliders_come_from_the_readers_without_decoding_the_frame_again(tmp_path, monkeypatch):
    """The sliders' range had come from a second decode of the upload with pydicom, past every check of the
    readers (the pixel limit, the compressed frame's own header) and at full size in float64. It comes from what
    the readers recorded now; the file's own window stays the sliders' start when another window is asked for."""
    import pydicom.dataset
    import pydicom.pixels

    data = _bytes(write_dicom(tmp_path / "ct.dcm"))
    calls = []
    for owner, name in ((pydicom.pixels, "pixel_array"), (pydicom.dataset.Dataset, "convert_pixel_data")):
        real = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, real=real, **k: calls.append(1) or real(*a, **k))
    up = logic.read_upload("ct.dcm", data)
    assert calls == [] and up.error == ""
    r = up.dicom_range
    assert (r.center, r.width) == (0.0, 1000.0)
    assert (r.low, r.high) == up.image.meta["value_range"] and r.low < -400 and r.high > 400
    narrow = logic.read_upload("ct.dcm", data, window=(0.0, 200.0)).dicom_range
    assert (narrow.center, narrow.width) == (0.0, 1000.0) and (narrow.low, narrow.high) == (r.low, r.high)


def test_an_upload_of_another_format_under_a_png_name_gets_the_readers_line(tmp_path, monkeypatch):
    """The upload's header check reads only the formats the readers decode: a GIF named ``.png`` larger than the
    upload budget was "too large" in the web app and "its content is GIF" on the command line."""
    from PIL import Image as PILImage

    from pellucid.datasets.readers import ImageReadError, read_image

    path = tmp_path / "frame.png"
    PILImage.new("L", (200, 200)).save(path, format="GIF")
    monkeypatch.setenv("PELLUCID_MAX_UPLOAD_PIXELS", "1000")
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    on_disk = str(err.value).replace(str(path), path.name)
    assert "its content is GIF, not PNG" in on_disk
    assert logic.read_upload(path.name, path.read_bytes()).error == on_disk


def test_an_upload_flooded_with_metadata_chunks_is_refused_without_pillow_parsing_them(tmp_path, monkeypatch):
    """The upload's header check opened a PNG with Pillow, which parses every chunk before the pixels (a million
    text chunks: 5 s per 15 MB, before the readers refused the file); it now checks the chunk count first and
    gets the command line's line; no PNG is opened by Pillow, under its own name or as ``.dcm``."""
    import struct
    import zlib

    from PIL import Image as PILImage
    from PIL import PngImagePlugin

    from pellucid.datasets.readers import ImageReadError, read_image

    PILImage.new("RGB", (8, 8)).save(tmp_path / "a.png")
    png = (tmp_path / "a.png").read_bytes()
    text = b"tEXt" + b"k\0v"
    chunk = struct.pack(">I", 3) + text + struct.pack(">I", zlib.crc32(text))
    opened: list[int] = []
    real_open = PngImagePlugin.PngImageFile._open

    def spy(self):  # type: ignore[no-untyped-def]
        opened.append(1)
        return real_open(self)

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "_open", spy)
    for name in ("flood.png", "flood.dcm"):
        path = tmp_path / name
        path.write_bytes(png[:33] + chunk * 10_001 + png[33:])
        with pytest.raises(ImageReadError) as err:
            read_image(path)
        up = logic.read_upload(name, path.read_bytes())
        assert up.image is None and up.error
        if name.endswith(".png"):
            assert "more than 10,000 metadata chunks" in up.error
            assert up.error == str(err.value).replace(str(path), name)
    assert opened == []


@pytest.mark.parametrize("name, data, expected", [
    ("notes.png", b"this is text, not a picture", "notes.png: "),
    ("empty.png", b"", "empty.png is empty"),
    ("doc.txt", b"hello", "unsupported file type"),
])
def test_read_upload_bad_files_give_one_line(name, data, expected):
    up = logic.read_upload(name, data)
    assert up.image is None
    assert expected in up.error
    assert "\n" not in up.error and "pellucid-upload-" not in up.error  # no temp path leaks


def test_read_upload_truncated_png(tmp_path):
    data = _bytes(write_png(tmp_path / "a.png", size=200))
    up = logic.read_upload("cut.png", data[: len(data) // 2])
    assert up.image is None and up.error.startswith("cut.png")


def test_read_upload_size_limit(tmp_path, monkeypatch):
    data = _bytes(write_png(tmp_path / "a.png"))
    up = logic.read_upload("big.png", data, max_bytes=100)
    assert up.image is None and "over the 0 MB limit" in up.error
    monkeypatch.setenv("PELLUCID_MAX_UPLOAD_MB", "0.001")
    assert logic.max_upload_bytes() == 1048
    assert "limit" in logic.read_upload("big.png", data).error


def test_read_upload_dicom_hides_name_and_reads_window(tmp_path):
    data = _bytes(write_dicom(tmp_path / "Doe_Jane_SECRET123.dcm"))
    up = logic.read_upload("Doe_Jane_SECRET123.dcm", data)
    assert up.error == "" and up.is_dicom
    assert up.name == f"DICOM {up.sha256[:12]}" and PATIENT_ID not in up.name
    assert up.identifiers == {}
    r = up.dicom_range
    assert (r.center, r.width) == (0.0, 1000.0)  # the file's own window
    assert r.low < -400 and r.high > 400
    # a narrower window gives more contrast
    narrow = logic.read_upload("x.dcm", data, window=(0.0, 200.0))
    assert narrow.image.array.std() > up.image.array.std()
    named = logic.read_upload("Doe_Jane_SECRET123.dcm", data, include_identifiers=True)
    assert named.name == "Doe_Jane_SECRET123.dcm"
    assert named.identifiers["PatientName"] == PATIENT_NAME and named.identifiers["PatientID"] == PATIENT_ID


def test_read_upload_dicom_without_pixels(tmp_path):
    data = _bytes(write_dicom(tmp_path / "nopix.dcm", pixels=False))
    up = logic.read_upload("Doe.dcm", data)
    assert up.image is None and "no pixel data" in up.error
    assert "Doe" not in up.error and up.error.startswith("DICOM ")


def test_extract_zip(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("set/normal/a.png", _bytes(write_png(tmp_path / "a.png")))
        zf.writestr("__MACOSX/set/._a.png", b"junk")
    out = logic.extract_zip(buf.getvalue(), tmp_path / "x")
    assert (out / "set" / "normal" / "a.png").exists()
    assert not (out / "__MACOSX").exists()


def test_extract_zip_refuses_escape_and_non_zip(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("../evil.png", b"x")
    with pytest.raises(logic.UploadError, match="outside the folder"):
        logic.extract_zip(buf.getvalue(), tmp_path / "x")
    assert not (tmp_path / "evil.png").exists()
    with pytest.raises(logic.UploadError, match="not a zip"):
        logic.extract_zip(b"plain bytes", tmp_path / "y")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(3):
            zf.writestr(f"{i}.png", b"x")
    with pytest.raises(logic.UploadError, match="3 files, over the limit of 2"):
        logic.extract_zip(buf.getvalue(), tmp_path / "z", max_files=2)


def test_find_model_folders_newest_first(tmp_path, monkeypatch):
    for i, name in enumerate(["old", "new", "nested/deep"]):
        card = tmp_path / "runs" / name / "card.json"
        card.parent.mkdir(parents=True)
        card.write_text("{}")
        os.utime(card, (time.time() - 100 + i * 10,) * 2)
    (tmp_path / "runs" / "no_card").mkdir()
    found = logic.find_model_folders(tmp_path / "runs")
    assert [p.relative_to(tmp_path / "runs").as_posix() for p in found] == ["nested/deep", "new", "old"]
    assert logic.find_model_folders(tmp_path / "missing") == []
    monkeypatch.delenv("PELLUCID_MODEL", raising=False)
    assert logic.default_model(tmp_path / "runs") == str(found[0])
    monkeypatch.setenv("PELLUCID_MODEL", "/some/model")
    assert logic.default_model(tmp_path / "runs") == "/some/model"


def test_model_plots(model_dir):
    assert [t for t, _ in logic.model_plots(model_dir)] == ["Confusion matrix"]


def test_uploads_to_cases_table_and_csv(model_dir, tmp_path):
    from pellucid.core.predict import Predictor

    predictor = Predictor(model_dir)
    ups = [logic.read_upload("a.png", _bytes(write_png(tmp_path / "a.png", seed=1))),
           logic.read_upload("bad.png", b"nope"),
           logic.read_upload("b.png", _bytes(write_png(tmp_path / "b.png", seed=2)))]
    cases = logic.uploads_to_cases(predictor, ups)
    assert [c.name for c in cases] == ["a.png", "bad.png", "b.png"]
    assert cases[1].error and cases[1].label is None
    for c in (cases[0], cases[2]):
        assert c.label in predictor.classes
        assert sum(c.probs.values()) == pytest.approx(1.0, abs=1e-5)
        assert c.ood is not None and c.ood.method == "heuristic"
    # the same numbers as the CLI's predictor
    ref = predictor.predict_images([ups[0].image])[0]
    assert cases[0].probs == pytest.approx(ref.probs, abs=1e-6) and cases[0].label == ref.label
    rows = logic.cases_table(cases, predictor.classes)
    assert list(rows[0]) == ["input", "folder label", "predicted", "P(normal)", "P(tuberculosis)", "domain check",
                             "error"]
    assert rows[1]["P(normal)"] is None and rows[1]["error"]
    text = logic.csv_bytes(cases, predictor.classes).decode()
    lines = text.strip().splitlines()
    assert lines[0].startswith("path,label,prob_normal,prob_tuberculosis,domain,domain_reason,error") and len(lines) == 4


def test_explanation_cache_computes_once(model_dir, tmp_path, monkeypatch):
    from pellucid.core.predict import Predictor
    from pellucid.explain.report import MethodResult

    calls = []

    def fake_explain(predictor, cases, methods, **kw):
        calls.append((len(cases), tuple(methods)))
        for c in cases:
            c.explanations.append(MethodResult(methods[0], np.full((4, 4), 0.5, np.float32), {"s": 1.0}))
        return []

    monkeypatch.setattr(logic, "explain_cases", fake_explain)
    predictor = Predictor(model_dir)
    ups = [logic.read_upload(f"{i}.png", _bytes(write_png(tmp_path / f"{i}.png", seed=i))) for i in range(3)]
    cases = logic.uploads_to_cases(predictor, ups)
    cache = logic.ExplanationCache()
    progress = []
    cache.attach(predictor, cases, ["a", "b"], "m1", progress=lambda f, t: progress.append(f))
    assert calls == [(3, ("a",)), (3, ("b",))]
    assert [r.method for r in cases[0].explanations] == ["a", "b"]
    again = logic.uploads_to_cases(predictor, ups)
    cache.attach(predictor, again, ["b"], "m1")
    assert len(calls) == 2 and [r.method for r in again[0].explanations] == ["b"]
    cache.attach(predictor, again, ["b"], "m2")  # another model version recomputes
    assert len(calls) == 3


def test_report_files_of_what_is_on_screen(model_dir, tmp_path):
    from pellucid.core.predict import Predictor

    predictor = Predictor(model_dir)
    dcm = _bytes(write_dicom(tmp_path / "Doe.dcm"))
    ups = [logic.read_upload("Doe_Jane_SECRET123.dcm", dcm, window=(0.0, 300.0)),
           logic.read_upload("b.png", _bytes(write_png(tmp_path / "b.png", seed=2)))]
    cases = logic.uploads_to_cases(predictor, ups)
    html, pdf = logic.report_files(predictor, cases, methods=[], alpha=0.3)
    assert pdf.startswith(b"%PDF") and html.startswith("<!DOCTYPE html>")
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", html)  # base64 can spell anything
    for secret in ("Doe", "Jane", PATIENT_ID):
        assert secret not in text
    assert f"DICOM {ups[0].sha256[:12]}" in html and "b.png" in html
    assert "centre 0, width 300 (chosen)" in html
    assert html.count('class="case"') == 2 and "Summary" in html


# ----------------------------------------------------------------------------- lung outline and share
def test_explanation_view_outlines_the_lungs(model_dir, tmp_path, monkeypatch):
    from pellucid.core.predict import Predictor
    from pellucid.explain.overlay import OUTLINE_COLOR, draw_outline
    from pellucid.explain.report import MethodResult, overlay_rgb
    from tests.ui.helpers import bright_segmenter, write_lungs_png

    predictor = Predictor(model_dir)
    ups = [logic.read_upload(f"{i}.png", _bytes(write_lungs_png(tmp_path / f"{i}.png", seed=i))) for i in range(2)]
    cases = logic.uploads_to_cases(predictor, ups)
    heat = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    result = MethodResult("gradcam", heat, {"deletion_auc": 0.25}, extras={"target_name": "tuberculosis"})
    view = logic.explanation_view(cases[0], result, 0.5)  # no segmenter: the plain overlay
    plain = view.overlay
    np.testing.assert_array_equal(plain, overlay_rgb(cases[0].image, heat, 0.5))
    assert view.caption == "Grad-CAM — red: more influence on “tuberculosis”; blue: less influence"
    assert view.image.shape[1] >= 320 and view.image.shape[0] > view.image.shape[1]  # the colour bar underneath
    details = dict(view.reading.details)
    assert details["deletion AUC ↓"] == "0.250" and "lung share" not in details
    assert any(s.startswith("Removing the highlighted regions first") for s in view.reading.scores)
    lime = logic.explanation_view(cases[0], MethodResult("lime", heat, {}, detail="passes in bfloat16"), 0.5)
    assert dict(lime.reading.details)["computed"] == "passes in bfloat16" and "evidence for" in lime.caption

    calls = []
    real = logic.attach_lung_masks
    monkeypatch.setattr(logic, "attach_lung_masks", lambda seg, todo: calls.append(len(todo)) or real(seg, todo))
    masks = logic.LungMaskCache()
    assert masks.attach(bright_segmenter(), cases, "seg") == []
    assert all(c.lung_mask is not None and c.lung_mask.shape == (80, 80) for c in cases)
    view = logic.explanation_view(cases[0], result, 0.5)
    rgb = view.overlay
    assert rgb.shape == (80, 80, 3)
    np.testing.assert_array_equal(rgb, draw_outline(plain, cases[0].lung_mask))
    assert (rgb == OUTLINE_COLOR).all(axis=2).sum() > 20
    details = dict(view.reading.details)
    assert all(re.fullmatch(r"\d+\.\d%", details[k]) for k in ("lung share", "lung area", "border share")), details
    off = logic.explanation_view(cases[0], result, 0.5, outline=False)
    np.testing.assert_array_equal(off.overlay, plain)
    assert off.reading.details == view.reading.details  # the share is shown either way
    empty = logic.explanation_view(cases[0], MethodResult("gradcam", np.zeros((64, 64), np.float32)), 0.5)
    assert dict(empty.reading.details)["lung share"] == "n/a (empty map)"
    assert empty.reading.notes[0].startswith("This map is blank")
    again = logic.uploads_to_cases(predictor, ups)  # a rerun: masks come from the cache
    masks.attach(bright_segmenter(), again, "seg")
    assert calls == [2, 0] and np.array_equal(again[1].lung_mask, cases[1].lung_mask)
    with pytest.raises(ValueError, match="no heatmap"):
        logic.explanation_view(cases[0], MethodResult("lime", None, {}, "failed"), 0.5)


def test_explanation_cache_streams_one_method_at_a_time(model_dir, tmp_path, monkeypatch):
    from pellucid.core.predict import Predictor
    from pellucid.explain.report import MethodResult

    def fake_explain(predictor, cases, methods, **kw):
        for c in cases:
            c.explanations.append(MethodResult(methods[0], np.full((4, 4), 0.5, np.float32), {}))
        return [f"{methods[0]} note"]

    monkeypatch.setattr(logic, "explain_cases", fake_explain)
    predictor = Predictor(model_dir)
    ups = [logic.read_upload(f"{i}.png", _bytes(write_png(tmp_path / f"{i}.png", seed=i))) for i in range(2)]
    cases = logic.uploads_to_cases(predictor, ups)
    seen = []
    for method, notes in logic.ExplanationCache().stream(predictor, cases, ["a", "b"], "m"):
        seen.append((method, notes, [[r.method for r in c.explanations] for c in cases]))
    assert seen == [("a", ["a note"], [["a"], ["a"]]), ("b", ["b note"], [["a", "b"], ["a", "b"]])]


def test_a_model_cards_images_are_not_fetched_by_the_model_page(tmp_path):
    """A model folder may come from anyone: an image in its MODEL_CARD.md was fetched by the browser from the
    host it named as soon as the Model page opened (checked with Chromium against a local server). Every image
    is now a plain link; the rest of the card, links included, is unchanged."""
    markdown = pytest.importorskip("markdown")
    card = ("# Card\n\n![a](http://host/a.png) \\\\![b](http://host/b.png) ![c][r] \\![d](http://host/d.png)\n\n"
            "See [the paper](https://example.org/p).\n\n[r]: http://host/c.png\n")
    assert markdown.markdown(card).count("<img") == 3  # what the page had rendered
    (tmp_path / "MODEL_CARD.md").write_text(card, encoding="utf-8")
    shown = logic.model_card_markdown(tmp_path)
    rendered = markdown.markdown(shown)
    assert "<img" not in rendered
    assert '<a href="https://example.org/p">the paper</a>' in rendered and "<h1>Card</h1>" in rendered
    assert shown == ("# Card\n\n\\![a](http://host/a.png) \\\\\\![b](http://host/b.png) \\![c][r] "
                     "\\![d](http://host/d.png)\n\nSee [the paper](https://example.org/p).\n\n[r]: http://host/c.png")


def test_model_card_markdown(tmp_path):
    assert logic.model_card_markdown(tmp_path) is None
    (tmp_path / "MODEL_CARD.md").write_text("---\nlicense: mit\n---\n\n# Model card\n\nIntended use: research.\n")
    assert logic.model_card_markdown(tmp_path) == "# Model card\n\nIntended use: research."
    (tmp_path / "MODEL_CARD.md").write_bytes(b"\xff\xfe bad")
    assert logic.model_card_markdown(tmp_path) is None


def test_segmenter_choices_and_folders(tmp_path):
    import json

    from tests.ui.helpers import tiny_segmenter_folder

    runs = tmp_path / "runs"
    seg = tiny_segmenter_folder(runs / "lungseg")
    (runs / "clf").mkdir()
    (runs / "clf" / "card.json").write_text(json.dumps({"kind": "classifier"}))
    assert logic.find_model_folders(runs) == [runs / "clf"]  # a segmenter is not a model to predict with
    assert logic.find_segmenter_folders(runs) == [seg]
    assert logic.segmenter_choices({"modality": "photo"}, runs) == []
    assert logic.segmenter_choices({"modality": "CXR"}, runs) == [logic.NO_SEGMENTER, str(seg)]
    own = {"modality": "CXR", "preprocessing": {"segmenter": str(seg)}}
    assert logic.segmenter_choices(own, runs)[:2] == [logic.MODEL_SEGMENTER, logic.NO_SEGMENTER]


def test_report_files_with_lung_masks(model_dir, tmp_path):
    from pellucid.core.predict import Predictor
    from tests.ui.helpers import bright_segmenter, write_lungs_png

    predictor = Predictor(model_dir)
    ups = [logic.read_upload("a.png", _bytes(write_lungs_png(tmp_path / "a.png")))]
    cases = logic.uploads_to_cases(predictor, ups)
    logic.LungMaskCache().attach(bright_segmenter(), cases, "seg")
    from pellucid.explain.report import MethodResult

    cases[0].explanations = [MethodResult("gradcam", np.ones((8, 8), np.float32) * 0.5)]
    html, pdf = logic.report_files(predictor, cases, methods=["gradcam"], alpha=0.5, segmenter_name="lungseg")
    assert "lung share:" in html and "Magenta line" in html and pdf.startswith(b"%PDF")
    html_off, _ = logic.report_files(predictor, cases, methods=["gradcam"], alpha=0.5, segmenter_name="lungseg",
                                     outline=False)
    assert "lung share:" in html_off and "Magenta line" not in html_off


def test_md_literal_escapes_what_markdown_and_streamlit_would_read():
    text = "[x](mailto:a@b.c) **b** :red[c] $y$ `z` # h&amp;.png"
    escaped = logic.md_literal(text)
    bare = re.sub(r"&#\d+;", "", escaped)  # what is left outside the character references
    assert not any(ch in bare for ch in "[]()*:$`#@.&")
    assert html.unescape(escaped).replace("\u2060", "") == text  # what Markdown shows: the text itself
    assert "a\u2060@b" in html.unescape(escaped)  # no bare address left for Markdown to link
    assert logic.md_literal("plain name 01") == "plain name 01"
    assert logic.md_literal("two\nlines\tand tabs") == "two lines and tabs"
