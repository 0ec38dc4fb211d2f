"""Which series of a study to score: declarative rules, as MONAI Deploy's series selector.

A series is eligible when it is a CT image (single- or multi-frame), axial, ORIGINAL and
PRIMARY, not a localizer, and has enough slices. Among eligible series the best is the
one with a lung kernel, then the thinnest slices, then the most slices; ties go to the
lowest Series Instance UID so the choice never depends on arrival order. Works on
headers only (``stop_before_pixels``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID

from ct_triage.contract import CT_IMAGE_SOP_CLASSES, CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE
from ct_triage.settings import DEFAULT_LUNG_KERNELS
from worker.scoring.load import AXIAL_MIN_NORMAL_Z, slice_normal

__all__ = ["CT_IMAGE_STORAGE", "ENHANCED_CT_IMAGE_STORAGE", "SelectionRules", "select_series"]



@dataclass(frozen=True)
class SelectionRules:
    modality: str = "CT"
    sop_class_uids: tuple[str, ...] = CT_IMAGE_SOP_CLASSES
    required_image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY")
    excluded_image_type: tuple[str, ...] = ("LOCALIZER",)
    require_axial: bool = True
    min_slices: int = 20
    # preferred, matched case-insensitively and exactly against any ConvolutionKernel value
    lung_kernels: tuple[str, ...] = tuple(DEFAULT_LUNG_KERNELS)

    @classmethod
    def from_settings(cls, settings) -> SelectionRules:
        return cls(min_slices=int(settings.min_slices), lung_kernels=tuple(settings.lung_kernels))

    def is_lung_kernel(self, kernels: Sequence[str]) -> bool:
        wanted = {k.strip().upper() for k in self.lung_kernels}
        return any(k.strip().upper() in wanted for k in kernels)


@dataclass
class Selection:
    series_instance_uid: str | None
    reason: str  # why this series, or why none
    rejected: dict[str, str] = field(default_factory=dict)  # every other series: why not


@dataclass
class _Candidate:
    """What ranking needs to know of one series."""

    uid: str
    slices: int
    kernels: list[str]
    lung_kernel: bool
    thickness_mm: float | None
    label: str  # for messages: series number, description, kernel

    def rank_key(self) -> tuple:
        thickness = self.thickness_mm if self.thickness_mm is not None else math.inf
        return (not self.lung_kernel, thickness, -self.slices, self.uid)

    def summary(self) -> str:
        kernel = "/".join(self.kernels) or "no kernel"
        kind = "lung kernel" if self.lung_kernel else "not a lung kernel"
        thickness = "unknown thickness" if self.thickness_mm is None else f"{self.thickness_mm:g} mm"
        return f"{self.label}: {kernel} ({kind}), {thickness}, {self.slices} slices"


def select_series(headers_by_series: Mapping[str, Sequence[Dataset]],
                  rules: SelectionRules | None = None) -> Selection:
    """The series to score among ``headers_by_series`` (SeriesInstanceUID -> headers)."""
    rules = rules or SelectionRules()
    if not headers_by_series:
        return Selection(None, "no series in the study")
    rejected: dict[str, str] = {}
    candidates: list[_Candidate] = []
    for uid, headers in sorted(headers_by_series.items()):
        problem = _ineligible(headers, rules)
        if problem:
            rejected[uid] = problem
        else:
            candidates.append(_candidate(uid, headers, rules))
    if not candidates:
        listed = "; ".join(f"{uid}: {why}" for uid, why in rejected.items())
        return Selection(None, f"no eligible series ({listed})", rejected)
    candidates.sort(key=_Candidate.rank_key)
    best = candidates[0]
    for other in candidates[1:]:
        rejected[other.uid] = f"eligible but ranked below {best.uid}: {_why_below(other, best)}"
    others = f"; preferred over {len(candidates) - 1} other eligible series" if len(candidates) > 1 else ""
    return Selection(best.uid, f"selected {best.summary()}{others}", rejected)


# -- eligibility ----------------------------------------------------------------------------


def _ineligible(headers: Sequence[Dataset], rules: SelectionRules) -> str | None:
    """Why the series cannot be scored, or None."""
    if not headers:
        return "no instances"
    first = headers[0]
    sop_classes = {str(ds.get("SOPClassUID", "")) for ds in headers}
    bad_classes = sorted(sop_classes - set(rules.sop_class_uids))
    if bad_classes:
        return f"SOP class {_uid_name(bad_classes[0])} is not a CT image"
    modality = str(first.get("Modality", ""))
    if modality != rules.modality:
        return f"modality {modality or '(none)'}, not {rules.modality}"
    for ds in headers:
        image_type = {str(v).strip().upper() for v in _values(ds.get("ImageType"))}
        frame_type = _functional(ds, "CTImageFrameTypeSequence", "FrameType")
        image_type |= {str(v).strip().upper() for v in _values(frame_type)}
        missing = [t for t in rules.required_image_type if t not in image_type]
        if missing:
            return f"ImageType {'/'.join(_values(ds.get('ImageType'))) or '(none)'} lacks {' and '.join(missing)}"
        excluded = [t for t in rules.excluded_image_type if t in image_type]
        if excluded:
            return f"{excluded[0].lower()} image(s) (ImageType contains {excluded[0]})"
    if rules.require_axial:
        problem = _not_axial(headers)
        if problem:
            return problem
    slices = _slice_count(headers)
    if slices < rules.min_slices:
        return f"too few slices: {slices} (at least {rules.min_slices} needed)"
    return None


def _not_axial(headers: Sequence[Dataset]) -> str | None:
    for ds in headers:
        orientation = _orientation(ds)
        if orientation is None:
            return "no ImageOrientationPatient"
        try:
            normal = slice_normal(orientation)
        except ValueError as exc:
            return f"unusable ImageOrientationPatient ({exc})"
        if abs(normal[2]) < AXIAL_MIN_NORMAL_Z:
            return "not axial (slice normal " + ", ".join(f"{v:.2f}" for v in normal) + ")"
    return None


# -- ranking facts --------------------------------------------------------------------------


def _candidate(uid: str, headers: Sequence[Dataset], rules: SelectionRules) -> _Candidate:
    first = headers[0]
    kernels = [str(v).strip() for v in _values(first.get("ConvolutionKernel"))]
    if not kernels:
        kernels = [str(v).strip() for v in _values(_functional(first, "CTReconstructionSequence", "ConvolutionKernel"))]
    number = first.get("SeriesNumber")
    description = str(first.get("SeriesDescription", "")).strip()
    label = " ".join(p for p in (f"series {number}" if number is not None else "series", description) if p)
    return _Candidate(
        uid=uid,
        slices=_slice_count(headers),
        kernels=[k for k in kernels if k],
        lung_kernel=rules.is_lung_kernel(kernels),
        thickness_mm=_thickness(headers),
        label=label,
    )


def _why_below(other: _Candidate, best: _Candidate) -> str:
    if best.lung_kernel and not other.lung_kernel:
        return f"not a lung kernel ({'/'.join(other.kernels) or 'none'})"
    if best.rank_key()[1] < other.rank_key()[1]:
        return f"thicker slices ({_mm(other.thickness_mm)} vs {_mm(best.thickness_mm)})"
    if best.slices > other.slices:
        return f"fewer slices ({other.slices} vs {best.slices})"
    return "same kernel class, thickness and slice count: tie broken by Series Instance UID"


def _slice_count(headers: Sequence[Dataset]) -> int:
    return sum(int(ds.get("NumberOfFrames", 1) or 1) for ds in headers)


def _thickness(headers: Sequence[Dataset]) -> float | None:
    """SliceThickness when the header has it, else the step between positions."""
    first = headers[0]
    for value in (first.get("SliceThickness"), _functional(first, "PixelMeasuresSequence", "SliceThickness")):
        try:
            if value is not None and float(value) > 0:
                return float(value)
        except (TypeError, ValueError):
            pass
    return _spacing_from_positions(headers)


def _spacing_from_positions(headers: Sequence[Dataset]) -> float | None:
    orientation = _orientation(headers[0])
    positions = [ds.get("ImagePositionPatient") for ds in headers]
    if orientation is None or len(positions) < 2 or any(p is None or len(p) != 3 for p in positions):
        return None
    try:
        normal = slice_normal(orientation)
    except ValueError:
        return None
    along = np.sort([np.dot([float(v) for v in p], normal) for p in positions])
    steps = np.diff(along)
    steps = steps[steps > 1e-3]
    return float(np.median(steps)) if steps.size else None


# -- header access ----------------------------------------------------------------------------


def _orientation(ds: Dataset):
    value = ds.get("ImageOrientationPatient")
    if value is None:
        value = _functional(ds, "PlaneOrientationSequence", "ImageOrientationPatient")
    return None if value is None or len(value) != 6 else value


def _functional(ds: Dataset, sequence: str, keyword: str):
    """``keyword`` from a functional group of a multi-frame header (shared, else first frame)."""
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        if groups in ds and len(ds[groups].value):
            group = ds[groups].value[0]
            if sequence in group and len(group[sequence].value):
                value = group[sequence].value[0].get(keyword)
                if value is not None:
                    return value
    return None


def _values(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        return [str(value)]
    return [str(v) for v in value]


def _uid_name(uid: str) -> str:
    name = UID(uid).name if uid else ""
    return f"{name} ({uid})" if name and name != uid else (uid or "(none)")


def _mm(value: float | None) -> str:
    return "unknown" if value is None else f"{value:g} mm"
