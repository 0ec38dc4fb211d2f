"""The background loops of the node and the embedded worker: a round of work, a wait, again.

What
    :func:`poll_loop` calls ``step`` until ``stop`` is set: after ``first_delay_s`` (0: at
    once), then again ``interval_s`` after each round, or as soon as ``wake`` is set. A
    round that raises is logged and the next round retries, so the loop outlives a bad
    row or a database hiccup: a ``SQLAlchemyError`` as one ERROR line (``db_failed``, then
    the error's first line, at most 300 characters; without ``db_failed`` it is logged
    like any other error), anything else with its traceback (``failed``).
    :class:`Poller` is that loop in one daemon thread, with ``start``, ``wake`` and
    ``stop`` (which wakes the thread and waits at most ``join_timeout_s`` for it); with a
    ``lease`` (an object with ``held()``), a round runs only while the lease is held.

Why here
    The completeness tracker, the UPS event notifier, the retention sweeper
    (``dicom_node``) and the embedded consumer (``worker``) each need exactly this loop;
    written once, their waiting and error handling cannot drift. It sits in the core both
    may import, and imports nothing of ours.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol

from sqlalchemy.exc import SQLAlchemyError


def poll_loop(step: Callable[[], object], *, stop: threading.Event, wake: threading.Event, interval_s: float,
              logger: logging.Logger, failed: str, db_failed: str | None = None, first_delay_s: float = 0.0) -> None:
    """Run ``step`` until ``stop`` is set (see the module docstring)."""
    if first_delay_s > 0:
        wake.wait(first_delay_s)
        wake.clear()
    while not stop.is_set():
        try:
            step()
        except SQLAlchemyError as exc:
            if db_failed is None:
                logger.exception(failed)
            else:
                logger.error("%s: %s", db_failed, str(exc).splitlines()[0][:300])
        except Exception:  # keep the loop alive whatever happens; the next round retries
            logger.exception(failed)
        wake.wait(interval_s)
        wake.clear()


class Held(Protocol):
    def held(self) -> bool: ...


class Poller:
    """``step`` in a daemon thread by :func:`poll_loop`; subclasses name the thread, the
    logger and the messages."""

    thread_name = "poller"
    logger = logging.getLogger("ct_triage")
    failed = "poll failed"
    db_failed: str | None = None
    join_timeout_s = 10.0

    def __init__(self, step: Callable[[], object], interval_s: float, first_delay_s: float = 0.0):
        self._step = step
        # Several node processes sharing one database: a duty done once takes a lease
        # (anything with ``held()``, dicom_node.leases); a round runs only while it is held.
        self.lease: Held | None = None
        self.interval_s = interval_s
        self.first_delay_s = first_delay_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=self.join_timeout_s)

    def wake(self) -> None:
        self._wake.set()

    def _leased_step(self) -> object:
        if self.lease is not None and not self.lease.held():
            return None
        return self._step()

    def _run(self) -> None:
        poll_loop(self._leased_step, stop=self._stop, wake=self._wake, interval_s=self.interval_s, logger=self.logger,
                  failed=self.failed, db_failed=self.db_failed, first_delay_s=self.first_delay_s)
