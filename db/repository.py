"""Every state change and query of series, jobs, results and deliveries.

The node and the workers change rows only through these functions; each checks the
state machine of :mod:`db.states`. Functions take an open ``Session`` and never
commit: the caller owns the transaction (and publishes tasks only after its commit).
Policy that needs more than the database (is a worker process still alive? how long
to wait before a retry?) stays with the caller and is passed in.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import and_, case, delete, func, insert, or_, select, update
from sqlalchemy.orm import Session

from db.followup import PriorSearch
from db.models import (
    Delivery,
    Instance,
    Job,
    OutputFile,
    Patient,
    RejectedInstance,
    Result,
    Series,
    SeriesEvent,
    Study,
    UpsWorkitem,
    bump_study_version,
)
from db.priority import RANK, worklist_key
from db.states import CLAIMABLE_DELIVERY, SETTLED, DeliveryState, JobState, SeriesState, can_transition
from db.types import utcnow


class InvalidStateChange(Exception):
    """A series, job or delivery was asked for a state change its state machine does not allow."""


@dataclass
class InstanceRecord:
    """What the node read from a received instance's header (no pixel data)."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    path: str
    size_bytes: int
    patient_id: str = ""
    issuer_of_patient_id: str = ""
    patient_name: str | None = None
    patient_birth_date: str | None = None
    patient_sex: str | None = None
    accession_number: str | None = None
    study_date: str | None = None
    study_time: str | None = None
    study_description: str | None = None
    modality: str | None = None
    series_number: int | None = None
    series_description: str | None = None
    convolution_kernel: str | None = None
    slice_thickness: float | None = None
    images_in_acquisition: int | None = None
    instance_number: int | None = None
    slice_position: float | None = None
    rows: int | None = None
    columns: int | None = None
    calling_ae_title: str | None = None
    # None when the series is a scoring candidate; else why it never will be.
    not_applicable_reason: str | None = None


@dataclass
class StoreOutcome:
    duplicate: bool
    series_id: int
    series_state: str
    series_version: int
    created_series: bool = False
    reopened: bool = False
    became_stable: bool = False


def transition(session: Session, series: Series, target: SeriesState, reason: str | None = None,
               now: datetime | None = None) -> None:
    """Move a series to ``target``, stamping the state's column and the event log."""
    now = now or utcnow()
    current = SeriesState(series.state)
    if not can_transition(current, target):
        raise InvalidStateChange(f"series {series.series_instance_uid}: {current.value} -> {target.value}")
    series.state = target.value
    series.state_reason = reason
    setattr(series, f"{target.value}_at", now)
    session.add(SeriesEvent(series=series, version=series.version, from_state=current.value,
                            to_state=target.value, reason=reason, at=now))


def lock_study_series(session: Session, study_id: int) -> list[Series]:
    """The study's series, re-read and locked for this transaction (FOR UPDATE on PostgreSQL).

    The worker moves series states (queued -> scoring -> scored) while the indexer may
    reopen a series with a late instance (-> receiving -> stable, version + 1). Without
    the lock, a state read before the indexer's commit and written after it would undo
    the reopening, and the new version would never be scored.
    """
    return list(session.scalars(select(Series).where(Series.study_fk == study_id).order_by(Series.id)
                                .with_for_update().execution_options(populate_existing=True)).all())


def find_instance(session: Session, sop_instance_uid: str) -> Instance | None:
    return session.scalar(select(Instance).where(Instance.sop_instance_uid == sop_instance_uid))


def indexed_paths(session: Session) -> set[str]:
    """Storage paths of every indexed instance (start-up check of the spool)."""
    return set(session.scalars(select(Instance.path)))


def count_duplicate(session: Session, instance: Instance) -> None:
    session.execute(update(Series).where(Series.id == instance.series_fk)
                    .values(duplicate_count=Series.duplicate_count + 1))


def _get_or_create_patient(session: Session, rec: InstanceRecord) -> Patient:
    patient = session.scalar(select(Patient).where(Patient.patient_id == rec.patient_id,
                                                   Patient.issuer_of_patient_id == rec.issuer_of_patient_id))
    if patient is None:
        patient = Patient(patient_id=rec.patient_id, issuer_of_patient_id=rec.issuer_of_patient_id,
                          patient_name=rec.patient_name, patient_birth_date=rec.patient_birth_date,
                          patient_sex=rec.patient_sex)
        session.add(patient)
        session.flush()
    return patient


