"""Every page of the web app, driven by Streamlit's AppTest with a tiny model folder."""
from __future__ import annotations

import html
import io
import logging
import re
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from tests.conftest import data_dir  # noqa: E402
from tests.ui.helpers import INTENDED_USE, PATIENT_ID, write_dicom, write_png  # noqa: E402

APP = str(Path(__file__).resolve().parents[2] / "pellucid" / "ui" / "app.py")


@pytest.fixture
def app(model_dir, tmp_path, monkeypatch) -> AppTest:
    monkeypatch.setenv("PELLUCID_MODEL", str(model_dir))
    monkeypatch.setenv("PELLUCID_RUNS", str(tmp_path / "runs"))
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    return at


def _captions(at: AppTest) -> list[str]:
    return [c for im in at.get("image") for c in im.captions]


def _details(at: AppTest) -> list[str]:
    """The text inside the explanations' "details" expanders."""
    return [m.value for e in at.expander if e.label == "details" for m in e.markdown]


def _image_url(at: AppTest, caption: str) -> str:
    return next(i.url for im in at.get("image") for i in im.proto.imgs if i.caption == caption)


def _sample(name: str = "tuberculosis") -> tuple[str, bytes]:
    path = sorted((data_dir("tb_cxr") / name).glob("*.png"))[0]
    return path.name, path.read_bytes()


def _has_gradcam() -> bool:
    from pellucid.explain.report import available_methods

    return "gradcam" in available_methods()


def _model_page(folder, tmp_path, monkeypatch) -> AppTest:
    """The web app on the model page of ``folder``, run without an exception."""
    monkeypatch.setenv("PELLUCID_MODEL", str(folder))
    monkeypatch.setenv("PELLUCID_RUNS", str(tmp_path / "runs"))
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    at.switch_page("views/model.py").run()
    assert not at.exception, at.exception
    return at


def test_model_page_shows_the_human_readable_card(model_dir, tmp_path, monkeypatch):
    import shutil

    folder = tmp_path / "with_card"
    shutil.copytree(model_dir, folder)
    (folder / "MODEL_CARD.md").write_text("---\nlicense: other\n---\n# Model card: TB test model\n\n"
                                          "## Intended use\n\nResearch only.\n")
    at = _model_page(folder, tmp_path, monkeypatch)
    texts = [m.value for m in at.markdown]
    assert any(t.startswith("# Model card: TB test model") and "license" not in t for t in texts), texts
    assert [s.value for s in at.subheader][0] == "Card fields"


def test_class_names_and_a_title_written_in_markdown_are_shown_as_text(model_dir, tmp_path, monkeypatch):
    """Class names come from folder names (or a received model folder): ``![x](http://host/p.png)`` reached the
    sidebar and the Model page as Markdown for an image from that host, ``**tb**`` as bold text and a title
    ``[t](http://host)`` as a link. The sidebar, the page title and the rendered model card show them as text."""
    import json
    import shutil

    from pellucid.core.card import read_card
    from pellucid.core.modelcard_md import write_model_card_md
    from pellucid.ui.logic import md_literal

    folder = tmp_path / "named"
    shutil.copytree(model_dir, folder)
    names = ["![x](http://host/p.png)", "**tb**"]
    card = json.loads((folder / "card.json").read_text())
    card.update(task="named", classes=names, positive_class=names[1], title="[t](http://host)")
    card["threshold"]["positive_class"] = names[1]
    (folder / "card.json").write_text(json.dumps(card))
    write_model_card_md(folder, read_card(folder))
    at = _model_page(folder, tmp_path, monkeypatch)
    shown = [c.value for c in at.sidebar.caption] + [t.value for t in at.title] + [m.value for m in at.markdown]
    assert any(md_literal(names[0]) in v for v in shown), shown  # the sidebar names the classes
    assert any(md_literal("[t](http://host)") in v for v in shown), shown
    for raw in ("![x](", "**tb**", "[t](http"):
        assert not any(raw in v for v in shown), (raw, shown)


