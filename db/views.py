"""The dashboard's SQL views (migration 0003) as typed tables, and the read-only queries on them.

The views are created by ``db/migrations/versions/0003_dashboard_views.py`` with the
same columns on SQLite and PostgreSQL; the tables here declare those columns with
ct-triage's types, so a timestamp read from a view is a UTC-aware ``datetime`` on
both backends (SQLite hands views' computed hours back as text). They live in their
own ``MetaData``: ``Base.metadata.create_all`` never makes them tables.

Everything here only reads. The worklist page, ``/api/*``, ``/metrics`` and
``ct-triage status`` call these; the page shows no patient name, ID or birth date
(the views carry none: accession number and study description identify the study
in the PACS).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Column, Float, Integer, MetaData, String, Table, Text, func, select
from sqlalchemy.orm import Session

from db.models import Delivery, Instance, RejectedInstance, Result, Study
from db.types import UTCDateTime, utcnow

VIEWS = MetaData()

worklist = Table(
    "worklist", VIEWS,
    Column("study_id", Integer),
    Column("study_instance_uid", String(64)),
    Column("version", Integer),
    Column("accession_number", String(16)),
    Column("study_date", String(8)),
    Column("study_description", String(64)),
    Column("result_id", Integer),
    Column("priority", String(8)),
    Column("priority_rank", Integer),
    Column("result_status", String(16)),
    Column("category", String(8)),
    Column("involvement_percent", Float),
    Column("involvement_percent_left", Float),
    Column("involvement_percent_right", Float),
    Column("lesion_volume_ml", Float),
    Column("state", String(16)),
    Column("reason", Text),
    Column("model", String(64)),
    Column("arrived_at", UTCDateTime),
    Column("last_received_at", UTCDateTime),
    Column("scored_at", UTCDateTime),
    Column("delivered_at", UTCDateTime),
    Column("waiting_s", Float),
    Column("change_since_prior", String(16)),  # migration 0008: progression | worsening | stable | improvement
)

turnaround = Table(
    "turnaround", VIEWS,
    Column("result_id", Integer),
    Column("study_instance_uid", String(64)),
    Column("version", Integer),
    Column("superseded", Integer),
    Column("status", String(16)),
    Column("category", String(8)),
    Column("priority", String(8)),
    Column("received_at", UTCDateTime),
    Column("stable_at", UTCDateTime),
    Column("scoring_started_at", UTCDateTime),
    Column("scored_at", UTCDateTime),
    Column("delivered_at", UTCDateTime),
    Column("receive_to_stable_s", Float),
    Column("queue_wait_s", Float),
    Column("scoring_s", Float),
    Column("delivery_s", Float),
    Column("received_to_scored_s", Float),
    Column("received_to_delivered_s", Float),
)

throughput_hourly = Table(
    "throughput_hourly", VIEWS,
    Column("hour", UTCDateTime),
    Column("studies_received", Integer),
    Column("studies_scored", Integer),
    Column("studies_failed", Integer),
    Column("studies_not_applicable", Integer),
    Column("studies_delivered", Integer),
    Column("instances_received", Integer),
    Column("instances_rejected", Integer),
)

category_mix_daily = Table(
    "category_mix_daily", VIEWS,
    Column("day", UTCDateTime),
    Column("category", String(16)),
    Column("studies", Integer),
)

failures = Table(
    "failures", VIEWS,
    Column("at", UTCDateTime),
    Column("kind", String(32)),
    Column("study_instance_uid", String(64)),
    Column("version", Integer),
    Column("peer", String(128)),
    Column("attempts", Integer),
    Column("status_code", Integer),
    Column("reason", Text),
)

queue_depth = Table(
    "queue_depth", VIEWS,
    Column("queue", String(16)),
    Column("state", String(16)),
    Column("items", Integer),
    Column("oldest_at", UTCDateTime),
    Column("oldest_waiting_s", Float),
)

ALL_VIEWS = (worklist, turnaround, throughput_hourly, category_mix_daily, failures, queue_depth)

# Worklist rows the page and /api/worklist show at most.
WORKLIST_LIMIT = 500


@dataclass(frozen=True)
class WorklistRow:
    study_instance_uid: str
    version: int
    accession_number: str | None
    study_date: str | None
    study_description: str | None
    result_id: int | None
    priority: str
    priority_rank: int
    result_status: str | None
    category: str | None
    involvement_percent: float | None
    involvement_percent_left: float | None
    involvement_percent_right: float | None
    lesion_volume_ml: float | None
    state: str
    reason: str | None
    model: str | None
    arrived_at: datetime | None
    last_received_at: datetime | None
    scored_at: datetime | None
    delivered_at: datetime | None
    waiting_s: float | None
    change_since_prior: str | None  # vs the patient's prior (issue 12); None when not compared


_WORKLIST_FIELDS = tuple(WorklistRow.__dataclass_fields__)


def _worklist_row(mapping) -> WorklistRow:
    return WorklistRow(**{name: mapping[name] for name in _WORKLIST_FIELDS})


def worklist_rows(session: Session, *, received_within_s: float | None = None, limit: int = WORKLIST_LIMIT,
                  now: datetime | None = None) -> list[WorklistRow]:
    """Open study versions in reading order: priority (HIGH first), then arrival (oldest first)."""
    query = select(worklist)
    if received_within_s is not None:
        query = query.where(worklist.c.arrived_at >= (now or utcnow()) - timedelta(seconds=received_within_s))
    query = query.order_by(worklist.c.priority_rank, worklist.c.arrived_at, worklist.c.study_id).limit(limit)
    return [_worklist_row(m) for m in session.execute(query).mappings()]


def worklist_row(session: Session, study_instance_uid: str) -> WorklistRow | None:
    mapping = session.execute(select(worklist).where(worklist.c.study_instance_uid == study_instance_uid)
                              ).mappings().first()
    return _worklist_row(mapping) if mapping else None


def study_versions(session: Session, study_instance_uid: str) -> list[dict]:
    """Every scored version of a study with its turnaround (oldest first)."""
    rows = session.execute(select(turnaround).where(turnaround.c.study_instance_uid == study_instance_uid)
                           .order_by(turnaround.c.version)).mappings()
    return [dict(r) for r in rows]


def study_deliveries(session: Session, result_id: int) -> list[tuple[str, str, int, str | None]]:
    """(destination, state, attempts, last_error) of one result's outbox rows."""
    return [(d.destination, d.state, d.attempts, d.last_error)
            for d in session.scalars(select(Delivery).where(Delivery.result_fk == result_id).order_by(Delivery.id))]