def _get_or_create_study(session: Session, rec: InstanceRecord, now: datetime) -> Study:
    study = session.scalar(select(Study).where(Study.study_instance_uid == rec.study_instance_uid))
    if study is None:
        patient = _get_or_create_patient(session, rec)
        study = Study(study_instance_uid=rec.study_instance_uid, patient_fk=patient.id,
                      accession_number=rec.accession_number, study_date=rec.study_date,
                      study_time=rec.study_time, study_description=rec.study_description,
                      first_received_at=now, last_received_at=now, version=1)
        session.add(study)
        session.flush()
    else:
        study.last_received_at = now
    return study


def record_instance(session: Session, rec: InstanceRecord, now: datetime | None = None) -> StoreOutcome:
    """Index one stored instance (see :func:`record_instances`)."""
    return record_instances(session, [rec], now)[0]


def record_instances(session: Session, records: list[InstanceRecord],
                     now: datetime | None = None) -> list[StoreOutcome]:
    """Index stored instances in order; creates patient/study/series rows as needed.

    A late instance for a settled series reopens it with a new version (and bumps
    the study's version, so the study is scored again exactly once). A SOP Instance
    UID already indexed (or earlier in ``records``) is a duplicate: counted, first kept.
    Built for batches (the node's indexer): one query finds the duplicates, studies and
    series are looked up once per batch, instance rows are inserted together.
    """
    now = now or utcnow()
    known: dict[str, int] = {}
    uids = [rec.sop_instance_uid for rec in records]
    for start in range(0, len(uids), 500):
        known.update(session.execute(select(Instance.sop_instance_uid, Instance.series_fk)
                                     .where(Instance.sop_instance_uid.in_(uids[start:start + 500]))).all())
    studies: dict[str, Study] = {}
    series_by_uid: dict[str, Series] = {}
    pending_rows: list[dict] = []
    outcomes: list[StoreOutcome] = []

    def insert_pending() -> None:
        if pending_rows:
            session.execute(insert(Instance), pending_rows)
            pending_rows.clear()

    for rec in records:
        if rec.sop_instance_uid in known:
            series_fk = known[rec.sop_instance_uid]
            session.execute(update(Series).where(Series.id == series_fk)
                            .values(duplicate_count=Series.duplicate_count + 1)
                            .execution_options(synchronize_session=False))
            held = session.get_one(Series, series_fk)
            outcomes.append(StoreOutcome(True, held.id, held.state, held.version))
            continue
        study = studies.get(rec.study_instance_uid)
        if study is None:
            study = studies[rec.study_instance_uid] = _get_or_create_study(session, rec, now)
        else:
            study.last_received_at = now
        series = series_by_uid.get(rec.series_instance_uid)
        if series is None:
            series = session.scalar(select(Series).where(Series.series_instance_uid == rec.series_instance_uid))
        created = reopened = False
        if series is None:
            created = True
            series = Series(series_instance_uid=rec.series_instance_uid, study_fk=study.id, modality=rec.modality,
                            sop_class_uid=rec.sop_class_uid, series_number=rec.series_number,
                            series_description=rec.series_description, convolution_kernel=rec.convolution_kernel,
                            slice_thickness=rec.slice_thickness, images_in_acquisition=rec.images_in_acquisition,
                            instance_count=0, duplicate_count=0, version=1, state=SeriesState.RECEIVING.value,
                            receiving_at=now, first_received_at=now, last_received_at=now, flags_json="[]")
            session.add(series)
            session.flush()
            session.add(SeriesEvent(series=series, version=1, from_state=None,
                                    to_state=SeriesState.RECEIVING.value, reason="first instance", at=now))
            if rec.not_applicable_reason:
                transition(session, series, SeriesState.NOT_APPLICABLE, rec.not_applicable_reason, now)
        elif series.state != SeriesState.RECEIVING.value:
            fixed_not_applicable = series.state == SeriesState.NOT_APPLICABLE.value and rec.not_applicable_reason
            if not fixed_not_applicable:
                series.version += 1
                bump_study_version(session, study)
                transition(session, series, SeriesState.RECEIVING, "late instance reopened the series", now)
                reopened = True
        series_by_uid[rec.series_instance_uid] = series
        known[rec.sop_instance_uid] = series.id

        series.instance_count += 1
        series.last_received_at = now
        if rec.images_in_acquisition and not series.images_in_acquisition:
            series.images_in_acquisition = rec.images_in_acquisition
        pending_rows.append(dict(sop_instance_uid=rec.sop_instance_uid, sop_class_uid=rec.sop_class_uid,
                                 series_fk=series.id, series_version=series.version,
                                 transfer_syntax_uid=rec.transfer_syntax_uid, path=rec.path,
                                 size_bytes=rec.size_bytes, instance_number=rec.instance_number,
                                 slice_position=rec.slice_position, rows=rec.rows, columns=rec.columns,
                                 calling_ae_title=rec.calling_ae_title, received_at=now))
        became_stable = False
        if (series.state == SeriesState.RECEIVING.value and series.images_in_acquisition
                and series.instance_count >= series.images_in_acquisition):
            insert_pending()
            session.flush()
            mark_stable(session, series, "ImagesInAcquisition reached", now)
            became_stable = True
        outcomes.append(StoreOutcome(False, series.id, series.state, series.version, created, reopened,
                                     became_stable))
    insert_pending()
    return outcomes


