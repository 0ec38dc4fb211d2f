"""Decides when series and studies are complete and queues them, exactly once per version.

A series is stable when ImagesInAcquisition is reached (at store time), when it has
been quiet for STABLE_AGE_S, or after MAX_RECEIVE_S (force-complete). A study gets
one job per version when none of its series is still receiving; the job row is
committed first and published to the broker after, and any job left unpublished
(crash, broker down) is published on the next tick, so start-up recovers by itself.
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from ct_triage.contract import DELIVER_OUTPUTS, SCORE_STUDY, Publisher, publish_in_order
from db import repository
from db.session import session_scope

log = logging.getLogger("ct_triage.node.completeness")


class CompletenessTracker:
    def __init__(self, session_factory: sessionmaker[Session], publisher: Publisher, *, stable_age_s: float,
                 max_receive_s: float, poll_interval_s: float = 1.0, busy_study_uids=lambda: frozenset()):
        self.session_factory = session_factory
        self.publisher = publisher
        self.stable_age_s = stable_age_s
        self.max_receive_s = max_receive_s
        self.poll_interval_s = poll_interval_s
        self.busy_study_uids = busy_study_uids
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="completeness", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=10)

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except SQLAlchemyError as exc:
                log.error("completeness check failed (database): %s", str(exc).splitlines()[0][:300])
            except Exception:  # keep the tracker alive whatever happens; the next tick retries
                log.exception("completeness check failed")
            self._wake.wait(self.poll_interval_s)
            self._wake.clear()

    def tick(self) -> list[int]:
        """One pass: settle quiet series, create due jobs, publish unpublished ones."""
        with session_scope(self.session_factory) as session:
            for series in repository.settle_quiet_series(session, self.stable_age_s, self.max_receive_s):
                log.info("series %s stable (%s), %d instance(s), version %d%s", series.series_instance_uid,
                         series.state_reason, series.instance_count, series.version,
                         f", flags: {'; '.join(series.flags)}" if series.flags else "")
        with session_scope(self.session_factory) as session:
            created = repository.create_due_jobs(session, SCORE_STUDY, busy_study_uids=self.busy_study_uids(),
                                                 stable_age_s=self.stable_age_s)
        for job_id in created:
            log.info("job %d queued (%s)", job_id, SCORE_STUDY)
        return self.publish_pending()

    def publish_pending(self) -> list[int]:
        """Publish unpublished jobs, then deliveries the worker could not publish after its
        commit (broker down, worker died in between); returns the job IDs published."""
        with session_scope(self.session_factory) as session:
            pending = repository.unpublished_job_ids(session)
        published = publish_in_order(self.publisher, SCORE_STUDY, pending, self._mark_job)
        with session_scope(self.session_factory) as session:
            deliveries = repository.unpublished_delivery_ids(session)
        publish_in_order(self.publisher, DELIVER_OUTPUTS, deliveries, self._mark_delivery)
        return published

    def _mark_job(self, job_id: int) -> None:
        with session_scope(self.session_factory) as session:
            repository.mark_published(session, [job_id])

    def _mark_delivery(self, delivery_id: int) -> None:
        with session_scope(self.session_factory) as session:
            repository.mark_delivery_published(session, delivery_id)
