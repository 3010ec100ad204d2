"""Model page: the chosen model folder's card, held-out metrics, plots and out-of-domain reference.

When the folder has the human-readable model card ``MODEL_CARD.md`` (beside ``card.json``), it is shown
first; the card's fields, metrics and plots follow as before.
"""
from __future__ import annotations

import json

import streamlit as st

from pellucid.core.modelcard_md import redact_paths
from pellucid.core.ood import NeighbourReference, reference_from_split, save_reference
from pellucid.datasets.splits import split_file
from pellucid.explain.report import metric_rows, card_rows
from pellucid.ui import common, logic

loaded = common.require_model()
card = loaded.card
st.title(logic.md_literal(card.title or card.task or "Model"))
st.caption(f"Model folder: `{loaded.folder}`")

human = logic.model_card_markdown(loaded.folder)
if human:  # the generated human-readable card (MODEL_CARD.md beside card.json) comes first
    with st.container(border=True):
        st.markdown(human)
left, right = st.columns([3, 2])
with left:
    st.subheader("Card fields" if human else "Card")
    st.table({"field": [k for k, _ in card_rows(card)], "value": [v for _, v in card_rows(card)]})
with right:
    rows = metric_rows(card.metrics)
    n = card.metrics.get("n")
    st.subheader("Held-out metrics")
    if rows:
        st.table({"metric": [r[0] for r in rows], "value": [r[1] for r in rows], "95% CI": [r[2] for r in rows]})
        if n:
            st.caption(f"Test split, n = {n}.")
    else:
        note = card.metrics.get("note")
        st.info(f"This card has no held-out metrics{': ' + redact_paths(note) if note else '.'}")

plots = logic.model_plots(loaded.folder)
if plots:
    st.subheader("Evaluation plots")
    cols = st.columns(2)
    for i, (title, path) in enumerate(plots):
        cols[i % len(cols)].image(str(path), caption=title, width="stretch")

st.subheader("Out-of-domain check")
ref = loaded.reference
if isinstance(ref, NeighbourReference):
    st.success(f"In-domain reference: the embeddings of the {ref.n_fit} support images. An image farther than "
               f"{ref.distance_threshold:.2f} from the nearest of them is flagged (their largest leave-one-out "
               f"distance + {ref.margin:.0%}).")
elif ref is not None:
    st.success(f"In-domain reference: embeddings of {ref.n_fit} training images; thresholds at the "
               f"{ref.quantile:.0%} quantile of {ref.n_calib} validation images ({ref.source}). About "
               f"{1 - ref.quantile:.0%} of in-domain images are flagged by design.")
else:
    st.info("No in-domain reference is stored with this model, so only heuristics run (near-blank images; "
            "many colours on a grey-scale modality). Build one from the training split to flag images whose "
            "embedding is far from the training images.")
    if split_file(loaded.folder).is_file() and st.button("Build the reference from split.json",
                                                             icon=":material/insights:"):
        bar = st.progress(0.0, text="Embedding training images…")
        try:
            new = reference_from_split(loaded.folder, loaded.predictor.model, loaded.predictor.preprocess,
                                       progress=lambda f, text: bar.progress(min(f, 1.0), text=text))
            save_reference(loaded.folder, new)
        except (FileNotFoundError, ValueError, OSError) as err:
            st.error(str(err).splitlines()[0])
        else:
            st.rerun()
        finally:
            bar.empty()

with st.expander("card.json"):
    st.code(json.dumps(card.to_dict(), indent=1), language="json")
