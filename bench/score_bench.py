#!/usr/bin/env python
"""Benchmark: score a 512x512x300 phantom series on this machine.

Targets (issue): at most 10 s wall and 2 GB peak memory on a 2-core CPU, loading
included. Measured three ways, each in a fresh process so peak RSS is the scoring's own:

- ``cold``: ``ct-triage score DIR --json`` as a user runs it (Python start, torch import,
  header scan, selection, loading, scoring, output);
- ``warm``: inside one process that has scored once already (the worker's steady state:
  torch imported, scorer built), the second ``score_path`` call;
- the stage timings of the warm run.

Usage:  .venv/bin/python bench/score_bench.py [--slices 300] [--rows 512] [--involvement 35]
        [--device auto] [--scorers classical,hybrid] [--check] [--json]

Each scorer is timed the same way in the same run (the classical one is the anchor), with
its own peak RSS and CPU seconds (user + system, from wait4): on a shared machine the CPU
seconds say more than the wall time, which the load average printed beside it explains.
The phantom is written once to bench/out/ (git-ignored) and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.phantoms import add_phantom_arguments, cached_phantom  # noqa: E402 (after the checkout is on sys.path)

TARGET_S = 10.0
TARGET_MB = 2048.0


def _phantom(out: Path, involvement: float, slices: int, rows: int, seed: int) -> tuple[Path, dict]:
    folder = cached_phantom(out, involvement, slices, rows, seed)
    return folder, json.loads((folder / "ground_truth.json").read_text())


def _inner(folder: str, device: str) -> None:
    """Score twice in this process; print timings and peak RSS as JSON."""
    t0 = time.perf_counter()
    from ct_triage.settings import Settings
    from worker.scoring.pipeline import score_path

    settings = Settings.from_env(None, device=device)  # CT_TRIAGE_SCORER from the environment
    first = score_path(folder, settings)
    t1 = time.perf_counter()
    second = score_path(folder, settings)
    t2 = time.perf_counter()
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({
        "first_s": round(t1 - t0, 3), "warm_s": round(t2 - t1, 3), "peak_rss_mb": round(rss_mb, 1),
        "status": second.status, "reason": second.reason, "device": second.device,
        "involvement_percent": second.involvement_percent,
        "involvement_percent_left": second.involvement_percent_left,
        "involvement_percent_right": second.involvement_percent_right,
        "lung_volume_ml": second.lung_volume_ml, "lesion_volume_ml": second.lesion_volume_ml,
        "category": second.category, "timings": second.timings,
        "same_as_first": first.involvement_percent == second.involvement_percent,
    }))


def _run_measured(args: list[str], env: dict) -> tuple[float, float, subprocess.CompletedProcess, float]:
    """Run one child and read its own rusage with wait4 (peak RSS and CPU of that child alone)."""
    t = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    import threading

    chunks: dict[str, str] = {}

    def drain(name, stream):
        chunks[name] = stream.read()

    readers = [threading.Thread(target=drain, args=(n, s)) for n, s in (("out", proc.stdout), ("err", proc.stderr))]
    for r in readers:
        r.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    for r in readers:
        r.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    done = subprocess.CompletedProcess(args, proc.returncode, chunks.get("out", ""), chunks.get("err", ""))
    return wall, usage.ru_maxrss / 1024.0, done, usage.ru_utime + usage.ru_stime


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_phantom_arguments(parser, involvement=35.0, seed=0)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--scorers", default="classical,hybrid",
                        help="comma-separated scorers, each timed the same way in the same run")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--inner", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inner:
        _inner(args.inner, args.device)
        return 0

    folder, truth = _phantom(args.out, args.involvement, args.slices, args.rows, args.seed)
    reports = [_bench_one(folder, truth, scorer, args) for scorer in args.scorers.split(",")]
    ok = all(r.get("within_targets") for r in reports)
    if args.json:
        print(json.dumps(reports if len(reports) > 1 else reports[0], indent=1))
    return 0 if (ok or not args.check) else 1


def _bench_one(folder: Path, truth: dict, scorer: str, args) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CT_TRIAGE_")}
    env["CT_TRIAGE_DEVICE"] = args.device
    env["CT_TRIAGE_SCORER"] = scorer
    cold_wall, cold_mb, proc, cold_cpu = _run_measured(
        [sys.executable, "-m", "ct_triage_app.cli", "score", str(folder / "FC51"), "--json", "--no-boxes"], env)
    if proc.returncode not in (0, 2):
        print(proc.stderr[-3000:], file=sys.stderr)
        return {"scorer": scorer, "error": proc.stderr[-500:], "within_targets": False}
    cold = json.loads(proc.stdout)
    _, warm_mb, proc2, _ = _run_measured([sys.executable, str(Path(__file__).resolve()), "--inner",
                                          str(folder / "FC51"), "--device", args.device], env)
    if proc2.returncode != 0:
        print(proc2.stderr[-3000:], file=sys.stderr)
        return {"scorer": scorer, "error": proc2.stderr[-500:], "within_targets": False}
    warm = json.loads(proc2.stdout.strip().splitlines()[-1])
    report = {
        "scorer": scorer,
        "series": f"{args.slices}x{args.rows}x{args.rows} phantom, {args.involvement:g} % requested",
        "machine": {"cpus": len(os.sched_getaffinity(0)), "device": cold.get("device"),
                    "load_average_1min": round(os.getloadavg()[0], 1)},
        "cold_cli_s": round(cold_wall, 2),
        "cold_cli_cpu_s": round(cold_cpu, 2),
        "cold_cli_peak_mb": round(cold_mb, 0),
        "warm_in_process_s": warm["warm_s"],
        "warm_process_peak_mb": round(max(warm_mb, warm["peak_rss_mb"]), 0),
        "targets": {"seconds": TARGET_S, "peak_mb": TARGET_MB},
        "truth": {k: round(truth[k], 2) for k in ("involvement_percent", "involvement_percent_left",
                                                  "involvement_percent_right", "lung_volume_ml",
                                                  "lesion_volume_ml")} | {"category": truth["category"]},
        "measured": {k: cold.get(k) for k in ("status", "category", "involvement_percent",
                                              "involvement_percent_left", "involvement_percent_right",
                                              "lung_volume_ml", "lesion_volume_ml", "lesion_count")},
        "warm_timings": warm["timings"],
        "deterministic": warm["same_as_first"] and warm["involvement_percent"] == cold.get("involvement_percent"),
    }
    ok = (cold_wall <= TARGET_S and max(cold_mb, warm["peak_rss_mb"]) <= TARGET_MB)
    report["within_targets"] = ok
    if not args.json:
        print(f"[{scorer}] {report['series']} on {report['machine']['cpus']} CPU(s), device "
              f"{report['machine']['device']}, load average {report['machine']['load_average_1min']}")
        print(f"  cold CLI (python start + torch import + load + score): {cold_wall:6.2f} s wall, "
              f"{cold_cpu:6.2f} s CPU, peak {cold_mb:6.0f} MB   (target {TARGET_S:g} s, {TARGET_MB:g} MB)")
        print(f"  warm (second call in a worker process):               {warm['warm_s']:6.2f} s, "
              f"peak {report['warm_process_peak_mb']:6.0f} MB")
        print("  stages (warm): " + ", ".join(f"{k} {v:.2f}" for k, v in warm["timings"].items()))
        t, m = report["truth"], report["measured"]
        print(f"  truth {t['category']} {t['involvement_percent']} % (L {t['involvement_percent_left']}, "
              f"R {t['involvement_percent_right']}), lungs {t['lung_volume_ml']} ml")
        print(f"  got   {m['category']} {m['involvement_percent']} % (L {m['involvement_percent_left']}, "
              f"R {m['involvement_percent_right']}), lungs {m['lung_volume_ml']} ml")
        print(f"  deterministic: {report['deterministic']}; within targets: {ok}")
    return report


if __name__ == "__main__":
    sys.exit(main())
