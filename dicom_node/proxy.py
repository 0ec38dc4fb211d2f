"""PROXY protocol v2 (HAProxy ``send-proxy-v2``): the scanner's address behind a load balancer.

What
    A TCP load balancer hides the scanners: every connection comes from its address. With
    ``CT_TRIAGE_PROXY_PROTOCOL_FROM`` naming the load balancers (addresses or networks), a
    connection *from one of them* must start with a PROXY v2 header, read here before
    anything else (before TLS, before the A-ASSOCIATE-RQ) with bounded reads under the
    handshake timeout (the ACSE timeout). The source address it names replaces the peer
    address of the connection, so the allowlists and roles (:mod:`dicom_node.access`), the
    per-address caps (:class:`dicom_node.transport.Gate`), the log lines and the audit trail
    all see the scanner. The LOCAL command (the balancer's own health checks, HAProxy
    ``check-send-proxy``) and the UNSPEC family keep the balancer's address, as the
    specification says.

    A trusted balancer's connection without a valid header is closed with one log line
    (one that closes before sending a byte, a plain TCP health check, is logged at DEBUG
    only). A connection from anywhere else is never read as PROXY: a header it sends is the
    start of a malformed PDU (unknown PDU type 0x0D) and is aborted as such.

Format (haproxy.org/download/2.9/doc/proxy-protocol.txt, section 2.2)
    12-byte signature, version/command byte (0x20 LOCAL, 0x21 PROXY), family/protocol byte
    (0x11 TCP over IPv4, 0x21 TCP over IPv6, 0x00 UNSPEC), 2-byte length of what follows
    (addresses, then TLVs, which are skipped). Headers longer than :data:`MAX_LENGTH` are
    refused (HAProxy's largest, with every TLV it sends, stays far below).
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

log = logging.getLogger("ct_triage.node.proxy")

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
HEADER_FIXED = 16
#: Longest address + TLV block accepted after the 16 fixed bytes.
MAX_LENGTH = 2048
LOCAL, PROXY = 0x0, 0x1
AF_UNSPEC, AF_INET, AF_INET6 = 0x0, 0x1, 0x2
STREAM = 0x1


class ProxyHeaderError(ValueError):
    """The bytes are not a PROXY v2 header we accept (the message says why)."""


@dataclass(frozen=True)
class ProxyHeader:
    command: int  # LOCAL or PROXY
    source: tuple[str, int] | None  # (address, port) of the client; None: keep the connection's
    destination: tuple[str, int] | None = None
    length: int = HEADER_FIXED  # bytes the header took on the wire

    @property
    def is_local(self) -> bool:
        return self.source is None


def header_length(fixed: bytes) -> int:
    """Total length of the header whose first 16 bytes are ``fixed`` (checks signature, version, length)."""
    if len(fixed) < HEADER_FIXED:
        raise ProxyHeaderError(f"truncated: {len(fixed)} of {HEADER_FIXED} bytes")
    if fixed[:12] != SIGNATURE:
        raise ProxyHeaderError("no PROXY v2 signature")
    if fixed[12] >> 4 != 0x2:
        raise ProxyHeaderError(f"PROXY protocol version {fixed[12] >> 4}, expected 2")
    length = struct.unpack(">H", fixed[14:16])[0]
    if length > MAX_LENGTH:
        raise ProxyHeaderError(f"header declares {length} bytes, over the maximum of {MAX_LENGTH}")
    return HEADER_FIXED + length


def parse_header(data: bytes) -> ProxyHeader:
    """Parse one whole PROXY v2 header at the start of ``data`` (bytes after it are ignored)."""
    total = header_length(bytes(data[:HEADER_FIXED]))
    if len(data) < total:
        raise ProxyHeaderError(f"truncated: {len(data)} of {total} bytes")
    command = data[12] & 0x0F
    family, protocol = data[13] >> 4, data[13] & 0x0F
    body = bytes(data[HEADER_FIXED:total])
    if command == LOCAL:
        return ProxyHeader(LOCAL, None, None, total)
    if command != PROXY:
        raise ProxyHeaderError(f"unknown command 0x{command:X}")
    if family == AF_UNSPEC:
        return ProxyHeader(PROXY, None, None, total)
    if protocol != STREAM or family not in (AF_INET, AF_INET6):
        raise ProxyHeaderError(f"family/protocol 0x{data[13]:02X} is not TCP over IPv4 or IPv6")
    size = 4 if family == AF_INET else 16
    if len(body) < 2 * size + 4:
        raise ProxyHeaderError(f"address block of {len(body)} bytes, too short for {'IPv4' if size == 4 else 'IPv6'}")
    kind = IPv4Address if size == 4 else IPv6Address
    src = str(kind(body[:size]))
    dst = str(kind(body[size:2 * size]))
    sport, dport = struct.unpack(">HH", body[2 * size:2 * size + 4])
    return ProxyHeader(PROXY, (src, sport), (dst, dport), total)


def build_header(source: tuple[str, int] | None, destination: tuple[str, int] = ("127.0.0.1", 11112),
                 tlvs: bytes = b"") -> bytes:
    """A PROXY v2 header (PROXY for ``source``, LOCAL when None): what HAProxy sends (tests, tools)."""
    if source is None:
        return SIGNATURE + bytes([0x20, 0x00]) + struct.pack(">H", len(tlvs)) + tlvs
    src, dst = ip_address(source[0]), ip_address(destination[0])
    family = 0x11 if src.version == 4 else 0x21
    body = src.packed + dst.packed + struct.pack(">HH", source[1], destination[1]) + tlvs
    return SIGNATURE + bytes([0x21, family]) + struct.pack(">H", len(body)) + body


def _recv_exactly(sock: socket.socket, count: int, deadline: float) -> bytes:
    chunks: list[bytes] = []
    got = 0
    while got < count:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ProxyHeaderError(f"incomplete after the handshake timeout ({got} bytes)")
        sock.settimeout(left)
        try:
            chunk = sock.recv(count - got)
        except TimeoutError:
            raise ProxyHeaderError(f"incomplete after the handshake timeout ({got} bytes)") from None
        if not chunk:
            raise ProxyHeaderError("connection closed before the header was complete" if got or chunks
                                   else "connection closed before any byte")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_header(sock: socket.socket, timeout_s: float) -> ProxyHeader:
    """Read exactly one PROXY v2 header from ``sock`` (nothing after it) within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    fixed = _recv_exactly(sock, HEADER_FIXED, deadline)
    total = header_length(fixed)
    rest = _recv_exactly(sock, total - HEADER_FIXED, deadline) if total > HEADER_FIXED else b""
    return parse_header(fixed + rest)


