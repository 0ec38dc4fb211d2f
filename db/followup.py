"""Follow-up studies (issue 12): comparisons with priors, prior searches, retrieved priors.

Tables (migration 0005):

- ``comparisons``: one row per (result, prior result) pair that the result's comparison
  used: deltas in percentage points and relative, per lung, lesion volume, hours between
  the acquisitions, rate, the trend word and whether the progression rule fired.
- ``prior_searches``: one row per (study, PACS) asked for the patient's earlier studies
  (C-FIND then C-MOVE); an outbox like ``deliveries``: pending -> searching -> done |
  retrying (PACS down, with backoff) | failed (association rejected, bad answer).
- ``prior_studies``: studies we asked a PACS to move to us *as priors*. Such a study is
  scored like any other, but gets no deliveries and stays off the worklist.

Queries here never commit (the caller owns the transaction), like db.repository.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from sqlalchemy import (
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    exists,
    func,
    select,
    update,
)
from sqlalchemy.orm import Mapped, Session, mapped_column

from db.models import UID, Base, Job, Outbox, Patient, Result, Study, bump_study_version
from db.types import UTCDateTime, utcnow


class Comparison(Base):
    __tablename__ = "comparisons"
    __table_args__ = (UniqueConstraint("result_fk", "prior_result_fk", name="uq_comparisons_result_prior"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_fk: Mapped[int] = mapped_column(ForeignKey("results.id"), index=True)
    prior_result_fk: Mapped[int] = mapped_column(ForeignKey("results.id"))
    prior_study_instance_uid: Mapped[str] = mapped_column(UID)
    # DICOM acquisition times are local wall-clock times without a zone: kept as ISO text.
    current_acquired_at: Mapped[str | None] = mapped_column(String(26))
    prior_acquired_at: Mapped[str | None] = mapped_column(String(26))
    hours: Mapped[float | None] = mapped_column(Float)
    prior_percent: Mapped[float | None] = mapped_column(Float)
    current_percent: Mapped[float | None] = mapped_column(Float)
    delta_points: Mapped[float | None] = mapped_column(Float)
    delta_points_left: Mapped[float | None] = mapped_column(Float)
    delta_points_right: Mapped[float | None] = mapped_column(Float)
    relative_percent: Mapped[float | None] = mapped_column(Float)
    relative_percent_left: Mapped[float | None] = mapped_column(Float)
    relative_percent_right: Mapped[float | None] = mapped_column(Float)
    delta_lesion_ml: Mapped[float | None] = mapped_column(Float)
    points_per_day: Mapped[float | None] = mapped_column(Float)
    trend: Mapped[str] = mapped_column(String(16))  # progression | worsening | stable | improvement
    progression: Mapped[bool] = mapped_column(Boolean, default=False)
    differences: Mapped[str | None] = mapped_column(Text)  # scanner/kernel/thickness differences, "; "-joined
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class PriorSearch(Outbox, Base):
    __tablename__ = "prior_searches"
    __table_args__ = (
        UniqueConstraint("study_fk", "source", name="uq_prior_searches_study_source"),
        Index("ix_prior_searches_state_next", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_fk: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    source: Mapped[str] = mapped_column(String(128))  # AET@host:port
    found: Mapped[int] = mapped_column(Integer, default=0)  # candidate studies the C-FIND returned
    requested: Mapped[int] = mapped_column(Integer, default=0)  # studies asked for with C-MOVE
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class PriorStudy(Base):
    __tablename__ = "prior_studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    search_fk: Mapped[int | None] = mapped_column(ForeignKey("prior_searches.id"))
    source: Mapped[str] = mapped_column(String(128))
    # requested -> retrieved (C-MOVE success) | failed (reason in ``error``)
    state: Mapped[str] = mapped_column(String(16), default="requested")
    error: Mapped[str | None] = mapped_column(Text)
    requested_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    retrieved_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


# -- queries ------------------------------------------------------------------------------
def is_prior_study(session: Session, study_instance_uid: str) -> bool:
    """True when we fetched this study from a PACS only to compare with (not a worklist item)."""
    return bool(session.scalar(select(exists().where(PriorStudy.study_instance_uid == study_instance_uid))))


def not_a_prior_clause():
    """SQL condition 'this Study row is not a retrieved prior': for worklist queries and views."""
    return ~exists().where(PriorStudy.study_instance_uid == Study.study_instance_uid)


def same_patient_ids(session: Session, patient: Patient) -> list[int]:
    """``patients`` rows that are this patient: the one with the same Patient ID *and* Issuer of
    Patient ID (an empty issuer is a value: "123" with no issuer is not "123" issued by "A",
    since a wrong prior is worse than a missed one). Names never match."""
    return [patient.id]


def latest_results_of_patient(session: Session, patient: Patient, *, exclude_study_fk: int | None = None,
                              status: str = "scored") -> list[Result]:
    """The latest result version of every study of one patient (see :func:`same_patient_ids`)."""
    patient_fks = same_patient_ids(session, patient)
    latest = (select(Result.study_fk, func.max(Result.version).label("version"))
              .join(Study, Study.id == Result.study_fk).where(Study.patient_fk.in_(patient_fks))
              .group_by(Result.study_fk).subquery())
    query = (select(Result).join(latest, (Result.study_fk == latest.c.study_fk)
                                 & (Result.version == latest.c.version))
             .where(Result.status == status))
    if exclude_study_fk is not None:
        query = query.where(Result.study_fk != exclude_study_fk)
    return list(session.scalars(query.order_by(Result.id)).all())


def study_uids_of_patient(session: Session, patient: Patient) -> set[str]:
    return set(session.scalars(select(Study.study_instance_uid)
                               .where(Study.patient_fk.in_(same_patient_ids(session, patient)))).all())


def patient_has_identity(patient: Patient) -> bool:
    """Priors are matched by Patient ID (+ Issuer): an empty or blank ID matches nothing."""
    return bool((patient.patient_id or "").strip())


def study_is_being_scored(session: Session, study_fk: int) -> bool:
    """A job is queued or running, or a series is receiving/waiting: a new scoring version is coming."""
    from db.models import Series

    waiting = ("receiving", "stable", "queued", "scoring")
    return bool(session.scalar(select(exists().where(Job.study_fk == study_fk,
                                                     Job.state.in_(("queued", "running"))))) or
                session.scalar(select(exists().where(Series.study_fk == study_fk, Series.state.in_(waiting)))))


def comparisons_of(session: Session, result_fk: int) -> list[Comparison]:
    return list(session.scalars(select(Comparison).where(Comparison.result_fk == result_fk)
                                .order_by(Comparison.prior_acquired_at.desc())).all())


def due_prior_search_ids(session: Session, now: datetime | None = None) -> list[int]:
    now = now or utcnow()
    return list(session.scalars(
        select(PriorSearch.id).where(PriorSearch.state.in_(("pending", "retrying")),
                                     (PriorSearch.next_attempt_at.is_(None)) | (PriorSearch.next_attempt_at <= now))
        .order_by(PriorSearch.id)).all())


def change_column(result_id_column):
    """SQL expression: the change of a result for worklist views and queries.

    'progression' when any comparison of the result fired the rule, else the trend against
    the most recent prior ('worsening', 'stable', 'improvement'), NULL without priors.
    Use as ``change_column(Result.id).label("change")`` (or the same SQL in a view).
    """
    fired = exists().where(Comparison.result_fk == result_id_column, Comparison.progression.is_(True))
    latest = (select(Comparison.trend).where(Comparison.result_fk == result_id_column)
              .order_by(Comparison.prior_acquired_at.desc()).limit(1).scalar_subquery())
    from sqlalchemy import case, literal

    return case((fired, literal("progression")), else_=latest)


def _rowcount(result) -> int:
    """Rows an UPDATE matched (a CursorResult's rowcount; typed loosely by SQLAlchemy)."""
    return int(result.rowcount)


# -- state changes ----------------------------------------------------------------------------
SEARCH_STATES = ("pending", "searching", "retrying", "done", "failed")


def add_comparison_version(session: Session, study: Study, latest: Result, values: Mapping[str, object],
                           now: datetime | None = None) -> Result | None:
    """A new result version of ``study`` that only redoes the comparison of ``latest``.

    Bumps ``studies.version`` (as a late instance does), copies the scores of ``latest``
    and takes ``values`` (category, priority, reason, result_json) from the new comparison.
    None when the study has moved past ``latest`` meanwhile (a late instance: its own
    scoring compares with the priors).
    """
    now = now or utcnow()
    if not bump_study_version(session, study, expected=latest.version):
        return None
    copied = ("status", "series_fk", "involvement_percent", "involvement_percent_left", "involvement_percent_right",
              "lung_volume_ml", "lesion_volume_ml", "lesion_count", "model", "model_version", "device", "seconds",
              "received_at", "stable_at", "scoring_started_at", "masks_path")
    result = Result(study_fk=study.id, job_fk=None, version=study.version, scored_at=now, created_at=now,
                    **{k: getattr(latest, k) for k in copied}, **values)
    session.add(result)
    session.flush()
    return result


def add_searches(session: Session, study: Study, sources: list[str], now: datetime | None = None) -> list[int]:
    """One pending prior search per PACS not yet asked about ``study``; their ids."""
    ids = []
    for source in sources:
        if session.scalar(select(PriorSearch.id).where(PriorSearch.study_fk == study.id,
                                                       PriorSearch.source == source)) is not None:
            continue
        search = PriorSearch(study_fk=study.id, source=source, state="pending", attempts=0, found=0, requested=0,
                             created_at=now or utcnow())
        session.add(search)
        session.flush()
        ids.append(search.id)
    return ids


def mark_search_published(session: Session, search_id: int, now: datetime | None = None) -> None:
    session.execute(update(PriorSearch).where(PriorSearch.id == search_id).values(published_at=now or utcnow()))


def claim_search(session: Session, search_id: int, worker: str, now: datetime | None = None) -> bool:
    """pending/retrying and due -> searching (attempts + 1); False when someone else has it or not due."""
    now = now or utcnow()
    return _rowcount(session.execute(
        update(PriorSearch).where(PriorSearch.id == search_id, PriorSearch.state.in_(("pending", "retrying")),
                                  (PriorSearch.next_attempt_at.is_(None)) | (PriorSearch.next_attempt_at <= now))
        .values(state="searching", attempts=PriorSearch.attempts + 1, worker=worker, next_attempt_at=now,
                last_error=None))) == 1


def finish_search(session: Session, search_id: int, state: str, error: str | None, *,
                  retry_at: datetime | None = None, found: int | None = None, requested: int | None = None,
                  now: datetime | None = None) -> PriorSearch:
    """searching -> done | failed | retrying (at ``retry_at``)."""
    if state not in ("done", "failed", "retrying"):
        raise ValueError(f"argument 'state' must be done, failed or retrying, got {state!r}")
    search = session.get(PriorSearch, search_id)
    if search is None:
        raise ValueError(f"prior search {search_id} does not exist")
    search.state, search.last_error, search.worker = state, error, None
    if found is not None:
        search.found = found
    if requested is not None:
        search.requested = requested
    if state == "retrying":
        search.next_attempt_at = retry_at
    else:
        search.finished_at = now or utcnow()
    return search


def request_prior(session: Session, study_instance_uid: str, search_id: int, source: str,
                  now: datetime | None = None) -> None:
    """Record, before the C-MOVE, that this study comes to us as a prior (new or asked again)."""
    row = session.scalar(select(PriorStudy).where(PriorStudy.study_instance_uid == study_instance_uid))
    if row is None:
        session.add(PriorStudy(study_instance_uid=study_instance_uid, search_fk=search_id, source=source,
                               state="requested", requested_at=now or utcnow()))
    else:
        row.state, row.error = "requested", None


def prior_retrieved(session: Session, study_instance_uid: str, error: str | None = None,
                    now: datetime | None = None) -> None:
    """After the C-MOVE: retrieved (unless already scored), or failed with ``error``."""
    row = session.scalar(select(PriorStudy).where(PriorStudy.study_instance_uid == study_instance_uid))
    if row is None:
        return
    if error is not None:
        row.state, row.error = "failed", error
        return
    if row.state == "requested":
        row.state = "retrieved"
    row.retrieved_at = now or utcnow()


def prior_scored(session: Session, study_instance_uid: str, now: datetime | None = None) -> bool:
    """Mark a retrieved prior scored; False when the study is not a retrieved prior."""
    row = session.scalar(select(PriorStudy).where(PriorStudy.study_instance_uid == study_instance_uid))
    if row is None:
        return False
    row.state = "scored"
    row.retrieved_at = row.retrieved_at or now or utcnow()
    return True


def requested_prior_uids(session: Session) -> set[str]:
    return set(session.scalars(select(PriorStudy.study_instance_uid).where(PriorStudy.state != "failed")).all())
