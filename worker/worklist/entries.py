"""What a committed result puts on the reading worklists: a UPS workitem and HL7 deliveries.

Called by the scoring job inside the transaction that stores the result
(:func:`add_worklist_entries`), so the result, its workitem and its HL7 outbox rows
commit together or not at all:

- the UPS workitem (db.worklist.create_workitem, served by dicom_node.ups): SOP Instance
  UID deterministic from (study, version); Scheduled Procedure Step Priority from the
  result; Worklist Label from ``CT_TRIAGE_UPS_WORKLIST_LABEL``; Procedure Step Label
  "CT-3 62.1% (R 70.2 / L 54.0)" or "Not scored: <status>"; Comments with the routing
  decision of the MosMedData paper's Table 2, the model and "NOT FOR DIAGNOSTIC USE";
  Scheduled Procedure Step Expiration DateTime the study's arrival + ``CT_TRIAGE_WORKLIST_EXPIRY_H``;
  Input Information Sequence referencing the scored CT series and, when a PACS is
  configured, the SC and SR series we send it (their UIDs are deterministic: worker.outputs.uids).
  Older versions' workitems are superseded in the same transaction.
- one ``deliveries`` row per ``CT_TRIAGE_HL7_DESTINATIONS`` entry (channel ``hl7``),
  sent by the same outbox, retries and backoff as DICOM delivery (worker.tasks.deliver).
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from ct_triage.settings import Settings, parse_destination, parse_hl7_destination
from db import repository, worklist
from db.models import Result, Series, Study
from db.types import utcnow
from worker.outputs.uids import derived_uid, output_uid
from worker.scoring.result import ROUTING, ScoreResult

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE"


def workitem_uid(study_instance_uid: str, version: int) -> str:
    """Deterministic UPS SOP Instance UID of a study version (a retry makes the same one)."""
    return str(derived_uid(study_instance_uid, str(version), "ups-workitem"))


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def procedure_step_label(score: ScoreResult) -> str:
    """(0074,1204), at most 64 characters: category and % (per lung), or why not scored."""
    if score.status == "scored":
        return (f"{score.category} {_pct(score.involvement_percent)}% "
                f"(R {_pct(score.involvement_percent_right)} / L {_pct(score.involvement_percent_left)})")[:64]
    return f"Not scored: {score.status.replace('_', ' ')}"[:64]


def workitem_comments(score: ScoreResult, priority: str) -> str:
    """(0040,0400) Comments on the Scheduled Procedure Step: what a reader sees beside the label."""
    if score.status == "scored":
        text = (f"AI COVID-19 CT triage {score.category}: {_pct(score.involvement_percent)}% of the lungs involved "
                f"(right {_pct(score.involvement_percent_right)}%, left {_pct(score.involvement_percent_left)}%), "
                f"lesions {_pct(score.lesion_volume_ml)} ml of {_pct(score.lung_volume_ml)} ml lung. "
                f"Routing (MosMedData Table 2): {ROUTING.get(score.category or '', '-')}. ")
    else:
        text = f"Not scored ({score.status}): {score.reason or 'no reason given'}. Read as usual. "
    text += f"Priority {priority}. Model {score.model} {score.model_version}. {NOT_FOR_DIAGNOSTIC_USE}."
    return text[:10240]


def workitem_inputs(session: Session, settings: Settings, result: Result, score: ScoreResult,
                    study: Study) -> list[dict]:
    """The series the Input Information Sequence references, with their instances."""
    retrieve_ae = (parse_destination(settings.destinations[0]).ae_title if settings.destinations
                   else settings.ae_title)
    inputs: list[dict] = []
    scored = [session.get_one(Series, result.series_fk)] if result.series_fk else list(study.series)
    for series in scored:
        rows = worklist.instance_refs(session, series.id)
        if not rows:
            continue
        inputs.append({"study_instance_uid": study.study_instance_uid,
                       "series_instance_uid": series.series_instance_uid,
                       "sop_class_uid": rows[0][1], "sop_instance_uids": [r[0] for r in rows],
                       "retrieve_ae_title": retrieve_ae})
    if result.series_fk and settings.destinations:
        source = session.get_one(Series, result.series_fk).series_instance_uid
        version = result.version
        slices = sorted({box.slice_index for box in score.boxes}) if score.status == "scored" else []
        sc_instances = [output_uid(source, version, "sc-instance", 0)]
        sc_instances += [output_uid(source, version, "sc-instance", i + 1) for i in slices]
        inputs.append({"study_instance_uid": study.study_instance_uid,
                       "series_instance_uid": str(output_uid(source, version, "sc-series")),
                       "sop_class_uid": SECONDARY_CAPTURE, "sop_instance_uids": [str(u) for u in sc_instances],
                       "retrieve_ae_title": retrieve_ae})
        inputs.append({"study_instance_uid": study.study_instance_uid,
                       "series_instance_uid": str(output_uid(source, version, "sr-series")),
                       "sop_class_uid": COMPREHENSIVE_3D_SR,
                       "sop_instance_uids": [str(output_uid(source, version, "sr-instance", 0))],
                       "retrieve_ae_title": retrieve_ae})
    return inputs


def add_worklist_entries(session: Session, settings: Settings, result: Result, score: ScoreResult) -> list[int]:
    """Workitem + HL7 outbox rows for a just-flushed result; returns the HL7 delivery ids."""
    now = result.scored_at or utcnow()
    study = session.get_one(Study, result.study_fk)
    worklist.create_workitem(
        session, result, sop_instance_uid=workitem_uid(study.study_instance_uid, result.version),
        worklist_label=settings.ups_worklist_label, procedure_step_label=procedure_step_label(score),
        comments=workitem_comments(score, result.priority),
        inputs=workitem_inputs(session, settings, result, score, study), now=now,
        expiry_h=settings.worklist_expiry_h)
    ris = [str(parse_hl7_destination(entry)) for entry in settings.hl7_destinations]
    return repository.add_deliveries(session, result, ris, now, channel="hl7")