def geometry_flags(positions: list[float]) -> list[str]:
    """Z-gaps and inconsistent spacing among slice positions (mm along the normal)."""
    values = sorted(p for p in positions if p is not None)
    if len(values) < 3:
        return []
    diffs = [b - a for a, b in zip(values, values[1:])]
    flags = []
    if any(d < 1e-3 for d in diffs):
        flags.append(f"duplicate slice positions ({sum(d < 1e-3 for d in diffs)})")
    positive = [d for d in diffs if d >= 1e-3]
    if not positive:
        return flags
    median = statistics.median(positive)
    gaps = [(values[i], values[i + 1]) for i, d in enumerate(diffs) if d > 1.5 * median]
    if gaps:
        a, b = gaps[0]
        flags.append(f"z_gap: {len(gaps)} gap(s), first {b - a:.2f} mm between {a:.2f} and {b:.2f} "
                     f"(median spacing {median:.2f} mm)")
    elif max(positive) - min(positive) > 0.1 * median + 0.01:
        flags.append(f"inconsistent_spacing: {min(positive):.2f}..{max(positive):.2f} mm")
    return flags


def mark_stable(session: Session, series: Series, reason: str, now: datetime | None = None) -> None:
    positions = session.scalars(select(Instance.slice_position).where(Instance.series_fk == series.id)).all()
    series.flags = geometry_flags([p for p in positions if p is not None])
    transition(session, series, SeriesState.STABLE, reason, now)


def settle_quiet_series(session: Session, stable_age_s: float, max_receive_s: float,
                        now: datetime | None = None) -> list[Series]:
    """Receiving series quiet for ``stable_age_s`` (or receiving longer than the cap) become stable."""
    now = now or utcnow()
    quiet_before = now - timedelta(seconds=stable_age_s)
    cap_before = now - timedelta(seconds=max_receive_s)
    candidates = session.scalars(
        select(Series).where(Series.state == SeriesState.RECEIVING.value,
                             (Series.last_received_at <= quiet_before) | (Series.receiving_at <= cap_before))
    ).all()
    for series in candidates:
        if series.last_received_at <= quiet_before:
            mark_stable(session, series, f"quiet for {stable_age_s:g} s", now)
        else:
            mark_stable(session, series, f"force-complete after {max_receive_s:g} s", now)
            series.flags = series.flags + ["force_complete"]
    return list(candidates)


def create_due_jobs(session: Session, task_name: str, *, busy_study_uids: frozenset[str] = frozenset(),
                    stable_age_s: float = 15.0, now: datetime | None = None) -> list[int]:
    """One job per study version whose series have all settled and some are stable.

    A study that an open association is still sending is left alone until that
    association ends or the study has been quiet for ``stable_age_s``, so a second
    series that follows a complete first one lands in the same version.
    """
    now = now or utcnow()
    study_ids = session.scalars(
        select(Series.study_fk).where(Series.state == SeriesState.STABLE.value).distinct()
    ).all()
    job_ids = []
    for study_id in study_ids:
        study = session.get_one(Study, study_id)
        states = {s.state for s in study.series}
        if SeriesState.RECEIVING.value in states:
            continue
        quiet = study.last_received_at <= now - timedelta(seconds=stable_age_s)
        if study.study_instance_uid in busy_study_uids and not quiet:
            continue
        job = session.scalar(select(Job).where(Job.task_name == task_name, Job.study_fk == study.id,
                                               Job.study_version == study.version))
        if job is None:
            job = Job(task_name=task_name, study_fk=study.id, study_version=study.version, state=JobState.QUEUED.value,
                      attempts=0, created_at=now)
            session.add(job)
            session.flush()
            job_ids.append(job.id)
        for series in study.series:
            if series.state == SeriesState.STABLE.value:
                transition(session, series, SeriesState.QUEUED, f"job {job.id} (study version {study.version})",
                           now)
    return job_ids


def unpublished_job_ids(session: Session) -> list[int]:
    return list(session.scalars(select(Job.id).where(Job.published_at.is_(None), Job.state == JobState.QUEUED.value)
                                .order_by(Job.id)).all())


