"""The masks a result was measured on, kept for the DICOM Segmentation and the SR.

Scoring measures on a working grid (the original grid pooled by whole ``factor``s, see
:class:`worker.scoring.scorer.Segmentation`); the SEG and the SR's per-lesion groups need
those same masks afterwards, in the io worker, possibly on another host. So the job
stores them once per result version as one small file in the storage folder:

- format: ``numpy.savez_compressed`` of bit-packed masks (``np.packbits``, axis order
  z, row, col) plus the factor, the original shape and a format version; a 300x512x512
  study scored on a (1, 2, 2) grid is about 0.2 MB;
- written durably (temporary file, fsync, atomic rename, directory fsync) so a row that
  names the file never points at a torn file;
- masks: ``lung`` (both lungs, lesions included), ``left`` (the patient's left lung,
  subset of lung), ``lesion`` (subset of lung), and optionally ``ggo`` and
  ``consolidation`` (subsets of lesion) when the scorer tells them apart.

:meth:`ResultMasks.original_slice` maps one original slice back (nearest neighbour: a
working voxel covers ``factor`` original voxels), so builders never hold a full-size
3-D copy of every mask. Importing this module does not import torch.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
MASK_NAMES = ("lung", "left", "lesion", "ggo", "consolidation")
_REQUIRED = ("lung", "left", "lesion")


@dataclass
class ResultMasks:
    """Boolean working-grid masks (z', r', c') and how to map them to the original grid."""

    lung: np.ndarray
    left: np.ndarray
    lesion: np.ndarray
    factor: tuple[int, int, int]
    original_shape: tuple[int, int, int]
    ggo: np.ndarray | None = None
    consolidation: np.ndarray | None = None
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.factor = tuple(int(f) for f in self.factor)  # type: ignore[assignment]
        self.original_shape = tuple(int(s) for s in self.original_shape)  # type: ignore[assignment]
        if len(self.factor) != 3 or min(self.factor) < 1:
            raise ValueError(f"ResultMasks: argument 'factor' must be 3 ints >= 1, got {self.factor}")
        if len(self.original_shape) != 3 or min(self.original_shape) < 1:
            raise ValueError(f"ResultMasks: argument 'original_shape' must be 3 ints >= 1, got {self.original_shape}")
        shape = None
        for name in MASK_NAMES:
            arr = getattr(self, name)
            if arr is None:
                if name in _REQUIRED:
                    raise ValueError(f"ResultMasks: argument '{name}' is required")
                continue
            if not isinstance(arr, np.ndarray) or arr.ndim != 3:
                raise ValueError(f"ResultMasks: argument '{name}' must be a 3-D array")
            if arr.dtype != bool:
                arr = arr.astype(bool)
                setattr(self, name, arr)
            shape = shape or arr.shape
            if arr.shape != shape:
                raise ValueError(f"ResultMasks: argument '{name}' has shape {arr.shape}, expected {shape}")
        need = tuple(-(-o // f) for o, f in zip(self.original_shape, self.factor))
        if shape != need:
            raise ValueError(f"ResultMasks: masks of shape {shape} do not cover {self.original_shape} at factor "
                             f"{self.factor} (expected {need})")

    @classmethod
    def from_segmentation(cls, seg) -> ResultMasks:
        """From a scorer's :class:`Segmentation`; lesions are clipped to the lungs, as measured."""
        lung = seg.lung
        lesion = seg.lesion & lung
        extra = {}
        for name in ("ggo", "consolidation"):
            arr = getattr(seg, name, None)
            if arr is not None:
                extra[name] = np.asarray(arr, dtype=bool) & lesion
        return cls(lung=lung, left=seg.left & lung, lesion=lesion, factor=seg.factor,
                   original_shape=seg.original_shape, **extra)

    @property
    def names(self) -> list[str]:
        return [n for n in MASK_NAMES if getattr(self, n) is not None]

    def working_slice_index(self, k: int) -> int:
        return k // self.factor[0]

    def original_slice(self, name: str, k: int) -> np.ndarray:
        """Mask ``name`` on original slice ``k`` (rows x cols, bool), nearest neighbour."""
        arr = getattr(self, name)
        if arr is None:
            raise ValueError(f"ResultMasks has no '{name}' mask")
        if not 0 <= k < self.original_shape[0]:
            raise ValueError(f"slice index {k} outside 0..{self.original_shape[0] - 1}")
        plane = arr[k // self.factor[0]]
        _, fy, fx = self.factor
        _, rows, cols = self.original_shape
        if fy == 1 and fx == 1:
            return plane[:rows, :cols]
        return np.repeat(np.repeat(plane, fy, axis=0), fx, axis=1)[:rows, :cols]

    def original(self, name: str) -> np.ndarray:
        """The whole mask on the original grid (z, rows, cols); memory: one bool per voxel."""
        arr = getattr(self, name)
        if arr is None:
            raise ValueError(f"ResultMasks has no '{name}' mask")
        fz, fy, fx = self.factor
        out = arr
        for axis, f in enumerate((fz, fy, fx)):
            if f > 1:
                out = np.repeat(out, f, axis=axis)
        z, r, c = self.original_shape
        return out[:z, :r, :c]

    # -- storage --------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        arrays: dict[str, np.ndarray] = {
            "format": np.array([FORMAT_VERSION], dtype=np.int32),
            "factor": np.array(self.factor, dtype=np.int32),
            "original_shape": np.array(self.original_shape, dtype=np.int32),
            "working_shape": np.array(self.lung.shape, dtype=np.int32),
        }
        for name in self.names:
            arrays[name] = np.packbits(getattr(self, name), axis=None)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)  # type: ignore[arg-type]
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> ResultMasks:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            version = int(npz["format"][0])
            if version != FORMAT_VERSION:
                raise ValueError(f"mask file format {version} is not supported (expected {FORMAT_VERSION})")
            shape = tuple(int(v) for v in npz["working_shape"])
            count = int(np.prod(shape))
            masks = {name: np.unpackbits(npz[name], count=count).astype(bool).reshape(shape)
                     for name in MASK_NAMES if name in npz.files}
            return cls(factor=tuple(int(v) for v in npz["factor"]),  # type: ignore[arg-type]
                       original_shape=tuple(int(v) for v in npz["original_shape"]),  # type: ignore[arg-type]
                       **masks)


def write_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path``: temporary file, fsync, atomic rename, directory fsync."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_masks(path: Path, masks: ResultMasks) -> int:
    """Store ``masks`` durably at ``path``; returns the number of bytes written."""
    data = masks.to_bytes()
    write_durably(path, data)
    return len(data)


def load_masks(path: Path) -> ResultMasks:
    return ResultMasks.from_bytes(Path(path).read_bytes())
