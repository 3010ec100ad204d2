"""Batch page: a folder or a zip of images → prediction table, CSV and the folder report.

Typed folders are read only inside the data root the server was started with (``pellucid ui
--data-root DIR``); without one, only zip uploads are offered. Zips unpack within a budget
(:func:`pellucid.ui.logic.extract_zip`).
"""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from pellucid.core.pipeline import PipelineError
from pellucid.explain.report import SPLIME_SAMPLE, ReportError, analyse_paths, available_methods
from pellucid.ui import common, logic

FOLDER, ZIP = "Folder in the data root", "Zip upload"

st.title("Batch")
loaded = common.require_model()
predictor = loaded.predictor
data_root = logic.data_root()

if data_root is None:
    source = ZIP
    st.caption("Upload a zip of images. (Reading folders on the server is off: start the app with "
               "`pellucid ui --data-root DIR` to allow folders inside DIR.)")
else:
    source = st.radio("Images from", [FOLDER, ZIP], horizontal=True, key="batch_source")
if source == FOLDER:
    folder = st.text_input("Folder path", key="batch_folder", placeholder="chest-xrays/2024",
                           help="A folder inside the data root this app was started with (relative paths start "
                                "there); searched recursively. Sub-folders named like the model's classes "
                                f"({', '.join(map(logic.md_literal, predictor.classes))}) give labels for metrics.")
    ready = bool(folder)
else:
    upload = st.file_uploader("Zip of images", type=["zip"], key="batch_zip")
    ready = upload is not None

run = st.button("Run", type="primary", disabled=not ready, icon=":material/play_arrow:")
if run:
    old = st.session_state.pop("batch_tmp", None)
    if old is not None:  # the images of the run this one replaces
        old.remove()
    try:
        if source == FOLDER:
            root = logic.resolve_in_root(folder, data_root)
            label = folder.strip()
        else:
            # removed with the next run, or when this session or the server ends
            tmp = st.session_state["batch_tmp"] = logic.ScratchFolder("pellucid-batch-")
            root = logic.extract_zip(upload.getvalue(), tmp.path)
            label = upload.name
        bar = st.progress(0.0, text="Reading and predicting…")
        cases = analyse_paths(predictor, [root], keep_images=False, reference=loaded.reference,
                              progress=lambda f, text: bar.progress(min(f, 1.0), text=text))
        bar.empty()
        st.session_state["batch"] = {"cases": cases, "label": label, "key": loaded.key}
        st.session_state.pop("batch_report", None)
    except (logic.UploadError, ReportError, PipelineError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        if source == FOLDER and data_root is not None:
            message = message.replace(str(Path(data_root).resolve()), "<data root>")
        elif st.session_state.get("batch_tmp") is not None:
            message = message.replace(st.session_state["batch_tmp"].path, upload.name)
        st.error(logic.md_literal(message))
        st.session_state.pop("batch", None)
        failed = st.session_state.pop("batch_tmp", None)
        if failed is not None:  # nothing of a refused upload stays on the server
            failed.remove()

res = st.session_state.get("batch")
if not res or res["key"] != loaded.key:
    st.stop()

cases = res["cases"]
classes = predictor.classes
ok = [c for c in cases if c.probs]
flagged = sum(1 for c in ok if c.ood and c.ood.flagged)
cols = st.columns(3 + len(classes))
cols[0].metric("Inputs", len(cases))
cols[1].metric("Unreadable", len(cases) - len(ok))
cols[2].metric("Out of domain", flagged)
for col, k in zip(cols[3:], classes):
    col.metric(f"Predicted {logic.md_literal(k)}", sum(1 for c in ok if c.label == k))
labelled = [c for c in ok if c.true_label]
if labelled:
    agree = sum(1 for c in labelled if c.true_label == c.label)
    st.caption(f"{len(labelled)} input(s) carry a label from their folder name; the model agrees on {agree} "
               f"({agree / len(labelled):.1%}). The report adds metrics with intervals and a confusion matrix.")
probability = {f"P({k})": st.column_config.ProgressColumn(f"P({k})", format="percent", min_value=0.0, max_value=1.0)
               for k in classes}
st.dataframe(logic.cases_table(cases, classes), hide_index=True, width="stretch", column_config=probability)

st.subheader("Downloads")
known = [m for m in available_methods() if m != "ttame" or "ttame" in (loaded.card.explainers_fitted or {})]
m1, m2, m3 = st.columns([2, 1, 1])
methods = m1.multiselect("Explainers for the report's galleries", known, key="batch_methods",
                         default=[m for m in loaded.card.explainers if m in known])
alpha = m2.slider("Overlay opacity", 0.0, 1.0, 0.5, 0.05, key="batch_alpha")
splime = m3.checkbox("SP-LIME picks", value=False, key="batch_splime",
                     help=f"Representative cases per class; runs LIME on up to {SPLIME_SAMPLE} images (slow on CPU).")
d1, d2, d3 = st.columns([1, 1, 2])
d1.download_button("Predictions (CSV)", data=logic.csv_bytes(cases, classes), file_name="predictions.csv",
                   mime="text/csv", icon=":material/table:", key="dl_csv")
if d2.button("Build report", icon=":material/description:", key="build_report"):
    bar = st.progress(0.0, text="Explaining gallery cases…")
    seg = common.lung_segmenter()
    html, pdf = logic.report_files(predictor, cases, methods=methods, alpha=alpha,
                                   splime_per_class=2 if splime else 0,
                                   segmenter=seg.model if seg else None, segmenter_name=seg.name if seg else None,
                                   progress=lambda f, text: bar.progress(min(f, 1.0), text=text))
    bar.empty()
    st.session_state["batch_report"] = {"html": html, "pdf": pdf}
rep = st.session_state.get("batch_report")
if rep:
    r1, r2, _ = st.columns([1, 1, 2])
    r1.download_button("Report (HTML)", data=rep["html"], file_name="report.html", mime="text/html",
                       icon=":material/download:", key="dl_batch_html")
    r2.download_button("Report (PDF)", data=rep["pdf"], file_name="report.pdf", mime="application/pdf",
                       icon=":material/picture_as_pdf:", key="dl_batch_pdf")
