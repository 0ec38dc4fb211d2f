"""Security suite (issue 11 item 6): hostile peers against a running ``ct-triage node``.

Each attack class is run against a real node process over loopback, with raw
sockets where the attack needs malformed PDUs. Every test asserts the refusal (a
status, an A-ASSOCIATE-RJ, an A-ABORT or a closed socket, and the log line), that
the node's resident memory grows by less than 300 MB (``/proc/PID/status``), and
that a well-behaved scanner (dcmtk storescu from 127.0.0.1) still stores within
45 s. Attackers connect from other loopback addresses (127.0.0.2-5) so the
per-address cap on waiting connections is what they hit.

The node runs with short timeouts (ACSE 3 s, network 4 s) so the suite stays
quick; the bounds are the same code paths as with the defaults.

    ./dev test -m security
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEGBaseline8Bit

from dicom_node import status
from tests.support.daemon import Daemon
from tests.support.scanner import (
    ECHOSCU,
    acknowledged_files,
    dcmtk_env,
    free_port,
    require_dcmtk,
    storescu,
    write_ct_series,
)

pytestmark = pytest.mark.security

RSS_BUDGET_MB = 300
SCANNER_WITHIN_S = 45
ACSE_S, NETWORK_S = 3, 4


# -- helpers -------------------------------------------------------------------------
def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class RssWatch:
    """Samples the node's RSS every 50 ms while the attack runs; ``growth`` in MB."""

    def __init__(self, pid: int):
        self.pid = pid
        self.base = rss_mb(pid)
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, rss_mb(self.pid))
            except OSError:
                return
            time.sleep(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def growth(self) -> float:
        return self.peak - self.base


class Node:
    def __init__(self, tmp: Path, **extra):
        self.port = free_port()
        self.storage = tmp / "storage"
        self.env = {"CT_TRIAGE_VAR_DIR": str(tmp / "var"), "CT_TRIAGE_STORAGE_DIR": str(self.storage),
                    "CT_TRIAGE_PORT": str(self.port), "CT_TRIAGE_BIND_ADDRESS": "127.0.0.1",
                    "CT_TRIAGE_STABLE_AGE_S": "3600", "CT_TRIAGE_MIN_FREE_DISK_MB": "1",
                    "CT_TRIAGE_BROKER_URL": "", "CT_TRIAGE_DATABASE_URL": f"sqlite:///{tmp / 'db.sqlite'}",
                    "CT_TRIAGE_ACSE_TIMEOUT_S": str(ACSE_S), "CT_TRIAGE_NETWORK_TIMEOUT_S": str(NETWORK_S),
                    "CT_TRIAGE_ALLOWED_CALLING_AES": "SCANNER", "CT_TRIAGE_MAX_INSTANCE_MB": "8",
                    "CT_TRIAGE_MAX_ASSOCIATIONS": "4", "CT_TRIAGE_MAX_PENDING_PER_ADDRESS": "4",
                    "CT_TRIAGE_QUARANTINE_MAX_MB": "1"}
        self.env.update({f"CT_TRIAGE_{k.upper()}": str(v) for k, v in extra.items()})
        self.daemon = Daemon(["node"], self.env, tmp / "node.log")

    def start(self, echo: bool = True) -> Node:
        self.daemon.start()
        if echo:
            self.daemon.wait_dicom_ready(self.port)
        return self

    @property
    def pid(self) -> int:
        return self.daemon.process.pid

    def log(self) -> str:
        return self.daemon.log()

    def wait_log(self, text: str, timeout: float = 15) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log()
            if text in log:
                return log
            time.sleep(0.1)
        raise AssertionError(f"{text!r} never logged:\n{self.log()[-3000:]}")


@pytest.fixture(scope="module")
def scanner_file(tmp_path_factory) -> Path:
    return write_ct_series(tmp_path_factory.mktemp("scanner"), 1, rows=64, columns=64, seed=77).paths[0]


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    require_dcmtk()
    running = Node(tmp_path_factory.mktemp("node")).start()
    yield running
    running.daemon.stop()


def scanner_gets_in(node: Node, path: Path, within: float = SCANNER_WITHIN_S) -> float:
    """Seconds until storescu (SCANNER at 127.0.0.1) has one instance acknowledged."""
    started = time.monotonic()
    while time.monotonic() - started < within:
        result = storescu(node.port, [path], timeout=within)
        if result.returncode == 0 and acknowledged_files(result.stdout + result.stderr):
            return time.monotonic() - started
        time.sleep(0.5)
    raise AssertionError(f"the scanner did not get in within {within} s:\n{node.log()[-3000:]}")


def connect(node: Node, source: str = "127.0.0.1", timeout: float = 10) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", node.port), timeout=timeout, source_address=(source, 0))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def association_rq(calling: str = "SCANNER", called: str = "CTTRIAGE", max_pdu: int = 16384) -> bytes:
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, ImplementationClassUIDNotification, MaximumLengthNotification
    from pynetdicom.presentation import build_context

    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    context = build_context("1.2.840.10008.1.1")  # Verification
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = max_pdu
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.826.0.1.3680043.9.7433.1.1"
    primitive.user_information = [maximum, implementation]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return pdu.encode()


def read_pdu(sock: socket.socket, timeout: float) -> bytes:
    """The next whole PDU (b'' when the node closed the connection)."""
    sock.settimeout(timeout)
    header = b""
    try:
        while len(header) < 6:
            chunk = sock.recv(6 - len(header))
            if not chunk:
                return b""
            header += chunk
        (length,) = struct.unpack(">L", header[2:])
        body = b""
        while len(body) < length:
            chunk = sock.recv(length - len(body))
            if not chunk:
                return b""
            body += chunk
    except (ConnectionResetError, BrokenPipeError):
        return b""
    return header + body


def raw_association(node: Node, source: str = "127.0.0.1", **kwargs) -> socket.socket:
    sock = connect(node, source)
    sock.sendall(association_rq(**kwargs))
    answer = read_pdu(sock, 10)
    assert answer[:1] == b"\x02", f"expected A-ASSOCIATE-AC, got {answer[:16]!r}"
    return sock


def closed_by_node(sock: socket.socket, within: float) -> bytes:
    """Reads until the node closes (or aborts) the connection; the last PDU type seen."""
    deadline = time.monotonic() + within
    last = b""
    while time.monotonic() < deadline:
        pdu = read_pdu(sock, max(0.1, deadline - time.monotonic()))
        if not pdu:
            return last or b"closed"
        last = pdu[:1]
        if last == b"\x07":  # A-ABORT
            return last
    raise AssertionError(f"the node kept the connection open for {within} s")


def pynetdicom_store(port: int, path: Path, syntax: str, calling: str = "SCANNER") -> int:
    """C-STORE of the file's bytes as they are (chunked send), over a context for ``syntax``."""
    from pynetdicom import AE, _config

    ae = AE(ae_title=calling)
    ae.add_requested_context(dcmread(path, stop_before_pixels=True, force=True).SOPClassUID, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="CTTRIAGE")
    assert assoc.is_established
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        rsp = assoc.send_c_store(path)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
        assoc.release()
    return int(rsp.Status) if "Status" in rsp else -1


# -- memory from declared lengths ------------------------------------------------------
def test_declared_lengths_are_refused_before_any_allocation(node, scanner_file):
    with RssWatch(node.pid) as watch:
        # 16 unauthenticated sockets (4 addresses) each declaring a 4 GiB A-ASSOCIATE-RQ.
        socks = [connect(node, f"127.0.0.{2 + i % 4}") for i in range(16)]
        for sock in socks:
            sock.sendall(struct.pack(">BBL", 0x01, 0, 0xFFFFFFF0) + b"\x00" * 14)
        for sock in socks:
            assert closed_by_node(sock, 10) in (b"\x07", b"closed")
            sock.close()
        # An accepted association, then a P-DATA-TF declaring 4 GiB.
        assoc = raw_association(node)
        assoc.sendall(struct.pack(">BBL", 0x04, 0, 0xFFFFFFFF) + b"\x00" * 64)
        assert closed_by_node(assoc, 10) in (b"\x07", b"closed")
        assoc.close()
        # Just over the maximum PDU length we advertise (1 MiB by default).
        assoc = raw_association(node)
        assoc.sendall(struct.pack(">BBL", 0x04, 0, 1048576 + 1) + b"\x00" * 64)
        assert closed_by_node(assoc, 10) in (b"\x07", b"closed")
        assoc.close()
        waited = scanner_gets_in(node, scanner_file)
    log = node.wait_log("over the maximum of 1048576")
    assert "declares 4294967280 bytes, over the maximum" in log
    assert watch.growth < RSS_BUDGET_MB, f"RSS grew {watch.growth:.0f} MB"
    assert waited < SCANNER_WITHIN_S


# -- half-sent PDUs and slow peers --------------------------------------------------
def test_trickling_peers_time_out_and_never_lock_the_scanner_out(node, scanner_file):
    rq = association_rq()
    with RssWatch(node.pid) as watch:
        # 16 peers (the per-address cap of 4 from each of 4 addresses) send an
        # A-ASSOCIATE-RQ one byte at a time; they must not hold association slots.
        socks = [connect(node, f"127.0.0.{2 + i % 4}") for i in range(16)]
        for sock in socks:
            sock.sendall(rq[:1])
        # A fifth waiting socket from one address is closed at once.
        extra = connect(node, "127.0.0.2")
        assert closed_by_node(extra, 5) == b"closed"
        extra.close()
        waited = scanner_gets_in(node, scanner_file)  # while all 16 are still trickling
        started = time.monotonic()
        alive = list(socks)
        sent = {id(sock): 1 for sock in socks}
        while alive and time.monotonic() - started < ACSE_S + 10:
            for sock in list(alive):
                try:
                    sock.sendall(rq[sent[id(sock)]:sent[id(sock)] + 1])
                    sent[id(sock)] += 1
                    sock.settimeout(0.01)
                    if sock.recv(64) == b"":
                        alive.remove(sock)
                except (BlockingIOError, TimeoutError):
                    pass
                except OSError:
                    alive.remove(sock)
            time.sleep(0.3)
        assert not alive, f"{len(alive)} trickling sockets still open after {time.monotonic() - started:.0f} s"
        for sock in socks:
            sock.close()
        # An accepted association that stops in the middle of a PDU is aborted after
        # the network timeout, though it sends a byte every second.
        assoc = raw_association(node, "127.0.0.3")
        assoc.sendall(struct.pack(">BBL", 0x04, 0, 1000) + b"\x00" * 10)
        started = time.monotonic()
        assoc.settimeout(0.2)
        aborted = False
        while time.monotonic() - started < NETWORK_S + 10:
            try:
                assoc.sendall(b"\x00")
                data = assoc.recv(64)
                if data == b"" or data[:1] == b"\x07":
                    aborted = True
                    break
            except TimeoutError:
                pass
            except OSError:
                aborted = True
                break
            time.sleep(1)
        assoc.close()
        assert aborted, "a trickling association was never aborted"
        assert time.monotonic() - started < NETWORK_S + 6
    log = node.wait_log("from 127.0.0.3 aborted (")
    line = next(line for line in log.splitlines() if "from 127.0.0.3 aborted (" in line)
    assert "incomplete PDU" in line or "network timeout" in line, line
    assert "CT_TRIAGE_MAX_PENDING_PER_ADDRESS" in log
    assert watch.growth < RSS_BUDGET_MB
    assert waited < SCANNER_WITHIN_S


def test_association_cap_counts_only_accepted_associations_and_logs_refusals(node, scanner_file):
    held = [raw_association(node, "127.0.0.4") for _ in range(4)]
    try:
        fifth = connect(node, "127.0.0.5")
        fifth.sendall(association_rq())
        answer = read_pdu(fifth, 10)
        fifth.close()
        # A-ASSOCIATE-RJ: result 2 (transient), source 3 (provider, presentation), reason 2 (local limit)
        assert answer[:1] == b"\x03" and answer[7:10] == b"\x02\x03\x02", answer[:12]
    finally:
        for sock in held:
            sock.close()
    log = node.wait_log("associations already open")
    assert "127.0.0.5" in log.split("associations already open")[0].splitlines()[-1]
    assert scanner_gets_in(node, scanner_file) < SCANNER_WITHIN_S


def test_called_and_calling_ae_titles_are_checked(node):
    sock = connect(node)
    sock.sendall(association_rq(called="NOTUS"))
    answer = read_pdu(sock, 10)
    sock.close()
    assert answer[:1] == b"\x03" and answer[7:10] == b"\x01\x01\x07", answer[:12]
    sock = connect(node)
    sock.sendall(association_rq(calling="INTRUDER"))
    answer = read_pdu(sock, 10)
    sock.close()
    assert answer[:1] == b"\x03" and answer[7:10] == b"\x01\x01\x03", answer[:12]
    log = node.wait_log("calling AE title not allowed")
    assert "called AE title is neither CTTRIAGE nor CTTRIAGE_WL" in log


# -- data sets: deflate bombs, corrupt data, quarantine --------------------------------
def _ct(tmp: Path, name: str, rows: int = 64, columns: int = 64, seed: int = 5):
    path = write_ct_series(tmp / name, 1, rows=rows, columns=columns, seed=seed).paths[0]
    return path, dcmread(path)


def _with_transfer_syntax(path: Path, syntax: str) -> bytes:
    """The file's bytes with only the file meta's Transfer Syntax UID changed (data set untouched)."""
    from io import BytesIO

    from pydicom.filewriter import write_file_meta_info

    raw = path.read_bytes()
    meta = dcmread(path, stop_before_pixels=True).file_meta
    old_end = 132 + 12 + meta.FileMetaInformationGroupLength
    meta.TransferSyntaxUID = syntax
    buffer = BytesIO()
    write_file_meta_info(buffer, meta, enforce_standard=True)
    return raw[:132] + buffer.getvalue() + raw[old_end:]


def test_deflate_bomb_is_refused_with_a_named_status(node, tmp_path, scanner_file):
    from dicom_node.integrity import _INFLATE_STEP  # noqa: F401 - the cap is streamed in these steps

    bomb_path, ds = _ct(tmp_path, "bomb", seed=8)
    ds.Rows = ds.Columns = 4096  # 32 MiB of zeros: over the 8 MB cap once inflated
    ds.PixelData = bytes(4096 * 4096 * 2)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(bomb_path, enforce_file_format=True)
    assert bomb_path.stat().st_size < 200_000
    small_path, small = _ct(tmp_path, "small", seed=9)
    small.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    small.save_as(small_path, enforce_file_format=True)
    with RssWatch(node.pid) as watch:
        assert pynetdicom_store(node.port, bomb_path, DeflatedExplicitVRLittleEndian) == \
            status.OUT_OF_RESOURCES_TOO_LARGE
        assert pynetdicom_store(node.port, small_path, DeflatedExplicitVRLittleEndian) == status.SUCCESS
    assert watch.growth < RSS_BUDGET_MB
    assert "inflates to more than 8 MB" in node.wait_log("0xA703")
    assert scanner_gets_in(node, scanner_file) < SCANNER_WITHIN_S


def test_deflated_instances_leave_no_open_files(node, tmp_path):
    """Each deflated instance is inflated into a scratch file: its descriptor must be closed."""
    paths = []
    for index in range(20):
        path, ds = _ct(tmp_path, f"deflated{index}", seed=100 + index)
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    assert pynetdicom_store(node.port, paths[0], DeflatedExplicitVRLittleEndian) == status.SUCCESS
    open_before = len(os.listdir(f"/proc/{node.pid}/fd"))
    for path in paths[1:]:
        assert pynetdicom_store(node.port, path, DeflatedExplicitVRLittleEndian) == status.SUCCESS
    time.sleep(1.0)  # the indexer may still hold the last file for a moment
    assert len(os.listdir(f"/proc/{node.pid}/fd")) - open_before < 5


def test_corrupt_data_sets_are_refused_not_acknowledged(node, tmp_path, scanner_file):
    cases = {}
    # Truncated pixel data: the file ends 1000 bytes early.
    path, _ = _ct(tmp_path, "truncated", seed=10)
    path.write_bytes(path.read_bytes()[:-1000])
    cases["truncated"] = (path, "1.2.840.10008.1.2.1", status.MALFORMED_DATASET)
    # Pixel Data length that does not match Rows x Columns.
    path, ds = _ct(tmp_path, "short", seed=11)
    ds.Rows = 65
    ds.save_as(path, enforce_file_format=True)
    cases["rows"] = (path, "1.2.840.10008.1.2.1", status.PIXEL_DATA_MISMATCH)
    # An impossible element length right after the UIDs.
    path, ds = _ct(tmp_path, "length", seed=12)
    raw = path.read_bytes()
    marker = raw.index(b"\x08\x00\x20\x00DA")  # StudyDate, after SOP Class/Instance UIDs
    path.write_bytes(raw[:marker] + b"\x08\x00\x20\x00DA\xf0\xff" + raw[marker + 8:])
    cases["length"] = (path, "1.2.840.10008.1.2.1", status.MALFORMED_DATASET)
    # A JPEG transfer syntax whose Pixel Data is not encapsulated.
    path, ds = _ct(tmp_path, "jpeg", seed=13)
    path.write_bytes(_with_transfer_syntax(path, JPEGBaseline8Bit))
    cases["jpeg"] = (path, JPEGBaseline8Bit, status.PIXEL_DATA_MISMATCH)
    with RssWatch(node.pid) as watch:
        for name, (path, syntax, expected) in cases.items():
            got = pynetdicom_store(node.port, path, syntax)
            assert got == expected, f"{name}: 0x{got:04X}, expected 0x{expected:04X}"
    assert watch.growth < RSS_BUDGET_MB
    from sqlalchemy import create_engine, text
    engine = create_engine(node.env["CT_TRIAGE_DATABASE_URL"])
    with engine.connect() as conn:
        uids = {dcmread(p, stop_before_pixels=True, force=True).SOPInstanceUID for p, _, _ in cases.values()}
        stored = {row[0] for row in conn.execute(text("select sop_instance_uid from instances"))}
        codes = [row[0] for row in conn.execute(text("select status_code from rejected_instances"))]
    engine.dispose()
    assert not uids & stored
    assert status.MALFORMED_DATASET in codes and status.PIXEL_DATA_MISMATCH in codes
    # The quarantine stays under its 1 MB cap however much bad data arrives.
    quarantine = node.storage / "quarantine"
    assert sum(p.stat().st_size for p in quarantine.iterdir()) <= 1 * 2**20
    assert scanner_gets_in(node, scanner_file) < SCANNER_WITHIN_S


def test_quarantine_obeys_the_disk_floor_and_its_cap(tmp_path):
    from dicom_node.spool import Spool

    rejected = tmp_path / "rejected.dcm"
    rejected.write_bytes(b"x" * 10_000)
    floor = Spool(tmp_path / "a", min_free_bytes=2**62)  # never room
    assert floor.quarantine(rejected, "one") is None
    assert list(floor.quarantine_dir.iterdir()) == []
    capped = Spool(tmp_path / "b", min_free_bytes=0, quarantine_max_bytes=25_000)
    assert capped.quarantine(rejected, "one") and capped.quarantine(rejected, "two")
    assert capped.quarantine(rejected, "three") is None
    assert sorted(p.name for p in capped.quarantine_dir.iterdir()) == ["one.dcm", "two.dcm"]


# -- log and status injection, PHI at INFO ---------------------------------------------
def test_attribute_text_cannot_forge_log_lines_or_status_rows(node, tmp_path):
    forged = "2026-01-01 00:00:00,000 INFO ct_triage.node: FORGED"
    path, ds = _ct(tmp_path, "inject", seed=14)
    ds.Modality = f"CT\r\n{forged}"
    ds.SeriesDescription = "\x1b[2J\x1b[31mred" + "A" * 5000
    ds.PatientName = "SECRETNAME^JANE"
    ds.PatientID = "PIDSECRET77"
    ds.PatientBirthDate = "19010203"
    ds.save_as(path, enforce_file_format=True)
    assert pynetdicom_store(node.port, path, "1.2.840.10008.1.2.1") == status.SUCCESS
    log = node.wait_log("modality CT\\x0d\\x0a2026")  # the escaped CR/LF, on the series' log line
    status_out = subprocess.run([sys.executable, "-m", "ct_triage_app.cli", "status"], capture_output=True, text=True,
                                env={**os.environ, **node.env}, timeout=120)
    assert status_out.returncode == 0, status_out.stderr
    for text in (log, status_out.stdout):
        assert not any(line.startswith(forged) for line in text.splitlines())
        assert "\x1b" not in text and "\r" not in text
        for secret in ("SECRETNAME", "PIDSECRET77", "19010203"):
            assert secret not in text
    assert "\\x0d\\x0a" in log


# -- TLS ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, the node's certificate, a good client, an expired client and an untrusted client."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = tmp_path_factory.mktemp("pki")
    now = datetime.datetime.now(datetime.UTC)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def issue(cn, issuer_key, issuer_name, *, ca=False, days=(-1, 30), key=None):
        key = key or ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(issuer_name or name(cn))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now + datetime.timedelta(days=days[0]))
                   .not_valid_after(now + datetime.timedelta(days=days[1]))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]),
                                            critical=False)
        cert = builder.sign(issuer_key or key, hashes.SHA256())
        key_path, cert_path = folder / f"{cn}.key", folder / f"{cn}.pem"
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return key, key_path, cert_path

    ca_key, _, ca_cert = issue("ct-triage test CA", None, None, ca=True)
    ca_name = name("ct-triage test CA")
    other_key, _, _ = issue("other CA", None, None, ca=True)
    return {
        "ca": ca_cert,
        "server": issue("node", ca_key, ca_name)[1:],
        "client": issue("scanner", ca_key, ca_name)[1:],
        "expired": issue("expired", ca_key, ca_name, days=(-30, -1))[1:],
        "untrusted": issue("stranger", other_key, name("other CA"))[1:],
    }


