"""Requests we send as an association requestor: one workaround for pynetdicom 3.0.

pynetdicom pauses an association's reactor thread while a ``send_*`` call waits for
its response; the pause has a race (see :func:`reactor_paused`) that lets the reactor
take the response for itself, so the sender waits the whole DIMSE timeout and the
association is aborted. Every SCU loop of ours (C-STORE delivery, C-FIND/C-MOVE of
priors, N-EVENT-REPORT to UPS subscribers and of storage commitment) sends each request
inside :func:`reactor_paused`. Thread-only; imports nothing of ours, so the node and the
worker may use it.

The checks every requestor of ours shares live here too: :func:`check_ae_title` (an
argument naming an AE title), :func:`classify_rejection` (A-ASSOCIATE-RJ, PS3.8 9.3.4:
retry or not) and :func:`connect_failure` (why a TCP/TLS connect failed, probed once).
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

Outcome = Literal["delivered", "transient", "permanent"]

# How long reactor_paused waits for the association's reactor to stop (it loops every ms).
REACTOR_PAUSE_TIMEOUT_S = 5.0


@contextmanager
def reactor_paused(assoc) -> Iterator[None]:
    """Send one request inside this: the association's reactor is held in its checkpoint
    until the request is done (pynetdicom 3.0 race).

    pynetdicom pauses its reactor thread for a send_* call by clearing an Event and
    waiting for the flag ``_is_paused``, but the reactor sets that flag just *before*
    ``Event.wait()``: when the reactor has passed the wait (Event still set) and not yet
    reset the flag, the sender proceeds and the reactor takes the response off the
    queue ("Received unexpected C-STORE service message"); the sender then waits the
    whole DIMSE timeout and the association is aborted. Seen on this 2-core machine
    under load (bench/pipeline_bench.py: 137 of 258 instances of a delivery failed after
    a 60 s wait). Here the Event is cleared and we wait until the reactor thread is
    actually blocked in ``Event.wait()`` (a waiter on its Condition), so the response is
    left to the sender; pynetdicom's own pause then passes at once. On the way out the
    Event is set again, also when the send raised before pynetdicom's own pause (no
    presentation context): a reactor left parked would miss the peer's release or abort.
    Private attributes: when they are not there (another pynetdicom), nothing is done;
    nor when called from the reactor thread itself (an event handler).
    """
    checkpoint = getattr(assoc, "_reactor_checkpoint", None)
    waiters = getattr(getattr(checkpoint, "_cond", None), "_waiters", None)
    if checkpoint is None or waiters is None or threading.current_thread() is assoc:
        yield
        return
    checkpoint.clear()
    deadline = time.monotonic() + REACTOR_PAUSE_TIMEOUT_S
    while not waiters and assoc.is_alive() and time.monotonic() < deadline:
        time.sleep(0.0002)
    try:
        yield
    finally:
        checkpoint.set()


def classify_rejection(result: int, source: int, diagnostic: int) -> Outcome:
    """Outcome of an A-ASSOCIATE-RJ (PS3.8 9.3.4)."""
    if source == 0x01 and diagnostic in (0x03, 0x07):
        return "permanent"  # calling / called AE title not recognized: configuration
    if source == 0x03:
        return "transient"  # presentation layer: temporary congestion, local limit exceeded
    return "transient" if result == 0x02 else "permanent"


def check_ae_title(value, name: str) -> str:
    """``value`` stripped, when it is a valid AE title (1..16 printable ASCII, no backslash);
    else TypeError/ValueError naming the argument ``name``."""
    if not isinstance(value, str):
        raise TypeError(f"argument '{name}' must be a str, got {type(value).__name__}")
    text = value.strip()
    if not 1 <= len(text) <= 16 or "\\" in text or not all(32 <= ord(c) < 127 for c in text):
        raise ValueError(f"argument '{name}' must be 1..16 printable ASCII characters without '\\', got {value!r}")
    return text


def peer_tls_context(marked_tls: bool, configured: ssl.SSLContext | None) -> ssl.SSLContext | None:
    """The client context for a peer the configuration marks ``+tls`` (UPS subscribers,
    storage commitment peers): the configured one, else the system default, which verifies
    the peer's certificate against the system's CAs; None (plain TCP) for an unmarked peer.
    ``worker.delivery.scu`` differs on purpose: there a given context forces TLS."""
    if not marked_tls:
        return None
    return configured or ssl.create_default_context(ssl.Purpose.SERVER_AUTH)


def connect_failure(host: str, port: int, tls: ssl.SSLContext | None, timeout: float) -> tuple[Outcome, str]:
    """Why the TCP (or TLS) connection failed: probe once to get the OS/TLS error."""
    where = f"{host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except TimeoutError:
        return "transient", f"cannot connect to {where}: connect timed out"
    except OSError as exc:
        return "transient", f"cannot connect to {where}: {exc.strerror or exc}"
    try:
        if tls is not None:
            try:
                with tls.wrap_socket(sock, server_hostname=host):
                    pass
            except ssl.SSLCertVerificationError as exc:
                return "permanent", f"TLS certificate of {where} rejected: {exc.verify_message or exc}"
            except (ssl.SSLError, OSError) as exc:
                return "transient", f"TLS handshake with {where} failed: {exc}"
        return "transient", f"connection to {where} failed while opening the association (it accepts TCP now)"
    finally:
        sock.close()
