"""Receive benchmark: one storescu association sends a 300-slice 512x512 CT series (~150 MB)
over loopback to (a) ct-triage, (b) dcmtk storescp, (c) Orthanc, in the same run; then 4
concurrent senders (different UIDs) to each.

    .venv/bin/python bench/store_bench.py [--slices 300] [--repeat 3] [--json out.json]

Reports seconds, MB/s and the ratios ct-triage/dcmtk and ct-triage/Orthanc (median of
repeats). dcmtk runs with TCP_NODELAY=1 (without it dcmtk stalls on Nagle). Run by hand:
timings are not asserted anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ct_triage_tools.pacs import OrthancServer
from ct_triage_tools.scanner import STORESCU, dcmtk_env, free_port, wait_echo, write_ct_series

REPO = Path(__file__).resolve().parents[1]


# CPUs the receivers (and every process they start) may run on; None: all. scale_bench's
# --receiver-cpus sets it to show how receiving grows with cores. The senders and PostgreSQL
# are not pinned.
RECEIVER_CPUS: set[int] | None = None


class Target:
    name = ""
    proc: subprocess.Popen | None = None

    def start(self, workdir: Path) -> int: ...

    def launch(self, args: list[str], port: int, env: dict, stderr, called: str = "ANY-SCP") -> int:
        """Start ``args`` in its own session and wait until it answers C-ECHO (to ``called``) on ``port``."""
        cpus = RECEIVER_CPUS
        self.proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=stderr,
                                     start_new_session=True,
                                     preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
        wait_echo(port, called=called)
        return port

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


class CtTriage(Target):
    name = "ct-triage"

    def __init__(self, database_url: str | None = None):
        self.database_url = database_url
        self.proc = None

    def start(self, workdir: Path) -> int:
        port = free_port()
        env = {**os.environ, "CT_TRIAGE_VAR_DIR": str(workdir / "var"), "CT_TRIAGE_PORT": str(port),
               "CT_TRIAGE_BIND_ADDRESS": "127.0.0.1", "CT_TRIAGE_MIN_FREE_DISK_MB": "64",
               "CT_TRIAGE_STABLE_AGE_S": "3600", "CT_TRIAGE_LOG_LEVEL": "WARNING"}
        if self.database_url:
            env["CT_TRIAGE_DATABASE_URL"] = self.database_url
        return self.launch([sys.executable, "-m", "ct_triage_app.cli", "node"], port, env,
                           open(workdir / "node.log", "wb"), called="CTTRIAGE")


class DcmtkStorescp(Target):
    name = "dcmtk storescp"

    def __init__(self):
        self.proc = None

    def start(self, workdir: Path) -> int:
        port = free_port()
        out = workdir / "storescp"
        out.mkdir()
        return self.launch(["/usr/bin/storescp", "-od", str(out), "--fork", str(port)], port, dcmtk_env(),
                           subprocess.DEVNULL)


class Orthanc(Target):
    name = "Orthanc"

    def __init__(self):
        self.proc = None
        self.server: OrthancServer | None = None

    def start(self, workdir: Path) -> int:
        # Orthanc's DICOM server is dcmtk: it needs TCP_NODELAY too, or Nagle costs ~40 ms per instance.
        self.server = OrthancServer(workdir, aet="ORTHANC", env=dcmtk_env()).start()
        wait_echo(self.server.dicom_port, called="ORTHANC")
        return self.server.dicom_port

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(timeout=30)


def send(port: int, folder: Path, called: str, options: tuple[str, ...] = ()) -> subprocess.Popen:
    """One dcmtk storescu sending ``folder``; ``options``: extra storescu options (e.g. the PDU size)."""
    return subprocess.Popen([STORESCU, "+sd", *options, "-aet", "BENCH", "-aec", called, "127.0.0.1", str(port),
                             str(folder)], env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def run_senders(port: int, folders: list[Path], called: str, options: tuple[str, ...] = ()) -> float:
    started = time.perf_counter()
    procs = [send(port, folder, called, options) for folder in folders]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode()[-500:]}")
    return time.perf_counter() - started


def measure(target: Target, single: Path, concurrent: list[Path], repeat: int) -> dict:
    called = "ORTHANC" if isinstance(target, Orthanc) else "CTTRIAGE"
    singles, fours = [], []
    for _ in range(repeat):
        # A fresh receiver each repeat: every instance is new, nothing is a duplicate.
        with tempfile.TemporaryDirectory(dir=REPO / "bench" / "out") as tmp:
            port = target.start(Path(tmp))
            try:
                singles.append(run_senders(port, [single], called))
                fours.append(run_senders(port, concurrent, called))
            finally:
                target.stop()
    return {"single_s": statistics.median(singles), "four_s": statistics.median(fours),
            "single_all": singles, "four_all": fours}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--database-url", default=None, help="ct-triage database (default: SQLite)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    data = REPO / "bench" / "out" / f"series-{args.slices}"
    (REPO / "bench" / "out").mkdir(parents=True, exist_ok=True)
    folders = [data / f"s{i}" for i in range(5)]
    if not all(f.is_dir() and len(list(f.iterdir())) == args.slices for f in folders):
        shutil.rmtree(data, ignore_errors=True)
        for i, folder in enumerate(folders):
            write_ct_series(folder, args.slices, seed=100 + i, series_number=2 + i)
    megabytes = sum(p.stat().st_size for p in folders[0].iterdir()) / 1e6

    results = {}
    for target in (DcmtkStorescp(), Orthanc(), CtTriage(args.database_url)):
        results[target.name] = measure(target, folders[0], folders[1:], args.repeat)
    ours, dcmtk, orthanc = results["ct-triage"], results["dcmtk storescp"], results["Orthanc"]
    print(f"series: {args.slices} slices, {megabytes:.1f} MB; median of {args.repeat}")
    print(f"{'receiver':16} {'1 sender s':>10} {'MB/s':>8} {'4 senders s':>12} {'MB/s':>8}")
    for name, r in results.items():
        print(f"{name:16} {r['single_s']:10.2f} {megabytes / r['single_s']:8.0f} {r['four_s']:12.2f} "
              f"{4 * megabytes / r['four_s']:8.0f}")
    summary = {
        "megabytes": megabytes, "results": results,
        "ratio_single_vs_dcmtk": ours["single_s"] / dcmtk["single_s"],
        "ratio_single_vs_orthanc": ours["single_s"] / orthanc["single_s"],
        "ratio_four_vs_dcmtk": ours["four_s"] / dcmtk["four_s"],
        "ratio_four_vs_orthanc": ours["four_s"] / orthanc["four_s"],
        "aggregate_four_vs_single": (4 * megabytes / ours["four_s"]) / (megabytes / ours["single_s"]),
    }
    for key, value in summary.items():
        if key.startswith(("ratio", "aggregate")):
            print(f"{key}: {value:.2f}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
