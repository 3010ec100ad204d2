"""Entry script of the pellucid web app: ``pellucid ui [--model DIR]`` runs ``streamlit run`` on it.

It sets up the page, the navigation between the model, predict and batch pages (``views/``), the
model picker in the sidebar and the intended-use banner shown on every page, then runs the page.
Streamlit's error details are off (``client.showErrorDetails`` ``none``, also set by ``pellucid ui``)
and every part runs inside :func:`~pellucid.ui.common.incident_guard`: a visitor never sees a
traceback or a server path, the server log has them with an incident id.
"""
from __future__ import annotations

import logging

import streamlit as st

from pellucid.core.runtime import tune_allocator
from pellucid.ui import common

tune_allocator()  # the web app runs models on the CPU: reuse freed tensor memory (see the function)
st.set_option("client.showErrorDetails", "none")
_log = logging.getLogger("pellucid")
if not _log.handlers and not logging.getLogger().handlers:  # incidents reach the server's stderr
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    _log.addHandler(_handler)

st.set_page_config(page_title="pellucid", page_icon=":material/visibility:", layout="wide")

page = st.navigation([
    st.Page("views/predict.py", title="Predict", icon=":material/image_search:", default=True),
    st.Page("views/batch.py", title="Batch", icon=":material/folder_open:"),
    st.Page("views/model.py", title="Model", icon=":material/description:"),
])
with common.incident_guard("sidebar"):
    common.model_picker()
with common.incident_guard("banner"):
    common.banner()
with common.incident_guard(page.title):
    page.run()
