"""What the node records as instances arrive: patients, studies, series and instances, and the
series state machine (``receiving`` -> ``queued`` -> ``scoring`` -> ...; the table is
:data:`db.states.ALLOWED`). A series settles (``stable``) when all its instances arrived or it
has been quiet long enough; refused instances are recorded with their reason.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from db.models import (
    Instance,
    Job,
    Patient,
    RejectedInstance,
    Series,
    SeriesEvent,
    Study,
    bump_study_version,
)
from db.states import (
    InvalidStateChange,
    SeriesState,
    can_transition,
)
from db.types import utcnow


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
    # Found on disk after a crash (start-up scan, a dead node's journal), not received now:
    # already indexed means indexed by its receiver, not a duplicate to count.
    recovered: bool = False


@dataclass
class StoreOutcome:
    duplicate: bool
    series_id: int
    series_state: str
    series_version: int
    created_series: bool = False
    reopened: bool = False
    became_stable: bool = False
    # Set when a new series opened the study's next version (its current one already had a job).
    opened_study_version: int | None = None


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
    the reopening, and the new version would never be scored. ``FOR NO KEY UPDATE``: it
    serialises with the indexer's updates, not with inserts that only reference the series
    (instances, results), whose foreign-key checks take key-share locks.
    """
    return list(session.scalars(select(Series).where(Series.study_fk == study_id).order_by(Series.id)
                                .with_for_update(key_share=True).execution_options(populate_existing=True)).all())


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
            outcomes.append(_count_duplicate(session, known[rec.sop_instance_uid], recovered=rec.recovered))
            continue
        study = studies.get(rec.study_instance_uid)
        if study is None:
            study = studies[rec.study_instance_uid] = _get_or_create_study(session, rec, now)
        else:
            study.last_received_at = now
        series = series_by_uid.get(rec.series_instance_uid)
        if series is None:
            series = session.scalar(select(Series).where(Series.series_instance_uid == rec.series_instance_uid))
        created = series is None
        reopened = False
        opened_study_version = None
        if series is None:
            series = _create_series(session, rec, study, now)
            opened_study_version = study.version if _open_new_version_for_new_series(session, study) else None
        else:
            reopened = _reopen_if_settled(session, series, study, rec, now)
        series_by_uid[rec.series_instance_uid] = series
        known[rec.sop_instance_uid] = series.id

        series.instance_count += 1
        series.last_received_at = now
        if rec.images_in_acquisition and not series.images_in_acquisition:
            series.images_in_acquisition = rec.images_in_acquisition
        pending_rows.append(_instance_row(rec, series, now))
        became_stable = False
        if (series.state == SeriesState.RECEIVING.value and series.images_in_acquisition
                and series.instance_count >= series.images_in_acquisition):
            insert_pending()
            session.flush()
            mark_stable(session, series, "ImagesInAcquisition reached", now)
            became_stable = True
        outcomes.append(StoreOutcome(False, series.id, series.state, series.version, created, reopened,
                                     became_stable, opened_study_version))
    insert_pending()
    return outcomes


def _count_duplicate(session: Session, series_fk: int, recovered: bool = False) -> StoreOutcome:
    """An instance indexed before: count it on the series that holds it, keep the first. A record
    recovered from a dead node's journal (dicom_node.orphans) that is already indexed is no duplicate."""
    if not recovered:
        session.execute(update(Series).where(Series.id == series_fk)
                        .values(duplicate_count=Series.duplicate_count + 1)
                        .execution_options(synchronize_session=False))
    held = session.get_one(Series, series_fk)
    return StoreOutcome(True, held.id, held.state, held.version)


def _create_series(session: Session, rec: InstanceRecord, study: Study, now: datetime) -> Series:
    """A new series, RECEIVING at version 1 (NOT_APPLICABLE at once when the instance says so)."""
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
    return series


def _reopen_if_settled(session: Session, series: Series, study: Study, rec: InstanceRecord, now: datetime) -> bool:
    """A late instance for a settled series reopens it with a new version (and bumps the
    study's); not so a not-applicable series that gets another not-applicable instance.
    True when it reopened."""
    if series.state == SeriesState.RECEIVING.value:
        return False
    if series.state == SeriesState.NOT_APPLICABLE.value and rec.not_applicable_reason:
        return False
    series.version += 1
    bump_study_version(session, study)
    transition(session, series, SeriesState.RECEIVING, "late instance reopened the series", now)
    return True


def _open_new_version_for_new_series(session: Session, study: Study) -> bool:
    """A new series in a study whose current version already has a job opens the next version.

    A version is frozen once a job exists for it: the job may already have read the study's
    files or finished. Without the bump the new series would settle, be queued under that job
    and never be scored (nor considered by series selection). True when it bumped.
    """
    if session.scalar(select(Job.id).where(Job.study_fk == study.id, Job.study_version == study.version)
                      .limit(1)) is None:
        return False
    bump_study_version(session, study)
    return True


def _instance_row(rec: InstanceRecord, series: Series, now: datetime) -> dict:
    """The Instance row (for a bulk insert) of ``rec`` in ``series``'s current version."""
    return dict(sop_instance_uid=rec.sop_instance_uid, sop_class_uid=rec.sop_class_uid,
                series_fk=series.id, series_version=series.version,
                transfer_syntax_uid=rec.transfer_syntax_uid, path=rec.path,
                size_bytes=rec.size_bytes, instance_number=rec.instance_number,
                slice_position=rec.slice_position, rows=rec.rows, columns=rec.columns,
                calling_ae_title=rec.calling_ae_title, received_at=now)


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


def record_rejection(session: Session, *, status_code: int, reason: str, calling_ae_title: str | None,
                     peer_address: str | None, sop_class_uid: str | None, sop_instance_uid: str | None,
                     quarantine_path: str | None = None, now: datetime | None = None) -> None:
    session.add(RejectedInstance(status_code=status_code, reason=reason, calling_ae_title=calling_ae_title,
                                 peer_address=peer_address, sop_class_uid=(sop_class_uid or "")[:128],
                                 sop_instance_uid=(sop_instance_uid or "")[:128],
                                 quarantine_path=quarantine_path, received_at=now or utcnow()))


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
