"""The audit trail (issue 17 item 4): PS3.15 A.5 messages, their schema, the outbox, and a real
syslog receiver (Debian's rsyslogd, TLS with client certificates and UDP) taking them."""

from __future__ import annotations

import datetime
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from lxml import etree

from ct_triage import audit
from ct_triage.audit.message import MAX_XML_BYTES, AuditEventError
from ct_triage.audit.syslog import octet_frame, syslog_frame
from tests.conftest import make_settings
from tests.support.data import in_ci
from tests.support.scanner import free_port

RSYSLOGD = "/usr/sbin/rsyslogd"
CT = "1.2.840.10008.5.1.4.1.1.2"
UPS_PULL = "1.2.840.10008.5.1.4.34.6.3"
STUDY = "1.2.826.0.1.3680043.8.498.1"
FUTURE = datetime.timedelta(hours=1)


@pytest.fixture(scope="module")
def schema():
    return etree.RelaxNG(etree.parse(str(audit.SCHEMA_RNG)))


@pytest.fixture
def settings(tmp_path):
    return make_settings(tmp_path, f"sqlite:///{tmp_path / 'db' / 'ct-triage.sqlite'}")


def every_kind(settings) -> dict[str, audit.AuditMessage]:
    instances = [f"{STUDY}.2.{n}" for n in range(300)]
    return {
        "start": audit.application_activity(settings, "start", launcher="systemd"),
        "stop": audit.application_activity(settings, "stop", process="ct-triage node"),
        "association_refused": audit.association_refused(
            settings, calling_ae="INTRUDER", address="192.0.2.7", called_ae="CTTRIAGE",
            reason="calling AE title not in ALLOWED_CALLING_AES"),
        "tls_refused": audit.association_refused(
            settings, calling_ae=None, address="192.0.2.8", reason="client certificate expired"),
        "received": audit.instances_transferred(
            settings, direction="received", peer_ae="SCANNER", peer_address="192.0.2.10", study_uid=STUDY,
            sop_classes={CT: instances}, patient_id="PAT-1", patient_name="Doe^Jane",
            issuer_of_patient_id="HOSP", accession="ACC1"),
        "sent": audit.instances_transferred(
            settings, direction="sent", peer_ae="PACS", peer_address="pacs.example.org", study_uid=STUDY,
            sop_classes={"1.2.840.10008.5.1.4.1.1.88.22": 1, "1.2.840.10008.5.1.4.1.1.66.4": 1,
                         "1.2.840.10008.5.1.4.1.1.7": 12},
            patient_id="PAT-1", accession="ACC1"),
        "c_find": audit.query(settings, calling_ae="VIEWER", address="192.0.2.20",
                              sop_class_uid="1.2.840.10008.5.1.4.34.6.3", query=b"\x10\x00\x10\x00\x00\x00\x00\x00",
                              transfer_syntax_uid="1.2.840.10008.1.2.1"),
        "n_get": audit.query(settings, calling_ae="VIEWER", address="192.0.2.20", sop_class_uid=UPS_PULL,
                             query=b"\x00\x00\x00\x00"),
        "http_read": audit.http_read(settings, client_address="127.0.0.1", path="/api/worklist?token=s3cret&x=1",
                                     token="s3cret-token-0123456789"),
        "claimed": audit.workitem_changed(settings, change="claimed", performer_ae="READER1", address="192.0.2.30",
                                          workitem_uid=f"{STUDY}.9", study_uid=STUDY, patient_id="PAT-1",
                                          accession="ACC1"),
        "completed": audit.workitem_changed(settings, change="completed", performer_ae="READER1",
                                            address="192.0.2.30", workitem_uid=f"{STUDY}.9", study_uid=STUDY,
                                            patient_id="PAT-1"),
        "cancelled": audit.workitem_changed(settings, change="cancelled", performer_ae=None, address=None,
                                            workitem_uid=f"{STUDY}.9", study_uid=STUDY, patient_id="PAT-1",
                                            reason="superseded by a newer study version"),
        "hl7_order": audit.hl7_sent(settings, destination="ris.example.org:2575", message_type="ORM^O01",
                                    control_id="CT1234", patient_id="PAT-1", study_uid=STUDY, accession="ACC1"),
        "hl7_result": audit.hl7_sent(settings, destination="ris.example.org:2575", message_type="ORU^R01",
                                     control_id="CT1235", patient_id="PAT-1", outcome=4,
                                     error="no ACK within 30 s"),
        "auth_failure": audit.authentication_failure(
            settings, user_id=audit.token_fingerprint("wrong-token"), address="192.0.2.40",
            mechanism="http-token", reason="token does not match"),
    }


