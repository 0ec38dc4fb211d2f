"""Comprehensive 3D SR (TID 1500): dciodvfy, content read back with highdicom, determinism."""

from __future__ import annotations

import dataclasses
import datetime as dt
import io

import highdicom as hd
import pydicom
import pytest
from pydicom.uid import Comprehensive3DSRStorage

from ct_triage import __version__
from tests.support.ct_datasets import make_chest_ct
from tests.support.dciodvfy import dciodvfy_report, unexpected_warnings
from worker.outputs.sr import SCHEME, build_measurement_report
from worker.outputs.uids import output_uid
from worker.scoring.result import ROUTING

CREATED = dt.datetime(2024, 5, 6, 7, 8, 9)
PATIENT_STUDY_KEYWORDS = [
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "StudyInstanceUID",
    "StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName", "StudyID", "StudyDescription",
]


@pytest.fixture(scope="module")
def ct():
    return make_chest_ct(n_slices=6, size=128, seed=2)


@pytest.fixture(scope="module")
def result(ct):
    return ct.score_result()


@pytest.fixture(scope="module")
def sr_path(tmp_path_factory, ct, result):
    path = tmp_path_factory.mktemp("sr") / "sr.dcm"
    build_measurement_report(ct.datasets, result, 1, created_at=CREATED).save_as(path, enforce_file_format=True)
    return path


def _bytes(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize("status", ["scored", "failed", "not_applicable"])
def test_passes_dciodvfy(tmp_path, ct, status):
    result = ct.score_result(status, reason=None if status == "scored" else "series has 12 slices, need 20")
    path = tmp_path / f"{status}.dcm"
    build_measurement_report(ct.datasets, result, 1, created_at=CREATED).save_as(path, enforce_file_format=True)
    report = dciodvfy_report(path)
    assert "Comprehensive3DSR" in report.output
    assert report.errors == [], report.output
    # only the accepted "unrecognized 99CTTRIAGE" warnings
    assert unexpected_warnings(path) == [], report.output


def test_header(ct, sr_path):
    sr = pydicom.dcmread(sr_path)
    source = ct.datasets[0]
    assert sr.SOPClassUID == Comprehensive3DSRStorage
    assert sr.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert sr.Modality == "SR"
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.CompletionFlag == "COMPLETE"
    assert sr.SeriesNumber == 9101
    assert sr.SeriesDescription.startswith("AI COVID-19 triage")
    assert sr.SeriesInstanceUID == output_uid(ct.series_instance_uid, 1, "sr-series")
    assert sr.SOPInstanceUID == output_uid(ct.series_instance_uid, 1, "sr-instance", 0)
    for keyword in PATIENT_STUDY_KEYWORDS:
        assert sr[keyword].value == source[keyword].value, keyword
    assert (sr.ContentDate, sr.ContentTime, sr.InstanceCreationDate) == ("20240506", "070809", "20240506")
    schemes = [item.CodingSchemeDesignator for item in sr.CodingSchemeIdentificationSequence]
    assert SCHEME in schemes
    ours = [e for e in sr.ContributingEquipmentSequence if e.Manufacturer == "ct-triage"]
    assert len(ours) == 1 and f"ct-triage {__version__}" in list(ours[0].SoftwareVersions)
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == ct.study_instance_uid
    refs = evidence.ReferencedSeriesSequence[0]
    assert refs.SeriesInstanceUID == ct.series_instance_uid
    assert sorted(r.ReferencedSOPInstanceUID for r in refs.ReferencedSOPSequence) == sorted(ct.sop_instance_uids)


def test_content_reads_back(ct, result, sr_path):
    sr = hd.sr.srread(sr_path)
    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport)
    groups = {g.tracking_identifier: g for g in report.get_image_measurement_groups()}
    assert set(groups) == {"Lungs", "Right lung", "Left lung", "Lesions"}

    def values(group):
        return {(m.name.value, m.unit.value): m.value for m in group.get_measurements()}

    lungs = values(groups["Lungs"])
    assert lungs[("118565006", "ml")] == pytest.approx(result.lung_volume_ml)
    assert lungs[("CTT001", "%")] == pytest.approx(result.involvement_percent)
    assert values(groups["Right lung"])[("CTT001", "%")] == pytest.approx(result.involvement_percent_right)
    assert values(groups["Left lung"])[("118565006", "ml")] == pytest.approx(result.lung_volume_left_ml)
    assert values(groups["Lesions"])[("118565006", "ml")] == pytest.approx(result.lesion_volume_ml)
    evaluations = {q.name.value: q.value for q in groups["Lungs"].get_qualitative_evaluations()}
    assert (evaluations["CTT002"].value, evaluations["CTT002"].scheme_designator) == (result.category, SCHEME)
    assert evaluations["CTT004"].value == result.priority

    # algorithm identification (TID 4019)
    group_items = groups["Lungs"][0].ContentSequence
    texts = {i.ConceptNameCodeSequence[0].CodeValue: i.TextValue for i in group_items if i.ValueType == "TEXT"}
    assert texts["111001"] == result.model and texts["111003"] == result.model_version

    # one closed POLYLINE per lesion box, on the right source image
    rois = report.get_planar_roi_measurement_groups()
    assert len(rois) == len(result.boxes)
    for roi_group, box in zip(rois, result.boxes):
        region = roi_group.roi
        assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        pts = region.value
        assert pts.shape == (5, 2) and (pts[0] == pts[-1]).all()
        assert pts[:, 0].min() == box.col_min and pts[:, 0].max() == box.col_max + 1
        assert pts[:, 1].min() == box.row_min and pts[:, 1].max() == box.row_max + 1
        ref = region.ContentSequence[0].ReferencedSOPSequence[0]
        assert ref.ReferencedSOPInstanceUID == box.sop_instance_uid
        site = roi_group.finding_sites[0].value
        assert site.value == {"right": "3341006", "left": "44029006"}[box.lung]

    # routing decision as text
    ds = pydicom.dcmread(sr_path)
    qual = [i for i in ds.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "C0034375"][0]
    texts = [i.TextValue for i in qual.ContentSequence if i.ValueType == "TEXT"]
    assert any(ROUTING[result.category] in t for t in texts)


