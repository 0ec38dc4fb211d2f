"""Build once, send many: the outputs of a result version as files in the storage folder.

``deliver_outputs`` used to re-read every source instance and rebuild the SC series and
the SR on every attempt and for every destination. Now the first delivery of a result
version builds the SR, the SEG and the SC series once (:func:`build_output_datasets`),
writes them here (:func:`write_outputs`) and records them in the database
(``output_files``, ``results.outputs_built_at``); every delivery and retry, to any
destination, sends those files as they are, without decoding them
(:mod:`worker.delivery.scu`). Sources are never read again.

Layout (paths come from hashes, never from a UID string)::

    STORAGE_DIR/outputs/<h[:2]>/<h>/masks.npz          the masks of the result (scoring)
    STORAGE_DIR/outputs/<h[:2]>/<h>/<sha256(SOP UID)[:32]>.dcm

with ``h = sha256("<study uid>|<result version>")[:40]``.

Durability and idempotence: each file is written to a temporary name, fsynced and renamed
over its final name, then the folder is fsynced once; only then is the database told
(one transaction). A crash before that leaves files without rows, and the next attempt
rebuilds: every builder is deterministic (UIDs from the source series and the version,
dates from the result's timestamp, no clock), so the rebuilt files have the same bytes.
Two workers building the same version at once write identical bytes; the first to
record wins.

Send order (``send_order``): the SR (the answer, tens of KB), the SEG, then the SC
summary and the slice images (issue 9, delivery order within a study).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import UID

from worker.durable import fsync_dir, make_dirs, write_synced

OUTPUTS_DIR = "outputs"
WRITER_THREADS = 4  # concurrent fsyncs while writing one result's files
ROLE_ORDER = {"sr": 0, "seg": 1, "sc": 2}


@dataclass(frozen=True)
class OutputFile:
    """One stored output instance (a row of ``output_files``)."""

    role: str  # sr | seg | sc
    send_order: int
    sop_class_uid: str
    sop_instance_uid: str
    path: str  # relative to the storage folder
    size_bytes: int
    sha256: str


def result_folder(study_instance_uid: str, version: int) -> str:
    """Relative folder of one result version's files (hashed, see the module docstring)."""
    if not isinstance(study_instance_uid, str) or not study_instance_uid:
        raise ValueError("argument 'study_instance_uid' must be a non-empty string")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"argument 'version' must be an int >= 1, got {version!r}")
    digest = hashlib.sha256(f"{study_instance_uid}|{version}".encode()).hexdigest()[:40]
    return f"{OUTPUTS_DIR}/{digest[:2]}/{digest}"


def masks_relpath(study_instance_uid: str, version: int) -> str:
    return f"{result_folder(study_instance_uid, version)}/masks.npz"


def instance_filename(sop_instance_uid: str) -> str:
    return hashlib.sha256(str(sop_instance_uid).encode()).hexdigest()[:32] + ".dcm"


def encode(ds: Dataset) -> bytes:
    """The Part 10 file of ``ds`` (its file meta transfer syntax decides the encoding).

    SC slice images cloned from a template (:mod:`worker.outputs.sc`) carry that template
    as ``_ct_template``: their unchanged data elements are the template's own objects, so
    their encoded bytes are computed once per series and reused (:class:`TemplateEncoder`);
    the result is byte-identical to ``save_as`` (tested).
    """
    template = getattr(ds, "_ct_template", None)
    if template is not None and str(ds.file_meta.TransferSyntaxUID) == str(template.file_meta.TransferSyntaxUID):
        encoder = getattr(template, "_ct_encoder", None)
        if encoder is None:
            encoder = TemplateEncoder(template)
            template._ct_encoder = encoder
        return encoder.encode(ds)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


