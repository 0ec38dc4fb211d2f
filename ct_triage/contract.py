"""The task contract between the DICOM node and the workers.

Both sides import this module and nothing of each other: task names, the queue
each task goes to, the payload (an ID, never data), and how a payload is published.
Publishing happens only after the database commit that created the job row, so a
worker never sees an ID it cannot read. In the embedded mode (no broker) the job
row itself is the message: the in-process consumer polls the jobs table.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Protocol

SCORE_STUDY = "ct_triage.score_study"
DELIVER_OUTPUTS = "ct_triage.deliver_outputs"
FIND_PRIORS = "ct_triage.find_priors"  # issue 12: C-FIND/C-MOVE a patient's priors (payload: prior search ID)

QUEUE_GPU = "gpu"
QUEUE_IO = "io"

TASK_QUEUES = {SCORE_STUDY: QUEUE_GPU, DELIVER_OUTPUTS: QUEUE_IO, FIND_PRIORS: QUEUE_IO}

# The SOP classes of the series ct-triage scores: CT Image Storage and Enhanced CT Image
# Storage. The node marks any other series not applicable at its first instance, the
# worker reads only these, series selection accepts only these. (Legacy Converted
# Enhanced CT Image Storage, 1.2.840.10008.5.1.4.1.1.2.2, is not among them.)
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
CT_IMAGE_SOP_CLASSES: tuple[str, ...] = (CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE)

log = logging.getLogger(__name__)


def task_payload(job_id: int) -> list[int]:
    """The positional arguments of every task: the job's primary key."""
    if not isinstance(job_id, int) or isinstance(job_id, bool) or job_id <= 0:
        raise ValueError(f"job_id must be a positive int, got {job_id!r}")
    return [job_id]


class Publisher(Protocol):
    def publish(self, task_name: str, job_id: int) -> None: ...


class EmbeddedPublisher:
    """No broker: the committed job row is picked up by the in-process consumer."""

    def publish(self, task_name: str, job_id: int) -> None:
        task_payload(job_id)
        if task_name not in TASK_QUEUES:
            raise ValueError(f"unknown task_name {task_name!r}")


class CeleryPublisher:
    """Sends tasks by name to a Celery broker (no import of the worker code)."""

    def __init__(self, broker_url: str):
        from celery import Celery  # imported here: the embedded mode needs no celery

        self.app = Celery("ct_triage_publisher", broker=broker_url)
        self.app.conf.broker_connection_retry_on_startup = True
        self.app.conf.broker_transport_options = {"visibility_timeout": VISIBILITY_TIMEOUT_S}

    def publish(self, task_name: str, job_id: int) -> None:
        queue = TASK_QUEUES[task_name]
        self.app.send_task(task_name, args=task_payload(job_id), queue=queue)
        log.debug("published %s job=%s queue=%s", task_name, job_id, queue)


# Redis redelivers an unacknowledged task after this many seconds; it must exceed the
# longest task (scoring a study, delivering to a slow PACS) or tasks run twice.
VISIBILITY_TIMEOUT_S = 3600


def publish_in_order(publisher: Publisher, task_name: str, ids: Iterable[int],
                     mark_published: Callable[[int], None]) -> list[int]:
    """Publish each committed row's ID, then ``mark_published(id)``; returns the IDs published.

    Stops at the first failure (the broker is down: the rest would fail too) with one
    warning; what was not published keeps its published_at empty and is published on
    the node's next sweep.
    """
    what = {SCORE_STUDY: "job", DELIVER_OUTPUTS: "delivery", FIND_PRIORS: "prior search"}.get(task_name, task_name)
    published = []
    for row_id in ids:
        try:
            publisher.publish(task_name, row_id)
        except Exception as exc:  # any broker error: the row stays unpublished, retried next sweep
            log.warning("publishing %s %d failed, will retry: %s", what, row_id, exc)
            break
        mark_published(row_id)
        published.append(row_id)
    return published


def make_publisher(broker_url: str) -> Publisher:
    return CeleryPublisher(broker_url) if broker_url else EmbeddedPublisher()
