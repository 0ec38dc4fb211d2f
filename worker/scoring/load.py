"""Load a CT series (DICOM, single- or multi-frame) or a NIfTI study into a :class:`Volume`.

Only numpy, pydicom and nibabel: the dicom node and tests import this without torch.

A volume is in Hounsfield units: per-frame RescaleSlope/Intercept applied, padding
(PixelPaddingValue, PixelPaddingRangeLimit) and anything below -1024 set to -1024.
Slices are sorted by position along the slice normal; z spacing comes from those
positions (median step), never from SliceThickness. What ct-triage cannot score is
refused with :class:`NotApplicable` (a one-line reason); what cannot be read at all
with :class:`InvalidInput`.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from ct_triage.errors import CtTriageError, InvalidInput, NotApplicable
from ct_triage.text import clean_exception
from worker.scoring.volume import Volume

HU_FLOOR = -1024
HU_CEILING = 32767  # int16

# Tolerances: scanners write positions and cosines with a few decimals.
ORIENTATION_TOLERANCE = 1e-3  # max difference of direction cosines within a series
AXIAL_MIN_NORMAL_Z = 0.9  # |normal . z| at least this (about 25 degrees off axial)
SHEAR_TOLERANCE = 0.01  # in-plane shift per mm along the normal (about 0.6 degrees)
SHEAR_SLACK_MM = 0.05
GAP_FACTOR = 1.5  # a step longer than this times the median step is a missing slice
DUPLICATE_MM = 0.01

_PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


# -- geometry helpers (also used by series selection) ----------------------------------


def slice_normal(image_orientation_patient: Sequence[float] | np.ndarray) -> np.ndarray:
    """Unit normal (row cosine x column cosine) of an ImageOrientationPatient."""
    cosines = np.asarray([float(v) for v in image_orientation_patient], dtype=np.float64)
    if cosines.shape != (6,):
        raise ValueError(
            f"image_orientation_patient must have 6 values, got {len(cosines)}"
        )
    normal = np.cross(cosines[:3], cosines[3:])
    length = np.linalg.norm(normal)
    if length < 1e-6:
        raise ValueError(f"image_orientation_patient {list(cosines)} has parallel cosines")
    return normal / length


def is_axial(image_orientation_patient: Sequence[float]) -> bool:
    return abs(slice_normal(image_orientation_patient)[2]) >= AXIAL_MIN_NORMAL_Z


# -- DICOM series -----------------------------------------------------------------------


@dataclass
class _Frame:
    """One slice's geometry and where its pixels are (file index, frame index)."""

    dataset_index: int
    frame_index: int | None  # None for a single-frame instance
    sop_instance_uid: str
    position: np.ndarray
    orientation: np.ndarray
    pixel_spacing: tuple[float, float]
    rescale_slope: float
    rescale_intercept: float
    slice_thickness: float | None
    source: str


def load_series(paths: Sequence[str | Path], *, min_slices: int = 20) -> Volume:
    """The instances of one CT series as a volume in HU, sorted along the slice normal.

    NotApplicable: not CT, localizer, fewer than ``min_slices`` slices, gantry tilt or a
    sheared stack, mixed orientations or sizes, not axial, duplicate positions, a z-gap.
    InvalidInput: unreadable file, missing pixel data or geometry, undecodable pixels.
    """
    files = [Path(p) for p in paths]
    if not files:
        raise InvalidInput("paths is empty: no DICOM instances to load")
    try:
        return _load_series(files, min_slices)
    except CtTriageError:
        raise
    except Exception as exc:  # pydicom converts values lazily: a damaged value fails at first use
        raise InvalidInput(f"{files[0].parent}: unreadable attribute or pixel data "
                           f"({clean_exception(exc)})") from exc


