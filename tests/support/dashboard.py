"""Seven studies in every state the dashboard shows, written through the models.

``seed_dashboard(session_factory)`` writes them with timestamps relative to now and
returns what the tests expect: the worklist order, each study's state, the turnaround
intervals. Used by the view, Grafana, API, metrics and page tests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from db.models import Delivery, Instance, Job, Patient, RejectedInstance, Result, Series, Study
from db.session import session_scope
from db.types import utcnow

SCORE_TASK = "ct_triage.score_study"
UID_ROOT = "1.2.826.0.1.3680043.10.1201"
# Turnaround of every seeded result: received -> stable -> scoring -> scored -> delivered.
RECEIVE_TO_STABLE_S = 15.0
QUEUE_WAIT_S = 5.0
SCORING_S = 20.5
DELIVERY_S = 3.25


@dataclass
class SeedStudy:
    key: str
    minutes_ago: float
    state: str  # what the worklist view must say
    priority: str
    category: str | None = None
    percent: float | None = None
    left: float | None = None
    right: float | None = None
    status: str | None = None  # result status of the current version; None: no result
    deliveries: list[tuple[str, str | None]] = field(default_factory=list)  # (state, last_error)
    job_state: str | None = None
    series_state: str = "scored"
    superseded: tuple[str, str] | None = None  # (category, priority) of an older version
    error: str | None = None
    uid: str = ""
    accession: str = ""


STUDIES = [
    SeedStudy("A", 180, "delivered", "HIGH", "CT-3", 61.0, 58.0, 64.0, "scored", [("delivered", None)]),
    SeedStudy("B", 120, "delivery_failed", "LOW", "CT-1", 12.0, 10.0, 14.0, "scored",
              [("failed", "association rejected: called AE title not recognised")]),
    SeedStudy("C", 240, "delivering", "MEDIUM", "CT-2", 33.0, 30.0, 36.0, "scored",
              [("retrying", "connection refused")], superseded=("CT-1", "LOW")),
    SeedStudy("D", 30, "queued", "MEDIUM", job_state="queued", series_state="queued"),
    SeedStudy("E", 60, "failed", "MEDIUM", status="failed", series_state="failed",
              error="series rejected: gantry tilt 12.0 deg"),
    SeedStudy("F", 10, "scored", "HIGH", "CT-4", 81.0, 79.5, 82.5, "scored"),
    SeedStudy("G", 1, "receiving", "MEDIUM", series_state="receiving"),
]
# Reading order: HIGH, MEDIUM, LOW; within a priority the oldest arrival first.
WORKLIST_ORDER = ["A", "F", "C", "E", "D", "G", "B"]


def _result(study: Study, version: int, status: str, category: str | None, priority: str, percent, left, right,
            arrived: datetime, job: Job | None, series: Series, reason: str | None) -> Result:
    received = arrived + timedelta(seconds=60)
    stable = received + timedelta(seconds=RECEIVE_TO_STABLE_S)
    started = stable + timedelta(seconds=QUEUE_WAIT_S)
    scored = started + timedelta(seconds=SCORING_S)
    score = {"status": status, "reason": reason, "category": category, "priority": priority,
             "involvement_percent": percent, "involvement_percent_left": left,
             "involvement_percent_right": right, "study_instance_uid": study.study_instance_uid,
             "series_instance_uid": series.series_instance_uid, "boxes": [], "source_sop_instance_uids": []}
    return Result(study_fk=study.id, job_fk=job.id if job else None, version=version, series_fk=series.id,
                  status=status, reason=reason, category=category, priority=priority, involvement_percent=percent,
                  involvement_percent_left=left, involvement_percent_right=right,
                  lung_volume_ml=4200.0 if percent is not None else None,
                  lesion_volume_ml=round(42.0 * percent, 1) if percent is not None else None,
                  lesion_count=3 if percent else None, model="classical", model_version="1.0", device="cpu",
                  seconds=SCORING_S, result_json=json.dumps(score), received_at=received, stable_at=stable,
                  scoring_started_at=started, scored_at=scored, created_at=scored)


def seed_dashboard(session_factory, now: datetime | None = None) -> dict[str, SeedStudy]:
    now = now or utcnow()
    seeded: dict[str, SeedStudy] = {}
    with session_scope(session_factory) as session:
        patient = Patient(patient_id="PAT-0001", issuer_of_patient_id="", patient_name="Doe^Jane",
                          patient_birth_date="19500101", patient_sex="F")
        session.add(patient)
        session.flush()
        for n, spec in enumerate(STUDIES, start=1):
            arrived = now - timedelta(minutes=spec.minutes_ago)
            spec.uid = f"{UID_ROOT}.{n}"
            spec.accession = f"ACC{n:04d}"
            version = 2 if spec.superseded else 1
            study = Study(study_instance_uid=spec.uid, patient_fk=patient.id, accession_number=spec.accession,
                          study_date=arrived.strftime("%Y%m%d"), study_time="101500",
                          study_description=f"CT CHEST <b>{spec.key}</b>", version=version,
                          first_received_at=arrived, last_received_at=arrived + timedelta(seconds=60))
            session.add(study)
            session.flush()
            series = Series(series_instance_uid=f"{spec.uid}.1", study_fk=study.id, modality="CT",
                            sop_class_uid="1.2.840.10008.5.1.4.1.1.2", series_number=1, instance_count=3,
                            duplicate_count=0, version=version, state=spec.series_state, flags_json="[]",
                            first_received_at=arrived, last_received_at=arrived + timedelta(seconds=60),
                            receiving_at=arrived)
            session.add(series)
            session.flush()
            for i in range(3):
                session.add(Instance(sop_instance_uid=f"{spec.uid}.1.{i + 1}", sop_class_uid=series.sop_class_uid,
                                     series_fk=series.id, series_version=version,
                                     transfer_syntax_uid="1.2.840.10008.1.2.1", path=f"x/{spec.key}/{i}.dcm",
                                     size_bytes=1000, received_at=arrived + timedelta(seconds=30 * i)))
            if spec.superseded:
                old_job = Job(task_name=SCORE_TASK, study_fk=study.id, study_version=1, state="done", attempts=1,
                              created_at=arrived, finished_at=arrived + timedelta(seconds=100))
                session.add(old_job)
                session.flush()
                category, priority = spec.superseded
                session.add(_result(study, 1, "scored", category, priority, 20.0, 19.0, 21.0,
                                    arrived - timedelta(minutes=5), old_job, series, None))
            job = None
            if spec.status or spec.job_state:
                job = Job(task_name=SCORE_TASK, study_fk=study.id, study_version=version,
                          state=spec.job_state or "done", attempts=1, created_at=arrived + timedelta(seconds=75),
                          error=spec.error, worker="host:1" if spec.error else None,
                          finished_at=arrived + timedelta(seconds=101) if spec.status else None)
                session.add(job)
                session.flush()
            if spec.status:
                result = _result(study, version, spec.status, spec.category, spec.priority, spec.percent,
                                 spec.left, spec.right, arrived, job, series, spec.error)
                session.add(result)
                session.flush()
                for i, (state, error) in enumerate(spec.deliveries):
                    delivered = result.scored_at + timedelta(seconds=DELIVERY_S)
                    session.add(Delivery(result_fk=result.id, destination=f"PACS{i}@127.0.0.1:4242", state=state,
                                         attempts=1 if state == "delivered" else 3, last_error=error,
                                         instances_sent=3 if state == "delivered" else 0,
                                         created_at=result.scored_at, next_attempt_at=delivered,
                                         delivered_at=delivered if state == "delivered" else None))
                    if state == "delivered":
                        result.delivered_at = delivered
            seeded[spec.key] = spec
        session.add(RejectedInstance(received_at=now - timedelta(minutes=5), calling_ae_title="SCANNER",
                                     peer_address="127.0.0.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                                     sop_instance_uid="1.2.3", status_code=0xC210,
                                     reason="cannot decode the data set"))
    return seeded
