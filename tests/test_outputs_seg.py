"""DICOM SEG of a result, and the masks it is built from: dciodvfy, read back, determinism."""

from __future__ import annotations

import dataclasses
import datetime as dt
import io

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, SegmentationStorage

from tests.support.ct_datasets import file_bytes
from tests.support.dciodvfy import dciodvfy_report
from worker.outputs.seg import build_segmentation, segment_numbers
from worker.outputs.uids import output_uid
from worker.scoring.masks import ResultMasks, load_masks, save_masks

CREATED = dt.datetime(2024, 5, 6, 7, 8, 9)
CHEST_CT = dict(n_slices=8, size=128, seed=4)


def _segment_volume(seg_ds, uids, number) -> np.ndarray:
    seg = hd.seg.Segmentation.from_dataset(seg_ds)
    arr = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[number],
                                            assert_missing_frames_are_empty=True)
    return arr[..., 0].astype(bool)


@pytest.mark.parametrize("compression", ["none", "deflate"])
def test_valid_and_reads_back_exactly(tmp_path, ct, result, compression):
    seg = build_segmentation(ct.datasets, result, result.masks, 1, created_at=CREATED, compression=compression)
    path = tmp_path / "seg.dcm"
    seg.save_as(path, enforce_file_format=True)
    back = pydicom.dcmread(path)
    assert back.file_meta.TransferSyntaxUID == {"none": ExplicitVRLittleEndian,
                                               "deflate": DeflatedExplicitVRLittleEndian}[compression]
    # dciodvfy (dicom3tools) cannot read deflated files: validate the same object uncompressed
    plain = tmp_path / "plain.dcm"
    back.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    back.save_as(plain, enforce_file_format=True)
    report = dciodvfy_report(plain)
    assert "Segmentation" in report.output
    assert report.errors == [], report.output

    assert back.SOPClassUID == SegmentationStorage and back.SegmentationType == "BINARY"
    assert back.SegmentsOverlap == "YES"
    assert back.SeriesNumber == 9201 and back.SeriesDescription.startswith("AI COVID-19 triage")
    assert back.SOPInstanceUID == output_uid(ct.series_instance_uid, 1, "seg-instance", 0)
    assert (back.ContentDate, back.ContentTime) == ("20240506", "070809")
    refs = back.ReferencedSeriesSequence[0]
    assert refs.SeriesInstanceUID == ct.series_instance_uid
    assert [r.ReferencedSOPInstanceUID for r in refs.ReferencedInstanceSequence] == list(ct.sop_instance_uids)
    segments = {s.SegmentNumber: s for s in back.SegmentSequence}
    assert {n: s.SegmentLabel for n, s in segments.items()} == {1: "Right lung", 2: "Left lung", 3: "Lesions"}
    assert segments[1].SegmentedPropertyTypeCodeSequence[0].CodeValue == "3341006"
    assert segments[2].SegmentedPropertyTypeCodeSequence[0].CodeValue == "44029006"
    lesion = segments[3]
    assert (lesion.SegmentedPropertyTypeCodeSequence[0].CodeValue,
            lesion.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator) == ("52988006", "SCT")
    assert lesion.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    assert lesion.AnatomicRegionSequence[0].CodeValue == "39607008"
    assert lesion.SegmentAlgorithmType == "AUTOMATIC" and lesion.SegmentAlgorithmName == result.model

    uids = list(ct.sop_instance_uids)
    masks = result.masks
    expected = {1: masks.original("lung") & ~masks.original("left"), 2: masks.original("left"),
                3: masks.original("lesion")}
    for number, mask in expected.items():
        assert np.array_equal(_segment_volume(back, uids, number), mask), number


