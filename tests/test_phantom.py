"""The synthetic chest CT: its ground truth must be exactly what its masks say."""

from __future__ import annotations

import json
import shutil
import subprocess
import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless
from scipy import ndimage

from ct_triage_tools.phantom import make_phantom, write_phantom
from worker.scoring.load import load_series
from worker.scoring.result import LesionBox, category_for

SMALL = {"slices": 40, "rows": 128}
DCIODVFY = shutil.which("dciodvfy") or "/usr/bin/dciodvfy"


@pytest.mark.parametrize("involvement", [0.0, 3.0, 18.0, 37.5, 62.0, 85.0])
@pytest.mark.parametrize("seed", [0, 7])
def test_involvement_matches_request_and_masks(involvement, seed):
    phantom = make_phantom(involvement, seed=seed, **SMALL)
    truth = phantom.ground_truth
    lung, lesion, left = phantom.lung_mask, phantom.lesion_mask, phantom.left_lung_mask
    voxel_ml = phantom.volume.voxel_volume_ml

    assert abs(truth["involvement_percent"] - involvement) <= 1.0
    assert not (lesion & ~lung).any(), "lesions must lie inside the lungs"
    assert not (left & ~lung).any()
    assert truth["lung_volume_ml"] == pytest.approx(lung.sum() * voxel_ml)
    assert truth["lesion_volume_ml"] == pytest.approx(lesion.sum() * voxel_ml)
    assert truth["involvement_percent"] == pytest.approx(100 * lesion.sum() / lung.sum())
    assert truth["lung_volume_left_ml"] + truth["lung_volume_right_ml"] == pytest.approx(
        truth["lung_volume_ml"])
    assert truth["category"] == category_for(truth["involvement_percent"])
    assert (truth["seed"], truth["slices"], truth["rows"]) == (seed, 40, 128)
    assert truth["spacing_mm"] == list(phantom.volume.spacing_mm)
    assert (truth["lesion_count"] == 0) == (involvement == 0)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_left_right_split_is_recorded_and_consistent(seed):
    phantom = make_phantom(30.0, seed=seed, **SMALL)
    truth = phantom.ground_truth
    lesion, left, lung = phantom.lesion_mask, phantom.left_lung_mask, phantom.lung_mask
    right = lung & ~left
    assert truth["involvement_percent_left"] == pytest.approx(100 * (lesion & left).sum() / left.sum())
    assert truth["involvement_percent_right"] == pytest.approx(100 * (lesion & right).sum() / right.sum())
    weighted = (truth["involvement_percent_left"] * truth["lung_volume_left_ml"]
                + truth["involvement_percent_right"] * truth["lung_volume_right_ml"]) / truth["lung_volume_ml"]
    assert weighted == pytest.approx(truth["involvement_percent"])
    assert truth["involvement_percent_left"] > 1 and truth["involvement_percent_right"] > 1
    # the patient's left lung is at high columns (column_towards_patient_left)
    cols = phantom.volume.hu.shape[2]
    assert np.nonzero(left)[2].min() > cols // 2
    assert np.nonzero(right)[2].max() < cols // 2


def test_split_differs_between_seeds():
    splits = {round(make_phantom(25.0, seed=s, **SMALL).ground_truth["involvement_percent_left"], 1)
              for s in range(3)}
    assert len(splits) == 3


def test_same_seed_same_bytes_other_seed_other_bytes():
    a = make_phantom(20.0, seed=5, **SMALL)
    b = make_phantom(20.0, seed=5, **SMALL)
    c = make_phantom(20.0, seed=6, **SMALL)
    assert a.volume.hu.tobytes() == b.volume.hu.tobytes()
    assert a.ground_truth == b.ground_truth
    assert a.volume.sop_instance_uids == b.volume.sop_instance_uids
    assert a.volume.hu.tobytes() != c.volume.hu.tobytes()
    assert a.volume.series_instance_uid != c.volume.series_instance_uid
    assert len(set(a.volume.sop_instance_uids)) == a.volume.hu.shape[0]
    thicker = make_phantom(20.0, seed=5, slice_spacing_mm=2.0, **SMALL)
    assert thicker.volume.series_instance_uid != a.volume.series_instance_uid


