"""Read what the index needs from a received instance's header (never its pixels), after
checking the data set is whole (dicom_node.integrity)."""

from __future__ import annotations

import io
import os
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple, TypeVar

import numpy as np
from pydicom.dataset import Dataset
from pydicom.filereader import _at_pixel_data, _read_file_meta_info, read_dataset, read_preamble
from pydicom.uid import UID

from ct_triage.contract import CT_IMAGE_SOP_CLASSES
from ct_triage.errors import InvalidInput
from ct_triage.text import clean, clean_exception, dicom_text
from db.repository import InstanceRecord
from dicom_node import status
from dicom_node.integrity import (
    DEFLATED,
    NATIVE_SYNTAXES,
    IntegrityError,
    PixelInfo,
    check_pixel_data,
    inflate_capped,
    walk_file,
)
from dicom_node.uids import instance_relpath, is_valid_uid

N = TypeVar("N", int, float)

# Received files up to this size are read into memory once and parsed there (a CT slice is
# 0.5 MB); larger ones (multi-frame) are parsed from the file, so memory stays bounded.
IN_MEMORY_MAX_BYTES = 8 * 2**20


class RejectedInstance(InvalidInput):
    """A received data set we answer with a failure status (``status_code``)."""

    def __init__(self, reason: str, status_code: int):
        super().__init__(reason)
        self.reason = reason
        self.status_code = status_code


