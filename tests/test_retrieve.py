"""Query/retrieve SCU (priors): C-FIND and C-MOVE against Orthanc, and how failures are classified."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from ct_triage.settings import Destination
from tests.support import orthanc as orthanc_support
from tests.support.orthanc import OrthancServer
from tests.support.scanner import free_port, require_dcmtk, storescu, write_ct_series
from worker.followup.retrieve import find_studies, move_study


@pytest.fixture(autouse=True)
def _tools():
    require_dcmtk()
    orthanc_support.require_orthanc()


def _query(patient_id: str) -> Dataset:
    ds = Dataset()
    ds.PatientID = patient_id
    ds.StudyInstanceUID = ""
    ds.StudyDate = ""
    ds.ModalitiesInStudy = "CT"
    return ds


def test_find_and_move_classified(tmp_path):
    series = write_ct_series(tmp_path / "ct", 3, rows=32, columns=32, patient_id="QR-0001")
    known = {"CTTRIAGE": ("127.0.0.1", free_port()), "SCANNER": ("127.0.0.1", free_port())}
    with OrthancServer(tmp_path / "pacs", aet="PACS", known_aets=known, accept_unknown=False) as pacs:
        assert storescu(pacs.dicom_port, series.paths, called="PACS").returncode == 0
        found = find_studies(pacs.destination, _query("QR-0001"), calling_ae_title="CTTRIAGE")
        assert found.outcome == "ok", found.reason
        assert [str(a.StudyInstanceUID) for a in found.answers] == [series.study_instance_uid]
        assert find_studies(pacs.destination, _query("NOBODY"), calling_ae_title="CTTRIAGE").answers == []
        # Orthanc knows CTTRIAGE but nobody listens there: Orthanc answers 0xC000
        moved = move_study(pacs.destination, series.study_instance_uid, "CTTRIAGE", calling_ae_title="CTTRIAGE",
                           dimse_timeout=60)
        assert moved.outcome == "permanent" and moved.completed == 0 and "0xC000" in moved.reason
        unknown = move_study(pacs.destination, series.study_instance_uid, "NOSUCHAE", calling_ae_title="CTTRIAGE")
        assert unknown.outcome == "permanent" and "C-MOVE status 0x" in unknown.reason
        # A caller the PACS does not know is rejected: configuration, not worth retrying
        stranger = find_studies(pacs.destination, _query("QR-0001"), calling_ae_title="STRANGER")
        assert stranger.outcome == "permanent" and "rejected" in stranger.reason, stranger.reason
        pacs.stop()
        down = find_studies(pacs.destination, _query("QR-0001"), calling_ae_title="CTTRIAGE", acse_timeout=5)
        assert down.outcome == "transient" and "connect" in down.reason


def test_bad_arguments_name_the_argument():
    source = Destination("PACS", "127.0.0.1", 104)
    with pytest.raises(TypeError, match="'source'"):
        find_studies("PACS@127.0.0.1:104", Dataset(), calling_ae_title="CTTRIAGE")
    with pytest.raises(TypeError, match="'identifier'"):
        find_studies(source, {"PatientID": "x"}, calling_ae_title="CTTRIAGE")
    with pytest.raises(ValueError, match="'move_destination'"):
        move_study(source, "1.2.3", "", calling_ae_title="CTTRIAGE")
    with pytest.raises(ValueError, match="'study_instance_uid'"):
        move_study(source, "", "CTTRIAGE", calling_ae_title="CTTRIAGE")
