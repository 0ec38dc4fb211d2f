"""C-STORE delivery against a real Orthanc and real pynetdicom SCPs (no mocks)."""

from __future__ import annotations

import copy
import datetime as dt
import socket
import ssl
import threading

import pytest
from pydicom.uid import (
    Comprehensive3DSRStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
)
from pynetdicom import AE, evt

from ct_triage.settings import Destination, parse_destination
from tests.support import orthanc as orthanc_support
from tests.support.orthanc import OrthancServer, free_port
from worker.delivery.scu import DeliveryReport, classify_rejection, classify_status, send_instances
from worker.outputs.sc import build_secondary_capture_series
from worker.outputs.sr import build_measurement_report

CREATED = dt.datetime(2024, 5, 6, 7, 8, 9)
CHEST_CT = dict(n_slices=5, size=96, seed=3)
CALLING = "CTTRIAGE"

needs_orthanc = pytest.mark.skipif(not orthanc_support.available(), reason="Orthanc (/usr/sbin/Orthanc) not installed")


@pytest.fixture(scope="module")
def outputs(ct):
    result = ct.score_result()
    sc = build_secondary_capture_series(ct.datasets, result, 1, created_at=CREATED)
    sr = build_measurement_report(ct.datasets, result, 1, created_at=CREATED)
    return [*sc, sr]


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    if not orthanc_support.available():
        pytest.skip("Orthanc not installed")
    with OrthancServer(tmp_path_factory.mktemp("pacs"), aet="ORTHANC") as server:
        yield server


# -- Orthanc ---------------------------------------------------------------------------
@needs_orthanc
def test_sc_and_sr_land_in_the_source_study(pacs, ct, outputs):
    report = send_instances(pacs.destination, outputs, calling_ae_title=CALLING)
    assert isinstance(report, DeliveryReport)
    assert report.outcome == "delivered", report.reason
    assert report.association == "established"
    assert [s.status for s in report.instances] == [0x0000] * len(outputs)
    assert report.delivered_sop_instance_uids == [ds.SOPInstanceUID for ds in outputs]

    studies = [s for s in pacs.studies() if s["MainDicomTags"]["StudyInstanceUID"] == ct.study_instance_uid]
    assert len(studies) == 1
    study = studies[0]
    assert study["PatientMainDicomTags"]["PatientID"] == ct.datasets[0].PatientID
    assert study["PatientMainDicomTags"]["PatientName"] == str(ct.datasets[0].PatientName)
    series = pacs.series_of_study(ct.study_instance_uid)
    by_modality = {s["MainDicomTags"]["Modality"]: s for s in series}
    assert set(by_modality) == {"OT", "SR"}
    assert len(by_modality["OT"]["Instances"]) == len(outputs) - 1
    assert by_modality["OT"]["MainDicomTags"]["SeriesDescription"].startswith("AI COVID-19 triage")
    assert len(by_modality["SR"]["Instances"]) == 1
    for ds in outputs:
        tags = pacs.instance_tags(pacs.instance_id(ds.SOPInstanceUID))
        assert tags["StudyInstanceUID"] == ct.study_instance_uid
        assert tags["PatientID"] == ct.datasets[0].PatientID
        assert tags["PatientName"] == str(ct.datasets[0].PatientName)
        assert tags["SOPClassUID"] in (SecondaryCaptureImageStorage, Comprehensive3DSRStorage)


@needs_orthanc
def test_retry_is_idempotent_at_the_pacs(pacs, ct, outputs, tmp_path):
    first = send_instances(pacs.destination, outputs, calling_ae_title=CALLING)
    count = len(pacs.instances())
    # a retry rebuilds the objects (same UIDs, same bytes) and may send them from files
    result = ct.score_result()
    rebuilt = [*build_secondary_capture_series(ct.datasets, result, 1, created_at=CREATED),
               build_measurement_report(ct.datasets, result, 1, created_at=CREATED)]
    paths = []
    for i, ds in enumerate(rebuilt):
        path = tmp_path / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    again = send_instances(pacs.destination, paths, calling_ae_title=CALLING)
    assert first.outcome == again.outcome == "delivered"
    assert len(pacs.instances()) == count


