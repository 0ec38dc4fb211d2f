"""The UPS worklist in the database: workitems, their state machine, subscriptions, events.

What: one UPS workitem (PS3.4 Annex CC) per result, i.e. per scored study version,
created in the worker's transaction that commits the result (:func:`create_workitem`),
and served by the DICOM node (dicom_node.ups) from these rows. Why here: the node and
the workers share no code but ``db``, and a worklist must survive restarts.

State machine (PS3.4 CC.1.1), enforced by :func:`change_state` / :func:`request_cancel`:

==============  ======================  ==========================================
From            To                      When
==============  ======================  ==========================================
SCHEDULED       IN PROGRESS             N-ACTION change state + a new Transaction UID
IN PROGRESS     COMPLETED               same Transaction UID, final state requirements met
IN PROGRESS     CANCELED                same Transaction UID
SCHEDULED       CANCELED                N-ACTION request cancel (no performer yet), or
                                        superseded by a newer study version, or
                                        expired: ``expires_at`` passed (:func:`expire_due`)
==============  ======================  ==========================================

Outcomes are names (``Outcome``); the node maps them to the statuses of PS3.4 CC
(0xC300 may no longer be updated, 0xC301 wrong Transaction UID, 0xC302 already IN
PROGRESS, 0xC303 only N-CREATE makes SCHEDULED, 0xC304 final state requirements,
0xC307 no such workitem, 0xC310 not IN PROGRESS, 0xC311 already COMPLETED, warnings
0xB304/0xB306 already CANCELED/COMPLETED, 0x0124 not authorized: a SCHEDULED workitem
changed by a caller who is no worklist admin).

Superseding: when study version N+1 is scored, the SCHEDULED workitems of older
versions become CANCELED ("superseded by study version N+1"); one IN PROGRESS stays with
its performer, who gets a cancel request. Either way ``superseded_at`` is set and the
item leaves every worklist query (:func:`find_workitems` unless asked by UID).

Events: every change writes one ``ups_events`` row per subscribed AE (global or for the
item); the node sends them as N-EVENT-REPORTs (1 state report, 2 cancel requested,
3 progress report) and retries transient failures. Functions never commit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from sqlalchemy import delete, func, or_, select
from sqlalchemy.orm import Session

from db.models import Instance, Result, Study, UpsEvent, UpsSubscription, UpsWorkitem
from db.priority import RANK
from db.types import utcnow

SCHEDULED, IN_PROGRESS, COMPLETED, CANCELED = "SCHEDULED", "IN PROGRESS", "COMPLETED", "CANCELED"
STATES = (SCHEDULED, IN_PROGRESS, COMPLETED, CANCELED)
FINAL_STATES = (COMPLETED, CANCELED)

EVENT_STATE_REPORT = 1
EVENT_CANCEL_REQUESTED = 2
EVENT_PROGRESS_REPORT = 3

#: Event delivery retries: first after this, doubling, at most EVENT_MAX_ATTEMPTS.
EVENT_RETRY_BASE_S = 2.0
EVENT_MAX_ATTEMPTS = 8

Outcome = Literal[
    "ok", "no_such_workitem", "may_no_longer_be_updated", "wrong_transaction_uid", "already_in_progress",
    "scheduled_only_by_create", "final_state_requirements", "invalid_state", "not_in_progress",
    "already_completed", "already_canceled", "cancel_requested", "not_authorized",
]


def rank(priority: str) -> int:
    return RANK.get(priority, RANK["MEDIUM"])


# -- creation and superseding -----------------------------------------------------------
def create_workitem(session: Session, result: Result, *, sop_instance_uid: str, worklist_label: str,
                    procedure_step_label: str, comments: str | None, inputs: list[dict],
                    now: datetime | None = None, expiry_h: float | None = None) -> UpsWorkitem:
    """The workitem of ``result`` (idempotent: an existing one is returned as is).

    Older study versions' workitems are superseded first. ``inputs``: the referenced
    series, [{study_instance_uid, series_instance_uid, sop_class_uid, sop_instance_uids,
    retrieve_ae_title}]. ``expiry_h``: ``expires_at`` is the scheduled start (arrival)
    plus this many hours (None: never expires).
    """
    now = now or utcnow()
    existing = session.scalar(select(UpsWorkitem).where(UpsWorkitem.result_fk == result.id))
    if existing is not None:
        return existing
    study = session.get_one(Study, result.study_fk)
    supersede_older(session, study.id, result.version, now)
    patient = study.patient
    scheduled_at = study.first_received_at or now
    item = UpsWorkitem(
        sop_instance_uid=sop_instance_uid, result_fk=result.id, study_fk=study.id, study_version=result.version,
        study_instance_uid=study.study_instance_uid, accession_number=study.accession_number,
        patient_id=patient.patient_id or "", issuer_of_patient_id=patient.issuer_of_patient_id or "",
        patient_name=patient.patient_name, patient_birth_date=patient.patient_birth_date,
        patient_sex=patient.patient_sex, study_description=study.study_description,
        priority=result.priority, priority_rank=rank(result.priority), category=result.category,
        worklist_label=worklist_label[:64], procedure_step_label=procedure_step_label[:64], comments=comments,
        state=SCHEDULED, scheduled_at=scheduled_at, input_json=json.dumps(inputs),
        expires_at=None if expiry_h is None else scheduled_at + timedelta(hours=expiry_h),
        created_at=now, updated_at=now)
    session.add(item)
    session.flush()
    emit(session, item, EVENT_STATE_REPORT, {"state": SCHEDULED}, now)
    return item


def supersede_older(session: Session, study_fk: int, version: int, now: datetime | None = None) -> list[int]:
    """Take the workitems of versions below ``version`` off the worklist; returns their ids."""
    now = now or utcnow()
    older = session.scalars(select(UpsWorkitem).where(UpsWorkitem.study_fk == study_fk,
                                                      UpsWorkitem.study_version < version,
                                                      UpsWorkitem.superseded_at.is_(None))).all()
    reason = f"superseded by study version {version}"
    for item in older:
        item.superseded_at = now
        item.updated_at = now
        if item.state == SCHEDULED:
            _cancel(session, item, reason, now)
        elif item.state == IN_PROGRESS:
            emit(session, item, EVENT_CANCEL_REQUESTED, {"reason": reason, "requesting_ae": None}, now)
    return [item.id for item in older]


def _cancel(session: Session, item: UpsWorkitem, reason: str | None, now: datetime) -> None:
    item.state = CANCELED
    item.canceled_at = now
    item.updated_at = now
    item.cancel_reason = reason
    emit(session, item, EVENT_STATE_REPORT, {"state": CANCELED, "reason": reason}, now)


# -- expiry and retention -----------------------------------------------------------------
def expire_due(session: Session, reason: str, now: datetime | None = None, limit: int = 100
               ) -> list[tuple[str, str]]:
    """Cancel SCHEDULED workitems whose ``expires_at`` has passed, with ``reason``; returns
    (workitem UID, Study Instance UID) of those this call cancelled.

    Each item is taken with its row lock and checked again, so of two sweepers (two
    nodes) only one cancels it and emits its state report, and a claim racing the
    sweep either wins (the item is IN PROGRESS: left alone) or finds it CANCELED.
    IN PROGRESS items never expire here. At most ``limit`` per call.
    """
    now = now or utcnow()
    uids = session.scalars(select(UpsWorkitem.sop_instance_uid).where(
        UpsWorkitem.state == SCHEDULED, UpsWorkitem.expires_at.is_not(None), UpsWorkitem.expires_at <= now)
        .order_by(UpsWorkitem.expires_at, UpsWorkitem.id).limit(limit)).all()
    expired = []
    for uid in uids:
        item = get_workitem(session, uid, lock=True)
        if item is None or item.state != SCHEDULED or item.expires_at is None or item.expires_at > now:
            continue
        _cancel(session, item, reason, now)
        expired.append((item.sop_instance_uid, item.study_instance_uid))
    return expired


def delete_final_before(session: Session, cutoff: datetime, limit: int = 1000) -> int:
    """Delete COMPLETED and CANCELED workitems that reached their final state before
    ``cutoff``, with their event and subscription rows (retention); returns how many.

    A workitem under a Deletion Lock (a subscription on it, or a global one, with the
    lock set: PS3.4 CC.2.3) is kept.
    """
    ended = func.coalesce(UpsWorkitem.completed_at, UpsWorkitem.canceled_at, UpsWorkitem.updated_at)
    stmt = select(UpsWorkitem.id).where(UpsWorkitem.state.in_(FINAL_STATES), ended <= cutoff)
    if session.scalar(select(UpsSubscription.id).where(UpsSubscription.workitem_fk.is_(None),
                                                       UpsSubscription.deletion_lock.is_(True)).limit(1)):
        return 0
    locked = select(UpsSubscription.workitem_fk).where(UpsSubscription.deletion_lock.is_(True),
                                                       UpsSubscription.workitem_fk.is_not(None))
    ids = list(session.scalars(stmt.where(UpsWorkitem.id.not_in(locked)).order_by(UpsWorkitem.id).limit(limit)))
    if ids:
        session.execute(delete(UpsEvent).where(UpsEvent.workitem_fk.in_(ids)))
        session.execute(delete(UpsSubscription).where(UpsSubscription.workitem_fk.in_(ids)))
        session.execute(delete(UpsWorkitem).where(UpsWorkitem.id.in_(ids)))
    return len(ids)


def expiry_of_results(session: Session, result_ids: list[int]) -> dict[int, datetime]:
    """``expires_at`` of the SCHEDULED workitems of these results (the worklist page)."""
    if not result_ids:
        return {}
    rows = session.execute(select(UpsWorkitem.result_fk, UpsWorkitem.expires_at).where(
        UpsWorkitem.result_fk.in_(result_ids), UpsWorkitem.state == SCHEDULED,
        UpsWorkitem.expires_at.is_not(None))).all()
    return {result_fk: expires_at for result_fk, expires_at in rows if expires_at is not None}


# -- queries ------------------------------------------------------------------------------
@dataclass
class WorkitemQuery:
    """C-FIND matching keys, already parsed; None means universal matching.

    ``patient_name``/``patient_id``/``worklist_label``: DICOM wildcards ``*`` and ``?``.
    ``scheduled_from``/``scheduled_to``: inclusive range on the scheduled start.
    """

    sop_instance_uids: list[str] = field(default_factory=list)
    priority: str | None = None
    state: str | None = None
    scheduled_from: datetime | None = None
    scheduled_to: datetime | None = None
    patient_id: str | None = None
    patient_name: str | None = None
    study_instance_uids: list[str] = field(default_factory=list)
    accession_number: str | None = None
    worklist_label: str | None = None
    limit: int = 1000


def _like(column, pattern: str):
    if "*" not in pattern and "?" not in pattern:
        return column == pattern
    escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return column.like(escaped.replace("*", "%").replace("?", "_"), escape="\\")


def find_workitems(session: Session, query: WorkitemQuery) -> list[UpsWorkitem]:
    """Matching workitems in worklist order: priority, then arrival (scheduled start), then id.

    Superseded workitems are left out unless asked for by SOP Instance UID.
    """
    stmt = select(UpsWorkitem)
    if query.sop_instance_uids:
        stmt = stmt.where(UpsWorkitem.sop_instance_uid.in_(query.sop_instance_uids))
    else:
        stmt = stmt.where(UpsWorkitem.superseded_at.is_(None))
    if query.priority:
        stmt = stmt.where(UpsWorkitem.priority == query.priority)
    if query.state:
        stmt = stmt.where(UpsWorkitem.state == query.state)
    if query.scheduled_from is not None:
        stmt = stmt.where(UpsWorkitem.scheduled_at >= query.scheduled_from)
    if query.scheduled_to is not None:
        stmt = stmt.where(UpsWorkitem.scheduled_at <= query.scheduled_to)
    if query.patient_id:
        stmt = stmt.where(_like(UpsWorkitem.patient_id, query.patient_id))
    if query.patient_name:
        stmt = stmt.where(_like(UpsWorkitem.patient_name, query.patient_name))
    if query.study_instance_uids:
        stmt = stmt.where(UpsWorkitem.study_instance_uid.in_(query.study_instance_uids))
    if query.accession_number:
        stmt = stmt.where(_like(UpsWorkitem.accession_number, query.accession_number))
    if query.worklist_label:
        stmt = stmt.where(_like(UpsWorkitem.worklist_label, query.worklist_label))
    stmt = stmt.order_by(UpsWorkitem.priority_rank, UpsWorkitem.scheduled_at, UpsWorkitem.id).limit(query.limit)
    return list(session.scalars(stmt).all())


def get_workitem(session: Session, sop_instance_uid: str, *, lock: bool = False) -> UpsWorkitem | None:
    """The workitem; ``lock`` takes its row lock (PostgreSQL ``FOR UPDATE``; SQLite's writes are
    serialised by ``BEGIN IMMEDIATE``) so two claims of one item cannot both succeed."""
    stmt = select(UpsWorkitem).where(UpsWorkitem.sop_instance_uid == sop_instance_uid)
    return session.scalar(stmt.with_for_update().execution_options(populate_existing=True) if lock else stmt)


def instance_refs(session: Session, series_fk: int) -> list[tuple[str, str]]:
    """(SOP Instance UID, SOP Class UID) of a series' instances, in arrival order (Input Information)."""
    return [(uid, cls) for uid, cls in session.execute(
        select(Instance.sop_instance_uid, Instance.sop_class_uid).where(Instance.series_fk == series_fk)
        .order_by(Instance.id)).all()]


