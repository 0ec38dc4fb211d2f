"""Solid masses among lesion components (worker/scoring/masses.py) on synthetic volumes."""

from __future__ import annotations

import numpy as np

from worker.scoring.masses import find_masses

SPACING = (5.0, 1.4, 1.4)


def _lung(shape=(20, 120, 120)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    zz, yy, xx = np.mgrid[:shape[0], :shape[1], :shape[2]]
    lung = np.ones(shape, dtype=bool)
    hu = np.full(shape, -870.0, dtype=np.float32)
    # a 20 mm radius ball (~33 ml)
    r = np.sqrt(((zz - 10) * SPACING[0]) ** 2 + ((yy - 60) * SPACING[1]) ** 2 + ((xx - 60) * SPACING[2]) ** 2)
    return hu, lung, r


def test_a_solid_sharp_ball_is_a_mass():
    hu, lung, r = _lung()
    ball = r <= 20.0
    hu[ball] = 40.0
    mass, comps = find_masses(ball, hu, lung, SPACING)
    assert len(comps) == 1 and comps[0].mass, comps
    assert comps[0].solid_fraction > 0.8 and comps[0].solidity > 0.6 and comps[0].halo_fraction < 0.1
    assert mass.sum() == ball.sum()


def test_consolidation_wrapped_in_ground_glass_is_not_a_mass():
    """The COVID-19 pattern: a dense core in a ground-glass mantle (one lesion component)."""
    hu, lung, r = _lung()
    lesion = r <= 28.0
    hu[lesion] = -550.0
    hu[r <= 18.0] = 20.0
    mass, comps = find_masses(lesion, hu, lung, SPACING)
    assert comps and not any(c.mass for c in comps) and not mass.any()


def test_a_dense_core_with_a_halo_outside_the_lesion_is_not_a_mass():
    """Ground glass around a dense ball that the lesion mask did not take in: the halo rule."""
    hu, lung, r = _lung()
    ball = r <= 20.0
    hu[(r > 20.0) & (r <= 30.0)] = -450.0
    hu[ball] = 30.0
    _, comps = find_masses(ball, hu, lung, SPACING)
    assert comps and not comps[0].mass and comps[0].halo_fraction > 0.5


def test_small_and_ground_glass_components_are_left_alone():
    hu, lung, r = _lung()
    small = r <= 6.0  # ~0.9 ml
    hu[small] = 40.0
    _, comps = find_masses(small, hu, lung, SPACING)
    assert comps == []
    ggo = r <= 20.0
    hu[ggo] = -600.0
    _, comps = find_masses(ggo, hu, lung, SPACING)
    assert comps and not comps[0].mass and comps[0].solid_fraction == 0.0 and comps[0].solidity is None
