"""Delivery task bodies: send a result's stored outputs (C-STORE) or HL7 messages, in worklist order.

A delivery row is the outbox: written in the result's transaction, published after its
commit, claimed atomically here, and finished with its outcome (``delivered``,
``retrying`` with the backoff of :mod:`worker.retry`, or ``failed`` with the reason).
"""

from __future__ import annotations

import logging
from typing import Any

from ct_triage import audit
from ct_triage.errors import TransientError
from ct_triage.settings import parse_destination
from ct_triage.text import clean_exception
from db import repository
from db.session import session_scope
from db.states import CLAIMABLE_DELIVERY, FINAL_DELIVERY, DeliveryState
from db.types import utcnow
from worker.retry import backoff_s
from worker.tasks.context import WorkerContext, claim_delivery
from worker.tasks.outputs import stored_outputs

log = logging.getLogger("ct_triage.worker")


def deliver_outputs(ctx: WorkerContext, delivery_id: int) -> str:
    """Send one result's stored SR, SEG and SC files to one destination; classify and record."""
    from worker.delivery.scu import send_instances

    now = utcnow()
    if not claim_delivery(ctx, delivery_id, now):
        return "skipped"
    s = ctx.settings
    with session_scope(ctx.session_factory) as session:
        channel = repository.get_delivery(session, delivery_id).channel
    if channel == "hl7":
        return deliver_hl7(ctx, delivery_id)
    with session_scope(ctx.session_factory) as session:
        destination = parse_destination(repository.start_delivery(session, delivery_id, now).destination)
        result_id = repository.delivery_result(session, delivery_id).id
    try:
        outputs = stored_outputs(ctx, result_id)
    except (OSError, ValueError) as exc:
        return _finish_delivery(ctx, delivery_id, DeliveryState.FAILED, f"cannot build the outputs: {exc}", 0)
    report = send_instances(destination, outputs, calling_ae_title=s.ae_title, acse_timeout=s.acse_timeout_s,
                            dimse_timeout=s.dimse_timeout_s, network_timeout=s.network_timeout_s)
    sent = len(report.delivered_sop_instance_uids)
    if report.delivered_sop_instance_uids or report.outcome != "transient":
        _audit_instances_sent(ctx, delivery_id, destination, set(report.delivered_sop_instance_uids),
                              report.outcome, report.reason)
    return _record_outcome(ctx, delivery_id, destination, report.outcome, report.reason, sent)


def _audit_subject(result) -> dict[str, Any]:
    """The study and patient an audit message about ``result`` names (read inside its session)."""
    study, patient = result.study, result.study.patient
    return {"study_uid": study.study_instance_uid, "patient_id": patient.patient_id if patient else None,
            "patient_name": patient.patient_name if patient else None,
            "issuer_of_patient_id": (patient.issuer_of_patient_id or None) if patient else None,
            "accession": study.accession_number}


def _audit_instances_sent(ctx: WorkerContext, delivery_id: int, destination, delivered: set[str], outcome: str,
                          reason: str | None) -> None:
    """One DICOM Instances Transferred audit message per delivery attempt that sent something
    or failed for good (0: all sent; 4: some or none, with the reason)."""
    with session_scope(ctx.session_factory) as session:
        result = repository.delivery_result(session, delivery_id)
        files = repository.stored_output_files(session, result.id) or []
        sop_classes: dict[str, int] = {}
        for f in files:
            if f.sop_instance_uid in delivered:
                sop_classes[f.sop_class_uid] = sop_classes.get(f.sop_class_uid, 0) + 1
        fields = _audit_subject(result)
    if not sop_classes:  # nothing went: name what was to go
        sop_classes = {f.sop_class_uid: 0 for f in files} or {"1.2.840.10008.5.1.4.1.1.88.34": 0}
    message = audit.instances_transferred(
        ctx.settings, direction="sent", peer_ae=destination.ae_title, peer_address=destination.host,
        sop_classes=sop_classes, outcome=0 if outcome == "delivered" else 4,
        description=None if outcome == "delivered" else reason, **fields)
    audit.record_now(ctx.session_factory, message)


