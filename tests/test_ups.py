"""UPS worklist (PS3.4 Annex CC) served by the node: real pynetdicom peers, SQLite and PostgreSQL.

The workitems are seeded through the same code the worker runs on a result commit
(worker.worklist.add_worklist_entries), so these tests need no scoring.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from pydicom.dataset import Dataset
from sqlalchemy import select

from db import repository
from db.models import Result, Study, UpsEvent, UpsWorkitem
from db.repository import InstanceRecord
from dicom_node import ups as ups_scp
from tests.support.scanner import free_port
from tests.support.ups import UpsClient, UpsWatcher
from tests.test_node import wait_for
from worker.scoring.result import ScoreResult
from worker.worklist.entries import add_worklist_entries

T0 = datetime(2026, 11, 30, 8, 0, tzinfo=UTC)
#: Workitems that outlive these tests: T0 is further back than CT_TRIAGE_WORKLIST_EXPIRY_H's 72 h, and
#: the node's expiry sweep (tests/test_ups_expiry.py) would otherwise cancel them at its next round.
NO_EXPIRY_H = 87600.0


@pytest.fixture
def start_node(start_node):
    """The conftest's node, with ``worklist_expiry_h=NO_EXPIRY_H`` unless a test names another."""
    def _start(database_url: str, **overrides):
        overrides.setdefault("worklist_expiry_h", NO_EXPIRY_H)
        return start_node(database_url, **overrides)
    return _start


def seed(running, study_uid: str, *, category: str | None, percent: float | None, arrived: datetime,
         patient_name: str = "DOE^JANE", accession: str = "ACC1", version: int = 1, status: str = "scored",
         reason: str | None = None) -> UpsWorkitem:
    """A study with one CT series, a result of ``version`` and its workitem, as the worker commits them."""
    score = ScoreResult(status=status, category=category, involvement_percent=percent,
                        involvement_percent_left=percent, involvement_percent_right=percent, reason=reason,
                        study_instance_uid=study_uid, series_instance_uid=study_uid + ".1")
    with running.session() as session, session.begin():
        for i in range(version):
            rec = InstanceRecord(sop_instance_uid=f"{study_uid}.1.{version}.{i}",
                                 sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                                 study_instance_uid=study_uid, series_instance_uid=study_uid + ".1",
                                 transfer_syntax_uid="1.2.840.10008.1.2.1", path="x.dcm", size_bytes=1,
                                 patient_id="PID-" + study_uid[-1], patient_name=patient_name,
                                 accession_number=accession, modality="CT")
            repository.record_instance(session, rec, now=arrived)
        study = session.scalar(select(Study).where(Study.study_instance_uid == study_uid))
        study.version = version
        series = study.series[0]
        result = Result(study_fk=study.id, version=version, series_fk=series.id, status=status, reason=reason,
                        category=category, priority=score.priority, involvement_percent=percent,
                        result_json=json.dumps(score.to_json()), scored_at=arrived + timedelta(minutes=1))
        session.add(result)
        session.flush()
        add_worklist_entries(session, running.settings, result, score)
        session.flush()
        return session.scalar(select(UpsWorkitem).where(UpsWorkitem.result_fk == result.id)).sop_instance_uid


@pytest.fixture
def worklist_node(start_node, database_url):
    running = start_node(database_url, worklist_admin_aes=["ADMIN@127.0.0.1"])
    uids = {
        "low": seed(running, "1.2.826.0.1.3680043.8.498.1", category="CT-1", percent=10.0, arrived=T0),
        "high": seed(running, "1.2.826.0.1.3680043.8.498.2", category="CT-3", percent=60.0,
                     arrived=T0 + timedelta(minutes=5), patient_name="O'BRIEN^ANNE"),
        "failed": seed(running, "1.2.826.0.1.3680043.8.498.3", category=None, percent=None, status="failed",
                       reason="no lung found", arrived=T0 + timedelta(minutes=1)),
        "medium": seed(running, "1.2.826.0.1.3680043.8.498.4", category="CT-2", percent=30.0,
                       arrived=T0 + timedelta(minutes=2)),
        "high_late": seed(running, "1.2.826.0.1.3680043.8.498.5", category="CT-4", percent=80.0,
                          arrived=T0 + timedelta(minutes=9)),
    }
    return running, uids