def mark_published(session: Session, job_ids: list[int], now: datetime | None = None) -> None:
    if job_ids:
        session.execute(update(Job).where(Job.id.in_(job_ids)).values(published_at=now or utcnow()))


OUTBOX_WAITING = tuple(s.value for s in CLAIMABLE_DELIVERY)  # pending, retrying: the same in every outbox


def unpublish_lost_work(session: Session, after_s: float, now: datetime | None = None) -> tuple[int, int, int]:
    """Forget the publication of work the broker seems to have lost; (jobs, deliveries, prior
    searches) reset.

    A job still queued, or an outbox row (delivery, prior search) pending/retrying and due,
    whose message went to the broker more than ``after_s`` ago, is marked unpublished so
    the next pass publishes it again. That covers a broker that lost messages it had
    acknowledged (a Redis crash within its fsync interval, a Redis restored empty). A
    message that was only slow (a backlog longer than ``after_s``) becomes a duplicate,
    which is harmless: claiming is atomic and finished work is never claimed again.
    """
    cutoff = (now or utcnow()) - timedelta(seconds=after_s)
    jobs = session.execute(update(Job).where(Job.state == JobState.QUEUED.value, Job.published_at < cutoff)
                           .values(published_at=None))
    return (_rowcount(jobs), _unpublish_lost_outbox(session, Delivery, cutoff),
            _unpublish_lost_outbox(session, PriorSearch, cutoff))


def _unpublish_lost_outbox(session: Session, model: type[Delivery] | type[PriorSearch], cutoff: datetime) -> int:
    return _rowcount(session.execute(
        update(model).where(model.state.in_(OUTBOX_WAITING), model.published_at < cutoff,
                            or_(model.next_attempt_at.is_(None), model.next_attempt_at < cutoff))
        .values(published_at=None)))


def unpublished_outbox_ids(session: Session, model: type[Delivery] | type[PriorSearch], grace_s: float = 30.0,
                           now: datetime | None = None) -> list[int]:
    """Outbox rows (deliveries, prior searches) committed but never handed to the broker
    (publish failed, process died).

    ``grace_s`` leaves the worker time to publish its own rows after its commit.
    """
    cutoff = (now or utcnow()) - timedelta(seconds=grace_s)
    return list(session.scalars(select(model.id).where(model.published_at.is_(None), model.state.in_(OUTBOX_WAITING),
                                                       model.created_at <= cutoff)
                                .order_by(model.id)).all())


def unpublished_delivery_ids(session: Session, grace_s: float = 30.0, now: datetime | None = None) -> list[int]:
    return unpublished_outbox_ids(session, Delivery, grace_s, now)


# HIGH results first when deliveries queue up (issue 9), then the oldest.
PRIORITY_RANK = {"HIGH": 0, "MEDIUM": 1, "LOW": 2}


def stored_output_files(session: Session, result_id: int) -> list[OutputFile] | None:
    """The stored outputs of a result in send order, or None when they were never recorded."""
    result = session.get(Result, result_id)
    if result is None or result.outputs_built_at is None:
        return None
    return list(session.scalars(select(OutputFile).where(OutputFile.result_fk == result_id)
                                .order_by(OutputFile.send_order)).all())


def record_output_files(session: Session, result_id: int, files: list[dict], now: datetime | None = None) -> bool:
    """Record a result's built outputs once; False when another worker recorded them first."""
    claimed = _rowcount(session.execute(update(Result).where(Result.id == result_id,
                                                             Result.outputs_built_at.is_(None))
                                        .values(outputs_built_at=now or utcnow()))) == 1
    if not claimed:
        return False
    session.execute(delete(OutputFile).where(OutputFile.result_fk == result_id))
    session.add_all([OutputFile(result_fk=result_id, **f) for f in files])
    return True


def forget_output_files(session: Session, result_id: int) -> None:
    """Drop the record of a result's outputs (their files are gone): the next attempt rebuilds."""
    session.execute(update(Result).where(Result.id == result_id).values(outputs_built_at=None))
    session.execute(delete(OutputFile).where(OutputFile.result_fk == result_id))


def mark_delivery_published(session: Session, delivery_id: int, now: datetime | None = None) -> None:
    session.execute(update(Delivery).where(Delivery.id == delivery_id).values(published_at=now or utcnow()))


# -- jobs ---------------------------------------------------------------------------------------------


def _rowcount(result) -> int:
    """Rows an UPDATE matched (a CursorResult's rowcount; typed loosely by SQLAlchemy)."""
    return int(result.rowcount)