class DeliveryDeferred(TransientError):
    """The delivery is not due yet, or waits behind its destination: its message comes back
    in ``delay_s`` seconds (Celery mode, see :func:`deliver_in_order`)."""

    def __init__(self, message: str, delay_s: float):
        super().__init__(message)
        self.delay_s = delay_s


# Deliveries one message may run ahead of its own before it goes back to the queue (a
# message held for hours would outlive the broker's visibility timeout and run twice).
MAX_AHEAD_PER_MESSAGE = 20
# Added to a deferral so the message finds its delivery due when it comes back.
DEFER_MARGIN_S = 0.5


def deliver_in_order(ctx: WorkerContext, delivery_id: int) -> str:
    """Celery mode: run the due deliveries that go before ``delivery_id``, then it (issue 9).

    A message names one delivery, but the broker hands messages out in the order they
    were published, and a retry comes back when its own backoff expires: neither is
    the worklist order. So a message is a turn at the destination, and the database
    decides whose: each message first sends the deliveries to the same destination
    that rank before its own (HIGH before MEDIUM before LOW, then the oldest:
    :func:`db.repository.deliveries_ahead`, the order of the embedded consumer), claimed
    atomically, so whichever message fires first, HIGH results go out first. Their own
    messages then find them done and are skipped. Within one delivery the SR and SEG
    go before the SC series (the send order of the stored outputs).

    A failure of the destination (TransientError) stops the turn: the failed delivery's
    retry time is applied to every waiting delivery of that destination
    (:func:`_finish_delivery`), and this message is deferred to its own delivery's time
    (:class:`DeliveryDeferred`), as is a message that arrives before its delivery is
    due. When the destination is back, all are due together and go in order. Every
    unfinished delivery keeps a message: its own, or, while another message is sending
    it, that message, which defers itself rather than finish while one ahead failed.
    Broker priorities (redis priority_steps) were not used: they order only messages
    waiting in the queue, not retries held by the worker until their countdown.
    """
    ran = 0
    while ran < MAX_AHEAD_PER_MESSAGE:
        with session_scope(ctx.session_factory) as session:
            ahead = repository.deliveries_ahead(session, delivery_id)
        progressed = False
        for other in ahead[:MAX_AHEAD_PER_MESSAGE - ran]:
            try:
                outcome = deliver_outputs(ctx, other)
            except TransientError as exc:
                return _defer(ctx, delivery_id, f"delivery {other} ahead of it: {exc}")
            except Exception as exc:  # a defect in one delivery must not take this message's turn with it
                log.error("delivery %d (sent ahead of %d) raised %s: %s", other, delivery_id, type(exc).__name__,
                          clean_exception(exc))
                continue
            if outcome != "skipped":
                ran += 1
                progressed = True
        if not progressed:
            break
    if ran >= MAX_AHEAD_PER_MESSAGE:
        raise DeliveryDeferred(f"delivery {delivery_id}: {ran} deliveries ahead of it sent, back in the queue", 0.0)
    with session_scope(ctx.session_factory) as session:
        delivery = repository.get_delivery(session, delivery_id)
        state, next_at = DeliveryState(delivery.state), delivery.next_attempt_at
    now = utcnow()
    if state in FINAL_DELIVERY:
        return f"already {state.value}"
    if state in CLAIMABLE_DELIVERY and next_at is not None and next_at > now:
        return _defer(ctx, delivery_id, "not due yet")
    try:
        return deliver_outputs(ctx, delivery_id)
    except TransientError as exc:
        return _defer(ctx, delivery_id, str(exc))


def _defer(ctx: WorkerContext, delivery_id: int, why: str) -> str:
    """Raise DeliveryDeferred until the delivery's next attempt; its outcome if it is final."""
    with session_scope(ctx.session_factory) as session:
        delivery = repository.get_delivery(session, delivery_id)
        state, next_at = DeliveryState(delivery.state), delivery.next_attempt_at
    if state in FINAL_DELIVERY:
        return f"already {state.value}"
    delay = ctx.settings.retry_base_s if next_at is None else max(0.0, (next_at - utcnow()).total_seconds())
    raise DeliveryDeferred(f"delivery {delivery_id} deferred {delay:.1f} s: {why}", delay + DEFER_MARGIN_S)


