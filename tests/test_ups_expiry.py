"""Workitems that end (issue 17 item 9): expiry of unclaimed SCHEDULED workitems, and retention
of final ones. Real pynetdicom peers against the node, SQLite and PostgreSQL.
"""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from alembic import command
from sqlalchemy import func, select

from ct_triage.errors import ConfigError
from ct_triage.runtime import open_database
from db import worklist
from db.migrate import alembic_config
from db.models import UpsEvent, UpsSubscription, UpsWorkitem
from db.types import utcnow
from dicom_node import ups as ups_scp
from dicom_node.expiry import WorkitemExpiry, reason
from dicom_node.retention import sweep_workitems
from tests.conftest import make_settings
from tests.support.scanner import free_port
from tests.support.ups import UpsClient, UpsWatcher
from tests.test_node import wait_for
from tests.test_ups import seed

STUDY = "1.2.826.0.1.3680043.8.498.6"


def test_an_unclaimed_workitem_expires_a_claimed_one_does_not(start_node, database_url):
    watcher_port = free_port()
    watcher = UpsWatcher(watcher_port)
    running = start_node(database_url, worklist_expiry_h=1.0, worklist_admin_aes=["ADMIN@127.0.0.1"],
                         ups_subscribers=[f"WATCHER@127.0.0.1:{watcher_port}"])
    expired_calls: list[tuple[str, str]] = []
    running.node.expiry.on_expired = lambda workitem_uid, study_uid: expired_calls.append((workitem_uid, study_uid))
    now = utcnow()
    try:
        unclaimed = seed(running, STUDY + ".1", category="CT-3", percent=55.0, arrived=now)
        claimed = seed(running, STUDY + ".2", category="CT-2", percent=30.0, arrived=now)
        fresh = seed(running, STUDY + ".3", category="CT-1", percent=5.0, arrived=now)
        with UpsClient(running.port, ae_title="WATCHER") as client:
            # The expiration date time (arrival + 1 h) is served, in N-GET and C-FIND.
            status, ds = client.get(unclaimed)
            assert status == 0 and ds.ProcedureStepState == "SCHEDULED"
            assert ds.ScheduledProcedureStepExpirationDateTime == ups_scp._dt(now + timedelta(hours=1))
            status, ds = client.get(fresh, [0x00404008])
            assert status == 0 and ds.ScheduledProcedureStepExpirationDateTime == ups_scp._dt(now + timedelta(hours=1))
            found = client.find(SOPInstanceUID=fresh, ScheduledProcedureStepExpirationDateTime="")
            assert found[0].ScheduledProcedureStepExpirationDateTime == ups_scp._dt(now + timedelta(hours=1))
            assert client.subscribe("WATCHER") == 0
            watcher.wait_for_state(unclaimed, "SCHEDULED")
            status, transaction = client.claim(claimed)
            assert status == 0
            watcher.wait_for_state(claimed, "IN PROGRESS")
            # Two of them are now past their expiry (as if 2 h had gone by).
            with running.session() as session, session.begin():
                for item in session.scalars(select(UpsWorkitem).where(
                        UpsWorkitem.sop_instance_uid.in_([unclaimed, claimed]))):
                    item.expires_at = now - timedelta(minutes=1)

            running.node.expiry.wake()  # the sweep's thread, now rather than in INTERVAL_S
            states = watcher.wait_for_state(unclaimed, "CANCELED")
            assert states == ["SCHEDULED", "CANCELED"]
            report = [info for kind, uid, info in watcher.events
                      if uid == unclaimed and kind == 1 and info.ProcedureStepState == "CANCELED"][0]
            assert report.ReasonForCancellation == "expired: not claimed within 1 h (CT_TRIAGE_WORKLIST_EXPIRY_H)"

            status, ds = client.get(unclaimed)
            assert ds.ProcedureStepState == "CANCELED"
            assert ds.ProcedureStepProgressInformationSequence[0].ReasonForCancellation == reason(1.0)
            assert [str(d.SOPInstanceUID) for d in client.find(ProcedureStepState="SCHEDULED")] == [fresh]
            assert client.get(claimed)[1].ProcedureStepState == "IN PROGRESS"
            # The performer of an item past its expiry still completes it.
            assert client.complete(claimed, transaction) == (0, 0)
            assert client.claim(unclaimed)[0] == ups_scp.MAY_NO_LONGER_BE_UPDATED
        assert expired_calls == [(unclaimed, STUDY + ".1")]
        # Once: a second sweep finds nothing and reports nothing.
        assert running.node.expiry.sweep() == []
        assert expired_calls == [(unclaimed, STUDY + ".1")]
        with running.session() as session:
            canceled_reports = session.scalar(select(func.count()).select_from(UpsEvent).where(
                UpsEvent.payload_json.contains('"CANCELED"')))
            assert canceled_reports == 1
    finally:
        watcher.stop()


