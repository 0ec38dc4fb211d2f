#!/usr/bin/env python
"""Benchmark: build and send the outputs (SR, SEG, SC series) of a 300-slice CT-3 study.

Issue 9 targets on this 2-core machine: everything built in at most 2 s, under 40 MB on
the wire, sent in at most 2 s. Measured here, in one process (a worker's steady state:
libraries imported and warmed by one small build first):

- the phantom ``ct-triage phantom P --involvement 62 --slices 300 --seed 4`` (written
  once to bench/out/, git-ignored), scored once by the classical scorer (its masks feed
  the SEG and the SR);
- build time of the SC series, the SEG and the SR separately (wall and CPU seconds: CPU
  is what the build costs when other processes share the cores), then encoding + durable
  writing of all files (what ``deliver_outputs`` does once per result version), bytes;
- send time of the stored files to Orthanc over loopback (one association, as a delivery);
- each ``CT_TRIAGE_SC_COMPRESSION`` value's SC size and build time (``--compressions``);
- the anchor: the old code (``--anchor /work/main``, default: that folder when it exists)
  run by its own Python in a child process on the same series and result, building the
  SC series and the SR it used to build per delivery attempt, encoding them, and sending
  them to a fresh Orthanc, in the same run.

Usage:  .venv/bin/python bench/outputs_bench.py [--slices 300] [--rows 512] [--involvement 62]
        [--seed 4] [--anchor PATH|none] [--compressions] [--json] [--check]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.phantoms import add_phantom_arguments, cached_phantom  # noqa: E402 (after the checkout is on sys.path)

TARGET_BUILD_S = 2.0
TARGET_MB = 40.0
TARGET_SEND_S = 2.0


class Clock:
    def __init__(self):
        self.wall = time.perf_counter()
        self.cpu = time.process_time()

    def stop(self) -> dict:
        return {"wall_s": round(time.perf_counter() - self.wall, 3), "cpu_s": round(time.process_time() - self.cpu, 3)}


def _load(folder: Path, order: list[str]):
    from pydicom import dcmread

    by_uid = {}
    for path in sorted((folder / "FC51").glob("*.dcm")):
        ds = dcmread(path)
        by_uid[str(ds.SOPInstanceUID)] = ds
    return [by_uid[uid] for uid in order]


def _score(folder: Path, cache: Path):
    """Score once (cached beside the phantom with its masks)."""
    if cache.exists():
        return pickle.loads(cache.read_bytes()), None
    from ct_triage.settings import Settings
    from worker.scoring.pipeline import score_path

    clock = Clock()
    result = score_path(folder / "FC51", Settings.from_env({}))
    took = clock.stop()
    cache.write_bytes(pickle.dumps(result))
    return result, took


def _orthanc(root: Path):
    from ct_triage_tools.pacs import OrthancServer

    return OrthancServer(root, aet="ORTHANC")


def _new(datasets, result, storage: Path, destination, compressions: bool) -> dict:
    from worker.delivery.scu import send_instances
    from worker.outputs.sc import build_secondary_capture_series
    from worker.outputs.seg import build_segmentation
    from worker.outputs.sr import build_measurement_report
    from worker.outputs.stored import result_folder, write_outputs

    # warm-up on a tiny slice of the work: imports, highdicom's standard tables
    build_measurement_report(datasets, result, 99, created_at=None)

    report: dict = {}
    clock = Clock()
    seg = build_segmentation(datasets, result, result.masks, 1, created_at=None)
    report["seg_build"] = clock.stop()
    clock = Clock()
    sr = build_measurement_report(datasets, result, 1, created_at=None, masks=result.masks, segmentation=seg)
    report["sr_build"] = clock.stop()
    clock = Clock()
    sc = build_secondary_capture_series(datasets, result, 1, created_at=None, compression="jpeg-baseline")
    report["sc_build"] = clock.stop()
    items = [("sr", sr), ("seg", seg), *(("sc", image) for image in sc)]
    clock = Clock()
    files = write_outputs(storage, result_folder(result.study_instance_uid, 1), items)
    report["encode_and_write"] = clock.stop()
    report["built_total_wall_s"] = round(sum(report[k]["wall_s"] for k in ("seg_build", "sr_build", "sc_build",
                                                                          "encode_and_write")), 3)
    report["built_total_cpu_s"] = round(sum(report[k]["cpu_s"] for k in ("seg_build", "sr_build", "sc_build",
                                                                        "encode_and_write")), 3)
    sizes: dict[str, int] = {}
    for f in files:
        sizes[f.role] = sizes.get(f.role, 0) + f.size_bytes
    report["instances"] = {"sr": 1, "seg": 1, "sc": len(sc)}
    report["mb"] = {k: round(v / 1e6, 3) for k, v in sizes.items()} | {"total": round(sum(sizes.values()) / 1e6, 2)}
    if destination is not None:
        paths = [storage / f.path for f in files]
        clock = Clock()
        sent = send_instances(destination, paths, calling_ae_title="CTTRIAGE")
        report["send"] = clock.stop() | {"outcome": sent.outcome, "instances": len(sent.delivered_sop_instance_uids)}
    if compressions:
        report["sc_compressions"] = {}
        from worker.outputs.stored import encode

        for name in ("none", "rle", "jpeg-baseline"):
            clock = Clock()
            images = build_secondary_capture_series(datasets, result, 1, created_at=None, compression=name)
            took = clock.stop()
            clock = Clock()
            size = sum(len(encode(image)) for image in images)
            report["sc_compressions"][name] = {"build": took, "encode": clock.stop(), "mb": round(size / 1e6, 2)}
    return report


ANCHOR_CODE = r"""
import json, pickle, sys, time, io
sys.path.insert(0, sys.argv[1])
from pydicom import dcmread
from worker.scoring.result import ScoreResult
from worker.outputs.sc import build_secondary_capture_series
from worker.outputs.sr import build_measurement_report
from worker.delivery.scu import send_instances
from ct_triage.settings import Destination
data = json.loads(open(sys.argv[2]).read())
result = ScoreResult.from_json(data["result"])
by = {}
for p in data["files"]:
    ds = dcmread(p); by[str(ds.SOPInstanceUID)] = ds
