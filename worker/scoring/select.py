"""Which series of a study to score: declarative rules, as MONAI Deploy's series selector.

A series is eligible when it is a CT image (single- or multi-frame), axial, ORIGINAL
(acquired pixels: PRIMARY, or SECONDARY for an axial reconstruction made afterwards on the
scanner console, as public collections and real consoles send), and has enough slices.
Refused, each with its reason: DERIVED images (reformats, MPR, MIP, MinIP, subtractions),
any image whose ImageType names a localizer, a reformat, a projection, a screen save or
a dose report (``excluded_image_type``), non-CT SOP classes (secondary captures, dose
SRs), other modalities, non-axial orientations and too few slices.

Among eligible series the best is a PRIMARY one over a SECONDARY one, then the one with a
lung kernel, then the thinnest slices, then the most slices; ties go to the lowest Series
Instance UID so the choice never depends on arrival order. When none is eligible the
reason lists every series (number, description, UID) with why it was passed over. Works
on headers only (``stop_before_pixels``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID

from ct_triage.contract import CT_IMAGE_SOP_CLASSES, CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE
from ct_triage.settings import DEFAULT_LUNG_KERNELS
from ct_triage.text import clean
from worker.scoring.load import AXIAL_MIN_NORMAL_Z, slice_normal

__all__ = ["CT_IMAGE_STORAGE", "ENHANCED_CT_IMAGE_STORAGE", "SelectionRules", "not_selected_reason",
           "select_series"]



@dataclass(frozen=True)
class SelectionRules:
    modality: str = "CT"
    sop_class_uids: tuple[str, ...] = CT_IMAGE_SOP_CLASSES
    required_image_type: tuple[str, ...] = ("ORIGINAL",)
    # one of these must be present too; the earlier ones rank first
    accepted_image_kind: tuple[str, ...] = ("PRIMARY", "SECONDARY")
    excluded_image_type: tuple[str, ...] = (
        "LOCALIZER", "DERIVED", "REFORMATTED", "MPR", "MIP", "MINIP", "MINIMUM", "MAXIMUM",
        "PROJECTION IMAGE", "SCREEN SAVE", "SCREENSHOT", "DOSE INFO", "DOSE_INFO",
        "DOSE REPORT", "DOSE_REPORT",
    )
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
    kind: str = "PRIMARY"  # the accepted ImageType value it carries
    kind_rank: int = 0

    def rank_key(self) -> tuple:
        thickness = self.thickness_mm if self.thickness_mm is not None else math.inf
        return (self.kind_rank, not self.lung_kernel, thickness, -self.slices, self.uid)

    def summary(self) -> str:
        kernel = "/".join(self.kernels) or "no kernel"
        kind = "lung kernel" if self.lung_kernel else "not a lung kernel"
        thickness = "unknown thickness" if self.thickness_mm is None else f"{self.thickness_mm:g} mm"
        return f"{self.label}: ORIGINAL/{self.kind}, {kernel} ({kind}), {thickness}, {self.slices} slices"


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
        listed = "; ".join(f"{_series_label(headers_by_series[uid])} {uid}: {why}"
                           for uid, why in rejected.items())
        return Selection(None, f"no eligible series ({listed})", rejected)
    candidates.sort(key=_Candidate.rank_key)
    best = candidates[0]
    for other in candidates[1:]:
        rejected[other.uid] = f"eligible but ranked below {best.uid}: {_why_below(other, best)}"
    others = f"; preferred over {len(candidates) - 1} other eligible series" if len(candidates) > 1 else ""
    return Selection(best.uid, f"selected {best.summary()}{others}", rejected)


def not_selected_reason(skipped, chosen, lung_kernels: Sequence[str] | None = None) -> str:
    """Why ``skipped`` was passed over for ``chosen`` (two series of one study), in words.

    Both are index rows (:class:`db.models.Series`: ``series_number``,
    ``series_description``, ``convolution_kernel``, ``slice_thickness``,
    ``instance_count``); the words follow the ranking of :func:`select_series` as far as
    the index knows the facts, e.g. ``not selected: kernel B is not a lung kernel; series 2
    (lung kernel L, 1 mm) scored``. Text from the headers is cleaned. Starts with
    ``not selected`` (what ``ct-triage status`` and the page show as the state).
    """
    rules = SelectionRules(lung_kernels=tuple(lung_kernels)) if lung_kernels is not None else SelectionRules()
    skipped_kernels, chosen_kernels = _row_kernels(skipped), _row_kernels(chosen)
    skipped_lung, chosen_lung = rules.is_lung_kernel(skipped_kernels), rules.is_lung_kernel(chosen_kernels)
    thin, thick = chosen.slice_thickness, skipped.slice_thickness
    if chosen_lung and not skipped_lung:
        why = (f"kernel {clean('/'.join(skipped_kernels), 32)} is not a lung kernel" if skipped_kernels
               else "no convolution kernel (not a lung kernel)")
    elif skipped_lung == chosen_lung and thin is not None and thick is not None and thin < thick:
        why = f"thicker slices ({thick:g} mm vs {thin:g} mm)"
    elif skipped_lung == chosen_lung and (chosen.instance_count or 0) > (skipped.instance_count or 0):
        why = f"fewer slices ({skipped.instance_count} vs {chosen.instance_count})"
    else:
        why = "ranked lower or not eligible (image type, orientation or slice count)"
    return f"not selected: {why}; {_row_label(chosen, rules)} scored"


def _row_kernels(row) -> list[str]:
    return [k.strip() for k in str(row.convolution_kernel or "").split("\\") if k.strip()]


def _row_label(row, rules: SelectionRules) -> str:
    """``series 2 "LUNG 1.0" (lung kernel L, 1 mm)`` of an index row, cleaned."""
    label = "series" if row.series_number is None else f"series {row.series_number}"
    if row.series_description:
        label += f' "{clean(row.series_description, 64)}"'
    kernels = _row_kernels(row)
    facts = []
    if kernels:
        kind = "lung kernel" if rules.is_lung_kernel(kernels) else "kernel"
        facts.append(f"{kind} {clean('/'.join(kernels), 32)}")
    if row.slice_thickness is not None:
        facts.append(f"{row.slice_thickness:g} mm")
    return f"{label} ({', '.join(facts)})" if facts else label


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
        shown = '/'.join(_values(ds.get('ImageType'))) or '(none)'
        excluded = [t for t in rules.excluded_image_type if t in image_type]
        if excluded:
            return f"{_EXCLUDED_WHAT.get(excluded[0], excluded[0].lower() + ' image(s)')} (ImageType {shown})"
        missing = [t for t in rules.required_image_type if t not in image_type]
        if missing:
            return f"ImageType {shown} lacks {' and '.join(missing)}"
        if rules.accepted_image_kind and not image_type & set(rules.accepted_image_kind):
            return f"ImageType {shown} lacks {' or '.join(rules.accepted_image_kind)}"
    if rules.require_axial:
        problem = _not_axial(headers)
        if problem:
            return problem
    slices = _slice_count(headers)
    if slices < rules.min_slices:
        return f"too few slices: {slices} (at least {rules.min_slices} needed)"
    return None


_EXCLUDED_WHAT = {
    "LOCALIZER": "localizer image(s)",
    "DERIVED": "derived image(s) (a reformat, projection or other post-processing)",
    "REFORMATTED": "reformatted image(s)",
    "MPR": "multiplanar reformat",
    "MIP": "maximum intensity projection",
    "MAXIMUM": "maximum intensity projection",
    "MINIP": "minimum intensity projection",
    "MINIMUM": "minimum intensity projection",
    "PROJECTION IMAGE": "projection image(s)",
    "SCREEN SAVE": "screen capture",
    "SCREENSHOT": "screen capture",
    "DOSE INFO": "dose report",
    "DOSE_INFO": "dose report",
    "DOSE REPORT": "dose report",
    "DOSE_REPORT": "dose report",
}


def _image_kind(headers: Sequence[Dataset], rules: SelectionRules) -> tuple[str, int]:
    """The best-ranked accepted ImageType value the series carries, and its rank."""
    ranks = []
    for ds in headers:
        image_type = {str(v).strip().upper() for v in _values(ds.get("ImageType"))}
        frame_type = _functional(ds, "CTImageFrameTypeSequence", "FrameType")
        image_type |= {str(v).strip().upper() for v in _values(frame_type)}
        ranks.append(min((i for i, k in enumerate(rules.accepted_image_kind) if k in image_type), default=0))
    rank = max(ranks) if ranks else 0  # a series is as good as its worst instance
    kind = rules.accepted_image_kind[rank] if rules.accepted_image_kind else ""
    return kind, rank


def _series_label(headers: Sequence[Dataset]) -> str:
    """``series N "description"`` of a series for messages (description cleaned, 64 chars)."""
    if not headers:
        return "series"
    first = headers[0]
    number = first.get("SeriesNumber")
    description = "".join(c if c.isprintable() else " " for c in str(first.get("SeriesDescription", "")))
    description = " ".join(description.split())[:64]
    parts = [f"series {number}" if number is not None else "series"]
    if description:
        parts.append(f'"{description}"')
    return " ".join(parts)


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
    label = _series_label(headers)
    kind, kind_rank = _image_kind(headers, rules)
    return _Candidate(
        uid=uid,
        slices=_slice_count(headers),
        kernels=[k for k in kernels if k],
        lung_kernel=rules.is_lung_kernel(kernels),
        thickness_mm=_thickness(headers),
        label=label,
        kind=kind,
        kind_rank=kind_rank,
    )


def _why_below(other: _Candidate, best: _Candidate) -> str:
    if best.kind_rank < other.kind_rank:
        return f"ORIGINAL/{other.kind} ranks after ORIGINAL/{best.kind}"
    if best.lung_kernel and not other.lung_kernel:
        return f"not a lung kernel ({'/'.join(other.kernels) or 'none'})"
    if best.rank_key()[2] < other.rank_key()[2]:
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
