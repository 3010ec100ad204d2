"""Fixtures of the web-app and report tests: a tiny model folder built in seconds (no training)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.ui.helpers import tiny_model_folder


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """An untrained test_resnet TB model folder (64 px) with a card and a confusion plot."""
    return tiny_model_folder(tmp_path_factory.mktemp("ui_model") / "model")
