"""Receive scaling benchmark (issue 18 item 5): 1, 2 and 4 concurrent dcmtk storescu senders
against ct-triage with 1 and 2 node processes (PostgreSQL), dcmtk storescp and Orthanc, in
the same run; then 8 studies x 3 series sent at once to ct-triage with 2 processes (no loss:
every instance indexed; peak RSS of all its processes).

    .venv/bin/python bench/scale_bench.py [--slices 300] [--repeat 5] [--json out.json]
        [--receiver-cpus N] [--processes 1,2] [--skip-anchors]
        [--postgres-admin postgresql+psycopg://postgres@127.0.0.1:5432/test] [--big-slices N]

Each series is ``--slices`` x 512x512 CT; storescu sends with 128 KB PDUs (``-pdu 131072
--max-send-pdu 131072``) and TCP_NODELAY. Every repeat starts a fresh receiver (fresh
storage, a fresh PostgreSQL database), so every instance is new. Reported: the median
seconds per (receiver, senders), MB/s, ct-triage's time as a ratio of Orthanc's and
storescp's for the same sends, aggregate throughput relative to one sender, and with 2
processes how the 4 senders' associations were split between them (from the
``[pN] ... established`` log lines). ``--processes 2,3,4`` compares process counts
(``--skip-anchors`` leaves storescp and Orthanc out of such a comparison; figures to report
come with them). Timings are not asserted anywhere: run it on a quiet
machine (the figures of a loaded machine say little).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import store_bench  # noqa: E402
from bench.store_bench import DcmtkStorescp, Orthanc, Target  # noqa: E402
from ct_triage_tools.scanner import free_port, write_ct_series  # noqa: E402

SENDERS = (1, 2, 4)
PDU = ["-pdu", "131072", "--max-send-pdu", "131072"]
DEFAULT_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


class CtTriageProcesses(Target):
    """``ct-triage node --processes N`` on a fresh PostgreSQL database."""

    def __init__(self, processes: int, admin_url: str):
        self.processes = processes
        self.admin_url = admin_url
        self.name = f"ct-triage p{processes}"
        self.proc = None
        self.database: str | None = None
        self.log_path: Path | None = None

    def _admin(self, sql: str) -> None:
        from sqlalchemy import create_engine, text

        engine = create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(text(sql))
        engine.dispose()

    @property
    def database_url(self) -> str:
        from sqlalchemy.engine import make_url

        assert self.database is not None
        return make_url(self.admin_url).set(database=self.database).render_as_string(hide_password=False)

    def start(self, workdir: Path) -> int:
        self.database = f"bench_{uuid.uuid4().hex[:10]}"
        self._admin(f'CREATE DATABASE "{self.database}"')
        port = free_port()
        env = {**os.environ, "CT_TRIAGE_VAR_DIR": str(workdir / "var"), "CT_TRIAGE_PORT": str(port),
               "CT_TRIAGE_BIND_ADDRESS": "127.0.0.1", "CT_TRIAGE_MIN_FREE_DISK_MB": "64",
               "CT_TRIAGE_STABLE_AGE_S": "3600", "CT_TRIAGE_LOG_LEVEL": "INFO",
               "CT_TRIAGE_DATABASE_URL": self.database_url, "CT_TRIAGE_BROKER_URL": "",
               "CT_TRIAGE_HTTP_PORT": "0"}
        self.log_path = workdir / "node.log"
        self.launch([sys.executable, "-m", "ct_triage_app.cli", "node", "--processes", str(self.processes)],
                    port, env, open(self.log_path, "wb"), called="CTTRIAGE")  # noqa: SIM115 - the daemon writes it until stopped
        # C-ECHO answers once process 0 is ready; measure only when every process is.
        deadline = time.monotonic() + 120
        while self.processes > 1 and "node processes accepting" not in self.log():
            if time.monotonic() > deadline:
                raise RuntimeError(f"ct-triage did not start:\n{self.log()[-2000:]}")
            time.sleep(0.1)
        return port

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def indexed(self) -> int:
        from sqlalchemy import create_engine, text

        engine = create_engine(self.database_url)
        with engine.connect() as conn:
            count = conn.execute(text("SELECT count(*) FROM instances")).scalar_one()
        engine.dispose()
        return int(count)

    def stop(self) -> None:
        super().stop()
        if self.database:
            self._admin(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
            self.database = None


def run_senders(port: int, folders: list[Path], called: str) -> float:
    """store_bench's senders, recursing into folders, with 128 KB PDUs both ways (the issue's setup)."""
    return store_bench.run_senders(port, folders, called, ("+r", *PDU))


_ESTABLISHED = re.compile(r"\[p(\d+)\]: association from BENCH")


def split_of(log_segment: str) -> list[int]:
    counts: dict[int, int] = {}
    for match in _ESTABLISHED.finditer(log_segment):
        counts[int(match.group(1))] = counts.get(int(match.group(1)), 0) + 1
    return [counts.get(i, 0) for i in range(max(counts, default=-1) + 1)]


def measure(target: Target, groups: dict[int, list[Path]], repeat: int) -> dict:
    called = "ORTHANC" if isinstance(target, Orthanc) else "CTTRIAGE"
    times: dict[int, list[float]] = {n: [] for n in groups}
    splits: list[list[int]] = []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory(dir=REPO / "bench" / "out") as tmp:
            port = target.start(Path(tmp))
            try:
                for n, folders in groups.items():
                    before = len(target.log()) if isinstance(target, CtTriageProcesses) else 0
                    times[n].append(run_senders(port, folders, called))
                    if isinstance(target, CtTriageProcesses) and target.processes > 1 and n == 4:
                        splits.append(split_of(target.log()[before:]))
            finally:
                target.stop()
    out: dict = {f"{n}_s": statistics.median(t) for n, t in times.items()}
    out.update({f"{n}_all": t for n, t in times.items()})
    if splits:
        out["split_4_senders"] = splits
    return out


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        with contextlib.suppress(OSError):
            todo += [int(c) for c in Path(f"/proc/{current}/task/{current}/children").read_text().split()]
    return pids


def _rss_kb(pid: int, field: str = "VmRSS") -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def big_run(admin_url: str, studies: list[Path], instances: int, processes: int = 2) -> dict:
    """8 studies x 3 series at once to ct-triage with ``processes`` processes: seconds until
    every send is acknowledged and until every instance is indexed; peak RSS."""
    target = CtTriageProcesses(processes, admin_url)
    with tempfile.TemporaryDirectory(dir=REPO / "bench" / "out") as tmp:
        port = target.start(Path(tmp))
        assert target.proc is not None
        peak_sum, peak_hwm, stop = [0], {}, threading.Event()

        def sample() -> None:
            while not stop.wait(0.1):
                pids = _tree(target.proc.pid)
                peak_sum[0] = max(peak_sum[0], sum(_rss_kb(p) for p in pids))
                for p in pids:
                    peak_hwm[p] = max(peak_hwm.get(p, 0), _rss_kb(p, "VmHWM"))
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            started = time.perf_counter()
            acked_s = run_senders(port, studies, "CTTRIAGE")
            deadline = time.monotonic() + 300
            while target.indexed() < instances and time.monotonic() < deadline:
                time.sleep(0.1)
            indexed_s = time.perf_counter() - started
            indexed = target.indexed()
        finally:
            stop.set()
            sampler.join()
            target.stop()
    return {"studies": len(studies), "instances": instances, "indexed": indexed, "acked_s": acked_s,
            "no_loss": indexed == instances, "peak_rss_sum_mb": peak_sum[0] / 1024,
            "peak_rss_per_process_mb": sorted((v / 1024 for v in peak_hwm.values()), reverse=True),
            "indexed_s": indexed_s}


def make_data(root: Path, slices: int, big_slices: int) -> tuple[dict[int, list[Path]], list[Path], int]:
    """The series of the 1/2/4-sender rounds (7, distinct UIDs) and the 8 studies of 3 series."""
    base = root / f"scale-{slices}"
    series = [base / f"s{i}" for i in range(sum(SENDERS))]
    for i, folder in enumerate(series):
        if not (folder.is_dir() and len(list(folder.iterdir())) == slices):
            write_ct_series(folder, slices, seed=300 + i, series_number=2 + i)
    groups, at = {}, 0
    for n in SENDERS:
        groups[n] = series[at:at + n]
        at += n
    big = root / f"studies-8x3x{big_slices}"
    studies = [big / f"study{k}" for k in range(8)]
    for k, study in enumerate(studies):
        for j in range(3):
            folder = study / f"series{j}"
            if not (folder.is_dir() and len(list(folder.iterdir())) == big_slices):
                write_ct_series(folder, big_slices, seed=500 + 3 * k + j, series_number=2 + j,
                                study_instance_uid=f"1.2.826.0.1.3680043.10.999.{k + 1}",
                                patient_id=f"BENCH{k:02d}")
    return groups, studies, 8 * 3 * big_slices


def summary_cpus() -> set[int]:
    return store_bench.RECEIVER_CPUS or os.sched_getaffinity(0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--big-slices", type=int, default=None, help="slices per series of the 8x3 case "
                        "(default --slices)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--postgres-admin", default=os.environ.get("CT_TRIAGE_TEST_POSTGRES_URL", DEFAULT_ADMIN))
    parser.add_argument("--skip-big", action="store_true")
    parser.add_argument("--processes", default="1,2", help="ct-triage process counts to measure (default 1,2)")
    parser.add_argument("--skip-anchors", action="store_true",
                        help="leave out storescp and Orthanc (only to compare ct-triage settings in one run; the "
                             "figures to report come with the anchors)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--receiver-cpus", type=int, default=None,
                        help="pin every receiver (ct-triage, Orthanc, storescp and their children) to the first "
                             "N CPUs: run once with 1 and once without to see how receiving grows with cores")
    args = parser.parse_args()
    if args.receiver_cpus:
        store_bench.RECEIVER_CPUS = set(sorted(os.sched_getaffinity(0))[:args.receiver_cpus])

    out = REPO / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    groups, studies, big_instances = make_data(out, args.slices, args.big_slices or args.slices)
    megabytes = sum(p.stat().st_size for p in groups[1][0].iterdir()) / 1e6

    counts = [int(n) for n in args.processes.split(",") if n]
    anchors: list[Target] = [] if args.skip_anchors else [DcmtkStorescp(), Orthanc()]
    targets: list[Target] = anchors + [CtTriageProcesses(n, args.postgres_admin) for n in counts]
    results = {target.name: measure(target, groups, args.repeat) for target in targets}
    print(f"series: {args.slices} slices x 512x512, {megabytes:.1f} MB each; median of {args.repeat}; "
          f"storescu {' '.join(PDU)}; receivers on {len(summary_cpus())} CPU(s)")
    print(f"{'receiver':16}" + "".join(f" {f'{n} sender(s) s':>16} {'MB/s':>6}" for n in SENDERS))
    for name, r in results.items():
        print(f"{name:16}" + "".join(f" {r[f'{n}_s']:16.2f} {n * megabytes / r[f'{n}_s']:6.0f}" for n in SENDERS))
    summary: dict = {"megabytes_per_series": megabytes, "slices": args.slices, "repeat": args.repeat,
                     "receiver_cpus": sorted(store_bench.RECEIVER_CPUS or os.sched_getaffinity(0)),
                     "load_average_at_end": os.getloadavg(), "results": results, "ratios": {}}
    first = f"ct-triage p{counts[0]}"
    for name in (f"ct-triage p{c}" for c in counts):
        for n in SENDERS:
            ours = results[name][f"{n}_s"]
            for anchor in ("Orthanc", "dcmtk storescp"):
                if anchor in results:
                    summary["ratios"][f"{name} {n} senders vs {anchor.split()[-1]}"] = ours / results[anchor][f"{n}_s"]
            summary["ratios"][f"{name} {n} senders aggregate vs 1 sender {first.split()[-1]}"] = (
                (n / ours) / (1 / results[first]["1_s"]))
    for key, value in summary["ratios"].items():
        print(f"{key}: {value:.2f}")
    for c in counts:
        if "split_4_senders" in results[f"ct-triage p{c}"]:
            print(f"4 senders, {c} processes: associations per process "
                  f"{results[f'ct-triage p{c}']['split_4_senders']}")
    if not args.skip_big:
        big = big_run(args.postgres_admin, studies, big_instances)
        summary["big"] = big
        print(f"8 studies x 3 series x {args.big_slices or args.slices} at once, 2 processes, PostgreSQL: "
              f"acknowledged in {big['acked_s']:.1f} s, all indexed at {big['indexed_s']:.1f} s, "
              f"indexed {big['indexed']}/{big['instances']} "
              f"({'no loss' if big['no_loss'] else 'LOSS'}), peak RSS of all processes {big['peak_rss_sum_mb']:.0f} MB "
              f"(per process: {', '.join(f'{m:.0f}' for m in big['peak_rss_per_process_mb'])} MB)")
    print(f"load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())} "
          f"on {os.cpu_count()} cores")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
