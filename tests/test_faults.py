"""Fault suite (``pytest -m faults``): real processes killed, real services stopped.

- node SIGKILLed 10 times at random points during 4 concurrent sends: every acknowledged
  instance on disk (same bytes) and indexed; every series complete after a resend; one job per
  study version.
- Celery worker SIGKILLed during scoring, then during delivery: the study is scored once and
  delivered once, with identical UIDs.
- Redis restarted mid-burst: stores go on (the database is the record); every study is scored
  without a hand.
- PostgreSQL restarted mid-burst: the node answers 0xA702 for what it cannot record, never
  Success; after a resend every study is scored without a hand.
- PACS down for 2 minutes during a burst of 10 studies: all delivered after it returns (HIGH
  first, asserted once delivery ordering is in).

Redis and PostgreSQL restarts use private servers on free ports (tests.support.services), never
the machine's shared ones. Phantoms are small (24-40 slices of 64 x 64) to keep CPU use low.
"""

from __future__ import annotations

import inspect
import random
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from db.models import Delivery, Instance, Job, Result, Series, Study
from db.session import make_engine, make_session_factory
from db.types import utcnow
from tests.support import orthanc as orthanc_support
from tests.support.daemon import Daemon
from tests.support.orthanc import OrthancServer
from tests.support.scanner import acknowledged_files, free_port, require_dcmtk, storescu, write_ct_series
from tests.support.services import PrivatePostgres, PrivateRedis
from tests.test_node import dataset_digest, wait_for
from tests.test_node_process import node_env

pytestmark = pytest.mark.faults

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"


@pytest.fixture(autouse=True)
def _tools():
    require_dcmtk()


def _phantom(folder: Path, involvement: float, seed: int, slices: int = 24) -> list[Path]:
    from ct_triage_tools.phantom import write_phantom

    write_phantom(folder, involvement, seed=seed, slices=slices, rows=64, kernels=("FC51",))
    return sorted(folder.rglob("*.dcm"))


def _study_uid(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)


class Db:
    def __init__(self, url: str):
        self.engine = make_engine(url)
        self.factory = make_session_factory(self.engine)

    def scalar(self, stmt):
        with self.factory() as session:
            return session.scalar(stmt)

    def all(self, stmt):
        with self.factory() as session:
            return session.scalars(stmt).all()

    def close(self):
        self.engine.dispose()


def _assert_acknowledged_are_stored(outputs: list[str], by_path: dict[str, str], db: Db, storage: Path) -> int:
    rows = {i.sop_instance_uid: i for i in db.all(select(Instance))}
    count = 0
    for output in outputs:
        for path in acknowledged_files(output):
            row = rows.get(by_path[path])
            assert row is not None, f"acknowledged {path} is not indexed"
            assert dataset_digest(storage / row.path) == dataset_digest(path), f"{path}: stored bytes differ"
            count += 1
    return count


# -- node SIGKILL -------------------------------------------------------------------------
def test_node_sigkilled_10_times_during_4_concurrent_sends(tmp_path, postgres_url):
    rng = random.Random(20261130)
    port = free_port()
    # Long quiet period: partial series are not settled between kills; ImagesInAcquisition completes them.
    env = node_env(tmp_path, postgres_url, port, stable_age_s=300)
    series = [write_ct_series(tmp_path / f"s{i}", 60, rows=64, columns=64, seed=300 + i) for i in range(4)]
    by_path = {str(p): uid for s in series for p, uid in zip(s.paths, s.sop_instance_uids)}
    db = Db(postgres_url)
    storage = tmp_path / "storage"
    all_outputs: list[str] = []
    try:
        for kill in range(10):
            node = Daemon(["node"], env, tmp_path / f"node{kill}.log").start()
            try:
                node.wait_dicom_ready(port)
                senders = [storescu(port, s.paths, popen=True) for s in series]
                time.sleep(rng.uniform(0.1, 1.5))
                node.kill9()
                outputs = [sender.communicate(timeout=120)[0] for sender in senders]
            finally:
                node.stop()
            all_outputs.extend(outputs)
        # Restart (acknowledged files spooled without a row are indexed before the first
        # association is accepted); then the scanners resend everything: duplicates answer
        # Success, every series completes.
        node = Daemon(["node"], env, tmp_path / "node-final.log").start()
        try:
            node.wait_dicom_ready(port)
            acknowledged = _assert_acknowledged_are_stored(all_outputs, by_path, db, storage)
            senders = [storescu(port, s.paths, popen=True) for s in series]
            for sender in senders:
                output = sender.communicate(timeout=300)[0]
                assert sender.returncode == 0, output[-2000:]
            for s in series:
                wait_for(lambda s=s: (row := db.scalar(select(Series).where(
                    Series.series_instance_uid == s.series_instance_uid))) and row.instance_count == 60
                    and row.state == "queued", timeout=60)
        finally:
            node.stop()
        assert db.scalar(select(func.count(Instance.id))) == 240
        for study in db.all(select(Study)):
            jobs = db.all(select(Job).where(Job.study_fk == study.id))
            versions = [job.study_version for job in jobs]
            assert len(versions) == len(set(versions)), f"two jobs for one version of {study.study_instance_uid}"
            assert study.version in versions
        print(f"10 kills: {acknowledged} acknowledged instances checked on disk and in the index")
    finally:
        db.close()


