"""Load benchmark: 8 concurrent senders x 3 studies of 300 slices each (7200 instances)
into a running ``ct-triage node``; no error and no loss allowed, throughput and the node's
peak RSS reported. The same load into dcmtk's storescp, in the same run, is the anchor.

    .venv/bin/python bench/load_bench.py [--senders 8] [--studies 3] [--slices 300]
        [--rows 512] [--database-url URL] [--no-anchor] [--json out.json]

Each sender is one dcmtk ``storescu`` per study, its studies one after the other (a
scanner sending its queue); the senders run at once. Checked after the run: every
storescu exited 0 and saw a Success response for each file; the node indexed every
instance (count of rows == instances sent) and each row's file exists. Peak RSS is the
node process's ``VmHWM`` (/proc/PID/status) read just before it is stopped.

512 x 512 slices make ~3.8 GB per target; ``--rows 256`` quarters it. Run by hand:
numbers go in the issue notes, never into assertions.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.store_bench import CtTriage, DcmtkStorescp  # noqa: E402
from ct_triage_tools.scanner import STORESCU, dcmtk_env, free_port, write_ct_series  # noqa: E402


class LoadNode(CtTriage):
    """store_bench's node, logging at INFO (one line per association: what a failure needs).

    All senders connect from 127.0.0.1 at the same instant: the per-address cap on
    connections waiting for their association (CT_TRIAGE_MAX_PENDING_PER_ADDRESS, 16)
    is set to the number of senders, or the node would refuse some of them at once.
    """

    senders = 8

    def start(self, workdir: Path) -> int:
        import os

        port = free_port()
        env = {**os.environ, "CT_TRIAGE_VAR_DIR": str(workdir / "var"), "CT_TRIAGE_PORT": str(port),
               "CT_TRIAGE_BIND_ADDRESS": "127.0.0.1", "CT_TRIAGE_MIN_FREE_DISK_MB": "64",
               "CT_TRIAGE_STABLE_AGE_S": "3600", "CT_TRIAGE_LOG_LEVEL": "INFO",
               "CT_TRIAGE_MAX_PENDING_PER_ADDRESS": str(self.senders)}
        if self.database_url:
            env["CT_TRIAGE_DATABASE_URL"] = self.database_url
        return self.launch([sys.executable, "-m", "ct_triage_app.cli", "node"], port, env,
                           open(workdir / "node.log", "wb"), called="CTTRIAGE")


def peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def sender_script(port: int, folders: list[Path], called: str) -> list[str]:
    """One shell per sender: its studies in order, each its own association; stops at the first failure."""
    steps = [f"{STORESCU} -v +sd -aet LOAD -aec {called} 127.0.0.1 {port} {folder} 2>&1 || exit $?"
             for folder in folders]
    return ["bash", "-c", "\n".join(steps)]


def run_load(port: int, plan: list[list[Path]], called: str) -> tuple[float, list[str]]:
    """Run the senders at once; their seconds (until the last one ends) and outputs.

    Each sender writes to a file, never to a pipe read after the others: ``storescu -v``
    writes ~230 bytes per instance, so a pipe nobody drains (64 KiB) blocks its sender in
    write() after ~270 instances; it stops sending, and the node rightly aborts the
    association on its network timeout (60 s).
    """
    import subprocess

    with tempfile.TemporaryDirectory() as logs:
        paths = [Path(logs) / f"sender{n}.log" for n in range(len(plan))]
        started = time.perf_counter()
        procs = []
        for folders, path in zip(plan, paths):
            with open(path, "wb") as out:
                procs.append(subprocess.Popen(sender_script(port, folders, called), env=dcmtk_env(), stdout=out,
                                              stderr=subprocess.STDOUT))
        codes = [proc.wait() for proc in procs]
        seconds = time.perf_counter() - started
        outputs = [path.read_text(errors="replace") for path in paths]
    for code, out in zip(codes, outputs):
        if code != 0:
            raise RuntimeError(f"a sender failed ({code}): {out[-1500:]}")
    return seconds, outputs


def check_node(database_url: str, expected: int, storage: Path) -> None:
    from sqlalchemy import func, select

    from db.models import Instance
    from db.session import make_engine, make_session_factory

    engine = make_engine(database_url)
    with make_session_factory(engine)() as session:
        count = session.scalar(select(func.count(Instance.id)))
        paths = session.scalars(select(Instance.path)).all()
    engine.dispose()
    if count != expected:
        raise RuntimeError(f"lost instances: {count} indexed of {expected} sent")
    missing = [p for p in paths if not (storage / p).is_file()]
    if missing:
        raise RuntimeError(f"{len(missing)} indexed instance(s) without a file, e.g. {missing[0]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--senders", type=int, default=8)
    parser.add_argument("--studies", type=int, default=3)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--database-url", default=None, help="default: SQLite in the scratch folder")
    parser.add_argument("--no-anchor", action="store_true", help="skip the dcmtk storescp run")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    out_dir = REPO / "bench" / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict = {"senders": args.senders, "studies_per_sender": args.studies, "slices": args.slices,
                    "rows": args.rows}
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        tmp_path = Path(tmp)
        plan: list[list[Path]] = []
        started = time.perf_counter()
        for sender in range(args.senders):
            folders = []
            for study in range(args.studies):
                folder = tmp_path / "data" / f"s{sender}-{study}"
                write_ct_series(folder, args.slices, rows=args.rows, columns=args.rows, seed=1000 + sender * 10 + study,
                                patient_id=f"LOAD{sender:02d}{study}")
                folders.append(folder)
            plan.append(folders)
        instances = args.senders * args.studies * args.slices
        total_mb = sum(p.stat().st_size for p in (tmp_path / "data").rglob("*.dcm")) / 1e6
        report.update(instances=instances, megabytes=round(total_mb, 1),
                      prepare_s=round(time.perf_counter() - started, 1))
        print(f"{instances} instances, {total_mb:.0f} MB prepared in {report['prepare_s']} s", flush=True)

        work = tmp_path / "node"
        work.mkdir()
        database_url = args.database_url or f"sqlite:///{work / 'var' / 'ct-triage.sqlite'}"
        node = LoadNode(database_url)
        node.senders = args.senders
        port = node.start(work)
        try:
            seconds, outputs = run_load(port, plan, "CTTRIAGE")
            rss = peak_rss_mb(node.proc.pid)
        finally:
            node.stop()
            import shutil

            shutil.copy(work / "node.log", out_dir / "load-node.log")  # kept for a look after a failure
        successes = sum(out.count("Received Store Response (Success)") for out in outputs)
        if successes != instances:
            raise RuntimeError(f"{instances - successes} instance(s) without a Success response")
        check_node(database_url, instances, work / "var" / "storage")
        report["ct_triage"] = {"seconds": round(seconds, 1), "instances_per_s": round(instances / seconds, 1),
                               "mb_per_s": round(total_mb / seconds, 1), "peak_rss_mb": rss, "errors": 0,
                               "lost": 0}
        print(f"ct-triage: {seconds:.1f} s, {instances / seconds:.0f} instances/s, {total_mb / seconds:.0f} MB/s, "
              f"peak RSS {rss:.0f} MB, no error, no loss", flush=True)

        if not args.no_anchor:
            anchor_dir = tmp_path / "storescp"
            anchor_dir.mkdir()
            anchor = DcmtkStorescp()
            port = anchor.start(anchor_dir)
            try:
                seconds, outputs = run_load(port, plan, "ANY-SCP")
            finally:
                anchor.stop()
            report["dcmtk_storescp"] = {"seconds": round(seconds, 1),
                                        "instances_per_s": round(instances / seconds, 1),
                                        "mb_per_s": round(total_mb / seconds, 1)}
            report["ratio_ct_triage_to_dcmtk"] = round(report["ct_triage"]["seconds"] / seconds, 2)
            print(f"dcmtk storescp (anchor): {seconds:.1f} s, {instances / seconds:.0f} instances/s; "
                  f"ct-triage/dcmtk time ratio {report['ratio_ct_triage_to_dcmtk']}", flush=True)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
