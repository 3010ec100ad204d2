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


def rle_dicom_that_panics(folder: Path) -> tuple[Path, Path]:
    """pydicom's own ``MR_small_RLE.dcm`` and a copy with three bytes of its frame's runs changed, on which
    pylibjpeg-rle (Rust) panics; skips the test where pydicom, its test file or the decoder is absent."""
    pytest.importorskip("rle")
    pydicom = pytest.importorskip("pydicom")
    import pydicom.data
    from pydicom.encaps import generate_frames

    source = Path(pydicom.data.__file__).parent / "test_files" / "MR_small_RLE.dcm"
    if not source.is_file():
        pytest.skip(f"pydicom {pydicom.__version__} ships no MR_small_RLE.dcm")
    data = bytearray(source.read_bytes())
    frame = bytes(next(generate_frames(pydicom.dcmread(source).PixelData, number_of_frames=1)))
    at = bytes(data).find(frame)
    for offset, value in ((1140, 144), (1144, 48), (5065, 128)):
        data[at + offset] = value
    damaged = folder / "rle.dcm"
    damaged.write_bytes(bytes(data))
    return source, damaged


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
