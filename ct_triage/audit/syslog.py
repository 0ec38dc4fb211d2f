"""The audit trail's sender: RFC 5424 syslog messages to the audit repository, over TLS or UDP.

What
    :func:`send_pending_audit` is one round of the outbox: when ``CT_TRIAGE_AUDIT_REPOSITORY``
    is set, it claims up to :data:`BATCH` due rows (oldest first), opens one connection,
    sends each message and marks it sent. One background loop calls it
    (``ct_triage.polling.poll_loop``; the node's, beside its other outbox sweeps).
    :func:`syslog_frame` builds one RFC 5424 message, :func:`octet_frame` its RFC 5425
    octet-counting framing (``LEN SP MSG``) for TLS; over UDP (RFC 5426) one datagram is one
    message, unframed.

The message (PS3.15 A.6 / A.7, IHE ITI-20)
    ``<PRI>1 TIMESTAMP HOSTNAME ct-triage PROCID DICOM+RFC3881 - BOM XML``: facility 10
    (security/authorization), severity 5 (notice) for a successful event and 4 (warning)
    for a failed one, so PRI is 85 or 84; TIMESTAMP is the event's time (UTC, milliseconds);
    no structured data; MSG is the audit message's XML in UTF-8 after a byte order mark
    (RFC 5424 MSG-UTF8).

Why an outbox, and what "sent" means
    Messages are in the database before this runs (``ct_triage.audit.record``), so a down
    repository loses nothing: the rows wait. TLS: "sent" means the whole batch was written
    and the repository then kept the connection open, without an alert, for
    :data:`PROBE_S` (0.5 s; RFC 5425 has no acknowledgement, and TLS 1.3 reports a refused
    client certificate only after our first writes); any failure in the round sends the
    whole batch again, so the repository may see a duplicate, never a gap. UDP: "sent" means
    handed to the network; a down UDP repository cannot be detected (RFC 5426) - use TLS
    where the trail must be complete.

Failures, retries and thresholds
    - Connecting (TLS handshake included) and each write time out after
      :data:`TIMEOUT_S` (10 s).
    - A failure to connect or send never raises to the caller: one WARNING line (the
      repository and the error, never message content), the message being sent and the
      rest of the claimed batch keep their rows, and every due row waits: the retry
      delay starts at :data:`RETRY_BASE_S` (5 s) and doubles with the attempts of the
      oldest row, up to :data:`RETRY_MAX_S` (300 s); so a repository back up is found
      within 5 minutes, and a long outage costs one connection attempt per 5 minutes,
      not one per row.
    - A claim holds a row :data:`LEASE_S` (60 s): a sender that died mid-round leaves it
      due again (sent at least once).
    - A round sends at most :data:`BATCH` (100) messages; the next round follows at the
      loop's interval.
    - Database errors do propagate (the loop logs them and retries the round).

TLS settings: ``CT_TRIAGE_AUDIT_TLS_CA`` (else ``TLS_CA``, else the system's CAs) verifies
the repository, whose certificate must name the host of the URL; ``AUDIT_TLS_CERT`` /
``AUDIT_TLS_KEY`` (else ``TLS_CERT`` / ``TLS_KEY``) is our client certificate (ATNA node
authentication); TLS 1.2 or later.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
from datetime import datetime, timedelta
from typing import Protocol

from sqlalchemy.orm import Session, sessionmaker

from ct_triage.audit.events import host_name
from ct_triage.audit.message import xml_datetime
from ct_triage.settings import AuditRepository, Settings, parse_audit_repository
from ct_triage.text import clean_exception
from db.audit import claim_audit, defer_due_audit, due_audit_ids, mark_audit_failed, mark_audit_sent
from db.session import session_scope
from db.types import utcnow

log = logging.getLogger("ct_triage.audit")

FACILITY = 10  # security/authorization messages
MSGID = "DICOM+RFC3881"
APP_NAME = "ct-triage"
BOM = b"\xef\xbb\xbf"
TIMEOUT_S = 10.0
RETRY_BASE_S = 5.0
RETRY_MAX_S = 300.0
LEASE_S = 60.0
PROBE_S = 0.5
BATCH = 100


def severity(outcome: int) -> int:
    """Syslog severity of an audit message: 5 (notice) on success, 4 (warning) on failure."""
    return 5 if outcome == 0 else 4


def _header_field(value: str, limit: int) -> str:
    """An RFC 5424 header field: printable US-ASCII without spaces, or ``-``."""
    cleaned = "".join(ch for ch in value if 33 <= ord(ch) <= 126)[:limit]
    return cleaned or "-"


def syslog_frame(xml: str, *, outcome: int, when: datetime, hostname: str | None = None,
                 procid: str | None = None) -> bytes:
    """One RFC 5424 SYSLOG-MSG carrying ``xml`` (see the module docstring)."""
    pri = FACILITY * 8 + severity(outcome)
    header = (f"<{pri}>1 {xml_datetime(when)} {_header_field(hostname or host_name(), 255)} {APP_NAME} "
              f"{_header_field(procid or str(os.getpid()), 128)} {MSGID} - ")
    return header.encode("ascii") + BOM + xml.encode("utf-8")


def octet_frame(message: bytes) -> bytes:
    """RFC 5425 / RFC 6587 octet counting: the length in decimal, a space, the message."""
    return str(len(message)).encode("ascii") + b" " + message


class Transport(Protocol):
    def send(self, message: bytes) -> None: ...

    def confirm(self) -> None: ...

    def close(self) -> None: ...


class TlsTransport:
    """One TLS connection to the repository (RFC 5425), octet-counted messages."""

    def __init__(self, repository: AuditRepository, settings: Settings):
        context = ssl.create_default_context(cafile=_path(settings.audit_tls_ca or settings.tls_ca))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        cert = settings.audit_tls_cert or settings.tls_cert
        key = settings.audit_tls_key if settings.audit_tls_cert else settings.tls_key
        if cert is not None:
            context.load_cert_chain(str(cert), _path(key))
        raw = socket.create_connection((repository.host, repository.port), timeout=TIMEOUT_S)
        try:
            self._sock = context.wrap_socket(raw, server_hostname=repository.host)
        except BaseException:
            raw.close()
            raise
        self._sock.settimeout(TIMEOUT_S)

    def send(self, message: bytes) -> None:
        self._sock.sendall(octet_frame(message))

    def confirm(self) -> None:
        """Raise unless the repository kept the connection open for :data:`PROBE_S` after our
        writes. A repository that refused us (TLS 1.3 reports a refused client certificate
        after the handshake, when our writes were already buffered) has sent an alert or
        closed by then; a repository that took the messages says nothing (RFC 5425)."""
        self._sock.settimeout(PROBE_S)
        try:
            data = self._sock.recv(1)
        except TimeoutError:
            return
        raise ConnectionError("the audit repository closed the connection" if not data
                              else "the audit repository sent unexpected data")

    def close(self) -> None:
        self._sock.close()  # no close_notify exchange: syslog receivers (rsyslog) do not answer one


class UdpTransport:
    """RFC 5426: one datagram per message."""

    def __init__(self, repository: AuditRepository):
        info = socket.getaddrinfo(repository.host, repository.port, type=socket.SOCK_DGRAM)[0]
        self._address = info[4]
        self._sock = socket.socket(info[0], socket.SOCK_DGRAM)
        self._sock.settimeout(TIMEOUT_S)

    def send(self, message: bytes) -> None:
        self._sock.sendto(message, self._address)

    def confirm(self) -> None:
        """Nothing to confirm: UDP has no answer."""

    def close(self) -> None:
        self._sock.close()


def open_transport(repository: AuditRepository, settings: Settings) -> Transport:
    if repository.transport == "tls":
        return TlsTransport(repository, settings)
    return UdpTransport(repository)


def retry_delay_s(attempts: int) -> float:
    """:data:`RETRY_BASE_S` doubled per attempt after the first, at most :data:`RETRY_MAX_S`."""
    return min(RETRY_BASE_S * (2 ** max(attempts - 1, 0)), RETRY_MAX_S)


def send_pending_audit(session_factory: sessionmaker[Session], settings: Settings, *,
                       now: datetime | None = None) -> int:
    """One round of the audit outbox (see the module docstring); returns how many messages
    the repository took. Send failures are logged and retried later, never raised."""
    if not settings.audit_repository:
        return 0
    repository = parse_audit_repository(settings.audit_repository)
    now = now or utcnow()
    with session_scope(session_factory) as session:
        ids = due_audit_ids(session, now, BATCH)
        if not ids:
            return 0
        rows = claim_audit(session, ids, LEASE_S, now)
        batch = [(row.id, row.message_xml, row.outcome, row.event_at, row.attempts) for row in rows]
    if not batch:
        return 0
    sent: list[int] = []
    error: str | None = None
    transport: Transport | None = None
    try:
        transport = open_transport(repository, settings)
        for audit_id, xml, outcome, event_at, _attempts in batch:
            transport.send(syslog_frame(xml, outcome=outcome, when=event_at))
            sent.append(audit_id)
        transport.confirm()
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        error = clean_exception(exc, 300)
    finally:
        if transport is not None:
            try:
                transport.close()
            except OSError as exc:
                error = error or clean_exception(exc, 300)
    if error is not None and repository.transport == "tls":
        # No acknowledgement in RFC 5425: a write that "succeeded" before the failure may never
        # have been read (TLS 1.3 reports a refused client certificate only on a later write).
        # The whole batch is sent again; the repository may see a duplicate, never a gap.
        sent = []
    with session_scope(session_factory) as session:
        mark_audit_sent(session, sent, utcnow())
        if error is not None:
            unsent = [item for item in batch if item[0] not in set(sent)]
            delay = retry_delay_s(max(item[4] for item in unsent) if unsent else 1)
            retry_at = utcnow() + timedelta(seconds=delay)
            mark_audit_failed(session, [item[0] for item in unsent], error, retry_at)
            waiting = len(unsent) + defer_due_audit(session, retry_at, error)
            log.warning("audit repository %s: %s; %d audit message(s) kept, next try in %.0f s",
                        repository, error, waiting, delay)
    return len(sent)


def _path(value: object) -> str | None:
    return None if value is None else str(value)
