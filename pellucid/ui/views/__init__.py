"""The web app's pages, run by ``st.navigation`` in ``pellucid/ui/app.py`` (not imported as modules)."""
