"""Turnaround benchmark: phantom studies sent to `ct-triage serve`, Orthanc as the PACS.

    .venv/bin/python bench/pipeline_bench.py burst [--studies 20] [--slices 300] [--rows 512]
    .venv/bin/python bench/pipeline_bench.py paced [--period-s 30] [--duration-s 600] [--slices 300]

For each study: the latency from the last instance acknowledged (storescu returns) to the
SR of its final version being in Orthanc (polled over REST every 0.25 s), p50, p95 and max;
the SR of a partial version scored first (a sender paused past the quiet period) does not
count, and every study's versions are listed.

- ``burst``: the studies back to back (the queue builds up); reports the order in which
  the studies' SRs reached the PACS with their priorities, HIGH first being the aim.
- ``paced``: one study every ``--period-s`` for ``--duration-s`` (issue 9: a 300-slice study
  every 30 s for 10 minutes), against the target **p95 <= quiet period + 20 s**.

The phantoms cycle through involvements 5, 20, 35, 45, 60, 70, 85 % (CT-1 LOW, CT-1 LOW,
CT-2 MEDIUM, CT-2 MEDIUM, CT-3 HIGH, CT-3 HIGH, CT-4 HIGH), are written once under
bench/out/ and reused. They carry ImagesInAcquisition, so a series completes at its last
instance and the quiet period (CT_TRIAGE_STABLE_AGE_S, ``--quiet-s``) is not waited: the
time actually spent between the last instance and "stable" is measured and reported.

Where the time goes, per study, from the database of the run (wall-clock timestamps of the
same host): quiet (last instance -> stable), queue (stable -> scoring starts), scoring,
delivery queue (scored -> delivery claimed), build (claimed -> outputs recorded; also as
the worker logs it), to SR (recorded -> the SR seen over REST: the SR goes first), rest
(SR seen -> the SEG and SC series delivered; not in the latency). With a retried delivery
the claim time is the last attempt's. The 1-minute load
average is sampled every 5 s: the machine is shared, so numbers are anchored to it and to
the scoring time of the same run. Run by hand; nothing asserts timings.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

from ct_triage_tools.pacs import OrthancServer
from ct_triage_tools.phantom import write_phantom
from ct_triage_tools.scanner import STORESCU, dcmtk_env, free_port, wait_echo

REPO = Path(__file__).resolve().parents[1]
INVOLVEMENTS = [5, 20, 35, 45, 60, 70, 85]
POLL_S = 0.25
LOAD_SAMPLE_S = 5.0
TARGET_EXTRA_S = 20.0  # issue 9: p95 at most the quiet period + 20 s


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def stats(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    return {"n": len(values), "p50_s": round(statistics.median(values), 2), "p95_s": round(percentile(values, 95), 2),
            "max_s": round(max(values), 2)}


SR_SERIES_NUMBER_BASE = 9100  # worker.outputs.sr: the SR series is numbered 9100 + study version


def sr_versions(pacs: OrthancServer, study_uid: str) -> set[int]:
    """The study versions whose SR is in Orthanc."""
    found = pacs.post("/tools/find", {"Level": "Series", "Expand": True, "Query": {
        "StudyInstanceUID": study_uid, "Modality": "SR"}})
    return {int(s["MainDicomTags"].get("SeriesNumber", SR_SERIES_NUMBER_BASE)) - SR_SERIES_NUMBER_BASE for s in found}


def final_version(engine, study_uid: str, slices: int) -> int | None:
    """The study's version once all its ``slices`` instances are indexed (no later version
    can come), else None. Under load a sender may pause longer than the quiet period and a
    partial version be scored first: its SR is not the study's answer."""
    from sqlalchemy import func, select

    from db.models import Series, Study

    with engine.connect() as conn:
        row = conn.execute(select(Study.version, func.sum(Series.instance_count))
                           .join(Series, Series.study_fk == Study.id)
                           .where(Study.study_instance_uid == study_uid).group_by(Study.id)).first()
    return int(row[0]) if row is not None and row[1] is not None and int(row[1]) >= slices else None


def prepare(count: int, slices: int, rows: int) -> list[tuple[Path, dict]]:
    """``count`` distinct phantom studies (written once, then reused from bench/out/)."""
    out = REPO / "bench" / "out" / f"pipeline-{slices}x{rows}"
    studies = []
    for i in range(count):
        involvement = INVOLVEMENTS[i % len(INVOLVEMENTS)]
        folder = out / f"study{i:02d}-{involvement}"
        truth_path = folder / "ground_truth.json"
        if not truth_path.exists():
            shutil.rmtree(folder, ignore_errors=True)
            print(f"writing phantom {i + 1}/{count} ({involvement} %)", file=sys.stderr, flush=True)
            write_phantom(folder, involvement, slices=slices, rows=rows, seed=200 + i)
        studies.append((folder, json.loads(truth_path.read_text())))
    return studies


