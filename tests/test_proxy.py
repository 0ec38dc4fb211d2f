"""PROXY protocol v2 (dicom_node.proxy): the parser on byte strings, and a node behind a "load balancer"."""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import time

import pytest
from sqlalchemy import select

from db.models import AuditEvent
from dicom_node.proxy import (
    MAX_LENGTH,
    SIGNATURE,
    ProxyHeaderError,
    TrustedProxies,
    build_header,
    parse_header,
    read_header,
)


# -- the parser ------------------------------------------------------------------------
def test_v2_ipv4():
    raw = build_header(("10.1.2.3", 40123), ("192.0.2.10", 11112))
    header = parse_header(raw + b"\x01\x00rest")
    assert header.source == ("10.1.2.3", 40123)
    assert header.destination == ("192.0.2.10", 11112)
    assert header.length == len(raw) == 16 + 12


def test_v2_ipv6_with_tlvs_skipped():
    tlv = bytes([0x04]) + struct.pack(">H", 3) + b"abc"  # PP2_TYPE_NOOP
    raw = build_header(("2001:db8::7", 5000), ("2001:db8::1", 11112), tlvs=tlv)
    header = parse_header(raw)
    assert header.source == ("2001:db8::7", 5000)
    assert header.length == 16 + 36 + len(tlv)


def test_v2_local_keeps_the_connection_address():
    header = parse_header(build_header(None))
    assert header.is_local and header.source is None


def test_v2_unspec_family_keeps_the_connection_address():
    raw = SIGNATURE + bytes([0x21, 0x00]) + struct.pack(">H", 0)
    assert parse_header(raw).source is None


@pytest.mark.parametrize("cut", [0, 5, 12, 15, 16, 20, 27])
def test_truncated(cut):
    raw = build_header(("10.1.2.3", 1))
    with pytest.raises(ProxyHeaderError, match="truncated"):
        parse_header(raw[:cut])


def test_wrong_signature():
    raw = bytearray(build_header(("10.1.2.3", 1)))
    raw[3] ^= 0xFF
    with pytest.raises(ProxyHeaderError, match="signature"):
        parse_header(bytes(raw))
    # PROXY v1 (text) is not accepted either
    with pytest.raises(ProxyHeaderError, match="signature"):
        parse_header(b"PROXY TCP4 10.1.2.3 10.0.0.1 40000 11112\r\n")


def test_wrong_version_and_family():
    raw = bytearray(build_header(("10.1.2.3", 1)))
    raw[12] = 0x11  # version 1
    with pytest.raises(ProxyHeaderError, match="version"):
        parse_header(bytes(raw))
    raw = bytearray(build_header(("10.1.2.3", 1)))
    raw[13] = 0x12  # UDP over IPv4
    with pytest.raises(ProxyHeaderError, match="not TCP"):
        parse_header(bytes(raw))
    raw = bytearray(build_header(("10.1.2.3", 1)))
    raw[13] = 0x31  # AF_UNIX
    with pytest.raises(ProxyHeaderError, match="not TCP"):
        parse_header(bytes(raw))


def test_oversized_length():
    raw = SIGNATURE + bytes([0x21, 0x11]) + struct.pack(">H", MAX_LENGTH + 1) + bytes(MAX_LENGTH + 1)
    with pytest.raises(ProxyHeaderError, match="over the maximum"):
        parse_header(raw)


def test_address_block_too_short():
    raw = SIGNATURE + bytes([0x21, 0x21]) + struct.pack(">H", 12) + bytes(12)  # IPv6 needs 36
    with pytest.raises(ProxyHeaderError, match="too short"):
        parse_header(raw)


def test_read_header_reads_nothing_after_it():
    a, b = socket.socketpair()
    try:
        b.sendall(build_header(("10.1.2.3", 4)) + b"\x01\x00NEXT")
        header = read_header(a, 2.0)
        assert header.source == ("10.1.2.3", 4)
        assert a.recv(100) == b"\x01\x00NEXT"
    finally:
        a.close()
        b.close()


def test_read_header_is_bounded_in_time():
    a, b = socket.socketpair()
    try:
        b.sendall(build_header(("10.1.2.3", 4))[:10])
        started = time.monotonic()
        with pytest.raises(ProxyHeaderError, match="handshake timeout"):
            read_header(a, 0.3)
        assert time.monotonic() - started < 2
    finally:
        a.close()
        b.close()


def test_trusted_proxies():
    proxies = TrustedProxies(["127.0.0.2", "10.9.0.0/16", "[2001:db8::]/64"])
    assert proxies.trusts("127.0.0.2") and proxies.trusts("10.9.3.4") and proxies.trusts("2001:db8::5")
    assert proxies.trusts("::ffff:127.0.0.2")
    assert not proxies.trusts("127.0.0.3") and not proxies.trusts("garbage")
    assert not TrustedProxies([])