def _set_job_state(job: Job, target: JobState) -> None:
    if not can_transition(job.state, target):
        raise InvalidStateChange(f"job {job.id}: {job.state} -> {target.value}")
    job.state = target.value


def claim_job(session: Session, job_id: int, worker: str, now: datetime | None = None) -> bool:
    """Atomically move a queued job to running; False if someone else has it or it is done."""
    result = session.execute(update(Job).where(Job.id == job_id, Job.state == JobState.QUEUED.value)
                             .values(state=JobState.RUNNING.value, worker=worker, started_at=now or utcnow(),
                                     attempts=Job.attempts + 1))
    return _rowcount(result) == 1


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
    return (holder or "") if _rowcount(taken) == 1 else None


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


# -- results ------------------------------------------------------------------------------------------


def result_exists(session: Session, study_id: int, version: int) -> bool:
    return session.scalar(select(Result.id).where(Result.study_fk == study_id, Result.version == version)) is not None


def add_result(session: Session, job: Job, series_id: int | None, values: Mapping[str, object]) -> Result:
    """The job's result (for its study version); ``values`` are the Result columns."""
    result = Result(study_fk=job.study_fk, job_fk=job.id, version=job.study_version, series_fk=series_id,
                    **values)
    session.add(result)
    session.flush()
    return result


# -- deliveries ---------------------------------------------------------------------------------------


def _set_delivery_state(delivery: Delivery, target: DeliveryState) -> None:
    if not can_transition(delivery.state, target):
        raise InvalidStateChange(f"delivery {delivery.id}: {delivery.state} -> {target.value}")
    delivery.state = target.value


def add_deliveries(session: Session, result: Result, destinations: Iterable[str],
                   now: datetime | None = None, channel: str = "dicom") -> list[int]:
    """One pending delivery of ``result`` per destination; their ids. ``channel``: ``dicom``
    (C-STORE to a PACS, AET@host:port) or ``hl7`` (MLLP to a RIS, mllp://host:port)."""
    ids = []
    for destination in destinations:
        delivery = Delivery(result_fk=result.id, destination=destination, state=DeliveryState.PENDING.value,
                            channel=channel, created_at=now or utcnow())
        session.add(delivery)
        session.flush()
        ids.append(delivery.id)
    return ids


def _due(now: datetime):
    return (Delivery.state.in_([s.value for s in CLAIMABLE_DELIVERY]),
            or_(Delivery.next_attempt_at.is_(None), Delivery.next_attempt_at <= now))


def _priority_rank():
    """SQL: a delivery's result priority as its rank (HIGH 0, MEDIUM 1, LOW 2; unknown as MEDIUM)."""
    return case(PRIORITY_RANK, value=Result.priority, else_=1)


def due_delivery_ids(session: Session, now: datetime | None = None) -> list[int]:
    """Pending or retrying deliveries whose next attempt is due: HIGH results before MEDIUM
    before LOW (issue 9: when deliveries queue up, HIGH goes first), then the oldest."""
    rank = _priority_rank()
    return list(session.scalars(
        select(Delivery.id).join(Result, Delivery.result_fk == Result.id).where(*_due(now or utcnow()))
        .order_by(rank, Delivery.created_at, Delivery.id)).all())


def deliveries_ahead(session: Session, delivery_id: int, now: datetime | None = None) -> list[int]:
    """Deliveries to the same destination that go before ``delivery_id`` (issue 9, Celery mode).

    The order of :func:`due_delivery_ids` (priority rank, then created_at, then id);
    candidates are the due pending/retrying ones and the ``sending`` ones (a holder that
    died is taken over by :func:`claim_delivery`; a live one makes the claim fail).
    """
    own = session.get(Delivery, delivery_id)
    if own is None:
        return []
    rank = _priority_rank()
    own_rank = PRIORITY_RANK.get(own.result.priority, 1)
    own_key = (own_rank, own.created_at, own.id)
    rows = session.execute(
        select(Delivery.id, rank, Delivery.created_at).join(Result, Delivery.result_fk == Result.id)
        .where(Delivery.destination == own.destination, Delivery.id != delivery_id, rank <= own_rank,
               or_(and_(*_due(now or utcnow())), Delivery.state == DeliveryState.SENDING.value))
        .order_by(rank, Delivery.created_at, Delivery.id)).all()
    return [row_id for row_id, row_rank, created in rows if (row_rank, created, row_id) < own_key]


