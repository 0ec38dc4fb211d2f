"""The comparison on the outputs: SC summary band with the trend plot, TID 1500 change groups in the SR."""

from __future__ import annotations

import dataclasses
import datetime as dt

import numpy as np
import pytest
from PIL import Image, ImageDraw

from tests.support.dciodvfy import dciodvfy_errors, unexpected_warnings
from worker.followup.comparison import Snapshot, apply_assessment, assess
from worker.outputs import render, trend
from worker.outputs.sc import build_secondary_capture_series
from worker.outputs.sr import build_measurement_report

CREATED = dt.datetime(2026, 11, 28, 22, 0, 0)
CHEST_CT = dict(n_slices=6, size=128, seed=1)
T0 = dt.datetime(2026, 11, 27, 9, 30)
PRIOR_STUDY = "2.25.1234567890123456789"
PRIOR_SERIES = "2.25.1234567890123456790"
PRIOR_SOP = "2.25.1234567890123456791"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def _compared(ct, prior_percent: float, hours: float = 36.0, **prior_kw):
    # the synthetic series' own share is small; the numbers of a 32 % study keep the rule in play
    score = ct.score_result(involvement_percent=32.0, involvement_percent_left=28.0, involvement_percent_right=36.0,
                            category="CT-2")
    now = score.involvement_percent
    current = Snapshot(ct.study_instance_uid, now, T0 + dt.timedelta(hours=hours), "AcquisitionDate/AcquisitionTime",
                       score.involvement_percent_left, score.involvement_percent_right, score.lesion_volume_ml,
                       score.category, kernel="FC51", manufacturer="TOSHIBA", model_name="Aquilion")
    prior = Snapshot(PRIOR_STUDY, prior_percent, T0, "AcquisitionDate/AcquisitionTime", prior_percent * 0.8,
                     prior_percent * 1.2, (score.lesion_volume_ml or 0) / 2, None,
                     kernel=prior_kw.get("kernel", "FC51"),
                     manufacturer="TOSHIBA", model_name="Aquilion", series_instance_uid=PRIOR_SERIES,
                     sop_instance_uid=PRIOR_SOP, sop_class_uid=CT_IMAGE)
    return apply_assessment(score, assess(current, [prior]))


@pytest.fixture(scope="module")
def progressed(ct):
    return _compared(ct, 20.0)


def _find(haystack: np.ndarray, needle: np.ndarray) -> list[tuple[int, int]]:
    """(row, col) of every exact occurrence of ``needle`` (RGB) in ``haystack``."""
    h, w = needle.shape[:2]
    hits = []
    for y in range(haystack.shape[0] - h + 1):
        row = np.lib.stride_tricks.sliding_window_view(haystack[y], (w, 3))[:, 0]  # (W-w+1, w, 3)
        for x in np.flatnonzero((row == needle[0]).all(axis=(1, 2))):
            if (haystack[y:y + h, x:x + w] == needle).all():
                hits.append((y, int(x)))
    return hits


