"""Storage Commitment Push Model SCP (PS3.4 Annex J), answered from the database.

The N-ACTION is answered at once; the N-EVENT-REPORT follows on the same
association from a short-lived thread (pynetdicom cannot send a request from
inside the handler that is still answering the N-ACTION).
"""

from __future__ import annotations

import logging
import threading
import time

from pydicom.dataset import Dataset
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from db import repository
from db.session import session_scope
from dicom_node import status
from dicom_node.uids import is_valid_uid

STORAGE_COMMITMENT_PUSH_MODEL = "1.2.840.10008.1.20.1"
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"  # well-known SOP Instance

# N-ACTION statuses (PS3.7 C.4.3)
NO_SUCH_ACTION_TYPE = 0x0123
INVALID_ARGUMENT_VALUE = 0x0115
MISSING_ATTRIBUTE = 0x0120

log = logging.getLogger("ct_triage.node.commitment")


def build_event_report(session: Session, transaction_uid: str,
                       requested: list[tuple[str, str]]) -> tuple[int, Dataset]:
    """(event type, Event Information) for a request of (SOP class, SOP instance) pairs.

    Event type 1: all committed; 2: some failed (PS3.4 J.3.3.1.1).
    """
    held = repository.stored_sop_instance_uids(session, [uid for _, uid in requested])
    report = Dataset()
    report.TransactionUID = transaction_uid
    success, failed = [], []
    for sop_class_uid, sop_instance_uid in requested:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class_uid
        item.ReferencedSOPInstanceUID = sop_instance_uid
        if sop_instance_uid not in held:
            item.FailureReason = status.NO_SUCH_OBJECT_INSTANCE
            failed.append(item)
        elif held[sop_instance_uid] != sop_class_uid:
            item.FailureReason = status.CLASS_INSTANCE_CONFLICT
            failed.append(item)
        else:
            success.append(item)
    if success:
        report.ReferencedSOPSequence = success
    if failed:
        report.FailedSOPSequence = failed
    return (2 if failed else 1), report


class CommitmentService:
    def __init__(self, session_factory: sessionmaker[Session], report_delay_s: float = 0.05,
                 wait_indexed=lambda: True):
        # Instances acknowledged just before the N-ACTION may still be queued for indexing
        # (dicom_node.indexer): the report waits for them, so it never calls one missing.
        self.wait_indexed = wait_indexed
        self.session_factory = session_factory
        self.report_delay_s = report_delay_s

    def on_n_action(self, event) -> tuple[int, Dataset | None]:
        request = event.request
        if str(request.RequestedSOPClassUID) != STORAGE_COMMITMENT_PUSH_MODEL:
            return NO_SUCH_ACTION_TYPE, None
        if request.ActionTypeID != 1:
            return NO_SUCH_ACTION_TYPE, None
        try:
            info = event.action_information
            transaction_uid = str(info.TransactionUID)
            requested = [(str(item.ReferencedSOPClassUID), str(item.ReferencedSOPInstanceUID))
                         for item in info.ReferencedSOPSequence]
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            log.warning("storage commitment request from %s unusable: %s", event.assoc.requestor.ae_title, exc)
            return MISSING_ATTRIBUTE, None
        if not is_valid_uid(transaction_uid) or not all(is_valid_uid(u) for pair in requested for u in pair):
            return INVALID_ARGUMENT_VALUE, None
        log.info("storage commitment request from %s: transaction %s, %d instance(s)",
                 event.assoc.requestor.ae_title, transaction_uid, len(requested))
        threading.Thread(target=self._send_report, args=(event.assoc, transaction_uid, requested),
                         name="commitment-report", daemon=True).start()
        return status.SUCCESS, None

    def _send_report(self, assoc, transaction_uid: str, requested: list[tuple[str, str]]) -> None:
        self.wait_indexed()
        try:
            with session_scope(self.session_factory) as session:
                event_type, report = build_event_report(session, transaction_uid, requested)
        except SQLAlchemyError as exc:
            log.error("storage commitment %s: database unavailable: %s", transaction_uid, exc)
            return
        time.sleep(self.report_delay_s)  # let the N-ACTION response leave first
        if not assoc.is_established:
            log.warning("storage commitment %s: association closed before the report could be sent "
                        "(the SCU may ask again)", transaction_uid)
            return
        try:
            rsp = assoc.send_n_event_report(report, event_type, STORAGE_COMMITMENT_PUSH_MODEL,
                                            STORAGE_COMMITMENT_INSTANCE)
        except Exception as exc:  # peer gone, no context: logged, the SCU can retry
            log.warning("storage commitment %s: report not delivered: %s", transaction_uid, exc)
            return
        failed = len(report.get("FailedSOPSequence", []))
        log.info("storage commitment %s reported: %d committed, %d failed (response 0x%04X)", transaction_uid,
                 len(requested) - failed, failed, getattr(rsp, "Status", 0xFFFF))
