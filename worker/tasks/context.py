"""What every task body shares: the worker context and the claim of a row.

Each body claims its row (a job, a delivery) atomically, so a duplicate message does
nothing, while a message redelivered because its worker died (SIGKILL, lost node) may
reclaim the row: a claim whose holder is a process of this host that no longer runs is
taken over at once, one held on another host after ``CLAIM_LEASE_S`` (30 min, longer
than any scoring or delivery takes).
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy.orm import Session, sessionmaker

from ct_triage.contract import Publisher
from ct_triage.settings import Settings
from db import repository
from db.session import session_scope
from db.types import utcnow
from worker.scoring.base import Scorer

log = logging.getLogger("ct_triage.worker")

# A claimed row whose worker is gone is taken over after this long (another host)
# or at once (same host, process no longer alive).
CLAIM_LEASE_S = 1800


@dataclass
class WorkerContext:
    settings: Settings
    session_factory: sessionmaker[Session]
    publisher: Publisher
    worker_name: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    scorer: Scorer | None = None  # built once per process by the pipeline when None


def holder_is_dead(holder: str | None) -> bool:
    """True when ``holder`` ("host:pid") is a process of this host that no longer runs."""
    if not holder or ":" not in holder:
        return False
    host, _, pid = holder.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return int(pid) != os.getpid() and _is_zombie(int(pid))


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return False


def _reclaimable(started_at: datetime | None, holder: str | None, now: datetime) -> bool:
    stale = started_at is not None and started_at < now - timedelta(seconds=CLAIM_LEASE_S)
    return stale or holder_is_dead(holder)


def may_take(now: datetime):
    return lambda since, holder: _reclaimable(since, holder, now)


def claim_job(ctx: WorkerContext, job_id: int) -> bool:
    now = utcnow()
    with session_scope(ctx.session_factory) as session:
        if repository.claim_job(session, job_id, ctx.worker_name, now):
            return True
        holder = repository.take_over_job(session, job_id, ctx.worker_name, may_take(now), now)
        if holder is not None:
            log.warning("job %d: taking over from %s, which is gone", job_id, holder or None)
        return holder is not None



def claim_delivery(ctx: WorkerContext, delivery_id: int, now: datetime) -> bool:
    with session_scope(ctx.session_factory) as session:
        holder = repository.claim_delivery(session, delivery_id, ctx.worker_name, may_take(now), now)
    if holder:
        log.warning("delivery %d: taking over from %s, which is gone", delivery_id, holder)
    return holder is not None

