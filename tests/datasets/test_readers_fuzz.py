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


def test_a_read_that_never_returns_or_runs_out_of_memory_is_an_outcome_not_the_end_of_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pydicom walked a JP2 frame's boxes on the spot for good, and a JPEG frame made pylibjpeg-libjpeg grow to
    21 GB: in-process, either would have held the fuzzer or taken the machine. A read past the case's time is a
    ``hang``, and one that reached the address-space cap a ``memory`` outcome, each counted as a failure."""
    import pellucid.datasets.readers as readers
    from bench.bench_fuzz import STUCK_LOG, _time_limit, table

    path = tmp_path / "case.png"
    path.write_bytes(b"\x89PNG")

    def forever(*args: object, **kwargs: object) -> None:
        while True:
            time.sleep(0.01)

    monkeypatch.setattr(readers, "read_image", forever)
    with _time_limit(0.3, 5, path):
        outcome, detail = check_outcome(path, False)
    assert outcome == "hang" and "forever" in detail
    assert STUCK_LOG.read_text().startswith(f"case 5: {path}")

    def no_memory(p: Path, **kwargs: object) -> None:
        raise readers.ImageReadError(f"{p}: ran out of memory while decoding the pixel data — reduce the image")

    monkeypatch.setattr(readers, "read_image", no_memory)
    outcome, detail = check_outcome(path, False)
    assert outcome == "memory"
    counts = {"image": 1, "memory": 1, "hang": 1}
    res = {"counts": counts, "problems": {}, "executions": 3, "seconds": 1.0, "slowest_s": 0.3, "slowest_case": 5,
           "seed": 0, "n_seeds": 1, "examples": {}}
    assert "| 3 | 1 | 0 | 2 |" in "\n".join(table(res, "cpu", "cmd"))  # counted with the crashes


def test_the_coded_header_mutation_changes_a_size_in_the_frames_own_header() -> None:
    """Whole-file mutations seldom land on a frame's sizes: 40,000 of them on the code before the fixes found
    neither the JPEG frame of height 0 nor the JP2 box of length 0. This one aims at those sizes."""
    from bench.bench_fuzz import _coded_header

    jpeg_dicoms = [data for suffix, data in seeds(real_dicoms=False) if suffix == ".dcm" and b"\xff\xd8\xff" in data]
    assert jpeg_dicoms
    data = jpeg_dicoms[0]
    sof = data.index(b"\xff\xc0", data.index(b"\xff\xd8\xff"))
    heights = set()
    for seed in range(40):
        out = _coded_header(data, random.Random(seed))
        assert len(out) == len(data)
        changed = [i for i, (a, b) in enumerate(zip(data, out)) if a != b]
        assert all(sof + 5 <= i < sof + 9 for i in changed), changed
        heights.add(out[sof + 5 : sof + 7])
    assert b"\x00\x00" in heights
