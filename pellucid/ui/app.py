"""Entry script of the pellucid web app: ``pellucid ui [--model DIR]`` runs ``streamlit run`` on it.

It sets up the page, the navigation between the model, predict and batch pages (``views/``), the
model picker in the sidebar and the intended-use banner shown on every page, then runs the page.
"""
from __future__ import annotations

import streamlit as st

from pellucid.core.runtime import tune_allocator
from pellucid.ui import common

tune_allocator()  # the web app runs models on the CPU: reuse freed tensor memory (see the function)

st.set_page_config(page_title="pellucid", page_icon=":material/visibility:", layout="wide")

page = st.navigation([
    st.Page("views/predict.py", title="Predict", icon=":material/image_search:", default=True),
    st.Page("views/batch.py", title="Batch", icon=":material/folder_open:"),
    st.Page("views/model.py", title="Model", icon=":material/description:"),
])
common.model_picker()
common.banner()
page.run()