def test_c_find_orders_by_priority_then_arrival_and_matches_keys(worklist_node):
    running, uids = worklist_node
    with UpsClient(running.port) as client:
        found = client.find(ProcedureStepState="SCHEDULED")
        assert [str(d.SOPInstanceUID) for d in found] == [uids["high"], uids["high_late"], uids["failed"],
                                                         uids["medium"], uids["low"]]
        assert [d.ScheduledProcedureStepPriority for d in found] == ["HIGH", "HIGH", "MEDIUM", "MEDIUM", "LOW"]
        assert all(d.WorklistLabel == "COVID-19 CT triage" for d in found)
        assert found[0].ProcedureStepLabel == "CT-3 60.0% (R 60.0 / L 60.0)"
        assert found[2].ProcedureStepLabel == "Not scored: failed"
        assert "no lung found" in found[2].CommentsOnTheScheduledProcedureStep
        assert "NOT FOR DIAGNOSTIC USE" in found[0].CommentsOnTheScheduledProcedureStep
        assert all(not d.get("TransactionUID") for d in found)
        inputs = found[0].InputInformationSequence
        assert inputs[0].StudyInstanceUID == "1.2.826.0.1.3680043.8.498.2"
        assert inputs[0].ReferencedSOPSequence[0].ReferencedSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
        assert inputs[0].DICOMRetrievalSequence[0].RetrieveAETitle == "CTTRIAGE"

        assert [str(d.SOPInstanceUID) for d in client.find(ScheduledProcedureStepPriority="MEDIUM")] == [
            uids["failed"], uids["medium"]]
        assert [str(d.SOPInstanceUID) for d in client.find(PatientName="O'BRIEN*")] == [uids["high"]]
        assert [str(d.SOPInstanceUID) for d in client.find(StudyInstanceUID="1.2.826.0.1.3680043.8.498.4")] == [
            uids["medium"]]
        window = client.find(ScheduledProcedureStepStartDateTime="20261130080030-20261130080600")
        assert [str(d.SOPInstanceUID) for d in window] == [uids["high"], uids["failed"], uids["medium"]]
        assert client.find(PatientID="NOBODY") == []
        status, ds = client.get(uids["high"])
        assert status == 0 and ds.ProcedureStepState == "SCHEDULED" and "TransactionUID" not in ds
        assert ds.PatientName == "O'BRIEN^ANNE" and ds.ReferencedRequestSequence[0].AccessionNumber == "ACC1"
        status, ds = client.get(uids["high"], [0x00741000, 0x00741200, 0x00081195])
        assert status == 0 and ds.ProcedureStepState == "SCHEDULED" and ds.ScheduledProcedureStepPriority == "HIGH"
        assert "TransactionUID" not in ds and "PatientName" not in ds


def test_claim_progress_complete_follow_the_state_machine(worklist_node):
    running, uids = worklist_node
    uid = uids["high"]
    with UpsClient(running.port) as client, UpsClient(running.port, ae_title="OTHER") as other:
        assert client.change_state(uid, "COMPLETED", "1.2.3") == ups_scp.NOT_IN_PROGRESS
        assert client.change_state(uid, "SCHEDULED", None) == ups_scp.SCHEDULED_ONLY_BY_CREATE
        assert client.change_state(uid, "DONE", "1.2.3") == ups_scp.INVALID_STATE
        status, transaction = client.claim(uid)
        assert status == 0
        assert other.claim(uid)[0] == ups_scp.ALREADY_IN_PROGRESS
        progress = Dataset()
        item = Dataset()
        item.ProcedureStepProgress = 50
        item.ProcedureStepProgressDescription = "reading"
        progress.ProcedureStepProgressInformationSequence = [item]
        assert other.set(uid, progress) == ups_scp.WRONG_TRANSACTION_UID
        progress.TransactionUID = transaction
        assert client.set(uid, progress) == 0
        assert client.change_state(uid, "COMPLETED", transaction) == ups_scp.FINAL_STATE_REQUIREMENTS
        assert other.complete(uid, "1.2.3.4")[0] == ups_scp.WRONG_TRANSACTION_UID
        assert client.complete(uid, transaction) == (0, 0)
        assert client.change_state(uid, "COMPLETED", transaction) == ups_scp.ALREADY_COMPLETED_WARNING
        assert client.set(uid, progress) == ups_scp.MAY_NO_LONGER_BE_UPDATED
        assert client.request_cancel(uid) == ups_scp.ALREADY_COMPLETED
        status, ds = client.get(uid)
        assert ds.ProcedureStepState == "COMPLETED" and "TransactionUID" not in ds
        assert ds.ProcedureStepProgressInformationSequence[0].ProcedureStepProgress == 50
        assert [str(d.SOPInstanceUID) for d in client.find(ProcedureStepState="COMPLETED")] == [uid]
        assert client.get("1.2.3.999")[0] == ups_scp.NO_SUCH_WORKITEM
        # Request cancel of a SCHEDULED item: nobody performs it, so an admin's cancels it at once;
        # a reader's is refused and changes nothing.
        assert client.request_cancel(uids["low"]) == ups_scp.NOT_AUTHORIZED
        assert client.get(uids["low"])[1].ProcedureStepState == "SCHEDULED"
        with UpsClient(running.port, ae_title="ADMIN") as admin:
            assert admin.request_cancel(uids["low"]) == 0
            assert admin.request_cancel(uids["low"]) == ups_scp.ALREADY_CANCELED
        status, ds = client.get(uids["low"])
        assert ds.ProcedureStepState == "CANCELED"
        assert "no longer needed" in ds.ProcedureStepProgressInformationSequence[0].ReasonForCancellation


