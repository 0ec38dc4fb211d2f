"""The state machines (db/states.py) and the repository's job and delivery changes, on a
real database (SQLite and PostgreSQL), plus the retry backoff and the publish helper."""

from __future__ import annotations

from datetime import timedelta

import pytest

from ct_triage.contract import DELIVER_OUTPUTS, SCORE_STUDY, EmbeddedPublisher, publish_in_order
from db import repository
from db.models import Delivery, Job, Series
from db.repository import InstanceRecord, InvalidStateChange
from db.states import (
    ALLOWED,
    DELIVERY_ALLOWED,
    JOB_ALLOWED,
    DeliveryState,
    JobState,
    SeriesState,
    can_transition,
)
from db.types import utcnow
from worker.retry import BACKOFF_MAX_S, backoff_s

# -- the tables ----------------------------------------------------------------------------------


@pytest.mark.parametrize("enum, table", [(SeriesState, ALLOWED), (JobState, JOB_ALLOWED),
                                         (DeliveryState, DELIVERY_ALLOWED)])
def test_every_state_has_a_row_and_targets_of_its_own_kind(enum, table):
    assert set(table) == set(enum)
    for targets in table.values():
        assert all(isinstance(t, enum) for t in targets)


def test_job_transitions():
    assert can_transition("queued", JobState.RUNNING)
    assert can_transition(JobState.RUNNING, JobState.DONE)
    assert can_transition(JobState.RUNNING, JobState.QUEUED)  # abandoned, requeued
    assert not can_transition(JobState.QUEUED, JobState.DONE)
    assert not any(can_transition(JobState.DONE, t) for t in JobState)


def test_delivery_transitions():
    D = DeliveryState
    assert can_transition("pending", D.SENDING) and can_transition(D.RETRYING, D.SENDING)
    assert {t for t in D if can_transition(D.SENDING, t)} == {D.DELIVERED, D.RETRYING, D.FAILED}
    assert not can_transition(D.PENDING, D.DELIVERED)
    for final in (D.DELIVERED, D.FAILED):
        assert not any(can_transition(final, t) for t in D)


def test_series_table_unchanged_by_the_other_kinds():
    assert can_transition("receiving", SeriesState.STABLE)
    assert not can_transition(SeriesState.NOT_APPLICABLE, SeriesState.QUEUED)
    with pytest.raises(ValueError):
        can_transition("sending", SeriesState.STABLE)  # a delivery state is not a series state


# -- backoff --------------------------------------------------------------------------------------


def test_backoff_doubles_from_the_base_and_is_capped():
    assert [backoff_s(n) for n in (1, 2, 3, 4)] == [5.0, 10.0, 20.0, 40.0]
    assert backoff_s(0) == backoff_s(1) == 5.0
    assert [backoff_s(n, 1.0) for n in (1, 2, 3)] == [1.0, 2.0, 4.0]
    assert backoff_s(30) == BACKOFF_MAX_S == 600.0


# -- the publish helper -------------------------------------------------------------------------


class FlakyPublisher(EmbeddedPublisher):
    def __init__(self, fail_on: int):
        self.fail_on = fail_on
        self.sent: list[tuple[str, int]] = []

    def publish(self, task_name: str, job_id: int) -> None:
        if job_id == self.fail_on:
            raise ConnectionError("broker down")
        super().publish(task_name, job_id)
        self.sent.append((task_name, job_id))


def test_publish_in_order_marks_each_and_stops_at_the_first_failure(caplog):
    marked: list[int] = []
    publisher = FlakyPublisher(fail_on=3)
    assert publish_in_order(publisher, DELIVER_OUTPUTS, [1, 2, 3, 4], marked.append) == [1, 2]
    assert marked == [1, 2] and publisher.sent == [(DELIVER_OUTPUTS, 1), (DELIVER_OUTPUTS, 2)]
    assert "publishing delivery 3 failed, will retry: broker down" in caplog.text
    assert publish_in_order(FlakyPublisher(fail_on=0), SCORE_STUDY, [7], marked.append) == [7]


# -- jobs and deliveries in a real database -------------------------------------------------------


@pytest.fixture
def session_factory(database_url, tmp_path):
    from ct_triage.runtime import open_database
    from tests.conftest import make_settings

    engine, factory = open_database(make_settings(tmp_path, database_url))
    yield factory
    engine.dispose()


