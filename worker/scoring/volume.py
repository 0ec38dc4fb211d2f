"""A CT volume in Hounsfield units with the geometry scoring needs.

Produced by the loaders (DICOM series, NIfTI) and consumed by the scorers.
Array axes are (z, row, column): z sorted by position along the slice normal,
ascending; rows and columns as in the original slices, so a box found on
``hu[k]`` is drawn on the instance ``sop_instance_uids[k]`` unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Volume:
    hu: np.ndarray  # (z, rows, cols), int16 or float32, HU; padding / outside scan set to -1024
    spacing_mm: tuple[float, float, float]  # (z, row, col): z from positions, not SliceThickness
    sop_instance_uids: list[str] = field(default_factory=list)  # one per z; empty for NIfTI
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    # True when increasing column index points to the patient's left (the usual
    # axial orientation, row cosine +x in LPS): the right lung is then at low columns.
    column_towards_patient_left: bool = True
    source: str = ""  # what it was loaded from, for messages

    def __post_init__(self) -> None:
        if not isinstance(self.hu, np.ndarray) or self.hu.ndim != 3:
            raise ValueError("hu must be a 3-D numpy array (z, rows, cols)")
        if len(self.spacing_mm) != 3 or any(not (s > 0) for s in self.spacing_mm):
            raise ValueError(f"spacing_mm must be three positive numbers, got {self.spacing_mm!r}")
        if self.sop_instance_uids and len(self.sop_instance_uids) != self.hu.shape[0]:
            raise ValueError("sop_instance_uids must have one entry per slice")

    @property
    def voxel_volume_ml(self) -> float:
        dz, dy, dx = self.spacing_mm
        return dz * dy * dx / 1000.0
