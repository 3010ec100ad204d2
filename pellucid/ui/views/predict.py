"""Predict page: upload images or DICOM files; prediction, probabilities, explanations, report.

The prediction of every upload is shown as soon as it is computed; each chosen explainer then gets a
placeholder per image, filled as that explainer finishes (the slow ones, LIME, last), under one status
box with a progress bar. Each map carries its colour bar, a plain sentence per method and per
faithfulness score, notes on a blank map or one off the anatomy, and the numbers behind "details".

Uploads are read once per file and window and kept in the visitor's session only while they are
uploaded (no cache shared between visitors, no raw bytes kept: the uploader holds those, and a moved
DICOM window slider reads them again); explanations and lung masks go to per-session caches bounded
in items and bytes.
"""
from __future__ import annotations

from html import escape

import streamlit as st

from pellucid.explain.captions import HOW_TO_READ, burned_in_caveat, display_method
from pellucid.explain.report import available_methods, probability_text, threshold_text
from pellucid.ui import common, logic


_READS = "_pellucid_reads"


def _read_files(files, include_identifiers: bool) -> list[logic.Upload]:
    """Each uploaded file read (with the DICOM window its sliders set), reusing this session's reads
    of the files still uploaded; reads of files no longer uploaded are dropped."""
    before = st.session_state.get(_READS, {})
    kept: dict[tuple, logic.Upload] = {}

    def read(f, window: tuple[float, float] | None) -> logic.Upload:
        key = (getattr(f, "file_id", None) or f.name, f.size, window, include_identifiers)
        up = kept.get(key) or before.get(key)
        if up is None:
            up = logic.read_upload(f.name, f.getvalue(), window=window, include_identifiers=include_identifiers)
        kept[key] = up
        return up

    uploads = []
    for f in files:
        up = read(f, None)
        window = _window_of(up)
        uploads.append(read(f, window) if window is not None else up)
    st.session_state[_READS] = kept
    return uploads


@st.cache_data(show_spinner=False, max_entries=64)
def _prob_png(probs: tuple[float, ...], classes: tuple[str, ...], threshold: float | None,
              positive_index: int | None = None) -> bytes:
    import tempfile
    from pathlib import Path

    from pellucid.core.plots import plot_probabilities

    with tempfile.TemporaryDirectory() as tmp:
        return plot_probabilities(list(probs), list(classes), Path(tmp) / "p.png", threshold=threshold,
                                  positive_index=positive_index).read_bytes()


def _window_of(up: logic.Upload) -> tuple[float, float] | None:
    """The window the user set on this DICOM's sliders in an earlier run (None: the file's own)."""
    r = up.dicom_range
    c, w = st.session_state.get(f"wc-{up.sha256}"), st.session_state.get(f"ww-{up.sha256}")
    if r is None or c is None or w is None or (c, w) == (r.center, r.width):
        return None
    return float(c), float(w)


def _window_controls(up: logic.Upload) -> None:
    r = up.dicom_range
    lo, hi = min(r.low, r.center), max(r.high, r.center)
    span = max(hi - lo, 1e-3)
    step = 1.0 if span > 50 else span / 100
    st.slider("Window centre", float(lo), float(hi), float(r.center), step=step, key=f"wc-{up.sha256}",
              help="DICOM window centre in modality units (for CT: Hounsfield units)")
    st.slider("Window width", float(step), float(max(2 * span, r.width)), float(r.width), step=step,
              key=f"ww-{up.sha256}", help="DICOM window width; narrower means more contrast")