@needs_orthanc
def test_pacs_down_is_transient_then_delivers_when_up(tmp_path, outputs):
    with OrthancServer(tmp_path, aet="DOWNUP") as server:
        server.stop()
        down = send_instances(server.destination, outputs, calling_ae_title=CALLING, acse_timeout=5)
        assert down.outcome == "transient"
        assert down.association == "refused"
        assert "refused" in down.reason.lower()
        assert all(s.outcome == "transient" and s.status is None for s in down.instances)
        server.start()  # same ports
        up = send_instances(server.destination, outputs, calling_ae_title=CALLING)
        assert up.outcome == "delivered", up.reason
        assert len(server.instances()) == len(outputs)


@needs_orthanc
def test_unknown_calling_ae_is_permanent(tmp_path, outputs):
    with OrthancServer(tmp_path, aet="STRICT", known_aets={CALLING: ("127.0.0.1", 11112)},
                       accept_unknown=False) as server:
        rejected = send_instances(server.destination, outputs, calling_ae_title="INTRUDER")
        assert rejected.outcome == "permanent"
        assert rejected.association == "rejected"
        assert "calling ae title not recognised" in rejected.reason.lower()
        assert server.instances() == []
        known = send_instances(server.destination, outputs, calling_ae_title=CALLING)
        assert known.outcome == "delivered", known.reason


@needs_orthanc
def test_wrong_called_ae_is_permanent(pacs, outputs):
    wrong = Destination("NOTORTHANC", "127.0.0.1", pacs.dicom_port)
    report = send_instances(wrong, outputs, calling_ae_title=CALLING)
    assert report.outcome == "permanent"
    assert "called ae title not recognised" in report.reason.lower()


# -- pynetdicom SCPs for the statuses Orthanc does not produce ------------------------------
class Scp:
    """A real pynetdicom Storage SCP on a free loopback port answering a fixed status."""

    def __init__(self, status: int = 0x0000, sop_classes=(SecondaryCaptureImageStorage, Comprehensive3DSRStorage),
                 transfer_syntaxes=(ExplicitVRLittleEndian, ImplicitVRLittleEndian), require_calling=None):
        self.status = status
        self.received: list[str] = []
        self.ae = AE(ae_title="TESTSCP")
        for uid in sop_classes:
            self.ae.add_supported_context(uid, list(transfer_syntaxes))
        if require_calling:
            self.ae.require_calling_aet = [require_calling]
        self.port = free_port()

        def on_store(event):
            self.received.append(event.request.AffectedSOPInstanceUID)
            return self.status

        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, on_store)])

    @property
    def destination(self) -> Destination:
        return parse_destination(f"TESTSCP@127.0.0.1:{self.port}")

    def close(self):
        self.server.shutdown()


@pytest.fixture
def scp_factory():
    servers: list[Scp] = []

    def make(**kwargs) -> Scp:
        servers.append(Scp(**kwargs))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def test_reactor_is_held_in_its_checkpoint_during_each_request(scp_factory, outputs):
    """The pynetdicom 3.0 race worked around by ct_triage.association.reactor_paused: during a
    request the association's reactor thread must be blocked in its checkpoint, not merely
    flagged as paused, or it may take the response for itself; and it runs again afterwards,
    also when the send raised before pynetdicom's own pause (no presentation context)."""
    from ct_triage.association import reactor_paused

    scp = scp_factory()
    ae = AE(ae_title=CALLING)
    ae.add_requested_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="TESTSCP")
    assert assoc.is_established
    checkpoint = assoc._reactor_checkpoint
    try:
        for ds in outputs[:3]:
            with reactor_paused(assoc):
                assert not checkpoint.is_set() and len(checkpoint._cond._waiters) == 1  # the reactor, waiting
                assert assoc.send_c_store(ds).Status == 0x0000
            assert checkpoint.is_set()
        unsupported = copy.deepcopy(outputs[0])  # the fixture is shared: never change it
        unsupported.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR: no context for it
        with pytest.raises(ValueError), reactor_paused(assoc):
            assoc.send_c_store(unsupported)
        assert checkpoint.is_set()  # the reactor is not left parked
    finally:
        assoc.release()
    assert len(scp.received) == 3


