"""Three phantom studies of different severity through `ct-triage serve`, into the reading workflow.

Real peers: dcmtk storescu as the scanner, a pynetdicom UPS client (Pull + Watch) as the
reading workstation, a pynetdicom UPS event SCP as the watcher, and three MLLP listeners
built on python-hl7 as RIS interfaces: one accepting (AA), one answering AE, one down at
first. One daemon run serves every test in this module (scoring is the slow part), so the
tests run in file order and the last one re-scores a study.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import hl7
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from db.models import Delivery, Result, UpsWorkitem
from db.session import make_engine, make_session_factory
from tests.support.daemon import Daemon
from tests.support.mllp import MllpListener
from tests.support.scanner import free_port, require_dcmtk, storescu
from tests.support.ups import UpsClient, UpsWatcher
from tests.test_node import wait_for
from tests.test_node_process import node_env

# Small for CPU, as the pipeline e2e tests: 60 slices x 5 mm, 192 x 192, lung kernel only.
PHANTOM = dict(slices=60, rows=192, slice_spacing_mm=5.0, kernels=("FC51",))
SEVERITIES = {"HIGH": (62, 11), "MEDIUM": (35, 3), "LOW": (8, 5)}  # priority: (involvement %, seed)
NASTY_NAME = "O|BRIEN^ANNE&MARIE~JO"


class Site:
    """The daemon and its peers."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.watcher_port = free_port()
        self.ris_port, self.refusing_port, self.late_port = free_port(), free_port(), free_port()
        self.studies: dict[str, dict] = {}
        self.folders: dict[str, Path] = {}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from ct_triage_tools.phantom import write_phantom

    require_dcmtk()
    root = tmp_path_factory.mktemp("worklist")
    s = Site(root)
    for priority, (involvement, seed) in SEVERITIES.items():
        folder = root / f"phantom_{priority.lower()}"
        s.studies[priority] = write_phantom(folder, involvement, seed=seed, **PHANTOM)
        s.folders[priority] = folder
    for path in sorted(s.folders["HIGH"].rglob("*.dcm")):  # every HL7 delimiter in the patient's name
        ds = dcmread(path)
        ds.PatientName = NASTY_NAME
        ds.save_as(path)

    s.watcher = UpsWatcher(s.watcher_port)
    s.ris = MllpListener(s.ris_port).start()
    s.refusing = MllpListener(s.refusing_port, ack_code="AE", error_text="unknown accession").start()
    s.late = MllpListener(s.late_port)  # not started: connection refused until the test starts it
    s.database_url = f"sqlite:///{root / 'db' / 'ct-triage.sqlite'}"
    s.env = node_env(root, s.database_url, s.port, retry_base_s=1,
                     ups_subscribers=f"WATCHER@127.0.0.1:{s.watcher_port}",
                     hl7_destinations=f"127.0.0.1:{s.ris_port},127.0.0.1:{s.refusing_port},"
                                      f"127.0.0.1:{s.late_port}")
    s.daemon = Daemon(["serve"], s.env, root / "serve.log").start()
    engine = make_engine(s.database_url)
    s.session = make_session_factory(engine)
    try:
        s.daemon.wait_dicom_ready(s.port)
        with UpsClient(s.port, ae_title="WATCHER") as client:
            assert client.subscribe("WATCHER") == 0
        for priority in ("LOW", "MEDIUM", "HIGH"):  # arrival order: LOW first, HIGH last
            assert storescu(s.port, sorted(s.folders[priority].rglob("*.dcm"))).returncode == 0

        def three_workitems():
            with s.session() as session:
                return session.scalar(select(func.count(UpsWorkitem.id))) == 3
        wait_for(three_workitems, timeout=600, interval=1)
        yield s
    except AssertionError:
        print(s.daemon.log()[-6000:])
        raise
    finally:
        s.daemon.stop()
        for peer in (s.ris, s.refusing, s.late):
            peer.stop()
        s.watcher.stop()
        engine.dispose()


def study_uid(site, priority: str) -> str:
    return site.studies[priority]["study_instance_uid"]


def test_ups_client_gets_high_medium_low_claims_completes_and_the_watcher_sees_it(site):
    with UpsClient(site.port) as client:
        found = client.find(ProcedureStepState="SCHEDULED", WorklistLabel="COVID-19 CT triage")
        assert [d.ScheduledProcedureStepPriority for d in found] == ["HIGH", "MEDIUM", "LOW"], site.daemon.log()[-3000:]
        assert [d.StudyInstanceUID for d in found] == [study_uid(site, p) for p in ("HIGH", "MEDIUM", "LOW")]
        assert [d.ProcedureStepLabel.split()[0] for d in found] == ["CT-3", "CT-2", "CT-1"]
        assert all("%" in d.ProcedureStepLabel for d in found)
        assert found[0].PatientName == NASTY_NAME
        series = {item.SeriesInstanceUID: item for item in found[0].InputInformationSequence}
        assert site.studies["HIGH"]["series_by_kernel"]["FC51"] in series
        high = str(found[0].SOPInstanceUID)

        status, transaction = client.claim(high)
        assert status == 0
        assert client.find(ProcedureStepState="SCHEDULED")[0].ScheduledProcedureStepPriority == "MEDIUM"
        assert client.complete(high, transaction) == (0, 0)
        assert client.get(high)[1].ProcedureStepState == "COMPLETED"
    assert site.watcher.wait_for_state(high, "COMPLETED") == ["SCHEDULED", "IN PROGRESS", "COMPLETED"]


def _of_study(listener: MllpListener, study: str) -> list[hl7.Message]:
    out = []
    for message in listener.messages:
        if study in str(message):
            out.append(message)
    return out