def test_watcher_gets_initial_and_changed_states(start_node, database_url):
    watcher_port = free_port()
    watcher = UpsWatcher(watcher_port)
    running = start_node(database_url, ups_subscribers=[f"WATCHER@127.0.0.1:{watcher_port}"],
                         worklist_admin_aes=["ADMIN@127.0.0.1"])
    try:
        uid = seed(running, "1.2.826.0.1.3680043.8.498.7", category="CT-3", percent=55.0, arrived=T0)
        with UpsClient(running.port, ae_title="WATCHER") as client, \
                UpsClient(running.port, ae_title="ADMIN") as admin:
            assert admin.subscribe("STRANGER") == ups_scp.RECEIVING_AE_UNKNOWN
            assert client.subscribe("STRANGER") == ups_scp.NOT_AUTHORIZED
            assert client.subscribe("WATCHER") == 0
            watcher.wait_for_state(uid, "SCHEDULED")
            status, transaction = client.claim(uid)
            assert status == 0
            watcher.wait_for_state(uid, "IN PROGRESS")
            assert client.complete(uid, transaction) == (0, 0)
            assert watcher.wait_for_state(uid, "COMPLETED") == ["SCHEDULED", "IN PROGRESS", "COMPLETED"]
            # A workitem created after the global subscription is reported too.
            new_uid = seed(running, "1.2.826.0.1.3680043.8.498.8", category="CT-1", percent=5.0, arrived=T0)
            running.node.ups.notifier.wake()
            watcher.wait_for_state(new_uid, "SCHEDULED")
            assert client.unsubscribe("WATCHER") == 0
            assert admin.request_cancel(new_uid) == 0
        with running.session() as session:
            assert session.scalar(select(UpsEvent).where(UpsEvent.state != "sent")) is None
        assert "CANCELED" not in watcher.states(new_uid)
    finally:
        watcher.stop()


def test_a_new_study_version_cancels_and_replaces_the_old_workitem(start_node, database_url):
    running = start_node(database_url)
    study = "1.2.826.0.1.3680043.8.498.9"
    v1 = seed(running, study, category="CT-1", percent=20.0, arrived=T0)
    v2 = seed(running, study, category="CT-3", percent=52.0, arrived=T0, version=2)
    assert v1 != v2
    with UpsClient(running.port) as client:
        found = client.find()
        assert [str(d.SOPInstanceUID) for d in found] == [v2]
        assert found[0].ScheduledProcedureStepPriority == "HIGH"
        status, old = client.get(v1)
        assert status == 0 and old.ProcedureStepState == "CANCELED"
        assert "superseded by study version 2" in old.ProcedureStepProgressInformationSequence[0].ReasonForCancellation


def test_malformed_requests_get_named_statuses(worklist_node):
    running, uids = worklist_node
    with UpsClient(running.port) as client:
        query = Dataset()
        query.ScheduledProcedureStepPriority = "URGENT"
        responses = list(client.assoc.send_c_find(query, ups_scp.UPS_PULL))
        assert responses[-1][0].Status == ups_scp.IDENTIFIER_DOES_NOT_MATCH
        assert client.action(uids["high"], 9, None) == ups_scp.NO_SUCH_ACTION_TYPE
        no_state = Dataset()
        no_state.TransactionUID = "1.2.3"
        assert client.action(uids["high"], 1, no_state) == ups_scp.MISSING_ATTRIBUTE
        # The node still answers afterwards.
        assert len(client.find()) == 5


def test_ups_event_retry_then_send(start_node, sqlite_url):
    """A subscriber that is down at first gets its reports after the retry delay."""
    port = free_port()
    running = start_node(sqlite_url, ups_subscribers=[f"WATCHER@127.0.0.1:{port}"])
    uid = seed(running, "1.2.826.0.1.3680043.8.498.11", category="CT-2", percent=30.0, arrived=T0)
    with UpsClient(running.port, ae_title="WATCHER") as client:
        assert client.subscribe("WATCHER", uid) == 0

    def retried():
        with running.session() as session:
            return session.scalar(select(UpsEvent).where(UpsEvent.attempts >= 1, UpsEvent.state == "pending"))
    event = wait_for(retried, timeout=30, interval=0.2)
    assert "associate" in event.last_error or "rejected" in event.last_error
    watcher = UpsWatcher(port)
    try:
        watcher.wait_for_state(uid, "SCHEDULED", timeout=30)
    finally:
        watcher.stop()


def test_two_readers_claiming_at_once_one_wins(worklist_node):
    """The claim is atomic (row lock on PostgreSQL, serialised writes on SQLite)."""
    from concurrent.futures import ThreadPoolExecutor

    running, uids = worklist_node
    clients = [UpsClient(running.port, ae_title=f"READER{i}") for i in range(4)]
    try:
        with ThreadPoolExecutor(len(clients)) as pool:
            statuses = list(pool.map(lambda c: c.claim(uids["medium"])[0], clients))
        assert sorted(statuses) == [0] + [ups_scp.ALREADY_IN_PROGRESS] * 3
    finally:
        for client in clients:
            client.close()
