"""Task bodies: plain functions of (context, job id), testable without a broker.

The Celery tasks (worker.celery_app) and the embedded consumer (worker.embedded)
both call these. Each body is idempotent: a job is claimed atomically, so a
redelivered message for a job already running or done does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field

from sqlalchemy.orm import Session, sessionmaker

from ct_triage.contract import Publisher
from ct_triage.settings import Settings
from db import repository
from db.models import Job
from db.session import session_scope
from db.types import utcnow

log = logging.getLogger("ct_triage.worker")


@dataclass
class WorkerContext:
    settings: Settings
    session_factory: sessionmaker[Session]
    publisher: Publisher
    worker_name: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")


def score_study(ctx: WorkerContext, job_id: int) -> str:
    """Claim a scoring job; returns what happened ("taken" or "skipped")."""
    with session_scope(ctx.session_factory) as session:
        if not repository.claim_job(session, job_id, ctx.worker_name):
            log.info("job %d already taken or finished: skipped", job_id)
            return "skipped"
    with session_scope(ctx.session_factory) as session:
        job = session.get(Job, job_id)
        job.state = "taken"
        job.finished_at = utcnow()
    log.info("job %d taken by %s", job_id, ctx.worker_name)
    return "taken"