def _text(ds, keyword: str, limit: int | None = None) -> str | None:
    """The element's value as DICOM writes it: a multi-valued one ``\\``-joined (``A\\B``)."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    text = dicom_text(value)
    return (text[:limit] if limit else text) or None


def _number(ds, keyword: str, kind: Callable[[Any], N]) -> N | None:
    """``kind(value)`` of an element; None when it is absent, empty or not a number."""
    value = ds.get(keyword)
    try:
        return kind(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _int(ds, keyword: str) -> int | None:
    return _number(ds, keyword, int)


def _float(ds, keyword: str) -> float | None:
    return _number(ds, keyword, float)


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
        return f"modality {clean(modality, 16)} is not CT"
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if "LOCALIZER" in image_type:
        return "localizer (scout) series"
    return None


_LONG_META_VRS = (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN")


def _read_meta(fh: BinaryIO, transfer_syntax_uid: str) -> tuple[int, str]:
    """(offset of the data set, syntax to parse it with) of a file positioned at its start.

    The file meta group as the node writes it (preamble, ``DICM``, explicit VR little endian
    group 0002) is read directly; anything else through pydicom, which says what is wrong.
    """
    head = fh.read(132)
    if len(head) == 132 and head[128:] == b"DICM":
        found = _scan_meta(fh)
        if found is not None:
            offset, syntax = found
            return offset, syntax or transfer_syntax_uid
    fh.seek(0)
    read_preamble(fh, True)
    meta = _read_file_meta_info(fh)
    return fh.tell(), str(meta.get("TransferSyntaxUID") or transfer_syntax_uid)


def _scan_meta(fh: BinaryIO) -> tuple[int, str | None] | None:
    """Walk group 0002 after ``DICM``: (offset of the data set, TransferSyntaxUID or None);
    None when an element is not what a file meta group holds."""
    syntax = None
    while True:
        start = fh.tell()
        raw = fh.read(8)
        if len(raw) < 8:
            return None
        group, element = struct.unpack("<HH", raw[:4])
        if group != 0x0002:
            fh.seek(start)
            return start, syntax
        vr = raw[4:6]
        if vr in _LONG_META_VRS:
            extra = fh.read(4)
            if len(extra) < 4:
                return None
            (length,) = struct.unpack("<L", extra)
        elif vr.isalpha() and vr.isupper():
            (length,) = struct.unpack("<H", raw[6:])
        else:
            return None
        if length > 1024:  # undefined (0xFFFFFFFF) or far beyond any meta element
            return None
        value = fh.read(length)
        if len(value) < length:
            return None
        if element == 0x0010:
            syntax = value.rstrip(b"\0 ").decode("ascii", "replace") or None


def _inflated(path: Path, offset: int, scratch_dir: Path | None, max_bytes: int, room_left) -> Path:
    """A scratch file holding the inflated data set of the Deflated Explicit VR file ``path``."""
    handle, name = tempfile.mkstemp(prefix="inflate-", dir=scratch_dir)
    scratch = Path(name)
    try:
        with os.fdopen(handle, "wb") as out:  # the descriptor mkstemp opened, closed with the file
            inflate_capped(path, offset, out, max_bytes, room_left)
    except BaseException:
        scratch.unlink(missing_ok=True)
        raise
    return scratch


def read_instance_record(path: Path, *, affected_sop_class_uid: str, affected_sop_instance_uid: str,
                         transfer_syntax_uid: str, calling_ae_title: str | None,
                         max_bytes: int = 1024 * 2**20, scratch_dir: Path | None = None,
                         room_left=lambda written: True) -> InstanceRecord:
    """Parse the header of the file pynetdicom wrote and check it is whole (dicom_node.integrity).

    RejectedInstance (with its status) if it cannot be indexed or is not whole.
    """
    if not is_valid_uid(affected_sop_instance_uid):
        raise RejectedInstance(f"invalid Affected SOP Instance UID {clean(affected_sop_instance_uid, 80)}",
                               status.INVALID_UID)
    header = _read_header(path, transfer_syntax_uid, scratch_dir, max_bytes, room_left)
    _check_uids(header.uids, affected_sop_class_uid=affected_sop_class_uid,
                affected_sop_instance_uid=affected_sop_instance_uid)
    try:
        check_pixel_data(header.pixel, native=header.syntax in NATIVE_SYNTAXES,
                         requires_pixels=str(header.uids["SOPClassUID"]) in CT_IMAGE_SOP_CLASSES, **header.geometry)
    except IntegrityError as exc:
        raise RejectedInstance(exc.reason, exc.status_code) from exc
    return _record(header, path, transfer_syntax_uid, calling_ae_title)


#: The UIDs every instance needs to be indexed, in the order they are checked.
_IDENTIFYING_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


class _Header(NamedTuple):
    """What :func:`_read_header` read: the data set up to Pixel Data and where the pixels are."""

    ds: Dataset
    syntax: str  # the transfer syntax the data set was parsed with
    pixel: PixelInfo | None
    geometry: dict[str, int | None]  # check_pixel_data's rows, columns, samples, bits_allocated, frames
    uids: dict[str, Any]  # _IDENTIFYING_UIDS as read (None: absent)
    size: int  # bytes of the file as received


def _read_header(path: Path, transfer_syntax_uid: str, scratch_dir: Path | None, max_bytes: int,
                 room_left) -> _Header:
    """Parse the data set up to Pixel Data and walk it to its end (a deflated one via a scratch file).

    RejectedInstance when it is not whole or cannot be parsed.
    """
    scratch = None
    try:
        try:
            with open(path, "rb") as on_disk:
                size = os.fstat(on_disk.fileno()).st_size
                # Every tell() of a buffered file is an lseek that lets go of the GIL; a CT
                # slice parsed from disk made ~130 of them, each a thread switch under load.
                fh: BinaryIO = io.BytesIO(on_disk.read()) if size <= IN_MEMORY_MAX_BYTES else on_disk
                offset, syntax = _read_meta(fh, transfer_syntax_uid)
                if syntax == DEFLATED:
                    scratch = _inflated(path, offset, scratch_dir, max_bytes, room_left)
                    fh, offset, syntax = open(scratch, "rb"), 0, "1.2.840.10008.1.2.1"  # noqa: SIM115 - closed below
                try:
                    fh.seek(offset)
                    ds = read_dataset(fh, syntax == "1.2.840.10008.1.2", syntax != "1.2.840.10008.1.2.2",
                                      stop_when=_at_pixel_data)
                    pixel = walk_file(fh, offset, syntax)
                finally:
                    if scratch is not None:
                        fh.close()
            uids = {keyword: ds.get(keyword) for keyword in _IDENTIFYING_UIDS}
            geometry = {key: _int(ds, keyword) for key, keyword in (
                ("rows", "Rows"), ("columns", "Columns"), ("samples", "SamplesPerPixel"),
                ("bits_allocated", "BitsAllocated"), ("frames", "NumberOfFrames"))}
        except IntegrityError as exc:
            raise RejectedInstance(exc.reason, exc.status_code) from exc
        except Exception as exc:  # pydicom raises a wide range on garbage input
            raise RejectedInstance(f"unparseable data set: {clean_exception(exc, 400)}",
                                   status.CANNOT_UNDERSTAND) from exc
    finally:
        if scratch is not None:
            scratch.unlink(missing_ok=True)
    return _Header(ds=ds, syntax=syntax, pixel=pixel, geometry=geometry, uids=uids, size=size)


def _check_uids(uids: dict[str, Any], *, affected_sop_class_uid: str, affected_sop_instance_uid: str) -> None:
    """The identifying UIDs are present, valid, and the SOP ones match the C-STORE request's."""
    for keyword, value in uids.items():
        if value is None:
            raise RejectedInstance(f"missing {keyword}", status.CANNOT_UNDERSTAND)
        if not is_valid_uid(str(value)):
            raise RejectedInstance(f"invalid {keyword} {clean(value, 80)!r}", status.INVALID_UID)
    sop_uid, sop_class = uids["SOPInstanceUID"], uids["SOPClassUID"]
    if str(sop_uid) != affected_sop_instance_uid:
        raise RejectedInstance(f"SOPInstanceUID {sop_uid} does not match the C-STORE request's "
                               f"{affected_sop_instance_uid}", status.DATASET_DOES_NOT_MATCH)
    if str(sop_class) != affected_sop_class_uid:
        raise RejectedInstance(f"SOPClassUID {sop_class} does not match the C-STORE request's "
                               f"{affected_sop_class_uid}", status.DATASET_DOES_NOT_MATCH)


