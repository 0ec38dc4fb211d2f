"""The Celery app: thin tasks over the plain bodies in ``worker.tasks``.

One base task class owns what every task needs: a per-process database session
factory, retry classification (only TransientError is retried, with exponential
backoff), and a log line with the outcome and duration. Tasks take a job ID, are
idempotent (the body claims the job atomically) and so run ``acks_late`` with
``reject_on_worker_lost``: a worker killed mid-task gets its message redelivered.

Delivery order (issue 9): a delivery message is a turn at its destination, not an
order to send that one delivery now. ``deliver.deliver_in_order`` first sends the due
deliveries to the same destination that rank before it (HIGH, MEDIUM, LOW, then the
oldest; claimed atomically in the database, the one truth), then its own; a message
that arrives before its delivery is due, or whose destination failed, is retried at
the time the database holds (``deliver.DeliveryDeferred``). So when deliveries queue up,
during a PACS outage above all, HIGH results reach the PACS first whichever message
the broker hands out first. Broker-side priorities (redis ``priority_steps`` with
``queue_order_strategy``) were not used: they reorder only messages still waiting in
the broker, not retries a worker holds until their countdown, nor work already
claimed, and they would make the order depend on the transport.
"""

from __future__ import annotations

import logging
import os
import time

from celery import Celery, Task

from ct_triage import contract
from ct_triage.errors import TransientError
from ct_triage.settings import Settings
from worker.retry import backoff_s
from worker.tasks import deliver, score
from worker.tasks.context import WorkerContext

log = logging.getLogger("ct_triage.worker.celery")


def make_celery(settings: Settings) -> Celery:
    app = Celery("ct_triage", broker=settings.broker_url or "memory://")
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_routes={name: {"queue": queue} for name, queue in contract.TASK_QUEUES.items()},
        task_default_queue=contract.QUEUE_IO,
        broker_transport_options={"visibility_timeout": contract.VISIBILITY_TIMEOUT_S},
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


settings = Settings.from_env()
app = make_celery(settings)


class JobTask(Task):
    acks_late = True
    reject_on_worker_lost = True
    max_retries = None  # transient failures (PACS down) retry with capped backoff until they succeed
    _ctx = None
    _ctx_pid = None

    @property
    def ctx(self):
        # Engines must not cross a fork: build the context in the process that runs tasks.
        if self._ctx is None or self._ctx_pid != os.getpid():
            from ct_triage.runtime import open_database

            _, session_factory = open_database(settings, upgrade=False)
            JobTask._ctx = WorkerContext(settings, session_factory, contract.make_publisher(settings.broker_url))
            JobTask._ctx_pid = os.getpid()
        return self._ctx

    def run_body(self, body, job_id: int):
        started = time.monotonic()
        from sqlalchemy.exc import InterfaceError, OperationalError

        try:
            outcome = body(self.ctx, job_id)
        except (OperationalError, InterfaceError) as exc:  # database unreachable: worth retrying
            delay = backoff_s(self.request.retries + 1)
            log.warning("%s %d: database unavailable, retry in %d s: %s", self.name, job_id, delay,
                        str(exc).splitlines()[0][:200])
            raise self.retry(exc=exc, countdown=delay) from exc
        except deliver.DeliveryDeferred as exc:  # its delivery's next attempt, as the database says
            log.info("%s %d: %s", self.name, job_id, exc)
            raise self.retry(exc=exc, countdown=exc.delay_s) from exc
        except TransientError as exc:
            # One second past the body's own next-attempt time, so the retry finds it due.
            delay = backoff_s(self.request.retries + 1, settings.retry_base_s, settings.retry_max_s) + 1
            log.warning("%s job %d: transient failure, retry in %d s: %s", self.name, job_id, delay, exc)
            raise self.retry(exc=exc, countdown=delay) from exc
        log.info("%s job %d: %s in %.2f s", self.name, job_id, outcome, time.monotonic() - started)
        return outcome


@app.task(name=contract.SCORE_STUDY, base=JobTask, bind=True)
def score_study_task(self: JobTask, job_id: int):
    return self.run_body(score.score_study, job_id)


@app.task(name=contract.DELIVER_OUTPUTS, base=JobTask, bind=True)
def deliver_outputs_task(self: JobTask, delivery_id: int):
    return self.run_body(deliver.deliver_in_order, delivery_id)  # HIGH first (issue 9)


@app.task(name=contract.FIND_PRIORS, base=JobTask, bind=True)
def find_priors_task(self: JobTask, search_id: int):
    from worker.followup import search

    return self.run_body(search.find_priors, search_id)
