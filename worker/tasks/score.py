"""The scoring job: one study version from received series to result, worklist entries and outbox.

A job runs as steps, each with its own transaction boundary (one ``session_scope``):

1. :func:`start_scoring` (transaction): the job's row is claimed, its study's queued
   series move to ``scoring``, and the files of the CT series are read from the index.
2. :func:`run_scorer` (no transaction): series selection and the scorer
   (:mod:`worker.scoring.pipeline`), then the masks stored durably (before any row names them).
3. :func:`record_result` (one transaction, so that the result and everything it causes
   commit together or not at all): follow-up comparison with the local priors
   (:mod:`worker.followup.priors`, which may raise the category), the result row, the
   series' final states, the DICOM deliveries (outbox rows) and the worklist entries
   (:mod:`worker.worklist.entries`: the UPS workitem, the HL7 outbox rows).
4. After the commit: the deliveries are published, then the follow-up of other studies
   (:func:`worker.tasks.followup.after_result`: later studies this one is a prior of,
   PACS prior searches).

The outputs (SR, SEG, SC) are built by the first delivery (:mod:`worker.tasks.outputs`).
Each body is idempotent: it claims its row atomically, so a duplicate message does
nothing (:mod:`worker.tasks.context`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from ct_triage.contract import CT_IMAGE_SOP_CLASSES, DELIVER_OUTPUTS, publish_in_order
from ct_triage.settings import parse_destination
from db import repository
from db.models import Series, Study
from db.priority import priority_for
from db.session import session_scope
from db.states import SeriesState
from db.types import utcnow
from worker.followup import priors
from worker.scoring.result import ScoreResult
from worker.scoring.select import not_selected_reason
from worker.tasks.context import WorkerContext, claim_job
from worker.tasks.followup import after_result
from worker.worklist.entries import add_worklist_entries

log = logging.getLogger("ct_triage.worker")


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



@dataclass
class ScoringInput:
    """What step 1 read for the scorer: the study version and its CT series' files."""

    study_uid: str
    version: int
    series_files: dict
    received_at: datetime | None
    stable_at: datetime | None
    started_at: datetime


def _score_claimed(ctx: WorkerContext, job_id: int) -> str:
    inputs = start_scoring(ctx, job_id)
    if inputs is None:
        return "already scored"
    score, masks_path = run_scorer(ctx, job_id, inputs)
    result_id, delivery_ids = record_result(ctx, job_id, inputs, score, masks_path)
    publish_deliveries(ctx, delivery_ids)
    after_result(ctx, result_id)
    return score.status


def start_scoring(ctx: WorkerContext, job_id: int) -> ScoringInput | None:
    """Step 1: move the study's queued series to ``scoring`` and read their files; None when
    this version already has a result (the job is then finished)."""
    started_at = utcnow()
    with session_scope(ctx.session_factory) as session:
        job = repository.get_job(session, job_id)
        study = job.study
        version = job.study_version
        if repository.result_exists(session, study.id, version):
            repository.finish_job(session, job, utcnow())
            return None
        for series in repository.lock_study_series(session, study.id):
            if series.state == SeriesState.QUEUED.value:
                repository.transition(session, series, SeriesState.SCORING, f"job {job_id}", started_at)
        return ScoringInput(
            study_uid=study.study_instance_uid, version=version,
            series_files=repository.series_files(session, study, ctx.settings.effective_storage_dir,
                                                 CT_IMAGE_SOP_CLASSES),
            received_at=max((s.last_received_at for s in study.series), default=None),
            stable_at=max((s.stable_at for s in study.series if s.stable_at), default=None),
            started_at=started_at)


def run_scorer(ctx: WorkerContext, job_id: int, inputs: ScoringInput) -> tuple[ScoreResult, str | None]:
    """Step 2: selection and scoring, outside any transaction; the masks stored durably."""
    from worker.scoring.pipeline import score_study as run_pipeline  # numpy, scipy, the scorer

    try:
        score = run_pipeline(inputs.series_files, ctx.settings, scorer=ctx.scorer)
    except Exception as exc:  # a bug must still leave a MEDIUM-priority result with the reason
        log.exception("job %d: scoring crashed", job_id)
        score = ScoreResult(status="failed", reason=f"internal error: {type(exc).__name__}: {exc}"[:500])
    score.study_instance_uid = inputs.study_uid
    # The one priority rule (db.priority), as configured: stored, sent and rendered alike.
    score.assigned_priority = priority_for(score.status, score.category, ctx.settings.priorities)
    return score, _store_masks(ctx.settings.effective_storage_dir, inputs.study_uid, inputs.version, score)


def record_result(ctx: WorkerContext, job_id: int, inputs: ScoringInput, score: ScoreResult,
                  masks_path: str | None) -> tuple[int, list[int]]:
    """Step 3, one transaction: comparison with priors, the result, series states, the
    deliveries and the worklist entries. Returns the result's id and the deliveries to publish."""
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
            "received_at": inputs.received_at, "stable_at": inputs.stable_at,
            "scoring_started_at": inputs.started_at, "scored_at": scored_at, "masks_path": masks_path})
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
    log.info("study %s version %d: %s %s %s%% priority %s in %.2f s (%s)", inputs.study_uid, inputs.version,
             score.status, score.category or "-", f"{score.involvement_percent:.1f}"
             if score.involvement_percent is not None else "-", score.priority, score.seconds,
             score.reason or score.model)
    return result_id, delivery_ids


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

