"""Background indexer: instance rows written in batches (group commit), off the C-STORE path.

Why: a C-STORE answered only after its own database commit pays a commit (an fsync
of the SQLite WAL, or a PostgreSQL round trip and WAL flush) per instance, on the
scanner's clock. Here the durable record of an instance is its fsynced file and
directory entry in the spool (dicom_node.spool); the C-STORE handler answers Success
once those are durable and hands the record to this indexer, which commits whatever
has queued (from every association) in one transaction.

Guarantees (issue 9 item 4):
- no Success before the file and its directory entry are durable (the handler's job);
- at start-up every spooled file without a row is indexed before the node accepts
  associations (:meth:`dicom_node.store.StoreService.index_spooled_orphans`);
- completeness and jobs only see indexed instances (they read rows), and a study with
  records still queued here counts as busy (:meth:`pending_study_uids`).

When a batch fails for the database (down, restarting), its records stay queued and
are retried (0.5 s doubling to 5 s); meanwhile :attr:`healthy` is False and the
handler answers new C-STOREs with 0xA702 instead of acknowledging more than it can
record, unless the database answers a probe (:meth:`available`, at most every 0.5 s),
which also makes the indexer retry at once. A batch is at most 500 records (``MAX_BATCH``); after the first record the
indexer waits up to ``LINGER_S`` (250 ms) for company while records keep coming (it stops once
none has come for ``QUIET_GAP_S``, 20 ms), so the last rows of a send lag their files by about
20 ms and a streaming sender's by at most 250 ms. Why so long:
a batch costs about six statements whatever its size, and the indexer shares the GIL with the
associations it is indexing for. One sender of 300 x 512 KB on PostgreSQL, node CPU seconds for
the whole send (same session, alternated, 3 runs each): 50 ms 1.33-1.53 s, 250 ms 1.19-1.64 s,
500 ms 1.06-1.15 s. Nothing waits on a row within that time but storage commitment and the
completeness tracker, whose own waits are seconds.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable

from sqlalchemy import text
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from ct_triage.text import clean
from db import repository
from db.session import session_scope

log = logging.getLogger("ct_triage.node.indexer")

MAX_BATCH = 500
LINGER_S = 0.25
QUIET_GAP_S = 0.02
RETRY_FIRST_S, RETRY_MAX_S = 0.5, 5.0
# While indexing is paused, a C-STORE asks the database itself (at most this often) instead of
# waiting out the retry delay: a scanner resending right after a restart is not refused for it.
PROBE_INTERVAL_S = 0.5

OutcomeCallback = Callable[[repository.InstanceRecord, repository.StoreOutcome], None]


class Indexer:
    def __init__(self, session_factory: sessionmaker[Session], on_outcome: OutcomeCallback | None = None):
        self.session_factory = session_factory
        self.on_outcome = on_outcome or (lambda record, outcome: None)
        self._queue: collections.deque[repository.InstanceRecord] = collections.deque()
        self._cond = threading.Condition()
        self._pending_studies: collections.Counter[str] = collections.Counter()
        self._in_flight = 0
        self._stop = False
        self._thread: threading.Thread | None = None
        self.healthy = True
        self._retry_now = False
        self._last_probe = 0.0
        self._probe_lock = threading.Lock()
        self.batches = 0
        self.indexed = 0

    # -- producer side -----------------------------------------------------------------
    def submit(self, record: repository.InstanceRecord) -> None:
        with self._cond:
            self._queue.append(record)
            self._pending_studies[record.study_instance_uid] += 1
            self._cond.notify()

    def available(self) -> bool:
        """True when new instances can be indexed: healthy, or the database answers a probe
        now (then the paused indexer retries at once). Probes are serialised and at least
        ``PROBE_INTERVAL_S`` apart; a caller waits for the next one rather than being refused
        on a stale answer, so a C-STORE is delayed at most about that long, not refused."""
        if self.healthy:
            return True
        with self._probe_lock:
            if self.healthy:
                return True
            wait = self._last_probe + PROBE_INTERVAL_S - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            self._last_probe = time.monotonic()
            try:
                with self.session_factory() as session:
                    session.execute(text("SELECT 1"))
            except SQLAlchemyError:
                return False
            self.healthy = True
        with self._cond:
            self._retry_now = True
            self._cond.notify_all()
        return True

    def pending_study_uids(self) -> frozenset[str]:
        with self._cond:
            return frozenset(self._pending_studies)

    def backlog(self) -> int:
        with self._cond:
            return len(self._queue) + self._in_flight

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything submitted so far is committed; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._in_flight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="instance-indexer", daemon=True)
        self._thread.start()

    def stop(self, drain_timeout: float = 10.0) -> None:
        """Commit what is queued (up to ``drain_timeout``), then stop."""
        if self._thread is None:
            return
        if not self.flush(drain_timeout):
            log.warning("indexer stopped with %d record(s) not committed; their files are indexed at "
                        "the next start", self.backlog())
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=5)
        self._thread = None
        log.info("indexer stopped: %d instance(s) indexed in %d batch(es) since start", self.indexed, self.batches)

    # -- consumer side -------------------------------------------------------------------
    def _take(self) -> list[repository.InstanceRecord]:
        with self._cond:
            while not self._queue and not self._stop:
                self._cond.wait(0.5)
            if not self._queue:
                return []
            # Linger for company until the deadline: each submit notifies, and a wait that
            # ended at the next record would make batches of one or two at a scanner's pace.
            # It stops early once nothing has come for QUIET_GAP_S: the sender paused or
            # finished, and the last rows of a send should not wait out the whole linger.
            linger_end = time.monotonic() + LINGER_S
            while len(self._queue) < MAX_BATCH and not self._stop:
                left = linger_end - time.monotonic()
                if left <= 0:
                    break
                waiting = len(self._queue)
                self._cond.wait(min(left, QUIET_GAP_S))
                if len(self._queue) == waiting:
                    break
            batch = [self._queue.popleft() for _ in range(min(MAX_BATCH, len(self._queue)))]
            self._in_flight = len(batch)
            return batch

    def _done(self, batch: list[repository.InstanceRecord]) -> None:
        with self._cond:
            self._in_flight = 0
            for record in batch:
                left = self._pending_studies[record.study_instance_uid] - 1
                if left > 0:
                    self._pending_studies[record.study_instance_uid] = left
                else:
                    self._pending_studies.pop(record.study_instance_uid, None)
            self._cond.notify_all()

    def _requeue(self, batch: list[repository.InstanceRecord]) -> None:
        with self._cond:
            self._in_flight = 0
            self._queue.extendleft(reversed(batch))
            self._cond.notify_all()

    def _commit(self, batch: list[repository.InstanceRecord]) -> list[repository.StoreOutcome]:
        try:
            with session_scope(self.session_factory) as session:
                return repository.record_instances(session, batch)
        except IntegrityError:
            # A row created concurrently by another process (PostgreSQL): one at a time, each retried.
            outcomes = []
            for record in batch:
                for attempt in range(3):
                    try:
                        with session_scope(self.session_factory) as session:
                            outcomes.append(repository.record_instance(session, record))
                        break
                    except IntegrityError:
                        if attempt == 2:
                            raise
            return outcomes

    def _run(self) -> None:  # noqa: C901 - being edited on another branch; split it there
        delay = RETRY_FIRST_S
        while True:
            batch = self._take()
            if not batch:
                if self._stop:
                    return
                continue
            outcomes: list[repository.StoreOutcome | None]
            try:
                outcomes = list(self._commit(batch))
            except SQLAlchemyError as exc:
                if self.healthy:
                    log.error("database unavailable while indexing %d instance(s); new C-STOREs are refused "
                              "with 0xA702 until it returns: %s", len(batch),
                              clean(str(exc).splitlines()[0] if str(exc) else exc, 300))
                self.healthy = False
                self._requeue(batch)
                if self._stop:
                    return  # the spooled files are indexed at the next start
                with self._cond:
                    self._cond.wait_for(lambda: self._retry_now or self._stop, timeout=delay)
                    self._retry_now = False
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            except Exception:  # a record the repository cannot take: log it, never loop on it
                log.exception("indexing a batch of %d failed; retrying one by one", len(batch))
                outcomes = []
                for record in batch:
                    try:
                        outcomes.extend(self._commit([record]))
                    except Exception:
                        log.exception("could not index %s", record.sop_instance_uid)
                        outcomes.append(None)
            if not self.healthy:
                log.info("database back: indexing resumed")
            self.healthy = True
            delay = RETRY_FIRST_S
            self.batches += 1
            self.indexed += len(batch)
            self._done(batch)
            for record, outcome in zip(batch, outcomes):
                if outcome is None:
                    continue
                try:
                    self.on_outcome(record, outcome)
                except Exception:
                    log.exception("outcome callback failed")
