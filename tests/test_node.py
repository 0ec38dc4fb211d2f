"""The DICOM node against dcmtk's storescu/echoscu and pynetdicom SCUs, on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import func, select

from db.models import Instance, Job, RejectedInstance, Series, SeriesEvent, Study
from dicom_node import status
from tests.support.scanner import acknowledged_files, echoscu, require_dcmtk, storescu, write_ct_series

pytestmark = pytest.mark.usefixtures("dcmtk")


@pytest.fixture
def dcmtk():
    require_dcmtk()


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


def series_row(running, series_uid: str) -> Series | None:
    with running.session() as session:
        return session.scalar(select(Series).where(Series.series_instance_uid == series_uid))


def dataset_digest(path: Path) -> str:
    """Digest of the data set as it travels (file meta group excluded)."""
    ds = dcmread(path)
    del ds.file_meta
    from io import BytesIO

    buffer = BytesIO()
    ds.save_as(buffer, implicit_vr=False, little_endian=True)
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def test_echo(start_node, sqlite_url):
    running = start_node(sqlite_url)
    result = echoscu(running.port)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Received Echo Response (Success)" in result.stdout + result.stderr


def test_multi_series_study_stored_indexed_and_queued_once(start_node, database_url, tmp_path):
    running = start_node(database_url)
    lung = write_ct_series(tmp_path / "lung", 300, rows=128, columns=128, seed=1, series_number=2)
    soft = write_ct_series(tmp_path / "soft", 120, rows=128, columns=128, seed=1, series_number=3,
                           study_instance_uid=lung.study_instance_uid, kernel="FC07")
    result = storescu(running.port, lung.paths + soft.paths)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(acknowledged_files(result.stdout + result.stderr)) == 420

    assert running.node.store.indexer.flush()  # rows are written by the background indexer
    with running.session() as session:
        assert session.scalar(select(func.count(Instance.id))) == 420
        instances = {i.sop_instance_uid: i for i in session.scalars(select(Instance))}
    for series in (lung, soft):
        for path, uid in zip(series.paths[::37], series.sop_instance_uids[::37]):
            stored = running.settings.effective_storage_dir / instances[uid].path
            assert stored.is_file()
            assert uid not in str(stored)  # paths come from hashed UIDs
            assert dataset_digest(stored) == dataset_digest(path)

    # Both series complete by ImagesInAcquisition; the study gets exactly one job.
    def queued():
        rows = [series_row(running, s.series_instance_uid) for s in (lung, soft)]
        return all(r.state == "queued" for r in rows) and rows
    rows = wait_for(queued)
    assert [r.instance_count for r in rows] == [300, 120]

    def published():  # the job row commits first; it is published (and marked) just after
        with running.session() as session:
            return session.scalar(select(func.count(Job.id)).where(Job.published_at.is_not(None))) == 1
    wait_for(published)
    with running.session() as session:
        jobs = session.scalars(select(Job)).all()
        assert len(jobs) == 1 and jobs[0].study_version == 1 and jobs[0].published_at is not None
        events = [e.to_state for e in session.scalars(select(SeriesEvent).where(SeriesEvent.series_fk == rows[0].id)
                                                       .order_by(SeriesEvent.id))]
        assert events == ["receiving", "stable", "queued"]
        assert rows[0].stable_at <= rows[0].queued_at
        study = session.scalar(select(Study))
        assert study.patient.patient_name == "DOE^JANE"

    # The audit trail: one DICOM Instances Transferred message for the study and association,
    # counting both series' instances, naming the scanner's address (not its patient at INFO).
    from db.models import AuditEvent

    def transferred():
        with running.session() as session:
            return session.scalars(select(AuditEvent).where(AuditEvent.kind == "instances_transferred")).all()
    events = wait_for(transferred)
    assert len(events) == 1 and events[0].action == "C" and events[0].source_address == "127.0.0.1"
    assert lung.study_instance_uid in events[0].message_xml and 'NumberOfInstances="420"' in events[0].message_xml


def test_duplicates_keep_first_copy_and_are_counted(start_node, sqlite_url, tmp_path):
    running = start_node(sqlite_url)
    series = write_ct_series(tmp_path / "s", 20, rows=64, columns=64, seed=2)
    assert storescu(running.port, series.paths).returncode == 0
    with running.session() as session:
        first = session.scalar(select(Instance).where(Instance.sop_instance_uid == series.sop_instance_uids[0]))
    stored = running.settings.effective_storage_dir / first.path
    before = stored.read_bytes()
    # Same SOP Instance UIDs, different pixel content: success is answered, the first copy kept.
    altered = write_ct_series(tmp_path / "altered", 20, rows=64, columns=64, seed=2, patient_name="OTHER^NAME",
                              study_instance_uid=series.study_instance_uid,
                              series_instance_uid=series.series_instance_uid)
    assert altered.sop_instance_uids == series.sop_instance_uids
    result = storescu(running.port, altered.paths)
    assert result.returncode == 0
    assert len(acknowledged_files(result.stdout + result.stderr)) == 20
    assert stored.read_bytes() == before
    row = series_row(running, series.series_instance_uid)
    assert row.instance_count == 20 and row.duplicate_count == 20 and row.version == 1


def test_unknown_calling_ae_is_rejected_at_association(start_node, sqlite_url, tmp_path):
    running = start_node(sqlite_url, allowed_calling_aes=["SCANNER", "CT2@10.9.9.9"])
    assert echoscu(running.port, calling="SCANNER").returncode == 0
    for calling in ("INTRUDER", "CT2"):  # unknown title; known title from the wrong address
        result = echoscu(running.port, calling=calling)
        assert result.returncode != 0
        assert "Association Rejected" in result.stdout + result.stderr
        assert "Calling AE Title Not Recognized" in result.stdout + result.stderr
    series = write_ct_series(tmp_path / "s", 3, rows=32, columns=32)
    assert storescu(running.port, series.paths, calling="INTRUDER").returncode != 0
    with running.session() as session:
        assert session.scalar(select(func.count(Instance.id))) == 0


def test_called_ae_title_must_be_ours_unless_any_is_accepted(start_node, sqlite_url):
    strict = start_node(sqlite_url)
    result = echoscu(strict.port, called="NOTCTTRIAGE")
    assert result.returncode != 0
    assert "Called AE Title Not Recognized" in result.stdout + result.stderr
    assert echoscu(strict.port, called="CTTRIAGE").returncode == 0
    strict.node.stop()
    relaxed = start_node(sqlite_url, accept_any_called_ae=True)
    assert echoscu(relaxed.port, called="NOTCTTRIAGE").returncode == 0


@pytest.fixture
def tls_files(tmp_path):
    """A throw-away CA-less self-signed server certificate for localhost."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    key_path, cert_path = tmp_path / "key.pem", tmp_path / "cert.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def test_tls_required_accepts_tls_and_refuses_plain_tcp(start_node, sqlite_url, tmp_path, tls_files):
    key_path, cert_path = tls_files
    running = start_node(sqlite_url, tls_cert=cert_path, tls_key=key_path, tls_required=True)
    series = write_ct_series(tmp_path / "s", 5, rows=64, columns=64, seed=3)
    # The scanner trusts our certificate (+cf) and presents its own pair (the same here).
    tls_args = ["+tls", str(key_path), str(cert_path), "+cf", str(cert_path)]
    result = storescu(running.port, series.paths, extra=tls_args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(acknowledged_files(result.stdout + result.stderr)) == 5
    plain = storescu(running.port, series.paths, timeout=60)
    assert plain.returncode != 0
    assert "Association Request Failed" in plain.stdout + plain.stderr or "Association" in plain.stderr
    with running.session() as session:
        assert session.scalar(select(func.count(Instance.id))) == 5


def test_disk_floor_refuses_with_a700_and_records_reason(start_node, sqlite_url, tmp_path):
    running = start_node(sqlite_url, min_free_disk_mb=10**9)  # a petabyte floor: never enough room
    series = write_ct_series(tmp_path / "s", 2, rows=64, columns=64)
    result = storescu(running.port, series.paths)
    output = result.stdout + result.stderr
    assert "Refused: OutOfResources" in output
    assert acknowledged_files(output) == []
    with running.session() as session:
        assert session.scalar(select(func.count(Instance.id))) == 0
        rejected = session.scalars(select(RejectedInstance)).all()
    assert rejected and rejected[0].status_code == status.OUT_OF_RESOURCES_DISK_FLOOR
    assert "floor" in rejected[0].reason
    assert not any((running.settings.effective_storage_dir / "instances").rglob("*.dcm"))


def _pynetdicom_store(port: int, path_or_dataset, calling="SCANNER"):
    from pynetdicom import AE, _config
    from pynetdicom.sop_class import CTImageStorage

    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")  # explicit VR: as the files are
    assoc = ae.associate("127.0.0.1", port, ae_title="CTTRIAGE")
    assert assoc.is_established
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes as they are, undecoded
    try:
        rsp = assoc.send_c_store(path_or_dataset)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
        assoc.release()
    return rsp.Status


def test_malformed_dataset_gets_named_failure_and_a_row(start_node, sqlite_url, tmp_path):
    running = start_node(sqlite_url)
    good = write_ct_series(tmp_path / "s", 1, rows=32, columns=32).paths[0]
    raw = good.read_bytes()
    ds = dcmread(good)
    # Keep the file meta (so the SCU can send it), replace the data set with garbage.
    meta_end = 132 + 12 + ds.file_meta.FileMetaInformationGroupLength
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(raw[:meta_end] + b"\x08\x00\x18\x00UI\xff\xff" + b"\x99" * 300)
    code = _pynetdicom_store(running.port, garbage)
    assert code == status.MALFORMED_DATASET  # an element length past the end of the data set

    # A readable data set whose SOP Instance UID is not a UID.
    bad_uid = tmp_path / "bad_uid.dcm"
    ds.SOPInstanceUID = "1.2.ABC.3"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.ABC.3"
    ds.save_as(bad_uid)
    assert _pynetdicom_store(running.port, bad_uid) == status.INVALID_UID

    with running.session() as session:
        rejected = session.scalars(select(RejectedInstance).order_by(RejectedInstance.id)).all()
        assert session.scalar(select(func.count(Instance.id))) == 0
    assert [r.status_code for r in rejected] == [status.MALFORMED_DATASET, status.INVALID_UID]
    assert "past the end" in rejected[0].reason, rejected[0].reason
    assert "1.2.ABC.3" in rejected[1].reason
    assert (running.settings.effective_storage_dir / rejected[0].quarantine_path).is_file()
    # The node is still serving after bad input.
    assert echoscu(running.port).returncode == 0


def test_non_ct_instances_are_stored_and_marked_not_applicable(start_node, sqlite_url, tmp_path):
    running = start_node(sqlite_url)
    path = write_ct_series(tmp_path / "s", 1, rows=32, columns=32, seed=9).paths[0]
    ds = dcmread(path)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
    ds.Modality = "OT"
    ds.save_as(path)
    assert storescu(running.port, [path]).returncode == 0
    row = wait_for(lambda: series_row(running, ds.SeriesInstanceUID))
    assert row.state == "not_applicable" and "not a CT image" in row.state_reason
    with running.session() as session:
        assert session.scalar(select(func.count(Instance.id))) == 1
        assert session.scalar(select(func.count(Job.id))) == 0


def test_quiet_period_late_instance_reopens_with_new_version(start_node, sqlite_url, tmp_path):
    running = start_node(sqlite_url, stable_age_s=1.0)
    series = write_ct_series(tmp_path / "s", 12, rows=32, columns=32, images_in_acquisition=False, seed=4)
    assert storescu(running.port, series.paths[:10]).returncode == 0
    time.sleep(0.3)
    assert series_row(running, series.series_instance_uid).state == "receiving"
    first = wait_for(lambda: (r := series_row(running, series.series_instance_uid)).state == "queued" and r)
    assert first.version == 1 and first.flags == []
    assert storescu(running.port, series.paths[10:]).returncode == 0  # late instances
    second = wait_for(lambda: (r := series_row(running, series.series_instance_uid)).version == 2
                      and r.state == "queued" and r)
    assert second.instance_count == 12
    with running.session() as session:
        versions = sorted(j.study_version for j in session.scalars(select(Job)))
        states = [e.to_state for e in session.scalars(select(SeriesEvent).order_by(SeriesEvent.id))]
    assert versions == [1, 2]
    assert states == ["receiving", "stable", "queued", "receiving", "stable", "queued"]


def test_z_gap_is_flagged_on_the_series(start_node, sqlite_url, tmp_path):
    running = start_node(sqlite_url, stable_age_s=0.5)
    series = write_ct_series(tmp_path / "s", 30, rows=32, columns=32, images_in_acquisition=False, seed=5)
    assert storescu(running.port, series.paths[:14] + series.paths[17:]).returncode == 0
    row = wait_for(lambda: (r := series_row(running, series.series_instance_uid)).state == "queued" and r)
    assert any(flag.startswith("z_gap") for flag in row.flags), row.flags


def test_storage_commitment_answers_from_the_database(start_node, database_url, tmp_path):
    import threading

    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import StorageCommitmentPushModel

    running = start_node(database_url)
    series = write_ct_series(tmp_path / "s", 3, rows=32, columns=32, seed=6)
    assert storescu(running.port, series.paths).returncode == 0

    reports = []
    received = threading.Event()

    def on_report(event):
        reports.append((event.request.EventTypeID, event.event_information))
        received.set()
        return 0x0000

    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate("127.0.0.1", running.port, ae_title="CTTRIAGE",
                         evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
    assert assoc.is_established
    request = Dataset()
    request.TransactionUID = generate_uid()
    unknown = generate_uid()
    refs = []
    for uid in series.sop_instance_uids + [unknown]:
        item = Dataset()
        item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        item.ReferencedSOPInstanceUID = uid
        refs.append(item)
    request.ReferencedSOPSequence = refs
    status_ds, _ = assoc.send_n_action(request, 1, StorageCommitmentPushModel, "1.2.840.10008.1.20.1.1")
    assert status_ds.Status == 0x0000
    assert received.wait(10), "no N-EVENT-REPORT"
    assoc.abort()  # a release can race the SCP's report exchange in pynetdicom (Sta13/Evt11) and hang
    event_type, info = reports[0]
    assert event_type == 2  # some failed
    assert info.TransactionUID == request.TransactionUID
    assert sorted(i.ReferencedSOPInstanceUID for i in info.ReferencedSOPSequence) == sorted(series.sop_instance_uids)
    assert [(i.ReferencedSOPInstanceUID, i.FailureReason) for i in info.FailedSOPSequence] == [
        (unknown, status.NO_SUCH_OBJECT_INSTANCE)]


def test_multi_valued_text_is_stored_as_dicom_writes_it_and_reaches_hl7_and_the_page(start_node, database_url,
                                                                                      tmp_path):
    """Issue 17 item 8: PatientName A^B\\C^D, PatientID ID1\\ID2 (and a two-valued description)
    are stored backslash-joined, sent as HL7 repetitions, shown on the page joined by ", "."""
    import json

    from ct_triage.contract import EmbeddedPublisher
    from dashboard.app import row_json
    from db.models import Delivery, Result
    from db.views import worklist_rows
    from tests.support.mllp import MllpListener
    from tests.support.scanner import free_port
    from worker.scoring.result import ScoreResult
    from worker.tasks.context import WorkerContext
    from worker.tasks.deliver import deliver_outputs
    from worker.worklist.entries import add_worklist_entries

    ris_port = free_port()
    running = start_node(database_url, hl7_ack_timeout_s=5, hl7_destinations=[f"127.0.0.1:{ris_port}"])
    series = write_ct_series(tmp_path / "s", 4, rows=32, columns=32, seed=8, patient_name="A^B\\C^D",
                             patient_id="ID1\\ID2")
    for path in series.paths:
        ds = dcmread(path)
        ds.StudyDescription = "CHEST\\LOW DOSE"
        ds.save_as(path)
    assert dcmread(series.paths[0]).PatientName == ["A^B", "C^D"]  # two values on the wire
    result = storescu(running.port, series.paths)
    assert result.returncode == 0, result.stderr[-2000:]
    assert running.node.store.indexer.flush()

    score = ScoreResult(status="scored", category="CT-3", involvement_percent=60.0, involvement_percent_left=60.0,
                        involvement_percent_right=60.0, reason=None,
                        study_instance_uid=series.study_instance_uid,
                        series_instance_uid=series.series_instance_uid)
    with running.session() as session, session.begin():
        study = session.scalar(select(Study).where(Study.study_instance_uid == series.study_instance_uid))
        assert (study.patient.patient_name, study.patient.patient_id) == ("A^B\\C^D", "ID1\\ID2")
        assert study.study_description == "CHEST\\LOW DOSE"
        assert study.series[0].convolution_kernel == "FC51"
        row = Result(study_fk=study.id, version=max(study.version or 1, 1), series_fk=study.series[0].id,
                     status="scored", category="CT-3", priority=score.priority, involvement_percent=60.0,
                     result_json=json.dumps(score.to_json()), scored_at=study.series[0].first_received_at)
        session.add(row)
        session.flush()
        add_worklist_entries(session, running.settings, row, score)

    listener = MllpListener(ris_port).start()
    try:
        with running.session() as session:
            delivery_id = session.scalar(select(Delivery.id).where(Delivery.channel == "hl7"))
        ctx = WorkerContext(running.settings, running.session_factory, EmbeddedPublisher())
        assert deliver_outputs(ctx, delivery_id) == "delivered"
        assert len(listener.messages) == 2
        for message in listener.messages:
            pid = message.segment("PID")
            assert str(pid(5)) == "A^B~C^D"
            assert [str(pid(3)(r)(1)) for r in (1, 2)] == ["ID1", "ID2"]
            assert "[" not in str(message) and "'" not in str(pid)
    finally:
        listener.stop()

    with running.session() as session:
        rows = [r for r in worklist_rows(session) if r.study_instance_uid == series.study_instance_uid]
    page = row_json(rows[0])
    assert page["study_description"] == "CHEST, LOW DOSE"
    assert "A^B" not in json.dumps(page) and "ID1" not in json.dumps(page)  # the page shows no patient data
