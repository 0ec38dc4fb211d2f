"""The audit trail: IHE ATNA / DICOM PS3.15 A.5 audit messages, stored first, then sent as syslog.

What
    Build a message with one function per event (:mod:`ct_triage.audit.events`), record it
    in the database (:func:`record` in the caller's transaction, :func:`record_now` in its
    own; page/API reads through :func:`record_http_read`, aggregated per client), and let
    one background loop call :func:`send_pending_audit` to hand the stored messages to the
    audit repository (``CT_TRIAGE_AUDIT_REPOSITORY``: ``tls://host:port`` or
    ``udp://host:port``; empty keeps the trail in the database only).
    :func:`recent_audit_events` and :func:`format_audit_table` list the trail.

Why a package of its own
    The node, the workers and the dashboard all audit; this imports ``db`` and
    ``ct_triage.settings`` only, never ``dicom_node``, ``worker`` or ``dashboard``.

Thresholds are in each module's docstring (message size and text limits in ``message``,
retries and timeouts in ``syslog``, the read aggregation in ``store``). The schema the
messages follow is ``schema/audit-message.rnc`` (PS3.15 A.5.1) with its RELAX NG XML form
``schema/audit-message.rng``; see docs/audit.md.
"""

from __future__ import annotations

from pathlib import Path

from ct_triage.audit.events import (
    application_activity,
    association_refused,
    authentication_failure,
    hl7_sent,
    http_read,
    instances_transferred,
    query,
    token_fingerprint,
    workitem_changed,
)
from ct_triage.audit.message import AuditEventError, AuditMessage
from ct_triage.audit.store import PerKeyRate, format_audit_table, record, record_http_read, record_now
from ct_triage.audit.syslog import send_pending_audit
from db.audit import audit_backlog, recent_audit_events

SCHEMA_RNC = Path(__file__).resolve().parent / "schema" / "audit-message.rnc"
SCHEMA_RNG = Path(__file__).resolve().parent / "schema" / "audit-message.rng"

__all__ = [
    "SCHEMA_RNC", "SCHEMA_RNG", "AuditEventError", "AuditMessage", "PerKeyRate", "application_activity",
    "association_refused",
    "audit_backlog", "authentication_failure", "format_audit_table", "hl7_sent", "http_read",
    "instances_transferred", "query", "recent_audit_events", "record", "record_http_read", "record_now",
    "send_pending_audit", "token_fingerprint", "workitem_changed",
]
