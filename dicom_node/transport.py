"""A bounded receive path for pynetdicom: what a hostile peer can cost the node.

pynetdicom's DUL reads a PDU with one blocking ``recv`` of the length the peer
declares in its 6-byte header. A peer that declares 4 GiB and sends nothing holds
that thread forever (the ARTIM, ACSE and network timers live in the same loop and
never run), and pynetdicom counts that socket against the association cap before it
ever sent an A-ASSOCIATE-RQ. This module replaces that path, process-wide, with:

- **Incremental reads.** A PDU is read as bytes arrive; its buffer starts at 64 KiB
  (``_INITIAL_BUFFER``) and at most doubles, so memory follows bytes received, never
  the declared length. After each read burst (at most ``_READ_BURST_S`` = 50 ms) the
  DUL loop runs again, so its timers hold mid-PDU.
- **Limits on receipt.** A P-DATA-TF longer than the maximum PDU length we
  advertised, any other PDU over 1 MiB (``_MAX_CONTROL_PDU``), an unknown PDU type,
  or a data set over ``CT_TRIAGE_MAX_INSTANCE_MB`` on the wire: A-ABORT at once, one
  log line with the peer and the reason.
- **Deadlines.** A PDU must complete within the network timeout from its first
  byte; a DIMSE message (first to last fragment) within ``CT_TRIAGE_MAX_MESSAGE_S``.
  Partial PDUs do not restart the idle timer, so a peer trickling a byte now and
  then is cut after the network timeout. Before the A-ASSOCIATE-RQ is complete the
  ARTIM timer (ACSE timeout) applies.
- **Admission** (:class:`Gate`, :class:`BoundedAssociationServer`): a socket is
  *pending* until its association is accepted. Pending sockets are capped per source
  address (``CT_TRIAGE_MAX_PENDING_PER_ADDRESS``) and in total
  (``CT_TRIAGE_MAX_PENDING_TOTAL``); only accepted associations count against
  ``CT_TRIAGE_MAX_ASSOCIATIONS``. The TLS handshake runs in the connection's thread
  under the ACSE timeout, never in the accept loop (pynetdicom does it in
  ``get_request``, where one silent TLS client stalls every other caller).

Sockets carry a timeout (the network timeout), so a send to a peer that stopped
reading is bounded too.

Idle cost: pynetdicom's DUL loop sleeps 1 ms and polls, and the association reactor
sleeps 1 ms between looks at the DIMSE queue: per association thousands of wake-ups a
second and up to a millisecond of latency per message. Here the DUL loop waits in
``select()`` on its socket and an eventfd that :meth:`send_pdu` signals, and the
acceptor's reactor waits on the DIMSE queue, each at most 20 ms (``_IDLE_WAIT_S``) so
the timers are still checked fifty times a second.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import socket
import ssl
import struct
import threading
import time
import weakref
from dataclasses import dataclass, field

from pynetdicom import dul as pynetdicom_dul
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from ct_triage.text import clean, clean_exception
from dicom_node import proxy

log = logging.getLogger("ct_triage.node.transport")

DUL_LOOP_DELAY_S = 0.0  # the DUL loop waits in select() instead (see _is_transport_event)
_IDLE_WAIT_S = 0.02  # longest wait for the socket, a queued primitive or a DIMSE message
_INITIAL_BUFFER = 64 * 1024
_MAX_CONTROL_PDU = 1024 * 1024  # A-ASSOCIATE-RQ/AC/RJ, release, abort: never near this
_UNLIMITED_PDU_CAP = 64 * 1024 * 1024  # when a maximum of 0 (unlimited) was advertised
_READ_BURST_S = 0.05
_DEFAULTS = {"max_message_s": 600.0, "max_instance_bytes": 2048 * 2**20}


def peer_of(assoc) -> str:
    """``address:port`` of the remote side of ``assoc`` (for log lines)."""
    remote = assoc.requestor if assoc.is_acceptor else assoc.acceptor
    try:
        return f"{remote.address}:{remote.port}"
    except Exception:
        return "?"


@dataclass
class _Rx:
    """Receive state of one DUL: the PDU being read and the DIMSE message in progress."""

    buffer: bytearray = field(default_factory=lambda: bytearray(6))
    got: int = 0
    length: int | None = None  # declared PDU length (after the header)
    started: float = 0.0  # monotonic time of the PDU's first byte
    message_started: float | None = None
    message_bytes: int = 0
    dead: bool = False
    last_whole: float = field(default_factory=time.monotonic)  # when the last whole PDU was handled

    def reset(self) -> None:
        self.buffer = bytearray(6)
        self.got = 0
        self.length = None
        self.started = 0.0


def _rx(dul: DULServiceProvider) -> _Rx:
    rx = dul.__dict__.get("_ct_rx")
    if rx is None:
        rx = dul.__dict__["_ct_rx"] = _Rx()
    return rx


def _limits(dul: DULServiceProvider) -> dict:
    return getattr(dul.assoc, "ct_limits", None) or _DEFAULTS


def _local_max_pdu(dul: DULServiceProvider) -> int:
    assoc = dul.assoc
    local = assoc.acceptor if assoc.is_acceptor else assoc.requestor
    maximum = local.maximum_length or 0
    return maximum if maximum > 0 else _UNLIMITED_PDU_CAP


def abort_connection(dul: DULServiceProvider, reason: str) -> None:
    """A-ABORT (service provider) to the peer, close, and tell the state machine; one log line."""
    rx = _rx(dul)
    if rx.dead:
        return
    rx.dead = True
    assoc = dul.assoc
    assoc.__dict__["ct_abort_reason"] = reason
    if not assoc.is_established:  # an established one is logged once when it ends (with this reason)
        log.warning("connection from %s aborted: %s", peer_of(assoc), reason)
    sock = dul.socket.socket if dul.socket is not None else None
    if sock is not None:
        try:
            pdu = A_ABORT_RQ()
            pdu.source = 0x02
            pdu.reason_diagnostic = 0x00
            sock.settimeout(1.0)
            sock.sendall(pdu.encode())
        except Exception:
            pass
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
    _release_gate(assoc)
    dul.event_queue.put("Evt17")


def _release_gate(assoc: Association) -> None:
    """Free the admission slot BoundedRequestHandler recorded on ``assoc`` (ct_gate, ct_gate_key)."""
    gate = getattr(assoc, "ct_gate", None)
    if gate is not None:
        gate.release(assoc.__dict__["ct_gate_key"])


def _readable(sock, wait: float) -> bool:
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    try:
        ready, _, _ = select.select([sock], [], [], wait)
    except (OSError, ValueError):
        return True  # let recv report the error
    return bool(ready)


def _closed(dul: DULServiceProvider, message: str | None) -> None:
    rx = _rx(dul)
    rx.dead = True
    if message:
        log.warning("association from %s: %s", peer_of(dul.assoc), message)
    _release_gate(dul.assoc)
    dul.event_queue.put("Evt17")


def p_data_fragments(pdu: bytearray) -> list[tuple[int, memoryview]] | None:
    """(presentation context ID, fragment with its message control header) of each item of a
    whole P-DATA-TF PDU, as views into ``pdu``; None when the items do not fill it exactly."""
    items = []
    view = memoryview(pdu)
    offset, end = 6, len(pdu)
    while offset < end:
        if offset + 5 > end:
            return None
        length, context_id = struct.unpack_from(">LB", pdu, offset)
        if length < 2 or offset + 4 + length > end:
            return None
        items.append((context_id, view[offset + 5:offset + 4 + length]))
        offset += 4 + length
    return items


def _track_message(dul: DULServiceProvider, fragments, rx: _Rx) -> str | None:
    """Update the DIMSE message in progress from the fragments of a P-DATA-TF; a reason to
    abort, or None."""
    limits = _limits(dul)
    now = time.monotonic()
    for data in fragments:
        if not data:
            continue
        control = data[0]
        if rx.message_started is None:
            rx.message_started = now
            rx.message_bytes = 0
        if not control & 0x01:  # data set fragment
            rx.message_bytes += len(data) - 1
            if rx.message_bytes > limits["max_instance_bytes"]:
                return (f"data set larger than {limits['max_instance_bytes'] // 2**20} MB "
                        f"(CT_TRIAGE_MAX_INSTANCE_MB)")
        if control & 0x02:  # last fragment of a command or data set
            rx.message_started = None
            if not control & 0x01:
                rx.message_bytes = 0
    return None


def _read_pdu_data(self: DULServiceProvider) -> bool:  # noqa: C901 - being edited on another branch; split it there
    """Read what the socket has of the current PDU; True when a whole PDU was handled."""
    rx = _rx(self)
    if rx.dead:
        return False
    sock = self.socket.socket if self.socket is not None else None
    if sock is None:
        return False
    burst_end = time.monotonic() + _READ_BURST_S
    while True:
        if rx.length is None:
            want = 6 - rx.got
        else:
            want = 6 + rx.length - rx.got
            if rx.got == len(rx.buffer):  # grow: at most double what arrived
                grow = min(6 + rx.length, max(_INITIAL_BUFFER, 2 * len(rx.buffer))) - len(rx.buffer)
                rx.buffer.extend(bytes(grow))
            want = min(want, len(rx.buffer) - rx.got)
        try:
            with memoryview(rx.buffer) as view:
                count = _receive(sock, view[rx.got:rx.got + want])
        except (BlockingIOError, ssl.SSLWantReadError, InterruptedError):
            # Nothing more yet: wait briefly inside the PDU, else back to the DUL loop (its timers).
            if time.monotonic() < burst_end and _readable(sock, 0.005):
                continue
            return False
        except TimeoutError:
            abort_connection(self, f"no data for {sock.gettimeout():.0f} s inside a PDU")
            return False
        except (OSError, ValueError) as exc:
            _closed(self, f"connection error: {clean_exception(exc)}" if rx.got else None)
            return False
        if count == 0:
            _closed(self, f"connection closed after {rx.got} bytes of a PDU" if rx.got else None)
            return False
        if rx.got == 0:
            rx.started = time.monotonic()
        rx.got += count
        if rx.length is None and rx.got == 6:
            pdu_type, _, length = struct.unpack(">BBL", rx.buffer)
            if pdu_type not in range(1, 8):
                abort_connection(self, f"unknown PDU type 0x{pdu_type:02X}")
                return False
            cap = _local_max_pdu(self) if pdu_type == 0x04 else _MAX_CONTROL_PDU
            if length > cap:
                abort_connection(self, f"PDU type 0x{pdu_type:02X} declares {length} bytes, over the maximum "
                                       f"of {cap}")
                return False
            rx.length = length
        if rx.length is not None and rx.got == 6 + rx.length:
            data = rx.buffer
            rx.reset()
            return _handle_pdu(self, data, rx)
        if time.monotonic() > burst_end:
            return False


def _receive(sock, view: memoryview) -> int:
    """Bytes read into ``view``; BlockingIOError when none are there.

    A plain socket is read with one ``readv`` on its descriptor (non-blocking, as Python keeps
    every socket with a timeout): ``recv_into`` would first ``poll`` it, and each system call
    lets go of the GIL, a thread switch when other associations wait for it. TLS sockets go
    through ``ssl``.
    """
    if isinstance(sock, ssl.SSLSocket) or sock.gettimeout() is None:
        return sock.recv_into(view, len(view))
    return os.readv(sock.fileno(), [view])


def _handle_pdu(self: DULServiceProvider, data: bytearray, rx: _Rx) -> bool:
    if data[0] == 0x04:
        items = p_data_fragments(data)
        reason = "malformed P-DATA-TF (its items do not fill it)" if items is None else \
            _track_message(self, (fragment for _, fragment in items), rx)
        if reason:
            abort_connection(self, reason)
            return False
        hook = _P_DATA_HOOK[0]
        if hook is not None:
            taken = hook(self, items, abort_connection)
            if taken is not None:
                rx.last_whole = time.monotonic()
                return taken
    try:
        pdu, event = self._decode_pdu(data)
    except Exception as exc:
        abort_connection(self, f"undecodable PDU type 0x{data[0]:02X}: {clean_exception(exc)}")
        return False
    self.event_queue.put(event)
    self._recv_pdu.put(pdu)
    rx.last_whole = time.monotonic()
    return True


def seconds_without_a_whole_pdu(dul: DULServiceProvider) -> float:
    """Seconds since ``dul`` last handled a whole PDU (since it started, if none). pynetdicom's
    idle timer cannot say after an abort: bytes a peer trickles in while the association
    closes restart it."""
    return time.monotonic() - _rx(dul).last_whole


def _deadline_passed(self: DULServiceProvider, rx: _Rx) -> str | None:
    now = time.monotonic()
    if rx.got and self.network_timeout and now - rx.started > self.network_timeout:
        return f"incomplete PDU ({rx.got} bytes) after {self.network_timeout:.0f} s"
    limit = _limits(self)["max_message_s"]
    if rx.message_started is not None and now - rx.message_started > limit:
        return f"DIMSE message not complete after {limit:.0f} s (CT_TRIAGE_MAX_MESSAGE_S)"
    return None


def _is_transport_event(self: DULServiceProvider) -> bool:
    """pynetdicom's check, but True (restart the idle timer) only for a whole PDU.

    When nothing is readable it waits (at most ``_IDLE_WAIT_S``) for the socket or for a
    primitive queued to send (the wake-up fd), instead of pynetdicom's sleep-and-poll.
    """
    rx = _rx(self)
    if rx.dead or self.socket is None:
        time.sleep(0.001)  # until the state machine ends the loop (the loop itself never sleeps)
        return False
    if self.state_machine.current_state == "Sta13":
        if self.socket.socket is not None and _readable(self.socket.socket, 0):
            _read_pdu_data(self)
            return True
        self.socket.close()
        rx.dead = True
        return True
    reason = _deadline_passed(self, rx)
    if reason:
        abort_connection(self, reason)
        return False
    sock = self.socket.socket
    if sock is None or not self.socket._is_connected:
        time.sleep(0.001)
        return False
    if _readable(sock, 0):
        return _read_pdu_data(self)
    if self.to_provider_queue.qsize() or not self.event_queue.empty():
        return False
    wake = self.__dict__.get("_ct_wake")
    try:
        ready, _, _ = select.select([sock, wake] if wake is not None else [sock], [], [], _IDLE_WAIT_S)
    except (OSError, ValueError):
        return False
    if wake is not None and wake in ready:
        with contextlib.suppress(OSError):
            os.eventfd_read(wake)
    if sock in ready:
        return _read_pdu_data(self)
    return False


def _send_pdu(self: DULServiceProvider, primitive) -> None:
    _ORIGINAL["send_pdu"](self, primitive)
    with self.__dict__.get("_ct_wake_lock") or _NO_LOCK:
        wake = self.__dict__.get("_ct_wake")
        if wake is not None:
            with contextlib.suppress(OSError):
                os.eventfd_write(wake, 1)


def _dul_init(self: DULServiceProvider, assoc) -> None:
    _ORIGINAL["__init__"](self, assoc)
    # our state on pynetdicom's object, in its __dict__ like _ct_rx (not attributes DULServiceProvider declares)
    wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    self.__dict__.update(_ct_wake_lock=threading.Lock(), _ct_wake=wake,
                         _ct_wake_final=weakref.finalize(self, os.close, wake))


def _dul_run_reactor(self: DULServiceProvider) -> None:
    try:
        _ORIGINAL["run_reactor"](self)
    finally:
        on_end = _P_DATA_HOOK[1]
        if on_end is not None:
            on_end(self)
        state = self.__dict__
        with state["_ct_wake_lock"]:
            state["_ct_wake"] = None
            state["_ct_wake_final"]()


def _reactor_get_msg(self, block: bool = False):
    """The acceptor reactor polls with ``get_msg(block=False)`` and a 1 ms sleep; wait on the
    queue instead (at most ``_IDLE_WAIT_S``), so a message is served as soon as it is whole."""
    if block or not self.assoc.is_acceptor:
        return _ORIGINAL["get_msg"](self, block)
    try:
        return self.msg_queue.get(timeout=_IDLE_WAIT_S)
    except queue.Empty:
        return None, None


_installed = False
_ORIGINAL: dict = {}
_NO_LOCK = threading.Lock()
# (take, ended): ``take(dul, fragments, abort)`` is offered each whole P-DATA-TF first (True
# handled, False aborted, None: pynetdicom's); ``ended(dul)`` runs when the DUL stops.
_P_DATA_HOOK: list = [None, None]


class _DulClock:
    """``time`` as pynetdicom's DUL module sees it, without its zero sleeps.

    The DUL loop calls ``time.sleep(_run_loop_delay)`` (0 here) after every pass that found no
    event: a system call that lets go of the GIL about twenty times per received instance.
    Our ``_is_transport_event`` already waits in ``select()`` when there is nothing to do.
    """

    def __getattr__(self, name: str):
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


def install_bounded_receive(p_data_hook: tuple | None = None) -> None:
    """Replace pynetdicom's DUL receive path and its idle polling (process-wide, idempotent);
    ``p_data_hook``: (take, ended) as in ``_P_DATA_HOOK`` (dicom_node.fast_store), or None."""
    global _installed
    _P_DATA_HOOK[:] = list(p_data_hook) if p_data_hook else [None, None]
    if _installed:
        return
    _ORIGINAL.update(send_pdu=DULServiceProvider.send_pdu, __init__=DULServiceProvider.__init__,
                     run_reactor=DULServiceProvider.run_reactor, get_msg=DIMSEServiceProvider.get_msg)
    # Patching pynetdicom's methods is the point here, so mypy's method-assign is silenced
    # line by line; _read_pdu_data returns whether a whole PDU was handled (pynetdicom's returns
    # None; its only callers are in the _is_transport_event replaced here), hence the assignment ignore.
    DULServiceProvider._read_pdu_data = _read_pdu_data  # type: ignore[method-assign, assignment]
    DULServiceProvider._is_transport_event = _is_transport_event  # type: ignore[method-assign]
    DULServiceProvider.send_pdu = _send_pdu  # type: ignore[method-assign]
    DULServiceProvider.__init__ = _dul_init  # type: ignore[method-assign]
    DULServiceProvider.run_reactor = _dul_run_reactor  # type: ignore[method-assign]
    DIMSEServiceProvider.get_msg = _reactor_get_msg  # type: ignore[method-assign]
    pynetdicom_dul.time = _DulClock()  # type: ignore[assignment]
    _installed = True


def tune_association(assoc) -> None:
    dul = getattr(assoc, "dul", None)
    if dul is not None and hasattr(dul, "_run_loop_delay"):
        dul._run_loop_delay = DUL_LOOP_DELAY_S


# -- admission -----------------------------------------------------------------------
class Gate:
    """Counts pending (not yet accepted) sockets per address and accepted associations."""

    def __init__(self, max_associations: int, max_pending_per_address: int, max_pending_total: int):
        self.max_associations = max_associations
        self.max_pending_per_address = max_pending_per_address
        self.max_pending_total = max_pending_total
        self._lock = threading.Lock()
        self._pending: dict[tuple, str] = {}  # key -> address
        self._per_address: dict[str, int] = {}
        self._accepted: set[tuple] = set()

    def open(self, key: tuple) -> str | None:
        """Register a new socket; a reason to refuse it, or None."""
        address = key[0]
        with self._lock:
            if self._per_address.get(address, 0) >= self.max_pending_per_address:
                return (f"{self.max_pending_per_address} connections from this address are already waiting "
                        f"for their association (CT_TRIAGE_MAX_PENDING_PER_ADDRESS)")
            if len(self._pending) >= self.max_pending_total:
                return f"{self.max_pending_total} connections are waiting for their association " \
                       f"(CT_TRIAGE_MAX_PENDING_TOTAL)"
            self._pending[key] = address
            self._per_address[address] = self._per_address.get(address, 0) + 1
        return None

    def _drop_pending(self, key: tuple) -> None:
        address = self._pending.pop(key, None)
        if address is not None:
            left = self._per_address.get(address, 1) - 1
            if left:
                self._per_address[address] = left
            else:
                self._per_address.pop(address, None)

    def admit(self, key: tuple) -> bool:
        """Move a pending socket to the accepted associations; False when the cap is reached."""
        with self._lock:
            if key in self._accepted:
                return True
            if len(self._accepted) >= self.max_associations:
                return False
            self._drop_pending(key)
            self._accepted.add(key)
            return True

    def release(self, key: tuple) -> None:
        with self._lock:
            self._drop_pending(key)
            self._accepted.discard(key)

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return len(self._pending), len(self._accepted)


class BoundedRequestHandler(RequestHandler):
    """One connection: TLS handshake (bounded), then the association, then release the slot."""

    server: BoundedAssociationServer

    def handle(self) -> None:
        server = self.server
        key = tuple(self.client_address[:2])
        try:
            sock = self.request
            sock.settimeout(server.handshake_timeout)
            if server.proxies and server.proxies.trusts(key[0]):
                # Behind a load balancer (dicom_node.proxy): the client it names is the peer from here on.
                client = proxy.client_address(sock, key, server.handshake_timeout)
                if client is None:
                    _close_quietly(sock)
                    return
                reason = server.gate.open(tuple(client[:2]))
                if reason is not None:
                    log.warning("connection from %s:%s refused: %s", client[0], client[1], reason)
                    _close_quietly(sock)
                    return
                self.client_address = client
                key = tuple(client[:2])
            if server.tls_context is not None:
                try:
                    sock = server.tls_context.wrap_socket(sock, server_side=True)
                except (OSError, ssl.SSLError, ValueError) as exc:
                    log.warning("connection from %s:%s refused: TLS handshake failed: %s", key[0], key[1],
                                clean_exception(exc))
                    _close_quietly(self.request)
                    return
                self.request = sock
            sock.settimeout(server.socket_timeout)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            assoc = self._create_association()
            # read back by _release_gate, _limits and dicom_node.server.handle_requested
            assoc.__dict__.update(ct_gate=server.gate, ct_gate_key=key, ct_limits=server.limits)
            evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
            assoc.start()
            assoc.join()
        except Exception as exc:
            log.warning("connection from %s:%s failed: %s", key[0], key[1], clean_exception(exc))
        finally:
            server.gate.release(key)


def _close_quietly(sock) -> None:
    with contextlib.suppress(OSError):
        sock.close()


class BoundedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with admission control and the TLS handshake off the accept loop."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, ae, address, ae_title, contexts, ssl_context=None, evt_handlers=None, *,
                 gate: Gate, handshake_timeout: float, socket_timeout: float, limits: dict,
                 proxies: proxy.TrustedProxies | None = None):
        self.gate = gate
        self.proxies = proxies  # load balancers whose connections start with a PROXY v2 header
        self.tls_context = ssl_context
        self.handshake_timeout = handshake_timeout
        self.socket_timeout = socket_timeout
        self.limits = limits
        # pynetdicom must not wrap sockets itself (it would handshake in the accept loop).
        super().__init__(ae, address, ae_title, contexts, None, evt_handlers, request_handler=BoundedRequestHandler)

    def get_request(self):
        client_socket, address = self.socket.accept()
        return client_socket, address

    def verify_request(self, request, client_address) -> bool:
        key = tuple(client_address[:2])
        if self.proxies and self.proxies.trusts(key[0]):
            return True  # counted under the client's address once its PROXY v2 header is read
        reason = self.gate.open(key)
        if reason is None:
            return True
        log.warning("connection from %s:%s refused: %s", key[0], key[1], reason)
        return False

    def handle_error(self, request, client_address) -> None:
        log.warning("connection from %s failed in the server", clean(client_address))
