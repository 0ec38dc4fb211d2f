"""The real-CT tests skip without ../shared/data, with the reason, except under CI, where they fail."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

PROBE = '''
from pathlib import Path
from tests.support.data import need

def test_needs_data():
    need(Path("/nonexistent/shared/data/lung-pet-ct-dx"))
'''


def run_probe(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess:
    (tmp_path / "test_probe.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = str(REPO_ROOT)
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "test_probe.py"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_missing_data_skips_with_the_reason_outside_ci_and_fails_under_ci(tmp_path):
    for ci in (None, "false", "0"):
        local = run_probe(tmp_path, ci)
        assert local.returncode == 0 and "1 skipped" in local.stdout, local.stdout
        assert "real test data not found at /nonexistent/shared/data/lung-pet-ct-dx" in local.stdout
    ci = run_probe(tmp_path, "true")
    assert ci.returncode == 1 and "1 failed" in ci.stdout, ci.stdout
    assert "CI must run the real-CT tests" in ci.stdout