def claim_delivery(session: Session, delivery_id: int, worker: str,
                   may_take: Callable[[datetime | None, str | None], bool], now: datetime | None = None) -> str | None:
    """Atomically move a due pending/retrying delivery to sending, held by ``worker``.

    Returns None when it is not due or someone else has it; "" when claimed; the previous
    holder when a ``sending`` delivery was taken over because ``may_take(next_attempt_at,
    holder)`` says that holder is gone.
    """
    now = now or utcnow()
    claimed = session.execute(
        update(Delivery).where(Delivery.id == delivery_id, *_due(now))
        .values(state=DeliveryState.SENDING.value, attempts=Delivery.attempts + 1, next_attempt_at=now,
                last_error=None, worker=worker))
    if _rowcount(claimed) == 1:
        return ""
    delivery = session.get(Delivery, delivery_id)
    if delivery is None or delivery.state != DeliveryState.SENDING.value:
        return None
    holder = delivery.worker
    if not may_take(delivery.next_attempt_at, holder):
        return None
    delivery.attempts += 1
    delivery.next_attempt_at = now
    delivery.worker = worker
    return holder or ""


def get_delivery(session: Session, delivery_id: int) -> Delivery:
    return session.get_one(Delivery, delivery_id)


def delivery_result(session: Session, delivery_id: int) -> Result:
    return session.get_one(Delivery, delivery_id).result


def start_delivery(session: Session, delivery_id: int, now: datetime | None = None) -> Delivery:
    """The claimed delivery; its scored series becomes ``delivering``."""
    delivery = session.get_one(Delivery, delivery_id)
    result = delivery.result
    if result.series_fk is not None:
        series = session.get_one(Series, result.series_fk)
        if series.state == SeriesState.SCORED.value:
            transition(session, series, SeriesState.DELIVERING, f"to {delivery.destination}", now)
    return delivery


def finish_delivery(session: Session, delivery_id: int, target: DeliveryState, reason: str | None, sent: int,
                    retry_delay_s: Callable[[int], float] | None = None, now: datetime | None = None) -> Delivery:
    """sending -> delivered / retrying / failed. A retry is due ``retry_delay_s(attempts)``
    seconds from now; when every delivery of the result is delivered, the result is
    stamped and its series becomes ``delivered``."""
    now = now or utcnow()
    delivery = session.get_one(Delivery, delivery_id)
    _set_delivery_state(delivery, target)
    delivery.worker = None
    delivery.last_error = reason
    delivery.instances_sent = sent
    if target is DeliveryState.RETRYING:
        delay = retry_delay_s(delivery.attempts) if retry_delay_s else 0.0
        delivery.next_attempt_at = now + timedelta(seconds=delay)
    if target is DeliveryState.DELIVERED:
        delivery.delivered_at = now
    result = delivery.result
    states = {d.state for d in result.deliveries}
    series = session.get(Series, result.series_fk) if result.series_fk else None
    if states == {DeliveryState.DELIVERED.value}:
        result.delivered_at = now
        if series is not None and series.state == SeriesState.DELIVERING.value:
            transition(session, series, SeriesState.DELIVERED, None, now)
    return delivery


def record_rejection(session: Session, *, status_code: int, reason: str, calling_ae_title: str | None,
                     peer_address: str | None, sop_class_uid: str | None, sop_instance_uid: str | None,
                     quarantine_path: str | None = None, now: datetime | None = None) -> None:
    session.add(RejectedInstance(status_code=status_code, reason=reason, calling_ae_title=calling_ae_title,
                                 peer_address=peer_address, sop_class_uid=(sop_class_uid or "")[:128],
                                 sop_instance_uid=(sop_instance_uid or "")[:128],
                                 quarantine_path=quarantine_path, received_at=now or utcnow()))


@dataclass
class SeriesStatusRow:
    study_instance_uid: str
    series_instance_uid: str
    modality: str | None
    series_description: str | None
    instance_count: int
    duplicate_count: int
    version: int
    state: str
    state_reason: str | None
    flags: list[str]
    first_received_at: datetime
    last_received_at: datetime
    stable_at: datetime | None
    queued_at: datetime | None
    scored_at: datetime | None
    delivered_at: datetime | None


def series_status(session: Session, limit: int = 200) -> list[SeriesStatusRow]:
    rows = session.execute(
        select(Series, Study.study_instance_uid).join(Study, Series.study_fk == Study.id)
        .order_by(Series.last_received_at.desc()).limit(limit)
    ).all()
    return [SeriesStatusRow(study_uid, s.series_instance_uid, s.modality, s.series_description, s.instance_count,
                            s.duplicate_count, s.version, s.state, s.state_reason, s.flags, s.first_received_at,
                            s.last_received_at, s.stable_at, s.queued_at, s.scored_at, s.delivered_at)
            for s, study_uid in rows]


