"""Small, realistic synthetic chest CT series for the output and delivery tests.

Independent of ``ct_triage_tools.phantom`` on purpose: these tests exercise the DICOM writers,
not the scoring, so they only need valid CT Image instances with the full Patient,
General Study, Patient Study, General Series, Frame of Reference, General Equipment,
General Image, Image Plane, Image Pixel, CT Image, VOI LUT and SOP Common modules,
plus lesions at known pixel positions (returned as :class:`LesionBox` ground truth).

Geometry: axial slices (ImageOrientationPatient 1\\0\\0\\0\\1\\0), sorted by increasing
z (the slice normal), columns increase towards the patient's left, so the patient's
right lung is on the image's left half. Pixel data int16 (PixelRepresentation 1) with
RescaleIntercept -1024 / RescaleSlope 1 (stored value = HU + 1024).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian

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
        )
        common.update(overrides)
        return ScoreResult(**common)


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


def _ct_instance(
    hu_slice: np.ndarray, z: int, n_slices: int, sop_uid: str, study_uid: str, series_uid: str, frame_uid: str,
    spacing: float, thickness: float, *, patient_name: str, patient_id: str, accession_number: str,
) -> Dataset:
    rows, cols = hu_slice.shape
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = "20200415"
    ds.SeriesDate = "20200415"
    ds.AcquisitionDate = "20200415"
    ds.ContentDate = "20200415"
    ds.StudyTime = "101500"
    ds.SeriesTime = "101712"
    ds.AcquisitionTime = "101712"
    ds.ContentTime = "101713"
    ds.AccessionNumber = accession_number
    ds.Modality = "CT"
    ds.Manufacturer = "TOSHIBA"
    ds.InstitutionName = "Synthetic Hospital"
    ds.ReferringPhysicianName = "House^Gregory"
    ds.StationName = "CTAWP00001"
    ds.StudyDescription = "CT CHEST WO CONTRAST"
    ds.SeriesDescription = "LUNG 1.0 FC51"
    ds.ManufacturerModelName = "Aquilion"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.IssuerOfPatientID = "SYNTH"
    ds.PatientBirthDate = "19730102"
    ds.PatientSex = "F"
    ds.PatientAge = "047Y"
    ds.PatientSize = "1.68"
    ds.PatientWeight = "64"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = f"{thickness:g}"
    ds.KVP = "120"
    ds.DeviceSerialNumber = "SYN0001"
    ds.SoftwareVersions = "V6.0"
    ds.DataCollectionDiameter = "500"
    ds.ReconstructionDiameter = f"{spacing * cols:.2f}"
    ds.GantryDetectorTilt = "0"
    ds.TableHeight = "120"
    ds.RotationDirection = "CW"
    ds.ExposureTime = "500"
    ds.XRayTubeCurrent = "200"
    ds.Exposure = "100"
    ds.ConvolutionKernel = "FC51"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "4711"
    ds.SeriesNumber = 3
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = z + 1
    z_mm = -250.0 + z * thickness
    ds.ImagePositionPatient = [f"{-spacing * cols / 2:.3f}", f"{-spacing * rows / 2:.3f}", f"{z_mm:.3f}"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = f"{z_mm:.3f}"
    ds.ImagesInAcquisition = n_slices
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.PixelSpacing = [f"{spacing:.6f}", f"{spacing:.6f}"]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.WindowCenter = "-600"
    ds.WindowWidth = "1500"
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    stored = (hu_slice + 1024).astype(np.int16)
    ds.PixelData = stored.tobytes()
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