class TrustedProxies:
    """The load balancers of ``CT_TRIAGE_PROXY_PROTOCOL_FROM`` (addresses or networks)."""

    def __init__(self, entries: Iterable[str]):
        self.networks: list[IPv4Network | IPv6Network] = [
            ip_network(entry.strip().replace("[", "").replace("]", ""), strict=False)
            for entry in entries if entry.strip()]

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, address: str) -> bool:
        try:
            addr = ip_address(str(address).split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(addr, IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr.version == net.version and addr in net for net in self.networks)


def client_address(sock: socket.socket, peer: tuple, timeout_s: float) -> tuple | None:
    """The client behind a trusted balancer's connection ``sock`` from ``peer``: the header's
    source, ``peer`` itself for LOCAL/UNSPEC, or None (one log line) when the header is missing
    or invalid: the caller closes the connection."""
    try:
        header = read_header(sock, timeout_s)
    except ProxyHeaderError as exc:
        level = logging.DEBUG if "before any byte" in str(exc) else logging.WARNING
        log.log(level, "connection from load balancer %s:%s closed: no valid PROXY v2 header (%s)",
                peer[0], peer[1], exc)
        return None
    except OSError as exc:
        log.warning("connection from load balancer %s:%s closed while reading its PROXY v2 header: %s",
                    peer[0], peer[1], type(exc).__name__)
        return None
    if header.source is None:
        return tuple(peer)
    log.debug("load balancer %s:%s: PROXY v2 client %s:%s", peer[0], peer[1], *header.source)
    return header.source
