"""A UPS worklist client and a UPS watcher (event SCP), both real pynetdicom AEs."""

from __future__ import annotations

import ssl
import threading
import time

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt

from dicom_node.ups import GLOBAL_SUBSCRIPTION, UPS_EVENT, UPS_PULL, UPS_PUSH, UPS_WATCH


class UpsClient:
    """One association proposing UPS Pull and Watch (as a reading workstation would)."""

    def __init__(self, port: int, ae_title: str = "READER", called: str = "CTTRIAGE_WL", source: str = "127.0.0.1",
                 *, must_accept: bool = True):
        """``source``: the address the client connects from (127.0.0.2 and up play other hosts)."""
        ae = AE(ae_title=ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        ae.add_requested_context(UPS_PULL)
        ae.add_requested_context(UPS_WATCH)
        self.assoc = ae.associate("127.0.0.1", port, ae_title=called, bind_address=(source, 0))
        if must_accept:
            assert self.assoc.is_established, "UPS association was not accepted"

    def close(self) -> None:
        if self.assoc.is_established:
            self.assoc.release()

    def __enter__(self) -> UpsClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def find(self, **keys) -> list[Dataset]:
        query = Dataset()
        for keyword in ("SOPInstanceUID", "ScheduledProcedureStepPriority", "ProcedureStepState", "WorklistLabel",
                        "ProcedureStepLabel", "PatientName", "PatientID", "StudyInstanceUID", "AccessionNumber",
                        "ScheduledProcedureStepStartDateTime", "InputInformationSequence",
                        "CommentsOnTheScheduledProcedureStep", "TransactionUID"):
            setattr(query, keyword, keys.pop(keyword, "" if keyword != "InputInformationSequence" else []))
        for keyword, value in keys.items():
            setattr(query, keyword, value)
        out = []
        for status, identifier in self.assoc.send_c_find(query, UPS_PULL):
            assert status is not None and "Status" in status, "no C-FIND response"
            if status.Status in (0xFF00, 0xFF01):
                out.append(identifier)
            else:
                assert status.Status == 0x0000, f"C-FIND ended with 0x{status.Status:04X}"
        return out

    def action(self, uid: str, action_type: int, info: Dataset | None, meta=UPS_PULL) -> int:
        status, _ = self.assoc.send_n_action(info, action_type, UPS_PUSH, uid, meta_uid=meta)
        return status.Status

    def claim(self, uid: str, transaction_uid: str | None = None) -> tuple[int, str]:
        transaction_uid = transaction_uid or generate_uid()
        return self.change_state(uid, "IN PROGRESS", transaction_uid), transaction_uid

    def change_state(self, uid: str, state: str, transaction_uid: str | None) -> int:
        info = Dataset()
        info.ProcedureStepState = state
        if transaction_uid:
            info.TransactionUID = transaction_uid
        return self.action(uid, 1, info)

    def request_cancel(self, uid: str, reason: str = "no longer needed") -> int:
        info = Dataset()
        info.ReasonForCancellation = reason
        return self.action(uid, 2, info, meta=UPS_WATCH)

    def subscribe(self, receiving_ae: str, uid: str = GLOBAL_SUBSCRIPTION, deletion_lock: bool = False) -> int:
        info = Dataset()
        info.ReceivingAE = receiving_ae
        info.DeletionLock = "TRUE" if deletion_lock else "FALSE"
        return self.action(uid, 3, info, meta=UPS_WATCH)

    def unsubscribe(self, receiving_ae: str, uid: str = GLOBAL_SUBSCRIPTION) -> int:
        info = Dataset()
        info.ReceivingAE = receiving_ae
        return self.action(uid, 4, info, meta=UPS_WATCH)

    def set(self, uid: str, modifications: Dataset) -> int:
        status, _ = self.assoc.send_n_set(modifications, UPS_PUSH, uid, meta_uid=UPS_PULL)
        return status.Status

    def get(self, uid: str, tags: list | None = None) -> tuple[int, Dataset | None]:
        status, ds = self.assoc.send_n_get(tags or [], UPS_PUSH, uid, meta_uid=UPS_PULL)
        return status.Status, ds

    def complete(self, uid: str, transaction_uid: str) -> tuple[int, int]:
        """N-SET the performed procedure (final state requirements), then N-ACTION COMPLETED."""
        performed = Dataset()
        performed.PerformedProcedureStepStartDateTime = "20261130090000"
        performed.PerformedProcedureStepEndDateTime = "20261130091000"
        mods = Dataset()
        mods.TransactionUID = transaction_uid
        mods.UnifiedProcedureStepPerformedProcedureSequence = [performed]
        return self.set(uid, mods), self.change_state(uid, "COMPLETED", transaction_uid)


class UpsWatcher:
    """An SCP of the UPS Event SOP class recording every N-EVENT-REPORT it gets."""

    def __init__(self, port: int, ae_title: str = "WATCHER", ssl_context: ssl.SSLContext | None = None):
        """``ssl_context``: a server context to accept DICOM TLS only (the subscriber ``+tls``)."""
        self.events: list[tuple[int, str, Dataset]] = []  # (event type, workitem UID, event information)
        self.over_tls: list[bool] = []  # per event: whether its association's socket was a TLS socket
        self._lock = threading.Lock()
        ae = AE(ae_title=ae_title)
        ae.add_supported_context(UPS_EVENT)
        ae.add_supported_context(UPS_PUSH)
        self.server = ae.start_server(("127.0.0.1", port), block=False, ssl_context=ssl_context,
                                      evt_handlers=[(evt.EVT_N_EVENT_REPORT, self._on_report)])

    def _on_report(self, event):
        sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
        with self._lock:
            self.events.append((event.request.EventTypeID, str(event.request.AffectedSOPInstanceUID),
                                event.event_information))
            self.over_tls.append(isinstance(sock, ssl.SSLSocket) and sock.version() is not None)
        return 0x0000, None

    def states(self, uid: str) -> list[str]:
        with self._lock:
            return [str(info.get("ProcedureStepState", "")) for kind, u, info in self.events if u == uid and kind == 1]

    def wait_for_state(self, uid: str, state: str, timeout: float = 30.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if state in self.states(uid):
                return self.states(uid)
            time.sleep(0.1)
        raise AssertionError(f"no {state} report for {uid}; got {self.events}")

    def stop(self) -> None:
        self.server.shutdown()
