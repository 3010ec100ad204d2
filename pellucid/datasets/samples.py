"""Labelled samples on disk: class-folder layouts and CSV manifests (``path,label,group``).

:func:`load_samples` turns a data folder into a list of :class:`Sample` records. A ``manifest.csv``
in the folder wins (paths relative to the folder; ``group`` marks cases that must stay on one side
of every split); otherwise each sub-folder is a class and each file its own group. Problems are
reported as :class:`DataError` with one line naming the folder or file and what to do.
"""
from __future__ import annotations

import csv
import errno
import logging
import os
import stat
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from pellucid.datasets.readers import DICOM_SUFFIXES, IMAGE_SUFFIXES, is_dicom

__all__ = ["Sample", "DataError", "load_samples", "find_images", "class_counts", "read_manifest"]

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A data folder that cannot be used as given."""


@dataclass(frozen=True)
class Sample:
    """One labelled image: file path, class label, and the group it must not be split from."""

    path: str
    label: str
    group: str


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES | DICOM_SUFFIXES


#: image formats pellucid does not read. Inside a folder they are inputs all the same, so that each gets its own row
#: (or training warning) saying to convert it, instead of being passed over without a word
OTHER_IMAGE_SUFFIXES: frozenset[str] = frozenset({
    ".gif", ".webp", ".heic", ".heif", ".avif", ".jp2", ".j2k", ".jpx", ".jxl", ".svg", ".ico", ".psd", ".dng",
    ".cr2", ".nef", ".arw", ".pbm", ".pgm", ".ppm", ".pnm", ".exr", ".hdr", ".nii", ".nrrd", ".mha", ".mhd"})


#: suffixes some scanners and viewers give DICOM files (Siemens ``.IMA``); such a file is DICOM when its header says so
DICOM_LIKE_SUFFIXES: frozenset[str] = frozenset({".ima", ".dic", ".dc3"})


def _unsuffixed_dicom(path: Path) -> bool:
    """A DICOM file named without a DICOM suffix, as PACS and disc exports name them (``IM000001``, or the
    instance's UID, ``1.2.840.….123``; Siemens ``.IMA``), told by its header; a disc's ``DICOMDIR`` index holds no
    image."""
    suffix = path.suffix.lower()
    if (suffix and not suffix[1:].isdigit() and suffix not in DICOM_LIKE_SUFFIXES) or path.name.upper() == "DICOMDIR":
        return False
    return is_dicom(path)


#: the folder of macOS metadata that a Mac's zips carry (no image inside)
MAC_METADATA_DIR = "__MACOSX"


def _mac_metadata(path: Path) -> bool:
    """A macOS metadata file, never an image: the AppleDouble ``._name`` a Mac writes beside each file it copies to
    a FAT, exFAT or network drive (the web app's zip batches leave these and ``__MACOSX`` out too,
    :func:`pellucid.ui.zips.extract_zip`)."""
    return path.name.startswith("._")


def _is_input(path: Path) -> bool:
    """Whether a regular file found inside a folder is an input: an image or DICOM suffix, an image format pellucid
    does not read (its row says so), or a DICOM file named otherwise (:func:`_unsuffixed_dicom`)."""
    if _mac_metadata(path):
        return False
    suffix = path.suffix.lower()
    return (_is_image(path) or suffix in OTHER_IMAGE_SUFFIXES or path.name.lower().endswith(".nii.gz")
            or _unsuffixed_dicom(path))


def find_images(
    paths: list[str | Path], problems: list[tuple[Path, str]] | None = None
) -> list[Path]:
    """Expand files and folders (recursively) into a sorted list of candidate image files.

    Files given explicitly are kept whatever their suffix (so a bad file gets a clear error row
    later); inside folders, files with an image or DICOM suffix are picked up, and so are image formats
    pellucid does not read (:data:`OTHER_IMAGE_SUFFIXES`: their rows say to convert them) and DICOM files
    named without a suffix or with a numeric one (``IM000001``, a UID), told by their header; a Mac's
    ``._`` metadata files and ``__MACOSX`` folders are left out. Symbolic links to files are followed;
    symbolic links to folders are not (so a link cannot loop or leave the tree).

    Args:
        paths: files and folders.
        problems: when given, what was skipped inside the folders is appended to it as
            ``(path, message)``: a folder that cannot be listed (permissions), a symbolic link
            that loops, a broken link with an image suffix, a link to a folder (not followed).
            The message is one line saying what is wrong and what to do; it does not repeat the
            path (which may be identifying: show it as the caller shows input names). The return
            value is the same with or without ``problems``.

    Returns:
        The given files, then each folder's image files sorted, in the order given.
    """
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            skipped: list[tuple[Path, str]] = []
            found.extend(sorted(_walk_images(p, skipped)))
            if problems is not None:
                problems.extend(sorted(skipped))
        else:
            found.append(p)
    return found


def _walk_images(root: Path, problems: list[tuple[Path, str]]) -> list[Path]:
    """Image files under ``root`` (not following folder links), noting what had to be skipped."""
    def report(path: Path, message: str) -> None:
        problems.append((path, message))

    images: list[Path] = []
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError as err:
            report(folder, f"folder cannot be listed ({type(err).__name__}) — its images were "
                           "skipped; fix its permissions or leave it out")
            continue
        for entry in entries:
            path = folder / entry.name
            try:
                if entry.is_dir(follow_symlinks=False):
                    if entry.name != MAC_METADATA_DIR:
                        stack.append(path)
                    continue
                if _mac_metadata(path):
                    continue
                if entry.is_symlink():
                    try:
                        target = os.stat(path)
                    except OSError as err:
                        if err.errno == errno.ELOOP:
                            report(path, "is a symbolic link loop — skipped; fix or remove the link")
                        elif _is_image(path):
                            report(path, "is a broken symbolic link (its target is missing) — "
                                         "skipped; fix or remove the link")
                        continue
                    if stat.S_ISDIR(target.st_mode):
                        if _links_to_ancestor(path):
                            report(path, "is a symbolic link loop (it points to a folder that "
                                         "contains it) — not followed; remove the link")
                        else:
                            report(path, "is a symbolic link to a folder — not followed; pass "
                                         "the folder itself to include its images")
                        continue
                if entry.is_file() and _is_input(path):
                    images.append(path)
                elif _is_image(path) and not entry.is_dir():  # a named pipe, socket or device
                    report(path, "is not a regular file (a named pipe, socket or device) — skipped; "
                                 "save the image to a file")
            except OSError as err:
                report(path, f"cannot be examined ({type(err).__name__}) — skipped; check it")
    return images


def _links_to_ancestor(link: Path) -> bool:
    try:
        target = link.resolve(strict=True)
        return target == link.parent.resolve() or target in link.parent.resolve().parents
    except (OSError, RuntimeError):
        return True


def class_counts(samples: list[Sample]) -> dict[str, int]:
    """Number of samples per label."""
    return dict(Counter(s.label for s in samples))


def read_manifest(manifest: Path, need: Sequence[str], error: type[Exception] | None = None) -> list[dict]:
    """The rows of a manifest CSV as written by hand or by a spreadsheet: a byte-order mark (Excel's
    "CSV UTF-8") and spaces around column names are accepted; text that is not UTF-8, NUL bytes or
    missing ``need`` columns are one-line ``error`` (default :class:`DataError`) that says what to do."""
    error = error or DataError
    try:
        with manifest.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            reader.fieldnames = [str(c).strip() for c in reader.fieldnames or []]
            if not set(need) <= set(reader.fieldnames):
                raise error(f"{manifest}: needs columns {','.join(need)}; found {sorted(reader.fieldnames)}")
            return list(reader)
    except UnicodeDecodeError:
        raise error(f"{manifest}: is not UTF-8 text; save it as CSV with UTF-8 encoding") from None
    except csv.Error as err:
        raise error(f"{manifest}: is not a readable CSV ({err}); save it again as plain CSV") from None


def _from_manifest(root: Path, manifest: Path) -> list[Sample]:
    rows = read_manifest(manifest, ("path", "label"))
    samples = []
    for i, row in enumerate(rows, start=2):
        if row.get(None):  # more fields than columns: most often a file name with a comma, unquoted
            raise DataError(f"{manifest} line {i}: more fields than the header's columns; put a path that "
                            'contains a comma in double quotes ("a,b.jpg")')
        if not (row.get("path") or "").strip() or not (row.get("label") or "").strip():
            raise DataError(f"{manifest} line {i}: empty path or label")
        if any("\0" in (row.get(k) or "") for k in ("path", "label", "group")):
            raise DataError(f"{manifest} line {i}: holds a NUL byte; save the manifest again as plain CSV")
        group = row.get("group") or row["path"]
        samples.append(Sample(str(root / row["path"]), row["label"].strip(), group.strip()))
    return samples


def _from_folders(root: Path) -> list[Sample]:
    samples = []
    class_dirs = sorted(d for d in root.iterdir()
                        if d.is_dir() and not d.name.startswith(".") and d.name != MAC_METADATA_DIR)
    if not class_dirs:
        raise DataError(f"{root}: no class sub-folders and no manifest.csv; lay data out as {root}/<class>/<image>")
    for d in class_dirs:
        files = sorted(f for f in d.rglob("*")
                       if f.is_file() and MAC_METADATA_DIR not in f.relative_to(d).parts and _is_input(f))
        if not files:
            raise DataError(f"{d}: class folder {d.name!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}, .dcm); "
                            "add images or remove the folder")
        samples.extend(Sample(str(f), d.name, f"{d.name}/{f.stem}") for f in files)
    return samples


def load_samples(root: str | Path, classes: list[str] | tuple[str, ...] | None = None,
                 aliases: dict[str, str] | None = None) -> list[Sample]:
    """Read the labelled samples of a data folder.

    Args:
        root: folder with ``manifest.csv`` (``path,label,group``) or one sub-folder per class.
        classes: the labels the task expects; when given, every expected class must be present and
            no other label may appear.
        aliases: other spellings of class names found in data sets (e.g. ``{"tb": "tuberculosis"}``).

    Raises:
        DataError: missing folder, empty class, labels that do not match ``classes``.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"data folder {root} not found: pass --data DIR (or set PELLUCID_DATA)")
    if not root.is_dir():
        raise DataError(f"{root} is a file, not a data folder: pass the folder that holds the class folders")
    manifest = root / "manifest.csv"
    samples = _from_manifest(root, manifest) if manifest.exists() else _from_folders(root)
    if not samples:
        raise DataError(f"{root}: no samples found")
    if aliases:
        samples = [Sample(s.path, aliases.get(s.label, s.label), s.group) for s in samples]
    if classes is not None:
        found = set(class_counts(samples))
        missing = [c for c in classes if c not in found]
        extra = sorted(found - set(classes))
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing class(es) {missing}")
            if extra:
                parts.append(f"unexpected label(s) {extra}")
            raise DataError(f"{root}: labels do not match the task ({'; '.join(parts)}); "
                            f"the task expects {list(classes)}")
    log.info("%s: %d samples, %s", root, len(samples), class_counts(samples))
    return samples
