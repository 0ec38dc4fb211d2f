"""Durable file writes for what the worker stores (result masks, built outputs).

``write_synced``: temporary name in the same folder, write, fsync, atomic rename over the
final name; ``fsync_dir`` makes the renames (directory entries) durable. A reader never
sees a torn file: it sees the old file, no file, or the new one.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_synced(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a fsynced temporary file and an atomic rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(folder: Path) -> None:
    """``mkdir -p`` whose new directory entries are durable."""
    folder = Path(folder)
    missing = []
    probe = folder
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    folder.mkdir(parents=True, exist_ok=True)
    for created in reversed(missing):
        fsync_dir(created.parent)


def write_durably(path: Path, data: bytes) -> None:
    """:func:`write_synced` plus the folder's fsync: durable once this returns."""
    path = Path(path)
    make_dirs(path.parent)
    write_synced(path, data)
    fsync_dir(path.parent)
