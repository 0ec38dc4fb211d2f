"""SQLAlchemy 2 models: the source of truth the node, the workers and the dashboard share.

Every series state change is both a timestamp column on ``series`` (for cheap
turnaround queries) and a row in ``series_events`` (for the audit trail).
"""

from __future__ import annotations

import json
from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    update,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from db.states import SeriesState
from db.types import UTCDateTime, utcnow

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

UID = String(64)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Patient(Base):
    __tablename__ = "patients"
    __table_args__ = (UniqueConstraint("patient_id", "issuer_of_patient_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    issuer_of_patient_id: Mapped[str] = mapped_column(String(64), default="")
    # PHI: kept for the PACS outputs, never logged at INFO.
    patient_name: Mapped[str | None] = mapped_column(String(324))
    patient_birth_date: Mapped[str | None] = mapped_column(String(8))
    patient_sex: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    studies: Mapped[list[Study]] = relationship(back_populates="patient")


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    patient_fk: Mapped[int] = mapped_column(ForeignKey("patients.id"), index=True)
    accession_number: Mapped[str | None] = mapped_column(String(16))
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_time: Mapped[str | None] = mapped_column(String(32))
    study_description: Mapped[str | None] = mapped_column(String(64))
    # Bumped when a late instance reopens a settled series: each version is scored once.
    version: Mapped[int] = mapped_column(Integer, default=1)
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)

    patient: Mapped[Patient] = relationship(back_populates="studies")
    series: Mapped[list[Series]] = relationship(back_populates="study", order_by="Series.id")
    jobs: Mapped[list[Job]] = relationship(back_populates="study", order_by="Job.id")


def bump_study_version(session: Session, study: Study, expected: int | None = None) -> bool:
    """Add one to ``study.version`` in the database, atomically; False when ``expected`` is
    given and the study is no longer at that version (nothing changed).

    Two writers bump versions (a late instance, a comparison-only result version). An ORM
    ``study.version += 1`` writes the value it read, so two transactions bumping at once
    would both write the same number and one version would be lost (PostgreSQL, READ
    COMMITTED). ``version = version + 1`` waits for the other writer and counts on its
    value; ``expected`` lets a comparison-only version give way to a late instance.
    """
    session.flush()
    statement = update(Study).where(Study.id == study.id)
    if expected is not None:
        statement = statement.where(Study.version == expected)
    changed = session.execute(statement.values(version=Study.version + 1)
                              .execution_options(synchronize_session=False))
    session.refresh(study, ["version"])
    return int(getattr(changed, "rowcount", 0) or 0) == 1


class Series(Base):
    __tablename__ = "series"
    __table_args__ = (Index("ix_series_state_last", "state", "last_received_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    study_fk: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    sop_class_uid: Mapped[str | None] = mapped_column(UID)
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(String(64))
    convolution_kernel: Mapped[str | None] = mapped_column(String(64))
    slice_thickness: Mapped[float | None] = mapped_column(Float)
    images_in_acquisition: Mapped[int | None] = mapped_column(Integer)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    duplicate_count: Mapped[int] = mapped_column(Integer, default=0)
    version: Mapped[int] = mapped_column(Integer, default=1)

    state: Mapped[str] = mapped_column(String(16), default=SeriesState.RECEIVING.value)
    state_reason: Mapped[str | None] = mapped_column(Text)
    flags_json: Mapped[str] = mapped_column(Text, default="[]")
    attempts: Mapped[int] = mapped_column(Integer, default=0)

    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # One timestamp per state (the latest entry into it); history in series_events.
    receiving_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    stable_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    queued_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    scoring_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    scored_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    delivering_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    not_applicable_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    failed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series", order_by="Instance.id")
    events: Mapped[list[SeriesEvent]] = relationship(back_populates="series", order_by="SeriesEvent.id")

    @property
    def flags(self) -> list[str]:
        return json.loads(self.flags_json or "[]")

    @flags.setter
    def flags(self, value: list[str]) -> None:
        self.flags_json = json.dumps(list(value))


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    series_fk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    series_version: Mapped[int] = mapped_column(Integer, default=1)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(String(255))  # relative to the storage folder
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    instance_number: Mapped[int | None] = mapped_column(Integer)
    # Position along the slice normal (mm): what gap and spacing checks use.
    slice_position: Mapped[float | None] = mapped_column(Float)
    rows: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[int | None] = mapped_column(Integer)
    calling_ae_title: Mapped[str | None] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Set when retention removed the file (CT_TRIAGE_RETENTION_DAYS); the row stays.
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    series: Mapped[Series] = relationship(back_populates="instances")


class SeriesEvent(Base):
    __tablename__ = "series_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_fk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    series: Mapped[Series] = relationship(back_populates="events")


class Job(Base):
    """One scoring job per study version; the row is also the embedded queue's message."""

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("task_name", "study_fk", "study_version", name="uq_jobs_task_study_version"),
        Index("ix_jobs_state", "state"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_name: Mapped[str] = mapped_column(String(64))
    study_fk: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    study_version: Mapped[int] = mapped_column(Integer)
    # queued -> running -> done | failed (| queued again on a retry)
    state: Mapped[str] = mapped_column(String(16), default="queued")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    study: Mapped[Study] = relationship(back_populates="jobs")


class RejectedInstance(Base):
    """A C-STORE we answered with a failure status, and why."""

    __tablename__ = "rejected_instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    calling_ae_title: Mapped[str | None] = mapped_column(String(16))
    peer_address: Mapped[str | None] = mapped_column(String(64))
    sop_class_uid: Mapped[str | None] = mapped_column(String(128))
    sop_instance_uid: Mapped[str | None] = mapped_column(String(128))  # as sent, maybe invalid
    status_code: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text)
    quarantine_path: Mapped[str | None] = mapped_column(String(255))
    # Set when retention removed the quarantined copy.
    quarantine_deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Result(Base):
    """One scoring result per study version: what the worklist, the PACS outputs and the dashboard show."""

    __tablename__ = "results"
    __table_args__ = (UniqueConstraint("study_fk", "version", name="uq_results_study_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_fk: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    job_fk: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"))
    version: Mapped[int] = mapped_column(Integer)
    series_fk: Mapped[int | None] = mapped_column(ForeignKey("series.id"))  # the series that was scored
    status: Mapped[str] = mapped_column(String(16))  # scored | not_applicable | failed
    reason: Mapped[str | None] = mapped_column(Text)
    category: Mapped[str | None] = mapped_column(String(8), index=True)
    priority: Mapped[str] = mapped_column(String(8), index=True)  # HIGH | MEDIUM | LOW
    involvement_percent: Mapped[float | None] = mapped_column(Float)
    involvement_percent_left: Mapped[float | None] = mapped_column(Float)
    involvement_percent_right: Mapped[float | None] = mapped_column(Float)
    lung_volume_ml: Mapped[float | None] = mapped_column(Float)
    lesion_volume_ml: Mapped[float | None] = mapped_column(Float)
    lesion_count: Mapped[int | None] = mapped_column(Integer)
    model: Mapped[str | None] = mapped_column(String(64))
    model_version: Mapped[str | None] = mapped_column(String(32))
    device: Mapped[str | None] = mapped_column(String(32))
    seconds: Mapped[float | None] = mapped_column(Float)
    result_json: Mapped[str] = mapped_column(Text)  # the whole ScoreResult, boxes included
    # Turnaround: last instance received -> stable -> scoring started -> scored -> delivered.
    received_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    stable_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    scoring_started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    scored_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Build once, send many: the masks scoring measured on, and when the outputs were stored.
    masks_path: Mapped[str | None] = mapped_column(String(255))  # relative to the storage folder
    outputs_built_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    study: Mapped[Study] = relationship()
    output_files: Mapped[list[OutputFile]] = relationship(back_populates="result", order_by="OutputFile.send_order")
    deliveries: Mapped[list[Delivery]] = relationship(back_populates="result", order_by="Delivery.id")


class OutputFile(Base):
    """One built output instance (SR, SEG, SC image) of a result version, stored as a file."""

    __tablename__ = "output_files"
    __table_args__ = (UniqueConstraint("result_fk", "sop_instance_uid", name="uq_output_files_result_sop"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_fk: Mapped[int] = mapped_column(ForeignKey("results.id"), index=True)
    role: Mapped[str] = mapped_column(String(8))  # sr | seg | sc
    send_order: Mapped[int] = mapped_column(Integer)  # SR, then SEG, then SC
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(255))  # relative to the storage folder
    size_bytes: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))

    result: Mapped[Result] = relationship(back_populates="output_files")


class Outbox:
    """The columns of an outbox row that is worked on until done, retried when due with
    backoff (deliveries, and ``db.followup.PriorSearch``): its state (starting ``pending``),
    attempts so far, when it is next due, the last error, the worker (host:pid) working on
    it, and when it was made and published to the queue."""

    state: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Delivery(Outbox, Base):
    """The outbox: one row per (result, destination); retried until success or a permanent failure."""

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("result_fk", "destination", name="uq_deliveries_result_destination"),
        Index("ix_deliveries_state_next", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_fk: Mapped[int] = mapped_column(ForeignKey("results.id"), index=True)
    destination: Mapped[str] = mapped_column(String(128))  # AET@host:port[+tls], or mllp://host:port for HL7
    # dicom: C-STORE of the SC/SR outputs to a PACS; hl7: order update + ORU^R01 over MLLP to a RIS.
    channel: Mapped[str] = mapped_column(String(8), default="dicom", server_default="dicom")
    # state: pending -> sending -> delivered | retrying (-> sending ...) | failed (permanent)
    instances_sent: Mapped[int] = mapped_column(Integer, default=0)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    result: Mapped[Result] = relationship(back_populates="deliveries")


class UpsWorkitem(Base):
    """One UPS workitem (PS3.4 Annex CC) per result (study version), served by the node.

    ``state`` is the UPS state machine: SCHEDULED -> IN PROGRESS -> COMPLETED | CANCELED
    (a SCHEDULED item is cancelled directly on request or when superseded). Patient and
    study identifiers are copied from the source at creation; ``input_json`` lists the
    referenced series ([{study_instance_uid, series_instance_uid, sop_class_uid,
    sop_instance_uids}]); ``progress_json`` and ``performed_json`` hold what the performer
    N-SETs, as DICOM JSON.
    """

    __tablename__ = "ups_workitems"
    __table_args__ = (Index("ix_ups_workitems_worklist", "state", "priority_rank", "scheduled_at"),
                      Index("ix_ups_workitems_expiry", "state", "expires_at"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    result_fk: Mapped[int] = mapped_column(ForeignKey("results.id"), unique=True)
    study_fk: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    study_version: Mapped[int] = mapped_column(Integer)
    study_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    accession_number: Mapped[str | None] = mapped_column(String(16))
    # PHI copied from the source study: served to worklist clients, never logged at INFO.
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    issuer_of_patient_id: Mapped[str] = mapped_column(String(64), default="")
    patient_name: Mapped[str | None] = mapped_column(String(324))
    patient_birth_date: Mapped[str | None] = mapped_column(String(8))
    patient_sex: Mapped[str | None] = mapped_column(String(16))
    study_description: Mapped[str | None] = mapped_column(String(64))
    priority: Mapped[str] = mapped_column(String(8), index=True)  # HIGH | MEDIUM | LOW (0074,1200)
    priority_rank: Mapped[int] = mapped_column(Integer)  # 0 HIGH, 1 MEDIUM, 2 LOW: ORDER BY this
    category: Mapped[str | None] = mapped_column(String(8))
    worklist_label: Mapped[str] = mapped_column(String(64))  # (0074,1202)
    procedure_step_label: Mapped[str] = mapped_column(String(64))  # (0074,1204): category and %
    comments: Mapped[str | None] = mapped_column(Text)  # (0040,0400): result summary or the reason not scored
    # SCHEDULED | IN PROGRESS | COMPLETED | CANCELED (0074,1000)
    state: Mapped[str] = mapped_column(String(16), default="SCHEDULED")
    transaction_uid: Mapped[str | None] = mapped_column(UID)  # never returned to clients
    performer_ae_title: Mapped[str | None] = mapped_column(String(16))
    scheduled_at: Mapped[datetime] = mapped_column(UTCDateTime)  # (0040,4005): when the study arrived
    input_json: Mapped[str] = mapped_column(Text, default="[]")
    progress_json: Mapped[str | None] = mapped_column(Text)
    performed_json: Mapped[str | None] = mapped_column(Text)
    cancel_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    in_progress_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    canceled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Set when a newer study version replaced this one: it leaves every worklist.
    superseded_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # (0040,4008) Scheduled Procedure Step Expiration DateTime: scheduled_at + WORKLIST_EXPIRY_H; a
    # SCHEDULED item past it is cancelled by the node (dicom_node.expiry). NULL: never expires.
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    result: Mapped[Result] = relationship()


class UpsSubscription(Base):
    """A UPS Watch subscription: one workitem (``workitem_fk``) or global (NULL)."""

    __tablename__ = "ups_subscriptions"
    __table_args__ = (Index("ix_ups_subscriptions_ae", "ae_title", "workitem_fk"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ae_title: Mapped[str] = mapped_column(String(16))
    workitem_fk: Mapped[int | None] = mapped_column(ForeignKey("ups_workitems.id"))
    deletion_lock: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class UpsEvent(Base):
    """Outbox of UPS N-EVENT-REPORTs, one row per (event, subscriber); the node sends them.

    ``event_type`` (PS3.4 CC.2.4): 1 state report, 2 cancel requested, 3 progress report.
    ``payload_json``: {"state", "reason", "requesting_ae", "progress_json"} as applicable.
    """

    __tablename__ = "ups_events"
    __table_args__ = (Index("ix_ups_events_state_next", "state", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    workitem_fk: Mapped[int] = mapped_column(ForeignKey("ups_workitems.id"), index=True)
    ae_title: Mapped[str] = mapped_column(String(16))
    event_type: Mapped[int] = mapped_column(Integer)
    payload_json: Mapped[str] = mapped_column(Text, default="{}")
    # pending -> sent | failed (permanent) ; transient failures stay pending with a later next_attempt_at
    state: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    workitem: Mapped[UpsWorkitem] = relationship()


class AuditEvent(Base):
    """The audit trail (IHE ATNA, DICOM PS3.15 A.5): one row per audit message, and the
    outbox its syslog sender works from (``db.audit``, ``ct_triage.audit``).

    The searchable fields of the message are columns (``event_id``: the DCM code of
    EventID, e.g. 110104; ``event_type``: the first EventTypeCode; ``action``: C/R/U/D/E;
    ``outcome``: 0/4/8/12; ``user_id``: the requesting peer's AE title or HTTP client;
    ``source_address``: its network address); ``participants_json`` lists the participant
    objects ([{"type", "id", "name"}]); ``message_xml`` is the whole rendered message, sent
    as it stands. ``sent_at`` NULL: not yet accepted by the audit repository (or there is
    none); ``next_attempt_at`` is when the sender may try again.
    """

    __tablename__ = "audit_events"
    __table_args__ = (
        Index("ix_audit_events_unsent", "sent_at", "next_attempt_at"),
        Index("ix_audit_events_user", "kind", "user_id", "event_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))  # the builder: application_activity, query, http_read ...
    event_id: Mapped[str] = mapped_column(String(16))
    event_type: Mapped[str | None] = mapped_column(String(16))
    action: Mapped[str | None] = mapped_column(String(1))
    outcome: Mapped[int] = mapped_column(Integer, default=0)
    event_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    user_id: Mapped[str | None] = mapped_column(String(128))
    source_address: Mapped[str | None] = mapped_column(String(64))
    participants_json: Mapped[str] = mapped_column(Text, default="[]")
    message_xml: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Node(Base):
    """One node process (``ct-triage node``/``serve``) that uses this database: registered at
    start, its heartbeat every few seconds, stopped when it stops (dicom_node.nodes).

    ``busy_json``: the Study Instance UIDs it is receiving or has not indexed yet (a JSON list),
    so the completeness tracker of another node leaves them alone. ``recovered_at``: when a
    surviving node indexed what this one acknowledged and had not indexed (dicom_node.orphans).
    """

    __tablename__ = "nodes"
    __table_args__ = (Index("ix_nodes_live", "stopped_at", "recovered_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    node_id: Mapped[str] = mapped_column(String(128), index=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    stopped_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    recovered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    busy_json: Mapped[str] = mapped_column(Text, default="[]")