def turnaround_since(session: Session, since: datetime) -> list[dict]:
    """Turnaround rows of results scored since ``since`` (oldest first), superseded ones included."""
    rows = session.execute(select(turnaround).where(turnaround.c.scored_at >= since)
                           .order_by(turnaround.c.scored_at)).mappings()
    return [dict(r) for r in rows]


def summary_source(session: Session, result_id: int) -> tuple[str, int | None, list[tuple[str, str]]] | None:
    """(result_json, scored series id, [(sop_instance_uid, path)]) of one result, or None.

    What the page needs to render a result's summary picture from the stored source
    instances (paths relative to the storage folder).
    """
    result = session.get(Result, result_id)
    if result is None:
        return None
    paths: list[tuple[str, str]] = []
    if result.series_fk is not None:
        paths = [(uid, path) for uid, path in session.execute(
            select(Instance.sop_instance_uid, Instance.path).where(Instance.series_fk == result.series_fk))]
    return result.result_json, result.series_fk, paths


@dataclass(frozen=True)
class MetricsSnapshot:
    studies_received: int
    instances_received: int
    instances_rejected: int
    results: list[tuple[str, str, str, int]]  # (status, category or "", priority, count), every version
    worklist: list[tuple[str, str, int]]  # (priority, state, count), current versions
    queues: list[tuple[str, str, int, float | None]]  # (queue, state, items, oldest waiting s)
    deliveries: list[tuple[str, int]]  # (state, count)
    turnaround_24h: list[dict]


def metrics_snapshot(session: Session, now: datetime | None = None) -> MetricsSnapshot:
    """Everything /metrics exports, read in one transaction."""
    now = now or utcnow()
    results = session.execute(select(Result.status, Result.category, Result.priority, func.count(Result.id))
                              .group_by(Result.status, Result.category, Result.priority)).all()
    wl = session.execute(select(worklist.c.priority, worklist.c.state, func.count())
                         .group_by(worklist.c.priority, worklist.c.state)).all()
    queues = session.execute(select(queue_depth.c.queue, queue_depth.c.state, queue_depth.c["items"],
                                    queue_depth.c.oldest_waiting_s)).all()
    deliveries = session.execute(select(Delivery.state, func.count(Delivery.id)).group_by(Delivery.state)).all()
    return MetricsSnapshot(
        studies_received=session.scalar(select(func.count(Study.id))) or 0,
        instances_received=session.scalar(select(func.count(Instance.id))) or 0,
        instances_rejected=session.scalar(select(func.count(RejectedInstance.id))) or 0,
        results=[(s, c or "", p, n) for s, c, p, n in results],
        worklist=[(p, s, n) for p, s, n in wl],
        queues=[(q, s, n, w) for q, s, n, w in queues],
        deliveries=[(s, n) for s, n in deliveries],
        turnaround_24h=turnaround_since(session, now - timedelta(hours=24)),
    )
