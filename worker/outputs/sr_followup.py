"""TID 1500 content for the change since the priors (issue 12), added to the SR by one hook.

For each prior the result was compared with, one TID 1501 measurement group
(tracking identifier "Change since prior <YYYY-MM-DD>", finding type Lung, the same
algorithm identification as the other groups) with TID 300 measurements:

==========  ===================================================  ======  =====================
code        meaning                                              unit    finding site
==========  ===================================================  ======  =====================
CTT010      Change in lung involvement since prior               ``%``   lung / right / left
            (percentage points: current minus prior share)
CTT011      Relative change in lung involvement since prior      ``%``   lung / right / left
CTT012      Change in lesion volume since prior                  ``ml``  lung
CTT013      Time since prior acquisition                         ``h``   -
CTT014      Rate of change in lung involvement                   ``%/d`` lung
==========  ===================================================  ======  =====================

and a qualitative evaluation CTT015 "Change since prior" = PROGRESSION / WORSENING /
STABLE / IMPROVEMENT (99CTTRIAGE). Every measurement references one image of the prior
study (SourceImageForMeasurement), and that image is added to the SR's evidence, so
highdicom lists the prior study in the Pertinent Other Evidence Sequence. Absent values
(no relative change from a 0 % prior, unknown interval) are left out, never written as 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import highdicom as hd
from pydicom.dataset import Dataset

from worker.followup.comparison import Assessment
from worker.outputs.sr_concepts import LEFT_LUNG, LUNG, RIGHT_LUNG, UNIT_ML, UNIT_PERCENT, measurement, private
from worker.outputs.uids import output_uid

CHANGE_POINTS = private("CTT010", "Change in lung involvement since prior")
CHANGE_RELATIVE = private("CTT011", "Relative change in lung involvement since prior")
CHANGE_LESION_VOLUME = private("CTT012", "Change in lesion volume since prior")
TIME_SINCE_PRIOR = private("CTT013", "Time since prior acquisition")
CHANGE_RATE = private("CTT014", "Rate of change in lung involvement")
CHANGE_SINCE_PRIOR = private("CTT015", "Change since prior")
TREND_VALUES = {
    "progression": private("PROGRESSION", "Progression (rule met)"),
    "worsening": private("WORSENING", "Worsening"),
    "stable": private("STABLE", "Stable"),
    "improvement": private("IMPROVEMENT", "Improvement"),
}
UNIT_HOUR = hd.sr.CodedConcept("h", "UCUM", "hour")
UNIT_PERCENT_PER_DAY = hd.sr.CodedConcept("%/d", "UCUM", "percent per day")


@dataclass
class ChangeContent:
    """What the SR builder adds: measurement groups and the prior images to list as evidence."""

    groups: list = field(default_factory=list)
    evidence: list[Dataset] = field(default_factory=list)


def _evidence(study_uid: str, series_uid: str | None, sop_uid: str | None, sop_class: str | None) -> Dataset | None:
    if not (series_uid and sop_uid and sop_class):
        return None
    ds = Dataset()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SOPInstanceUID = sop_uid
    ds.SOPClassUID = sop_class
    return ds


def change_content(result, source_series: str, version: int, algorithm: hd.sr.AlgorithmIdentification) -> ChangeContent:
    """The change groups for ``result.comparison`` (empty content when there is none)."""
    comparison = getattr(result, "comparison", None)
    if not comparison or result.status != "scored":
        return ChangeContent()
    assessment = Assessment.from_json(comparison)
    content = ChangeContent()
    for k, change in enumerate(assessment.changes, start=1):
        prior = change.prior
        evidence = _evidence(prior.study_instance_uid, prior.series_instance_uid, prior.sop_instance_uid,
                             prior.sop_class_uid)
        refs = None
        if evidence is not None:
            content.evidence.append(evidence)
            refs = [hd.sr.SourceImageForMeasurement(referenced_sop_class_uid=str(evidence.SOPClassUID),
                                                    referenced_sop_instance_uid=str(evidence.SOPInstanceUID))]

        def num(name, value, unit, site=None, refs=refs):
            return measurement(name, value, unit, site=site, images=refs)

        measurements = [
            *num(CHANGE_POINTS, change.delta_points, UNIT_PERCENT, LUNG),
            *num(CHANGE_POINTS, change.delta_points_right, UNIT_PERCENT, RIGHT_LUNG),
            *num(CHANGE_POINTS, change.delta_points_left, UNIT_PERCENT, LEFT_LUNG),
            *num(CHANGE_RELATIVE, change.relative_percent, UNIT_PERCENT, LUNG),
            *num(CHANGE_RELATIVE, change.relative_percent_right, UNIT_PERCENT, RIGHT_LUNG),
            *num(CHANGE_RELATIVE, change.relative_percent_left, UNIT_PERCENT, LEFT_LUNG),
            *num(CHANGE_LESION_VOLUME, change.delta_lesion_ml, UNIT_ML, LUNG),
            *num(TIME_SINCE_PRIOR, change.hours, UNIT_HOUR),
            *num(CHANGE_RATE, change.points_per_day, UNIT_PERCENT_PER_DAY, LUNG),
        ]
        day = prior.acquired_at.strftime("%Y-%m-%d") if prior.acquired_at else "unknown date"
        content.groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=output_uid(source_series, version, "sr-tracking-change", k),
                identifier=f"Change since prior {day}"),
            finding_type=LUNG,
            algorithm_id=algorithm,
            measurements=measurements,
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(CHANGE_SINCE_PRIOR, TREND_VALUES[change.trend])],
        ))
    return content
