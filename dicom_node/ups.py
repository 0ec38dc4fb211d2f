"""UPS (Unified Procedure Step, PS3.4 Annex CC) SCP: the reading worklist, served from the database.

The workers create one workitem per result (worker.worklist -> db.worklist); this module
serves them on the node's AE and port. Supported (SOP classes Pull, Watch, Query, Push
for N-GET/N-ACTION, Event for reports):

- C-FIND (UPS Pull / Watch / Query): matching on SOP Instance UID (list), Scheduled
  Procedure Step Priority, Procedure Step State, Scheduled Procedure Step Start DateTime
  (single value or range), Patient ID and Patient's Name (wildcards ``*``/``?``), Study
  Instance UID (list), Accession Number (top level or in Referenced Request Sequence),
  Worklist Label. Matches are returned in worklist order: priority, then arrival, then
  creation. Superseded study versions never match (except by SOP Instance UID).
- N-GET: the requested attributes (all when none are named); never the Transaction UID.
- N-SET: Procedure Step Progress Information Sequence and UPS Performed Procedure
  Sequence; needs the Transaction UID once IN PROGRESS (0xC301), refused in a final state
  (0xC300); other attributes are ignored with warning 0x0001.
- N-ACTION 1 change state (claim SCHEDULED -> IN PROGRESS with a new Transaction UID,
  IN PROGRESS -> COMPLETED | CANCELED with it; COMPLETED needs a UPS Performed Procedure
  Sequence item with Performed Procedure Step End DateTime, else 0xC304);
  2 request cancel; 3 subscribe (one workitem, or global on the well-known instance UIDs);
  4 unsubscribe; 5 suspend global subscription. Receiving AE titles must be listed in
  ``CT_TRIAGE_UPS_SUBSCRIBERS`` (AET@host:port), else 0xC308.
- N-EVENT-REPORT: :class:`UpsNotifier` drains the ``ups_events`` outbox, opening an
  association to each subscriber (UPS Event SOP class; over TLS for ``AET@host:port+tls``,
  verifying the subscriber's certificate against the notifier's ``tls_context``, by default
  the system's CAs), retrying transient failures (db.worklist.EVENT_RETRY_BASE_S doubling,
  EVENT_MAX_ATTEMPTS). A certificate that fails verification is permanent, as in
  worker.delivery.scu: retrying cannot make an untrusted certificate trusted, so the
  events are marked failed at once, their reason naming the certificate.

Who may do what (PS3.4 Annex CC; the association's role from :mod:`dicom_node.access`):

=====================================  ==========================================================
operation                              allowed
=====================================  ==========================================================
C-FIND, N-GET                          readers and admins
claim (SCHEDULED -> IN PROGRESS)       readers and admins
N-SET of a SCHEDULED workitem          admins
N-SET, complete, cancel IN PROGRESS    whoever holds the workitem's Transaction UID (admins too)
request cancel of a SCHEDULED item     admins; others are refused and the item does not change
request cancel of an IN PROGRESS item  readers and admins: passed to the performer (event report)
subscribe, unsubscribe, suspend        Receiving AE = the calling AE; admins for any Receiving AE
=====================================  ==========================================================

A refusal answers 0x0124 (Refused: Not Authorized) for N-operations and 0xC000 for
C-FIND (a reader-less association cannot exist: the node refuses it at A-ASSOCIATE-RQ),
logs one line, and changes nothing. :attr:`UpsService.on_refusal` is called with each
refusal (the audit trail).

Handlers are thin (dicom_node.server), never raise, and answer named statuses (below).
"""

from __future__ import annotations

import json
import logging
import re
import ssl
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import TYPE_CHECKING, Literal

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pynetdicom import AE, evt
from sqlalchemy.orm import Session, sessionmaker

from ct_triage.association import connect_failure, peer_tls_context, reactor_paused
from ct_triage.polling import Poller
from ct_triage.settings import Destination, Settings, parse_destination
from ct_triage.text import clean, dicom_text
from db import worklist
from db.models import UpsWorkitem
from db.session import session_scope
from dicom_node import status
from dicom_node.access import UPS_EVENT, UPS_PULL, UPS_PUSH, UPS_QUERY, UPS_WATCH, Role, role_of
from dicom_node.uids import is_valid_uid

