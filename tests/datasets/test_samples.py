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