# -- Celery worker SIGKILL ----------------------------------------------------------------------
def test_worker_sigkilled_during_scoring_and_during_delivery(tmp_path, postgres_url, redis_url):
    orthanc_support.require_orthanc()
    files = _phantom(tmp_path / "phantom", 40, seed=21)
    study_uid = _study_uid(files[0])
    port = free_port()
    db = Db(postgres_url)
    with OrthancServer(tmp_path, aet="ORTHANC") as pacs:
        env = node_env(tmp_path, postgres_url, port, broker_url=redis_url, stable_age_s=1,
                       destinations=str(pacs.destination), retry_base_s=1, retry_max_s=5)
        node = Daemon(["node"], env, tmp_path / "node.log").start()
        workers: list[Daemon] = []

        def start_worker() -> Daemon:
            worker = Daemon(["worker", "--queues", "gpu,io", "--concurrency", "1"], env,
                            tmp_path / f"worker{len(workers)}.log").start()
            workers.append(worker)
            return worker

        def dump() -> str:
            return "\n".join(f"--- {d.log_path.name}\n{d.log()[-4000:]}" for d in [node, *workers])

        try:
            node.wait_dicom_ready(port)
            worker = start_worker()
            assert storescu(port, files).returncode == 0
            def until(predicate, what: str, timeout: float, interval: float) -> None:
                try:
                    wait_for(predicate, timeout=timeout, interval=interval)
                except AssertionError:
                    raise AssertionError(f"{what} within {timeout} s:\n{dump()}") from None

            until(lambda: db.scalar(select(Job.state)) == "running", "no scoring", 180, 0.05)
            worker.kill9()  # during scoring
            worker = start_worker()
            until(lambda: db.scalar(select(Delivery.state)) == "sending", "no delivery", 240, 0.02)
            worker.kill9()  # during delivery
            worker = start_worker()
            until(lambda: db.scalar(select(Delivery.state)) == "delivered", "not delivered after the kills", 240, 0.2)
        finally:
            for w in workers:
                w.stop()
            node.stop()
        logs = "".join(w.log() for w in workers)
        assert "requeued running task(s) of stopped processes" in logs  # both kills were recovered at the next start
        assert db.scalar(select(func.count(Result.id))) == 1
        assert db.scalar(select(func.count(Delivery.id))) == 1
        assert db.scalar(select(func.count(Job.id))) == 1
        # Identical UIDs: what Orthanc holds is exactly what the stored result builds.
        from worker.tasks.outputs import build_outputs

        with db.factory() as session:
            result = session.scalar(select(Result))
            expected = {str(ds.SOPInstanceUID) for _, ds in build_outputs(session, result, tmp_path / "storage")}
        held = {pacs.instance_tags(i)["SOPInstanceUID"] for i in pacs.instances()}
        assert held == expected
        assert all(pacs.instance_tags(i)["StudyInstanceUID"] == study_uid for i in pacs.instances())
    db.close()


