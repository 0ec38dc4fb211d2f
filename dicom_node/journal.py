"""The acknowledged-instances journal of one node process, on the shared storage.

What
    Every instance a node acknowledges is on disk (fsynced file and folder, dicom_node.spool)
    before its row exists: the indexer writes rows in batches after the answer. If the node
    dies in between, the file has no row. Its own restart finds such files by scanning the
    whole storage (``StoreService.index_spooled_orphans``); a surviving node on another host
    must find them without that scan, within seconds. So each node process appends the
    relative path of each instance it is about to acknowledge to its own journal,
    ``STORAGE_DIR/journal/node-<row>.<segment>.log`` (``<row>``: its ``nodes`` row), and the
    line is durable (``fdatasync``) before the C-STORE response. The line's sync runs beside
    the instance's own fsyncs (:meth:`Journal.append_soon`), not after them: on this
    machine's disk one after the other cost 27 % of a one-sender receive. So a line may name
    a file that never became durable (the node died first, or the store failed); no
    acknowledgement was sent for it, and every reader treats a line without its file as
    nothing to do. A survivor reads a dead node's journal, indexes the paths that have no
    row and whose file is there (dicom_node.orphans), and removes it.

Cost
    One ``fdatasync`` of a small append per acknowledged instance, overlapping the
    instance's fsyncs, shared by concurrent associations (group commit: a writer whose line
    an earlier sync already covered returns at once). Measured with bench/store_bench.py
    (docs/production.md, "Several hosts").

Size
    The node starts a new segment every :data:`ROTATE_S` (or :data:`ROTATE_LINES` lines)
    and removes a finished segment once every path in it has a row (one query per 500
    paths), so a journal holds about a minute of receiving.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

log = logging.getLogger("ct_triage.node.journal")

ROTATE_S = 60.0
ROTATE_LINES = 20000
# A finished segment is checked for removal only this long after it was closed: a line is
# written before its file is linked, so a younger segment may name a store still in flight
# (which must not read as "no file, nothing to do").
REMOVE_AFTER_S = 30.0
_NAME = re.compile(r"^node-(\d+)\.(\d+)\.log$")


def folder(storage_root: Path) -> Path:
    return Path(storage_root) / "journal"


def segments(storage_root: Path, row_id: int) -> list[Path]:
    """The journal segments of node ``row_id``, oldest first."""
    found = []
    for path in folder(storage_root).glob(f"node-{row_id}.*.log"):
        match = _NAME.match(path.name)
        if match:
            found.append((int(match.group(2)), path))
    return [path for _, path in sorted(found)]


def read_paths(paths: Iterable[Path]) -> list[str]:
    """The relative paths in journal segments, first occurrence order (a torn last line is skipped)."""
    seen: dict[str, None] = {}
    for path in paths:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            continue
        for line in data.split(b"\n")[:-1]:  # after the last newline: a line never made durable
            relpath = line.decode("utf-8", "replace").strip()
            if relpath.startswith("instances/") and ".." not in relpath:
                seen.setdefault(relpath, None)
    return list(seen)


def settled(paths: Iterable[str], indexed: set[str], storage_root: Path) -> bool:
    """True when every path has its row (``indexed``) or no file: a line whose store failed
    or never finished names nothing to index."""
    return all(p in indexed or not (Path(storage_root) / p).is_file() for p in set(paths))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    """Append-only, group-committed journal of one node process (see the module docstring)."""

    def __init__(self, storage_root: Path, row_id: int):
        self.root = Path(storage_root)
        self.dir = folder(self.root)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # the fd and the written count
        self._sync_lock = threading.Lock()  # one fdatasync at a time; always taken before _lock
        self._written = 0
        self._synced = 0
        self.syncs = 0
        self._fd = -1
        self._row_id = row_id
        self._segment = 0
        self._segment_lines = 0
        self._segment_started = time.monotonic()
        self._finished: list[tuple[Path, float]] = []  # (segment, closed at)
        self._syncers: ThreadPoolExecutor | None = None
        self._syncers_lock = threading.Lock()
        self._open(row_id, 0)

    @property
    def row_id(self) -> int:
        return self._row_id

    def _path(self, row_id: int, segment: int) -> Path:
        return self.dir / f"node-{row_id}.{segment}.log"

    def _open(self, row_id: int, segment: int) -> None:
        self._fd = os.open(self._path(row_id, segment), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        _fsync_dir(self.dir)  # the segment's name is durable before any line in it counts
        self._row_id, self._segment = row_id, segment
        self._segment_lines = 0
        self._segment_started = time.monotonic()

    def append(self, relpath: str) -> None:
        """Make ``relpath`` durable in the journal (returns once it is; OSError when it cannot be)."""
        line = (relpath + "\n").encode()
        with self._lock:
            os.write(self._fd, line)
            self._written += 1
            self._segment_lines += 1
            mine = self._written
        with self._sync_lock:
            if self._synced >= mine:
                return  # another writer's fdatasync covered this line
            with self._lock:
                target, fd = self._written, self._fd
            os.fdatasync(fd)
            self._synced = target
            self.syncs += 1

    def append_soon(self, relpath: str) -> Future:
        """:meth:`append` in the background, so that its sync overlaps the instance's own;
        the caller waits for the result before it acknowledges."""
        with self._syncers_lock:
            if self._syncers is None:
                self._syncers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="journal")
            return self._syncers.submit(self.append, relpath)

    def _switch(self, row_id: int, segment: int) -> None:
        with self._sync_lock, self._lock:
            os.fdatasync(self._fd)
            self._synced = self._written
            os.close(self._fd)
            self._finished.append((self._path(self._row_id, self._segment), time.monotonic()))
            self._open(row_id, segment)

    def move_to(self, row_id: int) -> None:
        """This process registered again as ``row_id``: new lines go to that row's journal."""
        self._switch(row_id, 0)

    def maintain(self, all_indexed: Callable[[list[str]], bool]) -> None:
        """Rotate when due; remove finished segments whose every path ``all_indexed``."""
        if self._segment_lines and (self._segment_lines >= ROTATE_LINES
                                    or time.monotonic() - self._segment_started >= ROTATE_S):
            self._switch(self._row_id, self._segment + 1)
        for item in list(self._finished):
            path, closed_at = item
            if time.monotonic() - closed_at >= REMOVE_AFTER_S and all_indexed(read_paths([path])):
                path.unlink(missing_ok=True)
                self._finished.remove(item)

    def close(self, all_indexed: Callable[[list[str]], bool] | None = None) -> None:
        """At a clean stop: remove the journal when everything in it is indexed."""
        with self._syncers_lock:
            if self._syncers is not None:
                self._syncers.shutdown(wait=True)
                self._syncers = None
        with self._sync_lock, self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            self._finished.append((self._path(self._row_id, self._segment), time.monotonic()))
        if all_indexed is not None:  # every store has ended: no age needed
            for item in list(self._finished):
                if all_indexed(read_paths([item[0]])):
                    item[0].unlink(missing_ok=True)
                    self._finished.remove(item)
