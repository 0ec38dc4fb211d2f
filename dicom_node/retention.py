"""Retention (``CT_TRIAGE_RETENTION_DAYS``) and disk back-pressure.

Retention deletes a received instance's file ``RETENTION_DAYS`` after its study's
result was delivered (every delivery succeeded; a result with no destination counts
from when it was scored), never before, and a quarantined copy ``RETENTION_DAYS``
after it was received. Rows are kept: an instance gets ``deleted_at``, a rejection
``quarantine_deleted_at`` (storage commitment then no longer reports the instance as
held). UPS workitems in a final state (COMPLETED, CANCELED) for ``RETENTION_DAYS``
are deleted with their event and subscription rows (:func:`sweep_workitems`; a
Deletion Lock keeps them). 0 days (the default) keeps everything forever. The node (``ct-triage node``
or ``serve``) runs a sweep every ``RETENTION_INTERVAL_S`` (1 h) in a background
thread, ``BATCH`` (1000) files per transaction; the first sweep runs a minute after
start so that start-up indexing comes first.

:func:`disk_pressure` is what ``ct-triage status`` and the metrics endpoint show:
free space against the floor (``CT_TRIAGE_MIN_FREE_DISK_MB``, under which C-STORE
is refused with 0xA700) and how many stores the floor refused in the last hour.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from ct_triage.polling import Poller
from db import repository, worklist
from db.session import session_scope
from db.types import utcnow
from dicom_node import status

log = logging.getLogger("ct_triage.node.retention")

BATCH = 1000
FIRST_SWEEP_DELAY_S = 60.0
# Above this share of the floor still free, the disk is "ok"; under it "low"; under the floor "refusing".
LOW_MARGIN = 2.0


def sweep(session_factory: sessionmaker[Session], storage_dir: Path, retention_days: float,
          now=None) -> int:
    """Delete expired files; returns how many files were removed (rows marked)."""
    if retention_days <= 0:
        return 0
    root = Path(storage_dir).resolve()
    cutoff = (now or utcnow()) - timedelta(days=retention_days)
    removed = 0
    while True:
        with session_scope(session_factory) as session:
            files = repository.expired_files(session, cutoff, limit=BATCH)
            if not files:
                break
            for item in files:
                _unlink_inside(root, item.path)
            repository.mark_files_deleted(session, files)
        removed += len(files)
        if len(files) < BATCH:
            break
    if removed:
        log.info("retention: removed %d file(s) older than %g day(s) after delivery", removed, retention_days)
    return removed


def sweep_workitems(session_factory: sessionmaker[Session], retention_days: float, now=None) -> int:
    """Delete workitems final for ``retention_days`` (with their events and subscriptions); returns how many."""
    if retention_days <= 0:
        return 0
    cutoff = (now or utcnow()) - timedelta(days=retention_days)
    removed = 0
    while True:
        with session_scope(session_factory) as session:
            count = worklist.delete_final_before(session, cutoff, limit=BATCH)
        removed += count
        if count < BATCH:
            break
    if removed:
        log.info("retention: deleted %d UPS workitem(s) final for more than %g day(s)", removed, retention_days)
    return removed


def _unlink_inside(root: Path, relpath: str) -> None:
    """Remove ``root/relpath`` (never anything outside root), then empty parent folders."""
    target = (root / relpath).resolve()
    if root not in target.parents:
        log.error("retention: refusing to delete %r: outside the storage folder", relpath)
        return
    try:
        target.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("retention: could not delete a file: %s", exc)
        return
    parent = target.parent
    while parent != root and root in parent.parents and parent.name not in ("instances", "quarantine", "tmp"):
        try:
            parent.rmdir()
        except OSError:
            break
        parent = parent.parent


class RetentionSweeper(Poller):
    """Runs :func:`sweep` periodically in a daemon thread (nothing when retention is 0)."""

    thread_name = "retention"
    logger = log
    failed = "retention: sweep failed"
    db_failed = "retention: database error"
    join_timeout_s = 5.0

    def __init__(self, session_factory: sessionmaker[Session], storage_dir: Path, retention_days: float,
                 interval_s: float, first_delay_s: float = FIRST_SWEEP_DELAY_S):
        super().__init__(self.sweep_once, interval_s, first_delay_s)
        self.session_factory = session_factory
        self.storage_dir = storage_dir
        self.retention_days = retention_days

    def start(self) -> None:
        if self.retention_days <= 0:
            log.info("retention off (CT_TRIAGE_RETENTION_DAYS=0): received instances are kept forever")
            return
        log.info("retention: instances deleted %g day(s) after delivery, checked every %.0f s",
                 self.retention_days, self.interval_s)
        super().start()

    def sweep_once(self) -> None:
        sweep(self.session_factory, self.storage_dir, self.retention_days)
        sweep_workitems(self.session_factory, self.retention_days)


@dataclass
class DiskPressure:
    """Free space of the storage folder against the refusal floor."""

    storage_dir: str
    total_bytes: int
    free_bytes: int
    floor_bytes: int
    state: str  # ok | low (under LOW_MARGIN x floor) | refusing (under the floor: C-STORE gets 0xA700)
    instances_on_disk: int | None = None
    bytes_on_disk: int | None = None
    instances_deleted: int | None = None
    quarantined_on_disk: int | None = None
    refusals_last_hour: int | None = None

    @property
    def headroom_bytes(self) -> int:
        return self.free_bytes - self.floor_bytes

    def to_json(self) -> dict:
        return {**asdict(self), "headroom_bytes": self.headroom_bytes}


def disk_pressure(storage_dir: Path, min_free_disk_mb: int,
                  session_factory: sessionmaker[Session] | None = None) -> DiskPressure:
    """Disk back-pressure now (for ``ct-triage status`` and the metrics endpoint).

    With a ``session_factory`` it adds what the database knows: instances and bytes on
    disk, instances removed by retention, quarantined files, 0xA700 refusals in the
    last hour. Database errors leave those fields None.
    """
    root = Path(storage_dir)
    root.mkdir(parents=True, exist_ok=True)
    usage = shutil.disk_usage(root)
    floor = int(min_free_disk_mb) * 2**20
    state = "refusing" if usage.free < floor else "low" if usage.free < LOW_MARGIN * floor else "ok"
    pressure = DiskPressure(str(root), usage.total, usage.free, floor, state)
    if session_factory is not None:
        try:
            with session_scope(session_factory) as session:
                counts = repository.storage_counts(session, status.OUT_OF_RESOURCES_DISK_FLOOR)
        except SQLAlchemyError as exc:
            log.warning("disk pressure: database unavailable: %s", str(exc).splitlines()[0][:200])
        else:
            pressure.instances_on_disk = counts.instances_on_disk
            pressure.bytes_on_disk = counts.bytes_on_disk
            pressure.instances_deleted = counts.instances_deleted
            pressure.quarantined_on_disk = counts.quarantined_on_disk
            pressure.refusals_last_hour = counts.disk_refusals_last_hour
    return pressure
