"""find_images: the files it returns are unchanged, and what it skips can be reported; a manifest is read
as spreadsheets write it, and a broken one is one line that names the line and what to fix."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from pellucid.datasets.samples import find_images


def _tree(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    (root / "a" / "deep").mkdir(parents=True)
    (root / "a" / "x.png").write_bytes(b"1")
    (root / "a" / "deep" / "z.dcm").write_bytes(b"1")
    (root / "a" / "notes.txt").write_bytes(b"1")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "y.png").write_bytes(b"1")
    os.symlink(tmp_path / "elsewhere", root / "a" / "linked")
    os.symlink(root, root / "a" / "loop")
    os.symlink(root / "a" / "l1.png", root / "a" / "l2.png")
    os.symlink(root / "a" / "l2.png", root / "a" / "l1.png")
    os.symlink(root / "a" / "x.png", root / "a" / "alias.png")
    os.symlink(root / "a" / "gone.png", root / "a" / "broken.png")
    (root / "locked").mkdir()
    (root / "locked" / "q.png").write_bytes(b"1")
    return root


def test_same_files_as_before_and_problems_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _tree(tmp_path)
    expected = sorted(f for f in root.rglob("*") if f.is_file() and f.suffix in {".png", ".dcm"})
    expected = [p for p in expected if p.parent.name != "locked"]
    real_scandir = os.scandir

    def scandir(path):  # noqa: ANN001, ANN202 - root reads everything: simulate a locked folder
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    problems: list[tuple[Path, str]] = []
    found = find_images([root, root / "a" / "notes.txt"], problems)
    assert found == expected + [root / "a" / "notes.txt"]
    assert find_images([root]) == expected  # same return value without ``problems``
    messages = {p.relative_to(root).as_posix(): m for p, m in problems}
    assert set(messages) == {"locked", "a/l1.png", "a/l2.png", "a/loop", "a/linked", "a/broken.png"}
    assert "cannot be listed (PermissionError)" in messages["locked"]
    assert "symbolic link loop" in messages["a/l1.png"] and "symbolic link loop" in messages["a/loop"]
    assert "not followed" in messages["a/linked"]
    assert "broken symbolic link" in messages["a/broken.png"]
    for path, message in problems:
        assert "\n" not in message and str(path) not in message and " — " in message


@pytest.mark.parametrize("text, encoding, expect", [
    ("\ufeffpath , label,group\na.png,x,g1\n\"b,1.png\",y,g2\n", "utf-8", None),  # Excel's BOM, spaces, quotes
    ("path,label\na.png,x\nb,1.png,y\n", "utf-8", "line 3: more fields than the header's columns; put a path"),
    ("path,label\na.png,\n", "utf-8", "line 2: empty path or label"),
    ("path,label\ncafé.png,x\n", "latin-1", "is not UTF-8 text; save it as CSV with UTF-8 encoding"),
    ("path,label\na\0.png,x\n", "utf-8", "line 2: holds a NUL byte"),
    ("file,class\na.png,x\n", "utf-8", "needs columns path,label; found ['class', 'file']"),
])
def test_a_manifest_as_spreadsheets_write_it_or_one_line_that_says_what_to_fix(tmp_path, text, encoding, expect):
    from pellucid.datasets.samples import DataError, load_samples

    (tmp_path / "manifest.csv").write_bytes(text.encode(encoding))
    if expect is None:
        samples = load_samples(tmp_path)
        got = [(Path(s.path).name, s.label, s.group) for s in samples]
        assert got == [("a.png", "x", "g1"), ("b,1.png", "y", "g2")]
        return
    with pytest.raises(DataError) as info:
        load_samples(tmp_path)
    message = str(info.value)
    assert expect in message and "\n" not in message and message.startswith(str(tmp_path / "manifest.csv"))


def test_pipes_and_devices_in_a_folder_are_reported_not_listed(tmp_path):
    import os

    from pellucid.datasets.samples import find_images

    if not hasattr(os, "mkfifo") or not os.path.exists("/dev/zero"):
        pytest.skip("needs named pipes and /dev/zero")
    (tmp_path / "a.png").write_bytes(b"x")
    os.mkfifo(tmp_path / "pipe.jpg")
    os.mkfifo(tmp_path / "notes")  # not an image name: not an input, nothing to report
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    problems: list = []
    assert find_images([tmp_path], problems) == [tmp_path / "a.png"]
    assert [(p.name, m.split(" (")[0]) for p, m in problems] == [("pipe.jpg", "is not a regular file"),
                                                                  ("zero.png", "is not a regular file")]


def _dicom(path: Path, preamble: bool = True) -> Path:
    """A tiny DICOM with pixels (the readers' tests' writer)."""
    import numpy as np

    from tests.datasets.test_readers import _write_dicom

    return _write_dicom(path, np.arange(64, dtype=np.uint16).reshape(8, 8), preamble=preamble)


def test_dicom_files_named_without_a_suffix_and_unread_image_formats_are_inputs(tmp_path):
    """PACS and disc exports name DICOM files IM000001 or by their UID: a folder of them is found, not "empty";
    an image format pellucid does not read is an input too (its row says to convert it); other files are not."""
    from pellucid.datasets.samples import DataError, load_samples

    disc = tmp_path / "disc" / "SE0"
    disc.mkdir(parents=True)
    im = _dicom(disc / "IM000001")
    uid = _dicom(disc / "1.2.840.113619.2.55.3.604688119.868")
    headless = _dicom(disc / "IM000002", preamble=False)
    siemens = _dicom(disc / "CT.0001.IMA")
    (disc / "other.IMA").write_bytes(b"\0" * 300)  # a DICOM-like suffix but no DICOM header
    _dicom(disc.parent / "DICOMDIR")  # a disc's index: no image
    (disc / "NOTES").write_bytes(b"ward round notes, not an image " * 10)
    (disc / "1.2.3").write_bytes(b"\0" * 300)  # a numeric suffix but no DICOM header
    (disc / "photo.webp").write_bytes(b"RIFF0000WEBP")
    (disc / "scan.nii.gz").write_bytes(b"\x1f\x8b")
    (disc / "readme.txt").write_text("x")
    found = find_images([tmp_path / "disc"], [])
    assert found == sorted([im, uid, headless, siemens, disc / "photo.webp", disc / "scan.nii.gz"])
    # the same files make a class folder's images when training
    (tmp_path / "train" / "ct").mkdir(parents=True)
    _dicom(tmp_path / "train" / "ct" / "IM000001")
    (tmp_path / "train" / "other").mkdir()
    (tmp_path / "train" / "other" / "IM000001").write_bytes(b"not a DICOM file at all" * 10)
    with pytest.raises(DataError, match="class folder 'other' holds no images"):
        load_samples(tmp_path / "train")
    (tmp_path / "train" / "other" / "IM000001").unlink()
    _dicom(tmp_path / "train" / "other" / "1.2.840.99")
    assert sorted(Path(s.path).name for s in load_samples(tmp_path / "train")) == ["1.2.840.99", "IM000001"]


def test_a_macs_metadata_files_are_not_inputs(tmp_path):
    """A Mac copying to an exFAT or FAT drive writes an AppleDouble ``._name`` beside every file, and its zips carry
    ``__MACOSX``: each of those was an error row ("could not be decoded") per real image, and a ``__MACOSX`` class."""
    from pellucid.datasets.samples import load_samples

    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        (tmp_path / c / "a.jpg").write_bytes(b"1")
        (tmp_path / c / "._a.jpg").write_bytes(b"\0\5\x16\7Mac OS X")
    (tmp_path / "__MACOSX" / "cat").mkdir(parents=True)
    (tmp_path / "__MACOSX" / "cat" / "._a.jpg").write_bytes(b"\0\5\x16\7Mac OS X")
    (tmp_path / "__MACOSX" / "cat" / "b.jpg").write_bytes(b"1")
    (tmp_path / "dog" / "__MACOSX").mkdir()
    (tmp_path / "dog" / "__MACOSX" / "c.jpg").write_bytes(b"1")
    problems: list = []
    assert find_images([tmp_path], problems) == [tmp_path / "cat" / "a.jpg", tmp_path / "dog" / "a.jpg"]
    assert problems == []
    assert find_images([tmp_path / "cat" / "._a.jpg"]) == [tmp_path / "cat" / "._a.jpg"]  # named: its own row
    samples = load_samples(tmp_path)
    assert [(Path(s.path).relative_to(tmp_path).as_posix(), s.label) for s in samples] == [
        ("cat/a.jpg", "cat"), ("dog/a.jpg", "dog")]
