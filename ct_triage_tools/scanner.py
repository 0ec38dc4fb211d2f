"""The scanner side of the tests and benchmarks: synthetic CT series on disk and
dcmtk's storescu/echoscu (``/usr/bin``; the venv's pynetdicom scripts of the same
names differ). dcmtk runs with ``TCP_NODELAY=1``: without it, it stalls on Nagle's
algorithm for every small PDU."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from ct_triage_tools.ports import free_port

STORESCU = "/usr/bin/storescu"  # dcmtk's; the venv's pynetdicom script of the same name differs
ECHOSCU = "/usr/bin/echoscu"

__all__ = [
    "ECHOSCU", "STORESCU", "SeriesOnDisk", "acknowledged_files", "copy_series", "dcmtk_env", "echoscu",
    "free_port", "storescu", "wait_echo", "write_ct_series",
]


@dataclass
class SeriesOnDisk:
    folder: Path
    paths: list[Path]
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uids: list[str]


def write_ct_series(folder: Path, slices: int, *, rows: int = 512, columns: int = 512,
                    study_instance_uid: str | None = None, series_instance_uid: str | None = None,
                    patient_id: str = "TEST0001", patient_name: str = "DOE^JANE",
                    images_in_acquisition: bool = True, seed: int = 0, spacing_mm: float = 1.0,
                    series_number: int = 2, kernel: str = "FC51") -> SeriesOnDisk:
    """A CT Image Storage series with noise pixels: realistic size and headers, fast to make."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    study_instance_uid = study_instance_uid or generate_uid(entropy_srcs=[f"study{seed}"])
    series_instance_uid = series_instance_uid or generate_uid(entropy_srcs=[f"series{seed}{series_number}"])
    base = rng.integers(0, 2000, size=(rows, columns), dtype=np.uint16)
    paths: list[Path] = []
    uids: list[str] = []
    for index in range(slices):
        sop_uid = generate_uid(entropy_srcs=[series_instance_uid, str(index)])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "F"
        ds.StudyInstanceUID = study_instance_uid
        ds.SeriesInstanceUID = series_instance_uid
        ds.StudyDate = "20200401"
        ds.StudyTime = "101500"
        ds.AccessionNumber = "ACC0001"
        ds.ReferringPhysicianName = ""
        ds.StudyID = "1"
        ds.Modality = "CT"
        ds.SeriesNumber = series_number
        ds.InstanceNumber = index + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ConvolutionKernel = kernel
        ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[study_instance_uid, "for"])
        ds.ImagePositionPatient = [-175.0, -175.0, -index * spacing_mm]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.68, 0.68]
        ds.SliceThickness = spacing_mm
        if images_in_acquisition:
            ds.ImagesInAcquisition = slices
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = columns
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.PixelData = np.roll(base, index, axis=0).tobytes()
        path = folder / f"IM{index + 1:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
        uids.append(sop_uid)
    return SeriesOnDisk(folder, paths, study_instance_uid, series_instance_uid, uids)


def dcmtk_env() -> dict[str, str]:
    # Without TCP_NODELAY dcmtk stalls on Nagle's algorithm for every small PDU.
    return {**os.environ, "TCP_NODELAY": "1"}


def storescu(port: int, paths: list[Path] | Path, *, calling: str = "SCANNER", called: str = "CTTRIAGE",
             extra: list[str] | None = None, timeout: float = 120, host: str = "127.0.0.1",
             popen: bool = False):
    """Run dcmtk storescu verbosely; returns CompletedProcess (or Popen when ``popen``)."""
    files = [str(paths)] if isinstance(paths, Path) else [str(p) for p in paths]
    args = [STORESCU, "-v", "-aet", calling, "-aec", called, *(extra or []), host, str(port), *files]
    if popen:
        return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dcmtk_env())
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=dcmtk_env())


_SENDING = re.compile(r"Sending file: (\S+)")
_RESPONSE = re.compile(r"Received Store Response \((\w+)")


def acknowledged_files(output: str) -> list[str]:
    """Files storescu saw a Success response for, in order."""
    acked, current = [], None
    for line in output.splitlines():
        sending = _SENDING.search(line)
        if sending:
            current = sending.group(1)
            continue
        response = _RESPONSE.search(line)
        if response and current is not None:
            if response.group(1) == "Success":
                acked.append(current)
            current = None
    return acked


def echoscu(port: int, *, calling: str = "SCANNER", called: str = "CTTRIAGE", extra: list[str] | None = None,
            timeout: float = 30):
    return subprocess.run([ECHOSCU, "-v", "-aet", calling, "-aec", called, *(extra or []), "127.0.0.1",
                           str(port)], capture_output=True, text=True, timeout=timeout, env=dcmtk_env())


def copy_series(series: SeriesOnDisk, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(p, folder / p.name)) for p in series.paths]


def wait_echo(port: int, timeout: float = 60, called: str = "ANY-SCP") -> None:
    """Until something answers C-ECHO on 127.0.0.1:``port`` (RuntimeError after ``timeout`` s).

    ``called``: the AE title to call (ct-triage refuses any but its own, CTTRIAGE by default).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if subprocess.run([ECHOSCU, "-aec", called, "127.0.0.1", str(port)], capture_output=True,
                          env=dcmtk_env()).returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"nothing answers C-ECHO on {port}")