def _need_tool(reason: str) -> None:
    """Skip without the tool; under CI fail (CI installs it: .ci/run)."""
    if in_ci():
        pytest.fail(f"{reason}; CI must run the audit tests", pytrace=False)
    pytest.skip(reason)


def parse(xml: str):
    return etree.fromstring(xml.encode())


# -- messages and schema -----------------------------------------------------------------
def test_the_schema_is_the_standards_compact_schema_converted_by_trang(tmp_path):
    """The .rng kept in the repository is what trang makes of the .rnc (PS3.15 A.5.1)."""
    if shutil.which("trang") is None:
        _need_tool("trang not installed (apt-get install trang)")
    out = tmp_path / "audit-message.rng"
    subprocess.run(["trang", "-I", "rnc", "-O", "rng", str(audit.SCHEMA_RNC), str(out)], check=True, timeout=120)
    assert out.read_text() == audit.SCHEMA_RNG.read_text()


@pytest.mark.security
def test_every_event_kind_validates_against_the_dicom_audit_schema(settings, schema):
    for name, message in every_kind(settings).items():
        xml = message.to_xml()
        assert "\n" not in xml and "\r" not in xml, name
        assert schema.validate(parse(xml)), f"{name}: {schema.error_log.last_error}"


def test_event_codes_follow_ps3_15(settings):
    kinds = every_kind(settings)

    def event(name):
        root = parse(kinds[name].to_xml())
        ident = root.find("EventIdentification")
        types = [e.get("csd-code") for e in ident.findall("EventTypeCode")]
        return ident.find("EventID").get("csd-code"), ident.get("EventActionCode"), types, root

    assert event("start")[:3] == ("110100", "E", ["110120"])
    assert event("stop")[:3] == ("110100", "E", ["110121"])
    assert event("association_refused")[:3] == ("110113", "E", ["110126"])
    assert event("received")[:2] == ("110104", "C")
    assert event("sent")[:2] == ("110104", "R")
    assert event("c_find")[:2] == event("http_read")[:2] == ("110112", "E")
    assert event("claimed")[:2] == ("110111", "U")
    assert event("hl7_order")[:2] == ("110109", "U")
    assert event("hl7_result")[:2] == ("110111", "C")
    assert event("auth_failure")[:3] == ("110114", "E", ["110122"])

    root = event("received")[3]
    scanner, us = root.findall("ActiveParticipant")
    assert (scanner.get("UserID"), scanner.get("UserIsRequestor")) == ("SCANNER", "true")
    assert scanner.find("RoleIDCode").get("csd-code") == "110153"
    assert (us.get("UserID"), us.get("UserIsRequestor")) == (settings.ae_title, "false")
    study, patient = root.findall("ParticipantObjectIdentification")
    assert study.find("ParticipantObjectIDTypeCode").get("csd-code") == "110180"
    sop = study.find("ParticipantObjectDescription/SOPClass")
    assert (sop.get("UID"), sop.get("NumberOfInstances"), len(sop.findall("Instance"))) == (CT, "300", 300)
    assert patient.get("ParticipantObjectID") == "PAT-1^^^HOSP"
    assert patient.find("ParticipantObjectName").text == "Doe^Jane"

    claimed = event("claimed")[3]
    workitem = claimed.find("ParticipantObjectIdentification")
    detail = workitem.find("ParticipantObjectDetail")
    assert detail.get("type") == "ProcedureStepState" and detail.get("value") == "SU4gUFJPR1JFU1M="  # IN PROGRESS