class Poller(threading.Thread):
    """Watches Orthanc for each acknowledged study's SR; samples the load average."""

    def __init__(self, pacs: OrthancServer, database_url: str, slices: int):
        from sqlalchemy import create_engine

        super().__init__(daemon=True)
        self.pacs = pacs
        self.engine = create_engine(database_url)
        self.slices = slices
        self.seen: dict[tuple[str, int], float] = {}  # (study UID, version) -> wall time its SR was first seen
        self.acked: dict[str, float] = {}  # study UID -> wall time storescu returned
        self.arrived: dict[str, float] = {}
        self.loads: list[float] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def ack(self, uid: str) -> None:
        with self.lock:
            self.acked[uid] = time.time()

    def run(self) -> None:
        next_load = 0.0
        while not self.stop.is_set():
            if time.monotonic() >= next_load:
                self.loads.append(os.getloadavg()[0])
                next_load = time.monotonic() + LOAD_SAMPLE_S
            with self.lock:
                waiting = list(self.acked.keys() - self.arrived.keys())
            for uid in waiting:
                try:
                    now = time.time()
                    for version in sr_versions(self.pacs, uid):
                        self.seen.setdefault((uid, version), now)
                    final = final_version(self.engine, uid, self.slices)
                    if final is not None and (uid, final) in self.seen:
                        self.arrived[uid] = self.seen[(uid, final)]
                except Exception as exc:  # Orthanc or the database busy: try again next round
                    print(f"poll: {exc}", file=sys.stderr)
            self.stop.wait(POLL_S)
        self.engine.dispose()


def send(port: int, folder: Path) -> None:
    subprocess.run([STORESCU, "+sd", "+r", "+sp", "*.dcm", "-aec", "CTTRIAGE", "127.0.0.1", str(port), str(folder)],
                   env=dcmtk_env(), check=True, capture_output=True)


def build_seconds(log_text: str) -> dict[int, float]:
    """result id -> outputs build time, from the worker's log line."""
    import re

    found = {}
    for m in re.finditer(r"result (\d+): built \d+ output instance\(s\), [\d.]+ MB, in ([\d.]+) s", log_text):
        found[int(m.group(1))] = float(m.group(2))
    return found