@pytest.mark.parametrize(
    ("status", "outcome"),
    [(0x0000, "delivered"), (0xB000, "delivered"), (0xB007, "delivered"), (0xA700, "transient"),
     (0xA900, "permanent"), (0xC000, "permanent"), (0x0122, "permanent")],
)
def test_c_store_status_classification_over_the_wire(scp_factory, outputs, status, outcome):
    scp = scp_factory(status=status)
    report = send_instances(scp.destination, outputs, calling_ae_title=CALLING)
    assert report.outcome == outcome, report.reason
    assert {s.status for s in report.instances} == {status}
    assert len(scp.received) == len(outputs)


def test_no_context_for_sr_is_permanent_but_sc_is_delivered(scp_factory, outputs):
    scp = scp_factory(sop_classes=(SecondaryCaptureImageStorage,))
    report = send_instances(scp.destination, outputs, calling_ae_title=CALLING)
    assert report.outcome == "permanent"
    by_class = {s.sop_class_uid: s.outcome for s in report.instances}
    assert by_class == {SecondaryCaptureImageStorage: "delivered", Comprehensive3DSRStorage: "permanent"}
    assert "presentation context" in report.reason


def test_no_accepted_context_at_all_is_permanent(scp_factory, outputs):
    scp = scp_factory(sop_classes=("1.2.840.10008.5.1.4.1.1.2",))  # CT only
    report = send_instances(scp.destination, outputs, calling_ae_title=CALLING)
    assert report.outcome == "permanent"
    assert "presentation contexts" in report.reason
    assert scp.received == []


def test_implicit_only_peer_gets_converted_datasets(scp_factory, outputs):
    scp = scp_factory(transfer_syntaxes=(ImplicitVRLittleEndian,))
    report = send_instances(scp.destination, outputs, calling_ae_title=CALLING)
    assert report.outcome == "delivered", report.reason


def test_rejected_calling_ae_by_pynetdicom_scp_is_permanent(scp_factory, outputs):
    scp = scp_factory(require_calling="SOMEONE")
    report = send_instances(scp.destination, outputs, calling_ae_title=CALLING)
    assert report.outcome == "permanent" and report.association == "rejected"


def test_silent_peer_is_an_acse_timeout_transient(outputs):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    accepted = []
    thread = threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True)
    thread.start()
    try:
        port = listener.getsockname()[1]
        report = send_instances(Destination("SILENT", "127.0.0.1", port), outputs, calling_ae_title=CALLING,
                                acse_timeout=1)
        assert report.outcome == "transient"
        assert report.association == "aborted"
        assert "timeout" in report.reason.lower()
    finally:
        for conn, _ in accepted:
            conn.close()
        listener.close()


def test_unresolvable_host_is_transient(outputs):
    report = send_instances(Destination("PACS", "no-such-host.invalid", 104), outputs, calling_ae_title=CALLING,
                            acse_timeout=2)
    assert report.outcome == "transient"


# -- pure classification -------------------------------------------------------------------
def test_classify_status_table():
    assert classify_status(0x0000)[0] == "delivered"
    for status in (0x0001, 0xB000, 0xB006, 0xB007):
        assert classify_status(status)[0] == "delivered"
    for status in (0xA700, 0xA7FF, 0x0213, 0xFE00):
        assert classify_status(status)[0] == "transient"
    for status in (0xA900, 0xA9FF, 0xC000, 0xCFFF, 0x0117, 0x0122, 0x0124, 0x0211, 0x0212, 0xD000):
        assert classify_status(status)[0] == "permanent"
    assert "Out of resources" in classify_status(0xA701)[1]