def _tls_echo(port: int, pki, client: str) -> subprocess.CompletedProcess:
    key, cert = pki[client]
    return subprocess.run([ECHOSCU, "-aet", "SCANNER", "-aec", "CTTRIAGE", "+tls", str(key), str(cert),
                           "+cf", str(pki["ca"]), "127.0.0.1", str(port)], capture_output=True, text=True,
                          env=dcmtk_env(), timeout=60)


def test_tls_required_refuses_plain_tcp_and_bad_client_certificates(tmp_path, pki):
    require_dcmtk()
    key, cert = pki["server"]
    node = Node(tmp_path, tls_cert=cert, tls_key=key, tls_ca=pki["ca"], tls_required="true").start(echo=False)
    try:
        deadline = time.monotonic() + 60
        while _tls_echo(node.port, pki, "client").returncode != 0:
            assert time.monotonic() < deadline and node.daemon.process.poll() is None, node.log()
            time.sleep(0.3)
        with RssWatch(node.pid) as watch:
            # Silent TCP clients (no ClientHello) do not stall the accept loop.
            silent = [connect(node, "127.0.0.2") for _ in range(3)]
            assert _tls_echo(node.port, pki, "client").returncode == 0
            plain = subprocess.run([ECHOSCU, "-aet", "SCANNER", "-aec", "CTTRIAGE", "127.0.0.1", str(node.port)],
                                   capture_output=True, text=True, env=dcmtk_env(), timeout=60)
            assert plain.returncode != 0
            assert _tls_echo(node.port, pki, "expired").returncode != 0
            assert _tls_echo(node.port, pki, "untrusted").returncode != 0
            for sock in silent:
                assert closed_by_node(sock, ACSE_S + 10) == b"closed"
                sock.close()
            assert _tls_echo(node.port, pki, "client").returncode == 0
        assert watch.growth < RSS_BUDGET_MB
        log = node.wait_log("certificate has expired")
        assert log.count("TLS handshake failed") >= 3
    finally:
        node.daemon.stop()


