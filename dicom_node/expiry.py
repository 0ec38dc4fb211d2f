"""Workitems that end: the node cancels SCHEDULED UPS workitems nobody claimed in time.

What
    Every workitem carries Scheduled Procedure Step Expiration DateTime (0040,4008), stored
    as ``ups_workitems.expires_at``: the study's arrival (the Scheduled Procedure Step Start
    DateTime) plus ``CT_TRIAGE_WORKLIST_EXPIRY_H`` (72 h, the page's horizon
    ``CT_TRIAGE_HTTP_WORKLIST_HOURS`` by default). :class:`WorkitemExpiry` runs every
    :data:`INTERVAL_S` in a daemon thread of the node and moves each SCHEDULED workitem
    past it to CANCELED with Reason For Cancellation :func:`reason` (``expired: not claimed
    within 72 h (CT_TRIAGE_WORKLIST_EXPIRY_H)``), through db.worklist like any cancel: the
    subscribers get the CANCELED state report (N-EVENT-REPORT), and C-FIND for SCHEDULED
    no longer returns it. IN PROGRESS workitems are never expired: their performer decides.
    After the transaction commits, :attr:`WorkitemExpiry.on_expired` is called with
    (workitem UID, Study Instance UID) of each (a no-op unless wired, e.g. to the audit trail).

Why
    Studies are often read from the RIS worklist, not claimed on ours: without an end,
    every C-FIND would return months of SCHEDULED history.

Safety
    Each item is cancelled with its row lock held and its state checked again
    (db.worklist.expire_due), so two nodes sweeping one database cancel it once and emit
    one report; a claim racing the sweep either wins or gets 0xC300.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy.orm import Session, sessionmaker

from ct_triage.polling import Poller
from db import worklist
from db.session import session_scope
from db.types import utcnow

log = logging.getLogger("ct_triage.node.expiry")

#: How often the node looks for expired workitems (seconds); the first sweep runs at start.
INTERVAL_S = 60.0
#: Workitems cancelled per transaction; a sweep repeats until none is left.
BATCH = 100


def reason(expiry_h: float) -> str:
    """Reason For Cancellation of an expired workitem."""
    return f"expired: not claimed within {expiry_h:g} h (CT_TRIAGE_WORKLIST_EXPIRY_H)"


class WorkitemExpiry(Poller):
    """Cancels expired SCHEDULED workitems every ``interval_s`` (a daemon thread of the node)."""

    thread_name = "ups-expiry"
    logger = log
    failed = "UPS expiry: sweep failed"
    db_failed = "UPS expiry: database error"
    join_timeout_s = 5.0

    def __init__(self, session_factory: sessionmaker[Session], expiry_h: float, interval_s: float = INTERVAL_S,
                 wake_notifier: Callable[[], None] | None = None):
        super().__init__(self.sweep, interval_s)
        self.session_factory = session_factory
        self.expiry_h = expiry_h
        self.wake_notifier = wake_notifier
        # Called after commit with (workitem UID, Study Instance UID) of each expired workitem.
        self.on_expired: Callable[[str, str], None] = lambda workitem_uid, study_uid: None

    def sweep(self, now=None) -> list[tuple[str, str]]:
        """One sweep; returns (workitem UID, Study Instance UID) of the workitems it cancelled."""
        now = now or utcnow()
        expired: list[tuple[str, str]] = []
        while True:
            with session_scope(self.session_factory) as session:
                batch = worklist.expire_due(session, reason(self.expiry_h), now, limit=BATCH)
            expired += batch
            for workitem_uid, study_uid in batch:
                try:
                    self.on_expired(workitem_uid, study_uid)
                except Exception:  # the hook (audit trail) must never stop the sweep
                    log.exception("UPS expiry: on_expired failed for %s", workitem_uid)
            if len(batch) < BATCH:
                break
        if expired:
            log.info("UPS expiry: %d SCHEDULED workitem(s) not claimed within %g h cancelled", len(expired),
                     self.expiry_h)
            if self.wake_notifier is not None:
                self.wake_notifier()
        return expired