def test_ris_gets_order_update_and_oru_per_severity_with_the_right_codes(site):
    wait_for(lambda: len(site.ris.messages) >= 6, timeout=120, interval=0.5)
    expected = {"HIGH": ("S", "CT-3"), "MEDIUM": ("A", "CT-2"), "LOW": ("R", "CT-1")}
    for priority, (code, category) in expected.items():
        accession = site.studies[priority].get("accession_number") or dcmread(
            next(site.folders[priority].rglob("*.dcm")), stop_before_pixels=True).AccessionNumber
        orders = [m for m in site.ris.of_type("ORM") if str(m.segment("OBR")(18)) == accession]
        results = [m for m in site.ris.of_type("ORU") if str(m.segment("OBR")(18)) == accession]
        assert len(orders) == 1 and len(results) == 1, priority
        order, result = orders[0], results[0]
        assert str(order.segment("ORC")(7)(1)(6)) == code
        assert str(order.segment("ZDS")(1)(1)(1)) == study_uid(site, priority)
        obx = {str(seg(3)(1)(1)): seg for seg in result.segments("OBX")}
        assert str(obx["CTT002"](5)(1)(1)) == category
        assert str(obx["CTT004"](5)(1)(1)) == code
        assert float(str(obx["CTT001"](5))) > 0
        assert str(obx["CTT009"](5)) == "NOT FOR DIAGNOSTIC USE"
        if priority == "HIGH":  # the delimiters in the name were escaped, not obeyed
            name = result.segment("PID")(5)(1)
            assert [result.unescape(str(name(i))) for i in (1, 2)] == ["O|BRIEN", "ANNE&MARIE~JO"]
            assert len(result.segment("PID")) == 9


def test_a_ris_answering_ae_stops_the_delivery_with_the_reason_in_status(site):
    refusing = f"mllp://127.0.0.1:{site.refusing_port}"

    def failed():
        with site.session() as session:
            rows = session.scalars(select(Delivery).where(Delivery.destination == refusing)).all()
            return rows if len(rows) == 3 and all(d.state == "failed" for d in rows) else None
    rows = wait_for(failed, timeout=120, interval=0.5)
    assert all(d.attempts == 1 and "unknown accession" in d.last_error for d in rows)
    assert len(site.refusing.messages) == 3  # one order update each, then it stopped
    status = subprocess.run([sys.executable, "-m", "ct_triage_app.cli", "status"], env=site.daemon.env,
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    assert "RIS answered AE" in status.stdout and "unknown accession" in status.stdout


def test_a_ris_down_at_first_gets_every_message_once_after_the_backoff(site):
    late = f"mllp://127.0.0.1:{site.late_port}"

    def retried():
        with site.session() as session:
            rows = session.scalars(select(Delivery).where(Delivery.destination == late)).all()
            # A failed attempt defers the destination's other waiting messages (worker.tasks.deliver aligns
            # them), so the RIS is retried with backoff, not each message in turn.
            return (len(rows) == 3 and all(d.state in ("pending", "retrying") for d in rows)
                    and max(d.attempts for d in rows) >= 2)
    wait_for(retried, timeout=120, interval=0.5)
    site.late.start()

    def delivered():
        with site.session() as session:
            rows = session.scalars(select(Delivery).where(Delivery.destination == late)).all()
            return rows if all(d.state == "delivered" for d in rows) else None
    rows = wait_for(delivered, timeout=180, interval=0.5)
    assert all(d.instances_sent == 2 for d in rows) and max(d.attempts for d in rows) >= 3
    time.sleep(2)
    ids = [str(m.segment("MSH")(10)) for m in site.late.messages]
    assert len(ids) == 6 and len(set(ids)) == 6, ids


def test_a_late_instance_rescores_the_study_and_replaces_its_workitem(site):
    with UpsClient(site.port) as client:
        before = {d.StudyInstanceUID: str(d.SOPInstanceUID) for d in client.find(ProcedureStepState="SCHEDULED")}
    old = before[study_uid(site, "LOW")]
    files = sorted(site.folders["LOW"].rglob("*.dcm"))
    top = max((dcmread(p) for p in files), key=lambda ds: float(ds.ImagePositionPatient[2]))
    top.SOPInstanceUID = generate_uid()
    top.file_meta.MediaStorageSOPInstanceUID = top.SOPInstanceUID
    top.ImagePositionPatient = [*top.ImagePositionPatient[:2], float(top.ImagePositionPatient[2]) + 5.0]
    top.InstanceNumber = int(top.InstanceNumber) + 1
    late = site.root / "late.dcm"
    top.save_as(late)
    assert storescu(site.port, [late]).returncode == 0

    def rescored():
        with site.session() as session:
            return session.scalar(select(func.count(UpsWorkitem.id))) == 4
    wait_for(rescored, timeout=300, interval=1)
    with UpsClient(site.port) as client:
        after = client.find(StudyInstanceUID=study_uid(site, "LOW"))
        assert len(after) == 1 and str(after[0].SOPInstanceUID) != old
        assert after[0].ProcedureStepState == "SCHEDULED"
        status, replaced = client.get(old)
        assert status == 0 and replaced.ProcedureStepState == "CANCELED"
    site.watcher.wait_for_state(old, "CANCELED")
    with site.session() as session:
        versions = session.scalars(select(Result.version).join(UpsWorkitem, UpsWorkitem.result_fk == Result.id)
                                   .where(UpsWorkitem.study_instance_uid == study_uid(site, "LOW"))).all()
    assert sorted(versions) == [1, 2]
    # The RIS gets the new version's order update and result too.
    wait_for(lambda: len(site.ris.messages) >= 8, timeout=120, interval=0.5)