@dataclass
class ResultStatusRow:
    study_instance_uid: str
    version: int
    status: str
    category: str | None
    priority: str
    involvement_percent: float | None
    scored_at: datetime | None
    reason: str | None
    deliveries: list[tuple[str, str]]
    # (destination, state, reason) of each delivery that failed or is retrying (HL7 AE/AR text, refused...)
    delivery_errors: list[tuple[str, str, str]] = field(default_factory=list)
    workitem_state: str | None = None  # the UPS workitem's state (db.worklist)


PRIORITY_ORDER = RANK


def result_status(session: Session, limit: int = 200) -> list[ResultStatusRow]:
    """Latest result per study, in worklist order (priority, then oldest first)."""
    latest = (select(Result.study_fk, func.max(Result.version).label("version"))
              .group_by(Result.study_fk).subquery())
    from db.followup import not_a_prior_clause  # retrieved priors are compared with, never read from the worklist

    results = session.scalars(
        select(Result).join(latest, (Result.study_fk == latest.c.study_fk) & (Result.version == latest.c.version))
        .join(Study, Study.id == Result.study_fk).where(not_a_prior_clause())
        .order_by(Result.scored_at).limit(limit)).all()
    workitems = dict(session.execute(select(UpsWorkitem.result_fk, UpsWorkitem.state)
                                     .where(UpsWorkitem.result_fk.in_([r.id for r in results]))).all())
    rows = [(worklist_key(r.priority, r.study.first_received_at, r.id),
             ResultStatusRow(r.study.study_instance_uid, r.version, r.status, r.category, r.priority,
                             r.involvement_percent, r.scored_at, r.reason,
                             [(d.destination, d.state) for d in r.deliveries],
                             [(d.destination, d.state, d.last_error) for d in r.deliveries
                              if d.state in ("failed", "retrying") and d.last_error],
                             workitems.get(r.id)))
            for r in results]
    rows.sort(key=lambda pair: pair[0])
    return [row for _, row in rows]


def stored_sop_instance_uids(session: Session, sop_instance_uids: list[str]) -> dict[str, str]:
    """{sop_instance_uid: sop_class_uid} for those we hold (storage commitment)."""
    held: dict[str, str] = {}
    for start in range(0, len(sop_instance_uids), 500):
        chunk = sop_instance_uids[start:start + 500]
        for uid, sop_class in session.execute(select(Instance.sop_instance_uid, Instance.sop_class_uid)
                                              .where(Instance.sop_instance_uid.in_(chunk),
                                                     Instance.deleted_at.is_(None))):
            held[uid] = sop_class
    return held


def counts(session: Session) -> dict[str, int]:
    return {
        "studies": session.scalar(select(func.count(Study.id))) or 0,
        "series": session.scalar(select(func.count(Series.id))) or 0,
        "instances": session.scalar(select(func.count(Instance.id))) or 0,
        "rejected": session.scalar(select(func.count(RejectedInstance.id))) or 0,
    }


SETTLED_STATES = frozenset(s.value for s in SETTLED)


def align_destination_retries(session: Session, destination: str, not_before: datetime) -> int:
    """Waiting deliveries to ``destination`` (pending or retrying) get their next attempt no
    earlier than ``not_before``; returns how many moved. See worker.tasks.deliver._finish_delivery."""
    moved = session.execute(
        update(Delivery).where(Delivery.destination == destination,
                               Delivery.state.in_((DeliveryState.PENDING.value, DeliveryState.RETRYING.value)),
                               (Delivery.next_attempt_at.is_(None)) | (Delivery.next_attempt_at < not_before))
        .values(next_attempt_at=not_before))
    return _rowcount(moved)


# -- graceful shutdown: hand back what this process holds ----------------------------
def release_job(session: Session, job_id: int, worker: str) -> bool:
    """Hand a running job held by ``worker`` back to the queue (unpublished, so the node
    publishes it again); False when it is not running under ``worker`` (finished, taken over)."""
    return _rowcount(session.execute(
        update(Job).where(Job.id == job_id, Job.state == JobState.RUNNING.value, Job.worker == worker)
        .values(state=JobState.QUEUED.value, worker=None, published_at=None))) == 1


