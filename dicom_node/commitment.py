"""Storage Commitment Push Model SCP (PS3.4 Annex J), answered from the database.

The N-ACTION is answered at once; the N-EVENT-REPORT follows from a short-lived
thread (pynetdicom cannot send a request from inside the handler that is still
answering the N-ACTION):

1. on the same association when it is still established (after
   ``report_delay_s``, 50 ms, so the N-ACTION response leaves first);
2. otherwise (many scanners release right after the N-ACTION response, PS3.4
   J.3.3), on a new association that we open to the scanner, found by its calling
   AE title in ``CT_TRIAGE_COMMITMENT_PEERS`` (``AET@host:port[+tls]``). We are the
   association requestor acting as the Storage Commitment SCP, so the SCP/SCU role
   selection item proposes the SCP role for us (PS3.4 J.3.3, PS3.7 D.3.3.4).
   ``REPORT_ATTEMPTS`` (4) tries, ``REPORT_RETRY_S`` apart (2, 5, 10 s), each
   with the node's ACSE/DIMSE timeouts; a report not delivered after that is
   logged and dropped: the scanner asks again (its own commitment timeout).

Several nodes (docs/production.md, "Several hosts"): the node the scanner reaches answers,
from the database. An instance another node acknowledged may still be queued in that node's
indexer (or waiting for a survivor, when that node died): while a requested instance has no
row but its file is in the shared storage (``on_disk``), the report waits for the row, at
most ``ON_DISK_WAIT_S`` (35 s).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from pydicom.dataset import Dataset
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from ct_triage.association import peer_tls_context, reactor_paused
from ct_triage.settings import Destination
from db import repository
from db.session import session_scope
from dicom_node import status
from dicom_node.uids import is_valid_uid

# Tries of a report on a new association, and the waits between them (seconds).
REPORT_ATTEMPTS = 4
REPORT_RETRY_S = (2.0, 5.0, 10.0)
# Longest wait for the row of an instance that is on disk (several nodes: indexed by the node
# that acknowledged it, or by a survivor within 30 s when that node died).
ON_DISK_WAIT_S = 35.0

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
    def __init__(self, session_factory: sessionmaker[Session], report_delay_s: float = 0.05, *,
                 ae_title: str = "CTTRIAGE", peers: list[Destination] | None = None,
                 retry_s: tuple[float, ...] = REPORT_RETRY_S, acse_timeout_s: float = 30.0,
                 dimse_timeout_s: float = 60.0, tls_context=None, wait_indexed=lambda: True):
        # Instances acknowledged just before the N-ACTION may still be queued for indexing
        # (dicom_node.indexer): the report waits for them, so it never calls one missing.
        self.wait_indexed = wait_indexed
        self.session_factory = session_factory
        self.report_delay_s = report_delay_s
        self.ae_title = ae_title
        self.peers = {peer.ae_title: peer for peer in peers or []}
        self.retry_s = tuple(retry_s)
        self.acse_timeout_s = acse_timeout_s
        self.dimse_timeout_s = dimse_timeout_s
        self.tls_context = tls_context  # client SSLContext for peers marked +tls
        # Several nodes: True when an instance's file is in the shared storage (acknowledged by
        # some node, maybe not indexed yet): the report waits for its row (ON_DISK_WAIT_S).
        self.on_disk: Callable[[str], bool] = lambda sop_instance_uid: False
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()

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
        calling = str(event.assoc.requestor.ae_title).strip()
        thread = threading.Thread(target=self._send_report, args=(event.assoc, calling, transaction_uid, requested),
                                  name="commitment-report", daemon=True)
        with self._lock:
            self._threads.add(thread)
        thread.start()
        return status.SUCCESS, None

    def wait_idle(self, timeout: float) -> bool:
        """Wait for reports in flight (graceful shutdown); True when none is left."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                threads = [t for t in self._threads if t.is_alive()]
                self._threads = set(threads)
            if not threads:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            threads[0].join(min(remaining, 0.2))

    def _report_when_indexed(self, transaction_uid: str, requested: list[tuple[str, str]]) -> tuple[int, Dataset]:
        """The report, once every requested instance on disk has its row: another node may have
        acknowledged it and not indexed it yet, or died before (a survivor indexes it)."""
        deadline = time.monotonic() + ON_DISK_WAIT_S
        while True:
            with session_scope(self.session_factory) as session:
                event_type, report = build_event_report(session, transaction_uid, requested)
            failed = [str(item.ReferencedSOPInstanceUID) for item in report.get("FailedSOPSequence", [])
                      if item.FailureReason == status.NO_SUCH_OBJECT_INSTANCE]
            if not failed or time.monotonic() >= deadline or not any(self.on_disk(uid) for uid in failed):
                return event_type, report
            time.sleep(0.2)

    def _send_report(self, assoc, calling: str, transaction_uid: str, requested: list[tuple[str, str]]) -> None:
        self.wait_indexed()
        try:
            event_type, report = self._report_when_indexed(transaction_uid, requested)
        except SQLAlchemyError as exc:
            log.error("storage commitment %s: database unavailable: %s", transaction_uid,
                      str(exc).splitlines()[0][:300])
            return
        time.sleep(self.report_delay_s)  # let the N-ACTION response leave first
        how = None
        if assoc.is_established and self._report_on(assoc, event_type, report, transaction_uid):
            how = "on the same association"
        if how is None:
            how = self._report_on_new_association(calling, event_type, report, transaction_uid)
        if how is None:
            return
        failed = len(report.get("FailedSOPSequence", []))
        log.info("storage commitment %s reported %s: %d committed, %d failed", transaction_uid, how,
                 len(requested) - failed, failed)

    def _report_on(self, assoc, event_type: int, report: Dataset, transaction_uid: str) -> bool:
        try:
            with reactor_paused(assoc):
                rsp, _ = assoc.send_n_event_report(report, event_type, STORAGE_COMMITMENT_PUSH_MODEL,
                                                STORAGE_COMMITMENT_INSTANCE)
        except Exception as exc:  # peer gone, no context: try a new association
            log.info("storage commitment %s: report on the open association failed: %s", transaction_uid, exc)
            return False
        code = getattr(rsp, "Status", None)
        if code is None:  # no response: association closed or timed out under us
            return False
        if code != status.SUCCESS:
            log.warning("storage commitment %s: the scanner answered the report with 0x%04X", transaction_uid,
                        code)
        return True

    def _report_on_new_association(self, calling: str, event_type: int, report: Dataset,
                                   transaction_uid: str) -> str | None:
        peer = self.peers.get(calling)
        if peer is None:
            log.warning("storage commitment %s: the association from %s closed before the report and "
                        "CT_TRIAGE_COMMITMENT_PEERS has no address for it (the scanner may ask again)",
                        transaction_uid, calling)
            return None
        from pynetdicom import AE, build_role

        for attempt in range(1, REPORT_ATTEMPTS + 1):
            ae = AE(ae_title=self.ae_title)
            ae.acse_timeout = self.acse_timeout_s
            ae.dimse_timeout = self.dimse_timeout_s
            ae.network_timeout = self.dimse_timeout_s
            ae.add_requested_context(STORAGE_COMMITMENT_PUSH_MODEL)
            role = build_role(STORAGE_COMMITMENT_PUSH_MODEL, scu_role=False, scp_role=True)
            context = peer_tls_context(peer.tls, self.tls_context)
            tls_args = (context, peer.host) if context is not None else None
            reason = "association not established"
            try:
                assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, ext_neg=[role],
                                     tls_args=tls_args)
                if assoc.is_established:
                    try:
                        if self._report_on(assoc, event_type, report, transaction_uid):
                            return f"on a new association to {peer.ae_title}@{peer.host}:{peer.port}"
                        reason = "no response to the N-EVENT-REPORT"
                    finally:
                        if assoc.is_established:
                            assoc.release()
                elif assoc.is_rejected:
                    reason = "association rejected"
            except Exception as exc:  # pynetdicom raises for bad TLS and the like
                reason = f"{type(exc).__name__}: {exc}"
            finally:
                ae.shutdown()
            if attempt < REPORT_ATTEMPTS:
                delay = self.retry_s[min(attempt - 1, len(self.retry_s) - 1)]
                log.info("storage commitment %s: report to %s@%s:%d failed (%s), attempt %d of %d, retry in %.0f s",
                         transaction_uid, peer.ae_title, peer.host, peer.port, reason, attempt, REPORT_ATTEMPTS,
                         delay)
                time.sleep(delay)
            else:
                log.warning("storage commitment %s: report to %s@%s:%d not delivered after %d attempts (%s); "
                            "the scanner may ask again", transaction_uid, peer.ae_title, peer.host, peer.port,
                            REPORT_ATTEMPTS, reason)
        return None
