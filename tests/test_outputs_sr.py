"""Comprehensive 3D SR (TID 1500): dciodvfy, content read back with highdicom, determinism."""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import shutil
import subprocess

import highdicom as hd
import pydicom
import pytest
from pydicom.uid import Comprehensive3DSRStorage

from ct_triage import __version__
from tests.support.ct_datasets import file_bytes
from tests.support.dciodvfy import dciodvfy_report, unexpected_warnings
from worker.outputs.seg import build_segmentation, segment_numbers
from worker.outputs.sr import SCHEME, build_measurement_report, patient_point
from worker.outputs.uids import output_uid
from worker.scoring.result import ROUTING

CREATED = dt.datetime(2024, 5, 6, 7, 8, 9)
CHEST_CT = dict(n_slices=6, size=128, seed=2)
PATIENT_STUDY_KEYWORDS = [
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "StudyInstanceUID",
    "StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName", "StudyID", "StudyDescription",
]


@pytest.fixture(scope="module")
def seg(ct, result):
    return build_segmentation(ct.datasets, result, result.masks, 1, created_at=CREATED)


@pytest.fixture(scope="module")
def sr_path(tmp_path_factory, ct, result, seg):
    path = tmp_path_factory.mktemp("sr") / "sr.dcm"
    build_measurement_report(ct.datasets, result, 1, created_at=CREATED, masks=result.masks,
                             segmentation=seg).save_as(path, enforce_file_format=True)
    return path


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

    # one TID 1411 group per 3-D lesion, largest first, referencing the SEG's lesion segment
    components = result.masks.lesion_components()
    assert components, "the synthetic CT has lesions"
    volumetric = report.get_volumetric_roi_measurement_groups()
    assert len(volumetric) == len(components)
    lesion_segment = segment_numbers(result.masks)["lesion"]
    seg_uid = output_uid(ct.series_instance_uid, 1, "seg-instance", 0)
    volumes = []
    for group, component in zip(volumetric, components):
        assert group.tracking_identifier == f"Lesion {component.rank}"
        ref = group.referenced_segment
        assert ref is not None
        sop = ref[0].ReferencedSOPSequence[0]
        assert (sop.ReferencedSOPInstanceUID, int(sop.ReferencedSegmentNumber)) == (seg_uid, lesion_segment)
        volume = values(group)[("118565006", "ml")]
        assert volume == pytest.approx(component.volume_ml, abs=0.01)
        volumes.append(volume)
        site = group.finding_sites[0].value
        assert site.value == {"right": "3341006", "left": "44029006"}[component.side]
        centers = [i for i in group[0].ContentSequence if i.ValueType == "SCOORD3D"]
        assert len(centers) == 1 and centers[0].GraphicType == "POINT"
        assert [float(v) for v in centers[0].GraphicData] == pytest.approx(
            list(patient_point(ct.datasets, component.center)), abs=0.01)
        assert centers[0].ReferencedFrameOfReferenceUID == ct.datasets[0].FrameOfReferenceUID
    assert volumes == sorted(volumes, reverse=True)
    assert sum(volumes) == pytest.approx(result.lesion_volume_ml, abs=0.1 * len(volumes))
    assert not report.get_planar_roi_measurement_groups(), "no per-slice outlines any more"

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
    assert file_bytes(a) == file_bytes(b)
    path = tmp_path / "a.dcm"
    a.save_as(path, enforce_file_format=True)
    back = pydicom.dcmread(path)
    assert file_bytes(back) == file_bytes(a)
    v2 = build_measurement_report(ct.datasets, result, 2, created_at=CREATED)
    assert v2.SOPInstanceUID != a.SOPInstanceUID and v2.SeriesInstanceUID != a.SeriesInstanceUID
    # pixel data is not needed for the SR
    headers = [pydicom.dcmread(io.BytesIO(file_bytes(ds)), stop_before_pixels=True) for ds in ct.datasets]
    assert file_bytes(build_measurement_report(headers, result, 1, created_at=CREATED)) == file_bytes(a)


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


def test_lesion_report_passes_dciodvfy_and_dsrdump(ct, sr_path):
    report = dciodvfy_report(sr_path)
    assert report.errors == [], report.output
    assert unexpected_warnings(sr_path) == [], report.output
    dsrdump = shutil.which("dsrdump")
    if dsrdump is None:
        pytest.skip("dcmtk's dsrdump is not installed")
    out = subprocess.run([dsrdump, str(sr_path)], capture_output=True, text=True, errors="replace", timeout=60)
    assert out.returncode == 0, out.stderr
    assert "Imaging Measurement Report" in out.stdout
    assert '"Referenced Segment"' in out.stdout and '"Center")=(POINT' in out.stdout
    assert "Tracking Identifier\")=\"Lesion 1\"" in out.stdout


def test_lesion_groups_limit_and_determinism(ct, result, seg):
    full = build_measurement_report(ct.datasets, result, 1, created_at=CREATED, masks=result.masks, segmentation=seg)
    again = build_measurement_report(ct.datasets, result, 1, created_at=CREATED, masks=result.masks,
                                     segmentation=seg)
    assert file_bytes(full) == file_bytes(again)
    one = build_measurement_report(ct.datasets, result, 1, created_at=CREATED, masks=result.masks, segmentation=seg,
                                   max_lesions=1)
    groups = hd.sr.Comprehensive3DSR.from_dataset(one).content.get_volumetric_roi_measurement_groups()
    assert [g.tracking_identifier for g in groups] == ["Lesion 1"]
    with pytest.raises(ValueError, match="max_lesions"):
        build_measurement_report(ct.datasets, result, 1, created_at=CREATED, max_lesions=-1)
    with pytest.raises(ValueError, match="masks"):
        build_measurement_report(ct.datasets, result, 1, created_at=CREATED, segmentation=seg)


@pytest.mark.parametrize("excluded", [True, False])
def test_solid_masses_are_stated_in_the_report(ct, result, excluded):
    """Issue 19 item 5: solid masses the scorer found (worker.scoring.masses) get a TEXT item
    (CTT016) saying whether they were left out of the involvement; none found: no item."""
    def texts(r):
        ds = build_measurement_report(ct.datasets, r, 1, created_at=CREATED)
        qual = [i for i in ds.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "C0034375"][0]
        return {i.ConceptNameCodeSequence[0].CodeValue: i.TextValue for i in qual.ContentSequence
                if i.ValueType == "TEXT"}

    with_mass = dataclasses.replace(result, mass_volume_ml=12.5, mass_count=1, mass_excluded=excluded)
    text = texts(with_mass)["CTT016"]
    verb = "excluded from" if excluded else "counted in"
    assert text == f"solid mass(es) {verb} the involvement: 12.5 ml (1); not COVID-19 pneumonia"
    assert "CTT016" not in texts(dataclasses.replace(result, mass_volume_ml=0.0, mass_count=0, mass_excluded=True))
