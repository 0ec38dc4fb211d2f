"""The one interface every scorer implements: :class:`Scorer` and its :class:`Segmentation`.

A scorer turns a :class:`~worker.scoring.volume.Volume` into a
:class:`Segmentation`: three boolean masks (lungs, the patient's left lung, lesions)
on a working grid that is the original grid pooled by whole factors. Everything that
follows (volumes in ml, % involvement total and per lung, CT category, lesion count,
boxes per original slice) is computed once, the same way for every scorer, by
:func:`worker.scoring.pipeline.measure`. So the classical method and a trained U-Net
are compared on exactly the same arithmetic.

Implementations (:mod:`worker.scoring.classical`, :mod:`worker.scoring.unet`) import
this module; :mod:`worker.scoring.registry` picks one. This module imports nothing else
of the package (only the Volume type, for annotations) and never torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from worker.scoring.volume import Volume


@dataclass
class Segmentation:
    """Masks on the working grid, plus what is needed to map them back.

    ``factor`` is how many original voxels one working voxel spans along
    (z, row, col); the working grid covers ``ceil(original / factor)`` voxels per
    axis (the last voxel may hang over the edge: it was padded with air).
    """

    lung: np.ndarray  # bool (z', r', c')
    left: np.ndarray  # bool (z', r', c'): voxels of the patient's left lung (subset of lung)
    lesion: np.ndarray  # bool (z', r', c'): subset of lung
    factor: tuple[int, int, int]
    original_shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]  # of the working grid
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # when the scorer tells them apart: the lesion split into ground glass and consolidation
    ggo: np.ndarray | None = None
    consolidation: np.ndarray | None = None
    # when the scorer looks for them (worker.scoring.masses): lesion components that are solid
    # masses (tumours, not pneumonia), and whether they were taken out of ``lesion``
    mass: np.ndarray | None = None
    mass_excluded: bool = False

    def __post_init__(self) -> None:
        for name in ("lung", "left", "lesion", "ggo", "consolidation", "mass"):
            arr = getattr(self, name)
            if arr is None and name in ("ggo", "consolidation", "mass"):
                continue
            if not isinstance(arr, np.ndarray) or arr.dtype != bool or arr.ndim != 3:
                raise ValueError(f"Segmentation.{name} must be a 3-D bool array")
            if arr.shape != self.lung.shape:
                raise ValueError("Segmentation masks must share one shape")
        if (self.ggo is None) != (self.consolidation is None):
            raise ValueError("Segmentation.ggo and .consolidation come together")

    @property
    def voxel_volume_ml(self) -> float:
        dz, dy, dx = self.spacing_mm
        return dz * dy * dx / 1000.0


@runtime_checkable
class Scorer(Protocol):
    """What the pipeline needs of a scorer."""

    name: str  # recorded in ScoreResult.model
    version: str  # recorded in ScoreResult.model_version

    def segment(self, volume: Volume, device: str) -> Segmentation:
        """Lung, left-lung and lesion masks of ``volume`` computed on ``device``.

        May raise ``ct_triage.errors.NotApplicable`` (e.g. no lungs in the volume).
        """
        ...
