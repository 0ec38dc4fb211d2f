"""The node processes sharing one database: registration, heartbeat, who is alive.

What
    At start each node process inserts its ``nodes`` row (``CT_TRIAGE_NODE_ID``, empty: the
    host name; host; pid) and from then on beats every :data:`HEARTBEAT_S` (2 s), with the
    studies it is receiving or has not indexed yet (``busy_json``, written at once when that
    set changes, looked at every 0.5 s). At a clean stop it marks the row stopped.

    Alive: on PostgreSQL, a node is alive while its node lock is held (dicom_node.leases:
    its database session exists); a row whose heartbeat is older than :data:`DEAD_AFTER_S`
    (10 s) is not believed busy. On SQLite, a row on the same node id whose pid no longer
    runs is dead at once, else a heartbeat older than 10 s.

Refusals (one line naming the setting; the node does not start)
    - SQLite and another live node on the same database: several processes or hosts need
      PostgreSQL (``CT_TRIAGE_DATABASE_URL``).
    - A live node with our node id whose pid does not run on this host: another host was
      given the same ``CT_TRIAGE_NODE_ID`` (or host name).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy.orm import Session, sessionmaker

from ct_triage.errors import ConfigError
from ct_triage.polling import Poller
from db import nodes
from db.session import session_scope
from db.types import utcnow
from dicom_node.leases import LeaseHolder

log = logging.getLogger("ct_triage.node.nodes")

HEARTBEAT_S = 2.0
DEAD_AFTER_S = 10.0
LOOK_S = 0.5
MAINTAIN_S = 10.0


def pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class NodeRegistry(Poller):
    """This process's ``nodes`` row: registered by :meth:`register`, kept by a daemon thread."""

    thread_name = "node-heartbeat"
    logger = log
    failed = "node heartbeat failed"
    db_failed = "node heartbeat failed (database)"
    join_timeout_s = 5.0

    def __init__(self, session_factory: sessionmaker[Session], holder: LeaseHolder, node_id: str,
                 busy: Callable[[], frozenset[str]] = frozenset):
        super().__init__(self.beat, LOOK_S)
        self.session_factory = session_factory
        self.holder = holder
        self.host = socket.gethostname()
        self.node_id = node_id or self.host
        self.pid = os.getpid()
        self.busy = busy
        self.row_id: int | None = None
        self._published: frozenset[str] | None = None
        self._beat_at = 0.0
        self._maintained = time.monotonic()
        # Called every MAINTAIN_S from the heartbeat thread (journal rotation and pruning).
        self.maintain: Callable[[], None] = lambda: None

    def register(self) -> int:
        """Check for conflicts (ConfigError), then insert our row."""
        self._check_others()
        if self.holder.postgres:
            self.row_id = self.holder.register(self.node_id, self.host, self.pid)
        else:
            with session_scope(self.session_factory) as session:
                self.row_id = nodes.register(session, self.node_id, self.host, self.pid)
        self.holder.on_registered_again = self._registered_again
        log.info("node %s (pid %d on %s) registered as nodes row %d", self.node_id, self.pid, self.host, self.row_id)
        return self.row_id

    def _registered_again(self, row_id: int) -> None:
        self.row_id = row_id
        self._published = None

    def _check_others(self) -> None:
        now = utcnow()
        with session_scope(self.session_factory) as session:
            others = [(row.id, row.node_id, row.host, row.pid, row.heartbeat_at, row.stopped_at)
                      for row in nodes.unrecovered(session)]
        for row_id, node_id, host, pid, heartbeat_at, stopped_at in others:
            if stopped_at is not None:
                continue
            if self.holder.postgres:
                alive = not self.holder.confirm_dead(row_id)
            elif node_id == self.node_id and host == self.host:
                alive = pid_running(pid) and pid != self.pid
            else:
                alive = heartbeat_at >= now - timedelta(seconds=DEAD_AFTER_S)
            if not alive:
                if not self.holder.postgres:  # the start-up scan of the storage indexes what it left
                    with session_scope(self.session_factory) as session:
                        nodes.stopped(session, row_id)
                        nodes.mark_recovered(session, row_id)
                continue
            if not self.holder.postgres:
                raise ConfigError(
                    f"another node process uses this SQLite database (node {node_id}, pid {pid} on {host}, last "
                    f"heartbeat {heartbeat_at:%H:%M:%S} UTC): several node processes or hosts need PostgreSQL: "
                    f"set CT_TRIAGE_DATABASE_URL=postgresql+psycopg://... on every node")
            if node_id == self.node_id and (host != self.host or not pid_running(pid)):
                raise ConfigError(
                    f"node id {node_id!r} is already used by a live node (pid {pid} on {host}): give each host its "
                    f"own CT_TRIAGE_NODE_ID (they share CT_TRIAGE_DATABASE_URL and the storage)")

    def beat(self) -> None:
        if self.row_id is None:
            return
        busy = frozenset(self.busy())
        due = time.monotonic() - self._beat_at >= HEARTBEAT_S
        if busy != self._published or due:
            with session_scope(self.session_factory) as session:
                row = nodes.heartbeat(session, self.row_id, busy if busy != self._published else None)
                recovered = row is not None and row.recovered_at is not None
            self._published = busy
            self._beat_at = time.monotonic()
            if recovered and not self.holder.postgres:
                log.error("this node's row %d was marked dead by another node", self.row_id)
        if time.monotonic() - self._maintained >= MAINTAIN_S:
            self._maintained = time.monotonic()
            self.maintain()

    def busy_elsewhere(self) -> frozenset[str]:
        """Studies other live nodes are receiving or indexing (empty on SQLite: there are none)."""
        if not self.holder.postgres:
            return frozenset()
        with session_scope(self.session_factory) as session:
            return nodes.busy_elsewhere(session, self.row_id, DEAD_AFTER_S)

    def stopped(self) -> None:
        self.stop()
        if self.row_id is None:
            return
        try:
            with session_scope(self.session_factory) as session:
                nodes.stopped(session, self.row_id)
                if not self.holder.postgres:  # one node: its own next start scans the storage
                    nodes.mark_recovered(session, self.row_id)
        except Exception as exc:  # the database is gone: our row ages out (or our lock is released)
            log.warning("could not mark this node stopped: %s", type(exc).__name__)
