"""Retention (``CT_TRIAGE_RETENTION_DAYS``): stored files past their time, and their rows marked deleted.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from db.models import (
    Delivery,
    Instance,
    RejectedInstance,
    Result,
    Series,
    Study,
)
from db.types import utcnow


@dataclass
class ExpiredFile:
    kind: str  # "instance" | "quarantine"
    row_id: int
    path: str  # relative to the storage folder


def expired_files(session: Session, cutoff: datetime, limit: int = 1000) -> list[ExpiredFile]:
    """Files retention may delete now: never before the study's result was delivered.

    An instance is expired when its study's result for the study's *current* version
    was delivered before ``cutoff`` (every delivery succeeded), or has no delivery at
    all (no destination, nothing to send) and was scored before ``cutoff``. A study
    reopened by a late instance has a newer version without a delivered result, so it
    keeps its files. Quarantined copies expire ``cutoff`` after they were received.
    """
    with_deliveries = select(Delivery.result_fk).distinct()
    settled = (select(Result.study_fk)
               .join(Study, (Study.id == Result.study_fk) & (Study.version == Result.version))
               .where(((Result.delivered_at.is_not(None)) & (Result.delivered_at <= cutoff))
                      | (Result.id.not_in(with_deliveries) & (Result.scored_at <= cutoff))))
    rows = session.execute(
        select(Instance.id, Instance.path).join(Series, Instance.series_fk == Series.id)
        .where(Instance.deleted_at.is_(None), Series.study_fk.in_(settled))
        .order_by(Instance.id).limit(limit)).all()
    files = [ExpiredFile("instance", row_id, path) for row_id, path in rows]
    if len(files) < limit:
        quarantined = session.execute(
            select(RejectedInstance.id, RejectedInstance.quarantine_path)
            .where(RejectedInstance.quarantine_path.is_not(None), RejectedInstance.quarantine_deleted_at.is_(None),
                   RejectedInstance.received_at <= cutoff)
            .order_by(RejectedInstance.id).limit(limit - len(files))).all()
        files += [ExpiredFile("quarantine", row_id, path) for row_id, path in quarantined if path]
    return files


def mark_files_deleted(session: Session, files: list[ExpiredFile], now: datetime | None = None) -> None:
    now = now or utcnow()
    instances = [f.row_id for f in files if f.kind == "instance"]
    quarantined = [f.row_id for f in files if f.kind == "quarantine"]
    if instances:
        session.execute(update(Instance).where(Instance.id.in_(instances)).values(deleted_at=now))
    if quarantined:
        session.execute(update(RejectedInstance).where(RejectedInstance.id.in_(quarantined))
                        .values(quarantine_deleted_at=now))
