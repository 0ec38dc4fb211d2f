"""Turnaround benchmark: phantom studies sent to `ct-triage serve`, Orthanc as the PACS.

    .venv/bin/python bench/pipeline_bench.py [--studies 20] [--slices 300] [--rows 512] [--gap-s 0]

For each study: the time from the last instance acknowledged (storescu returns) to the SR
being in Orthanc (polled over REST). The phantoms carry ImagesInAcquisition, so their series
complete at once and no quiet period is spent (nothing to subtract). Reports p50 and p95. With
--gap-s 0 studies go back to back (a burst: the queue builds up); a positive gap paces them.
Run by hand; nothing asserts timings.
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
import time
from pathlib import Path

from ct_triage_tools.pacs import OrthancServer
from ct_triage_tools.phantom import write_phantom
from ct_triage_tools.scanner import STORESCU, dcmtk_env, free_port, wait_echo

REPO = Path(__file__).resolve().parents[1]

STABLE_AGE_S = 2.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def sr_arrived(pacs: OrthancServer, study_uid: str) -> bool:
    return bool(pacs.post("/tools/find", {"Level": "Series", "Query": {
        "StudyInstanceUID": study_uid, "Modality": "SR"}}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--gap-s", type=float, default=0.0, help="pause between studies (0: back to back)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    out = REPO / "bench" / "out" / f"pipeline-{args.studies}x{args.slices}x{args.rows}"
    studies = []
    for i in range(args.studies):
        folder = out / f"study{i:02d}"
        truth_path = folder / "ground_truth.json"
        if not truth_path.exists():
            shutil.rmtree(folder, ignore_errors=True)
            write_phantom(folder, [5, 20, 35, 45, 60, 70, 85][i % 7], slices=args.slices, rows=args.rows,
                          seed=200 + i)
        studies.append((folder, json.loads(truth_path.read_text())))
    work = out / "run"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    pacs = OrthancServer(work, aet="ORTHANC", env=dcmtk_env()).start()
    pacs_port = pacs.dicom_port
    port = free_port()
    env = {**os.environ, "CT_TRIAGE_VAR_DIR": str(work / "var"), "CT_TRIAGE_PORT": str(port),
           "CT_TRIAGE_BIND_ADDRESS": "127.0.0.1", "CT_TRIAGE_STABLE_AGE_S": str(STABLE_AGE_S),
           "CT_TRIAGE_DESTINATIONS": f"ORTHANC@127.0.0.1:{pacs_port}", "CT_TRIAGE_MIN_FREE_DISK_MB": "256",
           "CT_TRIAGE_POLL_INTERVAL_S": "0.2", "CT_TRIAGE_LOG_LEVEL": "INFO"}
    serve = subprocess.Popen([sys.executable, "-m", "ct_triage.cli", "serve"], env=env,
                             stdout=subprocess.DEVNULL, stderr=open(work / "serve.log", "wb"),
                             start_new_session=True)
    acked: dict[str, float] = {}
    arrived: dict[str, float] = {}
    try:
        wait_echo(port, called="CTTRIAGE")
        for folder, truth in studies:
            subprocess.run([STORESCU, "+sd", "+r", "+sp", "*.dcm", "-aec", "CTTRIAGE", "127.0.0.1", str(port),
                            str(folder)], env=dcmtk_env(), check=True, capture_output=True)
            acked[truth["study_instance_uid"]] = time.monotonic()
            for uid in acked.keys() - arrived.keys():
                if sr_arrived(pacs, uid):
                    arrived[uid] = time.monotonic()
            time.sleep(args.gap_s)
        deadline = time.monotonic() + 60 * args.studies
        while len(arrived) < len(acked) and time.monotonic() < deadline:
            for uid in acked.keys() - arrived.keys():
                if sr_arrived(pacs, uid):
                    arrived[uid] = time.monotonic()
            time.sleep(0.2)
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        serve.wait(60)
        pacs.stop(timeout=60)
    turnaround = [arrived[uid] - acked[uid] for uid in arrived]
    missing = len(acked) - len(arrived)
    summary = {"studies": len(acked), "arrived": len(arrived), "missing": missing,
               "slices": args.slices, "rows": args.rows, "gap_s": args.gap_s,
               "p50_s": statistics.median(turnaround) if turnaround else None,
               "p95_s": percentile(turnaround, 95) if turnaround else None,
               "max_s": max(turnaround) if turnaround else None,
               "per_study_s": [round(t, 2) for t in turnaround]}
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0 if not missing else 1


if __name__ == "__main__":
    sys.exit(main())