if TYPE_CHECKING:
    from pynetdicom.association import Association

    from dicom_node.auditing import NodeAudit

log = logging.getLogger("ct_triage.node.ups")

GLOBAL_SUBSCRIPTION = "1.2.840.10008.5.1.4.34.5"
FILTERED_GLOBAL_SUBSCRIPTION = "1.2.840.10008.5.1.4.34.5.1"

# -- statuses (PS3.4 CC.2.1-CC.2.8; pynetdicom.status UNIFIED_PROCEDURE_STEP_SERVICE_CLASS_STATUS)
PENDING = 0xFF00
OPTIONAL_ATTRIBUTES_NOT_SUPPORTED = 0x0001
ALREADY_CANCELED = 0xB304
ALREADY_COMPLETED_WARNING = 0xB306
MAY_NO_LONGER_BE_UPDATED = 0xC300
WRONG_TRANSACTION_UID = 0xC301
ALREADY_IN_PROGRESS = 0xC302
SCHEDULED_ONLY_BY_CREATE = 0xC303
FINAL_STATE_REQUIREMENTS = 0xC304
NO_SUCH_WORKITEM = 0xC307
RECEIVING_AE_UNKNOWN = 0xC308
INVALID_STATE = 0xC309  # "the provided value of UPS State was not valid"
NOT_IN_PROGRESS = 0xC310
ALREADY_COMPLETED = 0xC311
NOT_APPROPRIATE = 0xC314  # action not appropriate for the instance
IDENTIFIER_DOES_NOT_MATCH = 0xA900
NO_SUCH_ACTION_TYPE = 0x0123
MISSING_ATTRIBUTE = 0x0120
INVALID_ATTRIBUTE_VALUE = 0x0106
SOP_CLASS_NOT_SUPPORTED = 0x0122
NOT_AUTHORIZED = 0x0124  # Refused: Not Authorized (PS3.7 C.4.2)
FIND_REFUSED = 0xC000  # C-FIND: unable to process (no UPS C-FIND status names authorization)
WORKLIST_ROLES = (Role.READER, Role.ADMIN)

OUTCOME_STATUS = {
    "ok": status.SUCCESS,
    "cancel_requested": status.SUCCESS,
    "no_such_workitem": NO_SUCH_WORKITEM,
    "may_no_longer_be_updated": MAY_NO_LONGER_BE_UPDATED,
    "wrong_transaction_uid": WRONG_TRANSACTION_UID,
    "already_in_progress": ALREADY_IN_PROGRESS,
    "scheduled_only_by_create": SCHEDULED_ONLY_BY_CREATE,
    "final_state_requirements": FINAL_STATE_REQUIREMENTS,
    "invalid_state": INVALID_STATE,
    "not_in_progress": NOT_IN_PROGRESS,
    "already_completed": ALREADY_COMPLETED,
    "already_canceled": ALREADY_CANCELED,
    "not_authorized": NOT_AUTHORIZED,
}
#: Change state to COMPLETED when already COMPLETED is a warning, not a failure.
CHANGE_STATE_STATUS = {**OUTCOME_STATUS, "already_completed": ALREADY_COMPLETED_WARNING}

NEVER_RETURNED = (Tag(0x0008, 0x1195),)  # Transaction UID (PS3.4 CC.2.6.1.3.1)
SETTABLE = ("ProcedureStepProgressInformationSequence", "UnifiedProcedureStepPerformedProcedureSequence")
INTERPRETATION = ("110005", "DCM", "Interpretation")  # CID 9231 General Purpose Workitem Definition


# -- the workitem as a data set ---------------------------------------------------------------
def _dt(value: datetime | None) -> str:
    return "" if value is None else value.astimezone(UTC).strftime("%Y%m%d%H%M%S+0000")


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _from_json(text: str | None) -> DicomSequence | None:
    if not text:
        return None
    try:
        ds = Dataset.from_json(text)
    except Exception:  # stored by us; a bad row must not break the worklist
        log.warning("ignoring an unreadable stored UPS sequence")
        return None
    for element in ds:
        return element.value
    return None


