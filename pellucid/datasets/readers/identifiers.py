"""DICOM privacy: the keywords whose values identify a patient, a person or an institution, or
date the examination (:data:`IDENTIFYING_TAGS`), and :func:`dicom_identifying_tags`, which returns
the values a file holds — top level and nested — so reports can check redaction; they are never
logged."""

from __future__ import annotations

import os
import warnings
from typing import Any

from pellucid.datasets.readers.common import _check_file
from pellucid.datasets.readers.detect import _import_pydicom, is_dicom
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
        ImageReadError: the file is missing, or is not DICOM, or cannot be parsed.
    """
    p = _check_file(path)
    if not is_dicom(p):
        raise ImageReadError(f"{p}: is not a DICOM file — identifying tags exist only in DICOM")
    pydicom = _import_pydicom(p)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(p, force=True, stop_before_pixels=True)
    except Exception as err:  # noqa: BLE001
        raise ImageReadError(
            f"{p}: could not be parsed as DICOM ({type(err).__name__}) — the file is corrupt; "
            "re-export it"
        ) from err
    wanted = set(IDENTIFYING_TAGS)
    found: dict[str, str] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's complaints about value formats
        for keyword in IDENTIFYING_TAGS:  # top level first
            if keyword in ds:
                text = _element_text(ds[keyword])
                if text:
                    found[keyword] = text
        for elem in ds.iterall():  # then anything nested in sequences
            keyword = elem.keyword
            if keyword in wanted and keyword not in found:
                text = _element_text(elem)
                if text:
                    found[keyword] = text
    return found


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