def release_claims(session: Session, is_ours, now: datetime | None = None) -> tuple[list[int], list[int]]:
    """Requeue scoring jobs and deliveries whose holder (``host:pid``) ``is_ours(holder)``.

    Jobs go back to ``queued`` and deliveries to ``retrying`` (due now), both unpublished,
    so the node publishes them again (a message the broker redelivers as well finds the
    row already claimed or done and is skipped). Returns (job ids, delivery ids).
    """
    jobs = [job_id for job_id, holder in session.execute(
        select(Job.id, Job.worker).where(Job.state == JobState.RUNNING.value)) if is_ours(holder)]
    deliveries = [d_id for d_id, holder in session.execute(
        select(Delivery.id, Delivery.worker).where(Delivery.state == DeliveryState.SENDING.value)) if is_ours(holder)]
    if jobs:
        session.execute(update(Job).where(Job.id.in_(jobs), Job.state == JobState.RUNNING.value)
                        .values(state=JobState.QUEUED.value, worker=None, published_at=None))
    if deliveries:
        session.execute(update(Delivery).where(Delivery.id.in_(deliveries),
                                               Delivery.state == DeliveryState.SENDING.value)
                        .values(state=DeliveryState.RETRYING.value, worker=None, published_at=None,
                                next_attempt_at=now or utcnow()))
    return jobs, deliveries


# -- retention (CT_TRIAGE_RETENTION_DAYS) ---------------------------------------------
@dataclass
class ExpiredFile:
    kind: str  # "instance" | "quarantine"
    row_id: int
    path: str  # relative to the storage folder


def expired_files(session: Session, cutoff: datetime, limit: int = 1000) -> list[ExpiredFile]:
    """Files retention may delete now: never before the study's result was delivered.

    An instance is expired when its study's result for the study's *current* version
    was delivered before ``cutoff`` (every delivery succeeded), or has no delivery at
    all (no destination, nothing to send) and was scored before ``cutoff``. A study
    reopened by a late instance has a newer version without a delivered result, so it
    keeps its files. Quarantined copies expire ``cutoff`` after they were received.
    """
    with_deliveries = select(Delivery.result_fk).distinct()
    settled = (select(Result.study_fk)
               .join(Study, (Study.id == Result.study_fk) & (Study.version == Result.version))
               .where(((Result.delivered_at.is_not(None)) & (Result.delivered_at <= cutoff))
                      | (Result.id.not_in(with_deliveries) & (Result.scored_at <= cutoff))))
    rows = session.execute(
        select(Instance.id, Instance.path).join(Series, Instance.series_fk == Series.id)
        .where(Instance.deleted_at.is_(None), Series.study_fk.in_(settled))
        .order_by(Instance.id).limit(limit)).all()
    files = [ExpiredFile("instance", row_id, path) for row_id, path in rows]
    if len(files) < limit:
        quarantined = session.execute(
            select(RejectedInstance.id, RejectedInstance.quarantine_path)
            .where(RejectedInstance.quarantine_path.is_not(None), RejectedInstance.quarantine_deleted_at.is_(None),
                   RejectedInstance.received_at <= cutoff)
            .order_by(RejectedInstance.id).limit(limit - len(files))).all()
        files += [ExpiredFile("quarantine", row_id, path) for row_id, path in quarantined if path]
    return files


def mark_files_deleted(session: Session, files: list[ExpiredFile], now: datetime | None = None) -> None:
    now = now or utcnow()
    instances = [f.row_id for f in files if f.kind == "instance"]
    quarantined = [f.row_id for f in files if f.kind == "quarantine"]
    if instances:
        session.execute(update(Instance).where(Instance.id.in_(instances)).values(deleted_at=now))
    if quarantined:
        session.execute(update(RejectedInstance).where(RejectedInstance.id.in_(quarantined))
                        .values(quarantine_deleted_at=now))


@dataclass
class StorageCounts:
    instances_on_disk: int
    bytes_on_disk: int
    instances_deleted: int
    quarantined_on_disk: int
    disk_refusals_last_hour: int


def storage_counts(session: Session, disk_full_status: int, now: datetime | None = None) -> StorageCounts:
    now = now or utcnow()
    on_disk = session.execute(select(func.count(Instance.id), func.coalesce(func.sum(Instance.size_bytes), 0))
                              .where(Instance.deleted_at.is_(None))).one()
    return StorageCounts(
        instances_on_disk=int(on_disk[0] or 0),
        bytes_on_disk=int(on_disk[1] or 0),
        instances_deleted=session.scalar(select(func.count(Instance.id)).where(Instance.deleted_at.is_not(None)))
        or 0,
        quarantined_on_disk=session.scalar(select(func.count(RejectedInstance.id)).where(
            RejectedInstance.quarantine_path.is_not(None), RejectedInstance.quarantine_deleted_at.is_(None))) or 0,
        disk_refusals_last_hour=session.scalar(select(func.count(RejectedInstance.id)).where(
            RejectedInstance.status_code == disk_full_status,
            RejectedInstance.received_at >= now - timedelta(hours=1))) or 0,
    )