def test_setting_is_checked():
    from ct_triage.errors import ConfigError
    from ct_triage.settings import Settings

    assert Settings.from_env({"CT_TRIAGE_PROXY_PROTOCOL_FROM": "127.0.0.2, 10.0.0.0/8"}).proxy_protocol_from == [
        "127.0.0.2", "10.0.0.0/8"]
    with pytest.raises(ConfigError, match="PROXY_PROTOCOL_FROM"):
        Settings.from_env({"CT_TRIAGE_PROXY_PROTOCOL_FROM": "haproxy.local"})


# -- a node behind a load balancer -----------------------------------------------------------
def associate_rq(calling: str, called: str, port: int) -> bytes:
    """An A-ASSOCIATE-RQ for Verification, as bytes."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, ImplementationClassUIDNotification, MaximumLengthNotification
    from pynetdicom.presentation import build_context

    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    context = build_context("1.2.840.10008.1.1")
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    length = MaximumLengthNotification()
    length.maximum_length_received = 16384
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.826.0.1.3680043.9.9999.1"
    primitive.user_information = [length, implementation]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return pdu.encode()


def exchange(source: str, port: int, payload: bytes) -> bytes:
    """Connect from ``source``, send ``payload``, return the first PDU type byte (b'' when closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as sock:
        sock.sendall(payload)
        try:
            first = sock.recv(1)
        except (ConnectionResetError, TimeoutError):
            return b""
        if first == b"\x02":  # A-ASSOCIATE-AC: release politely
            sock.recv(65536)
            sock.sendall(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")
            with contextlib.suppress(OSError):
                sock.recv(100)
        return first


def _audit_addresses(running) -> list[tuple[str | None, str | None]]:
    with running.session_factory() as session:
        return [(row.source_address, row.user_id) for row in session.scalars(select(AuditEvent))]


def test_node_behind_a_load_balancer(start_node, sqlite_url, caplog):
    running = start_node(sqlite_url, proxy_protocol_from=["127.0.0.2"], allowed_calling_aes=["SCANNER@10.1.2.3"],
                         acse_timeout_s=3.0)
    port = running.port
    payload = build_header(("10.1.2.3", 40555), ("127.0.0.1", port)) + associate_rq("SCANNER", "CTTRIAGE", port)
    caplog.set_level(logging.DEBUG, logger="ct_triage")

    # Through the load balancer: accepted as 10.1.2.3, which the allowlist names.
    assert exchange("127.0.0.2", port, payload) == b"\x02"
    deadline = time.monotonic() + 5
    while "at 10.1.2.3:40555 established" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "association from SCANNER at 10.1.2.3:40555 established" in caplog.text

    # The same bytes from a host that is not a load balancer: its header is garbage.
    assert exchange("127.0.0.3", port, payload) != b"\x02"
    # Without the header, the balancer's own address is not the scanner's: closed, one line.
    caplog.clear()
    assert exchange("127.0.0.2", port, associate_rq("SCANNER", "CTTRIAGE", port)) != b"\x02"
    deadline = time.monotonic() + 5
    while "no valid PROXY v2 header" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    assert caplog.text.count("no valid PROXY v2 header") == 1, caplog.text

    # A scanner the allowlist does not name, through the balancer: refused, and the audit
    # trail's Security Alert names the scanner's address, not the balancer's.
    other = build_header(("10.1.2.99", 41000), ("127.0.0.1", port)) + associate_rq("SCANNER", "CTTRIAGE", port)
    assert exchange("127.0.0.2", port, other) == b"\x03"  # A-ASSOCIATE-RJ
    deadline = time.monotonic() + 5
    while not any(address == "10.1.2.99" for address, _ in _audit_addresses(running)) and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    addresses = {address for address, _ in _audit_addresses(running)}
    assert "10.1.2.99" in addresses
    assert "127.0.0.2" not in addresses

    # LOCAL (the balancer's health check) keeps the balancer's address: not the allowed scanner.
    local = build_header(None) + associate_rq("SCANNER", "CTTRIAGE", port)
    assert exchange("127.0.0.2", port, local) == b"\x03"


def test_per_address_cap_counts_the_scanner_not_the_balancer(start_node, sqlite_url):
    """Pending connections are capped per scanner behind the balancer, not once for the balancer."""
    running = start_node(sqlite_url, proxy_protocol_from=["127.0.0.2"], max_pending_per_address=1,
                         acse_timeout_s=3.0)
    port = running.port
    socks = []
    try:
        # Two scanners each with a pending connection (header sent, no A-ASSOCIATE-RQ yet).
        for address in ("10.1.2.3", "10.1.2.4"):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.0.2", 0))
            sock.sendall(build_header((address, 1000), ("127.0.0.1", port)))
            socks.append(sock)
        time.sleep(0.3)
        # A third from the second scanner is over its cap: closed at once.
        sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.0.2", 0))
        sock.sendall(build_header(("10.1.2.4", 1001), ("127.0.0.1", port)))
        socks.append(sock)
        assert sock.recv(10) == b""
        # The first scanner's pending connection still associates.
        socks[0].sendall(associate_rq("SCANNER", "CTTRIAGE", port))
        assert socks[0].recv(1) == b"\x02"
    finally:
        for sock in socks:
            sock.close()