# -- Redis and PostgreSQL restarts ---------------------------------------------------------------
def test_redis_restarted_mid_burst(tmp_path, postgres_url):
    redis_server = PrivateRedis().start()
    bursts = [_phantom(tmp_path / f"p{i}", 10 + 20 * i, seed=40 + i, slices=40) for i in range(3)]
    by_path = {str(p): str(i) for i, p in enumerate(p for b in bursts for p in b)}
    port = free_port()
    db = Db(postgres_url)
    env = node_env(tmp_path, postgres_url, port, broker_url=redis_server.url, stable_age_s=1)
    node = Daemon(["node"], env, tmp_path / "node.log").start()
    worker = Daemon(["worker", "--queues", "gpu,io"], env, tmp_path / "worker.log").start()
    try:
        node.wait_dicom_ready(port)
        senders = [storescu(port, files, popen=True) for files in bursts]
        wait_for(lambda: (db.scalar(select(func.count(Instance.id))) or 0) >= 20, timeout=60, interval=0.02)
        redis_server.restart_gracefully(down_s=4)
        outputs = [sender.communicate(timeout=120)[0] for sender in senders]
        for sender, output in zip(senders, outputs):
            assert sender.returncode == 0, output[-2000:]
            assert "Refused" not in output and "Failed" not in output  # the broker is not needed to store
        wait_for(lambda: db.scalar(select(func.count(Result.id)).join(Study, Study.id == Result.study_fk)
                                   .where(Result.version == Study.version,
                                          Result.status == "scored")) == 3, timeout=300, interval=0.5)
    finally:
        worker.stop()
        node.stop()
        redis_server.stop()
    assert db.scalar(select(func.count(Instance.id))) == len(by_path)
    assert db.scalar(select(func.count(Job.id))) == 3
    assert {r.status for r in db.all(select(Result))} == {"scored"}
    db.close()


def test_jobs_the_broker_lost_are_published_again(tmp_path, postgres_url):
    """Redis acknowledged the job, then lost it (crash within its fsync second, restored empty)."""
    redis_server = PrivateRedis().start()
    files = _phantom(tmp_path / "p", 30, seed=47, slices=30)
    port = free_port()
    db = Db(postgres_url)
    env = node_env(tmp_path, postgres_url, port, broker_url=redis_server.url, stable_age_s=1)
    env["CT_TRIAGE_REPUBLISH_AFTER_S"] = "8"
    node = Daemon(["node"], env, tmp_path / "node.log").start()
    worker = None
    try:
        node.wait_dicom_ready(port)
        result = storescu(port, files)
        assert result.returncode == 0, result.stdout[-2000:]
        wait_for(lambda: db.scalar(select(Job.published_at)) is not None, timeout=60, interval=0.2)
        subprocess.run(["redis-cli", "-p", str(redis_server.port), "flushall"], check=True, capture_output=True)
        worker = Daemon(["worker", "--queues", "gpu,io"], env, tmp_path / "worker.log").start()
        wait_for(lambda: db.scalar(select(func.count(Result.id)).where(Result.status == "scored")) == 1,
                 timeout=180, interval=0.5)
    finally:
        if worker is not None:
            worker.stop()
        node.stop()
        redis_server.stop()
    assert "publishing them again" in node.log()
    assert db.scalar(select(func.count(Job.id))) == 1
    db.close()


def test_postgresql_restarted_mid_burst(tmp_path):
    pg = PrivatePostgres().start()
    try:
        bursts = [_phantom(tmp_path / f"p{i}", 30, seed=50 + i, slices=40) for i in range(3)]
        by_path: dict[str, str] = {}
        from pydicom import dcmread

        for files in bursts:
            for path in files:
                by_path[str(path)] = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        port = free_port()
        env = node_env(tmp_path, pg.url, port, stable_age_s=1)
        serve = Daemon(["serve"], env, tmp_path / "serve.log").start()
        db = Db(pg.url)
        try:
            serve.wait_dicom_ready(port)
            senders = [storescu(port, files, popen=True) for files in bursts]
            wait_for(lambda: (db.scalar(select(func.count(Instance.id))) or 0) >= 15, timeout=60, interval=0.01)
            db.engine.dispose()
            pg.restart(down_s=4)
            outputs = [sender.communicate(timeout=180)[0] for sender in senders]
            refused = sum(o.count("Received Store Response (Refused: OutOfResources)") for o in outputs)
            # The scanner resends (as it does after a failure status) and everything resumes.
            for files in bursts:
                result = storescu(port, files)
                assert result.returncode == 0, result.stdout[-2000:]
            try:
                # Each study's current version scored (with a 1 s quiet period a partial study may
                # first have been scored as an earlier, not-applicable version: that is fine).
                wait_for(lambda: db.scalar(select(func.count(Result.id)).join(Study, Study.id == Result.study_fk)
                                           .where(Result.version == Study.version,
                                                  Result.status == "scored")) == 3, timeout=300, interval=0.5)
            except AssertionError:
                raise AssertionError(f"not every study scored after the restart:\n{serve.log()[-6000:]}") from None
            # Nothing acknowledged during the outage was lost: the spooled file is the record,
            # indexed once the database is back (dicom_node.indexer).
            acknowledged = _assert_acknowledged_are_stored(outputs, by_path, db, tmp_path / "storage")
        finally:
            serve.stop()
            db.close()
        log = serve.log()
        assert "database unavailable" in log or refused == 0, log[-3000:]
        print(f"PostgreSQL restart: {acknowledged} acknowledged before the resend, {refused} refused with 0xA702")
    finally:
        pg.destroy()