class TemplateEncoder:
    """Encodes datasets that share most data elements with one template.

    Only little-endian explicit-VR syntaxes (native or encapsulated pixel data); anything
    else falls back to ``save_as``.
    """

    def __init__(self, template: Dataset):
        from pydicom.filebase import DicomBytesIO
        from pydicom.filewriter import correct_ambiguous_vr, write_data_element

        self._write = write_data_element
        self._bytes_io = DicomBytesIO
        syntax = UID(str(template.file_meta.TransferSyntaxUID))
        self.usable = syntax.is_little_endian and not syntax.is_implicit_VR and not syntax.is_deflated
        self.encodings = template.get("SpecificCharacterSet")
        self.cache: dict = {}
        if not self.usable:
            return
        correct_ambiguous_vr(template, True)
        for tag in template.keys():  # noqa: SIM118 - iterating a Dataset gives its elements, keys() its tags
            elem = template[tag]  # converts raw elements in place: clones share the converted ones
            self.cache[tag] = (elem, self._encode_element(elem))

    def _encode_element(self, elem) -> bytes:
        fp = self._bytes_io()
        fp.is_little_endian = True
        fp.is_implicit_VR = False
        self._write(fp, elem, encodings=self.encodings)
        return fp.getvalue()

    def encode(self, ds: Dataset) -> bytes:
        from pydicom.filewriter import write_file_meta_info

        if not self.usable or ds.get("SpecificCharacterSet") != self.encodings:
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            return buffer.getvalue()
        fp = self._bytes_io()
        fp.is_little_endian = True
        fp.is_implicit_VR = False
        fp.write(b"\x00" * 128 if ds.preamble is None else ds.preamble)
        fp.write(b"DICM")
        write_file_meta_info(fp, ds.file_meta, enforce_standard=True)
        raw = ds._dict
        for tag in sorted(raw):
            if tag.group < 8:
                continue
            cached = self.cache.get(tag)
            if cached is not None and raw[tag] is cached[0]:
                fp.write(cached[1])
            else:
                fp.write(self._encode_element(ds[tag]))
        return fp.getvalue()


def write_outputs(storage_dir: Path, folder: str, items: Sequence[tuple[str, Dataset]]) -> list[OutputFile]:
    """Write ``(role, dataset)`` items durably under ``storage_dir/folder``; in send order.

    Each file is fsynced before its rename; the folder (and its parents up to
    ``outputs/``) once at the end. Returns the rows to record.
    """
    target = Path(storage_dir) / folder
    make_dirs(target)
    ordered = sorted(enumerate(items), key=lambda pair: (ROLE_ORDER[pair[1][0]], pair[0]))
    files: list[OutputFile] = []
    # Encoding is CPU; fsync is waiting on the disk: overlap the waits in a few threads.
    with ThreadPoolExecutor(max_workers=WRITER_THREADS, thread_name_prefix="outputs-write") as pool:
        pending = []
        for order, (_, (role, ds)) in enumerate(ordered):
            data = encode(ds)
            name = instance_filename(str(ds.SOPInstanceUID))
            pending.append(pool.submit(write_synced, target / name, data))
            files.append(OutputFile(role=role, send_order=order, sop_class_uid=str(ds.SOPClassUID),
                                    sop_instance_uid=str(ds.SOPInstanceUID), path=f"{folder}/{name}",
                                    size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest()))
        for future in pending:
            future.result()  # re-raises a write error
    fsync_dir(target)
    return files


def build_output_datasets(
    source_datasets: Sequence[Dataset],
    score,
    version: int,
    *,
    created_at: dt.datetime | None,
    masks=None,
    sc_compression: str = "jpeg-baseline",
    sc_max_slices: int | None = None,
    seg_compression: str = "deflate",
    sr_max_lesions: int = 20,
) -> list[tuple[str, Dataset]]:
    """SR, SEG (scored results with masks) and SC series of one result version."""
    from worker.outputs.sc import build_secondary_capture_series
    from worker.outputs.seg import build_segmentation
    from worker.outputs.sr import build_measurement_report

    items: list[tuple[str, Dataset]] = []
    seg = None
    if score.status == "scored" and masks is not None:
        seg = build_segmentation(source_datasets, score, masks, version, created_at=created_at,
                                 compression=seg_compression)
    sr = build_measurement_report(source_datasets, score, version, created_at=created_at,
                                  masks=masks if seg is not None else None, segmentation=seg,
                                  max_lesions=sr_max_lesions)
    items.append(("sr", sr))
    if seg is not None:
        items.append(("seg", seg))
    for image in build_secondary_capture_series(source_datasets, score, version, created_at=created_at,
                                                compression=sc_compression, max_slices=sc_max_slices):
        items.append(("sc", image))
    return items


__all__ = ["OutputFile", "build_output_datasets", "write_outputs", "result_folder", "masks_relpath",
           "instance_filename", "encode"]
