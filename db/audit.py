"""The audit trail's rows: record an audit message, and the outbox its syslog sender works from.

What
    :class:`db.models.AuditEvent` holds one IHE ATNA / DICOM PS3.15 A.5 audit message per
    row: its searchable fields as columns and the rendered XML (``ct_triage.audit`` builds
    it; this module never looks inside). :func:`record_audit` adds a row in the caller's
    transaction, so an audited change and its audit message commit (or roll back) together.
    The sender claims due rows (:func:`due_audit_ids`, :func:`claim_audit`), then marks
    them sent (:func:`mark_audit_sent`) or failed with a retry time
    (:func:`mark_audit_failed`); while the repository is down :func:`defer_due_audit`
    pushes every due row back in one statement.

Why an outbox
    The audit repository is a remote syslog server that may be down or unreachable for
    hours; a message is written to the database first and sent afterwards, so nothing is
    lost meanwhile and the audited action never waits for the network.

Thresholds
    - A claim holds a row for ``lease_s`` (the sender passes 60 s): a sender that died
      mid-send leaves the row due again after it, so a message is sent at least once
      (a duplicate in the repository is possible; a gap is not).
    - :func:`http_read_audited_since` is the aggregation of page/API reads: whether a
      read by this client (user and address) was recorded since the given time; the
      window (``CT_TRIAGE_AUDIT_QUERY_AGGREGATE_MIN``) is the caller's.

Imports nothing outside ``db``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from db.models import AuditEvent
from db.types import utcnow

ERROR_LIMIT = 500  # characters of last_error kept


@dataclass(frozen=True)
class AuditRecord:
    """What :func:`record_audit` stores: the message's searchable fields and its XML."""

    kind: str
    event_id: str
    outcome: int
    event_at: datetime
    message_xml: str
    event_type: str | None = None
    action: str | None = None
    user_id: str | None = None
    source_address: str | None = None
    participants: list[dict[str, str]] = field(default_factory=list)


def record_audit(session: Session, event: AuditRecord) -> AuditEvent:
    """Add ``event`` as an unsent row (flushed, so it has its id); the caller commits."""
    row = AuditEvent(kind=event.kind[:32], event_id=event.event_id, event_type=event.event_type,
                     action=event.action, outcome=event.outcome, event_at=event.event_at,
                     user_id=None if event.user_id is None else event.user_id[:128],
                     source_address=None if event.source_address is None else event.source_address[:64],
                     participants_json=json.dumps(event.participants), message_xml=event.message_xml,
                     attempts=0)
    session.add(row)
    session.flush()
    return row


def _due(now: datetime):
    return and_(AuditEvent.sent_at.is_(None),
                or_(AuditEvent.next_attempt_at.is_(None), AuditEvent.next_attempt_at <= now))


def due_audit_ids(session: Session, now: datetime | None = None, limit: int = 100) -> list[int]:
    """Unsent rows that are due, oldest first."""
    now = now or utcnow()
    return list(session.scalars(select(AuditEvent.id).where(_due(now)).order_by(AuditEvent.id).limit(limit)))


def claim_audit(session: Session, ids: list[int], lease_s: float, now: datetime | None = None) -> list[AuditEvent]:
    """Claim each of ``ids`` that is still due (one conditional UPDATE each, so two senders
    never claim the same row): attempts + 1, next_attempt_at = now + ``lease_s``. Returns
    the claimed rows, in id order."""
    now = now or utcnow()
    claimed: list[int] = []
    for audit_id in ids:
        result = session.execute(update(AuditEvent).where(AuditEvent.id == audit_id, _due(now))
                                 .values(attempts=AuditEvent.attempts + 1,
                                         next_attempt_at=now + timedelta(seconds=lease_s))
                                 .execution_options(synchronize_session=False))
        if int(getattr(result, "rowcount", 0) or 0) == 1:
            claimed.append(audit_id)
    if not claimed:
        return []
    return list(session.scalars(select(AuditEvent).where(AuditEvent.id.in_(claimed)).order_by(AuditEvent.id)
                                .execution_options(populate_existing=True)))


def mark_audit_sent(session: Session, ids: list[int], now: datetime | None = None) -> None:
    if ids:
        session.execute(update(AuditEvent).where(AuditEvent.id.in_(ids))
                        .values(sent_at=now or utcnow(), next_attempt_at=None, last_error=None)
                        .execution_options(synchronize_session=False))


def mark_audit_failed(session: Session, ids: list[int], error: str, retry_at: datetime) -> None:
    """The rows stay unsent; the sender tries them again from ``retry_at``."""
    if ids:
        session.execute(update(AuditEvent).where(AuditEvent.id.in_(ids), AuditEvent.sent_at.is_(None))
                        .values(next_attempt_at=retry_at, last_error=error[:ERROR_LIMIT])
                        .execution_options(synchronize_session=False))


def defer_due_audit(session: Session, retry_at: datetime, error: str, now: datetime | None = None) -> int:
    """Every due unsent row waits until ``retry_at`` (the repository is down: trying the
    rest now would fail the same way). Returns how many rows were deferred."""
    result = session.execute(update(AuditEvent).where(_due(now or utcnow()))
                             .values(next_attempt_at=retry_at, last_error=error[:ERROR_LIMIT])
                             .execution_options(synchronize_session=False))
    return int(getattr(result, "rowcount", 0) or 0)


def http_read_audited_since(session: Session, user_id: str, source_address: str | None, since: datetime,
                            kind: str = "http_read") -> bool:
    """Whether a ``kind`` event of this client (user and address) was recorded at or after ``since``."""
    address = (AuditEvent.source_address.is_(None) if source_address is None
               else AuditEvent.source_address == source_address[:64])
    stmt = (select(AuditEvent.id).where(AuditEvent.kind == kind, AuditEvent.user_id == user_id[:128], address,
                                        AuditEvent.event_at >= since).limit(1))
    return session.scalar(stmt) is not None


def recent_audit_events(session: Session, limit: int = 50, since: datetime | None = None) -> list[AuditEvent]:
    """The newest ``limit`` events (at or after ``since`` when given), newest first."""
    stmt = select(AuditEvent)
    if since is not None:
        stmt = stmt.where(AuditEvent.event_at >= since)
    return list(session.scalars(stmt.order_by(AuditEvent.event_at.desc(), AuditEvent.id.desc()).limit(limit)))


def audit_backlog(session: Session) -> tuple[int, datetime | None]:
    """(unsent rows, when the oldest of them happened): for status pages and metrics."""
    count, oldest = session.execute(select(func.count(AuditEvent.id), func.min(AuditEvent.event_at))
                                    .where(AuditEvent.sent_at.is_(None))).one()
    return int(count or 0), oldest
