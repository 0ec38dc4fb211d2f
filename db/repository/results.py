"""Results (one per study version) and the output files built from them once (``stored_outputs``).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from db.models import (
    Job,
    OutputFile,
    Result,
)
from db.repository.base import rowcount
from db.types import utcnow


def result_exists(session: Session, study_id: int, version: int) -> bool:
    return session.scalar(select(Result.id).where(Result.study_fk == study_id, Result.version == version)) is not None


def add_result(session: Session, job: Job, series_id: int | None, values: Mapping[str, object]) -> Result:
    """The job's result (for its study version); ``values`` are the Result columns."""
    result = Result(study_fk=job.study_fk, job_fk=job.id, version=job.study_version, series_fk=series_id,
                    **values)
    session.add(result)
    session.flush()
    return result


def stored_output_files(session: Session, result_id: int) -> list[OutputFile] | None:
    """The stored outputs of a result in send order, or None when they were never recorded."""
    result = session.get(Result, result_id)
    if result is None or result.outputs_built_at is None:
        return None
    return list(session.scalars(select(OutputFile).where(OutputFile.result_fk == result_id)
                                .order_by(OutputFile.send_order)).all())


def record_output_files(session: Session, result_id: int, files: list[dict], now: datetime | None = None) -> bool:
    """Record a result's built outputs once; False when another worker recorded them first."""
    claimed = rowcount(session.execute(update(Result).where(Result.id == result_id,
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
