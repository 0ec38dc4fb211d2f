"""Slow and idle clients cannot starve the worklist page (issue 17 item 5), over real sockets.

Loopback addresses play different hosts: the attacker's sockets are bound to 127.0.0.2
(and 127.0.0.10+), the legitimate client's to 127.0.0.3. Before the fix, 32 idle
connections made /healthz, /metrics and the page answer 503.
"""

from __future__ import annotations

import logging
import random
import socket
import threading
import time
from contextlib import suppress

import httpx
import pytest

from ct_triage.errors import ConfigError
from ct_triage.runtime import open_database
from dashboard.connections import HttpLimits, peer_key
from dashboard.server import DashboardServer
from tests.conftest import make_settings
from tests.support.dashboard import seed_dashboard
from tests.support.scanner import free_port

pytestmark = pytest.mark.security

TOKEN = "s3cret-token-0123456789"
ATTACKER = "127.0.0.2"
VISITOR = "127.0.0.3"
PATHS = ("/healthz", "/metrics", "/")
ANSWER_WITHIN_S = 1.0


@pytest.fixture
def dashboard(tmp_path, sqlite_url):
    servers, engines = [], []

    def _start(token: str = "", limits: HttpLimits | None = None) -> DashboardServer:
        # With a token the page is bound off loopback, as in production; without one, to 127.0.0.1.
        settings = make_settings(tmp_path, sqlite_url, http_port=free_port(), http_token=token,
                                 http_host="0.0.0.0" if token else "127.0.0.1")
        engine, factory = open_database(settings)
        engines.append(engine)
        seed_dashboard(factory)
        server = DashboardServer(settings, factory, limits=limits) if limits else DashboardServer(settings, factory)
        assert server.start()
        servers.append(server)
        return server

    yield _start
    for server in servers:
        server.stop()
    for engine in engines:
        engine.dispose()


def connect(port: int, source: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.settimeout(5)
    sock.connect(("127.0.0.1", port))
    return sock


def closed_by_server(sock: socket.socket, wait_s: float) -> bool:
    """True when the server closes (or resets) the connection within ``wait_s``."""
    sock.settimeout(wait_s)
    try:
        while True:
            if not sock.recv(4096):
                return True
    except TimeoutError:
        return False
    except OSError:  # reset
        return True


class Attack:
    """Idle sockets plus clients that send their request head one header line at a time, forever."""

    def __init__(self, port: int, sources: list[str], idle: int, trickling: int, line_every_s: float = 0.2):
        self.sockets: list[socket.socket] = []
        self.trickling: list[socket.socket] = []
        self.line_every_s = line_every_s
        self._stop = threading.Event()
        kinds = ["idle"] * idle + ["trickling"] * trickling
        random.Random(17).shuffle(kinds)  # both kinds among the connections a cap lets in
        for n, kind in enumerate(kinds):
            sock = connect(port, sources[n % len(sources)])
            self.sockets.append(sock)
            if kind == "trickling":
                self.trickling.append(sock)
                with suppress(OSError):
                    sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        self._thread = threading.Thread(target=self._trickle, daemon=True)
        self._thread.start()

    def _trickle(self) -> None:
        n = 0
        while not self._stop.wait(self.line_every_s):
            n += 1
            for sock in self.trickling:
                with suppress(OSError):
                    sock.sendall(b"X-Slow-%d: x\r\n" % n)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for sock in self.sockets:
            sock.close()


def visit(port: int, token: str = "") -> dict[str, float]:
    """Each path from VISITOR on a new connection: seconds to a 200."""
    headers = {"authorization": f"Bearer {token}"} if token else {}
    seconds = {}
    for path in PATHS:
        transport = httpx.HTTPTransport(local_address=VISITOR)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", transport=transport, timeout=10,
                          headers=headers) as http:
            start = time.monotonic()
            response = http.get(path)
            seconds[path] = time.monotonic() - start
        assert response.status_code == 200, (path, response.status_code, response.text[:200])
    return seconds