def workitem_of_result(session: Session, result_id: int) -> UpsWorkitem | None:
    return session.scalar(select(UpsWorkitem).where(UpsWorkitem.result_fk == result_id))


# -- state changes --------------------------------------------------------------------------
def change_state(  # noqa: C901 - the PS3.4 UPS state table, one check per row; split, it would scatter
    session: Session, sop_instance_uid: str, target: str, transaction_uid: str | None, *,
    performer_ae_title: str | None = None, final_requirements_met: bool = True, now: datetime | None = None,
) -> Outcome:
    """N-ACTION "Change UPS State" (action type 1)."""
    now = now or utcnow()
    item = get_workitem(session, sop_instance_uid, lock=True)
    if item is None:
        return "no_such_workitem"
    if target not in STATES:
        return "invalid_state"
    if target == SCHEDULED:
        return "scheduled_only_by_create"
    if item.state == COMPLETED:
        return "already_completed" if target == COMPLETED else "may_no_longer_be_updated"
    if item.state == CANCELED:
        return "already_canceled" if target == CANCELED else "may_no_longer_be_updated"
    if target == IN_PROGRESS:
        if item.state == IN_PROGRESS:
            return "already_in_progress"
        if not transaction_uid:
            return "wrong_transaction_uid"
        item.state, item.transaction_uid, item.in_progress_at = IN_PROGRESS, transaction_uid, now
        item.performer_ae_title = (performer_ae_title or "")[:16] or None
    else:  # COMPLETED or CANCELED
        if item.state != IN_PROGRESS:
            return "not_in_progress"
        if not transaction_uid or transaction_uid != item.transaction_uid:
            return "wrong_transaction_uid"
        if target == COMPLETED:
            if not final_requirements_met:
                return "final_state_requirements"
            item.state, item.completed_at = COMPLETED, now
        else:
            item.state, item.canceled_at = CANCELED, now
    item.updated_at = now
    emit(session, item, EVENT_STATE_REPORT, {"state": item.state}, now)
    return "ok"