def breakdown(database_url: str, poller: Poller, log_text: str) -> list[dict]:
    """Per study, where the time from the last instance to the SR in the PACS went."""
    from sqlalchemy import create_engine, select
    from sqlalchemy.orm import Session

    from db.models import Result

    def ts(value: datetime | None) -> float | None:
        return value.timestamp() if value else None

    built = build_seconds(log_text)
    engine = create_engine(database_url)
    rows = []
    with Session(engine) as session:
        latest: dict[str, Result] = {}
        versions: dict[str, list[str]] = {}
        for result in session.scalars(select(Result).order_by(Result.id)):
            latest[result.study.study_instance_uid] = result
            versions.setdefault(result.study.study_instance_uid, []).append(
                f"v{result.version} {result.status} {result.category or '-'}")
        for uid, acked in poller.acked.items():
            result = latest.get(uid)
            if result is None:
                rows.append({"study": uid, "result": None})
                continue
            delivery = next((d for d in result.deliveries if d.channel == "dicom"), None)
            received = max((ts(s.last_received_at) for s in result.study.series if s.last_received_at), default=None)
            claimed = ts(delivery.next_attempt_at) if delivery else None
            recorded = ts(result.outputs_built_at)
            delivered = ts(delivery.delivered_at) if delivery else None
            seen = poller.arrived.get(uid)

            def span(a, b):
                return round(b - a, 2) if a is not None and b is not None else None
            rows.append({
                "study": uid, "result": result.id, "versions": versions[uid], "priority": result.priority,
                "category": result.category,
                "latency_s": span(acked, seen), "quiet_s": span(received, ts(result.stable_at)),
                "queue_s": span(ts(result.stable_at), ts(result.scoring_started_at)),
                "scoring_s": span(ts(result.scoring_started_at), ts(result.scored_at)),
                "delivery_queue_s": span(ts(result.scored_at), claimed), "build_s": span(claimed, recorded),
                "build_logged_s": built.get(result.id), "to_sr_s": span(recorded, seen),
                "rest_s": span(seen, delivered), "attempts": delivery.attempts if delivery else None,
                "acked_at": round(acked, 2), "seen_at": round(seen, 2) if seen else None})
    engine.dispose()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", choices=("burst", "paced"), default="burst")
    parser.add_argument("--studies", type=int, default=20, help="burst: how many studies")
    parser.add_argument("--period-s", type=float, default=30.0, help="paced: one study every this many seconds")
    parser.add_argument("--duration-s", type=float, default=600.0, help="paced: for this long")
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--quiet-s", type=float, default=2.0, help="CT_TRIAGE_STABLE_AGE_S of the run")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    count = args.studies if args.mode == "burst" else max(1, math.ceil(args.duration_s / args.period_s))
    studies = prepare(count, args.slices, args.rows)
    work = REPO / "bench" / "out" / f"pipeline-run-{args.mode}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    pacs = OrthancServer(work, aet="ORTHANC", env=dcmtk_env()).start()
    port = free_port()
    database_url = f"sqlite:///{(work / 'var' / 'ct-triage.sqlite').as_posix()}"
    env = {**os.environ, "CT_TRIAGE_VAR_DIR": str(work / "var"), "CT_TRIAGE_PORT": str(port),
           "CT_TRIAGE_DATABASE_URL": database_url, "CT_TRIAGE_BROKER_URL": "",
           "CT_TRIAGE_BIND_ADDRESS": "127.0.0.1", "CT_TRIAGE_STABLE_AGE_S": str(args.quiet_s),
           "CT_TRIAGE_DESTINATIONS": f"ORTHANC@127.0.0.1:{pacs.dicom_port}", "CT_TRIAGE_MIN_FREE_DISK_MB": "256",
           "CT_TRIAGE_POLL_INTERVAL_S": "0.2", "CT_TRIAGE_LOG_LEVEL": "INFO"}
    log_path = work / "serve.log"
    with open(log_path, "wb") as log_file:  # the child keeps its own descriptor
        serve = subprocess.Popen([sys.executable, "-m", "ct_triage_app.cli", "serve"], env=env,
                                 stdout=subprocess.DEVNULL, stderr=log_file, start_new_session=True)
    poller = Poller(pacs, database_url, args.slices)
    late_starts = []
    load_before = os.getloadavg()
    started = time.monotonic()
    try:
        wait_echo(port, called="CTTRIAGE")
        poller.start()
        t0 = time.monotonic()
        for i, (folder, truth) in enumerate(studies):
            if args.mode == "paced":
                due = t0 + i * args.period_s
                late_starts.append(round(max(0.0, time.monotonic() - due), 2))
                time.sleep(max(0.0, due - time.monotonic()))
            send(port, folder)
            poller.ack(truth["study_instance_uid"])
        deadline = time.monotonic() + 120 + 60 * len(studies)
        while len(poller.arrived) < len(poller.acked) and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        poller.stop.set()
        os.killpg(serve.pid, signal.SIGTERM)
        serve.wait(60)
        pacs.stop(timeout=60)
    wall = time.monotonic() - started
    rows = breakdown(database_url, poller, log_path.read_text(errors="replace"))
    latencies = [r["latency_s"] for r in rows if r.get("latency_s") is not None]
    missing = len(poller.acked) - len(poller.arrived)
    summary: dict = {
        "mode": args.mode, "studies": len(poller.acked), "arrived": len(poller.arrived), "missing": missing,
        "slices": args.slices, "rows": args.rows, "quiet_s_setting": args.quiet_s,
        "latency": stats(latencies),
        "quiet_spent": stats([r["quiet_s"] for r in rows if r.get("quiet_s") is not None]),
        "queue": stats([r["queue_s"] for r in rows if r.get("queue_s") is not None]),
        "scoring": stats([r["scoring_s"] for r in rows if r.get("scoring_s") is not None]),
        "delivery_queue": stats([r["delivery_queue_s"] for r in rows if r.get("delivery_queue_s") is not None]),
        "build": stats([r["build_s"] for r in rows if r.get("build_s") is not None]),
        "to_sr": stats([r["to_sr_s"] for r in rows if r.get("to_sr_s") is not None]),
        "rest": stats([r["rest_s"] for r in rows if r.get("rest_s") is not None]),
        "load1_before": round(load_before[0], 2),
        "load1_during": {"mean": round(statistics.mean(poller.loads), 2) if poller.loads else None,
                         "max": round(max(poller.loads), 2) if poller.loads else None},
        "wall_s": round(wall, 1), "cpus": os.cpu_count(),
    }
    if args.mode == "paced":
        target = args.quiet_s + TARGET_EXTRA_S
        p95 = summary["latency"].get("p95_s")
        summary.update({"period_s": args.period_s, "duration_s": args.duration_s, "target_p95_s": target,
                        "target_met": p95 is not None and p95 <= target and not missing,
                        "late_starts_s": late_starts})
    else:
        by_uid = {r["study"]: r for r in rows}
        sent = [by_uid[truth["study_instance_uid"]].get("priority") for _, truth in studies]
        arrival = [by_uid[uid].get("priority") for uid in sorted(poller.arrived, key=poller.arrived.get)]
        summary.update({"sent_order": sent, "arrival_order": arrival,
                        "high_arrival_ranks": [i + 1 for i, p in enumerate(arrival) if p == "HIGH"],
                        "high_sent_ranks": [i + 1 for i, p in enumerate(sent) if p == "HIGH"]})
    summary["per_study"] = rows
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0 if not missing else 1


if __name__ == "__main__":
    sys.exit(main())
