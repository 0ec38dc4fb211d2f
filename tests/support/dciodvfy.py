"""Run dicom3tools' ``dciodvfy`` (IOD, module and attribute validator) on a file.

``dciodvfy_errors(path)`` returns the lines that start with ``Error``; tests assert that
list is empty. :func:`unexpected_warnings` returns the ``Warning`` lines not covered by
:data:`ACCEPTED_WARNING_MARKERS`, which are, with the reason we accept them:

- ``Unrecognized defined term <99CTTRIAGE> for value 1 of attribute <Coding Scheme
  Designator>``: our private coding scheme (PS3.16 8.2, "99" prefix) for the CT
  category, status and priority concepts. dciodvfy only knows the standard schemes;
  the scheme is declared in CodingSchemeIdentificationSequence as the standard asks.
- ``... would be needed to build DICOMDIR``: media (DICOMDIR) requirements, not IOD
  conformance; only printed for inputs lacking type-2 values (not our outputs).

Deflated files (Deflated Explicit VR Little Endian, our SEG): this dicom3tools build
cannot inflate them ("Dicom dataset read failed"), so :func:`dciodvfy_report` validates
an Explicit VR Little Endian copy of the same data set (the transfer syntax is only the
file's encoding; the IOD is what is checked).

Seen but *not* in the list (tests check errors only in that case): ``Laterality`` "is
only permitted to be empty when actually unknown" on an SC built from a source without
BodyPartExamined (not applicable / failed series): we cannot know the body part, so the
type 2C Laterality is sent empty, which is what "unknown" means.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

DCIODVFY = os.environ.get("DCIODVFY", "/usr/bin/dciodvfy")

ACCEPTED_WARNING_MARKERS = (
    "Unrecognized defined term <99CTTRIAGE>",
    "would be needed to build DICOMDIR",
)


@dataclass
class DciodvfyReport:
    path: Path
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    output: str = ""


def available() -> bool:
    return Path(DCIODVFY).exists() or shutil.which("dciodvfy") is not None


def dciodvfy_report(path: str | os.PathLike, *, timeout: float = 60.0) -> DciodvfyReport:
    """Run dciodvfy on ``path`` and split its output into errors and warnings."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(path)
    exe = DCIODVFY if Path(DCIODVFY).exists() else shutil.which("dciodvfy")
    if exe is None:
        raise FileNotFoundError("dciodvfy (dicom3tools) is not installed")
    target = path
    with tempfile.TemporaryDirectory() as tmp:
        meta = read_file_meta_info(path)
        if UID(str(meta.get("TransferSyntaxUID", ""))) == DeflatedExplicitVRLittleEndian:
            ds = dcmread(path)
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            target = Path(tmp) / "inflated.dcm"
            ds.save_as(target, enforce_file_format=True)
        proc = subprocess.run([exe, str(target)], capture_output=True, text=True, timeout=timeout,
                              errors="replace")
    output = (proc.stdout or "") + (proc.stderr or "")
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    report = DciodvfyReport(path=path, output=output)
    report.errors = [line for line in lines if line.startswith("Error")]
    report.warnings = [line for line in lines if line.startswith("Warning")]
    return report


def dciodvfy_errors(path: str | os.PathLike) -> list[str]:
    """The ``Error`` lines dciodvfy prints for ``path`` (empty list: valid)."""
    return dciodvfy_report(path).errors


def unexpected_warnings(path: str | os.PathLike) -> list[str]:
    """Warnings not covered by :data:`ACCEPTED_WARNING_MARKERS`."""
    return [w for w in dciodvfy_report(path).warnings if not any(m in w for m in ACCEPTED_WARNING_MARKERS)]