def test_a_failing_hook_does_not_stop_the_sweep(start_node, sqlite_url):
    running = start_node(sqlite_url, worklist_expiry_h=0.001)  # 3.6 s
    running.node.expiry.stop()  # this test sweeps itself
    arrived = utcnow()
    uids = [seed(running, f"{STUDY}.{i}", category="CT-1", percent=5.0, arrived=arrived) for i in (4, 5)]

    def hook(workitem_uid, study_uid):
        raise RuntimeError("audit trail down")
    running.node.expiry.on_expired = hook
    assert running.node.expiry.sweep(now=arrived + timedelta(seconds=3)) == []  # not yet: 3.6 s from arrival
    expired = wait_for(lambda: running.node.expiry.sweep(), timeout=15, interval=0.5)
    assert sorted(uid for uid, _ in expired) == sorted(uids)
    with running.session() as session:
        assert {w.state for w in session.scalars(select(UpsWorkitem))} == {"CANCELED"}


def test_two_sweepers_cancel_each_workitem_once(start_node, database_url):
    """Two nodes on one database: the row lock lets only one cancel (and report) each item."""
    running = start_node(database_url, worklist_expiry_h=1.0, ups_subscribers=["WATCHER@127.0.0.1:1"])
    running.node.expiry.stop()  # only the two below sweep
    old = utcnow() - timedelta(hours=3)
    uids = [seed(running, f"{STUDY}.1{i}", category="CT-2", percent=20.0, arrived=old) for i in range(12)]
    with running.session() as session, session.begin():
        worklist.subscribe(session, "WATCHER", None)
    engine2, factory2 = open_database(running.settings)
    try:
        sweepers = [WorkitemExpiry(running.session_factory, 1.0), WorkitemExpiry(factory2, 1.0)]
        results: list[list] = [[], []]
        barrier = threading.Barrier(2)

        def run(i):
            barrier.wait()
            results[i] = sweepers[i].sweep()
        threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        swept = [uid for result in results for uid, _ in result]
        assert sorted(swept) == sorted(uids)  # each once, by one of the two
        with running.session() as session:
            reports = session.scalars(select(UpsEvent).where(UpsEvent.payload_json.contains('"CANCELED"'))).all()
            assert len(reports) == len(uids)
    finally:
        engine2.dispose()


