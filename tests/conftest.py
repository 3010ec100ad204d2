"""Shared test fixtures: offline mode, the sample-data location, and a tiny trained model folder."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("PELLUCID_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_report_header(config) -> str:
    """The first lines of every ``make test``: the CPU features that decide INT8 and bfloat16 paths."""
    from pellucid.core.quantize import cpu_features

    return f"pellucid CPU: {cpu_features().summary()}"


def data_dir(name: str) -> Path:
    """The sample data folder ``name``, or skip the test with a clear message."""
    path = DATA / name
    if not path.exists():
        pytest.skip(f"sample data {path} absent (expected ../shared/data beside the repository)")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny TB classifier trained for one epoch on 40 real images (test_resnet, 64 px)."""
    from pellucid.core.training import TrainConfig, train
    from pellucid.core.tasks import get_task

    src = data_dir("tb_cxr")
    out = tmp_path_factory.mktemp("tiny_tb")
    cfg = TrainConfig.from_task(get_task("tb"), str(src), str(out), backbone="test_resnet", pretrained=False,
                                image_size=64, epochs=1, max_images=40, batch_size=8, progress=False,
                                n_boot=50, finetune="progressive")
    return train(cfg)
