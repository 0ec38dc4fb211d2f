"""The node as a real process: SIGKILL mid-series, restart recovery, the Redis broker path, status."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import redis
from sqlalchemy import func, select

from ct_triage.settings import Settings
from db import repository
from db.models import Instance, Job, Result, Series
from db.session import make_engine, make_session_factory, session_scope
from tests.support.daemon import Daemon
from tests.support.scanner import acknowledged_files, free_port, require_dcmtk, storescu, write_ct_series
from tests.test_node import dataset_digest, wait_for


@pytest.fixture(autouse=True)
def _dcmtk():
    require_dcmtk()


def node_env(tmp_path, database_url: str, port: int, **extra) -> dict[str, str]:
    env = {"CT_TRIAGE_VAR_DIR": str(tmp_path / "var"), "CT_TRIAGE_DATABASE_URL": database_url,
           "CT_TRIAGE_STORAGE_DIR": str(tmp_path / "storage"), "CT_TRIAGE_PORT": str(port),
           "CT_TRIAGE_BIND_ADDRESS": "127.0.0.1", "CT_TRIAGE_STABLE_AGE_S": "2",
           "CT_TRIAGE_POLL_INTERVAL_S": "0.2", "CT_TRIAGE_MIN_FREE_DISK_MB": "1", "CT_TRIAGE_BROKER_URL": ""}
    env.update({f"CT_TRIAGE_{k.upper()}": str(v) for k, v in extra.items()})
    return env


def queued_series(factory) -> Series:
    """The one series once it is queued; exactly one job was made for it."""
    def queued():
        with factory() as session:
            row = session.scalar(select(Series))
            return row is not None and row.state == "queued" and row  # None: not indexed yet
    row = wait_for(queued, timeout=30)
    with factory() as session:
        assert session.scalar(select(func.count(Job.id))) == 1
    return row


def test_sigkill_mid_series_loses_no_acknowledged_instance(tmp_path, sqlite_url):
    port = free_port()
    # A quiet period longer than the restart: the partial series is not scored on its own.
    env = node_env(tmp_path, sqlite_url, port, stable_age_s=20)
    series = write_ct_series(tmp_path / "series", 300, rows=256, columns=256, seed=11)
    node = Daemon(["node"], env, tmp_path / "node1.log").start()
    try:
        node.wait_dicom_ready(port)
        engine = make_engine(sqlite_url)
        factory = make_session_factory(engine)
        sender = storescu(port, series.paths, popen=True)

        def stored_count():
            with factory() as session:
                return session.scalar(select(func.count(Instance.id))) or 0
        wait_for(lambda: stored_count() >= 100, timeout=60, interval=0.02)
        node.kill9()
        output, _ = sender.communicate(timeout=60)
    finally:
        node.stop()
    acked = acknowledged_files(output)
    assert 90 <= len(acked) < 300, f"{len(acked)} acknowledged"  # a committed row may await its response
    assert sender.returncode != 0

    by_path = {str(p): uid for p, uid in zip(series.paths, series.sop_instance_uids)}
    storage = tmp_path / "storage"
    # Restart: files acknowledged but not yet indexed when the node died are indexed
    # before the node accepts associations (C-ECHO answers only then).
    node = Daemon(["node"], env, tmp_path / "node2.log").start()
    try:
        node.wait_dicom_ready(port)
        with factory() as session:
            rows = {i.sop_instance_uid: i for i in session.scalars(select(Instance))}
        for path in acked:
            uid = by_path[path]
            assert uid in rows, f"acknowledged {uid} missing from the database"
            assert dataset_digest(storage / rows[uid].path) == dataset_digest(path)
        # Resend everything: duplicates succeed, the series completes, one job.
        result = storescu(port, series.paths)
        assert result.returncode == 0, result.stderr[-2000:]
        row = queued_series(factory)
        assert row.instance_count == 300
    finally:
        node.stop()
        engine.dispose()


def test_sigkill_between_fsync_and_index_loses_nothing(tmp_path, sqlite_url):
    """The node dies after an instance is durable on disk and before its row exists (test
    hook CT_TRIAGE_TEST_KILL_AFTER_FSYNC): the restart indexes it before accepting anyone."""
    from dicom_node.uids import instance_relpath

    port = free_port()
    env = node_env(tmp_path, sqlite_url, port, stable_age_s=20)
    series = write_ct_series(tmp_path / "series", 60, rows=64, columns=64, seed=12)
    node = Daemon(["node"], {**env, "CT_TRIAGE_TEST_KILL_AFTER_FSYNC": "40"}, tmp_path / "node1.log").start()
    node.wait_dicom_ready(port)
    result = storescu(port, series.paths, timeout=120)
    assert node.process.wait(timeout=30) == -9, node.log()
    assert result.returncode != 0
    acked = acknowledged_files(result.stdout + result.stderr)
    assert len(acked) == 39, f"{len(acked)} acknowledged"
    fortieth = series.sop_instance_uids[39]
    storage = tmp_path / "storage"
    assert (storage / instance_relpath(fortieth)).is_file()  # durable, never acknowledged
    engine = make_engine(sqlite_url)
    factory = make_session_factory(engine)
    with factory() as session:
        assert session.scalar(select(Instance).where(Instance.sop_instance_uid == fortieth)) is None

    node = Daemon(["node"], env, tmp_path / "node2.log").start()
    try:
        node.wait_dicom_ready(port)
        with factory() as session:
            rows = {i.sop_instance_uid for i in session.scalars(select(Instance))}
        assert rows == set(series.sop_instance_uids[:40])
        assert "left without a row by the last run" in node.log()
        assert storescu(port, series.paths).returncode == 0
        row = queued_series(factory)
        assert row.instance_count == 60 and row.duplicate_count == 40
    finally:
        node.stop()
        engine.dispose()


def test_restart_queues_stable_but_unqueued_series(tmp_path, sqlite_url):
    """A series made stable just before a crash (no job yet) is queued when the node starts."""
    from ct_triage.runtime import open_database

    settings = Settings.from_env({}, database_url=sqlite_url, var_dir=tmp_path / "var")
    engine, factory = open_database(settings)
    record = repository.InstanceRecord(
        sop_instance_uid="1.2.3.4.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.2", study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.4", transfer_syntax_uid="1.2.840.10008.1.2.1", path="x", size_bytes=1,
        modality="CT")
    with session_scope(factory) as session:
        repository.record_instance(session, record)
        series = session.scalar(select(Series))
        repository.mark_stable(session, series, "quiet (before the crash)")
    port = free_port()
    node = Daemon(["node"], node_env(tmp_path, sqlite_url, port), tmp_path / "node.log").start()
    try:
        node.wait_dicom_ready(port)

        def job():
            with factory() as session:
                return session.scalar(select(Job).where(Job.published_at.is_not(None)))
        assert wait_for(job, timeout=20).study_version == 1
        with factory() as session:
            assert session.scalar(select(Series)).state == "queued"
    finally:
        node.stop()
        engine.dispose()


def test_redis_broker_path_node_publishes_and_a_worker_takes_the_job(tmp_path, postgres_url, redis_url):
    port = free_port()
    env = node_env(tmp_path, postgres_url, port, broker_url=redis_url)
    series = write_ct_series(tmp_path / "s", 10, rows=64, columns=64, seed=12)
    node = Daemon(["node"], env, tmp_path / "node.log").start()
    engine = make_engine(postgres_url)
    factory = make_session_factory(engine)
    worker = None
    try:
        node.wait_dicom_ready(port)
        assert storescu(port, series.paths).returncode == 0

        def published():
            with factory() as session:
                return session.scalar(select(Job).where(Job.published_at.is_not(None)))
        job = wait_for(published, timeout=30)
        # The message waits in Redis on the gpu queue: task name and the job ID, nothing else.
        message = json.loads(redis.Redis.from_url(redis_url).lindex("gpu", 0))
        assert message["headers"]["task"] == "ct_triage.score_study"
        assert message["headers"]["argsrepr"] == f"[{job.id}]"

        worker = Daemon(["worker", "--queues", "gpu"], env, tmp_path / "worker.log").start()

        def done():
            with factory() as session:
                return session.get(Job, job.id).state == "done"
        wait_for(done, timeout=120, interval=0.5)
        with factory() as session:
            assert session.scalar(select(func.count(Result.id))) == 1
    finally:
        if worker:
            worker.stop()
        node.stop()
        engine.dispose()


def test_status_prints_full_uids_with_wide_and_fits_120_columns_without(tmp_path, sqlite_url):
    from ct_triage.runtime import open_database

    settings = Settings.from_env({}, database_url=sqlite_url, var_dir=tmp_path / "var")
    engine, factory = open_database(settings)
    study_uid = "1.2.826.0.1.3680043.8.498.12345678901234567890123456789012345678901234"
    series_uid = study_uid + ".7"
    with session_scope(factory) as session:
        repository.record_instance(session, repository.InstanceRecord(
            sop_instance_uid=series_uid + ".1", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            study_instance_uid=study_uid, series_instance_uid=series_uid,
            transfer_syntax_uid="1.2.840.10008.1.2.1", path="x", size_bytes=1, modality="CT"))
    engine.dispose()
    env = {**node_env(tmp_path, sqlite_url, 11112), "CT_TRIAGE_STABLE_AGE_S": "15"}
    result = subprocess.run([sys.executable, "-m", "ct_triage_app.cli", "status", "--wide"], capture_output=True,
                            text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert study_uid in result.stdout and series_uid in result.stdout
    assert "receiving" in result.stdout
    compact = subprocess.run([sys.executable, "-m", "ct_triage_app.cli", "status"], capture_output=True, text=True,
                             env=env, timeout=60)
    assert compact.returncode == 0, compact.stderr
    assert max(len(line) for line in compact.stdout.splitlines()) <= 120, compact.stdout
    assert series_uid not in compact.stdout and f"{series_uid[:7]}...{series_uid[-8:]}" in compact.stdout
    assert re.search(r"receiving \(quiet for \d+ s of 15 s\)", compact.stdout), compact.stdout
    assert compact.stderr == "", compact.stderr  # no schema revision or other chatter on stderr



def test_load_bench_senders_are_drained_and_none_stalls(tmp_path, sqlite_url):
    """bench/load_bench.py in small: 8 concurrent senders x 2 studies of 300 slices, all
    from 127.0.0.1. storescu -v writes ~230 bytes per instance: a sender whose output
    nobody reads blocks after ~270 instances, and the node aborts it on the network
    timeout (5 s here). Every storescu exits 0 and every instance is indexed."""
    from bench.load_bench import run_load

    senders, studies, slices = 8, 2, 300
    port = free_port()
    # All 8 connect at the same instant from one address (as in the bench).
    env = node_env(tmp_path, sqlite_url, port, stable_age_s=3600, network_timeout_s=5, http_port=0,
                   max_pending_per_address=senders)
    plan = [[write_ct_series(tmp_path / "data" / f"s{sender}-{study}", slices, rows=16, columns=16,
                             seed=500 + sender * 10 + study, patient_id=f"LOAD{sender}{study}").folder
             for study in range(studies)] for sender in range(senders)]
    node = Daemon(["node"], env, tmp_path / "node.log").start()
    try:
        node.wait_dicom_ready(port)
        try:
            _, outputs = run_load(port, plan, "CTTRIAGE")
        except RuntimeError as exc:
            raise AssertionError(f"{exc}\n{node.log()[-3000:]}") from None
        assert sum(out.count("Received Store Response (Success)") for out in outputs) == senders * studies * slices
        engine = make_engine(sqlite_url)
        factory = make_session_factory(engine)

        def indexed():
            with factory() as session:
                return session.scalar(select(func.count(Instance.id))) or 0
        wait_for(lambda: indexed() == senders * studies * slices, timeout=30, interval=0.1)
        engine.dispose()
    finally:
        node.stop()