@pytest.mark.security
def test_an_invalid_message_is_rejected_by_the_schema(settings, schema):
    """The validation can fail: the same message broken three ways does not validate."""
    good = parse(every_kind(settings)["received"].to_xml())
    assert schema.validate(good)

    no_requestor = parse(etree.tostring(good, encoding="unicode"))
    del no_requestor.find("ActiveParticipant").attrib["UserIsRequestor"]
    bad_outcome = parse(etree.tostring(good, encoding="unicode"))
    bad_outcome.find("EventIdentification").set("EventOutcomeIndicator", "3")
    no_name = parse(etree.tostring(good, encoding="unicode"))
    obj = no_name.find("ParticipantObjectIdentification")
    obj.remove(obj.find("ParticipantObjectName"))
    for broken in (no_requestor, bad_outcome, no_name):
        assert not schema.validate(broken)


@pytest.mark.security
def test_builders_name_the_bad_argument(settings):
    with pytest.raises(AuditEventError, match="study_uid"):
        audit.instances_transferred(settings, direction="received", peer_ae="S", peer_address=None,
                                    study_uid="1.2.<x>", sop_classes={CT: 1}, patient_id="P")
    with pytest.raises(AuditEventError, match="direction"):
        audit.instances_transferred(settings, direction="sideways", peer_ae="S", peer_address=None,  # type: ignore
                                    study_uid=STUDY, sop_classes={CT: 1}, patient_id="P")
    with pytest.raises(AuditEventError, match="patient_id"):
        audit.workitem_changed(settings, change="claimed", performer_ae="R", address=None,
                               workitem_uid=f"{STUDY}.9", study_uid=STUDY, patient_id="")
    with pytest.raises(AuditEventError, match="change"):
        audit.workitem_changed(settings, change="stolen", performer_ae="R", address=None,  # type: ignore
                               workitem_uid=f"{STUDY}.9", study_uid=STUDY, patient_id="P")
    with pytest.raises(AuditEventError, match="outcome"):
        audit.application_activity(settings, "start", outcome=3)


@pytest.mark.security
def test_peer_text_is_sanitised(settings, schema):
    """A hostile AE title, patient name or reason cannot forge lines or break the XML."""
    message = audit.instances_transferred(
        settings, direction="received", peer_ae="EVIL\r\n<x>", peer_address="192.0.2.9", study_uid=STUDY,
        sop_classes={CT: 1}, patient_id="P\x1b[31m1", patient_name='Doe^"</AuditMessage>\ud800',
        description="a" * 5000)
    xml = message.to_xml()
    assert schema.validate(parse(xml))
    assert "\r" not in xml and "\n" not in xml and "\x1b" not in xml and "\ud800" not in xml
    root = parse(xml)
    assert root.find("ActiveParticipant").get("UserID") == "EVIL\\x0d\\x0a<x>"
    assert len(root.find("EventIdentification/EventOutcomeDescription").text) <= 1000
    assert "s3cret" not in audit.http_read(settings, client_address="::1", path="/?token=s3cret",
                                           token="s3cret").to_xml()


def test_a_large_message_loses_its_instance_lists_not_its_counts(settings, schema):
    instances = [f"{STUDY}.2.{n}" for n in range(2000)]
    message = audit.instances_transferred(settings, direction="received", peer_ae="S", peer_address=None,
                                          study_uid=STUDY, sop_classes={CT: instances}, patient_id="P")
    xml = message.to_xml()
    assert len(xml.encode()) <= MAX_XML_BYTES and schema.validate(parse(xml))
    sop = parse(xml).find("ParticipantObjectIdentification/ParticipantObjectDescription/SOPClass")
    assert sop.get("NumberOfInstances") == "2000" and sop.find("Instance") is None


