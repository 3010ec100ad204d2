"""Bounded, seeded mutation fuzzing of the reader door (``bench/bench_fuzz.py`` holds the engine).

Seeds: the real sample DICOMs of ``../shared/data/dicom`` when present, plus small DICOMs and
PNG/JPEG/TIFF/BMP files built at run time. Every outcome must be an image that is finite float32
in ``[0, 1]`` of shape ``(H, W, 1|3)`` or an :class:`ImageReadError` with one line naming the file.
"""
from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

pytest.importorskip("pydicom")

from bench.bench_fuzz import DICOM_DIR, check_outcome, fuzz, mutate, seeds  # noqa: E402


def test_every_seed_reads_or_is_refused_cleanly(tmp_path: Path) -> None:
    for i, (suffix, data) in enumerate(seeds()):
        path = tmp_path / f"seed{i}{suffix}"
        path.write_bytes(data)
        outcome, detail = check_outcome(path, suffix in (".dcm", ""))
        assert outcome in ("image", "project"), (path.name, outcome, detail)
        if i < 18:  # the built seeds are all readable images
            assert outcome == "image", (path.name, detail)


def test_mutation_is_seeded() -> None:
    suffix, data = seeds(real_dicoms=False)[12]
    a = [mutate(data, suffix, random.Random(7)) for _ in range(3)]
    assert a == [mutate(data, suffix, random.Random(7)) for _ in range(3)]


def test_fuzz_read_image_only_project_errors_and_valid_images(tmp_path: Path) -> None:
    if not DICOM_DIR.is_dir():
        print(f"sample DICOMs {DICOM_DIR} absent: fuzzing built seeds only")
    start = time.perf_counter()
    res = fuzz(400, 25.0, seed=20240601, work=tmp_path)
    bad = {k: v for k, v in res["problems"].items() if not k.startswith("project")}
    assert not bad, bad
    assert res["counts"].get("crash", 0) == 0 and res["counts"].get("invalid", 0) == 0
    assert res["executions"] >= 200, res  # a few hundred within the time cap
    assert res["counts"].get("image", 0) > 20 and res["counts"].get("project", 0) > 20
    assert time.perf_counter() - start < 60