def test_retention_deletes_old_final_workitems_with_their_rows(start_node, database_url):
    running = start_node(database_url, retention_days=5.0, worklist_expiry_h=87600.0,
                         ups_subscribers=["WATCHER@127.0.0.1:1", "LOCKER@127.0.0.1:2"])
    now = utcnow()
    old_done = seed(running, STUDY + ".21", category="CT-1", percent=5.0, arrived=now - timedelta(days=9))
    recent_done = seed(running, STUDY + ".22", category="CT-1", percent=5.0, arrived=now - timedelta(days=9))
    old_open = seed(running, STUDY + ".23", category="CT-1", percent=5.0, arrived=now - timedelta(days=9))
    old_locked = seed(running, STUDY + ".24", category="CT-1", percent=5.0, arrived=now - timedelta(days=9))
    with running.session() as session, session.begin():
        worklist.subscribe(session, "WATCHER", old_done)
        worklist.subscribe(session, "LOCKER", old_locked, deletion_lock=True)
        for uid, when in ((old_done, now - timedelta(days=8)), (recent_done, now - timedelta(days=1)),
                          (old_locked, now - timedelta(days=8))):
            assert worklist.request_cancel(session, uid, requesting_ae="ADMIN", reason="done", now=when) == "ok"
    assert sweep_workitems(running.session_factory, retention_days=0) == 0  # 0: keep forever
    running.node.retention.sweep_once()  # as the node's retention thread does (RETENTION_DAYS=5)
    with running.session() as session:
        left = set(session.scalars(select(UpsWorkitem.sop_instance_uid)))
        assert left == {recent_done, old_open, old_locked}
        ids = set(session.scalars(select(UpsWorkitem.id)))
        assert set(session.scalars(select(UpsEvent.workitem_fk))) <= ids
        assert set(session.scalars(select(UpsSubscription.workitem_fk))) <= ids | {None}
    assert sweep_workitems(running.session_factory, retention_days=5) == 0  # idempotent
    with UpsClient(running.port) as client:
        assert client.get(old_done)[0] == ups_scp.NO_SUCH_WORKITEM
        assert client.get(recent_done)[1].ProcedureStepState == "CANCELED"


def test_migration_gives_open_workitems_72_h_and_final_ones_none(start_node, database_url):
    running = start_node(database_url, worklist_expiry_h=5.0, worklist_admin_aes=["ADMIN@127.0.0.1"])
    arrived = utcnow() - timedelta(hours=1)
    open_uid = seed(running, STUDY + ".31", category="CT-1", percent=5.0, arrived=arrived)
    final_uid = seed(running, STUDY + ".32", category="CT-1", percent=5.0, arrived=arrived)
    with running.session() as session, session.begin():
        worklist.request_cancel(session, final_uid, requesting_ae="ADMIN", reason="x")
    running.node.stop()
    config = alembic_config(database_url)
    command.downgrade(config, "0009_audit")
    command.upgrade(config, "head")
    with running.session_factory() as session:
        rows = {w.sop_instance_uid: w for w in session.scalars(select(UpsWorkitem))}
    assert rows[open_uid].expires_at == rows[open_uid].scheduled_at + timedelta(hours=72)
    assert rows[final_uid].expires_at is None


def test_the_setting_must_be_positive(tmp_path, sqlite_url):
    assert make_settings(tmp_path, sqlite_url).worklist_expiry_h == 72.0
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match="WORKLIST_EXPIRY_H"):
            make_settings(tmp_path, sqlite_url, worklist_expiry_h=bad)


def test_the_page_shows_when_a_scheduled_workitem_expires(start_node, sqlite_url):
    from dashboard.app import Dashboard, render_page

    running = start_node(sqlite_url, worklist_expiry_h=5.0, worklist_admin_aes=["ADMIN@127.0.0.1"])
    now = utcnow()
    scheduled = seed(running, STUDY + ".41", category="CT-3", percent=55.0, arrived=now - timedelta(hours=1))
    seed(running, STUDY + ".42", category="CT-1", percent=5.0, arrived=now - timedelta(hours=1))
    with running.session() as session, session.begin():
        canceled = session.scalar(select(UpsWorkitem).where(UpsWorkitem.study_instance_uid == STUDY + ".42"))
        worklist.request_cancel(session, canceled.sop_instance_uid, requesting_ae="ADMIN", reason="read in RIS")
    dash = Dashboard(running.settings, running.session_factory)  # what the page's route renders
    rows = dash.worklist()
    page = render_page(rows, [], utcnow(), 15, 72, expiries=dash.expiries(rows))
    rows = {uid: page[page.index(f'data-uid="{uid}"'):].split("</tr>")[0] for uid in (STUDY + ".41", STUDY + ".42")}
    assert scheduled and "worklist item expires in 3 h 5" in rows[STUDY + ".41"]  # 4 h less the seconds gone
    assert "expires" not in rows[STUDY + ".42"]  # CANCELED: nothing to expire
