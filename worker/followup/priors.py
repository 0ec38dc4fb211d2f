"""Follow-up studies (issue 12): find a study's priors, compare, issue result versions.

A *prior* is an earlier study of the same patient: the same Patient ID and the same Issuer
of Patient ID, an absent issuer counting as a value of its own
(``db.followup.same_patient_ids``; a blank Patient ID matches nothing, a name never
matches), acquired at most ``PRIOR_LOOKBACK_DAYS`` (default 30) before the current study,
that ct-triage has scored. At most ``PRIOR_MAX_COUNT`` (default 3), the most recent, are
compared (``worker.followup.comparison`` holds the arithmetic and the rule).

Where priors come from:

1. Studies ct-triage scored itself. The comparison is part of the first result.
2. With ``PRIOR_SOURCES`` (``AET@host:port``, comma-separated): after the current result
   is committed and its deliveries published, a prior search (``prior_searches``, task
   ``ct_triage.find_priors`` on the io queue) asks each PACS with C-FIND (Study Root,
   STUDY level: Patient ID, Issuer checked on the answers, Study Date within the
   look-back, Modalities in Study CT) and C-MOVEs the newest missing studies to our own
   AE title. They arrive at our node like any study, are scored like any study, but are
   recorded in ``prior_studies``: no deliveries, not on the worklist. A PACS that does not
   answer is retried with the delivery backoff and never delays the current result.
3. When a study is scored that is an earlier study of a patient whose later studies are
   already scored (a retrieved prior, or one that came late), each later study is
   compared again — only the comparison, not the scoring — and, if the set of priors
   changed, a new result version is issued (``studies.version`` + 1, a new ``results``
   row copying the scores, new outputs, priority and deliveries) through the same
   versioning as a late instance.

Hooks (the only places other modules call): :func:`prepare` and :meth:`Followup.record`
in the scoring job's result transaction (``worker.tasks.score.record_result``);
:func:`comparison_summary` for HL7/worklist/status displays. What runs after the result
commits (later studies compared again, point 3; searches queued) is
``worker.tasks.followup``; the PACS side (C-FIND, C-MOVE) is ``worker.followup.search``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session

from db import followup as fdb
from db.models import Instance, Result, Study
from db.types import utcnow
from worker.followup.comparison import Assessment, ProgressionRule, Snapshot, acquisition_time, apply_assessment, assess
from worker.scoring.result import ScoreResult

log = logging.getLogger("ct_triage.worker.followup.priors")


# -- snapshots -------------------------------------------------------------------------------
def _header(session: Session, storage_dir: Path, series_fk: int | None, sop_instance_uid: str | None) -> Dataset | None:
    if series_fk is None:
        return None
    query = select(Instance.path).where(Instance.series_fk == series_fk)
    if sop_instance_uid:
        query = query.where(Instance.sop_instance_uid == sop_instance_uid)
    path = session.scalar(query.order_by(Instance.id).limit(1))
    if path is None:
        return None
    try:
        return dcmread(storage_dir / path, stop_before_pixels=True)
    except Exception as exc:
        log.warning("cannot read the header of %s: %s", path, type(exc).__name__)
        return None


def _text(ds: Dataset | None, keyword: str) -> str | None:
    if ds is None:
        return None
    value = ds.get(keyword)
    if value in (None, ""):
        return None
    text = "".join(c for c in str(value) if c.isprintable() and c not in "\\")  # shown on images and reports
    return text.strip()[:64] or None


def snapshot(session: Session, storage_dir: Path, study_instance_uid: str, series_fk: int | None,
             score: ScoreResult, result_id: int | None = None) -> Snapshot | None:
    """The scored study as compared; None when it has no involvement share."""
    if score.status != "scored" or score.involvement_percent is None:
        return None
    first = score.source_sop_instance_uids[0] if score.source_sop_instance_uids else None
    ds = _header(session, storage_dir, series_fk, first)
    acquired_at, source = acquisition_time(ds) if ds is not None else (None, "unknown")
    thickness = None
    try:
        thickness = float(ds.SliceThickness) if ds is not None and ds.get("SliceThickness") else None
    except (TypeError, ValueError):
        thickness = None
    base = (score.comparison or {}).get("category_from_percent") or score.category
    return Snapshot(study_instance_uid=study_instance_uid, involvement_percent=float(score.involvement_percent),
                    acquired_at=acquired_at, time_source=source,
                    involvement_percent_left=score.involvement_percent_left,
                    involvement_percent_right=score.involvement_percent_right,
                    lesion_volume_ml=score.lesion_volume_ml, category=base, result_id=result_id,
                    manufacturer=_text(ds, "Manufacturer"), model_name=_text(ds, "ManufacturerModelName"),
                    kernel=_text(ds, "ConvolutionKernel"), slice_thickness_mm=thickness,
                    series_instance_uid=_text(ds, "SeriesInstanceUID"), sop_instance_uid=_text(ds, "SOPInstanceUID"),
                    sop_class_uid=_text(ds, "SOPClassUID"))


def load_score(result: Result) -> ScoreResult:
    return ScoreResult.from_json(json.loads(result.result_json))


def result_snapshot(session: Session, storage_dir: Path, result: Result) -> Snapshot | None:
    return snapshot(session, storage_dir, result.study.study_instance_uid, result.series_fk, load_score(result),
                    result.id)


def local_priors(session: Session, study: Study, current: Snapshot, settings) -> list[Snapshot]:
    """Scored earlier studies of the same patient within the look-back, newest first, at most N."""
    if current.acquired_at is None or not fdb.patient_has_identity(study.patient) or settings.prior_max_count < 1:
        return []
    earliest = current.acquired_at - dt.timedelta(days=settings.prior_lookback_days)
    found = []
    for result in fdb.latest_results_of_patient(session, study.patient, exclude_study_fk=study.id):
        snap = result_snapshot(session, settings.effective_storage_dir, result)
        if snap is None or snap.acquired_at is None:
            continue
        if earliest <= snap.acquired_at < current.acquired_at:
            found.append(snap)
    found.sort(key=lambda s: s.acquired_at or dt.datetime.min, reverse=True)
    return found[: settings.prior_max_count]


# -- hooks in score_study ------------------------------------------------------------------------
@dataclass
class Followup:
    """What :func:`prepare` decided for a study being scored."""

    is_prior: bool = False
    assessment: Assessment | None = None

    def record(self, session: Session, result: Result) -> None:
        """Persist the comparisons of ``result`` (call after the result row is flushed)."""
        if self.assessment is not None:
            record_comparisons(session, result, self.assessment)


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def record_comparisons(session: Session, result: Result, assessment: Assessment) -> None:
    for change in assessment.changes:
        session.add(fdb.Comparison(
            result_fk=result.id, prior_result_fk=change.prior.result_id,
            prior_study_instance_uid=change.prior.study_instance_uid,
            current_acquired_at=_iso(assessment.current.acquired_at), prior_acquired_at=_iso(change.prior.acquired_at),
            hours=change.hours, prior_percent=change.prior.involvement_percent,
            current_percent=assessment.current.involvement_percent, delta_points=change.delta_points,
            delta_points_left=change.delta_points_left, delta_points_right=change.delta_points_right,
            relative_percent=change.relative_percent, relative_percent_left=change.relative_percent_left,
            relative_percent_right=change.relative_percent_right, delta_lesion_ml=change.delta_lesion_ml,
            points_per_day=change.points_per_day, trend=change.trend, progression=change.progression,
            differences="; ".join(change.differences) or None, created_at=utcnow()))


def prepare(session: Session, study: Study, series_fk: int | None, score: ScoreResult, settings) -> Followup:
    """Before the result row is written: compare with local priors and apply the rule to ``score``.

    Never raises: a comparison that fails leaves the score as it was (logged).
    """
    try:
        if fdb.is_prior_study(session, study.study_instance_uid):
            return Followup(is_prior=True)
        if score.status != "scored" or series_fk is None:
            return Followup()
        current = snapshot(session, settings.effective_storage_dir, study.study_instance_uid, series_fk, score)
        if current is None:
            return Followup()
        priors = local_priors(session, study, current, settings)
        assessment = assess(current, priors, ProgressionRule.from_settings(settings))
        apply_assessment(score, assessment)
        return Followup(assessment=assessment)
    except Exception:
        log.exception("study %s: comparison with priors failed; result issued without it", study.id)
        return Followup()


# -- what displays read -------------------------------------------------------------------------
def comparison_summary(session: Session, result_id: int) -> dict | None:
    """The comparison of one result as plain data, for HL7 OBX, the worklist and ``ct-triage status``.

    ``None`` when the result was not compared with any prior. Keys: ``trend``
    (progression | worsening | stable | improvement), ``progression`` (bool), ``text``
    (one line, e.g. "progression: 21% -> 34% (+60%) in 36 h since 2026-11-28"),
    ``prior_study_instance_uid``, ``prior_date`` (ISO), ``hours``, ``delta_points``,
    ``relative_percent``, ``points_per_day``, ``category_from_percent``, ``category``,
    ``differences`` (list of str), ``priors`` (count).
    """
    result = session.get(Result, result_id)
    if result is None:
        return None
    comparison = load_score(result).comparison
    if not comparison:
        return None
    assessment = Assessment.from_json(comparison)
    h = assessment.headline
    return {
        "trend": assessment.trend,
        "progression": assessment.progression,
        "text": assessment.reason(),
        "prior_study_instance_uid": h.prior.study_instance_uid,
        "prior_date": h.prior.acquired_at.isoformat() if h.prior.acquired_at else None,
        "hours": h.hours,
        "delta_points": h.delta_points,
        "relative_percent": h.relative_percent,
        "points_per_day": h.points_per_day,
        "category_from_percent": assessment.category_from_percent,
        "category": assessment.category,
        "differences": list(h.differences),
        "priors": len(assessment.changes),
    }


def changes_by_study(session: Session, study_instance_uids: list[str]) -> dict[str, dict]:
    """{study UID: comparison_summary} of each study's latest result that has one (``ct-triage status``)."""
    out: dict[str, dict] = {}
    for uid in study_instance_uids:
        result_id = session.scalar(select(Result.id).join(Study).where(Study.study_instance_uid == uid)
                                   .order_by(Result.version.desc()).limit(1))
        summary = comparison_summary(session, result_id) if result_id is not None else None
        if summary is not None:
            out[uid] = summary
    return out


def change_label(summary: dict | None) -> str:
    """``PROGRESSION +12 pts/36 h`` for progressions (what ``ct-triage status`` marks), else the trend word."""
    if not summary:
        return "-"
    if summary["progression"]:
        hours = f"/{summary['hours']:.0f} h" if summary.get("hours") is not None else ""
        return f"PROGRESSION {summary['delta_points']:+.0f} pts{hours}"
    return summary["trend"]
