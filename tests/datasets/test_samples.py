"""find_images: the files it returns are unchanged, and what it skips can be reported."""
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
