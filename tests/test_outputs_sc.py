"""Secondary Capture series: IOD validity (dciodvfy), content, determinism, burned-in boxes."""

from __future__ import annotations

import dataclasses
import datetime as dt

import numpy as np
import pydicom
import pytest
from pydicom.uid import SecondaryCaptureImageStorage

from ct_triage import __version__
from tests.support.ct_datasets import file_bytes, make_chest_ct
from tests.support.dciodvfy import dciodvfy_errors, dciodvfy_report, unexpected_warnings
from worker.outputs import render
from worker.outputs.sc import build_secondary_capture_series
from worker.outputs.uids import derived_uid, output_uid
from worker.scoring.result import LesionBox

CREATED = dt.datetime(2024, 5, 6, 7, 8, 9)
CHEST_CT = dict(n_slices=6, size=128, seed=1)
PATIENT_STUDY_KEYWORDS = [
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "PatientAge",
    "PatientSize", "PatientWeight", "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber",
    "ReferringPhysicianName", "StudyID", "StudyDescription", "SpecificCharacterSet",
]


@pytest.fixture(scope="module")
def series(ct, result):
    return build_secondary_capture_series(ct.datasets, result, 1, created_at=CREATED)


def _save(ds, path):
    ds.save_as(path, enforce_file_format=True)
    return path


# -- structure -------------------------------------------------------------------------
def test_one_image_per_lesion_slice_plus_summary(ct, result, series):
    lesion_slices = sorted({b.slice_index for b in result.boxes})
    assert len(series) == len(lesion_slices) + 1
    summary, *slices = series
    assert summary.InstanceNumber == 1
    assert [ds.InstanceNumber for ds in slices] == list(range(2, len(slices) + 2))
    assert [ds.SourceImageSequence[0].ReferencedSOPInstanceUID for ds in slices] == [
        ct.datasets[i].SOPInstanceUID for i in lesion_slices
    ]
    assert [s.ReferencedSOPInstanceUID for s in summary.SourceImageSequence] == ct.sop_instance_uids


def test_sc_header_follows_design(ct, series):
    source = ct.datasets[0]
    series_uids = {ds.SeriesInstanceUID for ds in series}
    assert len(series_uids) == 1 and source.SeriesInstanceUID not in series_uids
    assert len({ds.SOPInstanceUID for ds in series}) == len(series)
    for ds in series:
        assert ds.SOPClassUID == SecondaryCaptureImageStorage
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
        assert ds.ConversionType == "WSD"
        assert ds.BurnedInAnnotation == "YES"
        assert ds.Modality == "OT"
        assert ds.SeriesNumber == 9001
        assert ds.SeriesDescription.startswith("AI COVID-19 triage")
        assert "NOT FOR DIAGNOSTIC USE" in ds.DerivationDescription
        assert (ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.BitsAllocated) == (3, "RGB", 8)
        assert ds.PixelRepresentation == 0 and ds.PlanarConfiguration == 0
        for ref in ds.SourceImageSequence:
            assert ref.ReferencedSOPClassUID == source.SOPClassUID
            code = ref.PurposeOfReferenceCodeSequence[0]
            assert (code.CodeValue, code.CodingSchemeDesignator) == ("121322", "DCM")
        ours = [e for e in ds.ContributingEquipmentSequence if e.Manufacturer == "ct-triage"]
        assert len(ours) == 1
        assert f"ct-triage {__version__}" in list(ours[0].SoftwareVersions)
        assert ours[0].PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
        assert ours[0].ContributionDateTime == "20240506070809"
        assert (ds.ContentDate, ds.ContentTime) == ("20240506", "070809")
        assert (ds.InstanceCreationDate, ds.InstanceCreationTime) == ("20240506", "070809")
        assert (ds.DateOfSecondaryCapture, ds.TimeOfSecondaryCapture) == ("20240506", "070809")
    # the scanner is kept as acquisition equipment
    assert any(e.Manufacturer == "TOSHIBA" for e in series[1].ContributingEquipmentSequence)
    # per-slice images keep the source geometry
    assert series[1].PixelSpacing == source.PixelSpacing
    assert (series[1].Rows, series[1].Columns) == (source.Rows, source.Columns)
    assert list(series[1].PatientOrientation) == ["L", "P"]
    assert "PixelSpacing" not in series[0]