# -- PACS down -------------------------------------------------------------------------------------
def _delivery_orders_by_priority() -> bool:
    """True once delivery ordering (HIGH first; issue 9, o9) is in: asserted only then."""
    from db import repository

    return "priority" in inspect.getsource(repository.due_delivery_ids).lower()


def test_pacs_down_for_2_minutes_during_a_burst_of_10_studies(tmp_path, postgres_url):
    orthanc_support.require_orthanc()
    # 3 HIGH (CT-3, 60 %) and 7 LOW (CT-0) studies, interleaved.
    plan = [60 if i in (2, 5, 8) else 0 for i in range(10)]
    studies = [_phantom(tmp_path / f"p{i}", involvement, seed=60 + i) for i, involvement in enumerate(plan)]
    study_uids = [_study_uid(files[0]) for files in studies]
    port = free_port()
    db = Db(postgres_url)
    with OrthancServer(tmp_path, aet="ORTHANC") as pacs:
        env = node_env(tmp_path, postgres_url, port, stable_age_s=1, destinations=str(pacs.destination),
                       retry_base_s=2, retry_max_s=15)
        serve = Daemon(["serve"], env, tmp_path / "serve.log").start()
        try:
            serve.wait_dicom_ready(port)
            pacs.stop()
            down_at = time.monotonic()
            senders = [storescu(port, files, popen=True) for files in studies]
            for sender in senders:
                output = sender.communicate(timeout=120)[0]
                assert sender.returncode == 0, output[-2000:]
            time.sleep(max(0.0, 120 - (time.monotonic() - down_at)))
            assert db.scalar(select(func.count(Delivery.id)).where(Delivery.state == "delivered")) == 0
            pacs.start()
            up_at = utcnow()
            # Each study's current version delivered: with a 1 s quiet period, a study from one of ten
            # concurrent senders may first be scored from part of its slices as an earlier version.
            wait_for(lambda: db.scalar(select(func.count(Delivery.id)).join(Result)
                                       .join(Study, Study.id == Result.study_fk)
                                       .where(Result.version == Study.version,
                                              Delivery.state == "delivered")) == 10, timeout=180, interval=1.0)
        finally:
            serve.stop()
        deliveries = db.all(select(Delivery).join(Result).join(Study, Study.id == Result.study_fk)
                            .where(Result.version == Study.version))
        assert len(deliveries) == 10
        assert any(d.attempts >= 2 for d in deliveries)  # the PACS refused while it was down
        for delivery in deliveries:
            if delivery.created_at < up_at:  # scored while the PACS was down: delivered once it was back
                assert delivery.delivered_at >= up_at, (delivery.id, delivery.delivered_at, up_at)
        with db.factory() as session:
            order = [(d.result.priority, d.result.study.study_instance_uid) for d in
                     session.scalars(select(Delivery).where(Delivery.id.in_([d.id for d in deliveries]))
                                     .order_by(Delivery.delivered_at)).all()]
        priorities = {uid: p for p, uid in order}
        assert sorted(priorities[uid] for uid in study_uids).count("HIGH") == 3, priorities
        for uid in study_uids:  # an SR per study (an earlier partial version may have sent one more)
            assert pacs.post("/tools/find", {"Level": "Instance",
                                             "Query": {"SOPClassUID": SR_CLASS, "StudyInstanceUID": uid}}), uid
        if _delivery_orders_by_priority():
            firsts = [p for p, _ in order[:3]]
            assert firsts == ["HIGH"] * 3, order
    db.close()
