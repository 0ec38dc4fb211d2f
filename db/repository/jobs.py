"""Scoring jobs: queued for a settled study version, published after the commit, claimed by one
worker (``queued`` -> ``running`` -> ``done``; :data:`db.states.JOB_ALLOWED`), taken over from a
dead holder, handed back on shutdown; and the files a job reads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from db.models import (
    Instance,
    Job,
    Series,
    Study,
)
from db.repository.base import rowcount
from db.repository.ingest import lock_study_series, transition
from db.states import (
    InvalidStateChange,
    JobState,
    SeriesState,
    can_transition,
)
from db.types import utcnow


def create_due_jobs(session: Session, task_name: str, *, busy_study_uids: frozenset[str] = frozenset(),
                    stable_age_s: float = 15.0, now: datetime | None = None) -> list[int]:
    """:func:`create_due_job` for every :func:`due_study_ids`, in the caller's one transaction
    (the node's tracker gives each study its own: see :func:`create_due_job`)."""
    created = (create_due_job(session, task_name, study_id, busy_study_uids=busy_study_uids,
                              stable_age_s=stable_age_s, now=now) for study_id in due_study_ids(session))
    return [job_id for job_id in created if job_id is not None]


def due_study_ids(session: Session) -> list[int]:
    """Studies with a stable series: candidates for :func:`create_due_job`."""
    return list(session.scalars(select(Series.study_fk).where(Series.state == SeriesState.STABLE.value)
                                .distinct()).all())


def create_due_job(session: Session, task_name: str, study_id: int, *,
                   busy_study_uids: frozenset[str] = frozenset(), stable_age_s: float = 15.0,
                   now: datetime | None = None) -> int | None:
    """The job of the study's current version once its series have all settled and some are
    stable (its id when created here, else None); its stable series move to ``queued``.

    A study that an open association is still sending is left alone until that
    association ends or the study has been quiet for ``stable_age_s``, so a second
    series that follows a complete first one lands in the same version.

    The study and its series are locked (:func:`_lock_study`) until the transaction ends:
    commit after each study, as the tracker does, so that it never holds one study while
    waiting for another that an indexer batch holds (a deadlock PostgreSQL would break by
    failing one of them).
    """
    now = now or utcnow()
    study, series_rows = _lock_study(session, study_id)
    states = {s.state for s in series_rows}
    if SeriesState.RECEIVING.value in states or SeriesState.STABLE.value not in states:
        return None
    quiet = study.last_received_at <= now - timedelta(seconds=stable_age_s)
    if study.study_instance_uid in busy_study_uids and not quiet:
        return None
    job = session.scalar(select(Job).where(Job.task_name == task_name, Job.study_fk == study.id,
                                           Job.study_version == study.version))
    created = job is None
    if job is None:
        job = Job(task_name=task_name, study_fk=study.id, study_version=study.version, state=JobState.QUEUED.value,
                  attempts=0, created_at=now)
        session.add(job)
        session.flush()
    for series in series_rows:
        if series.state == SeriesState.STABLE.value:
            transition(session, series, SeriesState.QUEUED, f"job {job.id} (study version {study.version})", now)
    return job.id if created else None


def _lock_study(session: Session, study_id: int) -> tuple[Study, list[Series]]:
    """The study and its series, re-read and locked for this transaction (PostgreSQL).

    The indexer may, at the same moment, reopen one of the series (a late instance: version
    + 1) or add a new series. Read without the locks, the series states and the version would
    be those from before its commit, and queueing them would overwrite the reopened series'
    ``receiving`` with ``queued``: that version would never be scored. Study first, then the
    series, the order in which the indexer and the worker take them. ``FOR NO KEY UPDATE``,
    the lock an UPDATE takes: it waits for the indexer's writes but not for the key-share
    locks of foreign-key checks (a worker inserting this study's result), which ``FOR
    UPDATE`` would, a deadlock with a worker holding its series' key-share lock.
    """
    study = session.scalars(select(Study).where(Study.id == study_id).with_for_update(key_share=True)
                            .execution_options(populate_existing=True)).one()
    return study, lock_study_series(session, study_id)


def unpublished_job_ids(session: Session) -> list[int]:
    return list(session.scalars(select(Job.id).where(Job.published_at.is_(None), Job.state == JobState.QUEUED.value)
                                .order_by(Job.id)).all())


def mark_published(session: Session, job_ids: list[int], now: datetime | None = None) -> None:
    if job_ids:
        session.execute(update(Job).where(Job.id.in_(job_ids)).values(published_at=now or utcnow()))


def _set_job_state(job: Job, target: JobState) -> None:
    if not can_transition(job.state, target):
        raise InvalidStateChange(f"job {job.id}: {job.state} -> {target.value}")
    job.state = target.value


def claim_job(session: Session, job_id: int, worker: str, now: datetime | None = None) -> bool:
    """Atomically move a queued job to running; False if someone else has it or it is done."""
    result = session.execute(update(Job).where(Job.id == job_id, Job.state == JobState.QUEUED.value)
                             .values(state=JobState.RUNNING.value, worker=worker, started_at=now or utcnow(),
                                     attempts=Job.attempts + 1))
    return rowcount(result) == 1


def take_over_job(session: Session, job_id: int, worker: str,
                  may_take: Callable[[datetime | None, str | None], bool], now: datetime | None = None) -> str | None:
    """A running job whose holder is gone, taken by ``worker``: returns the previous holder,
    None when the job is not running or ``may_take(started_at, holder)`` says no.

    A job already held by ``worker`` (a redelivered message in the same process) counts
    as taken over. The update re-checks the holder, so two workers cannot both win.
    """
    now = now or utcnow()
    job = session.get(Job, job_id)
    if job is None or job.state != JobState.RUNNING.value:
        return None
    holder = job.worker
    if holder != worker and not may_take(job.started_at, holder):
        return None
    taken = session.execute(update(Job).where(Job.id == job_id, Job.state == JobState.RUNNING.value,
                                              Job.worker == holder)
                            .values(worker=worker, started_at=now, attempts=Job.attempts + 1))
    return (holder or "") if rowcount(taken) == 1 else None


def get_job(session: Session, job_id: int) -> Job:
    return session.get_one(Job, job_id)


def finish_job(session: Session, job: Job, now: datetime | None = None, error: str | None = None) -> None:
    """running -> done."""
    _set_job_state(job, JobState.DONE)
    job.finished_at = now or utcnow()
    job.error = error


def next_queued_job_id(session: Session, task_name: str) -> int | None:
    return session.scalar(select(Job.id).where(Job.task_name == task_name, Job.state == JobState.QUEUED.value)
                          .order_by(Job.id).limit(1))


def requeue_abandoned_jobs(session: Session, task_name: str) -> list[int]:
    """Jobs left ``running`` by a process that died (embedded mode, at start)."""
    ids = list(session.scalars(select(Job.id).where(Job.task_name == task_name,
                                                    Job.state == JobState.RUNNING.value)).all())
    if ids:
        session.execute(update(Job).where(Job.id.in_(ids)).values(state=JobState.QUEUED.value, worker=None))
    return ids


def series_files(session: Session, study: Study, storage_dir: Path,
                 sop_class_uids: Iterable[str]) -> dict[str, list[Path]]:
    """{SeriesInstanceUID: stored files in arrival order} of the study's series of those SOP classes."""
    classes = frozenset(sop_class_uids)
    files: dict[str, list[Path]] = {}
    for series in study.series:
        if series.sop_class_uid not in classes:
            continue
        paths = session.scalars(select(Instance.path).where(Instance.series_fk == series.id,
                                                            Instance.deleted_at.is_(None))
                                .order_by(Instance.id)).all()
        files[series.series_instance_uid] = [storage_dir / p for p in paths]
    return files


def instance_paths(session: Session, series_id: int | None) -> dict[str, str]:
    """{SOPInstanceUID: path relative to the storage folder} of one series (none for None)."""
    rows = session.execute(select(Instance.sop_instance_uid, Instance.path)
                           .where(Instance.series_fk == series_id, Instance.deleted_at.is_(None))).all()
    return {uid: path for uid, path in rows}


def release_job(session: Session, job_id: int, worker: str) -> bool:
    """Hand a running job held by ``worker`` back to the queue (unpublished, so the node
    publishes it again); False when it is not running under ``worker`` (finished, taken over)."""
    return rowcount(session.execute(
        update(Job).where(Job.id == job_id, Job.state == JobState.RUNNING.value, Job.worker == worker)
        .values(state=JobState.QUEUED.value, worker=None, published_at=None))) == 1
