"""What a hostile visitor can send the web app: zip bombs and lying zips, huge and fuzzed images,
typed server paths, crashing pages; and what ``pellucid ui`` exposes (address, child process)."""
from __future__ import annotations

import argparse
import io
import logging
import os
import socket
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pellucid.ui import logic
from tests.ui.helpers import write_dicom, write_png

MB = 1 << 20


def _zip(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _one_line(message: str) -> None:
    assert message and "\n" not in message and "Traceback" not in message


# ----------------------------------------------------------------------------------------- zips
def test_zip_bomb_refused_from_the_central_directory(tmp_path):
    data = _zip({"scan.png": bytes(64 * MB)})  # zeros: ~64 KB compressed
    assert len(data) < MB
    start = time.monotonic()
    with pytest.raises(logic.UploadError, match="compressed .* times") as err:
        logic.extract_zip(data, tmp_path / "out")
    _one_line(str(err.value))
    assert not any((tmp_path / "out").rglob("*.png"))  # nothing was written
    budget = logic.ZipBudget(max_bytes=8 * MB, max_file_bytes=8 * MB, max_ratio=1e9)
    with pytest.raises(logic.UploadError, match="unpacks to 64.0 MB, over the limit of 8.0 MB"):
        logic.extract_zip(data, tmp_path / "out2", budget=budget)
    assert time.monotonic() - start < 10


def test_zip_budget_total_and_per_file(tmp_path):
    rng = np.random.default_rng(0)
    noise = {f"{i}.png": rng.bytes(MB // 2) for i in range(3)}  # incompressible, 1.5 MB in all
    data = _zip(noise)
    with pytest.raises(logic.UploadError, match="over the limit of 1.0 MB"):
        logic.extract_zip(data, tmp_path / "a", budget=logic.ZipBudget(max_bytes=MB))
    with pytest.raises(logic.UploadError, match="per-file limit"):
        logic.extract_zip(data, tmp_path / "b", budget=logic.ZipBudget(max_file_bytes=MB // 4))
    out = logic.extract_zip(data, tmp_path / "c", budget=logic.ZipBudget(max_bytes=2 * MB))
    assert sorted(p.name for p in out.iterdir()) == ["0.png", "1.png", "2.png"]


def _lie_about_size(data: bytes, declared: int) -> bytes:
    """The zip with every header's uncompressed size of its (one) member set to ``declared``."""
    raw = bytearray(data)
    local = raw.find(b"PK\x03\x04")
    struct.pack_into("<I", raw, local + 22, declared)
    central = raw.find(b"PK\x01\x02")
    struct.pack_into("<I", raw, central + 24, declared)
    return bytes(raw)


def test_zip_member_lying_about_its_size_is_refused_while_streaming(tmp_path):
    honest = _zip({"scan.png": bytes(32 * MB)})
    liar = _lie_about_size(honest, 1000)  # "1000 bytes": passes the central-directory budget
    info = zipfile.ZipFile(io.BytesIO(liar)).infolist()[0]
    assert info.file_size == 1000
    budget = logic.ZipBudget(max_bytes=4 * MB, max_file_bytes=4 * MB)
    with pytest.raises(logic.UploadError, match="damaged|more than its header says") as err:
        logic.extract_zip(liar, tmp_path / "out", budget=budget)
    _one_line(str(err.value))
    assert not (tmp_path / "out").exists()  # what was written is removed


@pytest.mark.parametrize("name", ["../evil.png", "a/../../evil.png", "/etc/evil.png", "C:/evil.png",
                                  "..\\evil.png"])
def test_zip_names_outside_the_folder_refused(tmp_path, name):
    with pytest.raises(logic.UploadError, match="points outside the folder") as err:
        logic.extract_zip(_zip({name: b"x"}), tmp_path / "out")
    _one_line(str(err.value))
    assert not (tmp_path / "evil.png").exists()


def test_a_deflated_dicom_upload_is_refused_before_pydicom_inflates_it(tmp_path, monkeypatch):
    """The upload's header check parsed a deflated DICOM with pydicom, which inflates the whole dataset in
    memory first: a 1.5 MB upload inflating to 1.5 GB took 4 GB and 23 s before the readers' own guard
    refused it. The guard now runs first, and the upload gets the command line's line."""
    import zlib

    from pydicom import dcmread
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    from pellucid.datasets.readers import ImageReadError, read_image
    from pellucid.datasets.readers.limits import max_inflated_bytes

    monkeypatch.setenv("PELLUCID_MAX_PIXELS", "1000")  # a budget of about 16 MB inflated
    ds = dcmread(write_dicom(tmp_path / "plain.dcm"))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(tmp_path / "deflated.dcm", enforce_file_format=True)
    raw = (tmp_path / "deflated.dcm").read_bytes()
    meta_end = 132 + 12 + int.from_bytes(raw[140:144], "little")
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = comp.compress(zlib.decompress(raw[meta_end:], -zlib.MAX_WBITS))
    large = max_inflated_bytes() + (8 << 20)  # one private OB element of zeros past the budget
    body += comp.compress(b"\x11\x00\x10\x10OB\0\0" + large.to_bytes(4, "little")) + comp.compress(bytes(large))
    body += comp.flush()
    bomb = tmp_path / "bomb.dcm"
    bomb.write_bytes(raw[:meta_end] + body)
    with pytest.raises(ImageReadError, match="inflates to more than") as err:
        read_image(bomb)
    inflated: list[int] = []
    real = zlib.decompress

    def spy(data, *args, **kwargs):  # pydicom inflates a deflated dataset in one call
        out = real(data, *args, **kwargs)
        inflated.append(len(out))
        return out

    monkeypatch.setattr(zlib, "decompress", spy)
    up = logic.read_upload("bomb.dcm", bomb.read_bytes())
    assert up.image is None and "inflates to more than" in up.error
    assert up.error == str(err.value).replace(str(bomb), up.name)
    assert inflated == []


def test_zip_symlink_member_refused(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        link = zipfile.ZipInfo("imgs/passwd.png")
        link.external_attr = (0o120777 << 16)
        zf.writestr(link, "/etc/passwd")
    with pytest.raises(logic.UploadError, match="symbolic link"):
        logic.extract_zip(buf.getvalue(), tmp_path / "out")


def test_zip_too_many_files_bzip2_and_nested_zip(tmp_path):
    many = _zip({f"{i}.png": b"x" for i in range(30)})
    with pytest.raises(logic.UploadError, match="30 files, over the limit of 20"):
        logic.extract_zip(many, tmp_path / "a", budget=logic.ZipBudget(max_files=20))
    with pytest.raises(logic.UploadError, match="compression other than deflate"):
        logic.extract_zip(_zip({"a.png": b"x" * 100}, zipfile.ZIP_BZIP2), tmp_path / "b")
    png = write_png(tmp_path / "a.png").read_bytes()
    inner = _zip({"hidden.png": png})
    out = logic.extract_zip(_zip({"set/a.png": png, "set/inner.zip": inner}), tmp_path / "c")
    assert [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()] == ["set/a.png"]


def test_zip_damaged_is_one_line(tmp_path):
    data = bytearray(_zip({"a.png": write_png(tmp_path / "a.png", size=200).read_bytes()}))
    data[60:200] = bytes(140)  # the compressed stream
    with pytest.raises(logic.UploadError) as err:
        logic.extract_zip(bytes(data), tmp_path / "out")
    _one_line(str(err.value))
    assert str(tmp_path) not in str(err.value)


# ----------------------------------------------------------------------------------- uploads
def test_upload_over_the_pixel_budget_refused_from_the_header(tmp_path, monkeypatch):
    from PIL import Image

    path = tmp_path / "wide.png"
    Image.new("L", (3000, 2000)).save(path)  # 6 Mpx of zeros: a few KB
    calls = []
    monkeypatch.setattr(logic, "read_image", lambda *a, **k: calls.append(a))
    up = logic.read_upload("wide.png", path.read_bytes(), max_pixels=1_000_000)
    assert up.image is None and calls == []  # never decoded
    assert up.error == ("wide.png declares 6 million pixels, over the 1 million limit of this app — "
                        "downscale it before uploading")
    monkeypatch.setenv("PELLUCID_MAX_UPLOAD_PIXELS", "2e6")
    assert logic.max_upload_pixels() == 2_000_000
    assert "over the 2 million limit" in logic.read_upload("wide.png", path.read_bytes()).error


def test_upload_unexpected_reader_failure_is_one_line_and_logged(tmp_path, monkeypatch, caplog):
    def boom(path, **kw):
        raise RuntimeError(f"decoder exploded reading {path}\nsecond line")

    monkeypatch.setattr(logic, "read_image", boom)
    with caplog.at_level(logging.ERROR, logger="pellucid.ui.logic"):
        up = logic.read_upload("chest.png", write_png(tmp_path / "a.png").read_bytes())
    assert up.image is None and up.error.startswith("chest.png: cannot be read")
    _one_line(up.error)
    assert "pellucid-upload-" not in up.error and "exploded" not in up.error
    assert any(r.exc_info and "exploded" in str(r.exc_info[1]) for r in caplog.records)


def test_fuzzed_dicoms_never_raise(tmp_path):
    clean = write_dicom(tmp_path / "ct.dcm").read_bytes()
    rng = np.random.default_rng(7)
    for i in range(40):
        data = bytearray(clean)
        for pos in rng.integers(128, 400, size=6):  # the header (tags, lengths, VRs)
            data[pos] = int(rng.integers(0, 256))
        up = logic.read_upload(f"fuzz{i}.dcm", bytes(data))
        if up.image is None:
            _one_line(up.error)
            assert "pellucid-upload-" not in up.error and "/tmp" not in up.error


# ------------------------------------------------------------------------------ folders
def test_resolve_in_root(tmp_path):
    root = tmp_path / "data"
    (root / "xrays" / "normal").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    (root / "escape").symlink_to(tmp_path / "secret")
    assert logic.resolve_in_root("xrays", root) == (root / "xrays").resolve()
    assert logic.resolve_in_root(str(root / "xrays" / "normal"), root) == (root / "xrays" / "normal").resolve()
    for typed in ("../secret", str(tmp_path / "secret"), "escape", "xrays/../../secret", "/etc"):
        with pytest.raises(logic.FolderError, match="outside the data root") as err:
            logic.resolve_in_root(typed, root)
        _one_line(str(err.value))
        assert str(tmp_path) not in str(err.value) or typed.startswith(str(tmp_path))
    for typed in ("missing", "~"):  # "~" is a name inside the root, not the server's home
        with pytest.raises(logic.FolderError, match="not a folder inside the data root"):
            logic.resolve_in_root(typed, root)


# ------------------------------------------------------------------------------- caches
def test_explanation_cache_bounded_in_bytes(model_dir, tmp_path, monkeypatch):
    from pellucid.core.predict import Predictor
    from pellucid.explain.report import MethodResult

    def fake_explain(predictor, cases, methods, **kw):
        for c in cases:
            h, w = c.image.array.shape[:2]
            c.explanations.append(MethodResult(methods[0], np.full((h, w), 0.5, np.float32)))
        return []

    monkeypatch.setattr(logic, "explain_cases", fake_explain)
    predictor = Predictor(model_dir)
    ups = [logic.read_upload(f"{i}.png", write_png(tmp_path / f"{i}.png", seed=i, size=64).read_bytes())
           for i in range(6)]
    cases = logic.uploads_to_cases(predictor, ups)
    per_item = 64 * 64 * 4  # a float32 heatmap at the image's resolution
    cache = logic.ExplanationCache(max_bytes=3 * per_item)
    cache.attach(predictor, cases, ["a"], "m")
    assert len(cache) == 3 and cache.nbytes == 3 * per_item
    assert all(len(c.explanations) == 1 for c in cases)  # this run still shows all of them
    masks = logic.LungMaskCache(max_bytes=2 * 64 * 64)
    for i, c in enumerate(cases):
        masks._store.put(("s", c.sha256, None), np.zeros((64, 64), np.uint8))
    assert len(masks) == 2 and masks.nbytes == 2 * 64 * 64


# ---------------------------------------------------------------------------------- cli
def _ui_args(**kw) -> argparse.Namespace:
    from pellucid.cli import build_parser

    argv = ["ui"] + [x for k, v in kw.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    return build_parser().parse_args(argv)


def test_cmd_ui_binds_loopback_and_hides_error_details(monkeypatch, capsys, tmp_path):
    import pellucid.cli as cli

    seen = {}

    class FakePopen:
        pid = 0

        def __init__(self, cmd, env=None, start_new_session=False):
            seen.update(cmd=cmd, env=env, new_session=start_new_session)

        def wait(self, timeout=None):
            return 0

        def poll(self):
            return 0

    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    monkeypatch.delenv("PELLUCID_DATA_ROOT", raising=False)
    assert cli.cmd_ui(_ui_args()) == 0
    cmd = seen["cmd"]
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--client.showErrorDetails") + 1] == "none"
    assert seen["new_session"] and "PELLUCID_DATA_ROOT" not in seen["env"]
    assert capsys.readouterr().err == ""
    assert cli.cmd_ui(_ui_args(host="0.0.0.0", data_root=tmp_path)) == 0
    cmd = seen["cmd"]
    assert cmd[cmd.index("--server.address") + 1] == "0.0.0.0"
    assert seen["env"]["PELLUCID_DATA_ROOT"] == os.path.realpath(tmp_path)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "0.0.0.0" in err[0] and "no login" in err[0]
    with pytest.raises(cli.UserError, match="is not a folder"):
        cli.cmd_ui(_ui_args(data_root=tmp_path / "missing"))


def test_cmd_ui_gives_the_server_a_temporary_folder_and_removes_it_when_the_server_stops(monkeypatch, tmp_path):
    """Whatever the server leaves in its temporary folder (a zip unpacked by a session that never
    ended, because the server was killed) goes when ``pellucid ui`` returns."""
    import tempfile

    import pellucid.cli as cli

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    seen = {}

    class FakePopen:
        pid = 0

        def __init__(self, cmd, env=None, start_new_session=False):
            seen["tmp"] = Path(env["TMPDIR"])
            (seen["tmp"] / "pellucid-batch-x" / "imgs").mkdir(parents=True)
            (seen["tmp"] / "pellucid-batch-x" / "imgs" / "0.png").write_bytes(b"patient image")

        def wait(self, timeout=None):
            return 0

        def poll(self):
            return 0

    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    assert cli.cmd_ui(_ui_args()) == 0
    assert seen["tmp"].parent == tmp_path and seen["tmp"].name.startswith("pellucid-ui-")
    assert not seen["tmp"].exists() and list(tmp_path.iterdir()) == []


def test_the_headless_server_runs_the_command_line_of_pellucid_ui(monkeypatch, model_dir, tmp_path):
    """The browser test and the screenshot serve the app as ``pellucid ui`` does: same flags, port aside."""
    import pellucid.cli as cli
    from pellucid.ui import headless

    seen = []

    class FakePopen:
        pid = 0

        def __init__(self, cmd, **kwargs):
            seen.append(list(cmd))

        def wait(self, timeout=None):
            return 0

        def poll(self):
            return 0

    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    monkeypatch.setattr(headless, "_wait_healthy", lambda *a, **k: None)
    monkeypatch.setattr(os, "killpg", lambda *a: None)
    with headless.serve_app(model_dir, tmp_path) as url:
        port = int(url.rsplit(":", 1)[1])
    assert cli.cmd_ui(_ui_args(port=port)) == 0
    served, ui = seen
    assert served == ui
    assert ui[ui.index("--client.toolbarMode") + 1] == "minimal"  # no "Deploy" button for a clinician


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.timeout(120)
def test_sigterm_to_pellucid_ui_stops_the_server(model_dir, tmp_path):
    pytest.importorskip("streamlit")
    port = _free_port()
    env = dict(os.environ, PELLUCID_RUNS=str(tmp_path / "runs"), PELLUCID_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "pellucid", "ui", "--port", str(port), "--model", str(model_dir)],
                            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        end = time.monotonic() + 60
        while not _port_open(port):
            assert proc.poll() is None, proc.stdout.read()[-2000:]
            assert time.monotonic() < end, "the server did not open its port within 60 s"
            time.sleep(0.3)
        proc.terminate()  # SIGTERM to `pellucid ui` only, not to its child
        proc.wait(timeout=15)
        end = time.monotonic() + 5
        while _port_open(port) and time.monotonic() < end:
            time.sleep(0.2)
        assert not _port_open(port), "the Streamlit child still serves the port"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
