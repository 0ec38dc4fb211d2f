"""The durable step of a receive alone, variants compared (issue 18 item 4): N threads each
make ``--count`` files of 512 KB durable at their hashed instance paths, each after a
simulated receive check of ``--check-ms`` of CPU, with

- ``sequential``: check, fsync the file, link, fsync the directory (the path before issue 18);
- ``early``: the file's fsync started before the check (:meth:`dicom_node.spool.Spool.sync_early`),
  waited for before the link, then the directory fsync (the path now);
- ``fdatasync``: as ``sequential`` with fdatasync;
- ``grouped``: as ``sequential``, but directory fsyncs shared across threads in rounds (one
  thread syncs every folder asked for while the previous round ran: a group commit).

Every variant answers only after the data and the directory entry are durable. Sync costs
are I/O, so this isolates them from the CPU-bound rest of a receive, which a loaded machine
makes noisy. Variants run interleaved, so load drifts alike for all.

    .venv/bin/python bench/spool_bench.py [--count 150] [--threads 1,4] [--repeat 5] [--check-ms 3]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dicom_node.spool import Spool, _fsync_dir  # noqa: E402


class GroupSyncer:
    """Directory fsyncs in rounds: the first caller of a round syncs every folder of it."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pending: set[Path] = set()
        self._collecting, self._completed, self._leader = 1, 0, False

    def sync(self, folder: Path) -> None:
        with self._cond:
            self._pending.add(folder)
            round_ = self._collecting
            while self._completed < round_:
                if not self._leader:
                    self._leader = True
                    break
                self._cond.wait()
            else:
                return
            folders, self._pending = self._pending, set()
            self._collecting += 1
        for each in folders:
            _fsync_dir(each)
        with self._cond:
            self._completed, self._leader = round_, False
            self._cond.notify_all()


def _check(ms: float) -> None:
    end = time.perf_counter() + ms / 1000
    while time.perf_counter() < end:
        pass


def run(kind: str, threads: int, count: int, payload: bytes, check_ms: float) -> float:
    with tempfile.TemporaryDirectory(dir=REPO / "bench" / "out") as tmp:
        spool = Spool(Path(tmp) / "storage", 0)
        group = GroupSyncer()

        def durable(temp: Path, relpath: str) -> None:
            if kind == "early":
                synced = spool.sync_early(temp)
                _check(check_ms)
                spool.store(temp, relpath, synced=synced)
                return
            _check(check_ms)
            if kind in ("sequential", "grouped"):
                with open(temp, "rb") as fh:
                    os.fsync(fh.fileno())
            else:
                with open(temp, "rb") as fh:
                    os.fdatasync(fh.fileno())
            final = spool.root / relpath
            os.link(temp, final)
            if kind == "grouped":
                group.sync(final.parent)
            else:
                _fsync_dir(final.parent)

        def worker(t: int) -> None:
            for i in range(count):
                name = hashlib.sha256(f"{t}-{i}".encode()).hexdigest()
                temp = spool.tmp_dir / f"{name}.part"
                with open(temp, "wb") as fh:
                    fh.write(payload)
                durable(temp, f"instances/{name[:2]}/{name}.dcm")
                os.unlink(temp)
        started = time.perf_counter()
        pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()
        return time.perf_counter() - started


KINDS = ("sequential", "early", "fdatasync", "grouped")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=150)
    parser.add_argument("--threads", default="1,4")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--check-ms", type=float, default=3.0, help="CPU of the receive checks per instance")
    args = parser.parse_args()
    (REPO / "bench" / "out").mkdir(parents=True, exist_ok=True)
    payload = os.urandom(512 * 1024)
    for threads in (int(t) for t in args.threads.split(",")):
        times: dict[str, list[float]] = {kind: [] for kind in KINDS}
        for _ in range(args.repeat):
            for kind in KINDS:
                times[kind].append(run(kind, threads, args.count, payload, args.check_ms))
        base = statistics.median(times["sequential"])
        n = threads * args.count
        print(f"{threads} thread(s) x {args.count}, median of {args.repeat}: " + "; ".join(
            f"{kind} {1000 * statistics.median(t) / n:.2f} ms/instance ({statistics.median(t) / base:.2f}x)"
            for kind, t in times.items()))
    print(f"load average {', '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
