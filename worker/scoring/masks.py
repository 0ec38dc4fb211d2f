"""The masks a result was measured on, kept for the DICOM Segmentation and the SR.

Scoring measures on a working grid (the original grid pooled by whole ``factor``s, see
:class:`worker.scoring.base.Segmentation`); the SEG and the SR's per-lesion groups need
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
MASK_NAMES = ("lung", "left", "lesion", "ggo", "consolidation")
_REQUIRED = ("lung", "left", "lesion")


@dataclass(frozen=True)
class LesionComponent:
    """One 3-D lesion: size, centre of mass and inclusive bounding box in original indices."""

    rank: int  # 1 = largest
    voxels: int  # working-grid voxels
    volume_ml: float | None
    center: tuple[float, float, float]  # (z, row, col), continuous original-grid index
    box_min: tuple[int, int, int]
    box_max: tuple[int, int, int]
    side: str  # "left" | "right": the lung holding most of it
    kind: str | None = None  # "ggo" | "consolidation" when the scorer tells them apart


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
    spacing_mm: tuple[float, float, float] | None = None  # of the working grid (z, row, col)

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
                   original_shape=seg.original_shape, spacing_mm=tuple(seg.spacing_mm), **extra)

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

    def lesion_components(self, limit: int | None = None) -> list[LesionComponent]:
        """3-D lesions: 26-connected components of ``lesion`` (as ``measure`` counts them),
        largest first (ties: lower first voxel), at most ``limit``.

        Coordinates are continuous original-grid indices (z, row, col); volumes need
        ``spacing_mm``.
        """
        from scipy import ndimage

        if not self.lesion.any():
            return []
        # label only the lesions' bounding box (much smaller than the volume)
        crop = tuple(_extent(self.lesion, axis) for axis in range(3))
        offset = [sl.start for sl in crop]
        labels, count = ndimage.label(self.lesion[crop], structure=np.ones((3, 3, 3), dtype=bool))
        coords = np.nonzero(labels)
        ids = labels[coords]
        sizes = np.bincount(ids, minlength=count + 1)
        sums = [np.bincount(ids, weights=c.astype(np.float64), minlength=count + 1) for c in coords]
        on_left = np.bincount(labels[self.left[crop]], minlength=count + 1)
        split = self.ggo is not None and self.consolidation is not None
        if split:
            n_ggo = np.bincount(labels[self.ggo[crop]], minlength=count + 1)  # type: ignore[index]
            n_cons = np.bincount(labels[self.consolidation[crop]], minlength=count + 1)  # type: ignore[index]
        order = sorted(range(1, count + 1), key=lambda i: -int(sizes[i]))  # stable: label order breaks ties
        if limit is not None:
            order = order[:limit]
        objects = ndimage.find_objects(labels)
        factor = self.factor
        voxel_ml = float(np.prod(self.spacing_mm)) / 1000.0 if self.spacing_mm is not None else None
        out = []
        for rank, index in enumerate(order, start=1):
            sl = objects[index - 1]
            n = int(sizes[index])
            center = tuple((sums[a][index] / n + offset[a] + 0.5) * factor[a] - 0.5 for a in range(3))
            box_min = tuple((sl[a].start + offset[a]) * factor[a] for a in range(3))
            box_max = tuple(min((sl[a].stop + offset[a]) * factor[a], self.original_shape[a]) - 1 for a in range(3))
            kind = None
            if split:
                kind = "consolidation" if n_cons[index] > n_ggo[index] else "ggo"
            out.append(LesionComponent(
                rank=rank, voxels=n, volume_ml=None if voxel_ml is None else n * voxel_ml,
                center=center, box_min=box_min, box_max=box_max,
                side="left" if int(on_left[index]) * 2 >= n else "right", kind=kind,
            ))
        return out

    # -- storage --------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        arrays: dict[str, np.ndarray] = {
            "format": np.array([FORMAT_VERSION], dtype=np.int32),
            "factor": np.array(self.factor, dtype=np.int32),
            "original_shape": np.array(self.original_shape, dtype=np.int32),
            "working_shape": np.array(self.lung.shape, dtype=np.int32),
        }
        if self.spacing_mm is not None:
            arrays["spacing_mm"] = np.array(self.spacing_mm, dtype=np.float64)
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
            spacing = tuple(float(v) for v in npz["spacing_mm"]) if "spacing_mm" in npz.files else None
            return cls(factor=tuple(int(v) for v in npz["factor"]),  # type: ignore[arg-type]
                       spacing_mm=spacing,  # type: ignore[arg-type]
                       original_shape=tuple(int(v) for v in npz["original_shape"]),  # type: ignore[arg-type]
                       **masks)


def _extent(mask: np.ndarray, axis: int) -> slice:
    other = tuple(a for a in range(mask.ndim) if a != axis)
    idx = np.flatnonzero(mask.any(axis=other))
    return slice(int(idx[0]), int(idx[-1]) + 1)


def save_masks(path: Path, masks: ResultMasks) -> int:
    """Store ``masks`` durably at ``path``; returns the number of bytes written."""
    from worker.durable import write_durably

    data = masks.to_bytes()
    write_durably(path, data)
    return len(data)


def load_masks(path: Path) -> ResultMasks:
    return ResultMasks.from_bytes(Path(path).read_bytes())
