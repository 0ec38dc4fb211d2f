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
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from ct_triage.contract import DELIVER_OUTPUTS, Publisher
from ct_triage.errors import TransientError
from ct_triage.settings import Settings, parse_destination
from db import repository
from db.models import Delivery, Instance, Job, Result, Series, Study
from db.session import session_scope
from db.states import SeriesState
from db.types import utcnow
from worker import priors

log = logging.getLogger("ct_triage.worker")

# A claimed row whose worker is gone is taken over after this long (another host)
# or at once (same host, process no longer alive).
CLAIM_LEASE_S = 1800
CT_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1")
BACKOFF_BASE_S = 5.0  # default of CT_TRIAGE_RETRY_BASE_S
BACKOFF_MAX_S = 600.0


@dataclass
class WorkerContext:
    settings: Settings
    session_factory: sessionmaker[Session]
    publisher: Publisher
    worker_name: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    scorer: object | None = None  # built once per process by the pipeline when None


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


def claim_job(ctx: WorkerContext, job_id: int) -> bool:
    now = utcnow()
    with session_scope(ctx.session_factory) as session:
        if repository.claim_job(session, job_id, ctx.worker_name, now):
            return True
        job = session.get(Job, job_id)
        if job is None or job.state != "running":
            return False
        if job.worker != ctx.worker_name and not _reclaimable(job.started_at, job.worker, now):
            return False
        taken = session.execute(update(Job).where(Job.id == job_id, Job.state == "running",
                                                  Job.worker == job.worker)
                                .values(worker=ctx.worker_name, started_at=now, attempts=Job.attempts + 1))
        if taken.rowcount == 1:
            log.warning("job %d: taking over from %s, which is gone", job_id, job.worker)
        return taken.rowcount == 1


def _series_files(session: Session, study: Study, storage_dir: Path) -> dict[str, list[Path]]:
    files: dict[str, list[Path]] = {}
    for series in study.series:
        if series.sop_class_uid not in CT_SOP_CLASSES:
            continue
        paths = session.scalars(select(Instance.path).where(Instance.series_fk == series.id)
                                .order_by(Instance.id)).all()
        files[series.series_instance_uid] = [storage_dir / p for p in paths]
    return files


def score_study(ctx: WorkerContext, job_id: int) -> str:
    """Score one study version; writes a Result, moves series states, queues deliveries."""
    if not claim_job(ctx, job_id):
        log.info("job %d already taken or finished: skipped", job_id)
        return "skipped"
    started_at = utcnow()
    storage_dir = ctx.settings.effective_storage_dir
    with session_scope(ctx.session_factory) as session:
        job = session.get(Job, job_id)
        study = job.study
        version = job.study_version
        if session.scalar(select(Result.id).where(Result.study_fk == study.id, Result.version == version)):
            job.state, job.finished_at = "done", utcnow()
            return "already scored"
        for series in study.series:
            if series.state == SeriesState.QUEUED.value:
                repository.transition(session, series, SeriesState.SCORING, f"job {job_id}", started_at)
        series_files = _series_files(session, study, storage_dir)
        received_at = max((s.last_received_at for s in study.series), default=None)
        stable_at = max((s.stable_at for s in study.series if s.stable_at), default=None)
        study_uid = study.study_instance_uid

    from worker.scoring.pipeline import score_study as run_pipeline
    from worker.scoring.result import ScoreResult

    try:
        score = run_pipeline(series_files, ctx.settings, scorer=ctx.scorer)
    except Exception as exc:  # a bug must still leave a MEDIUM-priority result with the reason
        log.exception("job %d: scoring crashed", job_id)
        score = ScoreResult(status="failed", reason=f"internal error: {type(exc).__name__}: {exc}"[:500])
    score.study_instance_uid = study_uid
    scored_at = utcnow()
    destinations = [str(parse_destination(d)) for d in ctx.settings.destinations]
    delivery_ids: list[int] = []
    with session_scope(ctx.session_factory) as session:
        job = session.get(Job, job_id)
        study = job.study
        chosen = next((s for s in study.series if s.series_instance_uid == score.series_instance_uid), None)
        followup = priors.prepare(session, study, chosen.id if chosen else None, score, ctx.settings)  # issue 12
        result = Result(study_fk=study.id, job_fk=job_id, version=version, series_fk=chosen.id if chosen else None,
                        status=score.status, reason=score.reason, category=score.category,
                        priority=score.priority, involvement_percent=score.involvement_percent,
                        involvement_percent_left=score.involvement_percent_left,
                        involvement_percent_right=score.involvement_percent_right,
                        lung_volume_ml=score.lung_volume_ml, lesion_volume_ml=score.lesion_volume_ml,
                        lesion_count=score.lesion_count, model=score.model, model_version=score.model_version,
                        device=score.device, seconds=score.seconds, result_json=json.dumps(score.to_json()),
                        received_at=received_at, stable_at=stable_at, scoring_started_at=started_at,
                        scored_at=scored_at)
        session.add(result)
        session.flush()
        result_id = result.id
        followup.record(session, result)
        _settle_series(session, study, chosen, score, scored_at)
        job.state, job.finished_at, job.error = "done", scored_at, score.reason if score.status == "failed" else None
        if chosen is not None and not followup.is_prior:  # a retrieved prior is only compared with
            for destination in destinations:
                delivery = Delivery(result_fk=result.id, destination=destination, state="pending",
                                    created_at=scored_at)
                session.add(delivery)
                session.flush()
                delivery_ids.append(delivery.id)
    log.info("study %s version %d: %s %s %s%% priority %s in %.2f s (%s)", study_uid, version, score.status,
             score.category or "-", f"{score.involvement_percent:.1f}" if score.involvement_percent is not None
             else "-", score.priority, score.seconds, score.reason or score.model)
    publish_deliveries(ctx, delivery_ids)
    priors.after_result(ctx, result_id)  # later studies it is a prior of; PACS prior searches
    return score.status


