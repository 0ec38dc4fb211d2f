"""Retry timing shared by everything the worker retries (deliveries, HL7, prior searches).

A failed attempt waits ``base_s`` seconds (``CT_TRIAGE_RETRY_BASE_S``, default 5 s),
doubled per attempt, capped at ``max_s`` (``CT_TRIAGE_RETRY_MAX_S``, default 600 s): a
PACS that is down for an hour is tried about every ten minutes, a short outage is
bridged within seconds.
"""

from __future__ import annotations

BACKOFF_BASE_S = 5.0  # default of CT_TRIAGE_RETRY_BASE_S
BACKOFF_MAX_S = 600.0  # default of CT_TRIAGE_RETRY_MAX_S


def backoff_s(attempts: int, base_s: float = BACKOFF_BASE_S, max_s: float = BACKOFF_MAX_S) -> float:
    """Seconds before retry number ``attempts`` (1, 2, ...): ``base_s`` doubled per attempt,
    at most ``max_s`` (CT_TRIAGE_RETRY_MAX_S, default BACKOFF_MAX_S = 600 s)."""
    return min(max_s, base_s * 2 ** max(0, attempts - 1))