def test_patient_and_study_attributes_identical_to_source(ct, series):
    source = ct.datasets[0]
    for ds in series:
        for keyword in PATIENT_STUDY_KEYWORDS:
            assert ds[keyword].value == source[keyword].value, keyword


def test_uids_are_derived_from_source_series_and_version(ct, series):
    src = ct.series_instance_uid
    assert series[0].SeriesInstanceUID == output_uid(src, 1, "sc-series")
    assert series[0].SOPInstanceUID == output_uid(src, 1, "sc-instance", 0)
    for ds in series:
        assert len(ds.SOPInstanceUID) <= 64 and ds.SOPInstanceUID.is_valid


# -- validation --------------------------------------------------------------------------
@pytest.mark.parametrize("status", ["scored", "failed", "not_applicable"])
def test_every_instance_passes_dciodvfy(tmp_path, ct, status):
    result = ct.score_result(status, reason="fewer than 20 slices" if status != "scored" else None)
    for i, ds in enumerate(build_secondary_capture_series(ct.datasets, result, 2, created_at=CREATED)):
        path = _save(ds, tmp_path / f"{status}-{i}.dcm")
        report = dciodvfy_report(path)
        assert "SCImage" in report.output
        assert report.errors == [], report.output
        assert unexpected_warnings(path) == [], report.output


def test_unknown_body_part_still_valid(tmp_path):
    ct = make_chest_ct(n_slices=3, size=64, seed=5)
    for ds in ct.datasets:
        del ds.BodyPartExamined
    out = build_secondary_capture_series(ct.datasets, ct.score_result("not_applicable", "not a chest CT"), 1,
                                         created_at=CREATED)
    assert dciodvfy_errors(_save(out[0], tmp_path / "na.dcm")) == []


def test_round_trip_save_read(tmp_path, series):
    for i, ds in enumerate(series):
        back = pydicom.dcmread(_save(ds, tmp_path / f"{i}.dcm"))
        assert back.SOPInstanceUID == ds.SOPInstanceUID
        assert back.file_meta.MediaStorageSOPClassUID == SecondaryCaptureImageStorage
        assert back.PatientName == ds.PatientName
        np.testing.assert_array_equal(back.pixel_array, ds.pixel_array)
        for elem in ds:
            if elem.keyword != "PixelData":
                assert back[elem.tag].value == elem.value, elem.keyword


def test_deterministic_bytes(ct, result):
    first = [file_bytes(ds) for ds in build_secondary_capture_series(ct.datasets, result, 1, created_at=CREATED)]
    second = [file_bytes(ds) for ds in build_secondary_capture_series(ct.datasets, result, 1, created_at=CREATED)]
    assert first == second
    # no created_at: still deterministic (taken from the sources)
    a = build_secondary_capture_series(ct.datasets, result, 1)
    b = build_secondary_capture_series(ct.datasets, result, 1)
    assert [file_bytes(x) for x in a] == [file_bytes(x) for x in b]
    assert a[0].ContentDate == ct.datasets[0].ContentDate
    # a new result version is a new series with new instances
    v2 = build_secondary_capture_series(ct.datasets, result, 2, created_at=CREATED)
    assert v2[0].SeriesInstanceUID != a[0].SeriesInstanceUID and v2[0].SeriesNumber == 9002
    assert not {x.SOPInstanceUID for x in v2} & {x.SOPInstanceUID for x in a}


# -- pixels --------------------------------------------------------------------------------
def _red(rgb: np.ndarray) -> np.ndarray:
    return (rgb[..., 0] == 255) & (rgb[..., 1] == 0) & (rgb[..., 2] == 0)


def _expected_border(shape, boxes, width=2) -> np.ndarray:
    rows, cols = shape
    outer = np.zeros(shape, bool)
    inner = np.zeros(shape, bool)
    for b in boxes:
        outer[max(b.row_min - width, 0): b.row_max + width + 1, max(b.col_min - width, 0): b.col_max + width + 1] = True
        inner[b.row_min: b.row_max + 1, b.col_min: b.col_max + 1] = True
    return outer & ~inner


