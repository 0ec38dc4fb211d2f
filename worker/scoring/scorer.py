"""The one interface every scorer implements, and the factory that picks one.

A scorer turns a :class:`~worker.scoring.volume.Volume` into a
:class:`Segmentation`: three boolean masks (lungs, the patient's left lung, lesions)
on a working grid that is the original grid pooled by whole factors. Everything that
follows (volumes in ml, % involvement total and per lung, CT category, lesion count,
boxes per original slice) is computed once, the same way for every scorer, by
:func:`worker.scoring.pipeline.measure`. So the classical method and a trained U-Net
are compared on exactly the same arithmetic.

``CT_TRIAGE_SCORER`` chooses: ``classical`` (default, transparent, needs no weights),
``hybrid`` (classical lungs, lesions from the 2D network shipped with the package,
``worker.scoring.hybrid``; ``CT_TRIAGE_LESION_WEIGHTS`` may name other weights) or ``unet`` (a small 3D U-Net whose weights come from ``CT_TRIAGE_UNET_WEIGHTS``;
nothing is downloaded). This module does not import torch; the scorers import it
when they are built.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from ct_triage.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from ct_triage.settings import Settings
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

    def __post_init__(self) -> None:
        for name in ("lung", "left", "lesion"):
            arr = getattr(self, name)
            if not isinstance(arr, np.ndarray) or arr.dtype != bool or arr.ndim != 3:
                raise ValueError(f"Segmentation.{name} must be a 3-D bool array")
            if arr.shape != self.lung.shape:
                raise ValueError("Segmentation masks must share one shape")

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


_cache: dict[tuple, Scorer] = {}
_cache_lock = threading.Lock()


def get_scorer(settings: Settings) -> Scorer:
    """The scorer ``settings.scorer`` names (cached per process; a changed weights
    file is reloaded). Raises ConfigError for an unknown name or unusable weights."""
    kind = (settings.scorer or "classical").strip().lower()
    if kind == "classical":
        key: tuple = ("classical",)
    elif kind == "hybrid":
        from worker.scoring.lesion_net import DEFAULT_WEIGHTS

        path = Path(settings.lesion_weights).expanduser() if settings.lesion_weights else DEFAULT_WEIGHTS
        try:
            stat = path.stat()
            key = ("hybrid", str(path.resolve()), stat.st_mtime_ns, stat.st_size)
        except OSError:
            key = ("hybrid", str(path), None, None)
    elif kind == "unet":
        if not settings.unet_weights:
            raise ConfigError(
                "CT_TRIAGE_SCORER=unet needs CT_TRIAGE_UNET_WEIGHTS (a weights file written by "
                "`ct-triage train`); nothing is downloaded"
            )
        path = Path(settings.unet_weights).expanduser()
        try:
            stat = path.stat()
            key = ("unet", str(path.resolve()), stat.st_mtime_ns, stat.st_size)
        except OSError:
            key = ("unet", str(path), None, None)
    else:
        raise ConfigError(f"CT_TRIAGE_SCORER must be classical, hybrid or unet, got {settings.scorer!r}")
    with _cache_lock:
        scorer = _cache.get(key)
        if scorer is None:
            if kind == "classical":
                from worker.scoring.classical import ClassicalScorer

                scorer = ClassicalScorer()
            elif kind == "hybrid":
                from worker.scoring.hybrid import HybridScorer

                scorer = HybridScorer(Path(key[1]))
            else:
                from worker.scoring.unet import UNetScorer

                scorer = UNetScorer(Path(settings.unet_weights))
            _cache[key] = scorer
    return scorer


def clear_cache() -> None:
    with _cache_lock:
        _cache.clear()