def _load_series(paths: list[Path], min_slices: int) -> Volume:
    datasets = [_read_instance(p) for p in paths]
    _check_series_attributes(datasets, paths)
    frames = [frame for index, ds in enumerate(datasets) for frame in _frames(index, ds, paths[index])]
    if len(frames) < min_slices:
        raise NotApplicable(
            f"too few slices: {len(frames)} (at least {min_slices} needed for a chest CT volume)"
        )
    rows, cols = _common_size(datasets, paths)
    frames, dz = _sorted_stack(frames)
    integral = all(_integral(f.rescale_slope) and _integral(f.rescale_intercept) for f in frames)
    hu = np.empty((len(frames), rows, cols), dtype=np.int16 if integral else np.float32)
    study_instance_uid = _text(datasets, "StudyInstanceUID")
    series_instance_uid = _text(datasets, "SeriesInstanceUID")
    # _fill_hu frees each data set once decoded: the list it gets is the only one left
    pending: list[Dataset | None] = list(datasets)
    del datasets
    _fill_hu(hu, frames, pending, paths)
    first = frames[0]
    return Volume(
        hu=hu,
        spacing_mm=(dz, first.pixel_spacing[0], first.pixel_spacing[1]),
        sop_instance_uids=[f.sop_instance_uid for f in frames],
        study_instance_uid=study_instance_uid,
        series_instance_uid=series_instance_uid,
        column_towards_patient_left=bool(first.orientation[0] > 0),
        source=str(paths[0].parent) if len(paths) > 1 else str(paths[0]),
    )


def _read_instance(path: Path) -> Dataset:
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # a damaged file can fail in many ways; all mean unreadable
        raise InvalidInput(f"{path}: not a readable DICOM file ({exc})") from exc
    if not any(keyword in ds for keyword in _PIXEL_DATA_KEYWORDS):
        raise InvalidInput(f"{path}: no pixel data")
    return ds


def _check_series_attributes(datasets: list[Dataset], paths: list[Path]) -> None:
    for ds, path in zip(datasets, paths):
        modality = ds.get("Modality", "")
        if modality != "CT":
            raise NotApplicable(f"modality {modality or '(none)'}, not CT ({path.name})")
        image_type = [str(v).upper() for v in _multi(ds.get("ImageType"))]
        if "LOCALIZER" in image_type:
            raise NotApplicable(f"localizer (scout) image, not an axial series ({path.name})")
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series) > 1:
        raise InvalidInput(f"paths hold instances of {len(series)} series; pass one series")


def _frames(index: int, ds: Dataset, path: Path) -> list[_Frame]:
    if "PerFrameFunctionalGroupsSequence" in ds:
        return _enhanced_frames(index, ds, path)
    tilt = float(ds.get("GantryDetectorTilt", 0) or 0)
    if abs(tilt) > 0.01:
        raise NotApplicable(f"gantry tilt of {tilt:g} degrees ({path.name})")
    return [_frame(index, None, str(ds.get("SOPInstanceUID", "")), ds, ds, ds, ds, path)]


def _enhanced_frames(index: int, ds: Dataset, path: Path) -> list[_Frame]:
    """Frames of an Enhanced CT (multi-frame) instance, geometry from functional groups."""
    shared = ds.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
    frames = []
    for frame_index, per_frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        def group(keyword: str, per_frame: Dataset = per_frame) -> Dataset:
            for source in (per_frame, shared):
                if keyword in source and len(source[keyword].value):
                    return source[keyword].value[0]
            return Dataset()

        frame_type = [str(v).upper() for v in _multi(group("CTImageFrameTypeSequence").get("FrameType"))]
        if "LOCALIZER" in frame_type:
            raise NotApplicable(f"localizer frame {frame_index + 1} ({path.name})")
        tilt = float(group("CTAcquisitionDetailsSequence").get("GantryDetectorTilt", 0) or 0)
        if abs(tilt) > 0.01:
            raise NotApplicable(f"gantry tilt of {tilt:g} degrees ({path.name})")
        frames.append(_frame(index, frame_index, str(ds.get("SOPInstanceUID", "")),
                             group("PlanePositionSequence"),
                             group("PlaneOrientationSequence"), group("PixelMeasuresSequence"),
                             _rescale_source(group("PixelValueTransformationSequence"), ds), path))
    return frames


def _rescale_source(transformation: Dataset, ds: Dataset) -> Dataset:
    return transformation if "RescaleSlope" in transformation else ds