def _seq_json(keyword: str, value) -> str:
    ds = Dataset()
    setattr(ds, keyword, value)
    return ds.to_json()


def workitem_dataset(item: UpsWorkitem) -> Dataset:
    """The full UPS data set of a workitem (Transaction UID excluded)."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = UPS_PUSH
    ds.SOPInstanceUID = item.sop_instance_uid
    # Patient and study, copied from the source
    ds.PatientName = item.patient_name or ""
    ds.PatientID = item.patient_id or ""
    ds.IssuerOfPatientID = item.issuer_of_patient_id or ""
    ds.PatientBirthDate = item.patient_birth_date or ""
    ds.PatientSex = item.patient_sex or ""
    ds.StudyInstanceUID = item.study_instance_uid
    ds.AccessionNumber = item.accession_number or ""
    request = Dataset()
    request.StudyInstanceUID = item.study_instance_uid
    request.AccessionNumber = item.accession_number or ""
    request.RequestedProcedureID = item.accession_number or ""
    request.RequestedProcedureDescription = item.study_description or ""
    request.RequestedProcedureCodeSequence = []
    ds.ReferencedRequestSequence = [request]
    # Scheduled procedure step
    ds.ScheduledProcedureStepPriority = item.priority
    ds.WorklistLabel = item.worklist_label
    ds.ProcedureStepLabel = item.procedure_step_label
    ds.ScheduledProcedureStepStartDateTime = _dt(item.scheduled_at)
    ds.ScheduledProcedureStepModificationDateTime = _dt(item.updated_at)
    ds.ScheduledProcedureStepExpirationDateTime = _dt(item.expires_at)  # (0040,4008); dicom_node.expiry
    ds.ScheduledWorkitemCodeSequence = [_code(*INTERPRETATION)]
    ds.CommentsOnTheScheduledProcedureStep = (item.comments or "")[:10240]
    ds.InputReadinessState = "READY"
    inputs = []
    for ref in json.loads(item.input_json or "[]"):
        entry = Dataset()
        entry.TypeOfInstances = "DICOM"
        entry.StudyInstanceUID = ref["study_instance_uid"]
        entry.SeriesInstanceUID = ref["series_instance_uid"]
        sops = []
        for uid in ref["sop_instance_uids"]:
            sop = Dataset()
            sop.ReferencedSOPClassUID = ref["sop_class_uid"]
            sop.ReferencedSOPInstanceUID = uid
            sops.append(sop)
        entry.ReferencedSOPSequence = sops
        retrieve = Dataset()
        retrieve.RetrieveAETitle = ref.get("retrieve_ae_title") or ""
        entry.DICOMRetrievalSequence = [retrieve]
        inputs.append(entry)
    ds.InputInformationSequence = inputs
    # State, progress, performed
    ds.ProcedureStepState = item.state
    progress = _from_json(item.progress_json)
    if item.state == worklist.CANCELED:
        if progress is None or len(progress) == 0:
            progress = DicomSequence([Dataset()])
        progress[0].ProcedureStepCancellationDateTime = _dt(item.canceled_at)
        progress[0].ReasonForCancellation = (item.cancel_reason or "")[:1024]
    ds.ProcedureStepProgressInformationSequence = progress if progress is not None else []
    performed = _from_json(item.performed_json)
    ds.UnifiedProcedureStepPerformedProcedureSequence = performed if performed is not None else []
    return ds


def select_attributes(full: Dataset, keys: Dataset | list) -> Dataset:
    """The attributes of ``full`` named by ``keys`` (an identifier or a list of tags);
    a named attribute we do not have is returned empty."""
    out = Dataset()
    tags = [elem.tag for elem in keys] if isinstance(keys, Dataset) else [Tag(t) for t in keys]
    if "SpecificCharacterSet" in full:
        out.SpecificCharacterSet = full.SpecificCharacterSet
    for tag in tags:
        if tag in NEVER_RETURNED or tag == Tag(0x0008, 0x0005):
            continue
        if tag in full:
            out[tag] = full[tag]
        elif isinstance(keys, Dataset):
            out[tag] = keys[tag]
    return out


# -- matching ---------------------------------------------------------------------------------
def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return dicom_text(value).strip() or None  # a multi-valued key as DICOM writes it (A\B)


def _uids(ds: Dataset, keyword: str) -> list[str]:
    value = ds.get(keyword)
    if value is None or value == "":
        return []
    values = str(value).split("\\") if isinstance(value, str) else list(value)
    return [str(v).strip() for v in values if str(v).strip()]


_DT = r"\d{8,14}(?:\.\d{1,6})?(?:[+]\d{4})?"
_DT_RANGE = re.compile(f"^({_DT})?-({_DT})?$")


def _parse_dt(text: str, end_of_period: bool = False) -> datetime:
    """DICOM DT (UTC unless it carries +hhmm); a shorter value means the start of its
    period, or with ``end_of_period`` its last second (a date alone: 23:59:59)."""
    digits, _, offset = text.strip().partition("+")
    digits = digits.split(".")[0]
    pad = "99991231235959"[len(digits):] if end_of_period else "00000101000000"[len(digits):]
    full = digits + pad
    if end_of_period and len(digits) < 8:
        full = digits + pad  # year or month only: late enough
    try:
        value = datetime.strptime(full[:14], "%Y%m%d%H%M%S")
    except ValueError:  # e.g. day 31 of a short month: fall back to the period's start + 1 day
        value = datetime.strptime(digits[:8].ljust(8, "0") if len(digits) >= 8 else digits.ljust(4, "0") + "0101",
                                  "%Y%m%d")
    value = value.replace(tzinfo=UTC)
    if offset:
        value -= timedelta(hours=int(offset[0:2]), minutes=int(offset[2:4]))
    return value


def parse_query(identifier: Dataset) -> worklist.WorkitemQuery:
    """A C-FIND identifier as a db query; ValueError for a value we cannot match on.

    Scheduled Procedure Step Start DateTime: ``A``, ``A-B``, ``A-`` or ``-B`` (DT values,
    UTC unless ``+hhmm`` is given; a value of less precision covers its whole period).
    """
    q = worklist.WorkitemQuery()
    q.sop_instance_uids = _uids(identifier, "SOPInstanceUID")
    q.priority = _text(identifier, "ScheduledProcedureStepPriority")
    if q.priority and q.priority not in ("HIGH", "MEDIUM", "LOW"):
        raise ValueError(f"Scheduled Procedure Step Priority {q.priority!r} is not HIGH, MEDIUM or LOW")
    q.state = _text(identifier, "ProcedureStepState")
    if q.state and q.state not in worklist.STATES:
        raise ValueError(f"Procedure Step State {q.state!r} is not a UPS state")
    when = _text(identifier, "ScheduledProcedureStepStartDateTime")
    if when:
        match = _DT_RANGE.match(when)
        if match:
            start, end = match.groups()
            q.scheduled_from = _parse_dt(start) if start else None
            q.scheduled_to = _parse_dt(end, end_of_period=True) if end else None
        elif re.fullmatch(_DT, when):
            q.scheduled_from, q.scheduled_to = _parse_dt(when), _parse_dt(when, end_of_period=True)
        else:
            raise ValueError(f"Scheduled Procedure Step Start DateTime {when!r} is not a DT value or range")
    q.patient_id = _text(identifier, "PatientID")
    name = identifier.get("PatientName")
    q.patient_name = str(name).strip() if name not in (None, "") and str(name).strip() else None
    q.study_instance_uids = _uids(identifier, "StudyInstanceUID")
    q.accession_number = _text(identifier, "AccessionNumber")
    for request in identifier.get("ReferencedRequestSequence", []) or []:
        q.accession_number = q.accession_number or _text(request, "AccessionNumber")
        q.study_instance_uids = q.study_instance_uids or _uids(request, "StudyInstanceUID")
    q.worklist_label = _text(identifier, "WorklistLabel")
    return q


def completion_requirements_met(item: UpsWorkitem) -> bool:
    """Final state requirements for COMPLETED: a performed item with an end date/time."""
    performed = _from_json(item.performed_json)
    return performed is not None and any(p.get("PerformedProcedureStepEndDateTime") for p in performed)


def _audit_view(item: UpsWorkitem | None) -> SimpleNamespace | None:
    """What the audit trail names of a workitem, read inside its session (used after the commit)."""
    if item is None:
        return None
    return SimpleNamespace(sop_instance_uid=item.sop_instance_uid, study_instance_uid=item.study_instance_uid,
                           patient_id=item.patient_id, patient_name=item.patient_name,
                           issuer_of_patient_id=item.issuer_of_patient_id, accession_number=item.accession_number)


# -- the service --------------------------------------------------------------------------------
class UpsService:
    """The UPS SCP's behaviour; dicom_node.server binds its methods to thin handlers."""

    def __init__(self, session_factory: sessionmaker[Session], settings: Settings):
        self.session_factory = session_factory
        self.subscribers: dict[str, Destination] = {}
        for entry in settings.ups_subscribers:
            dest = parse_destination(entry, setting="UPS_SUBSCRIBERS")
            self.subscribers[dest.ae_title] = dest
        self.notifier: UpsNotifier | None = None
        self.audit: NodeAudit | None = None  # queries and workitem changes (the audit trail)
        # Called with (association, operation, workitem UID or None, why) for every refusal.
        self.on_refusal: Callable[[object, str, str | None, str], None] = lambda *refusal: None

    def _refuse(self, event, operation: str, uid: str | None, why: str) -> None:
        assoc = event.assoc
        log.warning("UPS %s%s from %s refused: %s", operation, f" {uid}" if uid else "",
                    clean(str(assoc.requestor.ae_title), 16), why)
        try:
            self.on_refusal(assoc, operation, uid, why)
        except Exception:  # the audit trail must never turn a refusal into a crash
            log.exception("UPS refusal could not be recorded")

    def _is_admin(self, event) -> bool:
        return role_of(event.assoc) is Role.ADMIN

    def _wake(self) -> None:
        if self.notifier is not None:
            self.notifier.wake()

    # C-FIND ---------------------------------------------------------------------------------
    def on_c_find(self, event):
        sop_class = str(event.request.AffectedSOPClassUID)
        if sop_class not in (UPS_PULL, UPS_WATCH, UPS_QUERY):
            yield SOP_CLASS_NOT_SUPPORTED, None
            return
        if role_of(event.assoc) not in WORKLIST_ROLES:
            self._refuse(event, "C-FIND", None, "not a worklist reader")
            yield FIND_REFUSED, None
            return
        identifier = event.identifier
        try:
            query = parse_query(identifier)
        except (ValueError, TypeError, AttributeError) as exc:
            log.warning("UPS C-FIND from %s: unusable identifier: %s", event.assoc.requestor.ae_title, exc)
            yield IDENTIFIER_DOES_NOT_MATCH, None
            return
        with session_scope(self.session_factory) as session:
            matches = [select_attributes(workitem_dataset(item), identifier)
                       for item in worklist.find_workitems(session, query)]
        log.info("UPS C-FIND from %s: %d match(es)", event.assoc.requestor.ae_title, len(matches))
        if self.audit is not None:
            self.audit.query(event.assoc, sop_class, identifier)
        for match in matches:
            if event.is_cancelled:
                yield 0xFE00, None
                return
            yield PENDING, match
        yield status.SUCCESS, None

    # N-GET ------------------------------------------------------------------------------------
    def on_n_get(self, event) -> tuple[int, Dataset | None]:
        uid = str(event.request.RequestedSOPInstanceUID)
        if role_of(event.assoc) not in WORKLIST_ROLES:
            self._refuse(event, "N-GET", uid, "not a worklist reader")
            return NOT_AUTHORIZED, None
        requested = event.request.AttributeIdentifierList
        tags = [] if requested is None else [requested] if isinstance(requested, int) else list(requested)
        with session_scope(self.session_factory) as session:
            item = worklist.get_workitem(session, uid)
            if item is None:
                return NO_SUCH_WORKITEM, None
            full = workitem_dataset(item)
        if self.audit is not None:
            self.audit.query(event.assoc, str(event.request.RequestedSOPClassUID), select_attributes(full, tags)
                             if tags else None)
        if not tags:
            return status.SUCCESS, select_attributes(full, [elem.tag for elem in full])
        return status.SUCCESS, select_attributes(full, tags)

    # N-SET ------------------------------------------------------------------------------------
    def on_n_set(self, event) -> tuple[int, Dataset | None]:
        uid = str(event.request.RequestedSOPInstanceUID)
        mods = event.modification_list
        transaction_uid = str(mods.get("TransactionUID", "") or "") or None
        values: dict[str, str] = {}
        ignored = []
        for elem in mods:
            keyword = elem.keyword
            if keyword in SETTABLE:
                values[keyword] = _seq_json(keyword, elem.value)
            elif keyword not in ("TransactionUID", "SpecificCharacterSet"):
                ignored.append(keyword or str(elem.tag))
        with session_scope(self.session_factory) as session:
            outcome = worklist.update_workitem(
                session, uid, transaction_uid, scheduled_allowed=self._is_admin(event),
                progress_json=values.get("ProcedureStepProgressInformationSequence"),
                performed_json=values.get("UnifiedProcedureStepPerformedProcedureSequence"))
            reply = None
            item = worklist.get_workitem(session, uid) if outcome == "ok" else None
            if item is not None:
                reply = select_attributes(workitem_dataset(item), mods)
        self._wake()
        if outcome == "not_authorized":
            self._refuse(event, "N-SET", uid, "a SCHEDULED workitem is updated by worklist admins only")
        log.info("UPS N-SET %s from %s: %s", uid, event.assoc.requestor.ae_title, outcome)
        code = OUTCOME_STATUS[outcome]
        if code == status.SUCCESS and ignored:
            log.info("UPS N-SET %s: ignored %s", uid, ", ".join(ignored))
            code = OPTIONAL_ATTRIBUTES_NOT_SUPPORTED
        return code, reply

    # N-ACTION ---------------------------------------------------------------------------------
    def on_n_action(self, event) -> tuple[int, Dataset | None]:
        request = event.request
        uid = str(request.RequestedSOPInstanceUID)
        action = request.ActionTypeID
        info = event.action_information or Dataset()
        caller = str(event.assoc.requestor.ae_title).strip()
        if role_of(event.assoc) not in WORKLIST_ROLES:
            self._refuse(event, f"N-ACTION {action}", uid, "not a worklist reader")
            return NOT_AUTHORIZED, None
        if action == 1:
            code = self._change_state(event, uid, info, caller)
        elif action == 2:
            with session_scope(self.session_factory) as session:
                outcome = worklist.request_cancel(session, uid, requesting_ae=caller,
                                                  reason=_text(info, "ReasonForCancellation"),
                                                  scheduled_allowed=self._is_admin(event))
                cancelled = _audit_view(worklist.get_workitem(session, uid)) if outcome == "ok" else None
            if cancelled is not None and self.audit is not None:  # after the commit: its own transaction
                self.audit.workitem_changed(event.assoc, "cancelled", cancelled, _text(info, "ReasonForCancellation"))
            code = OUTCOME_STATUS[outcome]
            if outcome == "not_authorized":
                self._refuse(event, "request cancel", uid, "a SCHEDULED workitem is cancelled by worklist admins only")
            log.info("UPS cancel request for %s from %s: %s", uid, caller, outcome)
        elif action in (3, 4, 5):
            code = self._subscription(event, uid, action, info, caller)
        else:
            return NO_SUCH_ACTION_TYPE, None
        self._wake()
        return code, None

    def _change_state(self, event, uid: str, info: Dataset, caller: str) -> int:
        target = _text(info, "ProcedureStepState")
        transaction_uid = _text(info, "TransactionUID")
        if target is None:
            return MISSING_ATTRIBUTE
        if transaction_uid is not None and not is_valid_uid(transaction_uid):
            return INVALID_ATTRIBUTE_VALUE
        with session_scope(self.session_factory) as session:
            item = worklist.get_workitem(session, uid)
            met = item is not None and completion_requirements_met(item)
            outcome = worklist.change_state(session, uid, target, transaction_uid, performer_ae_title=caller,
                                            final_requirements_met=met)
            changed = _audit_view(item) if outcome == "ok" else None
        change = {"IN PROGRESS": "claimed", "COMPLETED": "completed", "CANCELED": "cancelled"}.get(target)
        if changed is not None and change and self.audit is not None:  # after the commit: its own transaction
            self.audit.workitem_changed(event.assoc, change, changed)
        log.info("UPS change state of %s to %s from %s: %s", uid, target, caller, outcome)
        return CHANGE_STATE_STATUS[outcome]

    def _subscription(self, event, uid: str, action: int, info: Dataset, caller: str) -> int:
        receiving = _text(info, "ReceivingAE")
        if receiving is None:
            return MISSING_ATTRIBUTE
        if receiving != caller and not self._is_admin(event):
            self._refuse(event, {3: "subscribe", 4: "unsubscribe", 5: "suspend"}[action], uid,
                         f"Receiving AE {clean(receiving, 16)} is not the calling AE (worklist admins only)")
            return NOT_AUTHORIZED
        if action == 3 and receiving not in self.subscribers:
            log.warning("UPS subscription for %s refused: not in CT_TRIAGE_UPS_SUBSCRIBERS", receiving)
            return RECEIVING_AE_UNKNOWN
        is_global = uid in (GLOBAL_SUBSCRIPTION, FILTERED_GLOBAL_SUBSCRIPTION)
        if action == 5 and not is_global:
            return NOT_APPROPRIATE
        lock = str(info.get("DeletionLock", "FALSE")).upper() == "TRUE"
        with session_scope(self.session_factory) as session:
            if action == 3:
                outcome, _ = worklist.subscribe(session, receiving, None if is_global else uid, lock)
            else:
                outcome = worklist.unsubscribe(session, receiving, None if is_global else uid,
                                               suspend_only=action == 5)
        log.info("UPS %s of %s to %s (from %s): %s", {3: "subscription", 4: "unsubscription", 5: "suspension"}[action],
                 receiving, "all workitems" if is_global else uid, caller, outcome)
        return OUTCOME_STATUS[outcome]


