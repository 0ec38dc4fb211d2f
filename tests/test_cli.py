"""The command line as users run it: `serve` with embedded defaults, `status`, `demo`."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tests.support import orthanc as orthanc_support
from tests.support.daemon import Daemon
from tests.support.scanner import free_port, require_dcmtk, storescu, write_ct_series


def ct_triage(*args: str, cwd: Path, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("CT_TRIAGE_")}
    environment.update(env or {})
    return subprocess.run([sys.executable, "-m", "ct_triage_app.cli", *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=timeout)


def test_serve_with_embedded_defaults_completes_a_real_size_series(tmp_path):
    """The README's first command: no servers, SQLite under ./var, then `ct-triage status`."""
    require_dcmtk()
    series = write_ct_series(tmp_path / "study", 300, seed=21)  # 512x512, ~158 MB
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CT_TRIAGE_")}
    env.update({"CT_TRIAGE_PORT": str(port), "CT_TRIAGE_MIN_FREE_DISK_MB": "64"})
    workdir = tmp_path / "run"
    workdir.mkdir()
    daemon = Daemon(["serve"], {}, tmp_path / "serve.log")
    daemon.env = {**env, "PYTHONUNBUFFERED": "1"}
    original_cwd = os.getcwd()
    os.chdir(workdir)  # ./var is relative to where serve runs
    try:
        daemon.start()
    finally:
        os.chdir(original_cwd)
    try:
        daemon.wait_dicom_ready(port)
        result = storescu(port, series.paths, timeout=300)
        assert result.returncode == 0, result.stderr[-1000:]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            status = ct_triage("status", "--wide", cwd=workdir)
            line = next((row for row in status.stdout.splitlines() if series.series_instance_uid in row), "")
            if line and " receiving " not in line and " queued " not in line and " scoring " not in line:
                break
            time.sleep(1)
        assert status.returncode == 0, status.stderr
        assert (workdir / "var" / "ct-triage.sqlite").is_file()
        assert series.study_instance_uid in line and " 300 " in line, status.stdout
        # The study was taken by the embedded worker and has a result row in the worklist.
        assert series.study_instance_uid in status.stdout.split("RESULTS", 1)[1]
    finally:
        daemon.stop()
    log = daemon.log()
    assert "DOE^JANE" not in log and "19700101" not in log  # no PHI in the INFO log


def test_demo_runs_end_to_end(tmp_path):
    """As a newcomer runs it: the default (relative) --workdir var/demo, from some folder."""
    orthanc_support.require_orthanc()
    result = ct_triage("demo", cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("in PACS") == 3
    rows = [line.split() for line in result.stdout.splitlines() if line.strip().endswith("in PACS")]
    assert [(row[1], row[2]) for row in rows] == [("CT-1", "CT-1"), ("CT-2", "CT-2"), ("CT-3", "CT-3")]
    pngs = sorted((tmp_path / "var" / "demo").glob("summary-*.png"))
    assert len(pngs) == 3 and all(p.stat().st_size > 10_000 for p in pngs)


def test_status_names_its_database_and_says_when_nothing_wrote_to_it(tmp_path, postgres_url):
    from datetime import timedelta

    from sqlalchemy.engine import make_url

    from ct_triage.runtime import open_database
    from ct_triage.settings import Settings
    from db.models import RejectedInstance
    from db.session import session_scope
    from db.types import utcnow

    url = make_url(postgres_url).set(password="hunter2-secret").render_as_string(hide_password=False)
    engine, factory = open_database(Settings.from_env({}, database_url=url, var_dir=tmp_path / "var"))
    env = {"CT_TRIAGE_DATABASE_URL": url, "CT_TRIAGE_VAR_DIR": str(tmp_path / "var")}

    def status() -> str:
        result = ct_triage("status", cwd=tmp_path, env=env, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "hunter2" not in result.stdout + result.stderr
        return result.stdout.split("STORAGE", 1)[0]

    def refused(minutes_ago: float) -> None:
        with session_scope(factory) as session:
            session.add(RejectedInstance(received_at=utcnow() - timedelta(minutes=minutes_ago), status_code=0xC000,
                                         reason="test"))

    try:
        empty = status()
        assert f"database: {make_url(url).render_as_string(hide_password=True)}" in empty, empty
        assert "last write: never (empty database) - is the daemon running with this database?" in empty
        refused(37)
        assert "37 min ago - is the daemon running with this database?" in status()
        refused(0)
        recent = status()
        assert "less than a minute ago" in recent and "is the daemon running" not in recent, recent
    finally:
        engine.dispose()