def test_banner_and_picker_on_every_page(app):
    for page in (None, "views/batch.py", "views/model.py"):
        if page:
            app.switch_page(page).run()
        assert not app.exception, app.exception
        assert any(INTENDED_USE in w.value for w in app.warning), page
        assert app.sidebar.selectbox(key="model_choice").value.endswith("model")


def test_no_model_says_how_to_choose(tmp_path, monkeypatch):
    monkeypatch.delenv("PELLUCID_MODEL", raising=False)
    monkeypatch.setenv("PELLUCID_RUNS", str(tmp_path / "runs"))
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception
    assert any("Research use only" in w.value for w in at.warning)  # default notice
    assert any("Choose a model folder" in i.value for i in at.info)
    at.sidebar.text_input(key="model_path").set_value(str(tmp_path / "nope")).run()
    assert any("Cannot load" in e.value and "not found" in e.value for e in at.sidebar.error)


def test_predict_page_shows_label_probabilities_and_overlays(app):
    name, data = _sample()
    methods = ["gradcam"] if _has_gradcam() else []
    app.multiselect(key="methods").set_value(methods)
    app.file_uploader(key="uploads").set_value((name, data, "image/png"))
    app.run()
    assert not app.exception, app.exception
    assert not app.error
    heads = [m.value for m in app.markdown if m.value.startswith("### Predicted")]
    assert len(heads) == 1 and heads[0].split("**")[1] in ("normal", "tuberculosis")
    caps = _captions(app)
    assert "input" in caps and "calibrated probabilities" in caps
    if methods:
        # each map carries its legend, the plain sentences and the numbers behind "details"
        assert any(re.match(r"Grad-CAM — red: more influence on “(normal|tuberculosis)”; blue: less influence", c)
                   for c in caps), caps
        texts = [m.value for m in app.markdown]
        assert any(t.startswith("Grad-CAM shows where the network") for t in texts)
        assert any("Removing the highlighted regions first" in t for t in texts)
        labels = [e.label for e in app.expander]
        assert "details" in labels and "How to read the explanations" in labels
        assert [s.label for s in app.status] == ["Explained with Grad-CAM"]  # the status box, completed
    labels = [b.proto.label for b in app.get("download_button")]
    assert labels == ["Report (HTML)", "Report (PDF)"]
    # the opacity slider re-blends without recomputing anything heavy
    app.slider(key="alpha").set_value(0.8).run()
    assert not app.exception