def _record(uid: str) -> InstanceRecord:
    return InstanceRecord(sop_instance_uid=f"1.2.3.{uid}.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                          study_instance_uid=f"1.2.3.{uid}", series_instance_uid=f"1.2.3.{uid}.0",
                          transfer_syntax_uid="1.2.840.10008.1.2.1", path=f"{uid}.dcm", size_bytes=1,
                          patient_id="P1", images_in_acquisition=1, modality="CT")


def _queued_job(factory, uid: str = "9") -> int:
    with factory() as session, session.begin():
        repository.record_instance(session, _record(uid))
        (job_id,) = repository.create_due_jobs(session, SCORE_STUDY, stable_age_s=0)
    return job_id


def _running_job(session, factory) -> Job:
    """A job claimed by host:1 (in ``session``)."""
    job_id = _queued_job(factory)
    assert repository.claim_job(session, job_id, "host:1")
    return session.get(Job, job_id)


def test_a_job_is_claimed_once_and_taken_over_only_from_a_gone_holder(session_factory):
    job_id = _queued_job(session_factory)
    now = utcnow()
    with session_factory() as session, session.begin():
        assert repository.claim_job(session, job_id, "host:1", now)
        assert not repository.claim_job(session, job_id, "host:2", now)  # a duplicate message
    with session_factory() as session, session.begin():
        assert repository.take_over_job(session, job_id, "host:2", lambda since, holder: False, now) is None
        seen = []
        holder = repository.take_over_job(session, job_id, "host:2",
                                          lambda since, who: seen.append((since, who)) or True, now)
        assert holder == "host:1" and seen[0][1] == "host:1"
    with session_factory() as session, session.begin():
        job = session.get(Job, job_id)
        assert (job.state, job.worker, job.attempts) == ("running", "host:2", 2)
        repository.finish_job(session, job, now, error=None)
    with session_factory() as session, session.begin():
        job = session.get(Job, job_id)
        assert job.state == "done" and job.finished_at is not None
        assert repository.take_over_job(session, job_id, "host:3", lambda *_: True, now) is None
        with pytest.raises(InvalidStateChange, match=f"job {job_id}: done -> done"):
            repository.finish_job(session, job, now)


def test_abandoned_jobs_are_requeued(session_factory):
    job_id = _queued_job(session_factory)
    with session_factory() as session, session.begin():
        assert repository.next_queued_job_id(session, SCORE_STUDY) == job_id
        repository.claim_job(session, job_id, "host:1")
        assert repository.next_queued_job_id(session, SCORE_STUDY) is None
    with session_factory() as session, session.begin():
        assert repository.requeue_abandoned_jobs(session, SCORE_STUDY) == [job_id]
    with session_factory() as session, session.begin():
        assert session.get(Job, job_id).state == "queued"


def test_delivery_life_cycle(session_factory):
    now = utcnow()
    with session_factory() as session, session.begin():
        job = _running_job(session, session_factory)
        series = session.get(Series, job.study.series[0].id)
        repository.transition(session, series, SeriesState.SCORING, None, now)
        repository.transition(session, series, SeriesState.SCORED, None, now)
        result = repository.add_result(session, job, series.id, {"status": "scored", "priority": "LOW",
                                                                 "result_json": "{}", "scored_at": now})
        repository.finish_job(session, job, now)
        first, second = repository.add_deliveries(session, result, ["A@h:1", "B@h:2"], now)
        assert repository.result_exists(session, job.study_fk, job.study_version)
    with session_factory() as session, session.begin():
        assert repository.due_delivery_ids(session, now) == [first, second]
        assert repository.claim_delivery(session, first, "host:1", lambda *_: False, now) == ""
        assert repository.claim_delivery(session, first, "host:2", lambda *_: False, now) is None
        assert repository.due_delivery_ids(session, now) == [second]
        repository.start_delivery(session, first, now)
        assert session.get(Series, series.id).state == "delivering"
        repository.finish_delivery(session, first, DeliveryState.RETRYING, "PACS down", 0,
                                   retry_delay_s=lambda attempts: 60.0 * attempts, now=now)
    with session_factory() as session, session.begin():
        delivery = session.get(Delivery, first)
        assert (delivery.state, delivery.worker, delivery.attempts) == ("retrying", None, 1)
        assert delivery.next_attempt_at.replace(tzinfo=None) == (now + timedelta(seconds=60)).replace(tzinfo=None)
        assert repository.due_delivery_ids(session, now) == [second]
        assert repository.due_delivery_ids(session, now + timedelta(seconds=61)) == [first, second]
        with pytest.raises(InvalidStateChange, match="retrying -> delivered"):
            repository.finish_delivery(session, first, DeliveryState.DELIVERED, None, 3, now=now)
    later = now + timedelta(seconds=61)
    with session_factory() as session, session.begin():
        for delivery_id in (first, second):
            assert repository.claim_delivery(session, delivery_id, "host:1", lambda *_: False, later) == ""
            repository.finish_delivery(session, delivery_id, DeliveryState.DELIVERED, None, 3, now=later)
    with session_factory() as session, session.begin():
        assert session.get(Series, series.id).state == "delivered"
        assert session.get(Delivery, first).result.delivered_at is not None
        assert repository.due_delivery_ids(session, later) == []


