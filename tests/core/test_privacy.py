"""No patient data through any channel: DICOM files named after the patient, whole or corrupted in many
ways, go through every door (predict CSV + stdout/stderr + log, explain JSON/PNG names, report
HTML/PDF/CSV, the web app's upload path), and none of the planted identifiers comes out unless
identifiers were asked for."""
from __future__ import annotations

import logging
import subprocess
import shutil

import pytest

from pellucid.cli import main
from pellucid.core.privacy import display_name, scrub_path

from tests.ui.helpers import write_dicom

pydicom = pytest.importorskip("pydicom", reason="DICOM tests need pellucid[dicom]")

SECRETS = ("doe", "jane", "secret123", "19700101", "hospital of secrets", "gregory")


def _corruptions(src, folder):
    """The clean file and corrupted copies, each named after the patient."""
    from pydicom import dcmread

    out = []
    clean = folder / "DOE_JANE_SECRET123.dcm"
    shutil.copyfile(src, clean)
    out.append(clean)

    def variant(name, change):
        ds = dcmread(src, force=True)
        change(ds)
        path = folder / f"DOE_JANE_SECRET123_{name}.dcm"
        ds.save_as(path, enforce_file_format=False)
        out.append(path)

    variant("nopixels", lambda ds: delattr(ds, "PixelData"))
    variant("modality", lambda ds: setattr(ds, "Modality", "DOE^JANE SECRET123"))
    variant("sop", lambda ds: setattr(ds, "SOPClassUID", "1.2.3.SECRET123"))
    def text_slope(ds):  # a RescaleSlope written with a text VR holding the patient's name
        del ds.RescaleSlope
        ds.add_new((0x0028, 0x1053), "LO", "Doe^Jane")

    variant("slope", text_slope)
    variant("multislope", lambda ds: setattr(ds, "RescaleSlope", ["1", "2"]))
    variant("rows", lambda ds: setattr(ds, "Rows", 999))
    data = clean.read_bytes()
    trunc = folder / "DOE_JANE_SECRET123_truncated.dcm"
    trunc.write_bytes(data[: len(data) // 2])
    out.append(trunc)
    spliced = folder / "DOE_JANE_SECRET123_spliced.dcm"
    spliced.write_bytes(data[:400] + b"Doe^Jane SECRET123 Hospital of Secrets" + data[400:])
    out.append(spliced)
    return out


def _leaks(text: str) -> list[str]:
    low = text.lower().replace("^", " ")
    return [s for s in SECRETS if s in low]


def _all_text(folder) -> str:
    parts = []
    for p in sorted(folder.rglob("*")):
        parts.append(p.name)
        if p.is_file() and p.suffix in (".csv", ".json", ".html", ".log", ".txt"):
            parts.append(p.read_text(errors="replace"))
        if p.is_file() and p.suffix == ".pdf" and shutil.which("pdftotext"):
            parts.append(subprocess.run(["pdftotext", str(p), "-"], capture_output=True, text=True).stdout)
    return "\n".join(parts)


def test_no_identifier_leaves_through_any_door(tiny_model_dir, tmp_path, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    src = write_dicom(tmp_path / "src.dcm")
    inputs = tmp_path / "in"
    inputs.mkdir()
    files = _corruptions(src, inputs)
    caplog.clear()  # pydicom warned while the test wrote the corrupt files; only the runs' logs count
    capsys.readouterr()
    out = tmp_path / "out"
    main(["predict", "--model", str(tiny_model_dir), "--out", str(out / "p.csv"), str(inputs)])
    main(["explain", "--model", str(tiny_model_dir), "--method", "gradcam", "--out", str(out / "explain"), str(inputs)])
    main(["report", "--model", str(tiny_model_dir), "--methods", "gradcam", "--out", str(out / "report"), str(inputs)])
    from pellucid.core.predict import Predictor
    from pellucid.ui import logic

    uploads = [logic.read_upload(f.name, f.read_bytes()) for f in files]
    cases = logic.uploads_to_cases(Predictor(tiny_model_dir), uploads)
    app_text = "\n".join([u.name + " " + u.error for u in uploads] + [c.name + " " + c.error for c in cases]
                         + [logic.csv_bytes(cases, ["normal", "tuberculosis"]).decode()])
    captured = capsys.readouterr()
    channels = {"files": _all_text(out), "stdout": captured.out, "stderr": captured.err, "log": caplog.text,
                "web app": app_text}
    for channel, text in channels.items():
        lines = [ln for ln in text.splitlines() if _leaks(ln)]
        assert not lines, (channel, lines[:3])
    # the runs did see the inputs: one CSV row each, errors for the broken ones
    rows = (out / "p.csv").read_text().strip().splitlines()
    assert len(rows) == len(files) + 1 and sum(1 for r in rows if r.startswith("DICOM ")) == len(files)


def test_identifiers_appear_when_asked_for(tiny_model_dir, tmp_path):
    """The check above could fail: with --include-identifiers the file names are there."""
    src = write_dicom(tmp_path / "DOE_JANE_SECRET123.dcm")
    out = tmp_path / "p.csv"
    main(["predict", "--model", str(tiny_model_dir), "--out", str(out), "--include-identifiers", str(src)])
    assert "DOE_JANE_SECRET123" in out.read_text()


def test_display_names_and_scrubbing(tmp_path):
    assert display_name("DOE_JANE.dcm", "ab" * 32, dicom=True) == "DICOM " + "ab" * 6
    assert display_name("x.png", "ab" * 32, dicom=False) == "x.png"
    p = tmp_path / "DOE_JANE.dcm"
    msg = f"{p}: bad; also {p.name} and {p.resolve()}"
    assert "DOE" not in scrub_path(msg, p, "DICOM 1234")


def test_safe_text_makes_any_file_name_one_printable_line():
    from pellucid.core.privacy import safe_text

    raw = b"scan\xff\xfe.png".decode("utf-8", "surrogateescape")  # a Linux name that is not UTF-8
    assert safe_text(raw) == "scan\\xff\\xfe.png"
    assert safe_text("a\tb\nc.png") == "a\\tb\\nc.png"
    assert safe_text("\u202egnp.exe.png") == "\\u202egnp.exe.png"  # shown as "exe.png" otherwise
    assert safe_text("a\u2028b.png") == "a\\u2028b.png"  # a line separator breaks the line in some viewers
    assert safe_text("\ud800x") == "\\xed\\xa0\\x80x"  # a lone surrogate
    for ok in ("Röntgen thorax 01.png", "胸部.png", "a b.png"):
        assert safe_text(ok) == ok
    for text in (raw, "a\tb", "\u202ex"):
        assert safe_text(safe_text(text)) == safe_text(text)
        safe_text(text).encode("utf-8")  # every output can write it