def request_cancel(session: Session, sop_instance_uid: str, *, requesting_ae: str | None, reason: str | None,
                   scheduled_allowed: bool = True, now: datetime | None = None) -> Outcome:
    """N-ACTION "Request UPS Cancel" (action type 2).

    SCHEDULED: we are the only owner, so it is cancelled at once (``ok``) when the caller
    may (``scheduled_allowed``: a worklist admin), else ``not_authorized`` and nothing
    changes. IN PROGRESS: the performer decides; subscribers get a cancel request
    (``cancel_requested``).
    """
    now = now or utcnow()
    item = get_workitem(session, sop_instance_uid, lock=True)
    if item is None:
        return "no_such_workitem"
    if item.state == COMPLETED:
        return "already_completed"
    if item.state == CANCELED:
        return "already_canceled"
    if item.state == SCHEDULED:
        if not scheduled_allowed:
            return "not_authorized"
        _cancel(session, item, reason or f"cancel requested by {requesting_ae or 'a peer'}", now)
        return "ok"
    emit(session, item, EVENT_CANCEL_REQUESTED, {"reason": reason, "requesting_ae": requesting_ae}, now)
    return "cancel_requested"


def update_workitem(session: Session, sop_instance_uid: str, transaction_uid: str | None, *,
                    progress_json: str | None = None, performed_json: str | None = None,
                    scheduled_allowed: bool = True, now: datetime | None = None) -> Outcome:
    """N-SET of progress and completion information (not allowed in a final state).

    IN PROGRESS needs the item's Transaction UID; a SCHEDULED item may be updated
    without one (PS3.4 CC.2.6.3), by a caller allowed to (``scheduled_allowed``: a worklist
    admin), else ``not_authorized`` and nothing changes.
    """
    now = now or utcnow()
    item = get_workitem(session, sop_instance_uid, lock=True)
    if item is None:
        return "no_such_workitem"
    if item.state in FINAL_STATES:
        return "may_no_longer_be_updated"
    if item.state == IN_PROGRESS and transaction_uid != item.transaction_uid:
        return "wrong_transaction_uid"
    if item.state == SCHEDULED and not scheduled_allowed:
        return "not_authorized"
    if progress_json is not None:
        item.progress_json = progress_json
    if performed_json is not None:
        item.performed_json = performed_json
    item.updated_at = now
    if progress_json is not None:
        emit(session, item, EVENT_PROGRESS_REPORT, {"progress_json": progress_json}, now)
    return "ok"


