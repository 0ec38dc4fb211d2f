"""Prior searches at a PACS (issue 12): C-FIND the patient's earlier CT studies, C-MOVE them to us.

One row of ``prior_searches`` per (current study, PACS), created by
:func:`worker.tasks.followup.after_result` once the current result is committed and its
deliveries published. The task body :func:`find_priors` (Celery task
``ct_triage.find_priors`` on the io queue; in embedded mode :func:`run_due_searches` in its own
loop) claims the row, asks the PACS with C-FIND (Study Root, STUDY level: Patient ID,
Issuer of Patient ID as a return key checked on each answer, Study Date within
``PRIOR_LOOKBACK_DAYS`` before the current acquisition, Modalities in Study ``CT``), drops
answers of another patient (another Patient ID, or another issuer: an absent issuer is a
value of its own, and a PACS that does not return the issuer matches issuer-less IDs only), of the
current study, of studies we already hold or asked for, and of studies not earlier than the
current one, then C-MOVEs the ``PRIOR_MAX_COUNT`` newest to our own AE title, recording
each in ``prior_studies`` *before* the move, so it is scored as a prior when it arrives.

Failures: connection refused, no answer, aborts, 0xA7xx -> ``retrying`` with the delivery
backoff (``RETRY_BASE_S`` doubling, capped at 600 s) and TransientError for Celery;
association rejected, unknown move destination, other failure statuses -> ``failed`` with
the reason. Neither ever touches the current result, which went out before.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging

from pydicom.dataset import Dataset
from sqlalchemy import select

from ct_triage.errors import TransientError
from ct_triage.settings import parse_destination
from ct_triage.text import dicom_text
from db import followup as fdb
from db.models import Result, Study
from db.session import session_scope
from db.types import utcnow
from worker.followup.priors import result_snapshot
from worker.retry import backoff_s

log = logging.getLogger("ct_triage.worker.followup.priors")


def _claim_search(ctx, search_id: int, now: dt.datetime) -> bool:
    with session_scope(ctx.session_factory) as session:
        return fdb.claim_search(session, search_id, ctx.worker_name, now)


def _finish_search(ctx, search_id: int, state: str, error: str | None, *, found: int | None = None,
                   requested: int | None = None) -> str:
    now = utcnow()
    with session_scope(ctx.session_factory) as session:
        row = session.get(fdb.PriorSearch, search_id)
        attempts = row.attempts if row is not None else 1
        retry_at = now + dt.timedelta(seconds=backoff_s(attempts, ctx.settings.retry_base_s))
        search = fdb.finish_search(session, search_id, state, error, retry_at=retry_at, found=found,
                                   requested=requested, now=now)
        source = search.source
    level = logging.INFO if state == "done" else logging.WARNING
    log.log(level, "prior search %d at %s: %s after %d attempt(s)%s", search_id, source, state, attempts,
            f": {error}" if error else "")
    return state


def _query_identifier(patient_id: str, first: dt.date, last: dt.date) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientID = patient_id
    ds.IssuerOfPatientID = ""  # a return key: some PACS cannot match on it, so we check the answers
    ds.StudyInstanceUID = ""
    ds.StudyDate = f"{first:%Y%m%d}-{last:%Y%m%d}"
    ds.StudyTime = ""
    ds.ModalitiesInStudy = "CT"
    ds.StudyDescription = ""
    return ds


def _answer_time(answer: Dataset) -> dt.datetime | None:
    from worker.followup.comparison import parse_da_tm

    return parse_da_tm(str(answer.get("StudyDate") or ""), str(answer.get("StudyTime") or ""))


def _candidate(answer, skip: set[str], patient_id: str, issuer: str,
               acquired_at: dt.datetime) -> tuple[dt.datetime, str] | None:
    """(acquisition time, Study Instance UID) of a C-FIND answer that is an earlier CT study of
    the same patient not yet known or requested; None for any other answer."""
    uid = str(answer.get("StudyInstanceUID") or "")
    if not uid or uid in skip:
        return None
    if dicom_text(answer.get("PatientID") or patient_id).strip() != patient_id:
        return None  # a PACS doing fuzzy matching: the ID must be the same
    if "IssuerOfPatientID" in answer:
        if str(answer.IssuerOfPatientID or "").strip() != issuer:
            return None  # same ID, another (or no) issuing authority: another patient
    elif issuer:
        return None  # the PACS does not say who issued the ID: only an issuer-less ID can match
    when = _answer_time(answer)
    if when is not None and when >= acquired_at:
        return None
    modalities = answer.get("ModalitiesInStudy")
    if modalities:
        values = [str(modalities)] if isinstance(modalities, str) else [str(m) for m in modalities]
        if "CT" not in values:
            return None
    return when or dt.datetime.min, uid


def find_priors(ctx, search_id: int) -> str:
    """Task body: C-FIND the patient's earlier CT studies at one PACS and C-MOVE the newest to us."""
    from worker.followup.retrieve import find_studies, move_study

    now = utcnow()
    if not _claim_search(ctx, search_id, now):
        return "skipped"
    s = ctx.settings
    with session_scope(ctx.session_factory) as session:
        search = session.get(fdb.PriorSearch, search_id)
        study = session.get(Study, search.study_fk) if search is not None else None
        if search is None or study is None:
            return "skipped"
        patient = study.patient
        patient_id, issuer = patient.patient_id.strip(), (patient.issuer_of_patient_id or "").strip()
        source = parse_destination(search.source)
        latest = session.scalar(select(Result).where(Result.study_fk == study.id).order_by(Result.version.desc())
                                .limit(1))
        current = result_snapshot(session, s.effective_storage_dir, latest) if latest is not None else None
        known = fdb.study_uids_of_patient(session, patient)
        requested = fdb.requested_prior_uids(session)
        this_uid = study.study_instance_uid
    if not patient_id or current is None or current.acquired_at is None:
        return _finish_search(ctx, search_id, "done", "nothing to compare (no Patient ID, result or time)")
    first = (current.acquired_at - dt.timedelta(days=s.prior_lookback_days)).date()
    identifier = _query_identifier(patient_id, first, current.acquired_at.date())
    report = find_studies(source, identifier, calling_ae_title=s.ae_title, acse_timeout=s.acse_timeout_s,
                          dimse_timeout=s.dimse_timeout_s, network_timeout=s.network_timeout_s)
    if report.outcome != "ok":
        state = "retrying" if report.outcome == "transient" else "failed"
        _finish_search(ctx, search_id, state, report.reason)
        if state == "retrying":
            raise TransientError(f"prior search {search_id}: {report.reason}")
        return state
    skip = {this_uid, *known, *requested}
    candidates = [c for c in (_candidate(answer, skip, patient_id, issuer, current.acquired_at)
                              for answer in report.answers) if c is not None]
    candidates.sort(reverse=True)
    chosen = [uid for _, uid in candidates[: s.prior_max_count]]
    moved, errors = 0, []
    for uid in chosen:
        with session_scope(ctx.session_factory) as session:  # recorded before the move: it arrives as a prior
            fdb.request_prior(session, uid, search_id, str(source))
        move = move_study(source, uid, s.ae_title, calling_ae_title=s.ae_title, acse_timeout=s.acse_timeout_s,
                          dimse_timeout=max(s.dimse_timeout_s, 600.0), network_timeout=max(s.network_timeout_s, 600.0))
        with session_scope(ctx.session_factory) as session:
            fdb.prior_retrieved(session, uid, None if move.outcome == "ok" else move.reason)
        if move.outcome == "ok":
            moved += 1
        else:
            errors.append((move.outcome, move.reason))
    if any(outcome == "transient" for outcome, _ in errors):
        _finish_search(ctx, search_id, "retrying", errors[0][1], found=len(report.answers), requested=moved)
        raise TransientError(f"prior search {search_id}: {errors[0][1]}")
    if errors:
        return _finish_search(ctx, search_id, "failed", errors[0][1], found=len(report.answers), requested=moved)
    return _finish_search(ctx, search_id, "done", None, found=len(report.answers), requested=moved)


def run_due_searches(ctx) -> int:
    """Embedded mode: run every due prior search once; returns how many ran."""
    with session_scope(ctx.session_factory) as session:
        due = fdb.due_prior_search_ids(session)
    for search_id in due:
        with contextlib.suppress(TransientError):  # recorded with its next attempt time
            find_priors(ctx, search_id)
    return len(due)
