"""The real-anatomy insertion benchmark on one case (ct_triage_tools.insertion; ../shared/data).

One series (Siemens B70f, 30 slices of 8 mm, the sharp kernel) at 15 % and 45 %: the frozen
lung mask is the recorded one, the truth hits the target, the inserted HU are those the
model states, vessels are not darkened, and the classical scorer reads the truth within
``CLASSICAL_BOUND_POINTS`` (a regression guard, 7 points; the issue's target is 5). Skipped
with a message when the shared data is absent.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from ct_triage_tools import insertion
from tests.support.data import LUNG_PET_CT, MOSMED_MASKS, need

SERIES = "A0002-siemens-B70f-8mm"
LEVELS = (15.0, 45.0)
TRUTH_TOLERANCE_POINTS = 0.05  # growth takes exactly what is missing: only rounding is left
# |classical % - truth %| on this case. The target is 5 points; the benchmark table in
# docs/scoring.md reads +0.5 at 15 % and +4.6 at 45 % here since the dense-lung margin rule
# (was -2.6 and -11.0). This bound catches a regression with some room; tighten it as the scorer improves.
CLASSICAL_BOUND_POINTS = 7.0


@pytest.fixture(scope="module")
def case() -> insertion.Case:
    return insertion.prepare_case(need(LUNG_PET_CT / SERIES))


@pytest.fixture(scope="module")
def inserted(case) -> dict[float, insertion.Insertion]:
    shapes = insertion.shape_library(need(MOSMED_MASKS), case.volume.spacing_mm)
    return {level: insertion.insert_lesions(case, level, shapes, seed=0) for level in LEVELS}


def test_frozen_mask_matches_its_record(case):
    record = insertion.mask_record(case.lung, case.volume.spacing_mm)
    frozen = json.loads(insertion.FROZEN_MASKS_JSON.read_text())["series"][SERIES]
    assert record["sha256"] == frozen["sha256"] and record["voxels"] == frozen["voxels"]
    assert 2000 <= record["volume_ml"] <= 8000, record["volume_ml"]  # an adult's lungs (8 mm x 30 slices)


def test_a_changed_mask_is_refused(case):
    changed = case.lung.copy()
    changed[case.lung.shape[0] // 2, 0, 0] ^= True
    with pytest.raises(insertion.FrozenMaskError, match="differs from the frozen one"):
        insertion.check_frozen(SERIES, insertion.mask_record(changed, case.volume.spacing_mm))


@pytest.mark.parametrize("level", LEVELS)
def test_truth_hits_the_target_inside_the_frozen_lung(case, inserted, level):
    ins = inserted[level]
    assert not (ins.lesion & ~case.lung).any()
    truth = 100.0 * ins.lesion.sum() / case.lung.sum()
    assert truth == pytest.approx(ins.truth_percent)
    assert abs(truth - level) <= TRUTH_TOLERANCE_POINTS, truth
    assert ins.shapes_placed >= 5  # real MosMedData shapes, not only growth
    changed = ins.volume.hu != case.volume.hu
    assert not (changed & ~ins.lesion).any()  # nothing outside the lesions is touched


@pytest.mark.parametrize("level", LEVELS)
def test_inserted_hu_follow_the_stated_model(case, inserted, level):
    ins = inserted[level]
    before = case.volume.hu.astype(np.float32)
    after = ins.volume.hu.astype(np.float32)
    core = ins.lesion & (ins.alpha >= 1.0)
    ggo_core = core & ~ins.consolidation
    dense_core = core & ins.consolidation & (ins.target_hu >= insertion.CONSOLIDATION_TARGET_HU[0])
    low, high = insertion.GGO_TARGET_HU
    assert np.all((ins.target_hu[ggo_core] >= low) & (ins.target_hu[ggo_core] <= high))
    low_c, high_c = insertion.CONSOLIDATION_TARGET_HU
    assert dense_core.sum() > 0
    assert np.all((ins.target_hu[dense_core] >= low_c) & (ins.target_hu[dense_core] <= high_c))
    # with the scan's noise on top: parenchyma-only ground glass averages inside its band
    parenchyma = ggo_core & (before < insertion.NOISE_PARENCHYMA_MAX_HU)
    assert low <= float(after[parenchyma].mean()) <= high
    residual = after[parenchyma] - ins.target_hu[parenchyma]
    assert 0.6 * case.noise_sigma_hu <= float(residual.std()) <= 1.6 * case.noise_sigma_hu
    # consolidation cores average inside their band
    assert low_c - 10 <= float(after[dense_core & (before < insertion.VESSEL_HU)].mean()) <= high_c + 10


@pytest.mark.parametrize("level", LEVELS)
def test_vessels_are_not_lowered(case, inserted, level):
    ins = inserted[level]
    vessels = ins.lesion & (case.volume.hu > insertion.VESSEL_HU)
    assert vessels.sum() > 100  # real vessels run through the lesions
    assert np.all(ins.volume.hu[vessels] >= case.volume.hu[vessels])


def test_insertion_is_deterministic(case, inserted):
    shapes = insertion.shape_library(MOSMED_MASKS, case.volume.spacing_mm)
    again = insertion.insert_lesions(case, LEVELS[0], shapes, seed=0)
    assert np.array_equal(again.volume.hu, inserted[LEVELS[0]].volume.hu)


@pytest.mark.parametrize("level", LEVELS)
def test_classical_scorer_reads_the_truth_within_the_bound(case, inserted, level):
    from ct_triage.settings import Settings
    from worker.scoring.pipeline import score_volume
    from worker.scoring.registry import get_scorer

    settings = Settings.from_env({}, device="cpu", scorer="classical")
    ins = inserted[level]
    result = score_volume(ins.volume, settings, scorer=get_scorer(settings))
    assert result.status == "scored", result.reason
    assert result.involvement_percent is not None
    error = result.involvement_percent - ins.truth_percent
    assert abs(error) <= CLASSICAL_BOUND_POINTS, (level, ins.truth_percent, result.involvement_percent)
