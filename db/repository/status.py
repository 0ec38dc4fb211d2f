"""What ``ct-triage status``, the page and ``/metrics`` read: series and results in worklist order, counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import (
    Instance,
    RejectedInstance,
    Result,
    Series,
    Study,
    UpsWorkitem,
)
from db.priority import RANK, worklist_key
from db.states import (
    SETTLED,
)
from db.types import utcnow


@dataclass
class SeriesStatusRow:
    study_instance_uid: str
    series_instance_uid: str
    modality: str | None
    series_description: str | None
    instance_count: int
    duplicate_count: int
    version: int
    state: str
    state_reason: str | None
    flags: list[str]
    first_received_at: datetime
    last_received_at: datetime
    stable_at: datetime | None
    queued_at: datetime | None
    scored_at: datetime | None
    delivered_at: datetime | None


def series_status(session: Session, limit: int = 200) -> list[SeriesStatusRow]:
    rows = session.execute(
        select(Series, Study.study_instance_uid).join(Study, Series.study_fk == Study.id)
        .order_by(Series.last_received_at.desc()).limit(limit)
    ).all()
    return [SeriesStatusRow(study_uid, s.series_instance_uid, s.modality, s.series_description, s.instance_count,
                            s.duplicate_count, s.version, s.state, s.state_reason, s.flags, s.first_received_at,
                            s.last_received_at, s.stable_at, s.queued_at, s.scored_at, s.delivered_at)
            for s, study_uid in rows]


@dataclass
class ResultStatusRow:
    study_instance_uid: str
    version: int
    status: str
    category: str | None
    priority: str
    involvement_percent: float | None
    scored_at: datetime | None
    reason: str | None
    deliveries: list[tuple[str, str]]
    # (destination, state, reason) of each delivery that failed or is retrying (HL7 AE/AR text, refused...)
    delivery_errors: list[tuple[str, str, str]] = field(default_factory=list)
    workitem_state: str | None = None  # the UPS workitem's state (db.worklist)


PRIORITY_ORDER = RANK


def result_status(session: Session, limit: int = 200) -> list[ResultStatusRow]:
    """Latest result per study, in worklist order (priority, then oldest first)."""
    latest = (select(Result.study_fk, func.max(Result.version).label("version"))
              .group_by(Result.study_fk).subquery())
    from db.followup import not_a_prior_clause  # retrieved priors are compared with, never read from the worklist

    results = session.scalars(
        select(Result).join(latest, (Result.study_fk == latest.c.study_fk) & (Result.version == latest.c.version))
        .join(Study, Study.id == Result.study_fk).where(not_a_prior_clause())
        .order_by(Result.scored_at).limit(limit)).all()
    workitems = dict(session.execute(select(UpsWorkitem.result_fk, UpsWorkitem.state)
                                     .where(UpsWorkitem.result_fk.in_([r.id for r in results]))).all())
    rows = [(worklist_key(r.priority, r.study.first_received_at, r.id),
             ResultStatusRow(r.study.study_instance_uid, r.version, r.status, r.category, r.priority,
                             r.involvement_percent, r.scored_at, r.reason,
                             [(d.destination, d.state) for d in r.deliveries],
                             [(d.destination, d.state, d.last_error) for d in r.deliveries
                              if d.state in ("failed", "retrying") and d.last_error],
                             workitems.get(r.id)))
            for r in results]
    rows.sort(key=lambda pair: pair[0])
    return [row for _, row in rows]


def counts(session: Session) -> dict[str, int]:
    return {
        "studies": session.scalar(select(func.count(Study.id))) or 0,
        "series": session.scalar(select(func.count(Series.id))) or 0,
        "instances": session.scalar(select(func.count(Instance.id))) or 0,
        "rejected": session.scalar(select(func.count(RejectedInstance.id))) or 0,
    }


SETTLED_STATES = frozenset(s.value for s in SETTLED)


@dataclass
class StorageCounts:
    instances_on_disk: int
    bytes_on_disk: int
    instances_deleted: int
    quarantined_on_disk: int
    disk_refusals_last_hour: int


def storage_counts(session: Session, disk_full_status: int, now: datetime | None = None) -> StorageCounts:
    now = now or utcnow()
    on_disk = session.execute(select(func.count(Instance.id), func.coalesce(func.sum(Instance.size_bytes), 0))
                              .where(Instance.deleted_at.is_(None))).one()
    return StorageCounts(
        instances_on_disk=int(on_disk[0] or 0),
        bytes_on_disk=int(on_disk[1] or 0),
        instances_deleted=session.scalar(select(func.count(Instance.id)).where(Instance.deleted_at.is_not(None)))
        or 0,
        quarantined_on_disk=session.scalar(select(func.count(RejectedInstance.id)).where(
            RejectedInstance.quarantine_path.is_not(None), RejectedInstance.quarantine_deleted_at.is_(None))) or 0,
        disk_refusals_last_hour=session.scalar(select(func.count(RejectedInstance.id)).where(
            RejectedInstance.status_code == disk_full_status,
            RejectedInstance.received_at >= now - timedelta(hours=1))) or 0,
    )