def test_the_client_certificate_must_name_the_calling_ae_title(tmp_path, pki):
    """CT_TRIAGE_TLS_CERT_AE_TITLE: the certificate issued to "scanner" (CN scanner, SAN localhost)
    admits the calling AE title "scanner" and nothing else, even with a certificate our CA signed."""
    require_dcmtk()
    key, cert = pki["server"]
    node = Node(tmp_path, tls_cert=cert, tls_key=key, tls_ca=pki["ca"], tls_required="true",
                tls_cert_ae_title="true", allowed_calling_aes="scanner,localhost,CT-ROOM-2").start(echo=False)

    def echo(calling: str) -> subprocess.CompletedProcess:
        ckey, ccert = pki["client"]
        return subprocess.run([ECHOSCU, "-aet", calling, "-aec", "CTTRIAGE", "+tls", str(ckey), str(ccert),
                               "+cf", str(pki["ca"]), "127.0.0.1", str(node.port)], capture_output=True, text=True,
                              env=dcmtk_env(), timeout=60)
    try:
        deadline = time.monotonic() + 60
        while echo("scanner").returncode != 0:
            assert time.monotonic() < deadline and node.daemon.process.poll() is None, node.log()
            time.sleep(0.3)
        assert echo("localhost").returncode == 0  # a subject alternative name counts too
        refused = echo("CT-ROOM-2")
        assert refused.returncode != 0
        log = node.wait_log("names neither in its CN nor its subject alternative names")
        assert "CT-ROOM-2" in log
    finally:
        node.daemon.stop()


