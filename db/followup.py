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

from datetime import datetime

from sqlalchemy import Boolean, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint, exists, func, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from db.models import UID, Base, Job, Patient, Result, Study
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


class PriorSearch(Base):
    __tablename__ = "prior_searches"
    __table_args__ = (
        UniqueConstraint("study_fk", "source", name="uq_prior_searches_study_source"),
        Index("ix_prior_searches_state_next", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_fk: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    source: Mapped[str] = mapped_column(String(128))  # AET@host:port
    state: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    found: Mapped[int] = mapped_column(Integer, default=0)  # candidate studies the C-FIND returned
    requested: Mapped[int] = mapped_column(Integer, default=0)  # studies asked for with C-MOVE
    worker: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
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


def latest_results_of_patient(session: Session, patient_fk: int, *, exclude_study_fk: int | None = None,
                              status: str = "scored") -> list[Result]:
    """The latest result version of every study of one patient (any issuer-qualified Patient row)."""
    latest = (select(Result.study_fk, func.max(Result.version).label("version"))
              .join(Study, Study.id == Result.study_fk).where(Study.patient_fk == patient_fk)
              .group_by(Result.study_fk).subquery())
    query = (select(Result).join(latest, (Result.study_fk == latest.c.study_fk)
                                 & (Result.version == latest.c.version))
             .where(Result.status == status))
    if exclude_study_fk is not None:
        query = query.where(Result.study_fk != exclude_study_fk)
    return list(session.scalars(query.order_by(Result.id)).all())


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