def test_syslog_framing():
    when = datetime.datetime(2026, 12, 2, 10, 0, 0, 123000, tzinfo=datetime.UTC)
    frame = syslog_frame("<AuditMessage/>", outcome=0, when=when, hostname="node 1", procid="42")
    assert frame == b"<85>1 2026-12-02T10:00:00.123Z node1 ct-triage 42 DICOM+RFC3881 - \xef\xbb\xbf<AuditMessage/>"
    assert syslog_frame("<a/>", outcome=4, when=when).startswith(b"<84>1 ")
    assert octet_frame(b"abc") == b"3 abc"


# -- a real syslog receiver ---------------------------------------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, rsyslog's server certificate (localhost, 127.0.0.1) and ct-triage's client certificate."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = tmp_path_factory.mktemp("audit-pki")
    now = datetime.datetime.now(datetime.UTC)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def issue(cn, issuer_key, *, ca=False):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(name("audit test CA") if issuer_key
                                                                                  else name(cn))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=30))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if ca:
            builder = builder.add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False),
                critical=True)
        else:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        cert = builder.sign(issuer_key or key, hashes.SHA256())
        key_path, cert_path = folder / f"{cn}.key", folder / f"{cn}.pem"
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return key, key_path, cert_path

    ca_key, _, ca_cert = issue("audit test CA", None, ca=True)
    return {"ca": ca_cert, "server": issue("repository", ca_key)[1:], "client": issue("ct-triage", ca_key)[1:]}


class Rsyslog:
    """rsyslogd -n with a generated configuration: TLS (imtcp + gtls, client certificates
    required) and UDP (imudp) on loopback, every message written to one file as
    ``PRI|MSGID|APP-NAME|MSG``; message size limit 64k (set before the inputs load)."""

    def __init__(self, folder: Path, pki, tcp_port: int, udp_port: int):
        self.folder, self.tcp_port, self.udp_port = folder, tcp_port, udp_port
        self.out = folder / "received.log"
        self.conf = folder / "rsyslog.conf"
        self.pidfile = folder / "rsyslogd.pid"
        (folder / "work").mkdir(exist_ok=True)
        key, cert = pki["server"]
        self.conf.write_text(f"""
global(workDirectory="{folder / 'work'}" maxMessageSize="64k"
       defaultNetstreamDriver="gtls" defaultNetstreamDriverCAFile="{pki['ca']}"
       defaultNetstreamDriverCertFile="{cert}" defaultNetstreamDriverKeyFile="{key}")
module(load="imtcp" streamDriver.name="gtls" streamDriver.mode="1" streamDriver.authMode="x509/certvalid")
module(load="imudp")
input(type="imtcp" address="127.0.0.1" port="{tcp_port}")
input(type="imudp" address="127.0.0.1" port="{udp_port}")
template(name="audit" type="string" string="%pri%|%msgid%|%app-name%|%msg%\\n")
*.* action(type="omfile" file="{self.out}" template="audit")
""")
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen([RSYSLOGD, "-n", "-f", str(self.conf), "-i", str(self.pidfile)],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"rsyslogd exited: {self.process.stdout.read().decode(errors='replace')}")
            try:
                socket.create_connection(("127.0.0.1", self.tcp_port), timeout=1).close()
                time.sleep(0.3)  # the UDP input is set up with the TCP one; give it the same moment
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("rsyslogd did not listen within 20 s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def messages(self, count: int, timeout_s: float = 20.0) -> list[tuple[str, str, str, str]]:
        deadline = time.monotonic() + timeout_s
        lines: list[str] = []
        while time.monotonic() < deadline:
            lines = self.out.read_text(encoding="utf-8").splitlines() if self.out.exists() else []
            lines = [line for line in lines if "|" in line and "AuditMessage" in line]
            if len(lines) >= count:
                break
            time.sleep(0.2)
        out = []
        for line in lines:
            pri, msgid, app, msg = line.split("|", 3)
            out.append((pri, msgid, app, msg.lstrip(" \ufeff")))
        return out


@pytest.fixture
def rsyslog(tmp_path, pki):
    if not Path(RSYSLOGD).exists():
        _need_tool("rsyslogd not installed (apt-get install rsyslog rsyslog-gnutls)")
    if not list(Path("/usr/lib").glob("*/rsyslog/lmnsd_gtls.so")):
        _need_tool("rsyslog-gnutls not installed")
    (tmp_path / "rsyslog").mkdir()
    receiver = Rsyslog(tmp_path / "rsyslog", pki, free_port(), free_port())
    yield receiver
    receiver.stop()


def _unsent(session_factory):
    from sqlalchemy import select

    from db.models import AuditEvent

    with session_factory() as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.sent_at.is_(None)).order_by(AuditEvent.id)))


