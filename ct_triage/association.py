"""Requests we send as an association requestor: one workaround for pynetdicom 3.0.

pynetdicom pauses an association's reactor thread while a ``send_*`` call waits for
its response; the pause has a race (see :func:`pause_reactor`) that lets the reactor
take the response for itself, so the sender waits the whole DIMSE timeout and the
association is aborted. Every SCU loop of ours (C-STORE delivery, C-FIND/C-MOVE of
priors, N-EVENT-REPORT to UPS subscribers) calls :func:`pause_reactor` before each
request. Thread-only; imports nothing of ours, so the node and the worker may use it.
"""

from __future__ import annotations

import time

# How long pause_reactor waits for the association's reactor to stop (it loops every ms).
REACTOR_PAUSE_TIMEOUT_S = 5.0


def pause_reactor(assoc) -> None:
    """Hold the association's reactor in its checkpoint before a request (pynetdicom 3.0 race).

    pynetdicom pauses its reactor thread for a send_* call by clearing an Event and
    waiting for the flag ``_is_paused``, but the reactor sets that flag just *before*
    ``Event.wait()``: when the reactor has passed the wait (Event still set) and not yet
    reset the flag, the sender proceeds and the reactor takes the C-STORE response off
    the queue ("Received unexpected C-STORE service message"); the sender then waits
    the whole DIMSE timeout and the association is aborted. Seen on this 2-core machine
    under load (bench/pipeline_bench.py: 137 of 258 instances of a delivery failed after
    a 60 s wait). Here the Event is cleared and we wait until the reactor thread is
    actually blocked in ``Event.wait()`` (a waiter on its Condition), so the response is
    left to the sender; pynetdicom's own pause then passes at once. Private attributes:
    when they are not there (another pynetdicom), nothing is done.
    """
    checkpoint = getattr(assoc, "_reactor_checkpoint", None)
    waiters = getattr(getattr(checkpoint, "_cond", None), "_waiters", None)
    if checkpoint is None or waiters is None:
        return
    checkpoint.clear()
    deadline = time.monotonic() + REACTOR_PAUSE_TIMEOUT_S
    while not waiters and assoc.is_alive() and time.monotonic() < deadline:
        time.sleep(0.0002)
