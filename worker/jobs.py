"""Task bodies: plain functions of (context, ID), testable without a broker.

The Celery tasks (worker.celery_app) and the embedded consumer (worker.embedded)
both call these. Each body is idempotent: it claims its row atomically, so a
duplicate message does nothing, while a message redelivered because its worker
died (SIGKILL, lost node) may reclaim the row (see ``_reclaimable``).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from ct_triage.contract import CT_IMAGE_SOP_CLASSES, DELIVER_OUTPUTS, Publisher, publish_in_order
from ct_triage.errors import TransientError
from ct_triage.settings import Settings, parse_destination
from ct_triage.text import clean_exception
from db import repository
from db.models import Result, Series, Study
from db.priority import priority_for
from db.session import session_scope
from db.states import CLAIMABLE_DELIVERY, FINAL_DELIVERY, DeliveryState, SeriesState
from db.types import utcnow
from worker import priors
from worker.scoring.base import Scorer
from worker.scoring.result import ScoreResult
from worker.worklist import add_worklist_entries

log = logging.getLogger("ct_triage.worker")

# A claimed row whose worker is gone is taken over after this long (another host)
# or at once (same host, process no longer alive).
CLAIM_LEASE_S = 1800
BACKOFF_BASE_S = 5.0  # default of CT_TRIAGE_RETRY_BASE_S
BACKOFF_MAX_S = 600.0


@dataclass
class WorkerContext:
    settings: Settings
    session_factory: sessionmaker[Session]
    publisher: Publisher
    worker_name: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    scorer: Scorer | None = None  # built once per process by the pipeline when None


def _holder_is_dead(holder: str | None) -> bool:
    """True when ``holder`` ("host:pid") is a process of this host that no longer runs."""
    if not holder or ":" not in holder:
        return False
    host, _, pid = holder.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return int(pid) != os.getpid() and _is_zombie(int(pid))


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return False


def _reclaimable(started_at: datetime | None, holder: str | None, now: datetime) -> bool:
    stale = started_at is not None and started_at < now - timedelta(seconds=CLAIM_LEASE_S)
    return stale or _holder_is_dead(holder)


def _may_take(now: datetime):
    return lambda since, holder: _reclaimable(since, holder, now)


def claim_job(ctx: WorkerContext, job_id: int) -> bool:
    now = utcnow()
    with session_scope(ctx.session_factory) as session:
        if repository.claim_job(session, job_id, ctx.worker_name, now):
            return True
        holder = repository.take_over_job(session, job_id, ctx.worker_name, _may_take(now), now)
        if holder is not None:
            log.warning("job %d: taking over from %s, which is gone", job_id, holder or None)
        return holder is not None


def score_study(ctx: WorkerContext, job_id: int) -> str:
    """Score one study version; writes a Result, moves series states, queues deliveries.

    When the database fails under a claimed job (a restart, a deadlock with the indexer),
    the job is handed back to the queue at once instead of staying claimed by this live
    worker until its lease ends (CLAIM_LEASE_S); the error is raised for the caller's retry.
    """
    if not claim_job(ctx, job_id):
        log.info("job %d already taken or finished: skipped", job_id)
        return "skipped"
    try:
        return _score_claimed(ctx, job_id)
    except SQLAlchemyError:
        try:
            with session_scope(ctx.session_factory) as session:
                if repository.release_job(session, job_id, ctx.worker_name):
                    log.warning("job %d: database error while scoring, handed back to the queue", job_id)
        except SQLAlchemyError:
            log.warning("job %d: database error while scoring; it stays claimed until its lease ends", job_id)
        raise


def _score_claimed(ctx: WorkerContext, job_id: int) -> str:
    started_at = utcnow()
    storage_dir = ctx.settings.effective_storage_dir
    with session_scope(ctx.session_factory) as session:
        job = repository.get_job(session, job_id)
        study = job.study
        version = job.study_version
        if repository.result_exists(session, study.id, version):
            repository.finish_job(session, job, utcnow())
            return "already scored"
        for series in repository.lock_study_series(session, study.id):
            if series.state == SeriesState.QUEUED.value:
                repository.transition(session, series, SeriesState.SCORING, f"job {job_id}", started_at)
        series_files = repository.series_files(session, study, storage_dir, CT_IMAGE_SOP_CLASSES)
        received_at = max((s.last_received_at for s in study.series), default=None)
        stable_at = max((s.stable_at for s in study.series if s.stable_at), default=None)
        study_uid = study.study_instance_uid

    from worker.scoring.pipeline import score_study as run_pipeline  # numpy, scipy, the scorer

    try:
        score = run_pipeline(series_files, ctx.settings, scorer=ctx.scorer)
    except Exception as exc:  # a bug must still leave a MEDIUM-priority result with the reason
        log.exception("job %d: scoring crashed", job_id)
        score = ScoreResult(status="failed", reason=f"internal error: {type(exc).__name__}: {exc}"[:500])
    score.study_instance_uid = study_uid
    # The one priority rule (db.priority), as configured: stored, sent and rendered alike.
    score.assigned_priority = priority_for(score.status, score.category, ctx.settings.priorities)
    masks_path = _store_masks(storage_dir, study_uid, version, score)
    scored_at = utcnow()
    destinations = [str(parse_destination(d)) for d in ctx.settings.destinations]
    delivery_ids: list[int] = []
    with session_scope(ctx.session_factory) as session:
        job = repository.get_job(session, job_id)
        study = job.study
        chosen = next((s for s in study.series if s.series_instance_uid == score.series_instance_uid), None)
        followup = priors.prepare(session, study, chosen.id if chosen else None, score, ctx.settings)  # issue 12
        # A progression raises the category: the priority follows it (the same configured rule).
        score.assigned_priority = priority_for(score.status, score.category, ctx.settings.priorities)
        result = repository.add_result(session, job, chosen.id if chosen else None, {
            "status": score.status, "reason": score.reason, "category": score.category, "priority": score.priority,
            "involvement_percent": score.involvement_percent,
            "involvement_percent_left": score.involvement_percent_left,
            "involvement_percent_right": score.involvement_percent_right,
            "lung_volume_ml": score.lung_volume_ml, "lesion_volume_ml": score.lesion_volume_ml,
            "lesion_count": score.lesion_count, "model": score.model, "model_version": score.model_version,
            "device": score.device, "seconds": score.seconds, "result_json": json.dumps(score.to_json()),
            "received_at": received_at, "stable_at": stable_at, "scoring_started_at": started_at,
            "scored_at": scored_at, "masks_path": masks_path})
        result_id = result.id
        followup.record(session, result)
        _settle_series(session, study, chosen, score, scored_at, ctx.settings.lung_kernels)
        repository.finish_job(session, job, scored_at, score.reason if score.status == "failed" else None)
        if chosen is not None and not followup.is_prior:  # a retrieved prior is only compared with
            delivery_ids = repository.add_deliveries(session, result, destinations, scored_at)
        if not followup.is_prior:  # a retrieved prior never reaches a worklist
            # The UPS workitem (superseding older versions') and the HL7 outbox rows, same transaction;
            # an unscored study is on it too (MEDIUM, with its reason).
            delivery_ids += add_worklist_entries(session, ctx.settings, result, score)
    log.info("study %s version %d: %s %s %s%% priority %s in %.2f s (%s)", study_uid, version, score.status,
             score.category or "-", f"{score.involvement_percent:.1f}" if score.involvement_percent is not None
             else "-", score.priority, score.seconds, score.reason or score.model)
    publish_deliveries(ctx, delivery_ids)
    priors.after_result(ctx, result_id)  # later studies it is a prior of; PACS prior searches
    return score.status


def _store_masks(storage_dir: Path, study_uid: str, version: int, score) -> str | None:
    """Store the result's masks (for the SEG and the SR) durably; None when there are none.

    Written before the result row commits, so a row never names a missing file. A
    failure costs the SEG and the per-lesion SR groups of this version, not the result.
    """
    if score.masks is None:
        return None
    from worker.outputs.stored import masks_relpath
    from worker.scoring.masks import save_masks

    relpath = masks_relpath(study_uid, version)
    try:
        save_masks(storage_dir / relpath, score.masks)
    except OSError as exc:
        log.warning("study version %d: cannot store the result masks (no SEG for it): %s", version, exc)
        return None
    return relpath


def _settle_series(session: Session, study: Study, chosen: Series | None, score, now: datetime,
                   lung_kernels: list[str] | None = None) -> None:
    from worker.scoring.select import not_selected_reason

    for series in repository.lock_study_series(session, study.id):
        if series.state != SeriesState.SCORING.value:
            continue
        if chosen is not None and series.id == chosen.id:
            target = {"scored": SeriesState.SCORED, "failed": SeriesState.FAILED}.get(score.status,
                                                                                    SeriesState.NOT_APPLICABLE)
            repository.transition(session, series, target, score.reason, now)
        elif score.status == "failed" and chosen is None:
            repository.transition(session, series, SeriesState.FAILED, score.reason, now)
        else:
            reason = (not_selected_reason(series, chosen, lung_kernels) if chosen is not None
                      else score.reason)
            repository.transition(session, series, SeriesState.NOT_APPLICABLE, reason, now)


def publish_deliveries(ctx: WorkerContext, delivery_ids: list[int]) -> None:
    """Publish after the commit; what cannot be published keeps published_at empty for the
    node's sweeper (:meth:`dicom_node.completeness.CompletenessTracker.publish_pending`)."""

    def mark(delivery_id: int) -> None:
        with session_scope(ctx.session_factory) as session:
            repository.mark_delivery_published(session, delivery_id)

    publish_in_order(ctx.publisher, DELIVER_OUTPUTS, delivery_ids, mark)