def test_volume_shape_dtype_and_geometry():
    phantom = make_phantom(10.0, slices=30, rows=96, seed=0, slice_spacing_mm=2.5)
    volume = phantom.volume
    assert volume.hu.shape == (30, 96, 96) and volume.hu.dtype == np.int16
    assert volume.spacing_mm == (2.5, 350 / 96, 350 / 96)
    assert volume.column_towards_patient_left is True
    assert volume.study_instance_uid and volume.series_instance_uid
    custom = make_phantom(10.0, slices=30, rows=96, pixel_spacing_mm=4.0)
    assert custom.volume.spacing_mm[1:] == (4.0, 4.0)


def test_hu_of_tissues_and_confounders():
    phantom = make_phantom(40.0, slices=60, rows=192, seed=1)
    hu, lung, lesion = phantom.volume.hu, phantom.lung_mask, phantom.lesion_mask
    healthy = lung & ~lesion
    assert -900 < np.median(hu[healthy]) < -780
    # ground glass and consolidation: the lesion bands of the annotation protocol
    lesion_hu = hu[lesion]
    assert (lesion_hu > -720).mean() > 0.9
    assert ((lesion_hu > -700) & (lesion_hu < -350)).mean() > 0.5
    assert (lesion_hu > -130).mean() > 0.05
    # dependent gradient: the back of healthy lung is denser than its front
    rows = np.nonzero(healthy)[1]
    front = healthy & (np.arange(hu.shape[1])[None, :, None] < np.percentile(rows, 30))
    back = healthy & (np.arange(hu.shape[1])[None, :, None] > np.percentile(rows, 90))
    assert np.median(hu[back]) > np.median(hu[front]) + 30
    # outside the scan circle: the HU floor; air outside the body about -1000 with noise
    assert (hu[:, 0, 0] == -1024).all()
    air = hu[:, 5:15, hu.shape[2] // 2 - 5: hu.shape[2] // 2 + 5].astype(float)
    assert abs(air.mean() + 1000) < 10 and 12 < air.std() < 30
    assert (hu > 600).any(), "bone present"


def test_vessels_fool_a_naive_threshold():
    phantom = make_phantom(0.0, slices=60, rows=192, seed=0)
    hu, lung = phantom.volume.hu, phantom.lung_mask
    naive_percent = 100 * ((hu > -700) & lung).sum() / lung.sum()
    assert naive_percent > 1.0, "a naive count must not read CT-0 on a healthy phantom"
    assert phantom.ground_truth["category"] == "CT-0"


def test_pleural_effusion_is_outside_the_lung_mask():
    phantom = make_phantom(0.0, slices=60, rows=192, seed=0)
    hu, lung = phantom.volume.hu, phantom.lung_mask
    base = slice(0, 12)
    rows = np.arange(hu.shape[1])[None, :, None]
    cols = np.arange(hu.shape[2])[None, None, :]
    # fluid (about +10 HU) behind the right lung's base, not part of the lung
    region = (rows > hu.shape[1] * 0.65) & (cols < hu.shape[2] * 0.45) & (cols > hu.shape[2] * 0.2)
    fluid = region & (np.abs(hu[base].astype(int) - 10) < 45) & ~lung[base]
    assert fluid.sum() > 20


def test_lesion_boxes_cover_every_lesion_voxel():
    phantom = make_phantom(12.0, slices=40, rows=128, seed=4)
    truth, lesion = phantom.ground_truth, phantom.lesion_mask
    boxes = truth["lesion_boxes"]
    assert boxes and truth["lesion_count"] >= 1
    covered = np.zeros_like(lesion)
    assert all(LesionBox(**box) for box in boxes), "boxes convert to the result type"
    for box in boxes:
        k = box["slice_index"]
        assert box["sop_instance_uid"] == phantom.volume.sop_instance_uids[k]
        assert box["row_min"] <= box["row_max"] and box["col_min"] <= box["col_max"]
        window = lesion[k, box["row_min"]: box["row_max"] + 1, box["col_min"]: box["col_max"] + 1]
        assert window.any()
        covered[k, box["row_min"]: box["row_max"] + 1, box["col_min"]: box["col_max"] + 1] = True
    assert not (lesion & ~covered).any()
    assert {b["lung"] for b in boxes} == {"left", "right"}


def test_invalid_arguments_are_named():
    with pytest.raises(ValueError, match="involvement"):
        make_phantom(120.0)
    with pytest.raises(ValueError, match="rows"):
        make_phantom(10.0, rows=8)
    with pytest.raises(ValueError, match="transfer_syntax"):
        write_phantom("/nonexistent", 10.0, transfer_syntax="1.2.840.10008.1.2.4.50")


def test_write_phantom_layout_and_twin(tmp_path):
    truth = write_phantom(tmp_path, 22.0, seed=2, kernels=("FC51", "FC07"), patient_id="PID-22",
                          **SMALL)
    assert json.loads((tmp_path / "ground_truth.json").read_text()) == truth
    files = {k: sorted((tmp_path / k).glob("IM*.dcm")) for k in ("FC51", "FC07")}
    assert [p.name for p in files["FC51"]] == [f"IM{i:06d}.dcm" for i in range(1, 41)]
    lung_ds = pydicom.dcmread(files["FC51"][0])
    soft_ds = pydicom.dcmread(files["FC07"][0])
    assert lung_ds.SeriesInstanceUID == truth["series_instance_uid"] == truth["series_by_kernel"]["FC51"]
    assert soft_ds.SeriesInstanceUID == truth["series_by_kernel"]["FC07"] != lung_ds.SeriesInstanceUID
    assert soft_ds.StudyInstanceUID == lung_ds.StudyInstanceUID == truth["study_instance_uid"]
    assert soft_ds.FrameOfReferenceUID == lung_ds.FrameOfReferenceUID
    assert soft_ds.SeriesNumber != lung_ds.SeriesNumber
    assert soft_ds.SeriesDescription != lung_ds.SeriesDescription
    assert (lung_ds.ConvolutionKernel, soft_ds.ConvolutionKernel) == ("FC51", "FC07")
    assert lung_ds.PatientID == "PID-22" and str(lung_ds.PatientName) == "PHANTOM^P22S2"
    assert lung_ds.Manufacturer == "TOSHIBA" and lung_ds.ManufacturerModelName == "Aquilion"
    assert lung_ds.ImagesInAcquisition == 40 and lung_ds.InstanceNumber == 1
    assert lung_ds.PixelPaddingValue == -2048
    # the soft-tissue twin: same anatomy, less noise
    sharp = load_series(files["FC51"])
    soft = load_series(files["FC07"])
    air = (slice(None), slice(4, 12), slice(60, 68))
    assert soft.hu[air].std() < 0.8 * sharp.hu[air].std()
    assert abs(float(np.mean(soft.hu)) - float(np.mean(sharp.hu))) < 5
    # the same call writes the same bytes
    again = write_phantom(tmp_path / "again", 22.0, seed=2, kernels=("FC51",), patient_id="PID-22", **SMALL)
    assert again["lesion_boxes"] == truth["lesion_boxes"]
    assert (tmp_path / "again" / "FC51" / "IM000007.dcm").read_bytes() == files["FC51"][6].read_bytes()


def test_study_uid_override_changes_all_uids(tmp_path):
    truth = write_phantom(tmp_path, 5.0, seed=0, study_instance_uid="1.2.3.4.5", slices=20, rows=64)
    default = make_phantom(5.0, seed=0, slices=20, rows=64)
    assert truth["study_instance_uid"] == "1.2.3.4.5"
    assert truth["series_instance_uid"] != default.volume.series_instance_uid
    assert pydicom.dcmread(tmp_path / "FC51" / "IM000001.dcm").StudyInstanceUID == "1.2.3.4.5"


@pytest.mark.skipif(not Path(DCIODVFY).exists(), reason="dciodvfy (Debian dicom3tools) is not installed")
@pytest.mark.parametrize("transfer_syntax", [ExplicitVRLittleEndian, RLELossless, JPEG2000Lossless])
def test_dciodvfy_reports_no_errors(tmp_path, transfer_syntax):
    write_phantom(tmp_path, 30.0, seed=1, slices=20, rows=64, kernels=("FC51", "FC07"),
                  transfer_syntax=transfer_syntax)
    for path in (tmp_path / "FC51" / "IM000001.dcm", tmp_path / "FC07" / "IM000020.dcm"):
        run = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
        report = run.stdout + run.stderr
        errors = [line for line in report.splitlines() if line.startswith("Error")]
        assert not errors, f"{path}:\n{report}"
        assert "CTImage" in report


@pytest.mark.slow
def test_full_size_phantom_is_realistic(tmp_path):
    """512x512x300 (the acquisition protocol's size): realistic volumes, bounded memory.
    Its speed is measured by bench/score_bench.py, not asserted here (no timed tests)."""
    phantom = make_phantom(25.0, seed=0)
    truth = phantom.ground_truth
    assert 4000 < truth["lung_volume_ml"] < 6000
    assert abs(truth["involvement_percent"] - 25.0) <= 1.0

    written = write_phantom(tmp_path, 25.0, seed=0)
    assert written["lesion_boxes"] == truth["lesion_boxes"]

    paths = sorted((tmp_path / "FC51").glob("*.dcm"))
    expected_hu = phantom.volume.hu
    del phantom  # keep the masks out of the memory measurement
    tracemalloc.start()  # numpy reports its buffers to tracemalloc
    volume = load_series(paths)
    peak_mb = tracemalloc.get_traced_memory()[1] / 1e6
    tracemalloc.stop()
    assert peak_mb < 1000, f"load_series peaked at {peak_mb:.0f} MB"
    assert volume.hu.shape == (300, 512, 512) and volume.hu.dtype == np.int16
    assert np.array_equal(volume.hu, expected_hu)
    assert written["series_instance_uid"] == volume.series_instance_uid


def _outside_air(hu: np.ndarray) -> np.ndarray:
    """Per slice, the voxels below -500 HU connected (in-plane) to the image border: the
    air around the body, as the scorer's body mask sees it."""
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)  # 4-connected, slice by slice
    labels, _ = ndimage.label(hu < -500, structure=in_plane)
    edge = np.concatenate([labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]],
                          axis=None)
    border = np.zeros(labels.max() + 1, dtype=bool)
    border[np.unique(edge)] = True
    border[0] = False
    return border[labels]


