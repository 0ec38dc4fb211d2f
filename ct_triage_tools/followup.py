"""Follow-up phantoms: one patient scanned several times (issue 12 tests and the picture in docs/followup.md).

``python -m ct_triage_tools.followup docs/followup-summary-progression.png`` makes docs/followup.md's
picture: one phantom patient at 12 %, 20 % (50 h later) and 32 % (36 h after that), each scored,
the last compared with the two before, its SC summary written as PNG.

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
# Measured with the classical / hybrid scorer since the dense-lung margin rule (classical.py
# step 4), which reads this coarse phantom 1-3 points high: 20 % -> 22.7 / 23.0, 21 % -> 23.8 /
# 24.0, 22 % -> 24.9 / 25.1 (CT-2), 25 % -> 28.0 / 28.1; earlier 21.4 % for 20 %, 23.7 % for 22 %.
SEED = 2


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


def make_summary_png(out_png: Path, workdir: Path, *, sizes: dict | None = None) -> str:
    """Score three scans of one phantom patient and render the last one's summary with its trend."""
    from ct_triage.settings import Settings
    from worker.followup.comparison import Snapshot, acquisition_time, apply_assessment, assess
    from worker.outputs.trend import render_summary_png
    from worker.scoring.pipeline import score_study

    sizes = sizes or dict(slices=80, rows=256, slice_spacing_mm=3.75)
    settings = Settings.from_env({})
    t0 = dt.datetime(2026, 11, 24, 9, 30)
    scans = []
    for percent, when in ((12, t0), (20, t0 + dt.timedelta(hours=50)), (32, t0 + dt.timedelta(hours=86))):
        truth = write_patient_phantom(workdir / f"p{percent}", percent, **sizes)
        files = follow_up_copy(workdir / f"p{percent}", workdir / f"s{percent}", when)
        score = score_study({truth["series_by_kernel"]["FC51"]: files}, settings)
        score.study_instance_uid = truth["study_instance_uid"]
        header = dcmread(files[0], stop_before_pixels=True)
        acquired_at, source = acquisition_time(header)
        if score.involvement_percent is None:
            raise RuntimeError(f"the {percent} % phantom was not scored: {score.reason}")
        snap = Snapshot(score.study_instance_uid, score.involvement_percent, acquired_at, source,
                        score.involvement_percent_left, score.involvement_percent_right, score.lesion_volume_ml,
                        score.category, None, str(header.Manufacturer), str(header.ManufacturerModelName),
                        str(header.ConvolutionKernel), float(header.SliceThickness))
        scans.append((snap, score, files))
    current, score, files = scans[-1]
    apply_assessment(score, assess(current, [snap for snap, _, _ in scans[:-1]]))
    by_uid = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in files}
    render_summary_png([dcmread(by_uid[uid]) for uid in score.source_sop_instance_uids], score, out_png)
    return score.reason or ""


if __name__ == "__main__":
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        print(make_summary_png(Path(sys.argv[1]), Path(tmp)))
