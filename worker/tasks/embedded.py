"""The embedded queue consumer: `ct-triage serve` with no broker.

The database is the queue: this thread runs the oldest queued scoring job and every
delivery that is due, calling the same task bodies a Celery worker would. Jobs and
deliveries left in flight by a process that died are taken over (see worker.tasks.context).
"""

from __future__ import annotations

import contextlib
import logging
import threading

from ct_triage.contract import SCORE_STUDY
from ct_triage.errors import TransientError
from ct_triage.polling import poll_loop
from db import repository
from db.session import session_scope
from worker.tasks.context import WorkerContext
from worker.tasks.deliver import deliver_outputs
from worker.tasks.score import score_study

log = logging.getLogger("ct_triage.worker.tasks.embedded")


class EmbeddedConsumer:
    def __init__(self, ctx: WorkerContext, poll_interval_s: float = 1.0):
        self.ctx = ctx
        self.poll_interval_s = poll_interval_s
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        # One consumer per database in embedded mode: whatever is still "running" was ours.
        with session_scope(self.ctx.session_factory) as session:
            requeued = repository.requeue_abandoned_jobs(session, SCORE_STUDY)
        if requeued:
            log.warning("requeued %d job(s) left running by a previous process: %s", len(requeued), requeued)
        # Two loops, like the gpu and io queues: deliveries never wait behind a scoring backlog.
        loops = (("embedded-scoring", self.run_scoring), ("embedded-delivery", self.run_deliveries),
                 ("embedded-priors", self.run_prior_searches))
        for name, step in loops:
            thread = threading.Thread(target=self._run, args=(step,), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def request_stop(self) -> None:
        """Take no new work; what runs goes on (see stop)."""
        self._stop.set()
        self._wake.set()

    def stop(self, timeout: float = 120.0) -> None:
        """Stop and wait up to ``timeout`` s in all; a task still running then is left to the
        caller to requeue (repository.release_claims) before the process exits."""
        import time

        self.request_stop()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def wake(self) -> None:
        self._wake.set()

    def run_pending(self) -> int:
        """Run queued scoring jobs, then due deliveries; returns how many ran."""
        return self.run_scoring() + self.run_deliveries() + self.run_prior_searches()

    def run_scoring(self) -> int:
        ran = 0
        while not self._stop.is_set():
            with session_scope(self.ctx.session_factory) as session:
                job_id = repository.next_queued_job_id(session, SCORE_STUDY)
            if job_id is None:
                break
            score_study(self.ctx, job_id)
            ran += 1
        return ran

    def run_deliveries(self) -> int:
        """Due deliveries, the first in order (HIGH first) each time: the list is read again
        after every delivery, so a HIGH result scored meanwhile goes next, not after the
        deliveries that were due before it (seen in bench/pipeline_bench.py burst)."""
        ran = 0
        tried: set[int] = set()  # at most once per pass (one that cannot be claimed stays due)
        while not self._stop.is_set():
            with session_scope(self.ctx.session_factory) as session:
                due = [d for d in repository.due_delivery_ids(session) if d not in tried]
            if not due:
                break
            tried.add(due[0])
            with contextlib.suppress(TransientError):  # recorded with its next attempt time; picked up again when due
                deliver_outputs(self.ctx, due[0])
            ran += 1
        return ran

    def run_prior_searches(self) -> int:
        """Due C-FIND/C-MOVE prior searches (issue 12), in their own loop: a slow PACS never delays results."""
        from worker.followup import search

        return search.run_due_searches(self.ctx)

    def _run(self, step) -> None:
        poll_loop(step, stop=self._stop, wake=self._wake, interval_s=self.poll_interval_s, logger=log,
                  failed="embedded consumer: task failed unexpectedly",
                  db_failed="embedded consumer: database error")
