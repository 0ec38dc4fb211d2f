"""The follow-up step after a result commits: other studies of the patient, and PACS prior searches.

- Later studies this one is a prior of (a retrieved prior, or a study that came late)
  are compared again (:func:`recompare`): only the comparison, not the scoring; when
  the set of priors changed, a new result version is issued (``studies.version`` + 1,
  a new ``results`` row copying the scores, new outputs, priority, worklist entries and
  deliveries) through the same versioning as a late instance.
- With ``CT_TRIAGE_PRIOR_SOURCES``, prior searches are queued (``prior_searches``) and
  published after the commit (:mod:`worker.followup.search` runs them).

The comparison itself (snapshots, the rule) is :mod:`worker.followup`.
"""

from __future__ import annotations

import datetime as dt
import json
import logging

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ct_triage.contract import DELIVER_OUTPUTS, FIND_PRIORS, publish_in_order
from ct_triage.settings import parse_destination
from db import followup as fdb
from db import repository
from db.models import Result, Study
from db.priority import priority_for
from db.session import session_scope
from db.types import utcnow
from worker.followup.comparison import ProgressionRule, apply_assessment, assess
from worker.followup.priors import load_score, local_priors, record_comparisons, result_snapshot, snapshot
from worker.worklist.entries import add_worklist_entries

log = logging.getLogger("ct_triage.worker.followup.priors")


def after_result(ctx, result_id: int) -> None:
    """After a result is committed: update later studies it is a prior of; start PACS searches."""
    settings = ctx.settings
    try:
        with session_scope(ctx.session_factory) as session:
            result = session.get(Result, result_id)
            if result is None or result.status != "scored":
                return
            study = result.study
            if not fdb.patient_has_identity(study.patient):
                return
            is_prior = fdb.prior_scored(session, study.study_instance_uid)
            later = _later_study_ids(session, study, result, settings)
            search_ids = [] if is_prior else fdb.add_searches(
                session, study, [str(parse_destination(source)) for source in settings.prior_sources])
        for study_id in later:
            recompare(ctx, study_id)
        publish_in_order(ctx.publisher, FIND_PRIORS, search_ids, lambda i: _mark(ctx, fdb.mark_search_published, i))
    except Exception:
        log.exception("result %d: follow-up bookkeeping failed", result_id)


def _later_study_ids(session: Session, study: Study, result: Result, settings) -> list[int]:
    storage_dir = settings.effective_storage_dir
    this = result_snapshot(session, storage_dir, result)
    if this is None or this.acquired_at is None:
        return []
    latest = this.acquired_at + dt.timedelta(days=settings.prior_lookback_days)
    ids = []
    for other in fdb.latest_results_of_patient(session, study.patient, exclude_study_fk=study.id):
        if fdb.is_prior_study(session, other.study.study_instance_uid):
            continue
        snap = result_snapshot(session, storage_dir, other)
        if snap is not None and snap.acquired_at is not None and this.acquired_at < snap.acquired_at <= latest:
            ids.append(other.study_fk)
    return ids


def _mark(ctx, mark, row_id: int) -> None:
    with session_scope(ctx.session_factory) as session:
        mark(session, row_id)


# -- comparison-only result versions ----------------------------------------------------------
def recompare(ctx, study_id: int) -> int | None:
    """Compare a scored study with its priors again; a new result version when they changed.

    Returns the new result's id, or None when nothing changed (or the study is being
    scored again anyway, which will include the priors).
    """
    settings = ctx.settings
    for attempt in (1, 2):
        delivery_ids: list[int] = []
        try:
            with session_scope(ctx.session_factory) as session:
                study = session.get(Study, study_id)
                if study is None or fdb.is_prior_study(session, study.study_instance_uid):
                    return None
                if fdb.study_is_being_scored(session, study.id):
                    return None
                latest = session.scalar(select(Result).where(Result.study_fk == study.id)
                                        .order_by(Result.version.desc()).limit(1))
                if latest is None or latest.status != "scored" or latest.version != study.version:
                    return None
                score = load_score(latest)
                current = snapshot(session, settings.effective_storage_dir, study.study_instance_uid,
                                   latest.series_fk, score, latest.id)
                if current is None:
                    return None
                priors = local_priors(session, study, current, settings)
                before = {c["prior"]["study_instance_uid"] for c in (score.comparison or {}).get("changes", [])}
                if {p.study_instance_uid for p in priors} == before:
                    return None
                assessment = assess(current, priors, ProgressionRule.from_settings(settings))
                apply_assessment(score, assessment)
                score.assigned_priority = priority_for(score.status, score.category, settings.priorities)
                now = utcnow()
                result = fdb.add_comparison_version(session, study, latest, {
                    "category": score.category, "priority": score.priority, "reason": score.reason,
                    "result_json": json.dumps(score.to_json())}, now)
                if result is None:  # a late instance made a newer version: its scoring compares
                    return None
                if assessment is not None:
                    record_comparisons(session, result, assessment)
                if result.series_fk is not None:
                    delivery_ids = repository.add_deliveries(
                        session, result, [str(parse_destination(d)) for d in settings.destinations], now)
                # The new version's workitem replaces the old one and the RIS gets the new priority.
                delivery_ids += add_worklist_entries(session, settings, result, score)
                new_id, version = result.id, result.version
                log.info("study %d: comparison updated, result version %d: %s %s priority %s", study.id, version,
                         score.category, assessment.trend if assessment else "no priors", score.priority)
        except IntegrityError:  # another worker issued a version at the same moment: look again
            if attempt == 2:
                raise
            continue
        publish_in_order(ctx.publisher, DELIVER_OUTPUTS, delivery_ids,
                         lambda i: _mark(ctx, repository.mark_delivery_published, i))
        return new_id
    return None

