"""Secondary Capture series with the burned-in pictures (design.md, "Outputs written back").

One RGB 8-bit Secondary Capture Image (1.2.840.10008.5.1.4.1.1.7) per source slice that
has lesion boxes, plus one summary image (coronal overview + text panel). Built with
highdicom's :class:`highdicom.sc.SCImage` from the source instance, then completed:

- Patient, Clinical Trial Subject, General Study, Patient Study and Clinical Trial Study
  attributes copied from the source (highdicom ``copy_patient_and_study_information``).
- New series: SeriesInstanceUID/SOPInstanceUIDs from :func:`worker.outputs.uids.output_uid`
  (source series UID, result version, role, index), SeriesNumber ``9000 + version`` by
  default, SeriesDescription starting "AI COVID-19 triage".
- Modality ``OT``: the SC IOD allows any modality, but these are not CT acquisitions, and
  "CT" makes viewers apply CT hanging protocols/window presets and makes CT-only
  queries (and our own series selection, which wants CT ORIGINAL\\PRIMARY) pick them up.
  ``OT`` is what highdicom writes for SC and what PACS show as a separate
  "other" series next to the CT.
- ImageType ``DERIVED\\SECONDARY``; ConversionType ``WSD`` (workstation);
  BurnedInAnnotation ``YES``; DerivationDescription; SourceImageSequence to the source
  slice(s) with purpose (121322, DCM, "Source image for image processing operation").
- ContributingEquipmentSequence: the scanner (acquisition equipment, from the source),
  ct-triage (109102, DCM, "Processing Equipment", SoftwareVersions = ct-triage version
  and model version) and highdicom (the library).
- Every date/time we write comes from ``created_at`` (see
  :func:`worker.outputs.base.resolve_created_at`),
  never from the clock, so a retry of the same result version is byte-identical.
- Transfer syntax Explicit VR Little Endian, uncompressed.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from ct_triage import __version__
from worker.outputs import render
from worker.outputs.base import (
    MANUFACTURER,
    contributing_equipment,
    freeze_times,
    plain_text,
    resolve_created_at,
    series_description,
    validate_inputs,
)
from worker.outputs.uids import output_uid
from worker.scoring.result import ScoreResult

SC_SERIES_NUMBER_BASE = 9000
SOURCE_IMAGE_PURPOSE = hd.sr.CodedConcept("121322", "DCM", "Source image for image processing operation")


def patient_orientation(ds: Dataset) -> tuple[str, str]:
    """PatientOrientation letters (row direction, column direction) from ImageOrientationPatient."""
    try:
        iop = [float(v) for v in ds.ImageOrientationPatient]
    except (AttributeError, TypeError, ValueError):
        return ("L", "P")  # axial, the usual supine orientation
    return (_direction_letters(iop[:3]), _direction_letters(iop[3:]))


def _direction_letters(vector: Sequence[float]) -> str:
    letters = (("L", "R"), ("P", "A"), ("H", "F"))
    parts = []
    for axis in np.argsort(-np.abs(np.asarray(vector)))[:3]:
        value = vector[axis]
        if abs(value) < 1e-3:
            continue
        # DICOM patient axes: +x = left, +y = posterior, +z = head
        parts.append(letters[axis][0] if value > 0 else letters[axis][1])
    return "".join(parts[:1]) if parts else "L"


def _source_item(ds: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    item.PurposeOfReferenceCodeSequence = [SOURCE_IMAGE_PURPOSE]
    return item


def _build_sc(
    *,
    ref: Dataset,
    pixels: np.ndarray,
    sources: Sequence[Dataset],
    result: ScoreResult,
    series_uid: str,
    series_number: int,
    sop_uid: str,
    instance_number: int,
    orientation: tuple[str, str],
    pixel_spacing: tuple[float, float] | None,
    derivation: str,
    comments: str,
    created_at: dt.datetime,
    result_version: int,
) -> Dataset:
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ref,
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        pixel_spacing=pixel_spacing,
        patient_orientation=orientation,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[contributing_equipment(result, created_at, derivation)],
        series_description=series_description("images", result_version),
        manufacturer_model_name=MANUFACTURER,
        software_versions=__version__,
        content_date=created_at.date(),
        content_time=created_at.time(),
        series_date=created_at.date(),
        series_time=created_at.time(),
    )
    sc.copy_patient_and_study_information(ref)
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.ConversionType = "WSD"
    sc.BurnedInAnnotation = "YES"
    sc.DerivationDescription = plain_text(derivation)[:1024]
    sc.SourceImageSequence = [_source_item(ds) for ds in sources]
    sc.ImageComments = plain_text(comments)[:10240]
    # General Series Laterality is 2C on paired body parts; with BodyPartExamined CHEST
    # (unpaired) it is absent. Without a body part we cannot tell: empty = unknown.
    body_part = str(ref.get("BodyPartExamined", "") or "")
    if not body_part and result.status == "scored":
        body_part = "CHEST"  # we only score chest CTs
    if body_part:
        sc.BodyPartExamined = body_part[:16]
    else:
        sc.Laterality = ""
    if any(str(ds.get("LossyImageCompression", "")) == "01" for ds in sources):
        sc.LossyImageCompression = "01"  # once lossy, always flagged lossy (PS3.3 C.7.6.1.1.5)
    freeze_times(sc, created_at)
    return sc


def _pixel_spacing(ds: Dataset) -> tuple[float, float] | None:
    spacing = ds.get("PixelSpacing")
    if spacing and len(spacing) == 2:
        return (float(spacing[0]), float(spacing[1]))
    return None


def result_comment(result: ScoreResult) -> str:
    """One-line result text (ImageComments of the summary, TEXT in the SR)."""
    if result.status == "scored":
        return (
            f"{result.category}, lung involvement {render.format_percent(result.involvement_percent)} "
            f"(right {render.format_percent(result.involvement_percent_right)}, "
            f"left {render.format_percent(result.involvement_percent_left)}), "
            f"priority {result.priority}. {render.NOT_FOR_DIAGNOSTIC_USE}"
        )
    status = "not applicable" if result.status == "not_applicable" else "scoring failed"
    return (f"Not scored ({status}): {result.reason or 'no reason given'}. Priority {result.priority}. "
            f"{render.NOT_FOR_DIAGNOSTIC_USE}")


def build_secondary_capture_series(
    source_datasets: Sequence[Dataset],
    result: ScoreResult,
    result_version: int,
    *,
    series_number: int | None = None,
    created_at: dt.datetime | None = None,
) -> list[Dataset]:
    """Build the SC series for one result version.

    Args:
        source_datasets: the scored series' CT instances with pixel data, in the order of
            ``result.source_sop_instance_uids`` (sorted along the slice normal).
        result: the scoring result; for ``not_applicable``/``failed`` only the summary
            image (stating the status and reason, priority MEDIUM) is built.
        result_version: 1, 2, ... (a new version supersedes the previous outputs).
        series_number: default ``9000 + result_version``.
        created_at: timestamp written as content/creation/series date and time; see
            :func:`worker.outputs.base.resolve_created_at` for the deterministic default.

    Returns:
        ``[summary, slice images...]``: the summary is InstanceNumber 1, the lesion
        slices follow in slice order. Same inputs, same bytes.

    Raises:
        TypeError/ValueError naming the bad argument.
    """
    datasets = validate_inputs(source_datasets, result, result_version)
    if series_number is None:
        series_number = SC_SERIES_NUMBER_BASE + result_version
    if isinstance(series_number, bool) or not isinstance(series_number, int):
        raise TypeError(f"argument 'series_number' must be an int, got {type(series_number).__name__}")
    if not 0 < series_number < 2**31:
        raise ValueError(f"argument 'series_number' must be 1..2147483647, got {series_number}")
    when = resolve_created_at(created_at, datasets)
    source_series = str(datasets[0].SeriesInstanceUID)
    series_uid = output_uid(source_series, result_version, "sc-series")

    out: list[Dataset] = []
    summary = render.render_summary(datasets, result)
    row_letters, _ = patient_orientation(datasets[0])
    out.append(
        _build_sc(
            ref=datasets[0],
            pixels=summary,
            sources=datasets,
            result=result,
            series_uid=series_uid,
            series_number=series_number,
            sop_uid=output_uid(source_series, result_version, "sc-instance", 0),
            instance_number=1,
            orientation=(row_letters, "F"),
            pixel_spacing=None,  # overview + text panel: no single meaningful spacing
            derivation=(
                f"Coronal mean-intensity projection of the source series with AI lesion regions in red and "
                f"a result panel, by {result.model} {result.model_version} (ct-triage {__version__}). "
                f"{render.NOT_FOR_DIAGNOSTIC_USE}"
            ),
            comments=result_comment(result),
            created_at=when,
            result_version=result_version,
        )
    )
    if result.status != "scored":
        return out

    by_slice: dict[int, list] = {}
    for box in result.boxes:
        by_slice.setdefault(box.slice_index, []).append(box)
    for number, slice_index in enumerate(sorted(by_slice), start=2):
        ds = datasets[slice_index]
        boxes = by_slice[slice_index]
        out.append(
            _build_sc(
                ref=ds,
                pixels=render.render_slice(ds, boxes, result),
                sources=[ds],
                result=result,
                series_uid=series_uid,
                series_number=series_number,
                sop_uid=output_uid(source_series, result_version, "sc-instance", slice_index + 1),
                instance_number=number,
                orientation=patient_orientation(ds),
                pixel_spacing=_pixel_spacing(ds),
                derivation=(
                    f"Lung window (WL -600 HU, WW 1500 HU) of source slice {slice_index + 1} with {len(boxes)} AI "
                    f"lesion box(es) burned in, by {result.model} {result.model_version} "
                    f"(ct-triage {__version__}). {render.NOT_FOR_DIAGNOSTIC_USE}"
                ),
                comments=render.caption_text(result),
                created_at=when,
                result_version=result_version,
            )
        )
    return out


__all__ = [
    "build_secondary_capture_series",
    "result_comment",
]
