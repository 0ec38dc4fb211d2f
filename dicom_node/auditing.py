"""What the node writes to the audit trail (IHE ATNA, :mod:`ct_triage.audit`), and when.

============================================  ===========================================================
event                                         recorded
============================================  ===========================================================
association refused (allowlist, called AE,    110113 Security Alert, one per refusal, at most
TLS subject)                                  ``REFUSALS_PER_MINUTE`` (10) per address a minute (an attack
                                              must not fill the database; the rest are counted in the log)
instances received                            110104 Instances Transferred, one per study and association
UPS C-FIND, N-GET                             110112 Query, one per request (the identifier as received)
UPS claim, complete, cancel; expiry           110111 Procedure Record (an expiry by us, no peer)
UPS request refused (role, Receiving AE)      110113 Security Alert (restricted function)
node start and stop                           110100 Application Activity (by the command line)
============================================  ===========================================================

Each message is written to the database first, in its own transaction
(:func:`ct_triage.audit.record_now`, which never raises), and sent by the node's audit
sender (:class:`AuditSender`) to ``CT_TRIAGE_AUDIT_REPOSITORY``.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from sqlalchemy.orm import Session, sessionmaker

from ct_triage import audit
from ct_triage.polling import Poller
from ct_triage.settings import Settings
from ct_triage.text import clean

log = logging.getLogger("ct_triage.node.audit")

REFUSALS_PER_MINUTE = 10  # Security Alerts recorded per peer address and minute
SEND_INTERVAL_S = 2.0  # how often the sender looks for unsent messages


def _encoded(identifier: Dataset | None) -> bytes:
    """The identifier as Explicit VR Little Endian bytes (what the Query event carries)."""
    if identifier is None:
        return b""
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    try:
        write_dataset(buffer, identifier)
    except Exception:  # an identifier we cannot re-encode is still a query worth recording
        return b""
    return buffer.getvalue()


class NodeAudit:
    """The node's audit calls; every method records and returns, never raises."""

    def __init__(self, session_factory: sessionmaker[Session], settings: Settings):
        self.session_factory = session_factory
        self.settings = settings
        self._refusals = audit.PerKeyRate(REFUSALS_PER_MINUTE)

    def _record(self, build, **fields) -> bool:
        try:
            message = build(self.settings, **fields)
        except Exception:  # a builder refusing a value must not break the service being audited
            log.exception("audit message %s could not be built", getattr(build, "__name__", build))
            return False
        return audit.record_now(self.session_factory, message)

    def _allow_refusal(self, address: str) -> bool:
        if self._refusals.allow(address):
            return True
        suppressed = self._refusals.suppressed.get(address, 0)
        if suppressed in (1, 100, 10000):
            log.warning("audit: more than %d refused associations a minute from %s: %d not recorded",
                        REFUSALS_PER_MINUTE, address, suppressed)
        return False

    def application(self, action: str) -> None:
        """The node started or stopped (Application Activity)."""
        self._record(audit.application_activity, action=action, process="ct-triage node")

    def association_refused(self, calling: str, called: str, address: str, why: str) -> None:
        if self._allow_refusal(address):
            self._record(audit.association_refused, calling_ae=clean(calling, 16) or None, address=address,
                         called_ae=clean(called, 16) or None, reason=why)

    def request_refused(self, assoc, operation: str, uid: str | None, why: str) -> None:
        self._record(audit.association_refused, calling_ae=clean(str(assoc.requestor.ae_title), 16) or None,
                     address=assoc.requestor.address, called_ae=None, alert="restricted-function",
                     reason=f"UPS {operation}{' ' + uid if uid else ''} refused: {why}")

    def instances_received(self, assoc, stats) -> None:
        for study_uid, study in stats.studies.items():
            self._record(audit.instances_transferred, direction="received",
                         peer_ae=clean(str(stats.calling_ae_title), 16) or "?", peer_address=stats.address,
                         study_uid=study_uid, sop_classes=dict(study.sop_classes), patient_id=study.patient_id,
                         patient_name=study.patient_name, issuer_of_patient_id=study.issuer_of_patient_id,
                         accession=study.accession_number)

    def query(self, assoc, sop_class_uid: str, identifier: Dataset | None, outcome: int = 0) -> None:
        self._record(audit.query, calling_ae=clean(str(assoc.requestor.ae_title), 16) or "?",
                     address=assoc.requestor.address, sop_class_uid=sop_class_uid, query=_encoded(identifier),
                     transfer_syntax_uid="1.2.840.10008.1.2.1", outcome=outcome)

    def workitem_expired(self, workitem_uid: str, study_uid: str) -> None:
        """The SCP cancelled an unclaimed workitem (dicom_node.expiry): a Procedure Record by us."""
        item = _workitem_row(self.session_factory, workitem_uid)
        if item is not None:
            self.workitem_changed(None, "cancelled", item, f"expired: not claimed within "
                                  f"{self.settings.worklist_expiry_h:g} h (CT_TRIAGE_WORKLIST_EXPIRY_H)")

    def workitem_changed(self, assoc, change: str, item, reason: str | None = None) -> None:
        """``item``: the UpsWorkitem row after the change (read inside its session)."""
        self._record(audit.workitem_changed, change=change,
                     performer_ae=clean(str(assoc.requestor.ae_title), 16) if assoc is not None else None,
                     address=assoc.requestor.address if assoc is not None else None,
                     workitem_uid=item.sop_instance_uid, study_uid=item.study_instance_uid,
                     patient_id=item.patient_id, patient_name=item.patient_name,
                     issuer_of_patient_id=item.issuer_of_patient_id, accession=item.accession_number, reason=reason)


def _workitem_row(session_factory, uid: str):
    from db import worklist

    with session_factory() as session:
        item = worklist.get_workitem(session, uid)
        if item is None:
            return None
        return SimpleNamespace(sop_instance_uid=item.sop_instance_uid, study_instance_uid=item.study_instance_uid,
                               patient_id=item.patient_id, patient_name=item.patient_name,
                               issuer_of_patient_id=item.issuer_of_patient_id, accession_number=item.accession_number)


class AuditSender(Poller):
    """Sends stored audit messages to ``CT_TRIAGE_AUDIT_REPOSITORY`` (a daemon thread of the node)."""

    thread_name = "audit-sender"
    logger = log
    failed = "audit sender: unexpected error"
    join_timeout_s = 10.0

    def __init__(self, session_factory: sessionmaker[Session], settings: Settings):
        super().__init__(self.send, SEND_INTERVAL_S)
        self.session_factory = session_factory
        self.settings = settings

    def send(self) -> int:
        return audit.send_pending_audit(self.session_factory, self.settings)