def _record(header: _Header, path: Path, transfer_syntax_uid: str, calling_ae_title: str | None) -> InstanceRecord:
    """The index row for a checked instance; RejectedInstance if a value cannot be converted."""
    ds = header.ds
    sop_uid, sop_class = str(header.uids["SOPInstanceUID"]), str(header.uids["SOPClassUID"])
    try:
        kernel = _text(ds, "ConvolutionKernel")
        return InstanceRecord(
            sop_instance_uid=sop_uid,
            sop_class_uid=sop_class,
            study_instance_uid=str(header.uids["StudyInstanceUID"]),
            series_instance_uid=str(header.uids["SeriesInstanceUID"]),
            transfer_syntax_uid=transfer_syntax_uid,
            path=instance_relpath(sop_uid),
            size_bytes=header.size,
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
            not_applicable_reason=not_applicable_reason(sop_class, ds),
        )
    except Exception as exc:  # a value pydicom cannot convert (garbage in a text or number element)
        raise RejectedInstance(f"unreadable attribute value: {clean_exception(exc, 400)}",
                               status.CANNOT_UNDERSTAND) from exc


def read_spooled_file(path: Path, *, max_bytes: int, scratch_dir: Path | None = None) -> InstanceRecord:
    """The record of a file already in the spool (start-up indexing): its own UIDs stand in
    for the C-STORE request's, its file meta gives the transfer syntax."""
    try:
        with open(path, "rb") as fh:
            read_preamble(fh, True)
            meta = _read_file_meta_info(fh)
        sop_class = str(meta.get("MediaStorageSOPClassUID", ""))
        sop_instance = str(meta.get("MediaStorageSOPInstanceUID", ""))
        syntax = str(meta.get("TransferSyntaxUID", ""))
    except Exception as exc:
        raise RejectedInstance(f"unreadable file meta: {clean_exception(exc)}", status.CANNOT_UNDERSTAND) from exc
    return read_instance_record(path, affected_sop_class_uid=sop_class, affected_sop_instance_uid=sop_instance,
                                transfer_syntax_uid=syntax, calling_ae_title=None, max_bytes=max_bytes,
                                scratch_dir=scratch_dir)