def _wall_breaches(phantom, wall_mm: float = 12.0) -> int:
    """Outside-air voxels within ``wall_mm`` (an ellipsoid in real millimetres) of the lungs."""
    dz, dy, dx = phantom.volume.spacing_mm
    rz, ry, rx = (int(wall_mm // s) for s in (dz, dy, dx))
    gz, gy, gx = np.ogrid[-rz:rz + 1, -ry:ry + 1, -rx:rx + 1]
    ball = (gz * dz) ** 2 + (gy * dy) ** 2 + (gx * dx) ** 2 <= wall_mm ** 2
    near_lung = ndimage.binary_dilation(phantom.lung_mask, structure=ball)
    return int((near_lung & _outside_air(phantom.volume.hu)).sum())


@pytest.mark.parametrize("seed", range(31))
def test_lungs_are_enclosed_by_a_chest_wall(seed):
    """Whatever the size jitter, >= 12 mm of wall between the lungs and the outside air,
    so a body mask (largest non-air component) keeps the lungs inside it."""
    phantom = make_phantom(35.0, slices=24, rows=96, slice_spacing_mm=12.0, seed=seed)
    assert _wall_breaches(phantom) == 0
    lung = phantom.lung_mask
    assert not (phantom.lesion_mask & ~lung).any()
    assert (lung.sum(axis=(1, 2)) > 0).sum() >= 20, "the lungs still span the chest"


@pytest.mark.parametrize("seed", [0, 3, 11])
def test_lungs_are_enclosed_by_a_chest_wall_at_scoring_size(seed):
    phantom = make_phantom(35.0, slices=60, rows=192, slice_spacing_mm=5.0, seed=seed)
    assert _wall_breaches(phantom) == 0
    truth = phantom.ground_truth
    assert 4000 < truth["lung_volume_ml"] < 6000
    assert abs(truth["involvement_percent"] - 35.0) <= 1.0


def test_write_phantom_stores_its_truth_masks_as_nifti(tmp_path):
    import nibabel as nib

    from ct_triage_tools.phantom import TRUTH_LABELS, read_truth_masks

    truth = write_phantom(tmp_path, 40.0, seed=3, **SMALL)
    phantom = make_phantom(40.0, seed=3, **SMALL)
    assert truth["truth_masks"] == "truth_masks.nii.gz" and truth["truth_labels"] == TRUTH_LABELS
    image = nib.load(str(tmp_path / "truth_masks.nii.gz"))
    dz, dy, dx = phantom.volume.spacing_mm
    assert image.shape == (128, 128, 40) and tuple(image.header.get_zooms()) == pytest.approx((dx, dy, dz))
    masks = read_truth_masks(tmp_path)
    assert np.array_equal(masks["lung"], phantom.lung_mask)
    assert np.array_equal(masks["lesion"], phantom.lesion_mask)
    assert np.array_equal(masks["left_lung"], phantom.left_lung_mask & phantom.lung_mask)
    # the truth's slice order is the series' order along the normal (lesion boxes agree)
    for box in truth["lesion_boxes"][:20]:
        k = box["slice_index"]
        assert masks["lesion"][k, box["row_min"]:box["row_max"] + 1, box["col_min"]:box["col_max"] + 1].any()
