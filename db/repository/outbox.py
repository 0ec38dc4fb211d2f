"""Deliveries, the outbox of everything we send (C-STORE to a PACS, HL7 to a RIS): written with the
result, published after the commit, republished when lost, claimed in worklist order
(``pending``/``retrying`` -> ``sending`` -> ``delivered``/``retrying``/``failed``;
:data:`db.states.DELIVERY_ALLOWED`), and claims handed back on shutdown.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime, timedelta

from sqlalchemy import and_, case, or_, select, update
from sqlalchemy.orm import Session

from db.followup import PriorSearch
from db.models import (
    Delivery,
    Job,
    Result,
    Series,
)
from db.repository.base import rowcount
from db.repository.ingest import transition
from db.states import (
    CLAIMABLE_DELIVERY,
    DeliveryState,
    InvalidStateChange,
    JobState,
    SeriesState,
    can_transition,
)
from db.types import utcnow

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
    return (rowcount(jobs), _unpublish_lost_outbox(session, Delivery, cutoff),
            _unpublish_lost_outbox(session, PriorSearch, cutoff))


def _unpublish_lost_outbox(session: Session, model: type[Delivery] | type[PriorSearch], cutoff: datetime) -> int:
    return rowcount(session.execute(
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


def mark_delivery_published(session: Session, delivery_id: int, now: datetime | None = None) -> None:
    session.execute(update(Delivery).where(Delivery.id == delivery_id).values(published_at=now or utcnow()))


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
    if rowcount(claimed) == 1:
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


def align_destination_retries(session: Session, destination: str, not_before: datetime) -> int:
    """Waiting deliveries to ``destination`` (pending or retrying) get their next attempt no
    earlier than ``not_before``; returns how many moved. See worker.tasks.deliver._finish_delivery."""
    moved = session.execute(
        update(Delivery).where(Delivery.destination == destination,
                               Delivery.state.in_((DeliveryState.PENDING.value, DeliveryState.RETRYING.value)),
                               (Delivery.next_attempt_at.is_(None)) | (Delivery.next_attempt_at < not_before))
        .values(next_attempt_at=not_before))
    return rowcount(moved)


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
