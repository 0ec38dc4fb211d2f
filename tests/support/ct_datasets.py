"""Small, realistic synthetic chest CT series for the output and delivery tests.

Not the phantom's anatomy (``ct_triage_tools.phantom``): these tests exercise the DICOM
writers, not the scoring, so they need small valid CT Image instances (headers from the
phantom's :func:`~ct_triage_tools.phantom.ct_slice_dataset`, plus the Patient module's
optional attributes it leaves out) with lesions at known pixel positions (returned as
:class:`LesionBox` ground truth).

Geometry: axial slices (ImageOrientationPatient 1\\0\\0\\0\\1\\0), sorted by increasing
z (the slice normal), columns increase towards the patient's left, so the patient's
right lung is on the image's left half. Pixel data int16 (PixelRepresentation 1) with
RescaleIntercept -1024 / RescaleSlope 1 (stored value = HU + 1024).
"""

from __future__ import annotations

import io
import uuid
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset

from ct_triage_tools.phantom import ct_file_meta, ct_slice_dataset
from worker.scoring.result import LesionBox, ScoreResult, category_for

HU_AIR = -1000
HU_LUNG = -850
HU_GGO = -450
HU_SOFT = 40
HU_BONE = 700


def _uid(seed: int, *parts: object) -> str:
    """Deterministic 2.25 UID (pydicom's generate_uid(prefix=None) would be random)."""
    name = "|".join(["tests.support.ct_datasets", str(seed), *map(str, parts)])
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, name).int}"


@dataclass
class SyntheticCT:
    """A synthetic series: instances sorted along the slice normal, plus ground truth."""

    datasets: list[Dataset]
    lesion_boxes: list[LesionBox]
    hu: np.ndarray  # (slices, rows, cols) float32, the HU volume behind the pixel data
    lung_mask: np.ndarray = field(repr=False, default=None)  # (slices, rows, cols) bool
    lesion_mask: np.ndarray = field(repr=False, default=None)

    @property
    def study_instance_uid(self) -> str:
        return str(self.datasets[0].StudyInstanceUID)

    @property
    def series_instance_uid(self) -> str:
        return str(self.datasets[0].SeriesInstanceUID)

    @property
    def sop_instance_uids(self) -> list[str]:
        return [str(ds.SOPInstanceUID) for ds in self.datasets]

    def score_result(self, status: str = "scored", reason: str | None = None, **overrides) -> ScoreResult:
        """A :class:`ScoreResult` consistent with this series (numbers from the masks)."""
        ds = self.datasets[0]
        voxel_ml = float(ds.PixelSpacing[0]) * float(ds.PixelSpacing[1]) * float(ds.SliceThickness) / 1000.0
        common = dict(
            study_instance_uid=self.study_instance_uid,
            series_instance_uid=self.series_instance_uid,
            source_sop_instance_uids=self.sop_instance_uids,
            device="cpu",
            seconds=1.25,
            timings={"load": 0.25, "lungs": 0.5, "lesions": 0.5},
        )
        if status != "scored":
            common.update(status=status, reason=reason or f"synthetic {status}")
            common.update(overrides)
            return ScoreResult(**common)
        half = self.lung_mask.shape[2] // 2
        right = self.lung_mask[:, :, :half]  # patient's right = image left
        left = self.lung_mask[:, :, half:]
        les_r = self.lesion_mask[:, :, :half]
        les_l = self.lesion_mask[:, :, half:]
        lung_ml = float(self.lung_mask.sum()) * voxel_ml
        lesion_ml = float(self.lesion_mask.sum()) * voxel_ml
        pct = 100.0 * lesion_ml / lung_ml if lung_ml else 0.0
        pct_l = 100.0 * float(les_l.sum()) / float(left.sum()) if left.sum() else 0.0
        pct_r = 100.0 * float(les_r.sum()) / float(right.sum()) if right.sum() else 0.0
        common.update(
            status="scored",
            category=category_for(pct),
            involvement_percent=round(pct, 2),
            involvement_percent_left=round(pct_l, 2),
            involvement_percent_right=round(pct_r, 2),
            lung_volume_ml=round(lung_ml, 1),
            lung_volume_left_ml=round(float(left.sum()) * voxel_ml, 1),
            lung_volume_right_ml=round(float(right.sum()) * voxel_ml, 1),
            lesion_volume_ml=round(lesion_ml, 1),
            lesion_count=len(self.lesion_boxes),
            boxes=list(self.lesion_boxes),
            masks=self.result_masks(),
        )
        common.update(overrides)
        return ScoreResult(**common)

    def result_masks(self):
        """The masks as the scorer hands them on (working grid = original grid here)."""
        from worker.scoring.masks import ResultMasks

        ds = self.datasets[0]
        half = self.lung_mask.shape[2] // 2
        left = np.zeros_like(self.lung_mask)
        left[:, :, half:] = self.lung_mask[:, :, half:]
        spacing = (float(ds.SliceThickness), float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1]))
        return ResultMasks(lung=self.lung_mask, left=left, lesion=self.lesion_mask & self.lung_mask, factor=(1, 1, 1),
                           original_shape=self.lung_mask.shape, spacing_mm=spacing)