def test_a_sending_delivery_is_taken_over_only_from_a_gone_holder(session_factory):
    now = utcnow()
    with session_factory() as session, session.begin():
        job = _running_job(session, session_factory)
        result = repository.add_result(session, job, None, {"status": "failed", "priority": "MEDIUM",
                                                            "result_json": "{}", "scored_at": now})
        (delivery_id,) = repository.add_deliveries(session, result, ["A@h:1"], now)
        assert repository.claim_delivery(session, delivery_id, "host:1", lambda *_: False, now) == ""
    with session_factory() as session, session.begin():
        assert repository.claim_delivery(session, delivery_id, "host:2", lambda *_: False, now) is None
        assert repository.claim_delivery(session, delivery_id, "host:2", lambda *_: True, now) == "host:1"
        delivery = session.get(Delivery, delivery_id)
        assert (delivery.state, delivery.worker, delivery.attempts) == ("sending", "host:2", 2)


def test_the_node_publishes_prior_searches_the_worker_left_unpublished_or_the_broker_lost(session_factory):
    """A prior search committed but not handed to the broker (publish failed) is published by the
    node's sweep after the grace period; one published long ago and never started is published again."""
    from ct_triage.contract import FIND_PRIORS
    from db import followup
    from db.followup import PriorSearch
    from db.models import Study
    from dicom_node.completeness import CompletenessTracker

    _queued_job(session_factory, "31")
    long_ago = utcnow() - timedelta(minutes=20)
    with session_factory() as session, session.begin():
        study = session.query(Study).one()
        fresh, old = (followup.add_searches(session, study, ["PACS@pacs:104"])[0],
                      followup.add_searches(session, study, ["OLD@pacs:104"], now=long_ago)[0])
        lost = followup.add_searches(session, study, ["LOST@pacs:104"], now=long_ago)[0]
        session.get(PriorSearch, lost).published_at = long_ago
    publisher = FlakyPublisher(fail_on=0)
    tracker = CompletenessTracker(session_factory, publisher, stable_age_s=15, max_receive_s=3600,
                                  republish_after_s=600)
    tracker.publish_pending()
    assert (FIND_PRIORS, old) in publisher.sent and (FIND_PRIORS, fresh) not in publisher.sent  # 30 s grace
    assert (FIND_PRIORS, lost) not in publisher.sent  # handed over already
    tracker.recover_lost_work()
    tracker.publish_pending()
    assert (FIND_PRIORS, lost) in publisher.sent
    with session_factory() as session:
        assert session.get(PriorSearch, old).published_at is not None
        assert session.get(PriorSearch, lost).published_at > long_ago


def test_concurrent_version_bumps_are_not_lost_and_a_stale_comparison_gives_way(postgres_url, tmp_path):
    """PostgreSQL, READ COMMITTED: a late instance and a comparison-only version bump the same
    study. An ORM ``version += 1`` from a stale read would write 2 twice; each bump must count,
    and a comparison made for version 1 must not become the current version once a late
    instance made version 2."""
    from ct_triage.runtime import open_database
    from db.followup import add_comparison_version
    from db.models import Result, Study, bump_study_version
    from tests.conftest import make_settings

    engine, factory = open_database(make_settings(tmp_path, postgres_url))
    try:
        _queued_job(factory, "41")
        with factory() as session, session.begin():
            study = session.query(Study).one()
            session.add(Result(study_fk=study.id, version=1, status="scored", priority="LOW", result_json="{}"))
        stale, fresh = factory(), factory()
        stale.begin()
        stale_study = stale.query(Study).one()  # read at version 1 and kept
        assert stale_study.version == 1
        with fresh.begin():  # a late instance: version 2, committed
            assert bump_study_version(fresh, fresh.query(Study).one())
        latest = stale.query(Result).one()
        assert add_comparison_version(stale, stale_study, latest, {"result_json": "{}"}) is None
        assert bump_study_version(stale, stale_study) and stale_study.version == 3
        stale.commit()
        stale.close()
        fresh.close()
        with factory() as session:
            assert session.query(Study).one().version == 3
            assert [r.version for r in session.query(Result).all()] == [1]
    finally:
        engine.dispose()


