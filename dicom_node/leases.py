"""Leases: each background duty of the node runs in one process across every host.

What
    Several node processes (one host or several) share one PostgreSQL database and one
    storage folder. Everything a node does besides receiving is a *duty*; the ones that
    must run in one process at a time take a lease first, and their loop
    (:class:`ct_triage.polling.Poller`) runs a round only while its lease is held
    (:meth:`Lease.held`). A lease is a PostgreSQL session-level advisory lock
    (``pg_try_advisory_lock``) taken on one dedicated connection per process, the
    :class:`LeaseHolder`'s: a process that dies loses its connection, so the server
    releases its locks, and another process's holder takes them at its next look
    (every :data:`CHECK_S`). Nothing is elected by hand: PostgreSQL is the arbiter.

    The same connection holds the *node lock* of the process's ``nodes`` row
    (:mod:`dicom_node.nodes`): it is taken in the transaction that inserts the row, so a
    row is never visible without its lock. Another process that can take a node's lock
    knows that node's database session is gone (:meth:`LeaseHolder.confirm_dead`).

    With SQLite (one process by definition, :mod:`dicom_node.nodes` refuses a second)
    every lease is always held and nothing runs in the background here.

Timing
    A holder verifies its connection every :data:`CHECK_S` (1 s) and believes its leases
    for :data:`VALID_S` (5 s) after the last good check, so a process cut from the
    database stops its duties within 5 s. The connection asks the server to notice a
    dead peer within about 10 s (``tcp_keepalives_*`` 5 + 2 x 3 s, ``tcp_user_timeout``
    10 s), so the server frees a vanished host's leases only after that host stopped
    believing in them. A killed process on a live host loses its locks at once (its
    socket is closed by the kernel); its duties move within ``CHECK_S``.

Duties (the decision for each, and why)
    ``completeness``  leased. The tracker settles series, creates jobs and publishes.
        Job creation is safe twice (a job per study version is looked up first, in the
        same transaction), but two trackers would publish the same jobs twice and each
        would see only its own open associations; the leaseholder reads the busy studies
        of every live node from the ``nodes`` table instead (:mod:`dicom_node.nodes`).
    ``retention``  leased: two sweepers would unlink the same files and mark the same
        rows; harmless but twice the I/O on the shared storage.
    ``ups-notifier``  leased, required: events are read without a claim, so two
        notifiers would send each N-EVENT-REPORT twice, and per-subscriber order holds
        only with one sender.
    ``orphans``  leased, required: indexing a dead node's acknowledged files
        (:mod:`dicom_node.orphans`).
    workitem expiry  not leased: each workitem is cancelled under its row lock with its
        state checked again (``db.worklist.expire_due``), so concurrent sweeps cancel it
        once and report it once; the sweep is one indexed query a minute per node.
    audit sender  not leased: rows are claimed one by one with a conditional UPDATE
        (``db.audit.claim_audit``), so two senders never send the same message; every
        node sending spreads the load, and the last round at stop needs no lease.
    storage commitment  not a background duty: the node that gets the N-ACTION answers
        it from the database (waiting for instances another node acknowledged and has
        not indexed yet, :mod:`dicom_node.commitment`) and sends the report itself.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections.abc import Callable

from sqlalchemy import create_engine, insert, select, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from db.models import Node
from db.types import utcnow

log = logging.getLogger("ct_triage.node.leases")

CHECK_S = 1.0
VALID_S = 5.0
DUTY_CLASS = 0x43544C31  # advisory lock key spaces (two int4 keys): duties ...
NODE_CLASS = 0x43544E31  # ... and one per nodes row

COMPLETENESS, RETENTION, UPS_NOTIFIER, ORPHANS = "completeness", "retention", "ups-notifier", "orphans"

_SERVER_KEEPALIVE = ("SET tcp_keepalives_idle = 5", "SET tcp_keepalives_interval = 2",
                     "SET tcp_keepalives_count = 3", "SET tcp_user_timeout = 10000", "SET statement_timeout = 5000")


def duty_key(name: str) -> int:
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


class Lease:
    """One duty's lease: :meth:`held` is True while this process may run the duty."""

    def __init__(self, holder: LeaseHolder, name: str):
        self.holder = holder
        self.name = name

    def held(self) -> bool:
        return self.holder.holds(self.name)

    def __repr__(self) -> str:
        return f"Lease({self.name!r}, held={self.held()})"


