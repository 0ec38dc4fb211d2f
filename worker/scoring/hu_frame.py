"""Test-time HU normalisation for the lesion network: the volume's own tissue peaks.

What
    The lesion network was trained on 8-bit slices in one HU frame (MedSeg's window,
    -1059..+21 HU, see :mod:`worker.scoring.lesion_net`). That window was fitted so that
    real CT tissue peaks land on the training images' gray peaks:

    ===============  =========================  ==============================
    tissue           reference HU (``REF_HU``)  gray in the training frame
    ===============  =========================  ==============================
    outside air      -997.5                     14.5
    aerated lung     -872.5                     44
    soft tissue      +37.5                      253 (saturated)
    ===============  =========================  ==============================

    :func:`volume_window` measures the same peaks on the volume to be scored (5 HU bins,
    smoothed over 3 bins, on every ``SAMPLE_STEP``-th voxel in-plane):

    * air: the mode of -1020..-900 HU outside the lungs (every air in the image: outside
      air, trachea, bowel gas; the loader sets padding and everything below -1024 HU to
      -1024, which the band leaves out);
    * lung: the mode of -990..-600 HU inside the lung mask;
    * soft tissue (when present): the mode of 0..100 HU outside the lungs.

    A peak counts when its band holds at least ``MIN_PEAK_VOXELS`` voxels and the mode is
    not on the band's edge (a slope, not a peak). The linear map ``HU' = a * HU + b`` that
    sends the measured peaks onto ``REF_HU`` (least squares over the mode's peaks,
    ``FIT_PEAKS``) is folded into the network's window: the window becomes
    ``((low - b) / a, (high - b) / a)``. Only the network's input moves; every HU rule of
    the scorers keeps reading the true HU.

Modes (``CT_TRIAGE_LESION_HU_NORMALISATION``)
    ``air-soft``: air and soft tissue, the two peaks disease does not move (a scanner's
    calibration: air -1000, water 0). ``air-lung``: air and aerated lung (soft tissue
    joins when found), what the training window was fitted on; but a COVID-19 lung's
    own peak moves up with the disease (-620..-752 HU on half the NY-SBU slices against
    -872.5 for normal lung), and mapping it back to normal lung works against the very
    signal the network looks for, so it hits the shift bound there. ``off``: the
    weights' fixed window.

Bounds (why: a real scanner is calibrated to air -1000 and water 0 HU; a large
correction means the peaks were misread, e.g. diffuse disease moving the lung peak)
    * scale ``a`` within ``SCALE_BOUNDS`` (0.85..1.15),
    * shift at the reference lung HU (``a * r + b - r``, r = -872.5) within
      +-``MAX_SHIFT_HU`` (60 HU); peaks closer than 50 HU to each other fit nothing.
    A correction outside is clamped to the bound, and the note says so.

Fallback
    When a peak the mode needs is missing (a single slice cropped to the lungs: no outside
    air; a tiny lung; no soft tissue in view), the fixed window is used and the reason is returned (and logged by the
    caller).

Measured effect: ``worker/scoring/weights/MODEL_CARD.md`` ("Test-time HU normalisation").
Numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

REF_HU = {"air": -997.5, "lung": -872.5, "soft": 37.5}
BANDS = {"air": (-1020.0, -900.0), "lung": (-990.0, -600.0), "soft": (0.0, 100.0)}
BIN_HU = 5.0
MIN_PEAK_VOXELS = 500
SAMPLE_STEP = 2
SCALE_BOUNDS = (0.85, 1.15)
MAX_SHIFT_HU = 60.0
# which peaks fit the map, per mode (OPTIONAL_PEAKS join the least squares when found)
FIT_PEAKS = {"air-soft": ("air", "soft"), "air-lung": ("air", "lung")}
OPTIONAL_PEAKS = {"air-lung": ("soft",)}
MODES = ("off", *FIT_PEAKS)


@dataclass(frozen=True)
class Frame:
    """The window the network reads this volume with, and how it was found."""

    window: tuple[float, float]
    normalised: bool
    peaks: dict[str, float]
    scale: float = 1.0
    shift_hu: float = 0.0
    note: str = ""


def _mode(values: np.ndarray, band: tuple[float, float]) -> float | None:
    lo, hi = band
    v = values[(values > lo) & (values < hi)]
    if v.size < MIN_PEAK_VOXELS:
        return None
    edges = np.arange(lo, hi + BIN_HU, BIN_HU)
    h, _ = np.histogram(v, bins=edges)
    h = np.convolve(h, np.ones(3) / 3.0, mode="same")
    i = int(np.argmax(h))
    if i in (0, len(h) - 1):
        return None
    return float(edges[i] + BIN_HU / 2)


def tissue_peaks(hu: np.ndarray, lung: np.ndarray) -> dict[str, float]:
    """The air, lung and soft-tissue peaks (HU) of ``hu`` (z, r, c) with ``lung`` (same
    shape, bool); a tissue without a peak is left out."""
    s = (slice(None), slice(None, None, SAMPLE_STEP), slice(None, None, SAMPLE_STEP))
    h = np.asarray(hu[s], dtype=np.float32)
    m = np.asarray(lung[s], dtype=bool)
    peaks: dict[str, float] = {}
    inside, outside = h[m], h[~m]
    for name, vals in (("air", outside), ("lung", inside), ("soft", outside)):
        p = _mode(vals, BANDS[name])
        if p is not None:
            peaks[name] = p
    return peaks


def frame_from_peaks(peaks: dict[str, float], window: tuple[float, float], mode: str = "air-soft") -> Frame:
    """The bounded correction of ``window`` for the measured ``peaks`` (see the module docstring)."""
    if mode not in FIT_PEAKS:
        raise ValueError(f"HU normalisation mode must be one of {tuple(FIT_PEAKS)}, got {mode!r}")
    need = FIT_PEAKS[mode]
    missing = [k for k in need if k not in peaks]
    if missing:
        return Frame(window, False, peaks, note=f"fixed window: no {' or '.join(missing)} peak")
    keys = list(need) + [k for k in OPTIONAL_PEAKS.get(mode, ()) if k in peaks]
    x = np.array([peaks[k] for k in keys])
    y = np.array([REF_HU[k] for k in keys])
    if x.max() - x.min() < 50.0:
        return Frame(window, False, peaks, note="fixed window: peaks too close together")
    a, b = (float(v) for v in np.polyfit(x, y, 1))
    notes = []
    a_c = float(np.clip(a, *SCALE_BOUNDS))
    if a_c != a:
        notes.append(f"scale {a:.3f} clamped")
    ref = REF_HU["lung"]
    want = a * ref + b - ref
    shift = float(np.clip(want, -MAX_SHIFT_HU, MAX_SHIFT_HU))
    if shift != want:
        notes.append(f"shift {want:+.0f} HU clamped")
    b_c = ref + shift - a_c * ref
    low, high = window
    new = ((low - b_c) / a_c, (high - b_c) / a_c)
    note = (f"normalised window {new[0]:.0f}..{new[1]:.0f} HU ({mode}: scale {a_c:.3f}, shift {shift:+.0f} HU "
            f"at {ref:g} HU; peaks " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items()) + ")")
    if notes:
        note += "; " + ", ".join(notes)
    return Frame((float(new[0]), float(new[1])), True, peaks, a_c, shift, note)


def volume_window(hu: np.ndarray, lung: np.ndarray, window: tuple[float, float], mode: str = "air-soft") -> Frame:
    """The network window for this volume: ``window`` corrected by its own tissue peaks."""
    return frame_from_peaks(tissue_peaks(hu, lung), window, mode)