@pytest.mark.security
def test_outbox_keeps_messages_while_the_repository_is_down_and_sends_them_over_tls(
        tmp_path, database_url, rsyslog, pki, schema, caplog):
    from ct_triage.runtime import open_database

    key, cert = pki["client"]
    settings = make_settings(tmp_path, database_url, audit_repository=f"tls://127.0.0.1:{rsyslog.tcp_port}",
                             audit_tls_ca=pki["ca"], audit_tls_cert=cert, audit_tls_key=key)
    engine, session_factory = open_database(settings)
    try:
        messages = every_kind(settings)
        assert audit.record_now(session_factory, messages["start"])
        with session_factory() as session, session.begin():
            for name in ("received", "claimed", "auth_failure"):
                audit.record(session, messages[name])

        # The repository is down: nothing is lost, one line is logged, every row waits.
        assert audit.send_pending_audit(session_factory, settings) == 0
        rows = _unsent(session_factory)
        assert len(rows) == 4
        assert all(row.next_attempt_at is not None and row.last_error for row in rows)
        assert sum(row.attempts for row in rows) >= 1
        warnings = [r for r in caplog.records if r.name == "ct_triage.audit" and r.levelname == "WARNING"]
        assert len(warnings) == 1 and "PAT-1" not in warnings[0].getMessage()
        # Not due yet: no connection attempt.
        assert audit.send_pending_audit(session_factory, settings) == 0

        rsyslog.start()
        later = datetime.datetime.now(datetime.UTC) + FUTURE
        # Up, but it wants our client certificate: without one nothing counts as sent.
        anonymous = make_settings(tmp_path, database_url, audit_repository=settings.audit_repository,
                                  audit_tls_ca=pki["ca"])
        assert audit.send_pending_audit(session_factory, anonymous, now=later) == 0
        assert len(_unsent(session_factory)) == 4

        later += FUTURE
        assert audit.send_pending_audit(session_factory, settings, now=later) == 4
        assert _unsent(session_factory) == []
        received = rsyslog.messages(4)
        assert len(received) == 4
        kinds = set()
        for pri, msgid, app, xml in received:
            assert msgid == "DICOM+RFC3881" and app == "ct-triage"
            root = parse(xml)
            assert schema.validate(root), schema.error_log.last_error
            kinds.add(root.find("EventIdentification/EventID").get("csd-code"))
            assert pri == ("84" if root.find("EventIdentification").get("EventOutcomeIndicator") != "0" else "85")
        assert kinds == {"110100", "110104", "110111", "110114"}
        # The instances-transferred message (300 instance UIDs) is over 8 KB and arrived whole.
        big = max((xml for *_, xml in received), key=len)
        assert len(big.encode()) > 8192 and len(parse(big).findall(".//Instance")) == 300

        with session_factory() as session:
            rows = audit.recent_audit_events(session, limit=10)
            backlog = audit.audit_backlog(session)
        assert backlog == (0, None)
        table = audit.format_audit_table(rows)
        assert "instances_transferred" in table and "sent" in table and "Doe^Jane" not in table
    finally:
        engine.dispose()


