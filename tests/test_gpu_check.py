"""bench/gpu_check on a machine without CUDA: the CPU path runs (scoring with both scorers,
the training-speed step), says there is no CUDA device, exits 0, and leaves torch's
deterministic algorithms off (they cost the CPU cold start; worker.scoring.device)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import json, runpy, sys, torch
main = runpy.run_path(sys.argv[1], run_name="gpu_check")["main"]
code = main(sys.argv[2:])
print(json.dumps({"code": code, "deterministic": torch.are_deterministic_algorithms_enabled()}))
"""


def test_gpu_check_cpu_path_reduced_sizes(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(ROOT / "bench" / "gpu_check"), "--slices", "24", "--rows", "128",
         "--scorer", "both", "--train-epoch", "--train-samples", "48", "--train-size", "64",
         "--train-data", "", "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    report, probe = lines[0], lines[-1]
    assert probe == {"code": 0, "deterministic": False}
    assert "no CUDA device" in proc.stderr
    assert report["result"] == "no_cuda" and report["cuda_available"] is False
    for name in ("classical", "hybrid"):
        assert report[f"cpu_{name}"]["status"] == "scored", report[f"cpu_{name}"]
    assert report["cpu_hybrid"]["model_version"].startswith("0.1.0+")  # the shipped weights' digest
    train = report["training"]
    assert train["data"].startswith("random images") and train["cpu"]["timed_samples"] > 0
    assert train["cpu"]["epoch_s_estimate"] > 0 and "cuda" not in train


def test_gpu_check_refuses_bad_weights(tmp_path):
    bad = tmp_path / "lesion_net.pt"
    bad.write_bytes(b"not a weights file")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check"), "--slices", "24", "--rows", "128",
                           "--scorer", "hybrid", "--weights", str(bad)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "lesion weights" in proc.stderr and str(bad) in proc.stderr
