"""C-STORE: check, keep durably, answer; index in the background.

Success is answered only after the data set passed the receive checks
(dicom_node.integrity) and its bytes are fsynced at their final path with the
directory entry fsynced too; the row is then written by the indexer
(dicom_node.indexer), in batches across associations. Every failure is a named
status, a log line and, for bad data, a ``rejected_instances`` row with the reason.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.uid import UID
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from ct_triage.text import clean
from db import repository
from db.session import session_scope
from dicom_node import status
from dicom_node.indexer import Indexer
from dicom_node.journal import Journal
from dicom_node.metadata import RejectedInstance, read_instance_record, read_spooled_file
from dicom_node.spool import Spool

log = logging.getLogger("ct_triage.node.store")


@dataclass
class AssociationStats:
    calling_ae_title: str
    address: str
    started: float = field(default_factory=time.monotonic)
    stored: int = 0
    duplicates: int = 0
    failed: int = 0
    bytes: int = 0
    study_uids: set[str] = field(default_factory=set)
    # Per study: who it is and {SOP Class UID: instances stored}, for the audit trail.
    studies: dict[str, StudyTransfer] = field(default_factory=dict)


@dataclass
class StudyTransfer:
    patient_id: str
    patient_name: str | None
    issuer_of_patient_id: str | None
    accession_number: str | None
    sop_classes: dict[str, int] = field(default_factory=dict)


class StoreService:
    def __init__(self, spool: Spool, session_factory: sessionmaker[Session], on_series_stable=None,
                 max_instance_bytes: int = 1024 * 2**20):
        self.spool = spool
        self.indexer = Indexer(session_factory, on_outcome=self._on_indexed)
        self.journal: Journal | None = None  # set when several nodes may share the storage
        hook = os.environ.get("CT_TRIAGE_TEST_KILL_AFTER_FSYNC")
        self._kill_after_fsync = int(hook) if hook else None
        self._durable_count = 0
        # Test hook (CT_TRIAGE_TEST_HOLD_INDEXING=1): acknowledged instances are never handed to the
        # indexer, as if this node always died before indexing them (tests/test_hosts.py).
        self._hold_indexing = bool(os.environ.get("CT_TRIAGE_TEST_HOLD_INDEXING"))
        self.max_instance_bytes = max_instance_bytes
        self.session_factory = session_factory
        self.on_series_stable = on_series_stable or (lambda: None)
        # Stores of the same SOP Instance UID are serialized so "keep the first copy"
        # holds even when two associations race with the same instance.
        self._uid_locks = [threading.Lock() for _ in range(64)]
        self._stats: dict[int, AssociationStats] = {}
        self._stats_lock = threading.Lock()
        # Called with (association, its stats) when an association that stored something ends.
        self.on_association_ended: Callable[[object, AssociationStats], None] = lambda assoc, stats: None

    # -- association bookkeeping (for logs and the completeness tracker) ---------
    def association_started(self, assoc) -> None:
        with self._stats_lock:
            self._stats[id(assoc)] = AssociationStats(assoc.requestor.ae_title, assoc.requestor.address)

    def association_ended(self, assoc, how: str) -> None:
        with self._stats_lock:
            stats = self._stats.pop(id(assoc), None)
        if stats is None:
            return
        seconds = time.monotonic() - stats.started
        level = logging.WARNING if how.startswith("aborted") else logging.INFO
        log.log(level, "association %s from %s %s after %.2f s: stored=%d duplicates=%d failed=%d %.1f MB",
                 clean(stats.calling_ae_title, 16), stats.address, how, seconds, stats.stored, stats.duplicates,
                 stats.failed, stats.bytes / 1e6)
        if stats.study_uids:
            self.on_series_stable()  # an association ending may complete a study
        if stats.studies:
            try:
                self.on_association_ended(assoc, stats)
            except Exception:  # the audit trail must never break the node
                log.exception("association summary could not be recorded")

    def busy_study_uids(self) -> frozenset[str]:
        with self._stats_lock:
            return frozenset(uid for stats in self._stats.values() for uid in stats.study_uids)

    def _stats_for(self, assoc) -> AssociationStats:
        with self._stats_lock:
            stats = self._stats.get(id(assoc))
            if stats is None:
                stats = self._stats[id(assoc)] = AssociationStats(assoc.requestor.ae_title,
                                                                  assoc.requestor.address)
            return stats

    # -- C-STORE -----------------------------------------------------------------------
    def on_c_store(self, event) -> int:
        assoc = event.assoc
        stats = self._stats_for(assoc)
        req = event.request
        sop_class_uid = str(req.AffectedSOPClassUID)
        sop_instance_uid = str(req.AffectedSOPInstanceUID)
        temp_path = Path(event.dataset_path)
        calling = assoc.requestor.ae_title
        synced = self.spool.sync_early(temp_path)  # the disk write overlaps the checks below
        try:
            record = read_instance_record(temp_path, affected_sop_class_uid=sop_class_uid,
                                          affected_sop_instance_uid=sop_instance_uid,
                                          transfer_syntax_uid=str(event.context.transfer_syntax),
                                          calling_ae_title=calling, max_bytes=self.max_instance_bytes,
                                          scratch_dir=self.spool.tmp_dir,
                                          room_left=lambda written: self.spool.has_room_for(written))
        except RejectedInstance as rejected:
            stats.failed += 1
            return self._reject(rejected.status_code, rejected.reason, assoc, sop_class_uid, sop_instance_uid,
                                temp_path)

        if not self.spool.has_room_for(record.size_bytes):
            stats.failed += 1
            return self._reject(status.OUT_OF_RESOURCES_DISK_FLOOR,
                                f"free disk {self.spool.free_bytes() // 2**20} MiB would drop under the floor "
                                f"of {self.spool.min_free_bytes // 2**20} MiB", assoc, sop_class_uid,
                                sop_instance_uid, None)

        if not self.indexer.available():
            stats.failed += 1
            log.error("C-STORE of %s refused with 0xA702: the database is unavailable (indexing paused)",
                      sop_instance_uid)
            return status.OUT_OF_RESOURCES_DATABASE
        # Several nodes: a survivor finds the path there if we die (dicom_node.journal). The
        # line's sync overlaps the file's; both are done before the answer.
        journaled = self.journal.append_soon(record.path) if self.journal is not None else None
        with self._uid_locks[hash(sop_instance_uid) % len(self._uid_locks)]:
            try:
                # Durable here: fsynced file, link, fsynced directory. A file already at the
                # path is the first copy of a duplicate (kept); the indexer counts it.
                first_copy = self.spool.store(temp_path, record.path, synced=synced)
            except OSError as exc:
                stats.failed += 1
                log.error("storage write failed for %s: %s", sop_instance_uid, clean(exc))
                return status.OUT_OF_RESOURCES_WRITE_FAILED
        if self._kill_after_fsync is not None:
            self._debug_kill_hook()
        if journaled is not None:
            try:
                journaled.result()
            except OSError as exc:
                stats.failed += 1
                log.error("journal write failed for %s: %s", sop_instance_uid, clean(exc))
                return status.OUT_OF_RESOURCES_WRITE_FAILED
        if not self._hold_indexing:
            self.indexer.submit(record)
        if not first_copy:
            stats.duplicates += 1
            return status.SUCCESS
        stats.stored += 1
        stats.bytes += record.size_bytes
        stats.study_uids.add(record.study_instance_uid)
        study = stats.studies.get(record.study_instance_uid)
        if study is None:
            study = stats.studies[record.study_instance_uid] = StudyTransfer(
                record.patient_id, record.patient_name, record.issuer_of_patient_id or None, record.accession_number)
        study.sop_classes[record.sop_class_uid] = study.sop_classes.get(record.sop_class_uid, 0) + 1
        return status.SUCCESS

    def _debug_kill_hook(self) -> None:
        """Test hook (CT_TRIAGE_TEST_KILL_AFTER_FSYNC=N): SIGKILL this process after the N-th
        instance is durable on disk and before it is indexed or acknowledged."""
        with self._stats_lock:
            self._durable_count += 1
            due = self._durable_count >= (self._kill_after_fsync or 0)
        if due:
            log.warning("CT_TRIAGE_TEST_KILL_AFTER_FSYNC reached: SIGKILL between fsync and index")
            os.kill(os.getpid(), signal.SIGKILL)

    def _on_indexed(self, record: repository.InstanceRecord, outcome: repository.StoreOutcome) -> None:
        if not outcome.duplicate:
            self._log_outcome(record, outcome)

    def busy_or_pending_study_uids(self) -> frozenset[str]:
        """Studies still receiving, or with instances on disk not yet indexed."""
        return self.busy_study_uids() | self.indexer.pending_study_uids()

    # -- start-up: index what a crash left on disk without a row ------------------------------
    def index_spooled_orphans(self) -> int:
        """Index every spooled instance file without a row (before associations are accepted).

        A file that does not pass the receive checks (it cannot have been acknowledged) is
        moved to the quarantine. Returns the number of instances indexed.
        """
        started = time.monotonic()
        scan_began = time.time()
        with session_scope(self.session_factory) as session:
            known = repository.indexed_paths(session)
        records = []
        for path in sorted((self.spool.root / "instances").rglob("*.dcm")):
            relpath = path.relative_to(self.spool.root).as_posix()
            if relpath in known:
                continue
            try:
                if path.stat().st_ctime > scan_began:
                    continue  # linked since the scan began: another node's, acknowledged now (its indexer's)
            except FileNotFoundError:
                continue
            try:
                record = read_spooled_file(path, max_bytes=self.max_instance_bytes, scratch_dir=self.spool.tmp_dir)
                if Path(record.path).name != path.name:
                    raise RejectedInstance("file name does not match its SOP Instance UID", status.INVALID_UID)
                record.path = relpath  # where it is (an older folder layout stays readable)
                record.recovered = True
            except RejectedInstance as rejected:
                log.warning("spooled file %s not indexed (moved to quarantine): %s", relpath,
                            clean(rejected.reason))
                self.spool.quarantine(path, f"orphan-{path.stem}")
                self.spool.remove(relpath)
                continue
            records.append(record)
        if records:
            with session_scope(self.session_factory) as session:
                indexed = repository.stored_sop_instance_uids(session, [r.sop_instance_uid for r in records])
            for record in [r for r in records if r.sop_instance_uid in indexed]:
                # A second copy under another path (an older folder layout): the row keeps the first.
                log.warning("spooled file %s is a second copy of an indexed instance: removed", record.path)
                self.spool.remove(record.path)
            records = [r for r in records if r.sop_instance_uid not in indexed]
        for record in records:
            self.indexer.submit(record)
        if records and not self.indexer.flush(timeout=600):
            raise RuntimeError("indexing the spooled files left by the last run did not finish")
        if records:
            log.warning("indexed %d instance file(s) left without a row by the last run (%.1f s)", len(records),
                        time.monotonic() - started)
        return len(records)

    def _log_outcome(self, record: repository.InstanceRecord, outcome: repository.StoreOutcome) -> None:
        if outcome.created_series:
            log.info("series %s of study %s: %s (%s%s)", record.series_instance_uid, record.study_instance_uid,
                     outcome.series_state, clean(record.modality, 16),
                     f", {clean(record.not_applicable_reason)}" if record.not_applicable_reason else "")
        if outcome.opened_study_version is not None:
            log.info("study %s: new series after its last version was queued: version %d", record.study_instance_uid,
                     outcome.opened_study_version)
        if outcome.reopened:
            log.info("series %s reopened by a late instance: version %d, receiving",
                     record.series_instance_uid, outcome.series_version)
        if outcome.became_stable:
            log.info("series %s stable (ImagesInAcquisition reached)", record.series_instance_uid)
            self.on_series_stable()

    def _reject(self, status_code: int, reason: str, assoc, sop_class_uid: str, sop_instance_uid: str,
                temp_path: Path | None) -> int:
        quarantine = None
        if temp_path is not None and status_code not in (status.OUT_OF_RESOURCES_DISK_FLOOR,
                                                         status.OUT_OF_RESOURCES_TOO_LARGE):
            quarantine = self.spool.quarantine(temp_path, f"{int(time.time() * 1000)}-{sop_instance_uid}")
        reason = clean(reason, 500)
        log.warning("C-STORE from %s at %s refused with 0x%04X (%s): %s; SOP class %s",
                    clean(assoc.requestor.ae_title, 16), assoc.requestor.address, status_code,
                    status.NAMES.get(status_code, "failure"), reason,
                    clean(UID(sop_class_uid).name if sop_class_uid else "?", 80))
        try:
            with session_scope(self.session_factory) as session:
                repository.record_rejection(session, status_code=status_code, reason=reason,
                                            calling_ae_title=assoc.requestor.ae_title,
                                            peer_address=assoc.requestor.address, sop_class_uid=sop_class_uid,
                                            sop_instance_uid=sop_instance_uid, quarantine_path=quarantine)
        except SQLAlchemyError as exc:
            log.error("could not record the rejection: %s", str(exc).splitlines()[0][:300])
        return status_code
