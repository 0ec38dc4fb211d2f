"""Storage Commitment (PS3.4 Annex J) as scanners use it: the report on the same
association while it is open, else on a new association the node opens to the
scanner's own SCP (CT_TRIAGE_COMMITMENT_PEERS), with retries."""

from __future__ import annotations

import logging
import threading
import time

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import StorageCommitmentPushModel

from dicom_node import status
from tests.support.scanner import free_port, require_dcmtk, storescu, write_ct_series
from tests.test_node import wait_for

WELL_KNOWN_INSTANCE = "1.2.840.10008.1.20.1.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


class ScannerSCP:
    """The scanner's own Storage Commitment SCU-side listener (it accepts our SCP role)."""

    def __init__(self, port: int, ssl_context=None):
        self.port = port
        self.ssl_context = ssl_context
        self.reports: list[tuple[int, Dataset, str]] = []
        self.received = threading.Event()
        self.ae = AE(ae_title="SCANNER")
        self.ae.add_supported_context(StorageCommitmentPushModel, scu_role=False, scp_role=True)
        self.server = None

    def _on_report(self, event):
        self.reports.append((event.request.EventTypeID, event.event_information,
                             event.assoc.requestor.ae_title))
        self.received.set()
        return 0x0000, None

    def start(self) -> ScannerSCP:
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False, ssl_context=self.ssl_context,
                                           evt_handlers=[(evt.EVT_N_EVENT_REPORT, self._on_report)])
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None


def _request(uids: list[str]) -> Dataset:
    request = Dataset()
    request.TransactionUID = generate_uid()
    refs = []
    for uid in uids:
        item = Dataset()
        item.ReferencedSOPClassUID = CT_IMAGE
        item.ReferencedSOPInstanceUID = uid
        refs.append(item)
    request.ReferencedSOPSequence = refs
    return request


