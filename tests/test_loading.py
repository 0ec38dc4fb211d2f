"""Loading DICOM series and NIfTI studies into HU volumes, and refusing what cannot be scored."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, RLELossless, generate_uid

from ct_triage.errors import CtTriageError, InvalidInput, NotApplicable
from ct_triage_tools.phantom import make_phantom, write_phantom
from tests.support.data import LUNG_PET_CT, MOSMED_MASKS, NY_SBU, need
from worker.scoring.load import (
    group_series,
    load_nifti,
    load_series,
    nifti_array_zrc,
    read_series_headers,
)

SMALL = {"involvement": 25.0, "slices": 40, "rows": 128, "seed": 3}




@pytest.fixture(scope="module")
def phantom():
    return make_phantom(SMALL["involvement"], slices=SMALL["slices"], rows=SMALL["rows"],
                        seed=SMALL["seed"])


@pytest.fixture(scope="module")
def series_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom")
    write_phantom(out, SMALL["involvement"], slices=SMALL["slices"], rows=SMALL["rows"],
                  seed=SMALL["seed"], kernels=("FC51", "FC07"))
    return out


def files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.dcm"))


def rewrite(sources: list[Path], target: Path, change) -> list[Path]:
    """Copies of ``sources`` in ``target`` after ``change(index, dataset)`` (which may
    return False to leave that file out)."""
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for index, source in enumerate(sources):
        ds = pydicom.dcmread(source)
        if change(index, ds) is False:
            continue
        path = target / source.name
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written


# -- round trips ----------------------------------------------------------------------------


def test_round_trip_gives_identical_hu_and_uids(series_dir, phantom):
    paths = files(series_dir / "FC51")
    random.Random(0).shuffle(paths)  # order on disk or in the list must not matter
    volume = load_series(paths)
    assert volume.hu.dtype == np.int16
    assert np.array_equal(volume.hu, phantom.volume.hu)
    assert volume.spacing_mm == pytest.approx(phantom.volume.spacing_mm)
    assert volume.sop_instance_uids == phantom.volume.sop_instance_uids
    assert volume.series_instance_uid == phantom.volume.series_instance_uid
    assert volume.study_instance_uid == phantom.volume.study_instance_uid
    assert volume.column_towards_patient_left is True


@pytest.mark.parametrize("transfer_syntax", [RLELossless, JPEG2000Lossless], ids=["rle", "j2k"])
def test_compressed_copies_load_identically(tmp_path, phantom, transfer_syntax):
    write_phantom(tmp_path, SMALL["involvement"], slices=SMALL["slices"], rows=SMALL["rows"],
                  seed=SMALL["seed"], transfer_syntax=transfer_syntax)
    paths = files(tmp_path / "FC51")
    assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID == transfer_syntax
    volume = load_series(paths)
    assert np.array_equal(volume.hu, phantom.volume.hu)
    assert volume.sop_instance_uids == phantom.volume.sop_instance_uids


def test_per_slice_rescale_and_padding_range(tmp_path, series_dir, phantom):
    """Each slice is rescaled with its own slope/intercept; a padding range is honoured."""
    changed = set()

    def change(k, ds):
        if k % 2:  # these slices store HU with slope 2 and another intercept
            stored = ds.pixel_array.astype(np.int32)
            hu = stored + int(ds.RescaleIntercept)
            new = (hu + 2000) // 2
            new[stored == -2048] = -2048
            ds.RescaleSlope, ds.RescaleIntercept = "2", "-2000"
            ds.PixelData = new.astype(np.int16).tobytes()
            changed.add(ds.SOPInstanceUID)
        # stored -2048..-1900 is padding; real stored values start at 0 (HU -1024)
        ds.add_new(0x00280121, "SS", -1900)  # PixelPaddingRangeLimit

    volume = load_series(rewrite(files(series_dir / "FC51"), tmp_path, change))
    expected = phantom.volume.hu.astype(np.int32)
    halved = np.array([uid in changed for uid in volume.sop_instance_uids])
    expected[halved] -= expected[halved] % 2  # slope 2 keeps only even HU
    assert halved.sum() == SMALL["slices"] // 2
    assert np.array_equal(volume.hu, expected)
    assert (volume.hu[:, 0, 0] == -1024).all()


def test_fractional_slope_gives_float_volume(tmp_path, series_dir, phantom):
    def change(k, ds):
        ds.RescaleSlope = "0.5"
        ds.RescaleIntercept = "-1024.0"
        ds.PixelData = ((ds.pixel_array.astype(np.int32) * 2).clip(-32768, 32767)).astype(np.int16).tobytes()
        ds.PixelPaddingValue = -4096
    paths = rewrite(files(series_dir / "FC51"), tmp_path, change)
    volume = load_series(paths)
    assert volume.hu.dtype == np.float32
    assert np.array_equal(volume.hu, phantom.volume.hu.astype(np.float32))


def test_enhanced_multiframe_ct_loads_like_the_single_frames(tmp_path, series_dir, phantom):
    from highdicom.legacy import LegacyConvertedEnhancedCTImage

    singles = [pydicom.dcmread(p) for p in files(series_dir / "FC51")]
    multi = LegacyConvertedEnhancedCTImage(
        singles, series_instance_uid=generate_uid(), series_number=90,
        sop_instance_uid=generate_uid(), instance_number=1,
    )
    path = tmp_path / "enhanced.dcm"
    multi.save_as(path)
    assert pydicom.dcmread(path, stop_before_pixels=True).NumberOfFrames == SMALL["slices"]
    volume = load_series([path])
    assert np.array_equal(volume.hu, phantom.volume.hu)
    assert volume.spacing_mm == pytest.approx(phantom.volume.spacing_mm)
    assert volume.sop_instance_uids == [str(multi.SOPInstanceUID)] * SMALL["slices"]


# -- refusals ---------------------------------------------------------------------------------


def expect_not_applicable(paths, match, **kwargs):
    with pytest.raises(NotApplicable, match=match) as caught:
        load_series(paths, **kwargs)
    assert "\n" not in str(caught.value), "reasons are one-liners"
    return str(caught.value)


def test_too_few_slices(series_dir):
    expect_not_applicable(files(series_dir / "FC51")[:5], r"too few slices: 5 \(at least 20")
    expect_not_applicable(files(series_dir / "FC51")[:30], r"too few slices: 30", min_slices=31)


def test_gantry_tilt_declared(tmp_path, series_dir):
    def change(k, ds):
        ds.GantryDetectorTilt = "15"
    expect_not_applicable(rewrite(files(series_dir / "FC51"), tmp_path, change), "gantry tilt of 15")


def test_positions_not_along_the_normal(tmp_path, series_dir):
    def change(k, ds):  # a tilted stack with the tilt tag left at 0
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 0.2 * z, z]
    expect_not_applicable(rewrite(files(series_dir / "FC51"), tmp_path, change),
                          "not along the slice normal")


def test_mixed_orientation(tmp_path, series_dir):
    def change(k, ds):
        if k == 7:
            ds.ImageOrientationPatient = [0.98, 0.2, 0, -0.2, 0.98, 0]
    expect_not_applicable(rewrite(files(series_dir / "FC51"), tmp_path, change), "mixed orientations")


def test_not_axial(tmp_path, series_dir):
    def change(k, ds):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # coronal
        ds.ImagePositionPatient = [x, z, 0]
    expect_not_applicable(rewrite(files(series_dir / "FC51"), tmp_path, change), "not an axial series")


def test_missing_slice_names_the_gap(tmp_path, series_dir):
    paths = files(series_dir / "FC51")
    # instance 21 is sorted slice 19 (instance 1 is the top): slices 18 and 19 then touch the gap
    kept = [p for p in paths if p.name != "IM000021.dcm"]
    reason = expect_not_applicable(kept, r"z-gap of 2\.00 mm between slices 18 and 19")
    assert "spacing 1.00 mm" in reason


def test_duplicate_position(tmp_path, series_dir):
    def change(k, ds):
        if k == 3:
            ds.ImagePositionPatient = list(pydicom.dcmread(files(series_dir / "FC51")[4]).ImagePositionPatient)
    expect_not_applicable(rewrite(files(series_dir / "FC51"), tmp_path, change), "same position")


def test_mixed_image_sizes(tmp_path, series_dir):
    def change(k, ds):
        if k == 0:
            ds.PixelData = ds.pixel_array[::2, ::2].copy().tobytes()
            ds.Rows, ds.Columns = 64, 64
    expect_not_applicable(rewrite(files(series_dir / "FC51"), tmp_path, change), "mixed image sizes")


def test_non_ct_and_localizer(tmp_path, series_dir):
    def to_mr(k, ds):
        ds.Modality = "MR"
    expect_not_applicable(rewrite(files(series_dir / "FC51"), tmp_path / "mr", to_mr), "modality MR, not CT")

    def to_localizer(k, ds):
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    expect_not_applicable(rewrite(files(series_dir / "FC51"), tmp_path / "loc", to_localizer), "localizer")


def test_unreadable_file_and_missing_pixels(tmp_path, series_dir):
    paths = files(series_dir / "FC51")
    junk = tmp_path / "junk.dcm"
    junk.write_text("not DICOM at all")
    with pytest.raises(InvalidInput, match="junk.dcm: not a readable DICOM"):
        load_series(paths + [junk])
    with pytest.raises(InvalidInput, match="no such|not a readable"):
        load_series([tmp_path / "missing.dcm"])

    def drop_pixels(k, ds):
        if k == 2:
            del ds.PixelData
    with pytest.raises(InvalidInput, match="no pixel data"):
        load_series(rewrite(paths, tmp_path / "nopix", drop_pixels))
    with pytest.raises(InvalidInput, match="paths is empty"):
        load_series([])


def test_two_series_in_one_call_is_invalid(series_dir):
    with pytest.raises(InvalidInput, match="2 series"):
        load_series(files(series_dir / "FC51") + files(series_dir / "FC07"))


def test_loading_and_phantom_do_not_import_torch():
    code = ("import sys, worker.scoring, worker.scoring.load, worker.scoring.select, ct_triage_tools.phantom; "
            "sys.exit('torch' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr or "torch was imported"


def test_errors_share_the_project_base_class():
    assert issubclass(NotApplicable, CtTriageError) and issubclass(InvalidInput, CtTriageError)


# -- folders ------------------------------------------------------------------------------------


def test_group_series_skips_non_dicom(series_dir):
    groups = group_series(series_dir)  # holds ground_truth.json beside the two series
    assert len(groups) == 2
    assert all(len(paths) == SMALL["slices"] for paths in groups.values())
    headers = read_series_headers(series_dir)
    assert set(headers) == set(groups)
    assert all("PixelData" not in ds for hs in headers.values() for ds in hs)
    with pytest.raises(InvalidInput, match="not a directory"):
        group_series(series_dir / "ground_truth.json")


# -- NIfTI ----------------------------------------------------------------------------------------


def test_nifti_round_trip_mosmed_orientation(tmp_path):
    # MosMedData's affine: x flipped (axis codes L, A, S), 0.923 mm pixels, 8 mm slices
    zrc = np.arange(4 * 6 * 5, dtype=np.int16).reshape(4, 6, 5) * 10 - 1100
    xyz = zrc[:, ::-1, :].transpose(2, 1, 0)  # what the file holds: (x towards L, y towards A, z)
    affine = np.diag([-0.923, 0.923, 8.0, 1.0])
    path = tmp_path / "study_0001.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(xyz), affine), path)
    volume = load_nifti(path)
    assert volume.hu.dtype == np.int16 and volume.hu.shape == (4, 6, 5)
    assert np.array_equal(volume.hu, np.maximum(zrc, -1024))
    assert volume.spacing_mm == pytest.approx((8.0, 0.923, 0.923))
    assert volume.column_towards_patient_left is True
    assert volume.sop_instance_uids == []


def test_nifti_other_axis_order_gives_the_same_volume(tmp_path):
    zrc = np.random.default_rng(0).integers(-1000, 400, size=(3, 4, 5)).astype(np.int16)
    # RAS+ file (x towards the right): columns must come out flipped back
    ras = zrc[:, ::-1, ::-1].transpose(2, 1, 0)
    path = tmp_path / "ras.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(ras), np.diag([0.7, 0.7, 5.0, 1.0])), path)
    assert np.array_equal(load_nifti(path).hu, zrc)
    # a float file with a scale factor keeps float values that are not whole numbers
    scaled = nib.Nifti1Image(np.ascontiguousarray(ras).astype(np.float32) + 0.5, np.diag([0.7, 0.7, 5.0, 1.0]))
    nib.save(scaled, tmp_path / "float.nii.gz")
    assert load_nifti(tmp_path / "float.nii.gz").hu.dtype == np.float32


def test_nifti_errors(tmp_path):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"nope")
    with pytest.raises(InvalidInput, match="bad.nii.gz"):
        load_nifti(bad)
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2, 2), np.int16), np.eye(4)), tmp_path / "4d.nii.gz")
    with pytest.raises(InvalidInput, match="3-D"):
        load_nifti(tmp_path / "4d.nii.gz")


def test_real_mosmed_mask_orientation():
    masks = sorted(need(MOSMED_MASKS).glob("study_*_mask.nii.gz"))
    mask, spacing = nifti_array_zrc(masks[0])
    assert mask.shape[1:] == (512, 512) and 30 <= mask.shape[0] <= 60
    assert spacing[0] == pytest.approx(8.0)
    assert set(np.unique(mask)) <= {0, 1}
    assert mask.sum() > 0


# -- real scanner data ------------------------------------------------------------------------------


@pytest.mark.parametrize("folder, slices, spacing", [
    ("A0001-philips-L-5mm", 64, 5.0),
    ("A0001-philips-B-5mm", 64, 5.0),
    ("A0002-siemens-B70f-8mm", 30, 8.0),
    ("A0002-siemens-B40f-8mm", 30, 8.0),
])
def test_real_series_load_to_plausible_hu(folder, slices, spacing):
    volume = load_series(files(need(LUNG_PET_CT / folder)))
    hu = volume.hu
    assert hu.shape == (slices, 512, 512)
    assert volume.spacing_mm[0] == pytest.approx(spacing)
    assert hu.min() == -1024
    assert volume.column_towards_patient_left is True
    # air (outside the body and in the lungs) around -1000, soft tissue between 0 and 100
    air = hu[(hu > -1024) & (hu < -900)]
    assert -1010 < np.median(air) < -930
    counts, edges = np.histogram(hu, bins=np.arange(-60, 210, 20))
    soft_tissue_peak = edges[np.argmax(counts)] + 10
    assert 0 <= soft_tissue_peak <= 100
    assert len(set(volume.sop_instance_uids)) == slices


def test_real_single_slices_load_but_are_not_a_volume():
    paths = sorted(need(NY_SBU).glob("*.dcm"))
    loaded = 0
    for path in paths:
        with pytest.raises(NotApplicable, match="too few slices: 1"):
            load_series([path])
        header = pydicom.dcmread(path, stop_before_pixels=True)
        normal = np.cross(*np.reshape([float(v) for v in header.ImageOrientationPatient], (2, 3)))
        if abs(normal[2]) < 0.9:
            with pytest.raises(NotApplicable, match="not an axial series"):
                load_series([path], min_slices=1)
            continue
        volume = load_series([path], min_slices=1)
        loaded += 1
        assert volume.hu.shape == (1, 512, 512) and volume.hu.min() >= -1024
        padding = header.get("PixelPaddingValue")
        if padding is not None:  # GE pads with -2000 (stored; -3024 HU): now the floor
            stored = pydicom.dcmread(path).pixel_array
            assert (volume.hu[0][stored == padding] == -1024).all()
        assert volume.hu[0, 256, 256] > -1024  # the centre of the scan is not padding
    assert loaded == 20