def test_classify_rejection_table():
    assert classify_rejection(0x01, 0x01, 0x03) == "permanent"  # calling AE not recognized
    assert classify_rejection(0x02, 0x01, 0x07) == "permanent"  # called AE, even if "transient"
    assert classify_rejection(0x02, 0x03, 0x01) == "transient"  # temporary congestion
    assert classify_rejection(0x01, 0x03, 0x02) == "transient"  # local limit exceeded
    assert classify_rejection(0x02, 0x01, 0x01) == "transient"
    assert classify_rejection(0x01, 0x02, 0x02) == "permanent"  # protocol version


# -- arguments -----------------------------------------------------------------------------
def test_bad_arguments_raise_naming_the_argument(outputs, tmp_path):
    dest = Destination("PACS", "127.0.0.1", 104)
    with pytest.raises(TypeError, match="destination"):
        send_instances("PACS@127.0.0.1:104", outputs, calling_ae_title=CALLING)
    with pytest.raises(ValueError, match="destination"):
        send_instances(Destination("PACS", "127.0.0.1", 0), outputs, calling_ae_title=CALLING)
    with pytest.raises(ValueError, match="calling_ae_title"):
        send_instances(dest, outputs, calling_ae_title="")
    with pytest.raises(ValueError, match="calling_ae_title"):
        send_instances(dest, outputs, calling_ae_title="A" * 17)
    with pytest.raises(TypeError, match="calling_ae_title"):
        send_instances(dest, outputs, calling_ae_title=None)
    with pytest.raises(ValueError, match="datasets_or_paths"):
        send_instances(dest, [], calling_ae_title=CALLING)
    with pytest.raises(TypeError, match="datasets_or_paths"):
        send_instances(dest, outputs[0], calling_ae_title=CALLING)
    with pytest.raises(TypeError, match="datasets_or_paths"):
        send_instances(dest, [42], calling_ae_title=CALLING)
    with pytest.raises(ValueError, match="datasets_or_paths"):
        send_instances(dest, [tmp_path / "missing.dcm"], calling_ae_title=CALLING)
    with pytest.raises(ValueError, match="datasets_or_paths"):
        send_instances(dest, [outputs[0], outputs[0]], calling_ae_title=CALLING)
    with pytest.raises(ValueError, match="acse_timeout"):
        send_instances(dest, outputs, calling_ae_title=CALLING, acse_timeout=0)
    with pytest.raises(TypeError, match="dimse_timeout"):
        send_instances(dest, outputs, calling_ae_title=CALLING, dimse_timeout="60")
    with pytest.raises(TypeError, match="tls_context"):
        send_instances(dest, outputs, calling_ae_title=CALLING, tls_context=object())
    assert isinstance(ssl.create_default_context(), ssl.SSLContext)  # the accepted type


# -- TLS -----------------------------------------------------------------------------------
def _self_signed(tmp_path):
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-pacs")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_tls_delivery_and_untrusted_certificate(tmp_path, outputs):
    pytest.importorskip("cryptography")
    cert, key = _self_signed(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    ae = AE(ae_title="TLSSCP")
    for uid in (SecondaryCaptureImageStorage, Comprehensive3DSRStorage):
        ae.add_supported_context(uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, ssl_context=server_ctx,
                             evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)])
    try:
        dest = parse_destination(f"TLSSCP@127.0.0.1:{port}+tls")
        # default context: the self-signed certificate is not trusted -> permanent
        untrusted = send_instances(dest, outputs, calling_ae_title=CALLING, acse_timeout=5)
        assert untrusted.outcome == "permanent", untrusted.reason
        assert "certificate" in untrusted.reason.lower()
        client_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
        trusted = send_instances(dest, outputs, calling_ae_title=CALLING, tls_context=client_ctx)
        assert trusted.outcome == "delivered", trusted.reason
    finally:
        server.shutdown()
