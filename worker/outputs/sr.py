"""Structured report of a result: Comprehensive 3D SR with a TID 1500 Measurement Report.

Built with highdicom (``hd.sr.Comprehensive3DSR`` + ``MeasurementReport``). Content tree:

- TID 1500 root "Imaging Measurement Report" (126000, DCM); language; observation
  context with a *device* observer (ct-triage, model name); procedure reported
  "CT of chest" (169069000, SCT).
- Imaging Measurements, one TID 1501 group per structure, each with the algorithm
  identification (TID 4019: name = ``result.model``, version = ``result.model_version``):

  - "Lungs" (39607008, SCT): Volume (118565006, SCT) in ``ml`` and lung involvement
    (``CTT001``, 99CTTRIAGE) in ``%``; qualitative evaluations: CT severity category
    (``CTT002`` = ``CT-0``..``CT-4``, 99CTTRIAGE) and worklist priority (``CTT004`` =
    HIGH/MEDIUM/LOW).
  - "Right lung" (3341006, SCT) and "Left lung" (44029006, SCT): volume and involvement.
  - "Lesions" (52988006, SCT, finding site Lung): total lesion volume in ``ml``.
  - One TID 1411 volumetric ROI group per 3-D lesion (26-connected component of the
    lesion mask, as the lesion count is measured) for the ``max_lesions`` largest
    (default 20, ``CT_TRIAGE_SR_MAX_LESIONS``), largest first: its Volume (ml), its
    centre of mass as a SCOORD3D POINT "Center" (111010, DCM) in the source frame of
    reference, finding site right/left lung (the side holding most of it), and a
    reference to the lesion segment of the DICOM SEG (``ReferencedSegment``) instead of
    per-slice outlines; the SEG is listed as evidence. This keeps the report small
    (tens of KB, not one polyline per slice box: about 1,400 on a 300-slice CT-3 study).

- Qualitative Evaluations container (C0034375, UMLS) of TID 1500: triage status
  (``CTT003``) and TEXT items with the routing decision (paper's Table 2), the solid
  masses when the scorer found any (``CTT016``, ``worker.scoring.masses``) or, for
  ``not_applicable``/``failed`` results, the reason. Those results still get a report
  (status, reason, priority MEDIUM) so the PACS shows why there are no numbers.

Private concepts use coding scheme designator ``99CTTRIAGE`` (PS3.16 8.2: "99" prefix =
private), declared in CodingSchemeIdentificationSequence. SR header: VerificationFlag
UNVERIFIED, CompletionFlag COMPLETE, PreliminaryFlag PRELIMINARY, new series
(SeriesNumber ``9100 + version``), deterministic UIDs, all dates from ``created_at``,
ContributingEquipmentSequence naming ct-triage and its version, Explicit VR Little
Endian. CurrentRequestedProcedureEvidenceSequence lists every source instance.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from ct_triage import __version__
from worker.outputs import base
from worker.outputs.sr_concepts import (
    LEFT_LUNG,
    LUNG,
    RIGHT_LUNG,
    SCHEME,
    SCHEME_NAME,
    UNIT_ML,
    UNIT_PERCENT,
    measurement,
    private,
)
from worker.outputs.sr_followup import change_content
from worker.outputs.uids import derived_uid, output_uid
from worker.scoring.masks import LesionComponent, ResultMasks
from worker.scoring.result import ROUTING, ScoreResult

SR_SERIES_NUMBER_BASE = 9100
DEFAULT_MAX_LESIONS = 20
# -- concepts ---------------------------------------------------------------------------
LUNG_INVOLVEMENT = private("CTT001", "Lung volume involved by COVID-19 lesions")
CT_CATEGORY = private("CTT002", "COVID-19 CT severity category")
TRIAGE_STATUS = private("CTT003", "AI triage status")
WORKLIST_PRIORITY = private("CTT004", "Worklist priority")
ROUTING_DECISION = private("CTT005", "Routing decision")
STATUS_REASON = private("CTT006", "Reason not scored")
SOLID_MASSES = private("CTT016", "Solid masses")
CATEGORY_VALUES = {
    "CT-0": private("CT-0", "CT-0 not consistent with pneumonia"),
    "CT-1": private("CT-1", "CT-1 mild, up to 25% involved"),
    "CT-2": private("CT-2", "CT-2 moderate, 25-50% involved"),
    "CT-3": private("CT-3", "CT-3 severe, 50-75% involved"),
    "CT-4": private("CT-4", "CT-4 critical, 75% or more involved"),
}
STATUS_VALUES = {
    "scored": private("SCORED", "Scored"),
    "not_applicable": private("NOT-APPLICABLE", "Not applicable"),
    "failed": private("FAILED", "Scoring failed"),
}
PRIORITY_VALUES = {
    "HIGH": private("HIGH", "High priority"),
    "MEDIUM": private("MEDIUM", "Medium priority"),
    "LOW": private("LOW", "Low priority"),
}
CT_OF_CHEST = hd.sr.CodedConcept("169069000", "SCT", "CT of chest")
LESION = hd.sr.CodedConcept("52988006", "SCT", "Lesion")
VOLUME = hd.sr.CodedConcept("118565006", "SCT", "Volume")
CENTER = hd.sr.CodedConcept("111010", "DCM", "Center")
QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")


def coding_scheme_item() -> CodingSchemeIdentificationItem:
    return CodingSchemeIdentificationItem(
        designator=SCHEME,
        name=SCHEME_NAME,
        version="1",
        responsible_organization="ct-triage",
    )


def _text(name: hd.sr.CodedConcept, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(
        name=name, value=base.plain_text(value)[:10240], relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )


def _category(result: ScoreResult) -> str:
    """The category of a scored result (base.validate_inputs refuses a scored result without one)."""
    assert result.category is not None, "a scored result has a category"
    return result.category


def _code(name: hd.sr.CodedConcept, value: hd.sr.CodedConcept) -> hd.sr.CodeContentItem:
    return hd.sr.CodeContentItem(name=name, value=value, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)


def _tracking(source_series: str, version: int, label: str, index: int = 0) -> hd.sr.TrackingIdentifier:
    return hd.sr.TrackingIdentifier(
        uid=output_uid(source_series, version, f"sr-tracking-{label}", index),
        identifier=label if not index else f"{label} {index}",
    )


def patient_point(datasets: Sequence[Dataset], index: tuple[float, float, float]) -> np.ndarray:
    """Patient coordinates (mm) of a continuous (slice, row, col) index of the source grid.

    The slice position is interpolated between the two nearest slices' Image Position
    (Patient); rows and columns follow Image Orientation (Patient) and Pixel Spacing.
    """
    z, row, col = index
    k0 = int(np.clip(np.floor(z), 0, len(datasets) - 1))
    k1 = min(k0 + 1, len(datasets) - 1)
    w = float(np.clip(z - k0, 0.0, 1.0)) if k1 != k0 else 0.0
    p0 = np.array([float(v) for v in datasets[k0].ImagePositionPatient])
    p1 = np.array([float(v) for v in datasets[k1].ImagePositionPatient])
    origin = (1.0 - w) * p0 + w * p1
    iop = [float(v) for v in datasets[k0].ImageOrientationPatient]
    row_spacing, col_spacing = (float(v) for v in datasets[k0].PixelSpacing)
    return origin + np.array(iop[:3]) * col * col_spacing + np.array(iop[3:]) * row * row_spacing


def _lesion_group(datasets: Sequence[Dataset], result: ScoreResult, version: int, component: LesionComponent,
                  seg_ref: tuple[Dataset, dict[str, int]] | None, algorithm) -> object:
    """TID 1411 group of one 3-D lesion: volume, centre (SCOORD3D POINT), SEG segment."""
    source_series = str(datasets[0].SeriesInstanceUID)
    sites = {"right": [hd.sr.FindingSite(RIGHT_LUNG)], "left": [hd.sr.FindingSite(LEFT_LUNG)]}.get(
        component.side, [hd.sr.FindingSite(LUNG)])
    reference = None
    if seg_ref is not None:
        seg, numbers = seg_ref
        number = numbers.get(component.kind or "lesion") or numbers.get("lesion")
        if number is not None:
            reference = hd.sr.ReferencedSegment(
                sop_class_uid=str(seg.SOPClassUID), sop_instance_uid=str(seg.SOPInstanceUID), segment_number=number,
                source_series=hd.sr.SourceSeriesForSegmentation(source_series),
            )
    group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(source_series, version, "Lesion", component.rank),
        referenced_segment=reference,
        finding_type=LESION,
        finding_sites=sites,
        algorithm_id=algorithm,
        measurements=measurement(VOLUME, None if component.volume_ml is None else round(component.volume_ml, 2),
                                  UNIT_ML),
    )
    center = patient_point(datasets, component.center)
    group[0].ContentSequence.append(hd.sr.Scoord3DContentItem(
        name=CENTER,
        graphic_type=hd.sr.GraphicTypeValues3D.POINT,
        graphic_data=np.round(center.astype(np.float64), 2).reshape(1, 3),
        frame_of_reference_uid=str(datasets[0].FrameOfReferenceUID),
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    ))
    return group


def _measurement_groups(datasets: Sequence[Dataset], result: ScoreResult, version: int,
                        components: Sequence[LesionComponent] = (),
                        seg_ref: tuple[Dataset, dict[str, int]] | None = None) -> list:
    source_series = str(datasets[0].SeriesInstanceUID)
    algorithm = hd.sr.AlgorithmIdentification(
        name=base.plain_text(result.model)[:64], version=base.plain_text(result.model_version)[:64]
    )
    priority = [hd.sr.QualitativeEvaluation(WORKLIST_PRIORITY, PRIORITY_VALUES[result.priority])]
    if result.status != "scored":
        return [
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=_tracking(source_series, version, "Triage result"),
                algorithm_id=algorithm,
                qualitative_evaluations=[
                    hd.sr.QualitativeEvaluation(TRIAGE_STATUS, STATUS_VALUES[result.status]),
                    *priority,
                ],
            )
        ]
    groups: list = [
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=_tracking(source_series, version, "Lungs"),
            finding_type=LUNG,
            algorithm_id=algorithm,
            measurements=[
                *measurement(VOLUME, result.lung_volume_ml, UNIT_ML),
                *measurement(LUNG_INVOLVEMENT, result.involvement_percent, UNIT_PERCENT),
            ],
            qualitative_evaluations=[
                hd.sr.QualitativeEvaluation(CT_CATEGORY, CATEGORY_VALUES[_category(result)]),
                *priority,
            ],
        )
    ]
    for label, site, volume, percent in (
        ("Right lung", RIGHT_LUNG, result.lung_volume_right_ml, result.involvement_percent_right),
        ("Left lung", LEFT_LUNG, result.lung_volume_left_ml, result.involvement_percent_left),
    ):
        measurements = [
            *measurement(VOLUME, volume, UNIT_ML),
            *measurement(LUNG_INVOLVEMENT, percent, UNIT_PERCENT),
        ]
        if measurements:
            groups.append(
                hd.sr.MeasurementsAndQualitativeEvaluations(
                    tracking_identifier=_tracking(source_series, version, label),
                    finding_type=site,
                    algorithm_id=algorithm,
                    measurements=measurements,
                )
            )
    if result.lesion_volume_ml is not None:
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=_tracking(source_series, version, "Lesions"),
                finding_type=LESION,
                finding_sites=[hd.sr.FindingSite(LUNG)],
                algorithm_id=algorithm,
                measurements=measurement(VOLUME, result.lesion_volume_ml, UNIT_ML),
            )
        )
    for component in components:
        groups.append(_lesion_group(datasets, result, version, component, seg_ref, algorithm))
    return groups


def _qualitative_container(result: ScoreResult) -> hd.sr.ContainerContentItem:
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    items: list[hd.sr.ContentItem] = [_code(TRIAGE_STATUS, STATUS_VALUES[result.status])]
    if result.status == "scored":
        items.append(_text(ROUTING_DECISION, f"{result.category}: {ROUTING[_category(result)]} "
                                             "(MosMedData scale, doi:10.17816/DD46826)"))
        if result.mass_count:
            verb = "excluded from" if result.mass_excluded else "counted in"
            items.append(_text(SOLID_MASSES, f"solid mass(es) {verb} the involvement: {result.mass_volume_ml} ml "
                                             f"({result.mass_count}); not COVID-19 pneumonia"))
    else:
        items.append(_text(STATUS_REASON, result.reason or "no reason given"))
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def build_measurement_report(
    source_datasets: Sequence[Dataset],
    result: ScoreResult,
    result_version: int,
    *,
    created_at: dt.datetime | None,
    series_number: int | None = None,
    masks: ResultMasks | None = None,
    segmentation: Dataset | None = None,
    max_lesions: int = DEFAULT_MAX_LESIONS,
) -> Dataset:
    """Build the Comprehensive 3D SR (TID 1500) for one result version.

    Args:
        source_datasets: the scored series' instances (pixel data not needed), in the
            order of ``result.source_sop_instance_uids``.
        result: scored, not_applicable or failed (the latter two give a status report).
        result_version: 1, 2, ...
        created_at: timestamp written as content/creation/series date and time (pass
            the result's own timestamp; ``None`` = deterministic default from the
            sources, see :func:`worker.outputs.base.resolve_created_at`).
        series_number: default ``9100 + result_version``.
        masks: the result's masks; with them, one TID 1411 group per 3-D lesion for the
            ``max_lesions`` largest (volume, centre, reference to the SEG segment).
        segmentation: the SEG built from ``masks`` (:func:`worker.outputs.seg.build_segmentation`):
            referenced by the lesion groups and listed as evidence.
        max_lesions: how many 3-D lesions get a group (0: none).

    Raises:
        TypeError/ValueError naming the bad argument.
    """
    datasets = base.validate_inputs(source_datasets, result, result_version)
    series_number = base.check_series_number(series_number, SR_SERIES_NUMBER_BASE + result_version)
    _check_report_arguments(result, masks, segmentation, max_lesions)
    when = base.resolve_created_at(created_at, datasets)
    source_series = str(datasets[0].SeriesInstanceUID)
    components, seg_ref = _lesions_to_report(datasets, result, masks, segmentation, max_lesions)
    change = change_content(result, source_series, result_version, hd.sr.AlgorithmIdentification(
        name=base.plain_text(result.model)[:64], version=base.plain_text(result.model_version)[:64]))  # issue 12
    report = hd.sr.MeasurementReport(
        observation_context=_device_observation_context(result),
        procedure_reported=CT_OF_CHEST,
        imaging_measurements=_measurement_groups(datasets, result, result_version, components, seg_ref)
        + change.groups,
        title=codes.cid7021.ImagingMeasurementReport,
    )
    report[0].ContentSequence.append(_qualitative_container(result))

    description = (
        f"COVID-19 lung involvement measurements by {result.model} {result.model_version} "
        f"(ct-triage {__version__}); NOT FOR DIAGNOSTIC USE"
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*datasets, *([segmentation] if segmentation is not None else []), *change.evidence],
        content=report[0],
        series_instance_uid=output_uid(source_series, result_version, "sr-series"),
        series_number=series_number,
        sop_instance_uid=output_uid(source_series, result_version, "sr-instance", 0),
        instance_number=1,
        manufacturer=base.MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=base.series_description("report", result_version),
        manufacturer_model_name=base.MANUFACTURER,
        software_versions=__version__,
        content_date=when.date(),
        content_time=when.time(),
        series_date=when.date(),
        series_time=when.time(),
        coding_schemes=[coding_scheme_item()],
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[base.contributing_equipment(result, when, description)],
    )
    base.freeze_times(sr, when)
    return sr


def _check_report_arguments(
    result: ScoreResult, masks: ResultMasks | None, segmentation: Dataset | None, max_lesions: int
) -> None:
    """Raise TypeError/ValueError naming the argument that cannot be reported."""
    if result.status == "scored" and result.category not in CATEGORY_VALUES:
        raise ValueError(f"argument 'result' has unknown category {result.category!r}")
    if result.status not in STATUS_VALUES:
        raise ValueError(f"argument 'result' has unknown status {result.status!r}")
    if isinstance(max_lesions, bool) or not isinstance(max_lesions, int) or max_lesions < 0:
        raise ValueError(f"argument 'max_lesions' must be an int >= 0, got {max_lesions!r}")
    if masks is not None and not isinstance(masks, ResultMasks):
        raise TypeError(f"argument 'masks' must be a ResultMasks, got {type(masks).__name__}")
    if segmentation is not None and masks is None:
        raise ValueError("argument 'segmentation' needs argument 'masks' (its segment numbers come from them)")


def _lesions_to_report(
    datasets: Sequence[Dataset],
    result: ScoreResult,
    masks: ResultMasks | None,
    segmentation: Dataset | None,
    max_lesions: int,
) -> tuple[list[LesionComponent], tuple[Dataset, dict[str, int]] | None]:
    """The ``max_lesions`` largest 3-D lesions that get a TID 1411 group, and the SEG they reference.

    No masks, an unscored result or ``max_lesions == 0``: none. The SEG reference is
    ``(segmentation, segment numbers)`` when a SEG was built, else ``None``.
    """
    if masks is None or result.status != "scored" or not max_lesions:
        return [], None
    if masks.original_shape[0] != len(datasets):
        raise ValueError(f"argument 'masks' covers {masks.original_shape[0]} slices, "
                         f"the source series has {len(datasets)}")
    components = masks.lesion_components(max_lesions)
    if segmentation is None:
        return components, None
    from worker.outputs.seg import segment_numbers

    return components, (segmentation, segment_numbers(masks))


def _device_observation_context(result: ScoreResult) -> hd.sr.ObservationContext:
    """Observer context: the ct-triage model as the observing device (TID 1004)."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=derived_uid("ct-triage-device", result.model, result.model_version),
        name="ct-triage",
        manufacturer_name=base.MANUFACTURER,
        model_name=base.plain_text(result.model)[:64],
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(observer_type=codes.cid270.Device,
                                                      observer_identifying_attributes=device)
    )
