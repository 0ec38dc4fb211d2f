"""Decides when series and studies are complete and queues them, exactly once per version.

A series is stable when ImagesInAcquisition is reached (at store time), when it has
been quiet for STABLE_AGE_S, or after MAX_RECEIVE_S (force-complete). A study gets
one job per version when none of its series is still receiving; the job row is
committed first and published to the broker after, and any job left unpublished
(crash, broker down) is published on the next tick, so start-up recovers by itself.
With a broker, work it accepted but lost (still queued REPUBLISH_AFTER_S after it
was published) is published again; the check runs at most once a minute
(``LOST_WORK_CHECK_S``).
"""

from __future__ import annotations

import logging
import time

from sqlalchemy.orm import Session, sessionmaker

from ct_triage.contract import DELIVER_OUTPUTS, FIND_PRIORS, SCORE_STUDY, Publisher, publish_in_order
from ct_triage.polling import Poller
from db import followup, repository
from db.followup import PriorSearch
from db.session import session_scope

log = logging.getLogger("ct_triage.node.completeness")

LOST_WORK_CHECK_S = 60.0


class CompletenessTracker(Poller):
    thread_name = "completeness"
    logger = log
    failed = "completeness check failed"
    db_failed = "completeness check failed (database)"

    def __init__(self, session_factory: sessionmaker[Session], publisher: Publisher, *, stable_age_s: float,
                 max_receive_s: float, poll_interval_s: float = 1.0, busy_study_uids=lambda: frozenset(),
                 republish_after_s: float | None = 600.0):
        super().__init__(self.tick, poll_interval_s)
        self.session_factory = session_factory
        self.republish_after_s = republish_after_s
        self._lost_work_checked = time.monotonic()
        self.publisher = publisher
        self.stable_age_s = stable_age_s
        self.max_receive_s = max_receive_s
        self.busy_study_uids = busy_study_uids

    def tick(self) -> list[int]:
        """One pass: settle quiet series, create due jobs, publish unpublished ones."""
        with session_scope(self.session_factory) as session:
            for series in repository.settle_quiet_series(session, self.stable_age_s, self.max_receive_s):
                log.info("series %s stable (%s), %d instance(s), version %d%s", series.series_instance_uid,
                         series.state_reason, series.instance_count, series.version,
                         f", flags: {'; '.join(series.flags)}" if series.flags else "")
        with session_scope(self.session_factory) as session:
            study_ids = repository.due_study_ids(session)
        busy = self.busy_study_uids()
        for study_id in study_ids:  # one transaction per study: it holds that study's locks only
            with session_scope(self.session_factory) as session:
                job_id = repository.create_due_job(session, SCORE_STUDY, study_id, busy_study_uids=busy,
                                                   stable_age_s=self.stable_age_s)
            if job_id is not None:
                log.info("job %d queued (%s)", job_id, SCORE_STUDY)
        if self.republish_after_s is not None and \
                time.monotonic() - self._lost_work_checked >= min(LOST_WORK_CHECK_S, self.republish_after_s):
            self._lost_work_checked = time.monotonic()
            self.recover_lost_work()
        return self.publish_pending()

    def recover_lost_work(self) -> None:
        """Publish again what the broker seems to have lost (``republish_after_s``; None: no
        broker, as in the embedded mode, where the database is the queue and nothing is lost)."""
        if self.republish_after_s is None:
            return
        with session_scope(self.session_factory) as session:
            jobs, deliveries, searches = repository.unpublish_lost_work(session, self.republish_after_s)
        if jobs or deliveries or searches:
            log.warning("%d job(s), %d delivery(ies) and %d prior search(es) published over %.0f s ago were never "
                        "started: publishing them again (the broker lost them, or the workers are that far "
                        "behind)", jobs, deliveries, searches, self.republish_after_s)

    def publish_pending(self) -> list[int]:
        """Publish unpublished jobs, then deliveries and prior searches the worker could not
        publish after its commit (broker down, worker died in between); returns the job IDs
        published."""
        with session_scope(self.session_factory) as session:
            pending = repository.unpublished_job_ids(session)
        published = publish_in_order(self.publisher, SCORE_STUDY, pending, self._mark_job)
        with session_scope(self.session_factory) as session:
            deliveries = repository.unpublished_delivery_ids(session)
        publish_in_order(self.publisher, DELIVER_OUTPUTS, deliveries, self._mark_delivery)
        with session_scope(self.session_factory) as session:
            searches = repository.unpublished_outbox_ids(session, PriorSearch)
        publish_in_order(self.publisher, FIND_PRIORS, searches, self._mark_search)
        return published

    def _mark_job(self, job_id: int) -> None:
        with session_scope(self.session_factory) as session:
            repository.mark_published(session, [job_id])

    def _mark_search(self, search_id: int) -> None:
        with session_scope(self.session_factory) as session:
            followup.mark_search_published(session, search_id)

    def _mark_delivery(self, delivery_id: int) -> None:
        with session_scope(self.session_factory) as session:
            repository.mark_delivery_published(session, delivery_id)