@pytest.mark.security
def test_messages_go_over_udp(tmp_path, rsyslog, schema, sqlite_url):
    from ct_triage.runtime import open_database

    settings = make_settings(tmp_path, sqlite_url, audit_repository=f"udp://127.0.0.1:{rsyslog.udp_port}")
    rsyslog.start()
    engine, session_factory = open_database(settings)
    try:
        messages = every_kind(settings)
        with session_factory() as session, session.begin():
            for name in ("association_refused", "c_find", "hl7_order"):
                audit.record(session, messages[name])
        assert audit.send_pending_audit(session_factory, settings) == 3
        received = rsyslog.messages(3)
        assert sorted(parse(xml).find("EventIdentification/EventID").get("csd-code") for *_, xml in received) == [
            "110109", "110112", "110113"]
        assert all(schema.validate(parse(xml)) for *_, xml in received)
    finally:
        engine.dispose()


def test_without_a_repository_the_trail_stays_in_the_database(tmp_path, sqlite_url):
    from ct_triage.runtime import open_database

    settings = make_settings(tmp_path, sqlite_url)
    engine, session_factory = open_database(settings)
    try:
        assert audit.record_now(session_factory, audit.application_activity(settings, "stop"))
        assert audit.send_pending_audit(session_factory, settings) == 0
        assert len(_unsent(session_factory)) == 1
    finally:
        engine.dispose()


def test_page_reads_are_aggregated_per_client(tmp_path, database_url):
    from ct_triage.runtime import open_database

    settings = make_settings(tmp_path, database_url, audit_query_aggregate_min=10)
    engine, session_factory = open_database(settings)
    try:
        def read(token, address="127.0.0.1", path="/api/worklist"):
            with session_factory() as session, session.begin():
                return audit.record_http_read(session, settings, client_address=address, path=path, token=token)

        assert read("token-a-0123456789") is True
        assert read("token-a-0123456789", path="/") is False  # same client, within 10 minutes
        assert read("token-b-0123456789") is True  # another token
        assert read("token-a-0123456789", address="192.0.2.5") is True  # another address
        with session_factory() as session:
            rows = audit.recent_audit_events(session, limit=10)
        assert len(rows) == 3 and {row.user_id for row in rows} == {
            audit.token_fingerprint("token-a-0123456789"), audit.token_fingerprint("token-b-0123456789")}
        assert all("token-a" not in row.message_xml for row in rows)

        every = make_settings(tmp_path, database_url, audit_query_aggregate_min=0)
        with session_factory() as session, session.begin():
            assert audit.record_http_read(session, every, client_address="127.0.0.1", path="/",
                                          token="token-a-0123456789")
    finally:
        engine.dispose()


def test_audit_settings_are_validated(tmp_path):
    from ct_triage.errors import ConfigError
    from ct_triage.settings import Settings

    assert Settings.from_env({}).audit_query_aggregate_min == 10
    for bad in ("tcp://h:514", "tls://h", "udp://:514", "tls://h:70000"):
        with pytest.raises(ConfigError, match="AUDIT_REPOSITORY"):
            Settings.from_env({"CT_TRIAGE_AUDIT_REPOSITORY": bad})
    with pytest.raises(ConfigError, match="AUDIT_TLS_KEY"):
        Settings.from_env({"CT_TRIAGE_AUDIT_TLS_CERT": str(tmp_path / "c.pem")})
    with pytest.raises(ConfigError, match="AUDIT_QUERY_AGGREGATE_MIN"):
        Settings.from_env({"CT_TRIAGE_AUDIT_QUERY_AGGREGATE_MIN": "-1"})