def _frame(index, frame_index, sop_instance_uid, position_src, orientation_src, measures_src,
           rescale_src, path: Path) -> _Frame:
    where = path.name if frame_index is None else f"{path.name} frame {frame_index + 1}"
    position = _vector(position_src, "ImagePositionPatient", 3, where)
    orientation = _vector(orientation_src, "ImageOrientationPatient", 6, where)
    spacing = _vector(measures_src, "PixelSpacing", 2, where)
    if not np.all(spacing > 0):
        raise InvalidInput(f"{where}: PixelSpacing {list(spacing)} is not positive")
    try:
        slope = float(rescale_src.get("RescaleSlope", 1) or 1)
        intercept = float(rescale_src.get("RescaleIntercept", 0) or 0)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{where}: unreadable RescaleSlope/RescaleIntercept ({exc})") from exc
    return _Frame(
        dataset_index=index,
        frame_index=frame_index,
        sop_instance_uid=sop_instance_uid,
        position=position,
        orientation=orientation,
        pixel_spacing=(float(spacing[0]), float(spacing[1])),
        rescale_slope=slope,
        rescale_intercept=intercept,
        slice_thickness=_optional_float(measures_src.get("SliceThickness")),
        source=where,
    )


def _vector(ds: Dataset, keyword: str, length: int, where: str) -> np.ndarray:
    value = ds.get(keyword)
    try:
        vector = np.asarray([float(v) for v in _multi(value)], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{where}: unreadable {keyword} ({exc})") from exc
    if vector.shape != (length,):
        raise InvalidInput(f"{where}: {keyword} missing or not {length} numbers")
    return vector


def _common_size(datasets: list[Dataset], paths: list[Path]) -> tuple[int, int]:
    sizes = {(int(ds.get("Rows", 0)), int(ds.get("Columns", 0))) for ds in datasets}
    if len(sizes) > 1:
        listed = ", ".join(f"{r}x{c}" for r, c in sorted(sizes))
        raise NotApplicable(f"mixed image sizes in one series: {listed}")
    rows, cols = sizes.pop()
    if rows <= 0 or cols <= 0:
        raise InvalidInput(f"{paths[0].name}: Rows/Columns missing")
    return rows, cols


def _sorted_stack(frames: list[_Frame]) -> tuple[list[_Frame], float]:
    """Frames sorted along the slice normal, and the median step; refuses what is not
    one straight, evenly filled stack of parallel axial slices."""
    first = frames[0]
    for frame in frames[1:]:
        if np.max(np.abs(frame.orientation - first.orientation)) > ORIENTATION_TOLERANCE:
            raise NotApplicable(
                f"mixed orientations in one series: {_cosines(first.orientation)} "
                f"({first.source}) and {_cosines(frame.orientation)} ({frame.source})"
            )
        if np.max(np.abs(np.subtract(frame.pixel_spacing, first.pixel_spacing))) > 1e-3:
            raise NotApplicable(
                f"mixed pixel spacing in one series: {first.pixel_spacing} and {frame.pixel_spacing}"
            )
    normal = slice_normal(first.orientation)
    if abs(normal[2]) < AXIAL_MIN_NORMAL_Z:
        raise NotApplicable(f"not an axial series: slice normal {_cosines(normal)}")
    along = np.array([frame.position @ normal for frame in frames])
    order = np.argsort(along, kind="stable")
    frames = [frames[i] for i in order]
    along = along[order]
    _check_straight(frames, along, normal)
    if len(frames) == 1:  # a single slice (only with min_slices=1): nothing to measure
        thickness = float(frames[0].slice_thickness or 1.0)
        return frames, thickness
    steps = np.diff(along)
    duplicate = np.nonzero(steps < DUPLICATE_MM)[0]
    if duplicate.size:
        k = int(duplicate[0])
        raise NotApplicable(
            f"two slices at the same position {along[k]:.2f} mm ({frames[k].source}, "
            f"{frames[k + 1].source})"
        )
    dz = float(np.median(steps))
    gaps = np.nonzero(steps > GAP_FACTOR * dz)[0]
    if gaps.size:
        k = int(gaps[0])
        raise NotApplicable(
            f"z-gap of {steps[k]:.2f} mm between slices {k} and {k + 1} "
            f"(spacing {dz:.2f} mm): missing slices"
        )
    return frames, dz


def _check_straight(frames: list[_Frame], along: np.ndarray, normal: np.ndarray) -> None:
    """Positions must move along the normal only: a shift within the slice plane from one
    slice to the next is a gantry tilt (or a sheared stack) that was not declared."""
    offsets = np.array([frame.position for frame in frames]) - frames[0].position
    in_plane = offsets - np.outer(offsets @ normal, normal)
    shift = np.linalg.norm(in_plane, axis=1)
    allowed = SHEAR_SLACK_MM + SHEAR_TOLERANCE * np.abs(along - along[0])
    bad = np.nonzero(shift > allowed)[0]
    if bad.size:
        k = int(bad[-1])
        degrees = np.degrees(np.arctan2(shift[k], abs(along[k] - along[0])))
        raise NotApplicable(
            f"slice positions not along the slice normal (gantry tilt or sheared stack, "
            f"about {degrees:.1f} degrees)"
        )


def _fill_hu(hu: np.ndarray, frames: list[_Frame], datasets: list[Dataset | None],
             paths: list[Path]) -> None:
    """Decode each file once, in file order, writing its frames to their sorted places."""
    slot = {(f.dataset_index, f.frame_index): k for k, f in enumerate(frames)}
    for index, ds in enumerate(datasets):
        assert ds is not None, "each data set is decoded once"
        pixels = _decode(ds, paths[index])
        padding = _padding(ds, pixels)
        if pixels.ndim == 2:
            pixels, padding = pixels[None], None if padding is None else padding[None]
        multi_frame = "PerFrameFunctionalGroupsSequence" in ds
        for frame_index in range(pixels.shape[0]):
            k = slot[(index, frame_index if multi_frame else None)]
            frame = frames[k]
            hu[k] = _to_hu(pixels[frame_index], None if padding is None else padding[frame_index],
                           frame.rescale_slope, frame.rescale_intercept, hu.dtype)
        datasets[index] = None  # free the raw bytes as we go


def _decode(ds: Dataset, path: Path) -> np.ndarray:
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # decoders raise many kinds; all mean "cannot use these pixels"
        raise InvalidInput(f"{path}: pixel data cannot be decoded ({exc})") from exc
    if pixels.ndim not in (2, 3):
        raise InvalidInput(f"{path}: pixel data is not greyscale (shape {pixels.shape})")
    return pixels


def _padding(ds: Dataset, pixels: np.ndarray) -> np.ndarray | None:
    """Mask of stored values that are padding (outside the scan), or None."""
    value = _padding_value(ds, "PixelPaddingValue")
    if value is None or pixels.dtype.kind not in "iu":
        return None
    limit = _padding_value(ds, "PixelPaddingRangeLimit")
    info = np.iinfo(pixels.dtype)
    low, high = (value, value) if limit is None else sorted((value, limit))
    low, high = _as_stored(low, pixels.dtype), _as_stored(high, pixels.dtype)
    if low > high:  # the range wrapped when converted: treat it as two-sided
        low, high = info.min, info.max
    if low == high:
        return pixels == low
    return (pixels >= low) & (pixels <= high)


def _padding_value(ds: Dataset, keyword: str) -> int | None:
    if keyword not in ds:
        return None
    value = ds[keyword].value
    if isinstance(value, bytes):  # "US or SS" left undecided by the reader
        if len(value) < 2:
            return None
        signed = int(ds.get("PixelRepresentation", 0)) == 1
        return struct.unpack("<h" if signed else "<H", value[:2])[0]
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        value = value[0] if len(value) else None
    return None if value is None else int(value)


def _as_stored(value: int, dtype: np.dtype) -> int:
    """The padding value as the decoded array holds it (US vs SS mix-ups wrap)."""
    info = np.iinfo(dtype)
    if info.min <= value <= info.max:
        return value
    bits = dtype.itemsize * 8
    wrapped = value % (1 << bits)
    return wrapped - (1 << bits) if info.min < 0 and wrapped > info.max else wrapped


def _to_hu(pixels: np.ndarray, padding: np.ndarray | None, slope: float, intercept: float,
           dtype: np.dtype) -> np.ndarray:
    values: np.ndarray
    if dtype == np.int16:
        values = pixels.astype(np.int32)
        if slope != 1:
            values *= int(slope)
        values += int(intercept)
    else:
        values = pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    np.clip(values, HU_FLOOR, HU_CEILING, out=values)
    if padding is not None:
        values[padding] = HU_FLOOR
    return values


def _optional_float(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


def _integral(value: float) -> bool:
    return float(value).is_integer()


def _multi(value) -> list:
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        return [value]
    return list(value)


def _text(datasets: Iterable[Dataset | None], keyword: str) -> str | None:
    for ds in datasets:
        if ds is not None and keyword in ds:
            return str(ds.get(keyword))
    return None


def _cosines(values: np.ndarray) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in values) + "]"


# -- folders ------------------------------------------------------------------------------


def read_series_headers(folder: str | Path) -> dict[str, list[Dataset]]:
    """Headers (no pixels) of every DICOM file under ``folder``, by SeriesInstanceUID.

    Non-DICOM files and DICOM files without a SeriesInstanceUID (DICOMDIR) are skipped
    silently. Each header's ``filename`` is its path. Lists are sorted by path.
    """
    root = Path(folder)
    if not root.is_dir():
        raise InvalidInput(f"folder {root} is not a directory")
    by_series: dict[str, list[Dataset]] = {}
    for directory, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(directory) / name
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except InvalidDicomError:
                continue  # not DICOM: skipped silently
            except Exception:  # a damaged DICOM file: load_series will name it if used
                continue
            uid = ds.get("SeriesInstanceUID")
            if uid:
                by_series.setdefault(str(uid), []).append(ds)
    return dict(sorted(by_series.items()))


def group_series(folder: Path) -> dict[str, list[Path]]:
    """DICOM files under ``folder`` grouped by SeriesInstanceUID (headers only)."""
    return {
        uid: [Path(ds.filename) for ds in headers]
        for uid, headers in read_series_headers(folder).items()
    }


# -- NIfTI ----------------------------------------------------------------------------------


def nifti_array_zrc(path_or_image) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The array of a NIfTI image as (z, row, col) in the volume convention, and its spacing.

    z ascending towards superior, rows towards posterior, columns towards the patient's
    left (as an axial DICOM slice is displayed), whatever the file's axis order. Values
    as stored (scaled by scl_slope/scl_inter when the header sets them). Use this for
    masks too, so they line up with :func:`load_nifti`.
    """
    import nibabel as nib  # imported here: only NIfTI users pay for it
    from nibabel.spatialimages import SpatialHeader, SpatialImage

    image = nib.load(str(path_or_image)) if isinstance(path_or_image, (str, Path)) else path_or_image
    if not isinstance(image, SpatialImage):
        raise InvalidInput(f"not a NIfTI image: {type(image).__name__}")
    if len(image.shape) != 3:
        raise InvalidInput(f"NIfTI image must be 3-D, got shape {image.shape}")
    codes = nib.aff2axcodes(image.affine)
    # cast: nibabel types .header as the base FileBasedHeader; a SpatialImage's is a SpatialHeader
    header = cast(SpatialHeader, image.header)
    zooms = [float(z) for z in header.get_zooms()[:3]]
    wanted = (("S", "I"), ("P", "A"), ("L", "R"))  # (towards, opposite) for z, row, col
    axes, flips = [], []
    for towards, opposite in wanted:
        matches = [i for i, code in enumerate(codes) if code in (towards, opposite)]
        if len(matches) != 1:
            raise InvalidInput(f"NIfTI orientation {''.join(codes)} has no single {towards}/{opposite} axis")
        axes.append(matches[0])
        flips.append(codes[matches[0]] == opposite)
    data = np.asanyarray(image.dataobj).transpose(axes)
    flip_slices = tuple(slice(None, None, -1) if flip else slice(None) for flip in flips)
    spacing = (abs(zooms[axes[0]]), abs(zooms[axes[1]]), abs(zooms[axes[2]]))
    return np.ascontiguousarray(data[flip_slices]), spacing


def load_nifti(path: str | Path) -> Volume:
    """A MosMedData-style ``study_XXXX.nii.gz`` as a volume (values are HU as stored,
    floored at -1024); columns always run towards the patient's left."""
    path = Path(path)
    try:
        data, spacing = nifti_array_zrc(path)
    except InvalidInput:
        raise
    except Exception as exc:  # nibabel raises several kinds for a bad file
        raise InvalidInput(f"{path}: not a readable NIfTI file ({exc})") from exc
    if np.issubdtype(data.dtype, np.integer):
        hu = np.clip(data, HU_FLOOR, HU_CEILING).astype(np.int16)
    else:
        hu = np.maximum(data, HU_FLOOR).astype(np.float32)
        if np.all(np.mod(hu, 1) == 0) and hu.max(initial=0) <= HU_CEILING:
            hu = hu.astype(np.int16)
    return Volume(hu=hu, spacing_mm=spacing, column_towards_patient_left=True, source=str(path))