def backoff_s(attempts: int, base_s: float = BACKOFF_BASE_S, max_s: float = BACKOFF_MAX_S) -> float:
    """Seconds before retry number ``attempts`` (1, 2, ...): ``base_s`` doubled per attempt,
    at most ``max_s`` (CT_TRIAGE_RETRY_MAX_S, default BACKOFF_MAX_S = 600 s)."""
    return min(max_s, base_s * 2 ** max(0, attempts - 1))


def claim_delivery(ctx: WorkerContext, delivery_id: int, now: datetime) -> bool:
    with session_scope(ctx.session_factory) as session:
        holder = repository.claim_delivery(session, delivery_id, ctx.worker_name, _may_take(now), now)
    if holder:
        log.warning("delivery %d: taking over from %s, which is gone", delivery_id, holder)
    return holder is not None


def load_result(session: Session, result: Result):
    return ScoreResult.from_json(json.loads(result.result_json))


def source_datasets(session: Session, result: Result, score, storage_dir: Path) -> list:
    """The scored series' instances, full, in the order the result refers to them."""
    from pydicom import dcmread

    by_uid = repository.instance_paths(session, result.series_fk)
    order = score.source_sop_instance_uids or sorted(by_uid)
    missing = [uid for uid in order if uid not in by_uid]
    if missing:
        raise ValueError(f"{len(missing)} source instance(s) of result {result.id} are not stored")
    return [dcmread(storage_dir / by_uid[uid]) for uid in order]


