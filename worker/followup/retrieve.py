"""Query/retrieve SCU for priors: C-FIND (Study Root, STUDY level) and C-MOVE to our own node.

:func:`find_studies` asks a PACS for studies matching an identifier and returns the
answers; :func:`move_study` asks it to C-MOVE one study to a move destination (our AE
title: the PACS must know it with host and port, e.g. Orthanc's ``DicomModalities``).
Neither raises for peer problems: each returns a :class:`QueryReport` whose outcome is

- ``ok``: final status Success (0x0000), or for C-MOVE a Warning (0xB000: some
  sub-operations failed; what arrived is scored);
- ``transient``: connection refused/unreachable, no association response, association
  aborted or dropped, no final response (DIMSE timeout), A-ASSOCIATE-RJ that
  :func:`ct_triage.association.classify_rejection` calls transient, C-MOVE 0xA701/0xA702
  (out of resources), 0xFE00 (cancel);
- ``permanent``: association rejected permanently (e.g. our AE title unknown to the
  PACS), no presentation context accepted, any other failure status (0xA801 move
  destination unknown, 0xA900 identifier does not match SOP class, 0xCxxx unable to
  process).

Connection classification is shared with the C-STORE SCU (``scu.py``).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Literal

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # generated at import time
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

from ct_triage.association import check_ae_title, classify_rejection, connect_failure, reactor_paused
from ct_triage.settings import Destination

Outcome = Literal["ok", "transient", "permanent"]
TRANSIENT_STATUSES = {0xA701, 0xA702, 0xFE00}


@dataclass
class QueryReport:
    outcome: Outcome
    reason: str
    answers: list[Dataset] = field(default_factory=list)  # C-FIND matches
    completed: int = 0  # C-MOVE sub-operations
    failed: int = 0
    warning: int = 0


def _associate(source: Destination, calling_ae_title: str, sop_class, acse_timeout: float, dimse_timeout: float,
               network_timeout: float):
    ae = AE(ae_title=check_ae_title(calling_ae_title, "calling_ae_title"))
    ae.acse_timeout = acse_timeout
    ae.dimse_timeout = dimse_timeout
    ae.network_timeout = network_timeout
    ae.connection_timeout = acse_timeout
    ae.add_requested_context(sop_class)
    opened = threading.Event()
    started = time.monotonic()
    where = str(source)
    try:
        assoc = ae.associate(source.host, source.port, ae_title=source.ae_title,
                             evt_handlers=[(evt.EVT_CONN_OPEN, lambda event: opened.set())])
    except (OSError, ValueError) as exc:
        return None, QueryReport("transient", f"cannot open an association to {where}: {exc}")
    if assoc.is_established:
        return assoc, None
    primitive = getattr(assoc.acceptor, "primitive", None)
    if assoc.is_rejected and primitive is not None:
        rejected = classify_rejection(int(primitive.result), int(primitive.result_source), int(primitive.diagnostic))
        outcome: Outcome = "transient" if rejected == "transient" else "permanent"
        return None, QueryReport(outcome, f"association rejected by {where}: {primitive.result_str}, "
                                          f"source {primitive.source_str}, reason {primitive.reason_str}")
    if not opened.is_set():
        connect_outcome, reason = connect_failure(source.host, source.port, None, min(acse_timeout, 5.0))
        return None, QueryReport("transient" if connect_outcome == "transient" else "permanent", reason)
    if primitive is not None and getattr(primitive, "result", None) == 0x00:
        return None, QueryReport("permanent", f"{where} accepted the association but not {sop_class.name}")
    if time.monotonic() - started >= acse_timeout * 0.95:
        return None, QueryReport("transient", f"no association response from {where} within {acse_timeout:g} s")
    return None, QueryReport("transient", f"association with {where} aborted during negotiation")


def _final_status(status: Dataset | None, where: str, what: str) -> tuple[Outcome, str]:
    if status is None or "Status" not in status:
        return "transient", f"no {what} response from {where} (DIMSE timeout or association aborted)"
    code = int(status.Status)
    text = f"{what} status 0x{code:04X}" + (f": {status.ErrorComment}" if status.get("ErrorComment") else "")
    if code == 0x0000 or 0xB000 <= code <= 0xBFFF:
        return "ok", text
    if code in TRANSIENT_STATUSES or 0xA700 <= code <= 0xA7FF:
        return "transient", text
    return "permanent", text


def find_studies(source: Destination, identifier: Dataset, *, calling_ae_title: str, acse_timeout: float = 30,
                 dimse_timeout: float = 60, network_timeout: float = 60) -> QueryReport:
    """C-FIND at STUDY level in the Study Root model; every pending answer is returned."""
    if not isinstance(source, Destination):
        raise TypeError(f"argument 'source' must be a Destination, got {type(source).__name__}")
    if not isinstance(identifier, Dataset):
        raise TypeError(f"argument 'identifier' must be a pydicom Dataset, got {type(identifier).__name__}")
    identifier.QueryRetrieveLevel = "STUDY"
    assoc, failure = _associate(source, calling_ae_title, StudyRootQueryRetrieveInformationModelFind,
                                acse_timeout, dimse_timeout, network_timeout)
    if failure is not None:
        return failure
    answers: list[Dataset] = []
    final = None
    try:
        with reactor_paused(assoc):
            for status, answer in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind):
                if status is None or "Status" not in status:
                    final = None
                    break
                if int(status.Status) in (0xFF00, 0xFF01):
                    if answer is not None:
                        answers.append(answer)
                    continue
                final = status
    finally:
        if assoc.is_established:
            assoc.release()
    outcome, text = _final_status(final, str(source), "C-FIND")
    return QueryReport(outcome, f"{text}; {len(answers)} match(es)", answers)


def move_study(source: Destination, study_instance_uid: str, move_destination: str, *, calling_ae_title: str,
               acse_timeout: float = 30, dimse_timeout: float = 600, network_timeout: float = 600) -> QueryReport:
    """C-MOVE one study (STUDY level, Study Root) from ``source`` to ``move_destination``."""
    if not isinstance(source, Destination):
        raise TypeError(f"argument 'source' must be a Destination, got {type(source).__name__}")
    if not isinstance(study_instance_uid, str) or not study_instance_uid:
        raise ValueError("argument 'study_instance_uid' must be a non-empty UID string")
    move_destination = check_ae_title(move_destination, "move_destination")
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study_instance_uid
    assoc, failure = _associate(source, calling_ae_title, StudyRootQueryRetrieveInformationModelMove,
                                acse_timeout, dimse_timeout, network_timeout)
    if failure is not None:
        return failure
    final = None
    try:
        with reactor_paused(assoc):
            responses = assoc.send_c_move(identifier, move_destination, StudyRootQueryRetrieveInformationModelMove)
            for status, _ in responses:
                if status is None or "Status" not in status:
                    final = None
                    break
                final = status
                if int(status.Status) != 0xFF00:
                    break
    finally:
        if assoc.is_established:
            assoc.release()
    outcome, text = _final_status(final, str(source), "C-MOVE")
    counts = {k: int(final.get(f"NumberOf{k.title()}Suboperations", 0) or 0) if final is not None else 0
              for k in ("completed", "failed", "warning")}
    return QueryReport(outcome, f"{text}; {counts['completed']} sub-operation(s) completed, {counts['failed']} failed",
                       completed=counts["completed"], failed=counts["failed"], warning=counts["warning"])
