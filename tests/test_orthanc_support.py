"""The test helpers themselves: Orthanc fixture, dciodvfy wrapper, synthetic CT generator."""

from __future__ import annotations

import json
import socket

import numpy as np
import pydicom
import pytest

from tests.support import orthanc as orthanc_support
from tests.support.ct_datasets import make_chest_ct, write_series
from tests.support.dciodvfy import dciodvfy_errors, dciodvfy_report
from tests.support.orthanc import OrthancError, OrthancServer
from worker.delivery.scu import send_instances

needs_orthanc = pytest.mark.skipif(not orthanc_support.available(), reason="Orthanc not installed")


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@needs_orthanc
def test_orthanc_config_start_rest_stop_restart(tmp_path):
    ct = make_chest_ct(n_slices=3, size=64, seed=11)
    server = OrthancServer(tmp_path, aet="PACSTEST", known_aets=["CTTRIAGE"], accept_unknown=False)
    config = server.config()
    assert config["RemoteAccessAllowed"] is False
    assert config["AuthenticationEnabled"] is False
    assert config["DicomCheckCalledAet"] is True
    assert config["DicomAlwaysAllowStore"] is False and config["DicomAlwaysAllowEcho"] is False
    assert config["Plugins"] == []
    assert [m[0] for m in config["DicomModalities"].values()] == ["CTTRIAGE"]
    assert str(tmp_path) in config["StorageDirectory"] and str(tmp_path) in config["IndexDirectory"]
    with server:
        assert server.running and server.startup_seconds < 15
        assert json.loads(server.config_path.read_text())["DicomPort"] == server.dicom_port
        system = server.system()
        assert system["DicomAet"] == "PACSTEST"
        assert system["DicomPort"] == server.dicom_port and system["HttpPort"] == server.http_port
        assert server.studies() == [] and server.instances() == []
        report = send_instances(server.destination, ct.datasets, calling_ae_title="CTTRIAGE")
        assert report.outcome == "delivered", report.reason
        assert len(server.instances()) == 3
        (study,) = server.studies()
        assert study["MainDicomTags"]["StudyInstanceUID"] == ct.study_instance_uid
        (series,) = server.series_of_study(ct.study_instance_uid)
        assert series["MainDicomTags"]["SeriesInstanceUID"] == ct.series_instance_uid
        iid = server.instance_id(ct.datasets[0].SOPInstanceUID)
        assert server.instance_tags(iid)["SOPInstanceUID"] == ct.datasets[0].SOPInstanceUID
        stored = pydicom.dcmread(__import__("io").BytesIO(server.instance_file(iid)))
        assert stored.SOPInstanceUID == ct.datasets[0].SOPInstanceUID
        assert server.instance_id("1.2.3.4") is None

        http, dicom = server.http_port, server.dicom_port
        server.stop()
        assert not server.running and not _port_open(dicom) and not _port_open(http)
        with pytest.raises(OrthancError):
            server.studies()
        server.start()
        assert (server.http_port, server.dicom_port) == (http, dicom)
        assert len(server.instances()) == 3  # storage survives a restart
    assert not server.running
    assert server.log_path.exists()


def test_free_port_is_bindable():
    port = orthanc_support.free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_orthanc_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="aet"):
        OrthancServer(tmp_path, aet="")
    with pytest.raises(ValueError, match="known_aets"):
        OrthancServer(tmp_path, known_aets=["X" * 17])


def test_dciodvfy_wrapper(tmp_path):
    ct = make_chest_ct(n_slices=2, size=64, seed=12)
    good = write_series(ct, tmp_path / "good")[0]
    assert dciodvfy_errors(good) == []
    broken = ct.datasets[0].copy()
    del broken.Rows
    del broken.PatientID
    path = tmp_path / "broken.dcm"
    broken.save_as(path, enforce_file_format=True)
    errors = dciodvfy_errors(path)
    assert errors and all(line.startswith("Error") for line in errors)
    assert any("Rows" in line for line in errors)
    report = dciodvfy_report(path)
    assert report.errors == errors
    with pytest.raises(FileNotFoundError):
        dciodvfy_errors(tmp_path / "missing.dcm")


def test_synthetic_ct_series(tmp_path):
    a = make_chest_ct(n_slices=4, size=64, seed=7)
    b = make_chest_ct(n_slices=4, size=64, seed=7)
    assert a.sop_instance_uids == b.sop_instance_uids
    assert all(x.PixelData == y.PixelData for x, y in zip(a.datasets, b.datasets))
    assert make_chest_ct(n_slices=4, size=64, seed=8).study_instance_uid != a.study_instance_uid
    # sorted along the slice normal (z ascending for axial)
    z = [float(ds.ImagePositionPatient[2]) for ds in a.datasets]
    assert z == sorted(z)
    # pixel data + rescale reproduce the HU volume
    for ds, hu in zip(a.datasets, a.hu):
        np.testing.assert_array_equal(ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept), hu)
    # every ground-truth box is inside the lungs and on the right slice
    assert a.lesion_boxes
    for box in a.lesion_boxes:
        assert box.sop_instance_uid == a.sop_instance_uids[box.slice_index]
        region = a.lung_mask[box.slice_index, box.row_min: box.row_max + 1, box.col_min: box.col_max + 1]
        assert region.any()
        assert (a.hu[box.slice_index][a.lesion_mask[box.slice_index]] > -700).mean() > 0.9
    result = a.score_result()
    assert result.status == "scored" and result.category == "CT-1"
    assert result.source_sop_instance_uids == a.sop_instance_uids
    for path in write_series(a, tmp_path):
        assert dciodvfy_errors(path) == []