class LeaseHolder:
    """The leases of one process, on one dedicated PostgreSQL connection (always held on SQLite)."""

    def __init__(self, database_url: str, *, check_s: float = CHECK_S, valid_s: float = VALID_S):
        self.url = database_url
        self.postgres = make_url(database_url).get_backend_name() == "postgresql"
        self.check_s = check_s
        self.valid_s = valid_s
        self._wanted: dict[str, list[Callable[[], None]]] = {}
        self._held: set[str] = set()
        self._verified = 0.0
        self._lock = threading.RLock()  # the connection is used by the holder thread and confirm_dead
        self._engine: Engine | None = None
        self._conn: Connection | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.row_id: int | None = None
        self._node = ("", "", 0)
        # Called with the new row id when this process had to register again (its row was
        # recovered by another node while this one was cut from the database).
        self.on_registered_again: Callable[[int], None] = lambda row_id: None

    # -- the duties ------------------------------------------------------------------------
    def lease(self, name: str, on_acquired: Callable[[], None] | None = None) -> Lease:
        with self._lock:
            self._wanted.setdefault(name, [])
            if on_acquired is not None:
                self._wanted[name].append(on_acquired)
        return Lease(self, name)

    def holds(self, name: str) -> bool:
        if not self.postgres:
            return True
        return name in self._held and time.monotonic() - self._verified < self.valid_s

    def held_names(self) -> list[str]:
        return sorted(name for name in self._wanted if self.holds(name))

    # -- the node's own row ------------------------------------------------------------------
    def register(self, node_id: str, host: str, pid: int) -> int:
        """Insert this process's ``nodes`` row and take its node lock in the same transaction."""
        self._node = (node_id, host, pid)
        with self._lock:
            conn = self._connection()
            self.row_id = self._insert_row(conn)
        return self.row_id

    def _insert_row(self, conn: Connection) -> int:
        node_id, host, pid = self._node
        now = utcnow()
        with conn.begin():
            row_id = int(conn.execute(insert(Node).values(node_id=node_id, host=host, pid=pid, started_at=now,
                                                          heartbeat_at=now, busy_json="[]")
                                      .returning(Node.id)).scalar_one())
            conn.execute(text("SELECT pg_advisory_lock(:c, :o)"), {"c": NODE_CLASS, "o": row_id})
        return row_id

    def confirm_dead(self, row_id: int) -> bool:
        """True when node ``row_id``'s database session is gone (its node lock is free)."""
        if not self.postgres:
            return False
        with self._lock:
            conn = self._connection()
            with conn.begin():
                free = bool(conn.execute(text("SELECT pg_try_advisory_lock(:c, :o)"),
                                         {"c": NODE_CLASS, "o": row_id}).scalar_one())
                if free:
                    conn.execute(text("SELECT pg_advisory_unlock(:c, :o)"), {"c": NODE_CLASS, "o": row_id})
        return free

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        if not self.postgres:
            return
        self._stop.clear()
        self._check()
        self._thread = threading.Thread(target=self._run, name="leases", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Release every lease (close the connection): another process takes them at once."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        with self._lock:
            self._held.clear()
            self._drop()
            if self._engine is not None:
                self._engine.dispose()
                self._engine = None

    def _run(self) -> None:
        while not self._stop.wait(self.check_s):
            self._check()

    def _connection(self) -> Connection:
        if self._conn is None:
            if self._engine is None:
                self._engine = create_engine(self.url, poolclass=NullPool, connect_args={
                    "connect_timeout": 5, "keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2,
                    "keepalives_count": 3, "tcp_user_timeout": 10000})
            conn = self._engine.connect()
            for statement in _SERVER_KEEPALIVE:
                try:
                    with conn.begin():
                        conn.execute(text(statement))
                except SQLAlchemyError:
                    pass
            self._conn = conn
        return self._conn

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.invalidate()
                self._conn.close()
            except Exception:
                pass
            self._conn = None

    def _check(self) -> None:
        acquired: list[str] = []
        with self._lock:
            try:
                fresh = self._conn is None
                conn = self._connection()
                if fresh and self.row_id is not None:
                    self._take_node_lock_again(conn)
                with conn.begin():
                    conn.execute(text("SELECT 1"))
                    for name in self._wanted:
                        if name in self._held:
                            continue
                        if conn.execute(text("SELECT pg_try_advisory_lock(:c, :o)"),
                                        {"c": DUTY_CLASS, "o": duty_key(name)}).scalar_one():
                            self._held.add(name)
                            acquired.append(name)
                self._verified = time.monotonic()
            except SQLAlchemyError as exc:
                if self._held:
                    log.error("leases lost (%s): this node stops %s until the database answers again",
                              str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__,
                              ", ".join(sorted(self._held)))
                self._held.clear()
                self._drop()
                return
            callbacks = [cb for name in acquired for cb in self._wanted.get(name, [])]
        for name in acquired:
            log.info("lease %s taken: this node runs it", name)
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.exception("lease callback failed")

    def _take_node_lock_again(self, conn: Connection) -> None:
        """After a reconnection: our row again, unless a survivor recovered it meanwhile."""
        assert self.row_id is not None
        with conn.begin():
            recovered = conn.execute(select(Node.recovered_at).where(Node.id == self.row_id)).scalar_one_or_none()
            got = conn.execute(text("SELECT pg_try_advisory_lock(:c, :o)"),
                               {"c": NODE_CLASS, "o": self.row_id}).scalar_one()
        if recovered is None and got:
            return
        old = self.row_id
        self.row_id = self._insert_row(conn)
        log.error("this node (nodes row %d) was taken for dead while cut from the database; registered again as "
                  "row %d (instances it acknowledged meanwhile may be counted twice as duplicates)", old, self.row_id)
        self.on_registered_again(self.row_id)
