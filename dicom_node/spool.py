"""Durable on-disk storage of received instances.

Write path: pynetdicom streams the data set into a temp file under STORAGE_DIR/tmp
(same file system), we fsync it, hard-link it to its final hashed path (link fails
if a copy already exists, so the first copy is never overwritten), fsync the
directory, and only then is success answered; the row follows (dicom_node.indexer).
The 256 instance folders exist from start-up, so that is two fsyncs per instance.
The file's fsync starts as soon as the data set is whole (:meth:`Spool.sync_early`),
in a small pool of threads, so its disk write overlaps the receive checks; the link
waits for it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from dicom_node.uids import INSTANCE_FOLDERS

log = logging.getLogger("ct_triage.node.spool")


class Spool:
    def __init__(self, storage_dir: Path, min_free_bytes: int, quarantine_max_bytes: int = 1024 * 2**20):
        self.root = Path(storage_dir).resolve()
        self.tmp_dir = self.root / "tmp"
        self.quarantine_dir = self.root / "quarantine"
        self.min_free_bytes = int(min_free_bytes)
        self.quarantine_max_bytes = int(quarantine_max_bytes)
        for folder in (self.root, self.tmp_dir, self.quarantine_dir, self.root / "instances"):
            folder.mkdir(parents=True, exist_ok=True)
        self._make_instance_folders()
        self._quarantine_lock = threading.Lock()
        self._syncers: ThreadPoolExecutor | None = None
        self._syncers_lock = threading.Lock()
        self._quarantine_bytes = sum(p.stat().st_size for p in self.quarantine_dir.glob("*") if p.is_file())

    def _make_instance_folders(self) -> None:
        made = False
        for relpath in INSTANCE_FOLDERS:
            folder = self.root / relpath
            if not folder.is_dir():
                folder.mkdir(parents=True, exist_ok=True)
                made = True
        if made:
            _fsync_dir(self.root / "instances")
            _fsync_dir(self.root)

    def path(self, relpath: str) -> Path:
        return self.root / relpath

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def has_room_for(self, nbytes: int) -> bool:
        """False when keeping ``nbytes`` more would take free space under the floor."""
        return self.free_bytes() - nbytes >= self.min_free_bytes

    def sync_early(self, temp_path: Path) -> Future | None:
        """Start the fsync of ``temp_path``'s data now, in the background (the file stays
        open until it is done); pass the result to :meth:`store`. None if it cannot start."""
        try:
            fd = os.open(temp_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        with self._syncers_lock:
            if self._syncers is None:
                self._syncers = ThreadPoolExecutor(max_workers=8, thread_name_prefix="fsync")
            return self._syncers.submit(_fsync_and_close, fd)

    def store(self, temp_path: Path, relpath: str, *, replace: bool = False, synced: Future | None = None) -> bool:
        """Make ``temp_path`` durable at ``relpath``; False if a file is already there.

        With ``replace`` an existing file (an orphan left by a crash between link and
        commit, not in the database) is replaced atomically. ``synced``: the fsync
        :meth:`sync_early` started; it is waited for (and its error raised) before the link.
        """
        if synced is not None:
            synced.result()
        else:
            with open(temp_path, "rb") as fh:
                os.fsync(fh.fileno())
        final = self.root / relpath
        parent = final.parent
        if not parent.is_dir():
            parent.mkdir(parents=True, exist_ok=True)
            _fsync_dir(parent.parent)
            _fsync_dir(parent.parent.parent)
        if replace:
            os.replace(temp_path, final)
        else:
            try:
                os.link(temp_path, final)
            except FileExistsError:
                return False
        _fsync_dir(parent)
        return True

    def quarantine(self, temp_path: Path, name: str) -> str | None:
        """Keep a rejected data set for inspection; its relative path, or None when not kept.

        Not kept when keeping it would take free space under the floor or the folder over
        its cap (CT_TRIAGE_QUARANTINE_MAX_MB). The copy is a hard link (same file system):
        atomic, so a failure never leaves a partial file; a copy is the fallback, removed
        again if it fails.
        """
        safe = "".join(c for c in name if c.isalnum() or c in "-_.")[:80] or "rejected"
        target = self.quarantine_dir / f"{safe}.dcm"
        try:
            size = os.stat(temp_path).st_size
        except OSError:
            return None
        with self._quarantine_lock:
            if self._quarantine_bytes + size > self.quarantine_max_bytes:
                log.warning("rejected data set not kept: the quarantine holds %d MiB (cap %d MiB)",
                            self._quarantine_bytes // 2**20, self.quarantine_max_bytes // 2**20)
                return None
            if not self.has_room_for(size):
                log.warning("rejected data set not kept: free disk is near the floor")
                return None
            try:
                os.link(temp_path, target)
            except FileExistsError:
                return str(target.relative_to(self.root))
            except OSError:
                try:
                    shutil.copyfile(temp_path, target)
                except OSError as exc:
                    target.unlink(missing_ok=True)
                    log.warning("rejected data set not kept: %s", exc)
                    return None
            self._quarantine_bytes += size
        return str(target.relative_to(self.root))

    def forget_quarantined(self, nbytes: int) -> None:
        """Retention removed ``nbytes`` from the quarantine."""
        with self._quarantine_lock:
            self._quarantine_bytes = max(0, self._quarantine_bytes - nbytes)

    def remove(self, relpath: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.root / relpath).unlink()


def _fsync_and_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