def test_deterministic_and_versioned(ct, result):
    a = build_segmentation(ct.datasets, result, result.masks, 1, created_at=CREATED)
    b = build_segmentation(ct.datasets, result, result.masks, 1, created_at=CREATED)
    assert file_bytes(a) == file_bytes(b)
    v2 = build_segmentation(ct.datasets, result, result.masks, 2, created_at=CREATED)
    assert v2.SOPInstanceUID != a.SOPInstanceUID and v2.SeriesInstanceUID != a.SeriesInstanceUID
    # headers suffice: the SEG never needs the source pixels
    headers = [pydicom.dcmread(io.BytesIO(file_bytes(ds)), stop_before_pixels=True) for ds in ct.datasets]
    assert file_bytes(build_segmentation(headers, result, result.masks, 1, created_at=CREATED)) == file_bytes(a)


def test_working_grid_masks_map_back_by_nearest_neighbour(ct, result):
    full = result.masks
    coarse = ResultMasks(lung=full.lung[:, ::2, ::2], left=full.left[:, ::2, ::2], lesion=full.lesion[:, ::2, ::2],
                         factor=(1, 2, 2), original_shape=full.original_shape, spacing_mm=(1.0, 2.0, 2.0))
    seg = build_segmentation(ct.datasets, result, coarse, 1, created_at=CREATED)
    lesion = _segment_volume(seg, list(ct.sop_instance_uids), segment_numbers(coarse)["lesion"])
    expected = np.repeat(np.repeat(coarse.lesion, 2, axis=1), 2, axis=2)[:, : full.original_shape[1],
                                                                          : full.original_shape[2]]
    assert np.array_equal(lesion, expected)
    assert np.array_equal(coarse.original_slice("lesion", 3), expected[3])


def test_ground_glass_and_consolidation_get_their_own_segments(ct, result):
    masks = result.masks
    half = masks.lesion.shape[2] // 2
    ggo = masks.lesion.copy()
    ggo[:, :, half:] = False
    split = dataclasses.replace(masks, ggo=ggo, consolidation=masks.lesion & ~ggo)
    numbers = segment_numbers(split)
    seg = build_segmentation(ct.datasets, result, split, 1, created_at=CREATED)
    labels = {s.SegmentNumber: (s.SegmentLabel, s.SegmentedPropertyTypeCodeSequence[0].CodeValue)
              for s in seg.SegmentSequence}
    assert labels[numbers["ggo"]] == ("Ground glass opacity", "112120")
    assert labels[numbers["consolidation"]] == ("Consolidation", "95436008")
    assert "lesion" not in numbers
    both = _segment_volume(seg, list(ct.sop_instance_uids), numbers["ggo"]) | _segment_volume(
        seg, list(ct.sop_instance_uids), numbers["consolidation"])
    assert np.array_equal(both, masks.original("lesion"))


def test_masks_file_round_trip(tmp_path, result):
    path = tmp_path / "sub" / "masks.npz"
    size = save_masks(path, result.masks)
    assert path.stat().st_size == size and not list(path.parent.glob(".*.tmp"))
    back = load_masks(path)
    for name in ("lung", "left", "lesion"):
        assert np.array_equal(getattr(back, name), getattr(result.masks, name))
    assert back.factor == result.masks.factor and back.original_shape == result.masks.original_shape
    assert back.spacing_mm == pytest.approx(result.masks.spacing_mm)
    assert back.ggo is None


def test_bad_arguments_name_the_argument(ct, result):
    with pytest.raises(TypeError, match="masks"):
        build_segmentation(ct.datasets, result, None, 1)
    with pytest.raises(ValueError, match="result"):
        build_segmentation(ct.datasets, ct.score_result("failed", reason="x"), result.masks, 1)
    with pytest.raises(ValueError, match="masks"):
        build_segmentation(ct.datasets[:-1], dataclasses.replace(result, source_sop_instance_uids=[],
                                                                 boxes=[]), result.masks, 1)
    with pytest.raises(ValueError, match="compression"):
        build_segmentation(ct.datasets, result, result.masks, 1, compression="jpeg")
    with pytest.raises(ValueError, match="factor"):
        ResultMasks(lung=result.masks.lung, left=result.masks.left, lesion=result.masks.lesion, factor=(1, 2, 2),
                    original_shape=result.masks.original_shape)
