"""Follow-up phantoms: one patient scanned several times (issue 12 tests and the README picture).

A phantom of one seed is one patient's anatomy; involvement changes the lesions only.
:func:`follow_up_copy` re-stamps a written phantom with an acquisition time (Study,
Series, Acquisition and Content Date/Time) and optionally an Issuer of Patient ID,
into a new folder, so the same files can be "scanned" at any time in any test.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from pydicom import dcmread

# 40 slices x 7.5 mm x 128 x 128 px: the whole chest, a few seconds to score on one CPU.
SMALL = dict(slices=40, rows=128, slice_spacing_mm=7.5)
PATIENT_ID = "FOLLOWUP-0001"
SEED = 2  # measured 21.4 % for 20 %, 34.2 % for 32 %, 23.7 % for 22 % with the classical scorer


def write_patient_phantom(out_dir: Path, involvement: float, *, patient_id: str = PATIENT_ID, seed: int = SEED,
                          **sizes) -> dict:
    from ct_triage_tools.phantom import write_phantom

    return write_phantom(out_dir, involvement, seed=seed, patient_id=patient_id, **(sizes or SMALL))


def follow_up_copy(src: Path, dst: Path, acquired_at: dt.datetime, *, issuer: str | None = None,
                   kernel: str = "FC51") -> list[Path]:
    """Copy ``src/<kernel>/*.dcm`` to ``dst`` with the given acquisition time (and issuer)."""
    dst.mkdir(parents=True, exist_ok=True)
    date, time = acquired_at.strftime("%Y%m%d"), acquired_at.strftime("%H%M%S")
    paths = []
    for path in sorted((src / kernel).glob("*.dcm")):
        ds = dcmread(path)
        for prefix in ("Study", "Series", "Acquisition", "Content"):
            setattr(ds, f"{prefix}Date", date)
            setattr(ds, f"{prefix}Time", time)
        if issuer is not None:
            ds.IssuerOfPatientID = issuer
        out = dst / path.name
        ds.save_as(out, enforce_file_format=True)
        paths.append(out)
    return paths
