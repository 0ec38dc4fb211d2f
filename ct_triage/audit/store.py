"""Writing audit messages to the database (the outbox), aggregating page reads, listing the trail.

What
    :func:`record` adds a message in the caller's transaction (the audited change and its
    message commit together; a database error is the caller's, like any other write).
    :func:`record_now` is for emit points that have no transaction (an association just
    refused, the application starting): its own transaction, and a failure is logged in
    one line and returns False instead of raising, so auditing never breaks the caller.
    :func:`record_http_read` records a page/API read unless the same client (token
    fingerprint and address) already has one in the last
    ``CT_TRIAGE_AUDIT_QUERY_AGGREGATE_MIN`` minutes (default 10; 0 records every read).
    Two concurrent first reads of a client may both be recorded: a duplicate, never a gap.
    :func:`format_audit_table` renders ``db.audit.recent_audit_events`` rows for
    ``ct-triage audit``.

Logging: never a patient identifier or name; at most the event kind, the row id and the
error's first line.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from datetime import timedelta

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from ct_triage.audit.events import http_read, token_fingerprint
from ct_triage.audit.message import AuditMessage
from ct_triage.settings import Settings
from ct_triage.text import clean
from db.audit import http_read_audited_since, record_audit
from db.models import AuditEvent
from db.session import session_scope

log = logging.getLogger("ct_triage.audit")

OUTCOMES = {0: "ok", 4: "minor-fail", 8: "serious-fail", 12: "major-fail"}


def record(session: Session, message: AuditMessage) -> AuditEvent:
    """Add ``message`` to the audit trail in the caller's transaction (flushed; the caller commits)."""
    return record_audit(session, message.to_record())


def record_now(session_factory: sessionmaker[Session], message: AuditMessage) -> bool:
    """Record ``message`` in a transaction of its own; False (and one ERROR line) when the
    database refused it."""
    try:
        with session_scope(session_factory) as session:
            record(session, message)
        return True
    except SQLAlchemyError as exc:
        log.error("audit message %s not recorded: %s", message.kind, clean(str(exc).splitlines()[0], 300))
        return False


def record_http_read(session: Session, settings: Settings, *, client_address: str | None, path: str,
                     token: str | None = None, outcome: int = 0) -> bool:
    """Record a page/API read as a Query message, one per client per aggregation window;
    True when a message was added."""
    message = http_read(settings, client_address=client_address, path=path, token=token, outcome=outcome)
    window = settings.audit_query_aggregate_min
    if window > 0:
        since = message.event_time - timedelta(minutes=window)
        if http_read_audited_since(session, token_fingerprint(token), message.requestor.address, since):
            return False
    record(session, message)
    return True


def format_audit_table(rows: Sequence[AuditEvent]) -> str:
    """A fixed-width text table of audit rows (no patient names: object types and IDs only)."""
    header = ("time (UTC)", "id", "kind", "event", "act", "outcome", "user", "address", "sent", "objects")
    lines: list[tuple[str, ...]] = [header]
    for row in rows:
        try:
            objects = json.loads(row.participants_json or "[]")
        except ValueError:
            objects = []
        summary = "; ".join(f"{o.get('type', '?')}={o.get('id', '?')}" for o in objects if isinstance(o, dict))
        if row.sent_at is not None:
            sent = "sent"
        elif row.attempts:
            sent = f"retry x{row.attempts}"
        else:
            sent = "pending"
        lines.append((row.event_at.strftime("%Y-%m-%d %H:%M:%S"), str(row.id), row.kind,
                      f"{row.event_id}" + (f"/{row.event_type}" if row.event_type else ""), row.action or "-",
                      OUTCOMES.get(row.outcome, str(row.outcome)), clean(row.user_id, 40, none="-"),
                      clean(row.source_address, 40, none="-"), sent, clean(summary, 120)))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    out = []
    for line in lines:
        out.append("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=False))
                   + "  " + line[-1])
    if not rows:
        out.append("(no audit events)")
    return "\n".join(text.rstrip() for text in out)


class PerKeyRate:
    """At most ``per_minute`` audit messages per key (a peer address) in any 60 s, so that a
    flood of refusals or failed logins cannot fill the database; ``suppressed[key]`` counts
    what was left out. Memory stays bounded: past ``max_keys`` keys (a spoofed-address flood)
    the table starts again."""

    def __init__(self, per_minute: int, max_keys: int = 10000):
        self.per_minute = per_minute
        self.max_keys = max_keys
        self.suppressed: dict[str, int] = {}
        self._seen: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def allow(self, key: str) -> bool:
        now = time.monotonic()
        with self._lock:
            window = self._seen.setdefault(key, deque())
            while window and window[0] < now - 60:
                window.popleft()
            if len(window) >= self.per_minute:
                self.suppressed[key] = self.suppressed.get(key, 0) + 1
                return False
            window.append(now)
            if len(self._seen) > self.max_keys:
                self._seen.clear()
                self.suppressed.clear()
            return True