def test_red_boxes_exactly_around_the_lesions(ct, result, series):
    for ds in series[1:]:
        index = ct.sop_instance_uids.index(ds.SourceImageSequence[0].ReferencedSOPInstanceUID)
        boxes = [b for b in result.boxes if b.slice_index == index]
        rgb = ds.pixel_array
        red = _red(rgb)
        expected = _expected_border(rgb.shape[:2], boxes)
        # the whole border is pure red, and nothing else is pure red
        assert red[expected].all()
        assert not red[~expected].any()
        # inside the boxes: the (gray) lung-window image, lesion visible
        for b in boxes:
            inside = rgb[b.row_min: b.row_max + 1, b.col_min: b.col_max + 1]
            assert (inside[..., 0] == inside[..., 1]).all() and (inside[..., 1] == inside[..., 2]).all()
        # lungs away from the boxes are gray too
        lung = ct.lung_mask[index] & ~expected
        assert not red[lung].any()


def test_lung_window_is_baked_in(ct, series):
    ds = series[1]
    index = ct.sop_instance_uids.index(ds.SourceImageSequence[0].ReferencedSOPInstanceUID)
    gray = render.window_to_uint8(ct.hu[index])
    rgb = ds.pixel_array
    # bottom rows (below the caption, away from boxes) equal the windowed source
    np.testing.assert_array_equal(rgb[-20:, :, 0], gray[-20:, :])
    assert render.window_to_uint8(np.array([-1350.0, -600.0, 150.0])).tolist() == [0, 128, 255]


def test_summary_marks_lesions_and_says_not_for_diagnostic_use(ct, result, series):
    summary = series[0].pixel_array
    reddish = (summary[..., 0].astype(int) - summary[..., 1].astype(int)) > 80
    assert reddish.sum() > 50
    assert "NOT FOR DIAGNOSTIC USE" in series[0].ImageComments
    clean = ct.score_result(boxes=[], lesion_count=0)
    no_lesions = build_secondary_capture_series(ct.datasets, clean, 1, created_at=CREATED)
    assert len(no_lesions) == 1
    px = no_lesions[0].pixel_array
    overview_width = px.shape[1] - render.PANEL_WIDTH
    assert not ((px[:, :overview_width, 0].astype(int) - px[:, :overview_width, 1].astype(int)) > 80).any()


@pytest.mark.parametrize("status", ["failed", "not_applicable"])
def test_unscored_result_gives_only_a_summary_with_reason(ct, status):
    result = ct.score_result(status, reason="no lungs found in 12 of 40 slices")
    out = build_secondary_capture_series(ct.datasets, result, 1, created_at=CREATED)
    assert len(out) == 1
    assert "no lungs found in 12 of 40 slices" in out[0].ImageComments
    assert "MEDIUM" in out[0].ImageComments
    assert render.caption_text(result).endswith("NOT FOR DIAGNOSTIC USE")


def test_render_summary_png(tmp_path, ct, result):
    a = render.render_summary_png(ct.datasets, result, tmp_path / "a.png")
    b = render.render_summary_png(ct.datasets, result, tmp_path / "b.png")
    assert a.read_bytes() == b.read_bytes() and a.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    failed = render.render_summary_png(ct.datasets, ct.score_result("failed", "timeout"), tmp_path / "f.png")
    assert failed.stat().st_size > 1000
    with pytest.raises(ValueError, match="path"):
        render.render_summary_png(ct.datasets, result, tmp_path / "a.jpg")
    with pytest.raises(TypeError, match="result"):
        render.render_summary_png(ct.datasets, {"status": "scored"}, tmp_path / "c.png")


def test_caption_text():
    from worker.scoring.result import ScoreResult

    r = ScoreResult(status="scored", category="CT-2", involvement_percent=34.2)
    assert render.caption_text(r) == "AI COVID-19 triage · CT-2 · 34% · NOT FOR DIAGNOSTIC USE"


# -- arguments ---------------------------------------------------------------------------
def test_bad_arguments_name_the_argument(ct, result):
    build = build_secondary_capture_series
    with pytest.raises(ValueError, match="source_datasets"):
        build(list(reversed(ct.datasets)), result, 1)
    with pytest.raises(ValueError, match="source_datasets"):
        build(ct.datasets[:-1], result, 1)
    with pytest.raises(ValueError, match="source_datasets"):
        build([], result, 1)
    with pytest.raises(TypeError, match="source_datasets"):
        build(ct.datasets[0], result, 1)
    with pytest.raises(TypeError, match="result"):
        build(ct.datasets, result.to_json(), 1)
    with pytest.raises(ValueError, match="result_version"):
        build(ct.datasets, result, 0)
    with pytest.raises(TypeError, match="result_version"):
        build(ct.datasets, result, "1")
    with pytest.raises(ValueError, match="series_number"):
        build(ct.datasets, result, 1, series_number=0)
    with pytest.raises(TypeError, match="created_at"):
        build(ct.datasets, result, 1, created_at="2024-01-01")
    other = make_chest_ct(n_slices=6, size=128, seed=99)
    with pytest.raises(ValueError, match="source_datasets"):
        build(other.datasets, result, 1)
    box = result.boxes[0]
    outside = dataclasses.replace(result, boxes=[dataclasses.replace(box, row_max=500)])
    with pytest.raises(ValueError, match="result"):
        build(ct.datasets, outside, 1)
    wrong_uid = dataclasses.replace(result, boxes=[LesionBox(0, "1.2.3", 1, 1, 2, 2)])
    with pytest.raises(ValueError, match="result"):
        build(ct.datasets, wrong_uid, 1)


