"""Graceful stop of the node (SIGTERM): what a PACS admin expects of a restart.

1. Stop accepting: the listening sockets close, new associations are refused by the OS.
2. Open associations get ``grace_s`` (``CT_TRIAGE_SHUTDOWN_GRACE_S``, 8 s) to finish
   and release on their own.
3. Then each one still open is aborted, but only between C-STOREs: we wait (at most
   ``STORE_FINISH_S``, 1.5 s) for a C-STORE being handled to be answered first, so no
   instance is half-acknowledged. The scanner resends what it had not been answered.
4. Storage commitment reports in flight get what is left of the grace.

With the default grace a ``docker stop`` (SIGTERM, then SIGKILL after 10 s) never
needs its SIGKILL: 8 s + 1.5 s + thread joins.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager

log = logging.getLogger("ct_triage.node.shutdown")

STORE_FINISH_S = 1.5


class InFlight:
    """C-STOREs being handled, per association (``id(assoc)``).

    When a C-STORE has been handled, the association's network (idle) timer restarts:
    pynetdicom counts the time the peer waits for our response as the peer's silence, so
    a store that waited long for the database (SQLite's write lock under 8 concurrent
    senders: up to its 60 s busy timeout) got its association aborted right after it was
    answered. The network timeout is about a silent peer, not about us.
    """

    def __init__(self) -> None:
        self._counts: dict[int, int] = {}
        self._cond = threading.Condition()

    @contextmanager
    def track(self, assoc):
        key = id(assoc)
        with self._cond:
            self._counts[key] = self._counts.get(key, 0) + 1
        try:
            yield
        finally:
            timer = getattr(getattr(assoc, "dul", None), "_idle_timer", None)
            if timer is not None:
                timer.restart()
            with self._cond:
                self._counts[key] -= 1
                if not self._counts[key]:
                    del self._counts[key]
                self._cond.notify_all()

    def total(self) -> int:
        with self._cond:
            return sum(self._counts.values())

    def wait_idle(self, assoc, timeout: float) -> bool:
        key = id(assoc)
        with self._cond:
            return self._cond.wait_for(lambda: key not in self._counts, timeout)


def drain(servers: list, in_flight: InFlight, grace_s: float) -> int:
    """Steps 1-3 above for pynetdicom servers; returns how many associations were aborted."""
    started = time.monotonic()
    for server in servers:
        server.shutdown()  # closes the listening socket; running associations go on
    open_assocs = [a for server in servers for a in server.active_associations]
    if open_assocs:
        log.info("stopping: no new associations; waiting up to %.0f s for %d open association(s)", grace_s,
                 len(open_assocs))
    deadline = started + grace_s
    while time.monotonic() < deadline:
        open_assocs = [a for a in open_assocs if a.is_alive() and not (a.is_released or a.is_aborted)]
        if not open_assocs:
            return 0
        time.sleep(0.05)
    aborted = 0
    for assoc in open_assocs:
        if not in_flight.wait_idle(assoc, STORE_FINISH_S):
            log.warning("stopping: a C-STORE from %s did not finish in %.1f s", assoc.requestor.ae_title,
                        STORE_FINISH_S)
        if assoc.is_established:
            log.warning("stopping: aborting the association from %s at %s after the %.0f s grace (the scanner "
                        "resends what was not acknowledged)", assoc.requestor.ae_title, assoc.requestor.address,
                        grace_s)
            assoc.abort()
            aborted += 1
    return aborted
