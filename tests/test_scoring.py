"""The classical scorer and the scoring pipeline on phantoms with known answers.

Small phantoms (256 x 256 x 60 at 5 mm: the whole chest, coarsely sampled) carry the
accuracy matrix; one real-size 512 x 512 x 300 series runs end to end (``slow``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from ct_triage.errors import ConfigError
from ct_triage.settings import Settings
from ct_triage_tools.phantom import make_phantom, write_phantom
from tests.support.cli import run_tool_command
from worker.scoring.pipeline import score_path, score_study, score_volume
from worker.scoring.result import ScoreResult, category_for
from worker.scoring.volume import Volume

ROWS, SLICES = 256, 60
SPACING = 300.0 / SLICES  # the phantom's anatomy spans 300 mm of z


def settings(**overrides) -> Settings:
    return Settings.from_env({}, **overrides)


@pytest.fixture(scope="module")
def cpu() -> Settings:
    return settings(device="cpu")


_cache: dict = {}


def phantom(involvement, seed, rows=ROWS, slices=SLICES):
    key = (involvement, seed, rows, slices)
    if key not in _cache:
        _cache.clear()  # keep memory low: tests use one at a time
        _cache[key] = make_phantom(involvement, slices=slices, rows=rows, seed=seed,
                                   slice_spacing_mm=300.0 / slices)
    return _cache[key]


# -- accuracy matrix ----------------------------------------------------------------------


@pytest.mark.parametrize("scorer", ["classical", "hybrid"])
@pytest.mark.parametrize("involvement", [0, 10, 20, 35, 45, 60, 70, 85])
@pytest.mark.parametrize("seed", [1, 2])
def test_phantom_accuracy(involvement, seed, scorer):
    ph = phantom(involvement, seed)
    truth = ph.ground_truth
    r = score_volume(ph.volume, settings(device="cpu", scorer=scorer))
    assert r.status == "scored", r.reason
    # total within 3 points (issue 10), category exact
    assert abs(r.involvement_percent - truth["involvement_percent"]) <= 3.0, (r.involvement_percent, truth)
    assert r.category == truth["category"]
    if involvement == 0:
        assert r.category in ("CT-0", "CT-1") and r.involvement_percent < 5.0
    # left / right split
    assert abs(r.involvement_percent_left - truth["involvement_percent_left"]) <= 6.0
    assert abs(r.involvement_percent_right - truth["involvement_percent_right"]) <= 6.0
    # volumes within 10 % (lesions: or 1 % of the lungs, for the smallest lesion loads)
    assert r.lung_volume_ml == pytest.approx(truth["lung_volume_ml"], rel=0.10)
    assert r.lung_volume_left_ml == pytest.approx(truth["lung_volume_left_ml"], rel=0.10)
    assert r.lung_volume_right_ml == pytest.approx(truth["lung_volume_right_ml"], rel=0.10)
    # the hybrid leaves out the classical candidates its network does not confirm, which on
    # the phantoms are a few of the faintest fragments (seed 2 at 10 %: 2.5 ml of 460 more
    # than the classical scorer, which itself is 9.9 % under): 12 % for it
    rel = 0.12 if scorer == "hybrid" else 0.10
    lesion_tol = max(rel * truth["lesion_volume_ml"], 0.01 * truth["lung_volume_ml"])
    assert abs(r.lesion_volume_ml - truth["lesion_volume_ml"]) <= lesion_tol
    # the result object is complete
    assert r.lung_volume_left_ml + r.lung_volume_right_ml == pytest.approx(r.lung_volume_ml, abs=0.2)
    assert r.category == category_for(r.involvement_percent)
    assert r.model == f"ct-triage-{scorer}" and r.device == "cpu" and r.seconds > 0
    assert {"segment", "measure", "total"} <= set(r.timings)
    assert r.source_sop_instance_uids == ph.volume.sop_instance_uids
    assert r.series_instance_uid == ph.volume.series_instance_uid
    if involvement:
        assert r.lesion_count >= 1 and r.boxes


@pytest.mark.parametrize("involvement", [60, 85])
def test_confluent_consolidation_is_not_excluded_as_a_mass(involvement):
    """Issue 19 item 5: with mass exclusion on, the phantoms' confluent consolidation (a third
    of the lesion at 85 %, -60..+40 HU cores wrapped in ground glass) is not taken for a solid
    mass: nothing is reported as a mass and the % is what it is with exclusion off."""
    ph = phantom(involvement, 1)
    on = score_volume(ph.volume, settings(device="cpu", scorer="hybrid", mass_exclusion="exclude"))
    off = score_volume(ph.volume, settings(device="cpu", scorer="hybrid", mass_exclusion="off"))
    assert on.status == off.status == "scored"
    assert on.mass_excluded is True and on.mass_count == 0 and on.mass_volume_ml == 0.0
    assert off.mass_count is None and off.mass_volume_ml is None
    assert on.involvement_percent == off.involvement_percent
    assert abs(on.involvement_percent - ph.ground_truth["involvement_percent"]) <= 3.0


def test_ct0_with_dependent_density_and_effusion_stays_ct0(cpu):
    """The CT-0 phantom has the posterior density gradient (to -730 HU) and a right
    posterior pleural effusion: neither may become lesion, the effusion not lung."""
    ph = phantom(0, 1)
    r = score_volume(ph.volume, cpu)
    assert r.category in ("CT-0", "CT-1") and r.involvement_percent < 5.0
    assert r.category == "CT-0"  # in practice: nothing at all
    # the effusion (about 1-2 % of the right lung's space) is left out of the lung
    assert r.lung_volume_right_ml == pytest.approx(ph.ground_truth["lung_volume_right_ml"], rel=0.03)


def test_dense_consolidation_stays_inside_the_lung(cpu):
    """CT-4: most of the lung is lesion, much of it consolidation (-60..+40 HU) where a
    plain air threshold loses the lung; the lung volume must hold up."""
    ph = phantom(85, 1)
    r = score_volume(ph.volume, cpu)
    truth = ph.ground_truth["lung_volume_ml"]
    # an air threshold keeps only part of this lung (even with the truth's own outline)
    threshold_ml = ((ph.volume.hu < -320) & ph.lung_mask).sum() * ph.volume.voxel_volume_ml
    assert threshold_ml < 0.85 * truth
    assert r.lung_volume_ml == pytest.approx(truth, rel=0.10)
    assert r.category == "CT-4"


# -- determinism, orientation, boxes ---------------------------------------------------------


def test_deterministic(cpu):
    ph = phantom(35, 2)
    a = score_volume(ph.volume, cpu)
    copy = Volume(hu=ph.volume.hu.copy(), spacing_mm=ph.volume.spacing_mm,
                  sop_instance_uids=list(ph.volume.sop_instance_uids),
                  study_instance_uid=ph.volume.study_instance_uid,
                  series_instance_uid=ph.volume.series_instance_uid)
    b = score_volume(copy, cpu)
    ja, jb = a.to_json(), b.to_json()
    for j in (ja, jb):
        j.pop("seconds"), j.pop("timings")
    assert ja == jb


def test_left_right_follows_patient_orientation(cpu):
    """Mirrored columns with column_towards_patient_left=False is the same patient."""
    ph = phantom(20, 1)
    r = score_volume(ph.volume, cpu)
    mirrored = Volume(hu=np.ascontiguousarray(ph.volume.hu[:, :, ::-1]), spacing_mm=ph.volume.spacing_mm,
                      sop_instance_uids=ph.volume.sop_instance_uids, column_towards_patient_left=False)
    m = score_volume(mirrored, cpu)
    truth = ph.ground_truth
    # seed 1 has more disease on the right: both orientations must say so
    assert truth["involvement_percent_right"] > truth["involvement_percent_left"] + 3
    for res in (r, m):
        assert res.involvement_percent_right > res.involvement_percent_left + 3
    assert m.involvement_percent_left == pytest.approx(r.involvement_percent_left, abs=1.0)
    assert m.involvement_percent_right == pytest.approx(r.involvement_percent_right, abs=1.0)
    assert m.lung_volume_left_ml == pytest.approx(r.lung_volume_left_ml, rel=0.02)
    # boxes: the right lung is at low columns in the unmirrored volume
    cols = ph.volume.hu.shape[2]
    for box in r.boxes[:50]:
        centre = (box.col_min + box.col_max) / 2
        assert (box.lung == "right") == (centre < cols / 2)


def test_boxes_match_the_truth(cpu):
    ph = phantom(20, 2)
    r = score_volume(ph.volume, cpu)
    z, rows, cols = ph.volume.hu.shape
    truth_slices = {b["slice_index"] for b in ph.ground_truth["lesion_boxes"]}
    got_slices = {b.slice_index for b in r.boxes}
    assert len(got_slices & truth_slices) >= 0.8 * len(got_slices)
    for b in r.boxes:
        assert 0 <= b.slice_index < z
        assert b.sop_instance_uid == ph.volume.sop_instance_uids[b.slice_index]
        assert 0 <= b.row_min <= b.row_max < rows and 0 <= b.col_min <= b.col_max < cols
        assert b.lung in ("left", "right")
    # every box holds lesion of the truth somewhere (boxes are not noise)
    hits = sum(bool(ph.lesion_mask[b.slice_index, b.row_min:b.row_max + 1, b.col_min:b.col_max + 1].any())
               for b in r.boxes)
    assert hits >= 0.9 * len(r.boxes)
    # JSON round trip
    again = ScoreResult.from_json(json.loads(json.dumps(r.to_json())))
    assert again.boxes == r.boxes


# -- DICOM: compression, series selection, not applicable -----------------------------------


SMALL_DICOM = dict(slices=40, rows=192, slice_spacing_mm=7.5)


@pytest.fixture(scope="module")
def dicom_copies(tmp_path_factory):
    root = tmp_path_factory.mktemp("compressed")
    out = {}
    for name, syntax in (("explicit", ExplicitVRLittleEndian), ("rle", RLELossless),
                         ("j2k", JPEG2000Lossless)):
        write_phantom(root / name, 45, seed=4, kernels=("FC51",), transfer_syntax=syntax, **SMALL_DICOM)
        out[name] = root / name
    return out


def test_compressed_copies_score_the_same(dicom_copies, cpu):
    results = {name: score_path(folder, cpu) for name, folder in dicom_copies.items()}
    ref = results["explicit"].to_json()
    assert results["explicit"].status == "scored"
    syntaxes = {name: str(pydicom.dcmread(next((f / "FC51").glob("*.dcm"))).file_meta.TransferSyntaxUID)
                for name, f in dicom_copies.items()}
    assert len(set(syntaxes.values())) == 3
    for name, res in results.items():
        j = res.to_json()
        for d in (j, dict(ref)):
            d.pop("seconds"), d.pop("timings")
        ref_cmp = {k: v for k, v in ref.items() if k not in ("seconds", "timings")}
        assert j == ref_cmp, name


def test_selection_prefers_the_lung_kernel(tmp_path, cpu):
    truth = write_phantom(tmp_path / "study", 35, seed=5, kernels=("FC07", "FC51"), **SMALL_DICOM)
    from worker.scoring.load import group_series

    r = score_study(group_series(tmp_path / "study"), cpu)
    assert r.status == "scored"
    assert r.series_instance_uid == truth["series_by_kernel"]["FC51"]
    r2 = score_path(tmp_path / "study", cpu)
    assert r2.series_instance_uid == truth["series_by_kernel"]["FC51"]


def _rewrite(folder: Path, edit) -> None:
    for k, f in enumerate(sorted(folder.glob("*.dcm"))):
        ds = pydicom.dcmread(f)
        edit(ds, k)
        ds.save_as(f)


@pytest.fixture
def small_series(tmp_path):
    write_phantom(tmp_path / "s", 20, seed=6, kernels=("FC51",), **SMALL_DICOM)
    return tmp_path / "s" / "FC51"


def test_not_ct_is_not_applicable(small_series, cpu):
    _rewrite(small_series, lambda ds, k: setattr(ds, "Modality", "MR"))
    r = score_path(small_series, cpu)
    assert r.status == "not_applicable" and "CT" in r.reason and "modality" in r.reason.lower()
    assert r.priority == "MEDIUM" and r.category is None


def test_localizer_only_is_not_applicable(small_series, cpu):
    _rewrite(small_series, lambda ds, k: setattr(ds, "ImageType", ["ORIGINAL", "PRIMARY", "LOCALIZER"]))
    r = score_path(small_series, cpu)
    assert r.status == "not_applicable" and "localizer" in r.reason.lower()


def test_too_few_slices_is_not_applicable(tmp_path, cpu):
    write_phantom(tmp_path / "few", 20, seed=6, kernels=("FC51",), slices=8, rows=128, slice_spacing_mm=5.0)
    r = score_path(tmp_path / "few", cpu)
    assert r.status == "not_applicable" and "too few slices" in r.reason
    one = next((tmp_path / "few" / "FC51").glob("*.dcm"))
    r1 = score_path(one, cpu)
    assert r1.status == "not_applicable" and "too few slices" in r1.reason


def test_tilted_series_is_not_applicable(small_series, cpu):
    def tilt(ds, k):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 0.36 * (z + 100.0), z]  # ~20 degrees gantry tilt
        ds.GantryDetectorTilt = "20"

    _rewrite(small_series, tilt)
    r = score_path(small_series, cpu)
    assert r.status == "not_applicable" and "tilt" in r.reason


def test_no_lungs_is_not_applicable(cpu):
    hu = np.full((30, 128, 128), -1024, dtype=np.int16)
    yy, xx = np.mgrid[:128, :128]
    hu[:, (yy - 64) ** 2 + (xx - 64) ** 2 < 50 ** 2] = 30  # a water cylinder
    r = score_volume(Volume(hu=hu, spacing_mm=(5.0, 1.5, 1.5)), cpu)
    assert r.status == "not_applicable" and "lung" in r.reason


def test_unreadable_pixels_fail_with_reason(small_series, cpu):
    f = sorted(small_series.glob("*.dcm"))[5]
    ds = pydicom.dcmread(f)
    ds.PixelData = ds.PixelData[:100]
    ds.save_as(f)
    r = score_path(small_series, cpu)
    assert r.status == "failed" and r.reason and r.priority == "MEDIUM"


def test_missing_path_and_bad_settings_fail_cleanly(tmp_path, cpu):
    r = score_path(tmp_path / "nope", cpu)
    assert r.status == "failed" and "does not exist" in r.reason
    r = score_volume(phantom(10, 1).volume, settings(scorer="unet"))
    assert r.status == "failed" and "UNET_WEIGHTS" in r.reason
    with pytest.raises(ConfigError):
        settings(device="tpu")


def test_device_resolution():
    from worker.scoring.device import cuda_available, resolve_device

    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if cuda_available() else "cpu")
    if not cuda_available():
        with pytest.raises(ConfigError, match="no CUDA"):
            resolve_device("cuda")


def test_importing_the_pipeline_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, worker.scoring.pipeline, worker.scoring.registry, ct_triage_tools.evaluate, "
            "ct_triage_tools.commands; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- commands -------------------------------------------------------------------------------


def run_command(*argv: str) -> tuple[int, str, str]:
    return run_tool_command(*argv)


REQUIRED_KEYS = {"category", "involvement_percent", "involvement_percent_left", "involvement_percent_right",
                 "lung_volume_ml", "lesion_volume_ml", "lesion_count", "status", "reason", "model",
                 "device", "seconds"}


def test_phantom_and_score_commands(tmp_path):
    code, out, err = run_command("phantom", str(tmp_path / "ph"), "--involvement", "35", "--slices", "40",
                                 "--rows", "192", "--seed", "3", "--json")
    assert code == 0
    truth = json.loads(out)
    assert (tmp_path / "ph" / "ground_truth.json").exists() and truth["category"] == "CT-2"
    code, out, err = run_command("score", str(tmp_path / "ph"), "--json")
    assert code == 0
    data = json.loads(out)  # exactly one JSON object
    assert set(data) >= REQUIRED_KEYS
    assert data["status"] == "scored" and data["category"] in ("CT-1", "CT-2", "CT-3")
    assert "scoring" in err
    code, out, _ = run_command("score", str(tmp_path / "ph"))
    assert code == 0 and "% of the lungs involved" in out
    code, out, _ = run_command("score", str(tmp_path / "missing"), "--json")
    assert code == 1 and json.loads(out)["status"] == "failed"


@pytest.mark.slow
def test_real_size_series_end_to_end(tmp_path):
    """512 x 512 x 300 at 1 mm, written as DICOM, scored through ``ct-triage score``."""
    truth = write_phantom(tmp_path / "big", 35, seed=0)
    code, out, _ = run_command("score", str(tmp_path / "big"), "--json")
    data = json.loads(out)
    assert code == 0 and data["status"] == "scored"
    assert abs(data["involvement_percent"] - truth["involvement_percent"]) <= 5.0
    assert data["category"] == truth["category"]
    assert data["lung_volume_ml"] == pytest.approx(truth["lung_volume_ml"], rel=0.10)
    # no timing assertion: bench/score_bench.py holds the 10 s target (a shared CI box is not a clock)