def _text_stamp(text: str, font, color) -> np.ndarray:
    """``text`` as drawn on the panel background, cropped to its ink."""
    image = Image.new("RGB", (400, 60), render.PANEL_BACKGROUND)
    ImageDraw.Draw(image).text((10, 10), text, font=font, fill=color)
    pixels = np.asarray(image)
    ink = (pixels != np.array(render.PANEL_BACKGROUND, dtype=np.uint8)).any(axis=2)
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    return pixels[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def test_summary_has_a_valid_trend_band_showing_both_dates(tmp_path, ct, progressed):
    same_without = dataclasses.replace(progressed, comparison=None)
    plain = build_secondary_capture_series(ct.datasets, same_without, 2, created_at=CREATED)[0]
    summary = build_secondary_capture_series(ct.datasets, progressed, 2, created_at=CREATED)[0]
    path = tmp_path / "summary.dcm"
    summary.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == [] and unexpected_warnings(path) == []
    pixels, before = summary.pixel_array, plain.pixel_array
    assert pixels.shape[1] == before.shape[1] and pixels.shape[0] == before.shape[0] + trend.BAND_HEIGHT
    assert (pixels[:before.shape[0]] == before).all()  # the summary above is untouched
    band = pixels[before.shape[0]:]
    assert not ((band[..., 0] == 255) & (band[..., 1] == 0) & (band[..., 2] == 0)).any()  # red is for boxes
    plot_left = band.shape[1] - min(trend.PLOT_WIDTH, band.shape[1] // 2)
    axis_row = trend.BAND_HEIGHT - trend.PLOT_MARGIN["bottom"]
    # Both acquisition dates are printed under the plot's time axis, oldest on the left.
    prior_hits = _find(band, _text_stamp("2026-11-27", trend.label_font(), trend.AXIS_COLOR))
    current_hits = _find(band, _text_stamp("2026-11-28", trend.label_font(), trend.TOTAL_COLOR))
    assert len(prior_hits) == 1 and len(current_hits) == 1, (prior_hits, current_hits)
    (py, px), (cy, cx) = prior_hits[0], current_hits[0]
    assert axis_row < py < trend.BAND_HEIGHT and axis_row < cy < trend.BAND_HEIGHT
    assert plot_left <= px < cx
    # The three lines run between the two dates; the current point is above the prior (progression).
    plot = band[trend.PLOT_MARGIN["top"]:axis_row, px:cx + 60]
    for color in (trend.TOTAL_COLOR, trend.RIGHT_COLOR, trend.LEFT_COLOR):
        assert (plot == np.array(color, dtype=np.uint8)).all(axis=2).sum() > 20, color
    white = np.argwhere((band[trend.PLOT_MARGIN["top"]:axis_row] == np.array(trend.TOTAL_COLOR, np.uint8)).all(axis=2))
    left_end = white[white[:, 1] < plot_left + 120]
    right_end = white[white[:, 1] > band.shape[1] - 120]
    assert right_end[:, 0].mean() < left_end[:, 0].mean()
    # "Change since <date>" heads the text block, in the progression colour.
    title = trend.title_text(trend.Assessment.from_json(progressed.comparison))
    assert title == "Change since 2026-11-27 09:30 (36 h)"
    assert len(_find(band[:40, :plot_left], _text_stamp(title, trend.title_font(), trend.PROGRESSION_COLOR))) == 1


def test_summary_without_comparison_is_unchanged(ct):
    score = ct.score_result()
    assert trend.with_comparison(render.render_summary(ct.datasets, score), None).shape == \
        render.render_summary(ct.datasets, score).shape


def test_differences_are_stated_on_the_summary(ct):
    score = _compared(ct, 30.0, kernel="FC07")
    lines = [text for text, _ in trend.change_lines(trend.Assessment.from_json(score.comparison))]
    assert "Differs: kernel FC07 -> FC51" in lines


def _items(content, out=None):
    out = [] if out is None else out
    for item in content:
        out.append(item)
        if "ContentSequence" in item:
            _items(item.ContentSequence, out)
    return out


def test_sr_has_change_measurements_referencing_the_prior(tmp_path, ct, progressed):
    sr = build_measurement_report(ct.datasets, progressed, 2, created_at=CREATED)
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    other = sr.PertinentOtherEvidenceSequence
    assert [o.StudyInstanceUID for o in other] == [PRIOR_STUDY]
    assert other[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == PRIOR_SOP
    assert [e.StudyInstanceUID for e in sr.CurrentRequestedProcedureEvidenceSequence] == [ct.study_instance_uid]
    items = _items(sr.ContentSequence)
    nums = {}
    for item in items:
        if item.ValueType == "NUM":
            code = item.ConceptNameCodeSequence[0].CodeValue
            value = float(item.MeasuredValueSequence[0].NumericValue)
            nums.setdefault(code, []).append(value)
            if code.startswith("CTT01"):
                refs = [i for i in item.ContentSequence if i.ValueType == "IMAGE"]
                assert refs and refs[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == PRIOR_SOP
    h = trend.Assessment.from_json(progressed.comparison).headline
    assert nums["CTT010"][0] == pytest.approx(h.delta_points, abs=1e-3) and len(nums["CTT010"]) == 3
    assert nums["CTT011"][0] == pytest.approx(60.0, abs=0.1)
    assert nums["CTT013"] == [pytest.approx(36.0)]
    trend_codes = [i.ConceptCodeSequence[0].CodeValue for i in items if i.ValueType == "CODE"
                   and i.ConceptNameCodeSequence[0].CodeValue == "CTT015"]
    categories = [i.ConceptCodeSequence[0].CodeValue for i in items if i.ValueType == "CODE"
                  and i.ConceptNameCodeSequence[0].CodeValue == "CTT002"]
    assert trend_codes == ["PROGRESSION"] and categories == ["CT-3"]
    identifiers = [i.TextValue for i in items if i.ValueType == "TEXT" and i.TextValue.startswith("Change since")]
    assert identifiers == ["Change since prior 2026-11-27"]


def test_sr_without_comparison_has_no_change_groups(ct):
    sr = build_measurement_report(ct.datasets, ct.score_result(), 1, created_at=CREATED)
    assert "PertinentOtherEvidenceSequence" not in sr
    assert not any(i.ValueType == "NUM" and i.ConceptNameCodeSequence[0].CodeValue.startswith("CTT01")
                   for i in _items(sr.ContentSequence))
