"""A surviving node indexes what a dead node acknowledged and had not indexed.

What
    The node holding the ``orphans`` lease (dicom_node.leases; PostgreSQL only) looks every
    :data:`INTERVAL_S` (1 s) for ``nodes`` rows not yet recovered whose process is gone: a
    clean stop (``stopped_at``), or a node lock it can take (the dead node's database
    session is gone: at once for a killed process, about 10 s for a vanished host). For
    each, it reads the dead node's journal (dicom_node.journal), keeps the paths without an
    instance row whose file is there, reads each file as the start-up scan does (a file
    that fails the receive checks goes to the quarantine: it was never acknowledged),
    indexes them through its own indexer as *recovered* records (already indexed means
    indexed by its receiver, never counted as a duplicate), waits for the commit, removes
    the journal and marks the row recovered. One WARNING line per dead node says how many.

How fast
    Killed process on a live host: its node lock is free at once, the survivor looks within
    1 s (its lease checks every 1 s too), so its instances are indexed within a few
    seconds. Vanished host: about 10 s more (the server's keepalive, dicom_node.leases).

What it does not do
    Scan the storage. Files from before journals existed, or left by a node whose journal
    was lost, are indexed by the start-up scan of the next node that starts alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from ct_triage.polling import Poller
from ct_triage.text import clean
from db import nodes
from db.repository import InstanceRecord
from db.session import session_scope
from dicom_node import journal
from dicom_node.leases import LeaseHolder
from dicom_node.metadata import RejectedInstance, read_spooled_file
from dicom_node.spool import Spool

log = logging.getLogger("ct_triage.node.orphans")

INTERVAL_S = 1.0


class OrphanRecovery(Poller):
    thread_name = "orphans"
    logger = log
    failed = "orphan recovery failed"
    db_failed = "orphan recovery failed (database)"
    join_timeout_s = 10.0

    def __init__(self, session_factory: sessionmaker[Session], spool: Spool, holder: LeaseHolder, *,
                 own_row: Callable[[], int | None], submit: Callable[[InstanceRecord], None],
                 flush: Callable[[float], bool], max_instance_bytes: int, interval_s: float = INTERVAL_S):
        super().__init__(self.recover_dead, interval_s)
        self.session_factory = session_factory
        self.spool = spool
        self.holder = holder
        self.own_row = own_row
        self.submit = submit
        self.flush = flush
        self.max_instance_bytes = max_instance_bytes

    def recover_dead(self) -> int:
        """One round; returns how many instances it indexed."""
        with session_scope(self.session_factory) as session:
            candidates = [(row.id, row.node_id, row.host, row.pid, row.stopped_at is not None)
                          for row in nodes.unrecovered(session, exclude=self.own_row())]
        indexed = 0
        for row_id, node_id, host, pid, stopped in candidates:
            if not stopped and not self.holder.confirm_dead(row_id):
                continue
            indexed += self.recover(row_id, f"node {clean(node_id, 64)} (pid {pid} on {clean(host, 64)})", stopped)
        return indexed

    def recover(self, row_id: int, who: str, stopped: bool) -> int:
        segments = journal.segments(self.spool.root, row_id)
        paths = journal.read_paths(segments)
        with session_scope(self.session_factory) as session:
            known = nodes.indexed_among(session, paths)
        records = [record for record in (self._read(p) for p in paths if p not in known) if record is not None]
        for record in records:
            self.submit(record)
        if records and not self.flush(120):
            raise RuntimeError(f"indexing what {who} left did not finish; retried at the next round")
        with session_scope(self.session_factory) as session:
            if not stopped:
                nodes.stopped(session, row_id)
            nodes.mark_recovered(session, row_id)
        for segment in segments:
            segment.unlink(missing_ok=True)
        if records:
            log.warning("indexed %d instance(s) that %s acknowledged and had not indexed before it %s", len(records),
                        who, "stopped" if stopped else "died")
        elif not stopped:
            log.info("%s is gone; nothing it acknowledged was left unindexed", who)
        return len(records)

    def _read(self, relpath: str) -> InstanceRecord | None:
        path: Path = self.spool.root / relpath
        if not path.is_file():
            return None  # removed since (retention), or never linked
        try:
            record = read_spooled_file(path, max_bytes=self.max_instance_bytes, scratch_dir=self.spool.tmp_dir)
            if Path(record.path).name != path.name:
                raise RejectedInstance("file name does not match its SOP Instance UID", 0xC211)
        except RejectedInstance as rejected:
            log.warning("journaled file %s not indexed (moved to quarantine): %s", relpath, clean(rejected.reason))
            self.spool.quarantine(path, f"orphan-{path.stem}")
            self.spool.remove(relpath)
            return None
        record.path = relpath
        record.recovered = True
        return record
