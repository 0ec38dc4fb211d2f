"""When the database was last written to (``ct-triage status``: is a daemon using it?).

The newest time stamp among the tables every daemon writes as it works: instances
received, C-STOREs refused, series state changes, jobs, results and deliveries. An
idle daemon writes nothing, so a long silence is a question, not a verdict.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import Delivery, Instance, Job, RejectedInstance, Result, SeriesEvent

_COLUMNS = (Instance.received_at, RejectedInstance.received_at, SeriesEvent.at, Job.created_at, Job.finished_at,
            Result.created_at, Delivery.created_at, Delivery.delivered_at)


def last_write_at(session: Session) -> datetime | None:
    """The newest of those time stamps (UTC, aware); None for an empty database."""
    newest: datetime | None = None
    for column in _COLUMNS:
        value = session.scalar(select(func.max(column)))
        if value is not None and (newest is None or value > newest):  # max() keeps the UTCDateTime type
            newest = value
    return newest