def _prediction(case, up: logic.Upload, threshold: float | None) -> None:
    """The input, the predicted label, the decision rule and the probability bars of one case."""
    if case.ood and case.ood.flagged:
        st.error("**Out of domain** — " + "; ".join(case.ood.reasons) + ". This image does not look like "
                 "what the model was trained on: its prediction is shown for reference only; do not use it.",
                 icon=":material/block:")
    left, right = st.columns([2, 3], gap="large")
    with left:
        st.image(common.to_uint8(case.image.array), width="stretch",
                 caption="input (windowed)" if case.is_dicom else "input")
        if burned_in_caveat(case.meta):
            st.warning(burned_in_caveat(case.meta), icon=":material/visibility:")
        if up.dicom_range is not None:
            _window_controls(up)
    with right:
        flag = " (flagged)" if case.ood and case.ood.flagged else ""
        if case.withheld:
            st.markdown(f"### Predicted{flag}: **withheld**")
            st.markdown(f"The model's policy withholds labels of out-of-domain inputs · decision: "
                        f"{logic.md_literal(threshold_text(card))}")
        else:
            st.markdown(f"### Predicted{flag}: **{logic.md_literal(case.label)}**")
            st.markdown(f"{probability_text(case.confidence)} calibrated probability · decision: "
                        f"{logic.md_literal(threshold_text(card))}")
        if case.ood and case.ood.uncertain and not case.ood.flagged:
            st.warning("Low confidence: the top probability is close to chance.", icon=":material/help:")
        st.image(_prob_png(tuple(case.probs[k] for k in predictor.classes), tuple(predictor.classes), threshold,
                           predictor.positive_index), width="stretch", caption="calibrated probabilities")
        if case.ood:
            st.caption(f"Domain check ({case.ood.method}): {case.ood.summary()}")


def _show_explanation(slot, case, method: str) -> None:
    """Fill one explanation's placeholder: the map with its colour bar, the plain sentences, notes
    on the map, and the numbers behind a "details" expander."""
    r = next((e for e in case.explanations if e.method == method), None)
    with slot.container():
        if r is None or r.heatmap is None:
            st.warning(f"{display_method(method)}: {(r.note if r else '') or 'no heatmap'}")
            return
        view = logic.explanation_view(case, r, alpha, outline=show_outline)
        st.image(view.image, width="stretch", caption=view.caption)
        st.markdown(view.reading.sentence)
        for sentence in view.reading.scores:
            st.markdown(f"<small>{escape(sentence)}</small>", unsafe_allow_html=True)
        for note in view.reading.notes:
            st.warning(note, icon=":material/report:")
        with st.expander("details"):
            st.markdown("\n".join(f"- {k}: `{v}`" for k, v in view.reading.details))


st.title("Predict")
loaded = common.require_model()
predictor = loaded.predictor
card = loaded.card
segmenter = common.lung_segmenter()

files = st.file_uploader("Images or DICOM files", accept_multiple_files=True, key="uploads",
                         help="PNG, JPEG, TIFF, BMP or DICOM (.dcm or no suffix); "
                              f"up to {logic.max_upload_bytes() / 2**20:.0f} MB each.")
known = [m for m in available_methods() if m != "ttame" or "ttame" in (card.explainers_fitted or {})]
c1, c2, c3 = st.columns([2, 1, 1])
methods = c1.multiselect("Explainers", known, default=[m for m in card.explainers if m in known],
                         key="methods", placeholder="none installed" if not known else "choose explainers",
                         help="Explanations of the predicted class, side by side.")
alpha = c2.slider("Overlay opacity", 0.0, 1.0, 0.5, 0.05, key="alpha")
include_ids = c3.checkbox("DICOM identifiers in report", value=False, key="include_ids",
                          help="Off: DICOM files are named by their hash and no patient tags are shown.")
show_outline = False
if segmenter is not None:
    show_outline = c3.checkbox("Show lung outline", value=True, key="lung_outline",
                               help=f"Draw the lungs as segmented by {logic.md_literal(segmenter.name)} on the "
                                    "explanations; the lung share (the map's mass inside them) is shown either way.")
if not known:
    st.caption("No explainers are installed (`pip install \"pellucid[explain]\"`); predictions only.")
if not files:
    st.session_state.pop(_READS, None)
    st.info("Upload one or more images to see the model's prediction and its explanations.")
    st.stop()