def test_derived_uid():
    a = derived_uid("1.2.3", "1", "sc-series", "0")
    assert a == derived_uid("1.2.3", "1", "sc-series", "0")
    assert a.startswith("2.25.") and a.is_valid and len(a) <= 64
    assert a != derived_uid("1.2.3", "2", "sc-series", "0")
    assert derived_uid("ab", "c") != derived_uid("a", "bc")
    with pytest.raises(ValueError, match="parts"):
        derived_uid()
    with pytest.raises(ValueError, match="parts"):
        derived_uid("1.2", "")
    with pytest.raises(TypeError, match="parts"):
        derived_uid("1.2", None)
    with pytest.raises(ValueError, match="result_version"):
        output_uid("1.2.3", 0, "sc-series")


def test_ascii_source_without_character_set(tmp_path):
    ct = make_chest_ct(n_slices=3, size=64, seed=6, patient_name="Doe^Jane")
    for ds in ct.datasets:
        del ds.SpecificCharacterSet
    result = ct.score_result("failed", reason="Lungenmaske fehlgeschlagen · zu wenig Luft (–950 HU)")
    out = build_secondary_capture_series(ct.datasets, result, 1, created_at=CREATED)
    assert "SpecificCharacterSet" not in out[0]
    assert out[0].ImageComments.isascii() and "Lungenmaske fehlgeschlagen" in out[0].ImageComments
    path = _save(out[0], tmp_path / "ascii.dcm")
    assert dciodvfy_errors(path) == []


def test_identical_bytes_in_another_process(ct, result):
    """A retry runs in another worker process (other hash seed): same bytes."""
    import hashlib
    import os
    import subprocess
    import sys
    from pathlib import Path

    def digest(objects) -> str:
        h = hashlib.sha256()
        for ds in objects:
            h.update(file_bytes(ds))
        return h.hexdigest()

    here = digest(build_secondary_capture_series(ct.datasets, result, 1, created_at=CREATED))
    code = (
        "import datetime as dt, hashlib, io\n"
        "from tests.support.ct_datasets import make_chest_ct\n"
        "from worker.outputs.sc import build_secondary_capture_series\n"
        "ct = make_chest_ct(n_slices=6, size=128, seed=1)\n"
        "h = hashlib.sha256()\n"
        "for ds in build_secondary_capture_series(ct.datasets, ct.score_result(), 1,\n"
        "                                         created_at=dt.datetime(2024, 5, 6, 7, 8, 9)):\n"
        "    b = io.BytesIO(); ds.save_as(b, enforce_file_format=True); h.update(b.getvalue())\n"
        "print(h.hexdigest())\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONHASHSEED="4242", PYTHONPATH=str(root))
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, env=env,
                           check=True, timeout=120).stdout.strip()
    assert there == here


@pytest.mark.parametrize("compression", ["none", "rle", "jpeg-baseline"])
def test_template_clones_encode_exactly_like_save_as(compression):
    """Slice images share the template's elements; the stored-file encoder reuses their
    bytes and must write exactly what pydicom's save_as writes."""
    import io as _io

    from worker.outputs.stored import encode

    ct = make_chest_ct(n_slices=6, size=96, seed=8)
    images = build_secondary_capture_series(ct.datasets, ct.score_result(), 1, compression=compression)
    assert sum(hasattr(image, "_ct_template") for image in images) == len(images) - 2  # summary, template
    for image in images:
        buffer = _io.BytesIO()
        image.save_as(buffer, enforce_file_format=True)
        assert encode(image) == buffer.getvalue()
