"""Read what the index needs from a received instance's header (never its pixels)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from ct_triage.contract import CT_IMAGE_SOP_CLASSES
from ct_triage.errors import InvalidInput
from db.repository import InstanceRecord
from dicom_node import status
from dicom_node.uids import instance_relpath, is_valid_uid


class RejectedInstance(InvalidInput):
    """A received data set we answer with a failure status (``status_code``)."""

    def __init__(self, reason: str, status_code: int):
        super().__init__(reason)
        self.reason = reason
        self.status_code = status_code


def _text(ds, keyword: str, limit: int | None = None) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    text = str(value)
    return text[:limit] if limit else text


def _int(ds, keyword: str) -> int | None:
    value = ds.get(keyword)
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _float(ds, keyword: str) -> float | None:
    value = ds.get(keyword)
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def slice_position(ds) -> float | None:
    """Position along the slice normal (mm), from ImagePositionPatient and orientation."""
    try:
        ipp = [float(v) for v in ds.ImagePositionPatient]
        iop = [float(v) for v in ds.ImageOrientationPatient]
    except (AttributeError, TypeError, ValueError):
        return None
    if len(ipp) != 3 or len(iop) != 6:
        return None
    normal = np.cross(iop[:3], iop[3:])
    return float(np.dot(normal, ipp))


def not_applicable_reason(sop_class_uid: str, ds) -> str | None:
    """Why a series can never be scored, decided from its first instance; None if it can."""
    if sop_class_uid not in CT_IMAGE_SOP_CLASSES:
        return f"not a CT image: SOP class {UID(sop_class_uid).name}"
    modality = _text(ds, "Modality")
    if modality and modality != "CT":
        return f"modality {modality} is not CT"
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if "LOCALIZER" in image_type:
        return "localizer (scout) series"
    return None


def read_instance_record(path: Path, *, affected_sop_class_uid: str, affected_sop_instance_uid: str,
                         transfer_syntax_uid: str, calling_ae_title: str | None) -> InstanceRecord:
    """Parse the header of the file pynetdicom wrote; RejectedInstance if it cannot be indexed."""
    if not is_valid_uid(affected_sop_instance_uid):
        raise RejectedInstance(f"invalid Affected SOP Instance UID {affected_sop_instance_uid!r}",
                               status.INVALID_UID)
    try:
        ds = dcmread(path, stop_before_pixels=True, force=True)
        ds.SOPInstanceUID  # noqa: B018 - forces the parse of the data set's start
        study_uid = ds.get("StudyInstanceUID")
        series_uid = ds.get("SeriesInstanceUID")
        sop_uid = ds.get("SOPInstanceUID")
        sop_class = ds.get("SOPClassUID")
    except (InvalidDicomError, EOFError, ValueError, TypeError, KeyError, AttributeError, OverflowError,
            NotImplementedError, OSError) as exc:
        raise RejectedInstance(f"unparseable data set: {type(exc).__name__}: {exc}"[:500],
                               status.CANNOT_UNDERSTAND) from exc
    except Exception as exc:  # pydicom raises a wide range on garbage input
        raise RejectedInstance(f"unparseable data set: {type(exc).__name__}: {exc}"[:500],
                               status.CANNOT_UNDERSTAND) from exc
    for keyword, value in (("StudyInstanceUID", study_uid), ("SeriesInstanceUID", series_uid),
                           ("SOPInstanceUID", sop_uid), ("SOPClassUID", sop_class)):
        if value is None:
            raise RejectedInstance(f"missing {keyword}", status.CANNOT_UNDERSTAND)
        if not is_valid_uid(str(value)):
            raise RejectedInstance(f"invalid {keyword} {str(value)[:80]!r}", status.INVALID_UID)
    if str(sop_uid) != affected_sop_instance_uid:
        raise RejectedInstance(f"SOPInstanceUID {sop_uid} does not match the C-STORE request's "
                               f"{affected_sop_instance_uid}", status.DATASET_DOES_NOT_MATCH)
    if str(sop_class) != affected_sop_class_uid:
        raise RejectedInstance(f"SOPClassUID {sop_class} does not match the C-STORE request's "
                               f"{affected_sop_class_uid}", status.DATASET_DOES_NOT_MATCH)
    kernel = ds.get("ConvolutionKernel")
    if kernel is not None and not isinstance(kernel, str):
        kernel = "\\".join(str(k) for k in kernel)
    return InstanceRecord(
        sop_instance_uid=str(sop_uid),
        sop_class_uid=str(sop_class),
        study_instance_uid=str(study_uid),
        series_instance_uid=str(series_uid),
        transfer_syntax_uid=transfer_syntax_uid,
        path=instance_relpath(str(sop_uid)),
        size_bytes=path.stat().st_size,
        patient_id=_text(ds, "PatientID", 64) or "",
        issuer_of_patient_id=_text(ds, "IssuerOfPatientID", 64) or "",
        patient_name=_text(ds, "PatientName", 324),
        patient_birth_date=_text(ds, "PatientBirthDate", 8),
        patient_sex=_text(ds, "PatientSex", 16),
        accession_number=_text(ds, "AccessionNumber", 16),
        study_date=_text(ds, "StudyDate", 8),
        study_time=_text(ds, "StudyTime", 32),
        study_description=_text(ds, "StudyDescription", 64),
        modality=_text(ds, "Modality", 16),
        series_number=_int(ds, "SeriesNumber"),
        series_description=_text(ds, "SeriesDescription", 64),
        convolution_kernel=(kernel or None) and str(kernel)[:64],
        slice_thickness=_float(ds, "SliceThickness"),
        images_in_acquisition=_int(ds, "ImagesInAcquisition"),
        instance_number=_int(ds, "InstanceNumber"),
        slice_position=slice_position(ds),
        rows=_int(ds, "Rows"),
        columns=_int(ds, "Columns"),
        calling_ae_title=calling_ae_title,
        not_applicable_reason=not_applicable_reason(str(sop_class), ds),
    )
