"""The embedded queue consumer: `ct-triage serve` with no broker.

The jobs table is the queue: this thread takes the oldest queued job and runs the
same task body a Celery worker would. Jobs left running by a process that died are
put back in the queue at start.
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy.exc import SQLAlchemyError

from ct_triage.contract import SCORE_STUDY
from db import repository
from db.session import session_scope
from worker import jobs

log = logging.getLogger("ct_triage.worker.embedded")

BODIES = {SCORE_STUDY: jobs.score_study}


class EmbeddedConsumer:
    def __init__(self, ctx: jobs.WorkerContext, poll_interval_s: float = 1.0):
        self.ctx = ctx
        self.poll_interval_s = poll_interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        with session_scope(self.ctx.session_factory) as session:
            for task_name in BODIES:
                requeued = repository.requeue_abandoned_jobs(session, task_name)
                if requeued:
                    log.warning("requeued %d job(s) left running by a previous process: %s", len(requeued),
                                requeued)
        self._thread = threading.Thread(target=self._run, name="embedded-consumer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=60)

    def run_pending(self) -> int:
        """Run every queued job now; returns how many ran."""
        ran = 0
        for task_name, body in BODIES.items():
            while not self._stop.is_set():
                with session_scope(self.ctx.session_factory) as session:
                    job_id = repository.next_queued_job_id(session, task_name)
                if job_id is None:
                    break
                body(self.ctx, job_id)
                ran += 1
        return ran

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_pending()
            except SQLAlchemyError as exc:
                log.error("embedded consumer: database error: %s", str(exc).splitlines()[0][:300])
            except Exception:
                log.exception("embedded consumer: job failed unexpectedly")
            self._stop.wait(self.poll_interval_s)