def test_a_job_is_handed_back_only_by_the_worker_holding_it(session_factory):
    job_id = _queued_job(session_factory, "51")
    with session_factory() as session, session.begin():
        assert repository.claim_job(session, job_id, "host:1")
        repository.mark_published(session, [job_id])
    with session_factory() as session, session.begin():
        assert not repository.release_job(session, job_id, "host:2")  # not its job
        assert repository.release_job(session, job_id, "host:1")
    with session_factory() as session:
        job = session.get(Job, job_id)
        assert (job.state, job.worker, job.published_at) == ("queued", None, None)  # the node publishes it again
        assert repository.unpublished_job_ids(session) == [job_id]


def test_a_reopening_committed_while_jobs_are_created_is_not_overwritten(postgres_url, tmp_path):
    """PostgreSQL, READ COMMITTED: the indexer reopens a settled series (a late instance) while
    the completeness tracker creates the study's job. The tracker must see the reopened series,
    not queue the states it read before the indexer's commit: the new version must get a job.
    (The fault suite's PostgreSQL restart found this: one study never scored at its last version.)"""
    import dataclasses
    import threading

    from ct_triage.runtime import open_database
    from db.models import Study
    from tests.conftest import make_settings

    engine, factory = open_database(make_settings(tmp_path, postgres_url))
    try:
        with factory() as session, session.begin():
            repository.record_instance(session, _record("71"))  # stable at once (ImagesInAcquisition 1)
        indexer = factory()
        indexer.begin()
        late = dataclasses.replace(_record("71"), sop_instance_uid="1.2.3.71.2", path="71-2.dcm")
        assert repository.record_instance(indexer, late).reopened
        indexer.flush()  # the reopening is written, not committed: its rows are locked
        created: list[list[int]] = []

        def tracker() -> None:
            with factory() as session, session.begin():
                created.append(repository.create_due_jobs(session, SCORE_STUDY, stable_age_s=0))

        thread = threading.Thread(target=tracker)
        thread.start()
        thread.join(0.5)  # the tracker has read the stable series (committed) and now waits
        indexer.commit()
        indexer.close()
        thread.join(10)
        assert not thread.is_alive()
        with factory() as session, session.begin():
            repository.create_due_jobs(session, SCORE_STUDY, stable_age_s=0)  # the next tick
        with factory() as session:
            study = session.query(Study).one()
            series = session.query(Series).one()
            versions = sorted(job.study_version for job in session.query(Job).all())
            assert (study.version, series.version) == (2, 2)
            assert versions[-1] == 2, f"no job for the reopened version: jobs {versions}, series {series.state}"
            assert series.state == "queued"
    finally:
        engine.dispose()


def test_a_new_series_after_the_study_was_queued_opens_a_new_version(session_factory):
    """A study version with a job is frozen: a series that arrives after it (a reformat sent
    minutes later) opens the next version and is scored with it, not left queued under a job
    that has already read the study's files."""
    import dataclasses

    from db.models import Study

    first_job = _queued_job(session_factory, "81")
    later = dataclasses.replace(_record("81"), sop_instance_uid="1.2.3.81.2.1", series_instance_uid="1.2.3.81.2",
                                path="81-2.dcm")
    with session_factory() as session, session.begin():
        outcome = repository.record_instance(session, later)
        assert outcome.created_series and outcome.opened_study_version == 2
        (second_job,) = repository.create_due_jobs(session, SCORE_STUDY, stable_age_s=0)
    with session_factory() as session:
        assert session.query(Study).one().version == 2
        assert [(job.id, job.study_version) for job in session.query(Job).order_by(Job.id)] == \
            [(first_job, 1), (second_job, 2)]
        assert {s.series_instance_uid: s.state for s in session.query(Series)} == \
            {"1.2.3.81.0": "queued", "1.2.3.81.2": "queued"}
    with session_factory() as session, session.begin():  # while version 2's job waits: version 3
        third = dataclasses.replace(later, sop_instance_uid="1.2.3.81.3.1", series_instance_uid="1.2.3.81.3")
        assert repository.record_instance(session, third).opened_study_version == 3