datasets = [by[u] for u in result.source_sop_instance_uids]
build_measurement_report(datasets[:], result, 99, created_at=None)  # warm-up
def clock():
    return time.perf_counter(), time.process_time()
def took(c):
    return {"wall_s": round(time.perf_counter() - c[0], 3), "cpu_s": round(time.process_time() - c[1], 3)}
out = {}
c = clock(); sc = build_secondary_capture_series(datasets, result, 1, created_at=None); out["sc_build"] = took(c)
c = clock(); sr = build_measurement_report(datasets, result, 1, created_at=None); out["sr_build"] = took(c)
c = clock()
size = 0
for ds in [*sc, sr]:
    buf = io.BytesIO(); ds.save_as(buf, enforce_file_format=True); size += len(buf.getvalue())
out["encode"] = took(c)
out["mb"] = round(size / 1e6, 2)
out["instances"] = len(sc) + 1
if data.get("port"):
    c = clock()
    rep = send_instances(Destination("ORTHANC", "127.0.0.1", data["port"]), [*sc, sr], calling_ae_title="CTTRIAGE")
    out["send"] = took(c) | {"outcome": rep.outcome}
print(json.dumps(out))
"""


def _anchor(anchor: Path, folder: Path, result, port: int | None) -> dict:
    python = anchor / ".venv" / "bin" / "python"
    if not python.exists():
        return {"error": f"no {python}"}
    with tempfile.TemporaryDirectory() as tmp:
        payload = Path(tmp) / "input.json"
        payload.write_text(json.dumps({"result": result.to_json(), "port": port,
                                       "files": [str(p) for p in sorted((folder / "FC51").glob("*.dcm"))]}))
        script = Path(tmp) / "anchor.py"
        script.write_text(ANCHOR_CODE)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CT_TRIAGE_") and k != "PYTHONPATH"}
        proc = subprocess.run([str(python), str(script), str(anchor), str(payload)], capture_output=True, text=True,
                              cwd=tmp, env=env, timeout=1800)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_phantom_arguments(parser, involvement=62.0, seed=4)
    parser.add_argument("--anchor", default="/work/main", help="checkout of the old code with its .venv, or 'none'")
    parser.add_argument("--compressions", action="store_true", help="also build the SC with each compression")
    parser.add_argument("--no-send", action="store_true", help="skip Orthanc")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)

    folder = cached_phantom(args.out, args.involvement, args.slices, args.rows, args.seed)
    result, scored = _score(folder, folder / "result-with-masks.pickle")
    datasets = _load(folder, result.source_sop_instance_uids)
    report: dict = {
        "series": f"{args.slices}x{args.rows}x{args.rows} phantom, {args.involvement:g} % requested, seed {args.seed}",
        "result": f"{result.category} {result.involvement_percent} %, {len(result.boxes)} slice boxes, "
                  f"{result.lesion_count} 3-D lesions",
        "cpus": len(os.sched_getaffinity(0)),
        "load_average": [round(v, 1) for v in os.getloadavg()],
    }
    if scored:
        report["scoring"] = scored
    with tempfile.TemporaryDirectory() as tmp:
        pacs = None if args.no_send else _orthanc(Path(tmp) / "orthanc-new").start()
        try:
            report["new"] = _new(datasets, result, Path(tmp) / "storage", pacs.destination if pacs else None,
                                 args.compressions)
        finally:
            if pacs:
                pacs.stop()
        if args.anchor != "none" and Path(args.anchor).exists():
            pacs = None if args.no_send else _orthanc(Path(tmp) / "orthanc-old").start()
            try:
                report["old"] = _anchor(Path(args.anchor), folder, result, pacs.dicom_port if pacs else None)
            finally:
                if pacs:
                    pacs.stop()
    report["targets"] = {"built_s": TARGET_BUILD_S, "wire_mb": TARGET_MB, "sent_s": TARGET_SEND_S}
    report["within_targets"] = _within_targets(report["new"])
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        _print_report(report)
    return 0 if (all(report["within_targets"].values()) or not args.check) else 1


def _within_targets(new: dict) -> dict[str, bool]:
    """Issue 9's targets, each met or not by the new code's measurements."""
    return {
        "built_wall": new["built_total_wall_s"] <= TARGET_BUILD_S,
        "built_cpu": new["built_total_cpu_s"] <= TARGET_BUILD_S,
        "wire": new["mb"]["total"] < TARGET_MB,
        "sent": "send" in new and new["send"]["wall_s"] <= TARGET_SEND_S,
    }


def _print_report(report: dict) -> None:
    """The report as text: the new code's timings and sizes, then the anchor's."""
    new = report["new"]
    print(f"{report['series']}: {report['result']}; {report['cpus']} CPUs, load {report['load_average']}")
    for key in ("seg_build", "sr_build", "sc_build", "encode_and_write"):
        print(f"  new {key:17s} {new[key]['wall_s']:7.2f} s wall {new[key]['cpu_s']:7.2f} s cpu")
    print(f"  new built total        {new['built_total_wall_s']:7.2f} s wall {new['built_total_cpu_s']:7.2f} s cpu"
          f"   (target {TARGET_BUILD_S:g} s)")
    print(f"  new bytes              {new['mb']}  instances {new['instances']}   (target < {TARGET_MB:g} MB)")
    if "send" in new:
        print(f"  new send to Orthanc    {new['send']['wall_s']:7.2f} s wall ({new['send']['outcome']})"
              f"   (target {TARGET_SEND_S:g} s)")
    for name, row in new.get("sc_compressions", {}).items():
        print(f"  SC {name:13s} build {row['build']['wall_s']:6.2f} s, encode {row['encode']['wall_s']:5.2f} s, "
              f"{row['mb']:7.2f} MB")
    old = report.get("old")
    if old and "error" not in old:
        for key in ("sc_build", "sr_build", "encode"):
            print(f"  old {key:17s} {old[key]['wall_s']:7.2f} s wall {old[key]['cpu_s']:7.2f} s cpu")
        print(f"  old bytes              {old['mb']} MB, {old['instances']} instances")
        if "send" in old:
            print(f"  old send to Orthanc    {old['send']['wall_s']:7.2f} s wall ({old['send']['outcome']})")
    elif old:
        print(f"  old: {old['error']}")
    print(f"  within targets: {report['within_targets']}")

if __name__ == "__main__":
    sys.exit(main())