# -- subscriptions and events --------------------------------------------------------------
def subscribe(session: Session, ae_title: str, sop_instance_uid: str | None, deletion_lock: bool = False,
              now: datetime | None = None) -> tuple[Outcome, list[UpsWorkitem]]:
    """Subscribe ``ae_title`` to one workitem (or globally when None).

    Returns the workitems whose current state the subscriber must now be told
    (PS3.4 CC.2.4.3: an initial state report): the one, or every open one.
    """
    now = now or utcnow()
    if sop_instance_uid is None:
        items = list(session.scalars(select(UpsWorkitem).where(UpsWorkitem.state.in_((SCHEDULED, IN_PROGRESS)),
                                                               UpsWorkitem.superseded_at.is_(None))
                                     .order_by(UpsWorkitem.priority_rank, UpsWorkitem.scheduled_at)).all())
        workitem_fk = None
    else:
        item = get_workitem(session, sop_instance_uid)
        if item is None:
            return "no_such_workitem", []
        items, workitem_fk = [item], item.id
    sub = session.scalar(select(UpsSubscription).where(UpsSubscription.ae_title == ae_title,
                                                       UpsSubscription.workitem_fk.is_(None) if workitem_fk is None
                                                       else UpsSubscription.workitem_fk == workitem_fk))
    if sub is None:
        session.add(UpsSubscription(ae_title=ae_title, workitem_fk=workitem_fk, deletion_lock=deletion_lock,
                                    created_at=now))
    else:
        sub.deletion_lock = deletion_lock
    for item in items:
        _add_event(session, item, ae_title, EVENT_STATE_REPORT, {"state": item.state, "initial": True}, now)
    return "ok", items


