"""What the page, the JSON API and /metrics write to the audit trail (:mod:`ct_triage.audit`).

- A read with the token (page, API, thumbnails, metrics): a Query message, one per client
  (token fingerprint and address) per ``CT_TRIAGE_AUDIT_QUERY_AGGREGATE_MIN`` minutes
  (default 10), not one per 15-second refresh.
- A request without the right token (401): a User Authentication failure, at most
  ``FAILURES_PER_MINUTE`` (10) per address a minute, so that guessing cannot fill the
  database; the rest are counted in one log line.

The database work runs in the server's thread pool, never on its event loop, and never
raises into a request: a failure to record is logged.
"""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session, sessionmaker

from ct_triage import audit
from ct_triage.settings import Settings
from db.session import session_scope

log = logging.getLogger("ct_triage.dashboard.audit")

FAILURES_PER_MINUTE = 10


class HttpAudit:
    def __init__(self, settings: Settings, session_factory: sessionmaker[Session]):
        self.settings = settings
        self.session_factory = session_factory
        self._failures = audit.PerKeyRate(FAILURES_PER_MINUTE)

    def read(self, client_address: str | None, path: str, token: str) -> None:
        try:
            with session_scope(self.session_factory) as session:
                audit.record_http_read(session, self.settings, client_address=client_address, path=path,
                                       token=token)
        except Exception:
            log.exception("audit: page read could not be recorded")

    def failure(self, client_address: str | None, presented: str | None, why: str) -> None:
        if not self._failures.allow(client_address or "?"):
            return
        try:
            message = audit.authentication_failure(self.settings, user_id=audit.token_fingerprint(presented),
                                                   address=client_address, mechanism="HTTP token", reason=why)
            audit.record_now(self.session_factory, message)
        except Exception:
            log.exception("audit: authentication failure could not be recorded")