limit = logic.max_page_uploads()
if len(files) > limit:  # every file here is decoded and kept for its explanations: memory grows with each
    st.warning(f"{len(files)} files uploaded; this page reads the first {limit} (the Batch page takes a zip of any "
               "number, streamed).", icon=":material/filter_list:")
    files = files[:limit]
uploads = _read_files(files, include_ids)

with st.spinner("Predicting…"):
    cases = logic.uploads_to_cases(predictor, uploads, reference=loaded.reference)

explaining = bool(methods) and any(c.probs for c in cases)
status_box = st.container()  # the explainers' progress, above the results
notes_box = st.container()
if explaining:
    with st.expander("How to read the explanations", icon=":material/help:"):
        st.markdown(HOW_TO_READ)
        st.caption("More in docs/explanations.md of the pellucid repository.")

threshold = predictor.threshold if len(predictor.classes) == 2 else None
slots: dict[tuple[int, str], object] = {}
for i, (case, up) in enumerate(zip(cases, uploads)):
    with st.container(border=True):
        st.subheader(logic.md_literal(case.name))  # a file name is shown as it is, never read as Markdown
        if case.error:
            st.error(logic.md_literal(case.error))
            continue
        _prediction(case, up, threshold)
        if explaining and case.index is not None:
            explained = logic.md_literal(predictor.classes[case.index])
            st.markdown(f"**Explanations of “{explained}”** · overlay opacity {alpha:.2f}"
                        + (f" · lungs (magenta) by {logic.md_literal(segmenter.name)}"
                           if show_outline and segmenter is not None else ""))
            cols = st.columns(max(3, len(methods)))
            for col, m in zip(cols, methods):
                slots[(i, m)] = col.empty()
                slots[(i, m)].info(f"{display_method(m)}: waiting…", icon=":material/hourglass_top:")

notes: list[str] = []
if explaining:
    with status_box, st.status("Explaining…", expanded=True) as status:
        if segmenter is not None:
            st.write("Segmenting the lungs…")
            masks = st.session_state.setdefault("lung_mask_cache", logic.LungMaskCache())
            notes += masks.attach(segmenter.model, [c for c in cases if c.probs], segmenter.key)
        bar = st.progress(0.0, text="Explaining…")
        cache = st.session_state.setdefault("explanation_cache", logic.ExplanationCache())
        for m, found in cache.stream(predictor, cases, methods, loaded.key,
                                     progress=lambda f, text: bar.progress(min(max(f, 0.0), 1.0), text=text)):
            notes += [n for n in found if n not in notes]
            for i, case in enumerate(cases):
                if (i, m) in slots:
                    _show_explanation(slots[(i, m)], case, m)
        bar.empty()
        status.update(label=f"Explained with {', '.join(display_method(m) for m in methods)}", state="complete",
                      expanded=False)
with notes_box:
    for n in notes:
        st.warning(n)

readable = [c for c in cases if c.probs]
if readable:
    st.divider()
    holder = st.session_state.setdefault("report_holder", {})
    signature = (loaded.key, tuple((c.sha256, c.window) for c in cases), tuple(methods), alpha, include_ids,
                 segmenter.key if segmenter else None, show_outline)

    def _report() -> tuple[str, bytes]:
        if holder.get("signature") != signature:
            holder["files"] = logic.report_files(predictor, cases, methods=methods, alpha=alpha,
                                                 include_identifiers=include_ids, notes=notes,
                                                 segmenter_name=segmenter.name if segmenter else None,
                                                 outline=show_outline)
            holder["signature"] = signature
        return holder["files"]

    stem = "report" if len(cases) > 1 else f"report-{cases[0].name.rsplit('.', 1)[0].replace(' ', '_')}"
    d1, d2, _ = st.columns([1, 1, 2])
    d1.download_button("Report (HTML)", data=lambda: _report()[0], file_name=f"{stem}.html", mime="text/html",
                       icon=":material/download:", key="dl_html")
    d2.download_button("Report (PDF)", data=lambda: _report()[1], file_name=f"{stem}.pdf",
                       mime="application/pdf", icon=":material/picture_as_pdf:", key="dl_pdf")