def unsubscribe(session: Session, ae_title: str, sop_instance_uid: str | None, *, suspend_only: bool = False
                ) -> Outcome:
    """Unsubscribe from one workitem, or globally (all of this AE's subscriptions);
    ``suspend_only`` (action type 5) removes the global subscription and keeps the rest."""
    stmt = delete(UpsSubscription).where(UpsSubscription.ae_title == ae_title)
    if sop_instance_uid is not None:
        item = get_workitem(session, sop_instance_uid)
        if item is None:
            return "no_such_workitem"
        stmt = stmt.where(UpsSubscription.workitem_fk == item.id)
    elif suspend_only:
        stmt = stmt.where(UpsSubscription.workitem_fk.is_(None))
    session.execute(stmt)
    return "ok"


def subscribers(session: Session, item: UpsWorkitem) -> list[str]:
    rows = session.scalars(select(UpsSubscription.ae_title).where(
        or_(UpsSubscription.workitem_fk.is_(None), UpsSubscription.workitem_fk == item.id))).all()
    return sorted(set(rows))


def emit(session: Session, item: UpsWorkitem, event_type: int, payload: dict, now: datetime | None = None) -> int:
    """One pending event row per subscriber of ``item``; returns how many."""
    aes = subscribers(session, item)
    for ae_title in aes:
        _add_event(session, item, ae_title, event_type, payload, now or utcnow())
    return len(aes)


def _add_event(session: Session, item: UpsWorkitem, ae_title: str, event_type: int, payload: dict,
               now: datetime) -> None:
    session.add(UpsEvent(workitem_fk=item.id, ae_title=ae_title, event_type=event_type,
                         payload_json=json.dumps(payload), state="pending", attempts=0, next_attempt_at=now,
                         created_at=now))


def due_events(session: Session, now: datetime | None = None, limit: int = 100) -> list[UpsEvent]:
    now = now or utcnow()
    return list(session.scalars(select(UpsEvent).where(UpsEvent.state == "pending",
                                                       or_(UpsEvent.next_attempt_at.is_(None),
                                                           UpsEvent.next_attempt_at <= now))
                                .order_by(UpsEvent.id).limit(limit)).all())


def finish_event(session: Session, event_id: int, outcome: Literal["sent", "transient", "failed"],
                 error: str | None = None, now: datetime | None = None) -> None:
    now = now or utcnow()
    event = session.get(UpsEvent, event_id)
    if event is None:
        return
    event.attempts += 1
    event.last_error = error
    if outcome == "sent":
        event.state, event.sent_at = "sent", now
    elif outcome == "failed" or event.attempts >= EVENT_MAX_ATTEMPTS:
        event.state = "failed"
    else:
        event.next_attempt_at = now + timedelta(seconds=EVENT_RETRY_BASE_S * 2 ** (event.attempts - 1))
