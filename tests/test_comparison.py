"""worker.followup.comparison: deltas, the progression rule, trends, acquisition time (pure, fast)."""

from __future__ import annotations

import datetime as dt

import pytest
from pydicom.dataset import Dataset

from worker.followup.comparison import (
    Assessment,
    ProgressionRule,
    Snapshot,
    acquisition_time,
    apply_assessment,
    assess,
    compare,
    trend_points,
)
from worker.scoring.result import ScoreResult

T0 = dt.datetime(2026, 11, 27, 8, 0)


def snap(uid: str, percent: float, hours: float | None, **kw) -> Snapshot:
    return Snapshot(uid, percent, None if hours is None else T0 + dt.timedelta(hours=hours),
                    involvement_percent_left=kw.pop("left", percent),
                    involvement_percent_right=kw.pop("right", percent), **kw)


def test_20_to_32_in_36_hours_is_progression():
    change = compare(snap("2", 32, 36, lesion_volume_ml=900), snap("1", 20, 0, lesion_volume_ml=560))
    assert change.progression and change.trend == "progression"
    assert change.delta_points == pytest.approx(12) and change.relative_percent == pytest.approx(60)
    assert change.hours == pytest.approx(36) and change.points_per_day == pytest.approx(8)
    assert change.delta_lesion_ml == pytest.approx(340)


@pytest.mark.parametrize("prior, current, hours, trend", [
    (20, 22, 36, "stable"),
    (45, 25, 36, "improvement"),
    (20, 28, 36, "worsening"),  # +40 % relative: below the rule
    (20, 32, 72, "worsening"),  # +60 % but outside the 48 h window
    (2, 4, 24, "stable"),  # +100 % relative but 2 points: the points guard
])
def test_trends(prior, current, hours, trend):
    change = compare(snap("2", current, hours), snap("1", prior, 0))
    assert change.trend == trend and not change.progression


def test_rule_thresholds_are_configurable():
    rule = ProgressionRule(relative_percent=30, min_hours=24, max_hours=72, min_points=2)
    assert compare(snap("2", 28, 60), snap("1", 20, 0), rule).progression
    assert not compare(snap("2", 28, 12), snap("1", 20, 0), rule).progression  # before the window opens
    with pytest.raises(ValueError, match="min_hours"):
        ProgressionRule(min_hours=50, max_hours=48)
    with pytest.raises(ValueError, match="relative_percent"):
        ProgressionRule(relative_percent=0)


def test_zero_prior_share_and_unknown_time():
    change = compare(snap("2", 12, 30), snap("1", 0, 0))
    assert change.relative_percent is None and change.progression  # any rise from nothing, by points
    unknown = compare(snap("2", 40, None), snap("1", 20, 0))
    assert unknown.hours is None and not unknown.progression and unknown.trend == "worsening"


def test_differences_are_stated():
    a = snap("1", 20, 0, manufacturer="TOSHIBA", model_name="Aquilion", kernel="FC51", slice_thickness_mm=1.0)
    b = snap("2", 22, 30, manufacturer="SIEMENS", model_name="Definition", kernel="B70f", slice_thickness_mm=5.0)
    assert compare(b, a).differences == ["scanner TOSHIBA Aquilion -> SIEMENS Definition", "kernel FC51 -> B70f",
                                         "slice thickness 1 -> 5 mm"]
    assert compare(snap("2", 22, 30, kernel="fc51"), snap("1", 20, 0, kernel="FC51")).differences == []


def test_assess_raises_to_ct3_and_round_trips():
    current = snap("3", 34, 36, category="CT-2")
    priors = [snap("1", 10, -200), snap("2", 21, 0)]
    a = assess(current, priors)
    assert a.progression and a.category == "CT-3" and a.category_from_percent == "CT-2"
    assert [c.prior.study_instance_uid for c in a.changes] == ["2", "1"]  # newest first
    assert a.reason().startswith("progression: 21% -> 34% (+62%) in 36 h since 2026-11-27")
    again = Assessment.from_json(a.to_json())
    assert again.to_json() == a.to_json()
    # a CT-4 stays CT-4; a later "prior" is ignored; no priors -> None
    assert assess(snap("3", 80, 36, category="CT-4"), [snap("2", 40, 0)]).category == "CT-4"
    assert assess(snap("3", 30, 0, category="CT-2"), [snap("2", 10, 36)]) is None


def test_apply_assessment_sets_and_resets_the_score():
    score = ScoreResult(status="scored", category="CT-2", involvement_percent=34.0)
    a = assess(snap("3", 34, 36, category="CT-2"), [snap("2", 21, 0)])
    apply_assessment(score, a)
    assert (score.category, score.priority) == ("CT-3", "HIGH") and score.reason.startswith("progression")
    assert ScoreResult.from_json(score.to_json()).comparison == score.comparison
    apply_assessment(score, None)
    assert (score.category, score.priority, score.reason, score.comparison) == ("CT-2", "MEDIUM", None, None)
    with pytest.raises(TypeError, match="'score'"):
        apply_assessment({"status": "scored"}, a)


def test_trend_points_oldest_first_current_marked():
    a = assess(snap("3", 34, 36, category="CT-2", left=30, right=38), [snap("1", 10, -200), snap("2", 21, 0)])
    points = trend_points(a.to_json())
    assert [p["study_instance_uid"] for p in points] == ["1", "2", "3"]
    assert [p["current"] for p in points] == [False, False, True] and points[-1]["right"] == 38


def test_acquisition_time_order_of_trust():
    ds = Dataset()
    ds.StudyDate, ds.StudyTime = "20261127", "080000"
    assert acquisition_time(ds) == (dt.datetime(2026, 11, 27, 8), "StudyDate/StudyTime")
    ds.SeriesDate, ds.SeriesTime = "20261127", "081500.123"
    assert acquisition_time(ds) == (dt.datetime(2026, 11, 27, 8, 15), "SeriesDate/SeriesTime")
    ds.AcquisitionDate, ds.AcquisitionTime = "20261127", "0816"
    assert acquisition_time(ds) == (dt.datetime(2026, 11, 27, 8, 16), "AcquisitionDate/AcquisitionTime")
    ds.AcquisitionDateTime = "20261127081710.5+0300"
    assert acquisition_time(ds) == (dt.datetime(2026, 11, 27, 8, 17, 10), "AcquisitionDateTime")
    assert acquisition_time(Dataset()) == (None, "unknown")