def test_predict_page_bad_uploads_one_line_errors(app, tmp_path, monkeypatch):
    monkeypatch.setenv("PELLUCID_MAX_UPLOAD_MB", "0.05")
    big = write_png(tmp_path / "big.png", colour=True, size=400).read_bytes()
    nopix = write_dicom(tmp_path / "nopix.dcm", pixels=False).read_bytes()
    name, good = _sample("normal")
    app.multiselect(key="methods").set_value([])
    app.file_uploader(key="uploads").set_value([
        ("notes.png", b"plain text", "image/png"),
        ("cut.png", good[: len(good) // 3], "image/png"),
        ("big.png", big, "image/png"),
        (f"Doe_{PATIENT_ID}.dcm", nopix, "application/dicom"),
        (name, good, "image/png"),
    ])
    app.run()
    assert not app.exception, app.exception
    errors = [html.unescape(e.value).replace("\u2060", "") for e in app.error]  # as the page shows them
    assert len(errors) == 4, errors
    assert all("\n" not in e for e in errors)
    assert errors[0].startswith("notes.png") and errors[1].startswith("cut.png")
    assert "over the 0 MB limit" in errors[2] or "limit" in errors[2]
    assert "no pixel data" in errors[3] and PATIENT_ID not in errors[3]
    assert sum(m.value.startswith("### Predicted") for m in app.markdown) == 1  # the good one still works


def test_predict_page_flags_out_of_domain(app, tmp_path):
    photo = write_png(tmp_path / "photo.png", colour=True).read_bytes()
    app.multiselect(key="methods").set_value([])
    app.file_uploader(key="uploads").set_value(("photo.png", photo, "image/png")).run()
    assert not app.exception
    assert any(e.value.startswith("**Out of domain**") and "many colours" in e.value for e in app.error)
    assert any(m.value.startswith("### Predicted (flagged):") for m in app.markdown)


def test_predict_page_dicom_window_sliders(app, tmp_path):
    data = write_dicom(tmp_path / f"Doe_{PATIENT_ID}.dcm").read_bytes()
    app.multiselect(key="methods").set_value([])
    app.file_uploader(key="uploads").set_value(("Doe_SECRET123.dcm", data, "application/dicom")).run()
    assert not app.exception, app.exception
    heads = [h.value for h in app.subheader]
    assert len(heads) == 1 and heads[0].startswith("DICOM ") and PATIENT_ID not in heads[0]
    centre = next(s for s in app.slider if s.label == "Window centre")
    width = next(s for s in app.slider if s.label == "Window width")
    assert (centre.value, width.value) == (0.0, 1000.0)  # the file's own window
    before = _image_url(app, "input (windowed)")
    width.set_value(100.0).run()
    assert not app.exception
    assert next(s for s in app.slider if s.label == "Window width").value == 100.0
    assert _image_url(app, "input (windowed)") != before  # the file was read again with the new window


def test_predict_page_warns_of_text_burned_into_a_dicoms_pixels(app, tmp_path):
    from pellucid.explain.captions import BURNED_IN_CAVEAT

    app.multiselect(key="methods").set_value([])
    data = write_dicom(tmp_path / "burned.dcm", burned_in="YES").read_bytes()
    app.file_uploader(key="uploads").set_value(("burned.dcm", data, "application/dicom")).run()
    assert not app.exception, app.exception
    assert [w.value for w in app.warning if "Burned-in" in w.value] == [BURNED_IN_CAVEAT]
    data = write_dicom(tmp_path / "plain.dcm", burned_in="NO").read_bytes()
    app.file_uploader(key="uploads").set_value(("plain.dcm", data, "application/dicom")).run()
    assert not app.exception and not [w for w in app.warning if "Burned-in" in w.value]


def test_model_page_shows_card_and_plots(app):
    app.switch_page("views/model.py").run()
    assert not app.exception, app.exception
    assert html.unescape(app.title[0].value) == "Tuberculosis on chest X-ray"  # shown as text (character references)
    tables = app.table
    assert len(tables) == 2
    card = tables[0].value
    assert "test_resnet" in " ".join(map(str, card["value"]))
    assert "Confusion matrix" in _captions(app)
    assert any("No in-domain reference" in i.value for i in app.info)


def test_batch_page_folder(app, tmp_path, monkeypatch):
    monkeypatch.setenv("PELLUCID_DATA_ROOT", str(tmp_path))
    folder = tmp_path / "set"
    for cls in ("normal", "tuberculosis"):
        for i in range(2):
            write_png(folder / cls / f"{cls}{i}.png", seed=i)
    (folder / "normal" / "bad.png").write_bytes(b"x")
    app.switch_page("views/batch.py").run()
    app.text_input(key="batch_folder").set_value(str(folder)).run()
    app.button[0].click().run()
    assert not app.exception, app.exception
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["Inputs"] == "5" and metrics["Unreadable"] == "1"
    assert int(metrics["Predicted normal"]) + int(metrics["Predicted tuberculosis"]) == 4
    frame = app.dataframe[0].value
    assert len(frame) == 5 and set(frame["folder label"]) == {"normal", "tuberculosis"}
    assert any("carry a label from their folder name" in c.value for c in app.caption)
    assert [b.proto.label for b in app.get("download_button")] == ["Predictions (CSV)"]
    app.multiselect(key="batch_methods").set_value([])
    app.button(key="build_report").click().run()
    assert not app.exception, app.exception
    assert [b.proto.label for b in app.get("download_button")] == ["Predictions (CSV)", "Report (HTML)",
                                                                   "Report (PDF)"]


def test_batch_page_zip_and_bad_inputs(app, tmp_path, monkeypatch):
    monkeypatch.setenv("PELLUCID_DATA_ROOT", str(tmp_path))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(3):
            zf.writestr(f"imgs/{i}.png", write_png(tmp_path / f"{i}.png", seed=i).read_bytes())
    app.switch_page("views/batch.py").run()
    app.text_input(key="batch_folder").set_value(str(tmp_path / "missing")).run()
    app.button[0].click().run()
    assert any("is not a folder inside the data root" in e.value for e in app.error)
    app.radio(key="batch_source").set_value("Zip upload").run()
    app.file_uploader(key="batch_zip").set_value(("broken.zip", b"not a zip", "application/zip")).run()
    app.button[0].click().run()
    assert any("not a zip file" in e.value for e in app.error)
    app.file_uploader(key="batch_zip").set_value(("bomb.zip", _bomb(), "application/zip")).run()
    app.button[0].click().run()
    errors = [e.value for e in app.error]
    assert len(errors) == 1 and "compressed" in errors[0] and "\n" not in errors[0], errors
    app.file_uploader(key="batch_zip").set_value(("set.zip", buf.getvalue(), "application/zip")).run()
    app.button[0].click().run()
    assert not app.exception, app.exception
    assert {m.label: m.value for m in app.metric}["Inputs"] == "3"


def test_a_zip_runs_images_leave_the_server_with_the_run(app, tmp_path, monkeypatch):
    """The unpacked images of a zip stay for the report while their run is shown, and no longer: a new
    run, a refused zip or the session's end removes them (they had stayed in the temporary folder
    for good, a copy of every batch of patient images on the server's disk)."""
    import gc
    import tempfile

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    def zipped(n: int) -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for i in range(n):
                zf.writestr(f"imgs/{i}.png", write_png(tmp_path / f"{i}.png", seed=i).read_bytes())
        return buf.getvalue()

    def unpacked() -> list[str]:
        return sorted(str(p.relative_to(scratch)) for p in scratch.rglob("*.png"))

    monkeypatch.delenv("PELLUCID_DATA_ROOT", raising=False)
    app.switch_page("views/batch.py").run()
    app.file_uploader(key="batch_zip").set_value(("one.zip", zipped(2), "application/zip")).run()
    app.button[0].click().run()
    assert not app.exception, app.exception
    first = unpacked()
    assert len(first) == 2 and all(p.startswith("pellucid-batch-") for p in first)
    app.file_uploader(key="batch_zip").set_value(("two.zip", zipped(3), "application/zip")).run()
    app.button[0].click().run()
    second = unpacked()
    assert len(second) == 3 and not set(first) & set(second)  # the first run's images are gone
    app.file_uploader(key="batch_zip").set_value(("bomb.zip", _bomb(), "application/zip")).run()
    app.button[0].click().run()
    assert any("compressed" in e.value for e in app.error)
    assert unpacked() == [] and list(scratch.iterdir()) == []  # a refused zip leaves nothing either
    app.file_uploader(key="batch_zip").set_value(("one.zip", zipped(2), "application/zip")).run()
    app.button[0].click().run()
    assert len(unpacked()) == 2
    del app.session_state["batch_tmp"]  # what Streamlit does when the session ends
    gc.collect()
    assert list(scratch.iterdir()) == []


def _texts(node) -> list[str]:
    """Every value and label on the page, depth first."""
    out = [str(v) for v in (getattr(node, "value", None), getattr(node, "label", None)) if isinstance(v, str)]
    for child in getattr(node, "children", {}).values():
        out += _texts(child)
    return out


def _bomb() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("scan.png", bytes(16 << 20))
    return buf.getvalue()


def test_batch_page_folders_off_without_data_root(app, tmp_path, monkeypatch):
    monkeypatch.delenv("PELLUCID_DATA_ROOT", raising=False)
    app.switch_page("views/batch.py").run()
    assert not app.exception, app.exception
    assert not app.get("radio") and not app.text_input  # no way to type a server folder
    assert any("--data-root" in c.value for c in app.caption)
    assert app.file_uploader(key="batch_zip")


def test_batch_page_folder_outside_the_data_root(app, tmp_path, monkeypatch):
    root = tmp_path / "data"
    (root / "set").mkdir(parents=True)
    write_png(tmp_path / "secret" / "a.png")
    monkeypatch.setenv("PELLUCID_DATA_ROOT", str(root))
    app.switch_page("views/batch.py").run()
    for typed in (str(tmp_path / "secret"), "../secret", "/etc"):
        app.text_input(key="batch_folder").set_value(typed).run()
        app.button[0].click().run()
        assert not app.exception, app.exception
        errors = [e.value for e in app.error]
        assert len(errors) == 1 and "outside the data root" in errors[0] and "\n" not in errors[0], errors
        assert not app.metric and not app.dataframe  # nothing was listed or read


def test_unexpected_error_shows_an_incident_not_a_traceback(app, monkeypatch, caplog):
    from pellucid.ui import logic

    def boom(*args, **kwargs):
        raise RuntimeError("kaboom in /srv/pellucid/secret/path.py")

    monkeypatch.setattr(logic, "uploads_to_cases", boom)
    name, data = _sample()
    app.multiselect(key="methods").set_value([])
    with caplog.at_level(logging.ERROR, logger="pellucid.ui.common"):
        app.file_uploader(key="uploads").set_value((name, data, "image/png")).run()
    assert not app.exception, app.exception
    errors = [e.value for e in app.error]
    assert len(errors) == 1, errors
    match = re.fullmatch(r"Something went wrong \(incident ([0-9a-f]{8})\); the details are in the server log\.",
                         errors[0])
    assert match, errors
    shown = " ".join(_texts(app.main))
    assert "Something went wrong" in shown and "Predict" in shown
    assert "Traceback" not in shown and "/srv/" not in shown and "kaboom" not in shown
    logged = [r for r in caplog.records if match.group(1) in r.getMessage()]
    assert logged and logged[0].exc_info and "kaboom" in str(logged[0].exc_info[1])
    # the sidebar and the banner still work
    assert any(INTENDED_USE in w.value for w in app.warning)


def test_model_page_builds_ood_reference(model_dir, tmp_path, monkeypatch):
    import json
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    rows = [{"path": str(write_png(tmp_path / "imgs" / f"{i}.png", seed=i)), "label": "normal"} for i in range(12)]
    (folder / "split.json").write_text(json.dumps({"hash": "h", "train": rows[:9], "val": rows[9:]}))
    monkeypatch.setenv("PELLUCID_MODEL", str(folder))
    monkeypatch.setenv("PELLUCID_RUNS", str(tmp_path / "runs"))
    at = AppTest.from_file(APP, default_timeout=120).run()
    at.switch_page("views/model.py").run()
    at.button[0].click().run()
    assert not at.exception, at.exception
    assert (folder / "ood.safetensors").exists()
    assert any("In-domain reference: embeddings of 9 training images" in s.value for s in at.success)


# ----------------------------------------------------------------------------- lung outline
@pytest.fixture
def lung_app(tmp_path, monkeypatch) -> AppTest:
    """The app on a tiny lung-masked CXR model whose card names a (tiny, untrained) U-Net segmenter;
    runs/ also holds a segmentation folder whose weights are missing."""
    import json

    from tests.ui.helpers import tiny_masked_model_folder, tiny_segmenter_folder

    runs = tmp_path / "runs"
    seg = tiny_segmenter_folder(runs / "lungseg")
    broken = runs / "broken-seg"
    broken.mkdir(parents=True)
    (broken / "card.json").write_text((seg / "card.json").read_text())
    model = tiny_masked_model_folder(tmp_path / "model", seg)
    assert json.loads((model / "card.json").read_text())["preprocessing"]["segmenter"]
    monkeypatch.setenv("PELLUCID_MODEL", str(model))
    monkeypatch.setenv("PELLUCID_RUNS", str(runs))
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    return at


def test_predict_page_lung_outline_and_share(lung_app, tmp_path):
    from tests.ui.helpers import write_lungs_png

    if not _has_gradcam():
        pytest.skip("the gradcam explainer is not available")
    at = lung_app
    picker = at.sidebar.selectbox(key="segmenter_choice")
    assert picker.value == "From the model card" and "None" in picker.options
    at.multiselect(key="methods").set_value(["gradcam"])
    at.file_uploader(key="uploads").set_value(("cxr.png", write_lungs_png(tmp_path / "cxr.png").read_bytes(),
                                                "image/png"))
    at.run()
    assert not at.exception, at.exception
    assert not at.error
    assert at.checkbox(key="lung_outline").value is True
    caps = [c for c in _captions(at) if c.startswith("Grad-CAM")]
    details = _details(at)
    assert len(caps) == 1 and len(details) == 1 and "lung share" in details[0] and "lung area" in details[0], details
    assert any("lungs (magenta) by lungseg" in m.value for m in at.markdown)
    at.checkbox(key="lung_outline").uncheck().run()
    assert not at.exception, at.exception
    assert not any("lungs (magenta)" in m.value for m in at.markdown)
    assert any("lung share" in d for d in _details(at))  # the share stays
    # a broken segmentation folder: one line in the sidebar, the page goes on without outlines
    at.sidebar.selectbox(key="segmenter_choice").set_value(str(tmp_path / "runs" / "broken-seg")).run()
    assert not at.exception, at.exception
    errors = [e.value for e in at.sidebar.error]
    assert len(errors) == 1 and "Cannot use" in errors[0] and "\n" not in errors[0], errors
    assert not any("lung share" in d for d in _details(at))
    assert any(m.value.startswith("### Predicted") for m in at.markdown)


def test_predict_page_without_segmenter_has_no_outline_option(app):
    # the tiny model is a CXR model without a segmenter, and runs/ holds none: "None" is all there is
    assert [s.value for s in app.sidebar.selectbox if s.key == "segmenter_choice"] == ["None"]
    name, data = _sample()
    app.multiselect(key="methods").set_value(["gradcam"] if _has_gradcam() else [])
    app.file_uploader(key="uploads").set_value((name, data, "image/png")).run()
    assert not app.exception, app.exception
    assert not [c for c in app.checkbox if c.key == "lung_outline"]
    assert not any("lung share" in d for d in _details(app))


def test_model_page_of_a_final_fit_says_why_it_has_no_test_score(model_dir, tmp_path, monkeypatch):
    import json
    import shutil

    from pellucid.core.scoring import FINAL_FIT_NOTE

    folder = tmp_path / "final"
    shutil.copytree(model_dir, folder)
    card = json.loads((folder / "card.json").read_text())
    card["metrics"] = {"note": FINAL_FIT_NOTE}
    (folder / "card.json").write_text(json.dumps(card))
    (folder / "MODEL_CARD.md").unlink(missing_ok=True)
    at = _model_page(folder, tmp_path, monkeypatch)
    assert any("no held-out metrics: no test part: a final fit" in i.value for i in at.info), [i.value for i in at.info]


def test_predict_page_reads_at_most_its_limit_of_files(app, monkeypatch):
    """Each file on the Predict page is decoded and kept for its explanations: past the limit the page says
    so and reads the first ones (the Batch page streams any number)."""
    monkeypatch.setenv("PELLUCID_MAX_PAGE_UPLOADS", "2")
    name, good = _sample("normal")
    app.multiselect(key="methods").set_value([])
    app.file_uploader(key="uploads").set_value([(f"{i}-{name}", good, "image/png") for i in range(5)])
    app.run()
    assert not app.exception, app.exception
    assert any("5 files uploaded; this page reads the first 2" in w.value for w in app.warning)
    assert sum(m.value.startswith("### Predicted") for m in app.markdown) == 2
