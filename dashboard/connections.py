"""Connection limits of the worklist page's HTTP server, so that slow or idle clients cannot starve it.

uvicorn alone counted open connections toward ``limit_concurrency``: 32 idle TCP
connections, or 40 clients sending their headers one line at a time, made ``/healthz``,
``/metrics`` and the page answer 503 for as long as they stayed connected, token or
not (nothing is authenticated before a request's head has arrived). uvicorn has no
deadline for a request's head and no per-address limit, so :class:`LimitedH11Protocol`
(uvicorn's h11 protocol, extended) adds them, and the server runs without
``limit_concurrency``:

- ``HEAD_TIMEOUT_S`` (10 s): a request (its head, and its body if it has one) must have
  arrived completely within this time of the connection opening, or of the previous
  response on a keep-alive connection; otherwise the connection is closed (reset). A
  browser sends a head in milliseconds; a client that trickles header lines, or opens
  a socket and sends nothing, holds a connection at most this long.
- ``IDLE_TIMEOUT_S`` (5 s): a keep-alive connection with no new request for this long
  after a response is closed (uvicorn's ``timeout_keep_alive``). The page refreshes every
  ``HTTP_REFRESH_S`` (>= 1 s) and simply reconnects.
- ``PER_ADDRESS`` (16, setting ``HTTP_CONNECTIONS_PER_ADDRESS``): connections open at once
  from one peer address (an IPv6 peer's /64, since one host usually owns the whole
  prefix); one more is closed as soon as it is accepted. A browser opens at most 6
  per host. Behind a reverse proxy every client shares the proxy's address: raise the
  setting there.
- ``MAX_CONNECTIONS`` (1024): connections open at once in all, never more than half the
  process's file descriptor limit (the DICOM node needs the rest); one more is closed
  as soon as it is accepted. Idle connections cost a socket and a few KB each, so
  the cap is high: 64 idle sockets and 40 trickling clients are nowhere near it.
- ``LOG_INTERVAL_S`` (60 s): one warning line per reason (per-address cap, total cap,
  deadline) at most this often, naming the last peer address and how many more were
  closed since the previous line, so an attack cannot flood the log. No request
  content is ever logged (a head that never completed may carry anything).

Requests in flight need no separate cap: h11 serves one request at a time per
connection (so in-flight requests <= connections <= ``MAX_CONNECTIONS``), and the
page's handlers run in anyio's thread pool (40 threads), which queues the rest.
A head is at most 16 KB (h11's limit; a larger one is answered 400), so an
open connection's memory is bounded as well. WebSocket upgrades are off (the page
has no WebSocket route).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import resource
import time
from dataclasses import dataclass
from typing import ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("ct_triage.dashboard")

HEAD_TIMEOUT_S = 10.0
IDLE_TIMEOUT_S = 5
PER_ADDRESS = 16
MAX_CONNECTIONS = 1024
LOG_INTERVAL_S = 60.0

# The peer has sent a whole request (head and body): its deadline no longer applies.
_REQUEST_RECEIVED = (h11.DONE, h11.MUST_CLOSE, h11.CLOSED)


@dataclass(frozen=True)
class HttpLimits:
    head_timeout_s: float = HEAD_TIMEOUT_S
    idle_timeout_s: int = IDLE_TIMEOUT_S
    per_address: int = PER_ADDRESS
    max_connections: int = MAX_CONNECTIONS
    log_interval_s: float = LOG_INTERVAL_S


def fd_bounded(max_connections: int) -> int:
    """``max_connections``, but at most half the soft file descriptor limit."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max_connections if soft == resource.RLIM_INFINITY else max(1, min(max_connections, soft // 2))


def peer_key(address: str) -> str:
    """What the per-address cap counts: the IPv4 address (also when IPv4-mapped), an IPv6 peer's /64."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class _DropLog:
    """One warning per reason at most every ``interval_s``, counting the closes in between."""

    def __init__(self, interval_s: float):
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._since: dict[str, int] = {}

    def __call__(self, reason: str, address: str, message: str, *args: object) -> None:
        now = time.monotonic()
        last = self._last.get(reason)
        if last is not None and now - last < self.interval_s:
            self._since[reason] = self._since.get(reason, 0) + 1
            return
        more = self._since.pop(reason, 0)
        self._last[reason] = now
        log.warning("worklist page: closed a connection from %s: " + message + "%s", address, *args,
                    f" ({more} more closed for this since the last such line)" if more else "")


class ConnectionTable:
    """Open connections per peer; used only from the server's event loop (one thread)."""

    def __init__(self, limits: HttpLimits):
        self.limits = limits
        self.max_connections = fd_bounded(limits.max_connections)
        self.by_peer: dict[str, int] = {}
        self.total = 0
        self.closed = {"per_address": 0, "total": 0, "deadline": 0}  # connections closed, by reason
        self._log = _DropLog(limits.log_interval_s)

    def admit(self, address: str) -> bool:
        key = peer_key(address)
        if self.total >= self.max_connections:
            self.closed["total"] += 1
            self._log("total", address, "%d connections open in all (the cap)", self.total)
            return False
        if self.by_peer.get(key, 0) >= self.limits.per_address:
            self.closed["per_address"] += 1
            self._log("per_address", address, "%d connections open from there (CT_TRIAGE_HTTP_CONNECTIONS_PER_ADDRESS)",
                      self.limits.per_address)
            return False
        self.by_peer[key] = self.by_peer.get(key, 0) + 1
        self.total += 1
        return True

    def release(self, address: str) -> None:
        key = peer_key(address)
        left = self.by_peer.get(key, 0) - 1
        if left > 0:
            self.by_peer[key] = left
        else:
            self.by_peer.pop(key, None)
        self.total -= 1

    def deadline_missed(self, address: str) -> None:
        self.closed["deadline"] += 1
        self._log("deadline", address, "no complete request within %g s", self.limits.head_timeout_s)


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the request deadline and the connection caps (see the module)."""

    table: ClassVar[ConnectionTable]  # set on the subclass :func:`protocol_class` makes

    _address = ""
    _admitted = False
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._address = self.client[0] if self.client else ""
        if not self.table.admit(self._address):
            transport.abort()
            return
        self._admitted = True
        self._arm_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        if self._admitted:
            self._admitted = False
            self.table.release(self._address)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._deadline is not None and self.conn.their_state in _REQUEST_RECEIVED:
            self._cancel_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # Waiting for the next request (a pipelined one may already be in): its deadline starts now.
        if self._admitted and not self.transport.is_closing() and self.conn.their_state not in _REQUEST_RECEIVED:
            self._arm_deadline()

    def _arm_deadline(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(self.table.limits.head_timeout_s, self._deadline_passed)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _deadline_passed(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.table.deadline_missed(self._address)
            self.transport.abort()


def protocol_class(table: ConnectionTable) -> type[LimitedH11Protocol]:
    """A protocol class for ``uvicorn.Config(http=...)`` whose connections share ``table``."""
    return type("LimitedH11Protocol", (LimitedH11Protocol,), {"table": table})