@pytest.mark.parametrize("status", ["failed", "not_applicable"])
def test_unscored_report_states_status_and_reason(ct, status):
    result = ct.score_result(status, reason="gantry tilt 12 degrees")
    ds = build_measurement_report(ct.datasets, result, 3, created_at=CREATED)
    assert ds.SeriesNumber == 9103
    qual = [i for i in ds.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "C0034375"][0]
    codes = {i.ConceptNameCodeSequence[0].CodeValue: i.ConceptCodeSequence[0].CodeValue
             for i in qual.ContentSequence if i.ValueType == "CODE"}
    assert codes["CTT003"] == {"failed": "FAILED", "not_applicable": "NOT-APPLICABLE"}[status]
    assert "gantry tilt 12 degrees" in [i.TextValue for i in qual.ContentSequence if i.ValueType == "TEXT"]
    report = hd.sr.Comprehensive3DSR.from_dataset(ds).content
    (group,) = report.get_image_measurement_groups()
    evaluations = {q.name.value: q.value.value for q in group.get_qualitative_evaluations()}
    assert evaluations["CTT004"] == "MEDIUM"
    assert group.get_measurements() == []


def test_round_trip_and_determinism(tmp_path, ct, result):
    a = build_measurement_report(ct.datasets, result, 1, created_at=CREATED)
    b = build_measurement_report(ct.datasets, result, 1, created_at=CREATED)
    assert _bytes(a) == _bytes(b)
    path = tmp_path / "a.dcm"
    a.save_as(path, enforce_file_format=True)
    back = pydicom.dcmread(path)
    assert _bytes(back) == _bytes(a)
    v2 = build_measurement_report(ct.datasets, result, 2, created_at=CREATED)
    assert v2.SOPInstanceUID != a.SOPInstanceUID and v2.SeriesInstanceUID != a.SeriesInstanceUID
    # pixel data is not needed for the SR
    headers = [pydicom.dcmread(io.BytesIO(_bytes(ds)), stop_before_pixels=True) for ds in ct.datasets]
    assert _bytes(build_measurement_report(headers, result, 1, created_at=CREATED)) == _bytes(a)


def test_bad_arguments_name_the_argument(ct, result):
    with pytest.raises(ValueError, match="source_datasets"):
        build_measurement_report(ct.datasets[::-1], result, 1, created_at=CREATED)
    with pytest.raises(ValueError, match="result_version"):
        build_measurement_report(ct.datasets, result, -1, created_at=CREATED)
    with pytest.raises(TypeError, match="result"):
        build_measurement_report(ct.datasets, None, 1, created_at=CREATED)
    with pytest.raises(TypeError, match="created_at"):
        build_measurement_report(ct.datasets, result, 1, created_at=20240506)
    with pytest.raises(ValueError, match="result"):
        build_measurement_report(ct.datasets, dataclasses.replace(result, category="CT-9"), 1, created_at=CREATED)
    with pytest.raises(TypeError, match="series_number"):
        build_measurement_report(ct.datasets, result, 1, created_at=CREATED, series_number="9101")
