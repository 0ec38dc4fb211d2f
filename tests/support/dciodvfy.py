"""Run dicom3tools' ``dciodvfy`` (IOD/module/template validator) on a file.

``dciodvfy_errors(path)`` returns the lines that start with ``Error``; a test asserts
that list is empty. Warnings are returned by :func:`dciodvfy_report` for inspection and
are accepted by policy when they are one of:

- ``Missing attribute or value that would be needed to build DICOMDIR`` — DICOMDIR
  (media interchange) requirements, not IOD conformance; our sources may legitimately
  leave such type-2 values empty.
- ``... is not present in the standard ... (retired)`` style notes about retired
  attributes copied verbatim from the scanner's instances.
- ``Dubious value`` / ``Unrecognized`` code warnings for our private coding scheme
  ``99CTTRIAGE`` (declared in CodingSchemeIdentificationSequence), which dciodvfy does
  not know and cannot check against a context group.

Everything else is surfaced by :func:`unexpected_warnings` so a test can pin it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

DCIODVFY = os.environ.get("DCIODVFY", "/usr/bin/dciodvfy")

ACCEPTED_WARNING_MARKERS = (
    "would be needed to build DICOMDIR",
    "99CTTRIAGE",
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
    proc = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=timeout,
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
