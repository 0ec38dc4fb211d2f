"""Several node processes and hosts on one database and storage: the wiring of one node.

:class:`Cluster` gives a :class:`dicom_node.server.DicomNode` its ``nodes`` row and heartbeat
(dicom_node.nodes), the leases of its background duties (dicom_node.leases, where the
decision for each duty is written down), the journal of what it acknowledges
(dicom_node.journal) and the recovery of what dead nodes left (dicom_node.orphans). With
SQLite it only registers the node, so that a second node on the same file is refused.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from ct_triage.polling import Poller
from db import nodes as node_rows
from db.session import session_scope
from dicom_node import journal, leases
from dicom_node.journal import Journal
from dicom_node.leases import LeaseHolder
from dicom_node.nodes import NodeRegistry
from dicom_node.orphans import OrphanRecovery
from dicom_node.uids import instance_relpath, is_valid_uid

log = logging.getLogger("ct_triage.node.cluster")


class Cluster:
    def __init__(self, node: Any, session_factory: sessionmaker[Session]):
        """``node``: the :class:`dicom_node.server.DicomNode` being built (not imported here: a cycle)."""
        settings = node.settings
        self.node = node
        self.session_factory = session_factory
        self.holder = LeaseHolder(settings.effective_database_url)
        store = node.store
        self.registry = NodeRegistry(session_factory, self.holder, settings.node_id,
                                     busy=store.busy_or_pending_study_uids)
        self.orphans = OrphanRecovery(session_factory, node.spool, self.holder, own_row=lambda: self.registry.row_id,
                                      submit=store.indexer.submit, flush=lambda timeout: store.indexer.flush(timeout),
                                      max_instance_bytes=settings.max_instance_mb * 2**20)
        duties: list[tuple[Poller | None, str]] = [
            (node.tracker, leases.COMPLETENESS), (node.retention, leases.RETENTION),
            (node.ups.notifier, leases.UPS_NOTIFIER), (self.orphans, leases.ORPHANS)]
        for poller, name in duties:
            if poller is not None:
                poller.lease = self.holder.lease(name, on_acquired=poller.wake)
        local_busy = node.tracker.busy_study_uids
        node.tracker.busy_study_uids = lambda: local_busy() | self.registry.busy_elsewhere()
        node.commitment.on_disk = self._on_disk
        self.others_alive = False
        self.journal: Journal | None = None

    @property
    def several(self) -> bool:
        """True on PostgreSQL: other node processes may share the database and the storage."""
        return self.holder.postgres

    def register(self) -> None:
        """First thing at start: refuses (ConfigError) a second node on SQLite or a node id in use."""
        self.registry.register()
        if self.holder.postgres:
            with session_scope(self.session_factory) as session:
                self.others_alive = any(row.stopped_at is None and not self.holder.confirm_dead(row.id)
                                        for row in node_rows.unrecovered(session, exclude=self.registry.row_id))
            self.journal = Journal(self.node.spool.root, self.registry.row_id or 0)
            self.node.store.journal = self.journal
            self.holder.on_registered_again = self._registered_again
            self.registry.maintain = lambda: self.journal.maintain(self._all_indexed) if self.journal else None

    def scan_storage_at_start(self) -> bool:
        """The whole-storage scan for files without a row runs when no other node is alive
        (their files are theirs to index; a dead node's are found through its journal)."""
        if self.others_alive:
            log.info("other nodes are alive: the storage is not scanned at start (dead nodes' journals are)")
        return not self.others_alive

    def start(self) -> None:
        self.holder.start()
        self.registry.start()
        if self.holder.postgres:
            self.orphans.start()

    def stop(self) -> None:
        """After the indexer stopped: our journal goes when all of it is indexed, then the leases."""
        self.orphans.stop()
        if self.journal is not None:
            try:
                self.journal.close(self._all_indexed)
            except Exception as exc:  # the database is gone: a survivor (or our next start) reads it
                log.warning("journal kept at stop: %s", type(exc).__name__)
        self.registry.stopped()
        self.holder.stop()

    def _registered_again(self, row_id: int) -> None:
        self.registry.row_id = row_id
        if self.journal is not None:
            self.journal.move_to(row_id)

    def _all_indexed(self, paths: list[str]) -> bool:
        with session_scope(self.session_factory) as session:
            indexed = node_rows.indexed_among(session, paths)
        return journal.settled(paths, indexed, self.node.spool.root)

    def _on_disk(self, sop_instance_uid: str) -> bool:
        if not self.several or not is_valid_uid(sop_instance_uid):
            return False
        return (self.node.spool.root / instance_relpath(sop_instance_uid)).is_file()