# -- event reports ----------------------------------------------------------------------------
def event_dataset(event_type: int, payload: dict) -> Dataset:
    ds = Dataset()
    if event_type == worklist.EVENT_STATE_REPORT:
        ds.ProcedureStepState = payload.get("state", "")
        ds.InputReadinessState = "READY"
        if payload.get("reason"):
            ds.ReasonForCancellation = str(payload["reason"])[:1024]
    elif event_type == worklist.EVENT_CANCEL_REQUESTED:
        ds.RequestingAE = (payload.get("requesting_ae") or "")[:16]
        ds.ReasonForCancellation = str(payload.get("reason") or "")[:1024]
    elif event_type == worklist.EVENT_PROGRESS_REPORT:
        progress = _from_json(payload.get("progress_json"))
        ds.ProcedureStepProgressInformationSequence = progress if progress is not None else []
    return ds


class UpsNotifier(Poller):
    """Sends pending ``ups_events`` rows as N-EVENT-REPORTs (a daemon thread of the node)."""

    thread_name = "ups-notifier"
    logger = log
    failed = "UPS notifier: unexpected error"  # a database error too: logged with its traceback
    join_timeout_s = 30.0

    def __init__(self, session_factory: sessionmaker[Session], service: UpsService, ae_title: str,
                 poll_interval_s: float = 1.0, timeout_s: float = 30.0,
                 tls_context: ssl.SSLContext | None = None):
        """``tls_context``: client SSLContext for subscribers marked ``+tls``; None: a default
        context verifying them against the system's CAs (``ssl.create_default_context``)."""
        if tls_context is not None and not isinstance(tls_context, ssl.SSLContext):
            raise TypeError(f"argument 'tls_context' must be an ssl.SSLContext, got {type(tls_context).__name__}")
        super().__init__(self.send_due, poll_interval_s)
        self.session_factory = session_factory
        self.service = service
        self.ae_title = ae_title
        self.timeout_s = timeout_s
        self.tls_context = tls_context

    def send_due(self) -> int:
        with session_scope(self.session_factory) as session:
            due = [(e.id, e.ae_title, e.event_type, e.payload_json, e.workitem.sop_instance_uid)
                   for e in worklist.due_events(session)]
        by_ae: dict[str, list] = {}
        for row in due:
            by_ae.setdefault(row[1], []).append(row)
        sent = 0
        for ae_title, rows in by_ae.items():
            sent += self._send_to(ae_title, rows)
        return sent

    def _finish(self, event_id: int, outcome, error: str | None = None) -> None:
        with session_scope(self.session_factory) as session:
            worklist.finish_event(session, event_id, outcome, error)

    def _associate(self, dest: Destination) -> tuple[Association | None, Literal["transient", "failed"], str]:
        """An established association to ``dest`` (TLS when ``dest.tls``), else None, the
        events' outcome and why. Not connected: probed once for the reason; a certificate
        that fails verification is ``failed`` (permanent), anything else ``transient``."""
        ae = AE(ae_title=self.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        ae.add_requested_context(UPS_EVENT)
        tls_context = peer_tls_context(dest.tls, self.tls_context)
        tls_args = (tls_context, dest.host) if tls_context is not None else None
        opened = threading.Event()
        try:
            assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls_args,
                                 evt_handlers=[(evt.EVT_CONN_OPEN, lambda event: opened.set())])
        except Exception as exc:  # e.g. an unresolvable host name: transient
            return None, "transient", f"cannot associate: {type(exc).__name__}: {exc}"
        if assoc.is_established:
            return assoc, "transient", ""
        if assoc.is_rejected or opened.is_set():
            return None, "transient", "association rejected or aborted"
        try:
            probed, why = connect_failure(dest.host, dest.port, tls_context, min(self.timeout_s, 5.0))
        except Exception as exc:  # the probe must never break the poller
            probed, why = "transient", type(exc).__name__
        return None, "failed" if probed == "permanent" else "transient", f"cannot associate: {why}"

    def _send_to(self, ae_title: str, rows: list) -> int:
        dest = self.service.subscribers.get(ae_title)
        if dest is None:
            for row in rows:
                self._finish(row[0], "failed", f"{ae_title} is not in CT_TRIAGE_UPS_SUBSCRIBERS")
            return 0
        assoc, outcome, error = self._associate(dest)
        if assoc is None:
            for row in rows:
                self._finish(row[0], outcome, f"{dest}: {error}")
            if outcome == "failed":
                log.error("UPS events for %s: %s (not retried: trust the subscriber's certificate, "
                          "or correct CT_TRIAGE_UPS_SUBSCRIBERS)", dest, error)
            else:
                log.warning("UPS events for %s: %s (will retry)", dest, error)
            return 0
        sent = 0
        try:
            for event_id, _, event_type, payload_json, uid in rows:
                ds = event_dataset(event_type, json.loads(payload_json or "{}"))
                try:
                    with reactor_paused(assoc):
                        rsp, _ = assoc.send_n_event_report(ds, event_type, UPS_PUSH, uid, meta_uid=UPS_EVENT)
                except Exception as exc:  # a peer that aborts mid-way is transient
                    self._finish(event_id, "transient", f"{dest}: {type(exc).__name__}")
                    break
                code = getattr(rsp, "Status", None)
                if code == status.SUCCESS:
                    self._finish(event_id, "sent")
                    sent += 1
                elif code is None:
                    self._finish(event_id, "transient", f"{dest}: no N-EVENT-REPORT response")
                    break
                else:
                    self._finish(event_id, "failed", f"{dest}: N-EVENT-REPORT answered 0x{code:04X}")
        finally:
            if assoc.is_established:
                assoc.release()
        log.info("UPS events: %d sent to %s", sent, dest)
        return sent
