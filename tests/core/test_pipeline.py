"""The one case pipeline: every door gives the same answer, the domain check (OOD + DICOM modality) is
on every Case, the domain policy decides labels, and the predictions CSV streams and resumes."""
from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest

from pellucid.cli import main
from pellucid.core.ood import modality_reasons
from pellucid.core.pipeline import CasePipeline, CaseWriter, PipelineError, csv_fields, spreadsheet_safe
from pellucid.core.predict import Predictor

from tests.conftest import data_dir


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Three chest X-rays, a photo of another task, and a CT and a DX DICOM from the shared samples."""
    root = tmp_path_factory.mktemp("inputs")
    cxr = sorted((data_dir("tb_cxr") / "normal").iterdir())[:2] + sorted((data_dir("tb_cxr") / "tuberculosis").iterdir())[:1]
    photo = sorted((data_dir("waste") / "glass").iterdir())[:1]
    dicom = data_dir("dicom")
    files = [*cxr, *photo, dicom / "CT_Explicit_Little.dcm",
             next(f for f in sorted(dicom.iterdir()) if f.name.startswith("1.3.6.1"))]
    for f in files:
        shutil.copyfile(f, root / f.name)
    return root, [root / f.name for f in files]


def _csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_every_door_gives_the_same_labels_probabilities_flags_and_maps(tiny_model_dir, inputs, tmp_path):
    from pellucid.explain.pipeline import explain_cases
    from pellucid.explain.report import write_report
    from pellucid.ui import logic

    root, files = inputs
    pred = Predictor(tiny_model_dir)
    lib = {c.name: c for c in pred.predict_paths(files)}
    assert main(["predict", "--model", str(tiny_model_dir), "--out", str(tmp_path / "p.csv"), "--workers", "0",
                 *map(str, files)]) == 0
    cli = {r["path"]: r for r in _csv(tmp_path / "p.csv")}
    written = write_report(tiny_model_dir, files, methods=[], out_dir=tmp_path / "rep")
    rep = {r["path"]: r for r in _csv([p for p in written if p.suffix == ".csv"][0])}
    uploads = [logic.read_upload(f.name, f.read_bytes()) for f in files]
    app = {c.name: c for c in logic.uploads_to_cases(pred, uploads)}
    assert len(lib) == len(cli) == len(rep) == len(app) == len(files)
    for name, case in lib.items():
        shown = name if case.is_dicom else case.path.name  # the app sees upload names, not paths
        for row in (cli[name], rep[name]):
            assert row["label"] == (case.label or "") and row["domain"] == case.row(pred.classes)["domain"]
            for k in pred.classes:
                assert float(row[f"prob_{k}"]) == pytest.approx(case.probs[k], abs=1e-6)
        other = app[shown]
        assert other.label == case.label and other.ood.flagged == case.ood.flagged
        assert other.ood.reasons == case.ood.reasons
        assert all(abs(other.probs[k] - case.probs[k]) <= 1e-6 for k in pred.classes)
    # Grad-CAM of the same inputs through the explain half: from files and from uploads, identical maps
    from_files = [c for c in pred.pipeline().from_paths(files) if not c.error]
    from_uploads = [c for c in logic.uploads_to_cases(pred, uploads) if not c.error]
    explain_cases(pred, from_files, ["gradcam"], score=False)
    explain_cases(pred, from_uploads, ["gradcam"], score=False)
    for a, b in zip(from_files, from_uploads):
        np.testing.assert_allclose(a.explanations[0].heatmap, b.explanations[0].heatmap, atol=1e-6)


def test_non_radiograph_dicoms_and_other_photos_are_flagged_for_a_chest_xray_model(tiny_model_dir, inputs):
    _, files = inputs
    cases = {c.path.name: c for c in Predictor(tiny_model_dir).predict_paths(files)}
    ct = cases["CT_Explicit_Little.dcm"]
    assert ct.ood.flagged and any("Modality CT" in r and "not a chest radiograph" in r for r in ct.ood.reasons)
    assert ct.label is None and ct.withheld  # a CXR model withholds labels of flagged inputs by default
    dx = next(c for n, c in cases.items() if n.startswith("1.3.6.1"))
    assert not any("Modality" in r for r in dx.ood.reasons)  # a chest DX fits the modality check
    photo = next(c for c in cases.values() if c.path.suffix == ".jpg")
    assert photo.ood.flagged and any("colours" in r for r in photo.ood.reasons)


@pytest.mark.parametrize("meta, task, expect", [
    ({"format": "dicom", "modality": "MR", "sop_class": "MR Image Storage"}, "CXR", "Modality MR"),
    ({"format": "dicom", "modality": "US"}, "CXR", "not a chest radiograph"),
    ({"format": "dicom", "modality": "DX", "sop_class": "Digital Mammography X-Ray Image Storage - For Presentation"},
     "CXR", "mammogram"),
    ({"format": "dicom", "modality": "CR", "body_part": "KNEE"}, "CXR", "BodyPartExamined KNEE"),
    ({"format": "dicom", "modality": "OT"}, "CXR", "Modality OT"),
    ({"format": "dicom", "modality": "CT"}, "photo", "Modality CT"),
    ({"format": "dicom", "modality": "XC"}, "sonar", "takes no DICOM"),
])
def test_modality_reasons(meta, task, expect):
    reasons = modality_reasons(meta, task)
    assert reasons and expect in " ".join(reasons)


@pytest.mark.parametrize("meta, task", [
    ({"format": "dicom", "modality": "DX", "body_part": "CHEST"}, "CXR"),
    ({"format": "dicom", "modality": "CR"}, "CXR"),
    ({"format": "png"}, "CXR"),
    ({"format": "dicom", "modality": "CT"}, None),
])
def test_modality_reasons_pass(meta, task):
    assert modality_reasons(meta, task) == []


def test_domain_policy_decides_labels_of_flagged_inputs(tiny_model_dir, inputs, tmp_path):
    _, files = inputs
    ct = [f for f in files if f.name.startswith("CT_")]
    for policy, expect_label in (("withhold", False), ("label", True)):
        out = tmp_path / f"{policy}.csv"
        assert main(["predict", "--model", str(tiny_model_dir), "--out", str(out), "--domain-policy", policy,
                     *map(str, ct)]) == 0
        row = _csv(out)[0]
        assert row["domain"] == "out_of_domain" and "Modality CT" in row["domain_reason"]
        assert bool(row["label"]) == expect_label and float(row["prob_normal"]) >= 0
        assert row["path"].startswith("DICOM ")  # DICOM names are hashed by default


def test_predict_streams_and_resumes(tiny_model_dir, inputs, tmp_path):
    root, files = inputs
    out = tmp_path / "r.csv"
    assert main(["predict", "--model", str(tiny_model_dir), "--out", str(out), *map(str, files[:2])]) == 0
    first = _csv(out)
    assert main(["predict", "--model", str(tiny_model_dir), "--out", str(out), *map(str, files)]) == 0
    rows = _csv(out)
    assert rows[:2] == first and len(rows) == len(files)  # earlier rows kept, none repeated
    assert len({r["path"] for r in rows}) == len(files)
    assert main(["predict", "--model", str(tiny_model_dir), "--out", str(out), "--no-resume", str(files[0])]) == 0
    assert len(_csv(out)) == 1


def test_resume_after_a_run_killed_mid_row(tiny_model_dir, inputs, tmp_path):
    _, files = inputs
    out = tmp_path / "cut.csv"
    assert main(["predict", "--model", str(tiny_model_dir), "--out", str(out), *map(str, files[:3])]) == 0
    text = out.read_text()
    out.write_text(text[: len(text) - 25])  # the third row cut in the middle, no newline
    assert main(["predict", "--model", str(tiny_model_dir), "--out", str(out), *map(str, files)]) == 0
    rows = _csv(out)
    assert len(rows) == len(files) and len({r["path"] for r in rows}) == len(files)
    assert all(r["domain"] in ("ok", "uncertain", "out_of_domain") for r in rows)  # no glued, malformed row


def test_workers_give_the_same_cases_as_the_main_process(tiny_model_dir, inputs):
    root, _ = inputs
    pred = Predictor(tiny_model_dir)
    a = list(pred.pipeline(workers=0, batch_size=2).from_paths([root]))
    b = list(pred.pipeline(workers=2, batch_size=2).from_paths([root]))
    assert [c.name for c in a] == [c.name for c in b]
    for x, y in zip(a, b):
        assert x.label == y.label and x.probs == y.probs and x.error == y.error


def test_cases_stream_one_batch_at_a_time(tiny_model_dir, inputs, monkeypatch):
    """The first Case arrives before the later files are read: memory is bounded by a batch."""
    root, files = inputs
    pipe = Predictor(tiny_model_dir).pipeline(batch_size=2, workers=0, keep_images=False)
    read = []
    original = pipe._read
    monkeypatch.setattr(pipe, "_read", lambda src: (read.append(src.path), original(src))[1])
    stream = pipe.from_paths([root])
    first = next(stream)
    assert first.image is None and len(read) == 2 < len(files)
    assert len([first, *stream]) == len(files)


def test_bad_requests_are_one_line(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["predict", "--model", str(tiny_model_dir), str(tmp_path / "empty")]) == 2
    assert "no image or DICOM files" in capsys.readouterr().err
    assert main(["predict", "--model", str(tiny_model_dir), "--out", str(tmp_path), str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "is a folder" in err and "\n" not in err
    with pytest.raises(PipelineError):
        list(Predictor(tiny_model_dir).pipeline().from_paths([tmp_path / "empty"]))


def test_writer_refuses_a_foreign_csv(tmp_path):
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(PipelineError, match="columns"):
        CaseWriter(other, ["x", "y"], resume=True)
    assert csv_fields(["x"]) == ["path", "label", "prob_x", "domain", "domain_reason", "error"]


def test_in_memory_arrays_go_through_the_same_checks(tiny_model_dir):
    pred = Predictor(tiny_model_dir)
    rng = np.random.default_rng(0)
    colourful = rng.random((64, 64, 3)).astype(np.float32)
    blank = np.full((64, 64), 0.5, np.float32)
    cases = CasePipeline(pred).from_images([colourful, blank], names=["noise", "blank"])
    assert cases[0].ood.flagged and cases[1].ood.flagged
    assert any("blank" in r for r in cases[1].ood.reasons)


def test_unreadable_folders_and_link_loops_are_rows(tiny_model_dir, inputs, tmp_path):
    import os

    root, files = inputs
    tree = tmp_path / "tree"
    (tree / "ok").mkdir(parents=True)
    shutil.copyfile(files[0], tree / "ok" / "a.png")
    (tree / "loop").symlink_to(tree / "loop")  # a link to itself
    (tree / "locked").mkdir()
    shutil.copyfile(files[1], tree / "locked" / "b.png")
    os.chmod(tree / "locked", 0)
    try:
        cases = list(Predictor(tiny_model_dir).pipeline().from_paths([tree]))
    finally:
        os.chmod(tree / "locked", 0o755)
    by_name = {c.name: c for c in cases}
    assert not by_name["ok/a.png"].error
    assert by_name["loop"].error.startswith("loop: ")
    if os.geteuid() != 0:  # root can read any folder: only then is "locked" readable
        assert by_name["locked"].error.startswith("locked: ")


def test_file_names_of_any_bytes_reach_every_output_as_one_line(tiny_model_dir, inputs, tmp_path):
    """A name that is not UTF-8, or holds a tab, a newline or a right-to-left mark, had stopped `predict`
    with a traceback and no rows: now each is one row under an escaped name, and a rerun resumes."""
    import os

    root, files = inputs
    tree = tmp_path / "tree"
    tree.mkdir()
    names = [b"bad\xff\xfe.png", b"tab\there.png", b"new\nline.png", "\u202egnp.exe.png".encode()]
    for name in names:
        shutil.copyfile(files[0], os.fsencode(tree) + b"/" + name)
    out = tmp_path / "preds.csv"
    assert main(["predict", "--model", str(tiny_model_dir), "--out", str(out), str(tree)]) == 0
    rows = _csv(out)
    assert sorted(r["path"] for r in rows) == sorted(["bad\\xff\\xfe.png", "tab\\there.png", "new\\nline.png",
                                                      "\\u202egnp.exe.png"])
    assert all(r["label"] and not r["error"] for r in rows)
    assert main(["predict", "--model", str(tiny_model_dir), "--out", str(out), str(tree)]) == 0
    assert len(_csv(out)) == 4  # resumed: the escaped names match


@pytest.mark.parametrize("keep_images", [True, False])
def test_a_strip_or_a_thumbnail_is_flagged_and_its_label_withheld(tiny_model_dir, tmp_path, keep_images):
    """Every model squashes its input into a square: a 3 × 2000 strip or a 4-px icon gets an answer from
    the network, so the domain check flags it (streamed folders keep only a small view: same answer)."""
    from PIL import Image as PILImage

    rng = np.random.default_rng(0)
    PILImage.fromarray((rng.random((3, 2000)) * 255).astype(np.uint8)).save(tmp_path / "strip.png")
    PILImage.fromarray((rng.random((4, 4)) * 255).astype(np.uint8)).save(tmp_path / "icon.png")
    PILImage.fromarray((rng.random((40, 150)) * 255).astype(np.uint8)).save(tmp_path / "wide.png")
    cases = {c.name: c for c in Predictor(tiny_model_dir).pipeline(policy="withhold", keep_images=keep_images)
             .from_paths([tmp_path])}
    assert "a strip, 667 times as long as it is wide" in cases["strip.png"].ood.summary()
    assert "only 4 px on its short side" in cases["icon.png"].ood.summary()
    for name in ("strip.png", "icon.png"):
        assert cases[name].ood.flagged and cases[name].label is None and not cases[name].error
    assert not any("strip" in r or "short side" in r for r in cases["wide.png"].ood.reasons)


@pytest.mark.timeout(60)
def test_pipes_and_devices_are_error_rows_never_read(tiny_model_dir, inputs, tmp_path):
    """A named pipe would block its reader and /dev/zero never ends: in a folder or given by name, each is
    one error row from its ``stat``, a DICOM-named one without its name, and the rest of the run goes on."""
    import os

    if not hasattr(os, "mkfifo") or not os.path.exists("/dev/zero"):
        pytest.skip("needs named pipes and /dev/zero")
    root, files = inputs
    tree = tmp_path / "tree"
    tree.mkdir()
    shutil.copyfile(files[0], tree / "a.png")
    os.mkfifo(tree / "pipe.png")
    os.mkfifo(tree / "DOE_JOHN.dcm")
    (tree / "zero.png").symlink_to("/dev/zero")
    pipeline = Predictor(tiny_model_dir).pipeline()
    by_name = {c.name: c for c in pipeline.from_paths([tree])}
    assert sorted(by_name) == ["DICOM file", "a.png", "pipe.png", "zero.png"]
    assert not by_name["a.png"].error and by_name["a.png"].label
    for name, case in by_name.items():
        if name != "a.png":
            assert case.error.startswith(f"{name}: is not a regular file") and case.label is None
    alone = list(pipeline.from_paths([tree / "pipe.png", tree / "zero.png", tree / "DOE_JOHN.dcm"]))
    assert [c.error.split(":")[0] for c in alone] == [str(tree / "pipe.png"), str(tree / "zero.png"), "DICOM file"]
    assert all("not a regular file" in c.error and "DOE" not in c.error for c in alone)


def test_a_model_that_gives_nan_is_an_error_row_not_a_label(tiny_model_dir, inputs, tmp_path):
    """NaN weights (a damaged or hand-made model.safetensors) make NaN probabilities, and the argmax of NaN is the
    first class: each input had been given a confident-looking label with empty probabilities."""
    from safetensors.torch import load_file, save_file

    damaged = tmp_path / "model"
    shutil.copytree(tiny_model_dir, damaged)
    state = load_file(str(damaged / "model.safetensors"))
    head = next(k for k in state if k.endswith("weight") and state[k].dim() == 2)
    state[head][:] = float("nan")
    save_file(state, str(damaged / "model.safetensors"))
    root, files = inputs
    out = tmp_path / "p.csv"
    assert main(["predict", "--model", str(damaged), "--out", str(out), "--workers", "0", str(files[0])]) == 1
    row = _csv(out)[0]
    assert row["label"] == "" and "the model gave no finite probabilities" in row["error"]


def test_decoding_workers_are_at_most_one_per_core_and_batches_at_most_256(tiny_model_dir):
    """`--workers 1000` had asked the DataLoader for a thousand processes, each importing torch, and a batch is
    decoded and held whole, so `--batch-size 100000` would have held a large folder in memory at once."""
    import os

    pred = Predictor(tiny_model_dir)
    assert CasePipeline(pred, workers=1000).workers == (os.cpu_count() or 1)
    assert CasePipeline(pred, workers=-3).workers == 0 and CasePipeline(pred, workers=1).workers == 1
    assert CasePipeline(pred, batch_size=100_000).batch_size == 256
    assert CasePipeline(pred, batch_size=0).batch_size == 1 and CasePipeline(pred, batch_size=32).batch_size == 32


def test_an_unexpected_reader_failure_is_one_row_not_a_lost_run(tiny_model_dir, inputs, monkeypatch):
    import pellucid.core.pipeline as pipeline_mod

    root, files = inputs

    def boom(path):
        if path.name.startswith("CT_"):
            raise MemoryError("SECRET123 in a message that must not be quoted")
        return False

    monkeypatch.setattr(pipeline_mod, "is_dicom", boom)
    cases = list(Predictor(tiny_model_dir).pipeline().from_paths(files))
    assert len(cases) == len(files)
    bad = [c for c in cases if c.error]
    assert len(bad) == 1 and "MemoryError" in bad[0].error and "SECRET123" not in bad[0].error
    assert bad[0].name == "DICOM file"


def test_a_file_name_a_spreadsheet_would_run_is_written_as_text_and_resumes(tiny_model_dir, tmp_path):
    import csv

    hostile = tmp_path / "in"
    hostile.mkdir()
    (hostile / "=HYPERLINK(x).png").write_bytes(b"not a PNG")  # an error row that names the file
    src = sorted((data_dir("tb_cxr") / "normal").iterdir())[0]
    (hostile / "@SUM(1).png").symlink_to(src)
    out = tmp_path / "p.csv"
    argv = ["predict", "--model", str(tiny_model_dir), "--workers", "0", "--out", str(out), str(hostile)]
    assert main(argv) == 1
    rows = list(csv.DictReader(out.open(newline="")))
    assert len(rows) == 2 and all(r["path"].startswith("'") for r in rows), rows
    assert rows[0]["error"].startswith("'") and rows[1]["label"] and not rows[1]["error"]
    assert main(argv) == 0 and len(list(csv.DictReader(out.open(newline="")))) == 2  # the rerun skips both
    assert spreadsheet_safe("-1") == "-1" and spreadsheet_safe("-x") == "'-x" and spreadsheet_safe(0.5) == 0.5


def test_eval_explain_and_report_refuse_to_write_into_a_model_folder(tiny_model_dir, inputs, tmp_path):
    import shutil

    root, files = inputs
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    before = {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()}
    data = tmp_path / "data"
    for cls in ("normal", "tuberculosis"):
        (data / cls).mkdir(parents=True)
        shutil.copyfile(files[0], data / cls / "card.png")  # explains to card.json
    for argv in (["eval", "--model", str(model), "--data", str(data), "--out", str(model)],
                 ["explain", "--model", str(model), "--method", "gradcam", "--out", str(model), str(data)],
                 ["report", "--model", str(model), "--out", str(model), str(data)]):
        assert main(argv) == 2, argv
    assert {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()} == before


def test_a_full_disk_is_one_line_and_keeps_the_rows_written(tiny_model_dir, inputs, tmp_path, capsys):
    """No space left while writing: the header (/dev/full) or a later row. One line that says what is
    kept; the rows already written stay and a rerun continues after them."""
    import errno
    import os

    from pellucid.core.pipeline import CaseWriter

    root, files = inputs
    if os.path.exists("/dev/full"):
        assert main(["predict", "--model", str(tiny_model_dir), "--out", "/dev/full", str(files[0])]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("pellucid predict: error: /dev/full: cannot be written (No space left")
        assert "Traceback" not in "\n".join(err)
    out = tmp_path / "preds.csv"
    cases = list(Predictor(tiny_model_dir).pipeline().from_paths(files[:3]))
    writer = CaseWriter(out, Predictor(tiny_model_dir).classes)
    writer.write(cases[0])

    class Full:
        def __init__(self, fh):
            self.fh = fh

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            self.fh.close()

    writer._fh = Full(writer._fh)
    writer._w = csv.DictWriter(writer._fh, fieldnames=writer.fields)
    with pytest.raises(PipelineError, match="cannot be written .* rows already written are kept"):
        writer.write(cases[1])
    writer.close()  # after the failure: nothing more to write, no second error
    assert [r["path"] for r in _csv(out)] == [cases[0].name]
    again = CaseWriter(out, Predictor(tiny_model_dir).classes, resume=True)
    assert again.done(cases[0].name) and not again.done(cases[1].name)
    again.close()


def test_predict_to_a_pipe_whose_reader_left_stops_quietly(tiny_model_dir, inputs):
    import subprocess
    import sys

    root, files = inputs
    cmd = [sys.executable, "-m", "pellucid", "predict", "--model", str(tiny_model_dir), *map(str, files * 20)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.readline()
    proc.stdout.close()  # `| head -1`
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert first.startswith(b"path,label,") and "Traceback" not in err and "BrokenPipeError" not in err


def test_a_full_disk_under_any_command_is_one_line(tiny_model_dir, inputs, tmp_path, capsys, monkeypatch):
    import errno

    import pellucid.explain.run as run

    root, files = inputs

    def full(path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(run, "save_overlay", full)
    assert main(["explain", "--model", str(tiny_model_dir), "--method", "gradcam", "--out", str(tmp_path / "x"),
                 str(files[0])]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("pellucid explain: error: No space left on device writing ") and "free some space" in err


def test_a_disc_export_of_dicom_files_without_suffixes_is_read_and_other_formats_are_rows(tiny_model_dir, inputs,
                                                                                           tmp_path):
    """A folder as a PACS or disc export writes it (IM000001, no suffix) used to be "no image or DICOM files"; now
    each DICOM file is a hashed row with a prediction, and a .gif or .webp is a row that says to convert it."""
    _, files = inputs
    disc = tmp_path / "disc" / "SE0"
    disc.mkdir(parents=True)
    ct = next(f for f in files if f.name == "CT_Explicit_Little.dcm")
    shutil.copyfile(ct, disc / "IM000001")
    shutil.copyfile(ct, disc / "1.2.840.113619.2.55.3.604688119.868")
    (disc / "frame.gif").write_bytes(b"GIF89a" + b"\0" * 20)
    (disc / "NOTES").write_text("not an image")
    out = tmp_path / "p.csv"
    assert main(["predict", "--model", str(tiny_model_dir), "--out", str(out), "--workers", "0",
                 str(tmp_path / "disc")]) == 1
    rows = _csv(out)
    assert len(rows) == 3
    dicoms = [r for r in rows if r["path"].startswith("DICOM ")]
    assert len(dicoms) == 2 and all(not r["error"] and r["prob_normal"] for r in dicoms)
    assert "IM000001" not in out.read_text() and "604688119" not in out.read_text()  # DICOM names are hashed
    gif = next(r for r in rows if r["path"] == "SE0/frame.gif")
    assert "unsupported file type '.gif'" in gif["error"] and "convert it" in gif["error"]
