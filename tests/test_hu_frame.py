"""Test-time HU normalisation of the lesion network's input (worker/scoring/hu_frame.py)."""

from __future__ import annotations

import numpy as np
import pytest

from worker.scoring import hu_frame
from worker.scoring.hu_frame import REF_HU, frame_from_peaks, tissue_peaks, volume_window

WINDOW = (-1059.0, 21.0)


def make(air: float, lung_hu: float, soft: float | None = 40.0, outside_air: bool = True):
    """Three copies of a 200 x 200 slice: outside air (or fat all round), a soft-tissue
    body, two lungs; noise 12 HU."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:200, :200]
    body = ((yy - 100) / 90) ** 2 + ((xx - 100) / 95) ** 2 <= 1
    left = ((yy - 100) / 50) ** 2 + ((xx - 60) / 30) ** 2 <= 1
    lung = left | (((yy - 100) / 50) ** 2 + ((xx - 140) / 30) ** 2 <= 1)
    img = np.full((200, 200), air if outside_air else -100.0, dtype=np.float32)
    img[body] = -100.0 if soft is None else soft
    img[lung] = lung_hu
    img = img + rng.normal(0, 12, img.shape).astype(np.float32)
    hu = np.repeat(img[None], 3, axis=0)
    return hu, np.repeat(lung[None], 3, axis=0)


def test_reference_peaks_give_the_fixed_window():
    hu, lung = make(REF_HU["air"], REF_HU["lung"], REF_HU["soft"])
    peaks = tissue_peaks(hu, lung)
    assert set(peaks) == {"air", "lung", "soft"}
    for k, v in peaks.items():
        assert abs(v - REF_HU[k]) <= 5.0, (k, v)
    for mode in ("air-soft", "air-lung"):
        frame = volume_window(hu, lung, WINDOW, mode)
        assert frame.normalised
        assert abs(frame.window[0] - WINDOW[0]) < 15 and abs(frame.window[1] - WINDOW[1]) < 15


def test_an_offset_scanner_is_corrected():
    """Every tissue 30 HU denser than the reference: the window moves up by ~30 HU."""
    hu, lung = make(REF_HU["air"] + 30, REF_HU["lung"] + 30, REF_HU["soft"] + 30)
    for mode in ("air-soft", "air-lung"):
        frame = volume_window(hu, lung, WINDOW, mode)
        assert frame.normalised and frame.scale == pytest.approx(1.0, abs=0.02)
        assert frame.window[0] == pytest.approx(WINDOW[0] + 30, abs=8)
        assert frame.shift_hu == pytest.approx(-30, abs=6)


def test_air_soft_ignores_a_diseased_lung_peak():
    """A lung peak moved up by disease (-700 HU) shifts air-lung to its bound; air-soft not at all."""
    hu, lung = make(REF_HU["air"], -700.0, REF_HU["soft"])
    soft = volume_window(hu, lung, WINDOW, "air-soft")
    assert abs(soft.shift_hu) < 6 and abs(soft.scale - 1) < 0.02
    assert volume_window(hu, lung, WINDOW, "air-lung").shift_hu < -30


def test_the_correction_is_bounded():
    frame = frame_from_peaks({"air": -1000.0, "lung": -700.0}, WINDOW, "air-lung")  # disease moves the lung peak
    assert frame.normalised
    assert hu_frame.SCALE_BOUNDS[0] <= frame.scale <= hu_frame.SCALE_BOUNDS[1]
    assert abs(frame.shift_hu) <= hu_frame.MAX_SHIFT_HU and "clamped" in frame.note


def test_no_outside_air_falls_back_to_the_fixed_window():
    hu, lung = make(REF_HU["air"], REF_HU["lung"], outside_air=False)
    for mode in ("air-soft", "air-lung"):
        frame = volume_window(hu, lung, WINDOW, mode)
        assert not frame.normalised and frame.window == WINDOW and "no air peak" in frame.note


def test_the_settings_reach_the_hybrid_scorer_and_are_checked():
    """CT_TRIAGE_LESION_HU_NORMALISATION and CT_TRIAGE_MASS_EXCLUSION: checked values, handed to
    the hybrid by the registry (one cached scorer per combination); the frame is noted."""
    from ct_triage.errors import ConfigError
    from ct_triage.settings import Settings
    from ct_triage_tools.phantom import make_phantom
    from worker.scoring.registry import get_scorer

    for name, bad in (("lesion_hu_normalisation", "lung"), ("mass_exclusion", "drop")):
        with pytest.raises(ConfigError, match=name.upper()):
            Settings.from_env({}, **{name: bad})
    s = Settings.from_env({}, device="cpu", lesion_hu_normalisation="air-soft", mass_exclusion="exclude")
    scorer = get_scorer(s)
    assert (scorer.hu_normalisation, scorer.mass_mode) == ("air-soft", "exclude")
    default = get_scorer(Settings.from_env({}, device="cpu"))
    assert default is not scorer and (default.hu_normalisation, default.mass_mode) == ("off", "report")
    ph = make_phantom(20, slices=30, rows=128, seed=1, slice_spacing_mm=10.0)
    seg = scorer.segment(ph.volume, "cpu")
    assert any(n.startswith("normalised window") for n in seg.notes), seg.notes
    assert seg.mass is not None and seg.mass_excluded