def _ellipse(rows: int, cols: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    yy, xx = np.mgrid[0:rows, 0:cols]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def make_chest_ct(
    n_slices: int = 6,
    size: int = 128,
    *,
    seed: int = 0,
    lesions: bool = True,
    patient_name: str = "Müller^Anna",
    patient_id: str = "CTT-0001",
    accession_number: str = "ACC0001",
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    field_of_view_mm: float = 350.0,
    slice_thickness_mm: float = 5.0,
) -> SyntheticCT:
    """Build ``n_slices`` axial CT instances of ``size`` x ``size`` pixels.

    Lesions (ground-glass discs, -450 HU) sit in the right lung on the middle slices and
    in the left lung on one slice; their bounding boxes are returned as ``lesion_boxes``.
    """
    if n_slices < 1:
        raise ValueError("n_slices must be >= 1")
    if size < 32:
        raise ValueError("size must be >= 32")
    rng = np.random.default_rng(seed)
    rows = cols = size
    spacing = field_of_view_mm / size
    study_uid = study_instance_uid or _uid(seed, "study")
    series_uid = series_instance_uid or _uid(seed, "series", study_uid)
    frame_uid = _uid(seed, "frame", study_uid)

    body = _ellipse(rows, cols, rows * 0.52, cols / 2, rows * 0.33, cols * 0.44)
    spine = _ellipse(rows, cols, rows * 0.78, cols / 2, rows * 0.05, cols * 0.05)
    hu = np.full((n_slices, rows, cols), HU_AIR, dtype=np.float32)
    lung_mask = np.zeros((n_slices, rows, cols), dtype=bool)
    lesion_mask = np.zeros((n_slices, rows, cols), dtype=bool)
    boxes: list[LesionBox] = []
    sop_uids = [_uid(seed, "sop", series_uid, i) for i in range(n_slices)]
    for z in range(n_slices):
        # lungs shrink towards the apex and the base
        t = (z + 0.5) / n_slices
        scale = 0.75 + 0.25 * np.sin(np.pi * t)
        lung_r = _ellipse(rows, cols, rows * 0.48, cols * 0.30, rows * 0.22 * scale, cols * 0.13 * scale)
        lung_l = _ellipse(rows, cols, rows * 0.48, cols * 0.70, rows * 0.22 * scale, cols * 0.13 * scale)
        sl = hu[z]
        sl[body] = HU_SOFT
        sl[spine] = HU_BONE
        sl[lung_r | lung_l] = HU_LUNG
        lung_mask[z] = lung_r | lung_l
        if lesions:
            discs: list[tuple[np.ndarray, str]] = []
            if 0 < z < n_slices - 1 or n_slices <= 2:
                disc = _ellipse(rows, cols, rows * 0.45, cols * 0.28, rows * 0.07, cols * 0.06)
                discs.append((disc & lung_r, "right"))
            if z == n_slices // 2:
                disc = _ellipse(rows, cols, rows * 0.55, cols * 0.72, rows * 0.05, cols * 0.04)
                discs.append((disc & lung_l, "left"))
            for disc, side in discs:
                if not disc.any():
                    continue
                sl[disc] = HU_GGO
                lesion_mask[z] |= disc
                rr, cc = np.nonzero(disc)
                boxes.append(LesionBox(z, sop_uids[z], int(rr.min()), int(cc.min()), int(rr.max()), int(cc.max()),
                                       side))
        sl += rng.normal(0.0, 12.0, size=(rows, cols)).astype(np.float32)
    hu = np.clip(np.rint(hu), -1024, 3071)

    datasets = []
    for z in range(n_slices):
        datasets.append(
            _ct_instance(
                hu[z], z, n_slices, sop_uids[z], study_uid, series_uid, frame_uid, spacing, slice_thickness_mm,
                patient_name=patient_name, patient_id=patient_id, accession_number=accession_number,
            )
        )
    return SyntheticCT(datasets, boxes, hu.astype(np.float32), lung_mask, lesion_mask)


PATIENT = {"PatientBirthDate": "19730102", "PatientSex": "F", "PatientAge": "047Y"}
# The Patient module's optional attributes the phantom leaves out: set here so the
# writers' copying of them is tested too.
OPTIONAL_ELEMENTS = {"IssuerOfPatientID": "SYNTH", "PatientSize": "1.68", "PatientWeight": "64"}


def _ct_instance(
    hu_slice: np.ndarray, z: int, n_slices: int, sop_uid: str, study_uid: str, series_uid: str, frame_uid: str,
    spacing: float, thickness: float, *, patient_name: str, patient_id: str, accession_number: str,
) -> Dataset:
    rows, cols = hu_slice.shape
    corner = (-spacing * cols / 2, -spacing * rows / 2, -250.0 + z * thickness)
    patient = {**PATIENT, "PatientName": patient_name, "PatientID": patient_id, "AccessionNumber": accession_number}
    ds = ct_slice_dataset(
        sop_instance_uid=sop_uid, study_instance_uid=study_uid, series_instance_uid=series_uid,
        frame_of_reference_uid=frame_uid, patient=patient, kernel="FC51", series_number=3, instance_number=z + 1,
        slices=n_slices, rows=rows, cols=cols, position=corner,
        spacing=(thickness, spacing, spacing), **OPTIONAL_ELEMENTS)
    ds.file_meta = ct_file_meta(sop_uid)
    ds.PixelData = (hu_slice + 1024).astype(np.int16).tobytes()
    return ds


def write_series(ct: SyntheticCT, directory) -> list:
    """Write the instances as ``CT000001.dcm``...; returns the paths."""
    from pathlib import Path

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(ct.datasets, start=1):
        path = directory / f"CT{i:06d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def file_bytes(ds: Dataset) -> bytes:
    """``ds`` as a DICOM file (preamble, meta, data set), as it is stored and sent."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