def deliver_hl7(ctx: WorkerContext, delivery_id: int) -> str:
    """Send one result's order update + ORU^R01 to one RIS over MLLP (worker.worklist.hl7).

    ``instances_sent`` counts the messages the RIS has acknowledged (AA), so a retry
    resumes after them and each message is accepted once.
    """
    from worker.worklist.hl7 import Hl7Context, build_messages, send_messages

    s = ctx.settings
    reason = None
    with session_scope(ctx.session_factory) as session:
        delivery = repository.get_delivery(session, delivery_id)
        destination = delivery.destination
        already = delivery.instances_sent or 0
        try:
            messages = build_messages(Hl7Context.from_result(session, delivery.result, s))
        except ValueError as exc:
            reason = f"cannot build the HL7 messages: {exc}"
            messages = None
    if messages is None:
        return _finish_delivery(ctx, delivery_id, DeliveryState.FAILED, reason, already)
    report = send_messages(destination, messages[already:], timeout_s=s.hl7_ack_timeout_s, settings=s)
    sent = already + report.accepted
    _audit_hl7(ctx, delivery_id, destination, messages[already:], report.accepted, report.outcome, report.reason)
    return _record_outcome(ctx, delivery_id, destination, report.outcome, report.reason, sent)


def _audit_hl7(ctx: WorkerContext, delivery_id: int, destination: str, messages: list, accepted: int, outcome: str,
               reason: str | None) -> None:
    """One audit message per HL7 message acknowledged (outcome 0), and one for the message that
    failed for good (outcome 4)."""
    tried = messages[:accepted] + (messages[accepted:accepted + 1] if outcome == "permanent" else [])
    if not tried:
        return
    with session_scope(ctx.session_factory) as session:
        result = repository.delivery_result(session, delivery_id)
        fields = _audit_subject(result)
    for index, message in enumerate(tried):
        msh = message.segment("MSH")
        kind = str(msh(9))
        ok = index < accepted
        audit.record_now(ctx.session_factory, audit.hl7_sent(
            ctx.settings, destination=str(destination), message_type=kind, control_id=str(msh(10)),
            outcome=0 if ok else 4, error=None if ok else reason, **fields))


def _record_outcome(ctx: WorkerContext, delivery_id: int, destination: object, outcome: str,
                    reason: str | None, sent: int) -> str:
    """Record a send's outcome (``delivered``, ``transient``: retrying, and TransientError
    raised so the queue retries; else failed) with what it sent so far."""
    if outcome == "delivered":
        return _finish_delivery(ctx, delivery_id, DeliveryState.DELIVERED, None, sent)
    if outcome == "transient":
        _finish_delivery(ctx, delivery_id, DeliveryState.RETRYING, reason, sent)
        raise TransientError(f"delivery {delivery_id} to {destination}: {reason}")
    return _finish_delivery(ctx, delivery_id, DeliveryState.FAILED, reason, sent)


def _finish_delivery(ctx: WorkerContext, delivery_id: int, state: DeliveryState, reason: str | None,
                     sent: int) -> str:
    with session_scope(ctx.session_factory) as session:
        delivery = repository.finish_delivery(
            session, delivery_id, state, reason, sent,
            retry_delay_s=lambda attempts: backoff_s(attempts, ctx.settings.retry_base_s,
                                                      ctx.settings.retry_max_s))
        destination = delivery.destination
        attempts = delivery.attempts
        if state is DeliveryState.RETRYING and delivery.next_attempt_at is not None:
            # The destination is down for everyone: its other waiting deliveries retry no
            # earlier than this one, so that when it is back they are all due together and
            # go in worklist order (HIGH first), not in the order their own backoffs expire.
            # (A Celery message arriving before its moved time is deferred, see deliver_in_order.)
            repository.align_destination_retries(session, destination, delivery.next_attempt_at)
    level = logging.INFO if state is DeliveryState.DELIVERED else logging.WARNING
    log.log(level, "delivery %d to %s: %s after %d attempt(s)%s", delivery_id, destination, state.value, attempts,
            f": {reason}" if reason else "")
    return state.value