def _settle_series(session: Session, study: Study, chosen: Series | None, score, now: datetime) -> None:
    for series in study.series:
        if series.state != SeriesState.SCORING.value:
            continue
        if chosen is not None and series.id == chosen.id:
            target = {"scored": SeriesState.SCORED, "failed": SeriesState.FAILED}.get(score.status,
                                                                                    SeriesState.NOT_APPLICABLE)
            repository.transition(session, series, target, score.reason, now)
        elif score.status == "failed" and chosen is None:
            repository.transition(session, series, SeriesState.FAILED, score.reason, now)
        else:
            reason = (f"not selected: series {score.series_instance_uid} was scored" if chosen is not None
                      else score.reason)
            repository.transition(session, series, SeriesState.NOT_APPLICABLE, reason, now)


def publish_deliveries(ctx: WorkerContext, delivery_ids: list[int]) -> None:
    """Publish after the commit; a failure leaves published_at empty for the sweeper."""
    for delivery_id in delivery_ids:
        try:
            ctx.publisher.publish(DELIVER_OUTPUTS, delivery_id)
        except Exception as exc:
            log.warning("publishing delivery %d failed, will retry: %s", delivery_id, exc)
            continue
        with session_scope(ctx.session_factory) as session:
            session.execute(update(Delivery).where(Delivery.id == delivery_id).values(published_at=utcnow()))


def backoff_s(attempts: int, base_s: float = BACKOFF_BASE_S) -> float:
    return min(BACKOFF_MAX_S, base_s * 2 ** max(0, attempts - 1))


def claim_delivery(ctx: WorkerContext, delivery_id: int, now: datetime) -> bool:
    with session_scope(ctx.session_factory) as session:
        claimed = session.execute(
            update(Delivery).where(Delivery.id == delivery_id, Delivery.state.in_(("pending", "retrying")),
                                   or_(Delivery.next_attempt_at.is_(None), Delivery.next_attempt_at <= now))
            .values(state="sending", attempts=Delivery.attempts + 1, next_attempt_at=now,
                    last_error=None)).rowcount == 1
        if claimed:
            return True
        delivery = session.get(Delivery, delivery_id)
        if delivery is None or delivery.state != "sending":
            return False
        if not _reclaimable(delivery.next_attempt_at, delivery.worker, now):
            return False
        log.warning("delivery %d: taking over from %s, which is gone", delivery_id, delivery.worker)
        delivery.attempts += 1
        delivery.next_attempt_at = now
        return True


def load_result(session: Session, result: Result):
    from worker.scoring.result import ScoreResult

    return ScoreResult.from_json(json.loads(result.result_json))