def _n_action_then_release(node_port: int, request: Dataset, on_same_assoc: list) -> None:
    """A scanner that releases right after the N-ACTION response (the common case)."""
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(StorageCommitmentPushModel)
    def on_report(event):
        on_same_assoc.append(event)
        return 0x0000, None

    assoc = ae.associate("127.0.0.1", node_port, ae_title="CTTRIAGE",
                         evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
    assert assoc.is_established
    status_ds, _ = assoc.send_n_action(request, 1, StorageCommitmentPushModel, WELL_KNOWN_INSTANCE)
    assert status_ds.Status == 0x0000
    assoc.release()
    ae.shutdown()


@pytest.fixture
def stored_series(start_node, sqlite_url, tmp_path):
    require_dcmtk()
    scanner_port = free_port()
    running = start_node(sqlite_url, commitment_peers=[f"SCANNER@127.0.0.1:{scanner_port}"])
    series = write_ct_series(tmp_path / "s", 3, rows=32, columns=32, seed=61)
    assert storescu(running.port, series.paths).returncode == 0
    return running, series, scanner_port


def test_report_goes_on_a_new_association_when_the_scanner_released(stored_series):
    running, series, scanner_port = stored_series
    scanner = ScannerSCP(scanner_port).start()
    try:
        unknown = generate_uid()
        request = _request(series.sop_instance_uids + [unknown])
        on_same_assoc: list = []
        _n_action_then_release(running.port, request, on_same_assoc)
        assert scanner.received.wait(20), "no N-EVENT-REPORT on a new association"
    finally:
        scanner.stop()
    assert on_same_assoc == []
    event_type, info, requestor = scanner.reports[0]
    assert requestor == "CTTRIAGE"
    assert event_type == 2  # some failed
    assert info.TransactionUID == request.TransactionUID
    assert sorted(i.ReferencedSOPInstanceUID for i in info.ReferencedSOPSequence) == sorted(series.sop_instance_uids)
    assert [(i.ReferencedSOPInstanceUID, i.FailureReason) for i in info.FailedSOPSequence] == [
        (unknown, status.NO_SUCH_OBJECT_INSTANCE)]
    assert len(scanner.reports) == 1


def test_report_to_a_tls_peer_goes_over_tls_and_an_untrusted_one_gets_none(start_node, sqlite_url, tmp_path,
                                                                            caplog):
    """A ``+tls`` commitment peer: the report's new association is TLS, verified against the
    node's client context (the system's CAs when none is set: a self-signed peer gets nothing)."""
    import ssl

    from tests.test_delivery_scu import _self_signed

    pytest.importorskip("cryptography")
    require_dcmtk()
    cert, key = _self_signed(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    scanner_port = free_port()
    running = start_node(sqlite_url, commitment_peers=[f"SCANNER@127.0.0.1:{scanner_port}+tls"])
    series = write_ct_series(tmp_path / "s", 2, rows=32, columns=32, seed=62)
    assert storescu(running.port, series.paths).returncode == 0
    running.node.commitment.retry_s = (600.0,)  # the untrusted attempt's retry is not in this test
    caplog.set_level(logging.INFO, logger="ct_triage")
    scanner = ScannerSCP(scanner_port, ssl_context=server_ctx).start()
    try:
        _n_action_then_release(running.port, _request(series.sop_instance_uids), [])
        wait_for(lambda: "attempt 1 of" in caplog.text, timeout=20)
        assert "certificate verify failed" in caplog.text.lower(), caplog.text[-2000:]
        assert not scanner.received.is_set(), "a report reached a peer whose certificate is not trusted"
        trusting = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
        trusting.check_hostname = False  # the certificate names localhost; the peer is 127.0.0.1
        running.node.commitment.tls_context = trusting
        request = _request(series.sop_instance_uids)
        _n_action_then_release(running.port, request, [])
        assert scanner.received.wait(20), "no N-EVENT-REPORT over TLS"
    finally:
        scanner.stop()
    event_type, info, requestor = scanner.reports[0]
    assert (event_type, requestor, info.TransactionUID) == (1, "CTTRIAGE", request.TransactionUID)


def test_report_on_a_new_association_is_retried_until_the_scanner_listens(stored_series):
    running, series, scanner_port = stored_series
    running.node.commitment.retry_s = (1.0,)
    request = _request(series.sop_instance_uids)
    _n_action_then_release(running.port, request, [])
    time.sleep(0.6)  # the first attempt meets a closed port
    scanner = ScannerSCP(scanner_port).start()
    try:
        assert scanner.received.wait(20), "the report was not retried"
    finally:
        scanner.stop()
    event_type, info, _ = scanner.reports[0]
    assert event_type == 1  # all committed
    assert info.TransactionUID == request.TransactionUID
    assert "FailedSOPSequence" not in info


def test_report_stays_on_the_open_association(stored_series):
    running, series, scanner_port = stored_series
    scanner = ScannerSCP(scanner_port).start()
    reports = []
    received = threading.Event()

    def on_report(event):
        reports.append((event.request.EventTypeID, event.event_information))
        received.set()
        return 0x0000, None

    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate("127.0.0.1", running.port, ae_title="CTTRIAGE",
                         evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
    try:
        request = _request(series.sop_instance_uids)
        status_ds, _ = assoc.send_n_action(request, 1, StorageCommitmentPushModel, WELL_KNOWN_INSTANCE)
        assert status_ds.Status == 0x0000
        assert received.wait(10), "no N-EVENT-REPORT on the open association"
        assert running.node.commitment.wait_idle(10)  # our side got the N-EVENT-REPORT response
        assoc.abort()  # a release can race the SCP's report exchange in pynetdicom (Sta13/Evt11)
    finally:
        scanner.stop()
        ae.shutdown()
    assert reports[0][0] == 1
    assert reports[0][1].TransactionUID == request.TransactionUID
    assert scanner.reports == []