# -- bounded fuzzing: the store handler and the series loader ----------------------------
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fuzzed_data_sets_get_named_statuses_and_stay_in_storage(tmp_path_factory):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from ct_triage.errors import CtTriageError
    from db.migrate import upgrade
    from db.session import make_engine, make_session_factory
    from dicom_node.server import handle_store
    from dicom_node.shutdown import InFlight
    from dicom_node.spool import Spool
    from dicom_node.store import StoreService
    from worker.scoring.load import load_series

    root = tmp_path_factory.mktemp("fuzz")
    seed_file = write_ct_series(root / "seed", 1, rows=16, columns=16, seed=21).paths[0]
    seed_bytes = seed_file.read_bytes()
    engine = make_engine(f"sqlite:///{root / 'db.sqlite'}")
    upgrade(engine)
    spool = Spool(root / "storage", 0, quarantine_max_bytes=2**20)
    store = StoreService(spool, make_session_factory(engine), max_instance_bytes=2**20)
    ds = dcmread(seed_file, stop_before_pixels=True)

    class Requestor:
        ae_title = "SCANNER"
        address = "127.0.0.9"
        port = 1

    class Assoc:
        requestor = Requestor()

    class Context:
        transfer_syntax = "1.2.840.10008.1.2.1"

    class Request:
        AffectedSOPClassUID = ds.SOPClassUID
        AffectedSOPInstanceUID = ds.SOPInstanceUID

    class Event:
        assoc = Assoc()
        context = Context()
        request = Request()
        dataset_path = ""

    outside_before = {p for p in root.rglob("*") if "storage" not in p.relative_to(root).parts}
    counter = iter(range(10**9))

    @settings(max_examples=150, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(edits=st.lists(st.tuples(st.integers(132, len(seed_bytes) - 1), st.binary(min_size=1, max_size=6)),
                          min_size=1, max_size=6),
           cut=st.one_of(st.none(), st.integers(140, len(seed_bytes))))
    def fuzz(edits, cut):
        data = bytearray(seed_bytes)
        for offset, replacement in edits:
            data[offset:offset + len(replacement)] = replacement
        if cut is not None:
            del data[cut:]
        path = spool.tmp_dir / f"fuzz-{next(counter)}.dcm"
        path.write_bytes(bytes(data))
        Event.dataset_path = str(path)
        code = handle_store(Event(), store, InFlight())
        assert code in status.NAMES, hex(code)
        assert code != status.PROCESSING_FAILURE, "an unexpected exception reached the handler's last resort"
        with contextlib.suppress(CtTriageError):
            load_series([path], min_slices=1)
        path.unlink(missing_ok=True)

    fuzz()
    engine.dispose()
    outside_after = {p for p in root.rglob("*") if "storage" not in p.relative_to(root).parts}
    assert outside_after - outside_before <= {root / "db.sqlite-wal", root / "db.sqlite-shm"}
    for stored in (root / "storage").rglob("*"):
        assert stored.resolve().is_relative_to((root / "storage").resolve())