def source_datasets(session: Session, result: Result, score, storage_dir: Path) -> list:
    """The scored series' instances, full, in the order the result refers to them."""
    from pydicom import dcmread

    rows = session.execute(select(Instance.sop_instance_uid, Instance.path)
                           .where(Instance.series_fk == result.series_fk)).all()
    by_uid = {uid: path for uid, path in rows}
    order = score.source_sop_instance_uids or sorted(by_uid)
    missing = [uid for uid in order if uid not in by_uid]
    if missing:
        raise ValueError(f"{len(missing)} source instance(s) of result {result.id} are not stored")
    return [dcmread(storage_dir / by_uid[uid]) for uid in order]


def build_outputs(session: Session, result: Result, storage_dir: Path) -> list:
    """SC series + SR for a result; deterministic, so a retry sends identical objects."""
    from worker.outputs.sc import build_secondary_capture_series
    from worker.outputs.sr import build_measurement_report

    score = load_result(session, result)
    datasets = source_datasets(session, result, score, storage_dir)
    created_at = result.scored_at
    sc = build_secondary_capture_series(datasets, score, result.version, created_at=created_at)
    sr = build_measurement_report(datasets, score, result.version, created_at=created_at)
    return [*sc, sr]


def deliver_outputs(ctx: WorkerContext, delivery_id: int) -> str:
    """Send one result's SC + SR to one destination; classify and record what happened."""
    from worker.delivery.scu import send_instances

    now = utcnow()
    if not claim_delivery(ctx, delivery_id, now):
        return "skipped"
    s = ctx.settings
    with session_scope(ctx.session_factory) as session:
        delivery = session.get(Delivery, delivery_id)
        delivery.worker = ctx.worker_name
        result = delivery.result
        destination = parse_destination(delivery.destination)
        if result.series_fk is not None:
            series = session.get(Series, result.series_fk)
            if series.state == SeriesState.SCORED.value:
                repository.transition(session, series, SeriesState.DELIVERING, f"to {destination}", now)
    try:
        with session_scope(ctx.session_factory) as session:
            outputs = build_outputs(session, session.get(Delivery, delivery_id).result, s.effective_storage_dir)
    except (OSError, ValueError) as exc:
        return _finish_delivery(ctx, delivery_id, "failed", f"cannot build the outputs: {exc}", 0)
    report = send_instances(destination, outputs, calling_ae_title=s.ae_title, acse_timeout=s.acse_timeout_s,
                            dimse_timeout=s.dimse_timeout_s, network_timeout=s.network_timeout_s)
    sent = len(report.delivered_sop_instance_uids)
    if report.outcome == "delivered":
        return _finish_delivery(ctx, delivery_id, "delivered", None, sent)
    if report.outcome == "transient":
        _finish_delivery(ctx, delivery_id, "retrying", report.reason, sent)
        raise TransientError(f"delivery {delivery_id} to {destination}: {report.reason}")
    return _finish_delivery(ctx, delivery_id, "failed", report.reason, sent)


def _finish_delivery(ctx: WorkerContext, delivery_id: int, state: str, reason: str | None, sent: int) -> str:
    now = utcnow()
    with session_scope(ctx.session_factory) as session:
        delivery = session.get(Delivery, delivery_id)
        delivery.state = state
        delivery.worker = None
        delivery.last_error = reason
        delivery.instances_sent = sent
        if state == "retrying":
            delivery.next_attempt_at = now + timedelta(seconds=backoff_s(delivery.attempts,
                                                                         ctx.settings.retry_base_s))
        if state == "delivered":
            delivery.delivered_at = now
        result = delivery.result
        states = {d.state for d in result.deliveries}
        series = session.get(Series, result.series_fk) if result.series_fk else None
        if states == {"delivered"}:
            result.delivered_at = now
            if series is not None and series.state == SeriesState.DELIVERING.value:
                repository.transition(session, series, SeriesState.DELIVERED, None, now)
        destination = delivery.destination
        attempts = delivery.attempts
    level = logging.INFO if state == "delivered" else logging.WARNING
    log.log(level, "delivery %d to %s: %s after %d attempt(s)%s", delivery_id, destination, state, attempts,
            f": {reason}" if reason else "")
    return state


def due_delivery_ids(session: Session, now: datetime | None = None) -> list[int]:
    now = now or utcnow()
    return list(session.scalars(
        select(Delivery.id).where(Delivery.state.in_(("pending", "retrying")),
                                  or_(Delivery.next_attempt_at.is_(None), Delivery.next_attempt_at <= now))
        .order_by(Delivery.id)).all())
