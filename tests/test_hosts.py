"""Several node hosts on one PostgreSQL database and storage folder (issue 18 item 2).

"Hosts" here are node processes with their own CT_TRIAGE_NODE_ID and port on this machine,
sharing the database and the storage, as two hosts share them over the network.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from db.models import Instance, Node, Series
from db.session import make_engine, make_session_factory
from dicom_node.leases import LeaseHolder
from tests.support.daemon import Daemon
from tests.support.scanner import acknowledged_files, free_port, require_dcmtk, storescu, write_ct_series
from tests.test_commitment import ScannerSCP, _n_action_then_release, _request
from tests.test_node import wait_for
from tests.test_node_process import node_env


@pytest.fixture(autouse=True)
def _tools():
    require_dcmtk()


# -- leases ------------------------------------------------------------------------------------
def test_a_lease_is_held_by_one_process_and_moves_when_it_goes(postgres_url):
    from db.migrate import upgrade

    engine = make_engine(postgres_url)
    upgrade(engine)
    engine.dispose()
    first, second = LeaseHolder(postgres_url), LeaseHolder(postgres_url)
    taken = threading.Event()
    lease_a = first.lease("duty")
    lease_b = second.lease("duty", on_acquired=taken.set)
    try:
        first.start()
        row = first.register("a", "host-a", 1)
        second.start()
        assert lease_a.held() and not lease_b.held()
        assert not second.confirm_dead(row)  # its session is there
        first.stop()  # as a killed process: its connection closes
        assert taken.wait(5) and lease_b.held()
        assert second.confirm_dead(row)
    finally:
        first.stop()
        second.stop()


def test_sqlite_leases_are_always_held(sqlite_url):
    holder = LeaseHolder(sqlite_url)
    holder.start()
    assert holder.lease("completeness").held()
    holder.stop()


# -- refusals -----------------------------------------------------------------------------------
def test_a_second_node_on_sqlite_refuses_to_start(start_node, sqlite_url, tmp_path):
    start_node(sqlite_url)
    env = node_env(tmp_path, sqlite_url, free_port())
    result = subprocess.run([sys.executable, "-m", "ct_triage_app.cli", "node"], env={**__import__("os").environ,
                            **env}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if "CT_TRIAGE_DATABASE_URL" in line]
    assert len(errors) == 1 and "PostgreSQL" in errors[0], result.stderr


def test_a_node_id_used_by_a_live_node_on_another_host_is_refused(start_node, postgres_url, monkeypatch):
    from ct_triage.errors import ConfigError

    start_node(postgres_url, node_id="ward-1")
    monkeypatch.setattr("dicom_node.nodes.socket.gethostname", lambda: "another-host")
    with pytest.raises(ConfigError, match="CT_TRIAGE_NODE_ID"):
        start_node(postgres_url, node_id="ward-1", port=free_port())


# -- a killed node's acknowledged instances ---------------------------------------------------------
def test_a_survivor_indexes_what_a_killed_node_acknowledged(tmp_path, postgres_url):
    """Node A acknowledges 39 instances without indexing any (test hook), and is SIGKILLed at the
    40th (durable, not acknowledged); node B, another "host" on the same database and storage,
    indexes the 39 within 30 s, once each; the scanner's resend to B completes the series.
    The 40th may be indexed too: its journal line is written beside its fsync, and its file is
    whole (as the node's own start-up scan would index it); never anything after it."""
    port_a, port_b = free_port(), free_port()
    series = write_ct_series(tmp_path / "series", 60, rows=64, columns=64, seed=18)
    node_b = Daemon(["node"], node_env(tmp_path, postgres_url, port_b, stable_age_s=60, node_id="host-b"),
                    tmp_path / "b.log").start()
    node_a = Daemon(["node"], {**node_env(tmp_path, postgres_url, port_a, stable_age_s=60, node_id="host-a"),
                               "CT_TRIAGE_TEST_KILL_AFTER_FSYNC": "40", "CT_TRIAGE_TEST_HOLD_INDEXING": "1"},
                    tmp_path / "a.log").start()
    engine = make_engine(postgres_url)
    factory = make_session_factory(engine)
    try:
        node_b.wait_dicom_ready(port_b)
        node_a.wait_dicom_ready(port_a)
        result = storescu(port_a, series.paths, timeout=120)
        killed_at = time.monotonic()
        assert node_a.process.wait(timeout=30) == -9, node_a.log()
        assert len(acknowledged_files(result.stdout + result.stderr)) == 39

        def indexed() -> int:
            with factory() as session:
                return session.scalar(select(func.count(Instance.id))) or 0

        wait_for(lambda: indexed() >= 39, timeout=30)
        took = time.monotonic() - killed_at
        print(f"survivor indexed the killed node's 39 instances {took:.1f} s after the kill")
        time.sleep(2)  # nothing more comes
        with factory() as session:
            rows = {i.sop_instance_uid for i in session.scalars(select(Instance))}
            assert set(series.sop_instance_uids[:39]) <= rows <= set(series.sop_instance_uids[:40])
            recovered = len(rows)
            row = session.scalar(select(Series))
            assert row.instance_count == recovered and row.duplicate_count == 0
            dead = session.scalar(select(Node).where(Node.node_id == "host-a"))
            assert dead.recovered_at is not None
        assert f"indexed {recovered} instance(s) that node host-a" in node_b.log(), node_b.log()
        assert took < 30, took
        assert not list((tmp_path / "storage" / "journal").glob(f"node-{dead.id}.*.log"))

        # The scanner sends the series again, to the survivor: complete, nothing indexed twice.
        assert storescu(port_b, series.paths).returncode == 0
        with factory() as session:
            wait_for(lambda: session.scalar(select(func.count(Instance.id))) == 60, timeout=30)
        with factory() as session:
            row = session.scalar(select(Series))
            assert row.instance_count == 60 and row.duplicate_count == recovered
    finally:
        node_a.stop()
        node_b.stop()
        engine.dispose()


# -- storage commitment asked of another node ------------------------------------------------------
def test_commitment_asked_of_node_b_for_instances_node_a_received(start_node, postgres_url, tmp_path):
    """B answers from the database, waiting for instances A acknowledged and has not indexed yet."""
    scanner_port = free_port()
    node_a = start_node(postgres_url, node_id="host-a")
    node_b = start_node(postgres_url, node_id="host-b", port=free_port(),
                        commitment_peers=[f"SCANNER@127.0.0.1:{scanner_port}"])
    held: list = []
    submit = node_a.node.store.indexer.submit
    node_a.node.store.indexer.submit = held.append  # A's rows are late
    series = write_ct_series(tmp_path / "s", 3, rows=32, columns=32, seed=62)
    assert storescu(node_a.port, series.paths).returncode == 0
    assert len(held) == 3
    threading.Timer(2.0, lambda: [submit(record) for record in held]).start()
    scanner = ScannerSCP(scanner_port).start()
    try:
        unknown = generate_uid()
        request = _request(series.sop_instance_uids + [unknown])
        _n_action_then_release(node_b.port, request, [])
        assert scanner.received.wait(30), "no N-EVENT-REPORT from node B"
    finally:
        scanner.stop()
    event_type, info, _ = scanner.reports[0]
    assert sorted(i.ReferencedSOPInstanceUID for i in info.ReferencedSOPSequence) == sorted(series.sop_instance_uids)
    assert [i.ReferencedSOPInstanceUID for i in info.FailedSOPSequence] == [unknown]


# -- UPS events: sent by the notifier holding the lease, whichever node took the change ------------
def test_ups_change_through_node_a_is_reported_once_by_the_leaseholder(start_node, postgres_url):
    from tests.support.ups import UpsClient, UpsWatcher
    from tests.test_ups import NO_EXPIRY_H, T0, seed

    watcher_port = free_port()
    watcher = UpsWatcher(watcher_port)
    common = dict(ups_subscribers=[f"WATCHER@127.0.0.1:{watcher_port}"], worklist_expiry_h=NO_EXPIRY_H)
    node_b = start_node(postgres_url, node_id="host-b", **common)  # first: it takes the leases
    node_a = start_node(postgres_url, node_id="host-a", port=free_port(), **common)
    try:
        assert node_b.node.ups.notifier.lease.held()
        assert not node_a.node.ups.notifier.lease.held()
        uid = seed(node_a, "1.2.826.0.1.3680043.8.498.77", category="CT-3", percent=55.0, arrived=T0)
        with UpsClient(node_a.port, ae_title="WATCHER") as client:
            assert client.subscribe("WATCHER") == 0
            watcher.wait_for_state(uid, "SCHEDULED")
            status, transaction = client.claim(uid)
            assert status == 0
            watcher.wait_for_state(uid, "IN PROGRESS")
            # Node B goes: its lease moves to A, whose notifier reports the next change.
            node_b.node.stop(0)
            wait_for(lambda: node_a.node.ups.notifier.lease.held(), timeout=10)
            assert client.complete(uid, transaction) == (0, 0)
            assert watcher.wait_for_state(uid, "COMPLETED") == ["SCHEDULED", "IN PROGRESS", "COMPLETED"]
        time.sleep(1.5)  # no second copy of any report arrives
        assert watcher.states(uid) == ["SCHEDULED", "IN PROGRESS", "COMPLETED"]
    finally:
        watcher.stop()
