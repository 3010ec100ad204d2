"""Smoke tests of the predict-at-scale and out-of-domain benchmarks (``bench/bench_predict.py``,
``bench/bench_ood.py``): their core functions run end to end on a tiny scale (a few images, the
``test_resnet`` backbone with random weights) and their tables render. Numbers are not checked."""
from __future__ import annotations

import math

from bench import bench_ood, bench_predict
from tests.conftest import data_dir


def test_bench_predict_core_runs_on_twenty_images(tiny_model_dir, tmp_path):
    files = bench_predict.input_files(data_dir("tb_cxr"), 20)
    res = bench_predict.measure(tiny_model_dir, files, small=None, workers=(0,), resume=("half",), startup=False,
                                work=tmp_path)
    assert list(res["runs"]) == [(0, 20)]
    for (workers, n), run in res["runs"].items():
        assert run["rc"] == 0, run["stderr"][-2000:]
        assert run["rows"] == {"rows": n, "unique": n, "malformed": 0, "duplicates": 0, "missing": 0}
        assert run["maxrss_mib"] > 0 and run["tree_peak_mib"] > 0
    (resumed,) = res["resume"]
    assert resumed["skipped"] == resumed["complete_rows"] > 0, resumed
    assert resumed["skipped"] + resumed["written"] == 20 and resumed["missing"] == 0, resumed
    text = "\n".join(bench_predict.table(res, "tiny test model", "test CPU"))
    assert "× raw forward" in text and "## Resume" in text and "test CPU" in text


def test_bench_ood_core_reuses_and_trains_models(tiny_model_dir, tmp_path):
    data_dir("pediatric_cxr")
    models = tmp_path / "models"
    models.mkdir()
    (models / "tb").symlink_to(tiny_model_dir)  # reused; bpd is trained here
    results = bench_ood.run(("tb", "bpd"), models, max_images=40, n_ood=12, max_test=8, backbone="test_resnet",
                            pretrained="random", synthetic=1)
    tb, bpd = results
    assert tb["train_s"] is None and bpd["train_s"] > 0 and (models / "bpd" / "ood.safetensors").is_file()
    for r in results:
        assert r["method"] == "reference" and r["n_ood"] == 12 and r["n_test"] > 0
        assert not math.isnan(r["auroc_mahalanobis"]) and not math.isnan(r["auroc_energy"])
        assert r["synthetic_flagged"][1] == len(bench_ood.SYNTHETIC_KINDS)  # one of each kind, every one scored
        assert r["other_flagged_heuristics"][0] <= r["other_flagged"][0]
    assert len(tb["dicom"]) == 12 and "dicom" not in bpd
    text = "\n".join(bench_ood.table(results, "test CPU", "python -m bench.bench_ood"))
    assert "AUROC Mahalanobis" in text and "DICOM files through the tb model" in text
    assert "## Synthetic inputs flagged, per kind" in text and "checkerboard" in text
