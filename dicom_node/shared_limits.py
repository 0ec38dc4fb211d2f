"""Admission caps that hold across the node processes of one host (``--processes N``).

What
    :class:`SharedGate` has the interface of :class:`dicom_node.transport.Gate` (``open``,
    ``admit``, ``release``, ``counts``, the three ``max_*`` attributes), but counts in a
    table that every node process of the host maps: ``CT_TRIAGE_MAX_ASSOCIATIONS``
    accepted associations, ``MAX_PENDING_PER_ADDRESS`` and ``MAX_PENDING_TOTAL`` sockets
    waiting for their A-ASSOCIATE hold for the host, whichever process took the socket.

How
    The table lives in an anonymous memory file (``memfd_create``) that the supervisor
    creates and hands to each child as an inherited descriptor (no name, nothing to clean
    up, gone with the last process). It has one row per process (its child index); a
    process writes only its own row: pending sockets, accepted associations, associations
    taken so far, connections received from the supervisor so far (:mod:`dicom_node.processes`
    hands each accepted connection to the least busy process), and pending sockets per source
    address hashed (CRC-32) into a fixed number of buckets. Two addresses in one bucket
    share a cap: a collision only makes the cap stricter. A decision sums the rows under an
    ``fcntl`` lock on the file (and a thread lock, since POSIX record locks do not exclude
    the threads of one process): a few microseconds per connection. When a child dies, the supervisor zeroes its row
    (:meth:`SharedLimits.clear_row`), and a child zeroes its row when it starts, so the
    slots of a dead process never leak.

Why not Redis or the database
    Admission runs once per connection, before any A-ASSOCIATE: a round trip to a server
    would put a network hop (and the server's availability) in front of every scanner,
    while the node must still refuse cleanly with the database down (0xA702 after
    association). The memory table needs nothing else running.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import threading
import zlib

MAX_ROWS = 64
ADDRESS_BUCKETS = 509  # prime: spreads addresses of one subnet
_PID, _PENDING, _ACCEPTED, _TAKEN, _HANDED_IN = 0, 1, 2, 3, 4
_HEADER = 8  # int64 fields before the buckets of a row
_ROW = _HEADER + ADDRESS_BUCKETS
_SIZE = MAX_ROWS * _ROW * 8


class SharedLimits:
    """The mapped table (see the module docstring); ``fd`` is inherited by the children."""

    def __init__(self, fd: int, rows: int):
        if not 1 <= rows <= MAX_ROWS:
            raise ValueError(f"1..{MAX_ROWS} processes, got {rows}")
        self.fd = fd
        self.rows = rows
        self._map = mmap.mmap(fd, _SIZE)
        self._cells = memoryview(self._map).cast("q")
        self._thread_lock = threading.Lock()

    @classmethod
    def create(cls, rows: int) -> SharedLimits:
        fd = os.memfd_create("ct-triage-node-limits", 0)  # not CLOEXEC: children inherit it (pass_fds)
        os.ftruncate(fd, _SIZE)
        return cls(fd, rows)

    def __enter__(self) -> memoryview:
        self._thread_lock.acquire()
        fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, 0)
        return self._cells

    def __exit__(self, *exc) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, 0)
        self._thread_lock.release()

    def total(self, cells: memoryview, field: int) -> int:
        return sum(cells[r * _ROW + field] for r in range(self.rows))

    def clear_row(self, row: int, pid: int = 0) -> int:
        """Zero a row (its process died, or a new one takes it); returns its associations taken."""
        with self as cells:
            base = row * _ROW
            taken = cells[base + _TAKEN]
            cells[base:base + _ROW] = memoryview(bytes(_ROW * 8)).cast("q")
            cells[base + _PID] = pid
            return taken

    def loads(self) -> list[tuple[int, int]]:
        """Per process: (sockets held: pending + accepted, connections received so far), read
        without the lock (a hint for the supervisor's choice; each cell is one aligned word)."""
        cells = self._cells
        return [(cells[r * _ROW + _PENDING] + cells[r * _ROW + _ACCEPTED], cells[r * _ROW + _HANDED_IN])
                for r in range(self.rows)]

    def taken(self) -> list[int]:
        """Associations accepted so far by each process (since its row was last cleared)."""
        with self as cells:
            return [cells[r * _ROW + _TAKEN] for r in range(self.rows)]


def address_bucket(address: str) -> int:
    return zlib.crc32(address.encode("utf-8", "replace")) % ADDRESS_BUCKETS


class SharedGate:
    """:class:`dicom_node.transport.Gate` over :class:`SharedLimits`, for the process in ``row``."""

    def __init__(self, limits: SharedLimits, row: int, max_associations: int, max_pending_per_address: int,
                 max_pending_total: int):
        self.limits = limits
        self.row = row
        self.max_associations = max_associations
        self.max_pending_per_address = max_pending_per_address
        self.max_pending_total = max_pending_total
        self._base = row * _ROW
        self._pending: dict[tuple, int] = {}  # key -> address bucket (this process's sockets)
        self._accepted: set[tuple] = set()
        limits.clear_row(row, os.getpid())

    def open(self, key: tuple) -> str | None:
        bucket = address_bucket(str(key[0]))
        with self.limits as cells:
            per_address = sum(cells[r * _ROW + _HEADER + bucket] for r in range(self.limits.rows))
            if per_address >= self.max_pending_per_address:
                return (f"{self.max_pending_per_address} connections from this address are already waiting "
                        f"for their association (CT_TRIAGE_MAX_PENDING_PER_ADDRESS)")
            if self.limits.total(cells, _PENDING) >= self.max_pending_total:
                return f"{self.max_pending_total} connections are waiting for their association " \
                       f"(CT_TRIAGE_MAX_PENDING_TOTAL)"
            self._pending[key] = bucket
            cells[self._base + _PENDING] += 1
            cells[self._base + _HEADER + bucket] += 1
        return None

    def _drop_pending(self, cells: memoryview, key: tuple) -> None:
        bucket = self._pending.pop(key, None)
        if bucket is not None:
            cells[self._base + _PENDING] -= 1
            cells[self._base + _HEADER + bucket] -= 1

    def admit(self, key: tuple) -> bool:
        with self.limits as cells:
            if key in self._accepted:
                return True
            if self.limits.total(cells, _ACCEPTED) >= self.max_associations:
                return False
            self._drop_pending(cells, key)
            self._accepted.add(key)
            cells[self._base + _ACCEPTED] += 1
            cells[self._base + _TAKEN] += 1
            return True

    def release(self, key: tuple) -> None:
        with self.limits as cells:
            self._drop_pending(cells, key)
            if key in self._accepted:
                self._accepted.discard(key)
                cells[self._base + _ACCEPTED] -= 1

    def note_handed_in(self) -> None:
        """One more connection received from the supervisor (it counts those not yet received
        as load: see :meth:`SharedLimits.loads`)."""
        with self.limits as cells:
            cells[self._base + _HANDED_IN] += 1

    def counts(self) -> tuple[int, int]:
        """(pending, accepted) for the whole host."""
        with self.limits as cells:
            return self.limits.total(cells, _PENDING), self.limits.total(cells, _ACCEPTED)