def build_outputs(session: Session, result: Result, storage_dir: Path, settings: Settings | None = None) -> list:
    """SR, SEG and SC series of a result as ``(role, Dataset)``; deterministic, so a
    rebuild gives identical bytes. Reads the source instances and the stored masks."""
    from worker.outputs.stored import build_output_datasets
    from worker.scoring.masks import load_masks

    settings = settings or Settings()
    score = load_result(session, result)
    datasets = source_datasets(session, result, score, storage_dir)
    masks = None
    if result.masks_path:
        try:
            masks = load_masks(storage_dir / result.masks_path)
        except (OSError, ValueError) as exc:
            log.warning("result %d: stored masks unreadable, no SEG: %s", result.id, exc)
    return build_output_datasets(datasets, score, result.version, created_at=result.scored_at, masks=masks,
                                 sc_compression=settings.sc_compression, sc_max_slices=settings.sc_max_slices,
                                 seg_compression=settings.seg_compression, sr_max_lesions=settings.sr_max_lesions)


def stored_outputs(ctx: WorkerContext, result_id: int) -> list[Path]:
    """The result's output files in send order: built and stored on first use, then reused.

    Build once, send many (issue 9): the first call builds the SR, SEG and SC series,
    writes them durably and records them; later calls (retries, other destinations)
    return the recorded files without reading any source. Files recorded but gone
    (storage wiped by hand) are rebuilt.
    """
    from worker.outputs.stored import result_folder, write_outputs

    storage_dir = ctx.settings.effective_storage_dir
    with session_scope(ctx.session_factory) as session:
        files = repository.stored_output_files(session, result_id)
        if files is not None:
            paths = [storage_dir / f.path for f in files]
            if all(p.is_file() for p in paths):
                return paths
            log.warning("result %d: %d stored output file(s) missing, rebuilding", result_id,
                        sum(not p.is_file() for p in paths))
            repository.forget_output_files(session, result_id)
    started = time.monotonic()
    with session_scope(ctx.session_factory) as session:
        result = session.get_one(Result, result_id)
        items = build_outputs(session, result, storage_dir, ctx.settings)
        folder = result_folder(result.study.study_instance_uid, result.version)
    written = write_outputs(storage_dir, folder, items)
    with session_scope(ctx.session_factory) as session:
        recorded = repository.record_output_files(session, result_id, [vars(f) for f in written])
    log.info("result %d: built %d output instance(s), %.1f MB, in %.2f s%s", result_id, len(written),
             sum(f.size_bytes for f in written) / 1e6, time.monotonic() - started,
             "" if recorded else " (another worker recorded them first)")
    return [storage_dir / f.path for f in written]


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
    return _record_outcome(ctx, delivery_id, destination, report.outcome, report.reason, sent)


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
    if next_at is None:
        delay = ctx.settings.retry_base_s
    else:
        delay = max(0.0, (next_at - utcnow()).total_seconds())
    raise DeliveryDeferred(f"delivery {delivery_id} deferred {delay:.1f} s: {why}", delay + DEFER_MARGIN_S)


def deliver_hl7(ctx: WorkerContext, delivery_id: int) -> str:
    """Send one result's order update + ORU^R01 to one RIS over MLLP (worker.delivery.hl7).

    ``instances_sent`` counts the messages the RIS has acknowledged (AA), so a retry
    resumes after them and each message is accepted once.
    """
    from worker.delivery.hl7 import Hl7Context, build_messages, send_messages

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
    report = send_messages(destination, messages[already:], timeout_s=s.hl7_ack_timeout_s)
    sent = already + report.accepted
    return _record_outcome(ctx, delivery_id, destination, report.outcome, report.reason, sent)


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