def wait_until(condition, timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.parametrize("token", ["", TOKEN], ids=["loopback-no-token", "token"])
def test_idle_and_trickling_clients_from_one_address_do_not_starve_the_page(dashboard, token, caplog):
    caplog.set_level(logging.WARNING, logger="ct_triage.dashboard")
    server = dashboard(token=token)
    visit(server.port, token)  # warm: the first page render loads the view code
    attack = Attack(server.port, [ATTACKER], idle=64, trickling=40)
    try:
        time.sleep(0.5)  # the trickling heads are well under way
        worst = 0.0
        for _ in range(3):
            seconds = visit(server.port, token)
            worst = max(worst, *seconds.values())
            assert all(s < ANSWER_WITHIN_S for s in seconds.values()), seconds
        # The attacker holds its 16 connections; the other 88 were closed at once.
        wait_until(lambda: server.connections.closed["per_address"] == 64 + 40 - 16)
        assert server.connections.by_peer.get(ATTACKER) == 16
    finally:
        attack.close()
    print(f"\n{'token' if token else 'no token'}: slowest answer under attack {worst * 1000:.0f} ms")
    # 88 connections closed, logged once (rate-limited), without anything the client sent
    lines = [r.getMessage() for r in caplog.records if "closed a connection" in r.getMessage()]
    assert len(lines) == 1 and ATTACKER in lines[0] and "X-Slow" not in lines[0], lines


def test_idle_connections_within_the_cap_from_many_addresses_do_not_count_as_requests(dashboard):
    """Far more open connections than uvicorn's old limit of 32, none over the per-address cap."""
    server = dashboard()
    sources = [f"127.0.0.{n}" for n in range(10, 17)]  # 7 addresses, 16 connections each
    attack = Attack(server.port, sources, idle=64, trickling=40)
    try:
        wait_until(lambda: server.connections.total == 104)
        worst = max(max(visit(server.port).values()) for _ in range(3))
        assert worst < ANSWER_WITHIN_S
        assert sum(server.connections.closed.values()) == 0
    finally:
        attack.close()
    print(f"\n104 connections from 7 addresses: slowest answer {worst * 1000:.0f} ms")


def test_a_head_that_never_completes_is_closed_at_the_deadline(dashboard, caplog):
    caplog.set_level(logging.WARNING, logger="ct_triage.dashboard")
    deadline_s = 1.0
    server = dashboard(limits=HttpLimits(head_timeout_s=deadline_s, idle_timeout_s=1))
    silent = connect(server.port, ATTACKER)
    start = time.monotonic()
    attack = Attack(server.port, [ATTACKER], idle=0, trickling=1, line_every_s=0.1)
    try:
        trickler = attack.trickling[0]
        assert closed_by_server(trickler, deadline_s + 1.5)
        trickle_s = time.monotonic() - start
        assert closed_by_server(silent, 0.5)
        silent_s = time.monotonic() - start
    finally:
        attack.close()
        silent.close()
    assert deadline_s - 0.1 < trickle_s < deadline_s + 0.8 and silent_s < deadline_s + 0.8, (trickle_s, silent_s)
    wait_until(lambda: server.connections.total == 0)
    assert server.connections.closed["deadline"] == 2
    print(f"\nhead deadline {deadline_s} s: trickling client closed after {trickle_s:.2f} s, "
          f"silent one after {silent_s:.2f} s")

    # A slow but complete head, within the deadline, is answered; the keep-alive connection then
    # gets a new deadline for its next request, and is closed when idle.
    with connect(server.port, VISITOR) as sock:
        for line in (b"GET /healthz HTTP/1.1\r\n", b"Host: 127.0.0.1\r\n", b"\r\n"):
            sock.sendall(line)
            time.sleep(deadline_s / 4)
        sock.settimeout(2)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        time.sleep(deadline_s * 0.75)  # longer than the rest of the first request's deadline
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        start = time.monotonic()
        assert closed_by_server(sock, 3)
        assert time.monotonic() - start < 1.5  # IDLE_TIMEOUT_S (1 s here)
    lines = [r.getMessage() for r in caplog.records if "no complete request" in r.getMessage()]
    assert len(lines) == 1, lines  # the second close within LOG_INTERVAL_S is counted, not logged


def test_per_address_cap_closes_one_more_connection_while_other_addresses_connect(dashboard):
    server = dashboard()  # HTTP_CONNECTIONS_PER_ADDRESS = 16
    held = [connect(server.port, ATTACKER) for _ in range(16)]
    try:
        wait_until(lambda: server.connections.by_peer.get(ATTACKER) == 16)
        extra = connect(server.port, ATTACKER)
        assert closed_by_server(extra, 2)
        extra.close()
        assert not any(closed_by_server(sock, 0.01) for sock in held)
        assert max(visit(server.port).values()) < ANSWER_WITHIN_S  # another address still connects
        # A slot freed is a slot usable again.
        held.pop().close()
        wait_until(lambda: server.connections.by_peer.get(ATTACKER) == 15)
        held.append(connect(server.port, ATTACKER))
        assert not closed_by_server(held[-1], 0.3)
        assert server.connections.by_peer.get(ATTACKER) == 16 and server.connections.closed["per_address"] == 1
    finally:
        for sock in held:
            sock.close()


def test_total_cap_closes_one_more_connection(dashboard):
    server = dashboard(limits=HttpLimits(max_connections=8))
    held = [connect(server.port, f"127.0.0.{10 + n}") for n in range(8)]
    try:
        wait_until(lambda: server.connections.total == 8)
        extra = connect(server.port, VISITOR)
        assert closed_by_server(extra, 2)
        extra.close()
        assert server.connections.closed == {"per_address": 0, "total": 1, "deadline": 0}
        held.pop().close()
        wait_until(lambda: server.connections.total == 7)
        assert max(visit(server.port).values()) < ANSWER_WITHIN_S
    finally:
        for sock in held:
            sock.close()


def test_peers_are_counted_by_ipv4_address_or_ipv6_prefix():
    assert peer_key("192.0.2.7") == "192.0.2.7"
    assert peer_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert peer_key("2001:db8:1:2:aaaa::1") == peer_key("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert peer_key("2001:db8:1:3::1") != peer_key("2001:db8:1:2::1")
    assert peer_key("fe80::1%eth0") == "fe80::/64"


@pytest.mark.parametrize("value", [0, 1025])
def test_connections_per_address_setting_is_validated(tmp_path, value):
    with pytest.raises(ConfigError, match="HTTP_CONNECTIONS_PER_ADDRESS"):
        make_settings(tmp_path, "sqlite://", http_connections_per_address=value)
