"""DICOM privacy: the keywords whose values identify a patient, a person or an institution, or
date the examination (:data:`IDENTIFYING_TAGS`), and :func:`dicom_identifying_tags`, which returns
the values a file holds — top level and nested — so reports can check redaction; they are never
logged."""

from __future__ import annotations

import os
import warnings
from typing import Any

from pellucid.datasets.readers.common import check_file, _pydicom_quiet
from pellucid.datasets.readers.detect import HeaderTooLong, _check_deflated, _import_pydicom, is_dicom, read_dataset
from pellucid.datasets.readers.image import ImageReadError

__all__ = [
    "IDENTIFYING_TAGS",
    "dicom_identifying_tags",
]


#: DICOM keywords whose values identify a patient, a person or an institution, or date the
#: examination (HIPAA Safe Harbor treats dates as identifiers). Drawn from the Basic Application
#: Level Confidentiality Profile, PS3.15 Table E.1-1. Private tags are not covered.
IDENTIFYING_TAGS: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "OtherPatientIDs",
    "OtherPatientIDsSequence",
    "OtherPatientNames",
    "PatientBirthName",
    "PatientMotherBirthName",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "MedicalRecordLocator",
    "MilitaryRank",
    "ReferringPhysicianName",
    "ReferringPhysicianAddress",
    "ReferringPhysicianTelephoneNumbers",
    "PerformingPhysicianName",
    "NameOfPhysiciansReadingStudy",
    "PhysiciansOfRecord",
    "RequestingPhysician",
    "OperatorsName",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "StationName",
    "DeviceSerialNumber",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "SeriesDate",
    "AcquisitionDate",
    "ContentDate",
)


def dicom_identifying_tags(path: str | os.PathLike[str]) -> dict[str, str]:
    """Return the identifying header values present in a DICOM file, for redaction checks.

    The whole dataset, sequences included, is searched for the keywords in
    :data:`IDENTIFYING_TAGS`; a keyword's top-level value wins over nested ones. Empty values are
    left out. The values are returned, never logged.

    Args:
        path: the DICOM file.

    Returns:
        ``{keyword: value as str}``, e.g. ``{'PatientName': 'Doe^John', 'PatientID': '123'}``;
        empty when nothing identifying is present.

    Raises:
        ImageReadError: the file is missing, or is not DICOM, or cannot be parsed (the message
            quotes no header value), whatever its bytes.
    """
    p = check_file(path)
    try:
        if not is_dicom(p):
            raise ImageReadError(
                f"{p}: is not a DICOM file — identifying tags exist only in DICOM"
            )
        pydicom = _import_pydicom(p)
        _check_deflated(p)
        with warnings.catch_warnings(), _pydicom_quiet():
            warnings.simplefilter("ignore")  # pydicom's complaints quote header values
            ds = read_dataset(pydicom, p, stop_before_pixels=True)
            found: dict[str, str] = {}
            _collect(ds, found, nested=False)  # top level first
            _collect(ds, found, nested=True)  # then anything nested in sequences
    except ImageReadError:
        raise
    except HeaderTooLong as err:
        raise ImageReadError(f"{p}: is not a DICOM file: no header where its tags should be — re-export it") from err
    except Exception as err:  # noqa: BLE001 - MemoryError, RecursionError, pydicom's many types
        raise ImageReadError(
            f"{p}: could not be parsed as DICOM: the header is corrupt or the file truncated "
            f"({type(err).__name__}) — re-export it"
        ) from err
    return found


_WANTED = frozenset(IDENTIFYING_TAGS)
_MAX_DEPTH = 32  # sequences nested deeper than this are not searched


def _collect(ds: Any, found: dict[str, str], *, nested: bool, depth: int = 0) -> None:
    """Add the identifying values of ``ds`` to ``found`` (first wins), element by element.

    An element that cannot be converted (wrong VR, bad length, unknown VR) is read from its raw
    bytes instead, so a corrupt element neither stops the search nor hides its value.
    """
    from pydicom.datadict import keyword_for_tag

    for tag in list(ds.keys()):
        try:
            keyword = keyword_for_tag(tag)
        except Exception:  # noqa: BLE001
            keyword = ""
        try:
            elem = ds[tag]
        except Exception:  # noqa: BLE001 - an unconvertible element: use its raw bytes
            elem = None
        if keyword in _WANTED and keyword not in found and (nested or depth == 0):
            text = ""
            try:
                text = _element_text(elem) if elem is not None else _raw_text(ds, tag)
            except Exception:  # noqa: BLE001
                text = _raw_text(ds, tag)
            if text:
                found[keyword] = text
        if nested and elem is not None and depth < _MAX_DEPTH and getattr(elem, "VR", "") == "SQ":
            try:
                items = list(elem.value or [])
            except Exception:  # noqa: BLE001
                items = []
            for item in items:
                if hasattr(item, "keys"):
                    _collect(item, found, nested=True, depth=depth + 1)


def _raw_text(ds: Any, tag: Any) -> str:
    """The raw value bytes of an element as latin-1 text, or ``''``."""
    try:
        value = ds.get_item(tag).value
    except Exception:  # noqa: BLE001
        return ""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("latin-1", errors="replace").strip("\x00 ")
    return ""


def _element_text(elem: Any) -> str:
    value = elem.value
    if value is None:
        return ""
    if elem.VR == "SQ":
        return f"<sequence of {len(value)} item(s)>" if len(value) else ""
    if isinstance(value, (bytes, bytearray)):
        return value.decode("latin-1", errors="replace").strip("\x00 ")
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value).strip()
    return str(value).strip()
