"""Solid masses among the lesion components: measured, reported, optionally left out of the %.

What
    A lung tumour (or any solid, well-circumscribed mass) is not the ground glass or
    consolidation of COVID-19 pneumonia, but HU bands and a 2D network could call it lesion.
    :func:`find_masses` looks at every 26-connected lesion component on the working grid
    and calls it a *mass* when all of

    1. volume >= ``MIN_MASS_ML`` (2 ml, a sphere of ~16 mm: a nodule or mass large
       enough to matter for the %; smaller ones are left as they are);
    2. solid: at least ``SOLID_FRACTION`` (70 %) of its voxels are >= ``SOLID_HU``
       (-100 HU, 3x3 in-plane mean: soft tissue; ground glass is -700..-300 HU);
    3. compact: solidity (voxel volume over the volume of the convex hull of the voxels'
       corners) >= ``MIN_SOLIDITY`` (0.6; a sphere reads ~0.85 on the working grid, the
       irregular, branching, pleural-based shapes of pneumonia read lower);
    4. sharp margin, no ground-glass halo: of the ring ``RING_PX`` in-plane pixels
       outside the component (beyond the partial-volume rim; lung voxels only, at least
       ``MIN_RING`` of them), at most ``MAX_HALO_FRACTION`` (30 %) are denser than
       ``HALO_HU`` (-550 HU), and the median HU drops by at least ``MIN_EDGE_DROP_HU``
       (500 HU) from the component's solid voxels to that ring. Consolidation of
       COVID-19 is wrapped in ground glass (the classical scorer's dense-lung margin rule
       uses the same -550 HU / 30 % figures); a mass meets aerated lung within a few mm.

    Components that touch no lung ring at all (fewer than ``MIN_RING`` ring voxels: a mass
    walled in by mediastinum and chest wall) are judged on 1-3 alone.

What is done with them (``mode``, ``CT_TRIAGE_MASS_EXCLUSION``)
    ``off``: nothing is measured. ``report``: masses are measured and reported
    (``ScoreResult.mass_volume_ml`` / ``mass_count``) but stay in the lesion and the %.
    ``exclude``: they are reported and taken out of the lesion (and so out of the % and
    the SEG's lesion segments); the lung volume is unchanged.

Measured (2026-12-07, docs/scoring.md "Solid masses"): the hybrid counts no solid mass on
the four real non-COVID series nor on the 16 phantoms. The classical dense-lung step already
leaves sharp-edged soft tissue out of the lung mask (solid balls of 10..25 mm radius inserted
into a real CT: 4..40 % of them in the lung, none in the lesion). What the hybrid counts on
the lung-cancer patient A0001 (52.6 of its 61.8 ml) is ground-glass-density lung beside the
tumour (-717..-344 HU, 5th..95th percentile), which this rule, by design, does not touch. Hence
the default ``report``: ``exclude`` changed nothing measured, but real consolidation that is
round and halo-free would be excluded, and that is not measured yet.

Numbers are on the working grid (the scorer's pooled HU, ~1.4 mm pixels). Numpy and
scipy only; no torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

MODES = ("off", "report", "exclude")

MIN_MASS_ML = 2.0
SOLID_HU = -100.0
SOLID_FRACTION = 0.7
MIN_SOLIDITY = 0.6
RING_PX = (2, 3)  # the ring between these in-plane dilation radii (pixels)
MIN_RING = 8
HALO_HU = -550.0
MAX_HALO_FRACTION = 0.3
MIN_EDGE_DROP_HU = 500.0


@dataclass(frozen=True)
class Component:
    """One lesion component's mass measures (volumes in ml, HU on the working grid)."""

    volume_ml: float
    solid_fraction: float
    solidity: float | None  # computed only when the solid fraction passes
    ring_voxels: int
    halo_fraction: float | None
    edge_drop_hu: float | None
    centre_zyx: tuple[int, int, int]
    mass: bool

    def to_json(self) -> dict:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def _solidity(coords: np.ndarray, spacing: tuple[float, float, float], n_vox: int) -> float:
    """Voxel volume over the convex hull of the voxels' corners (1.0 when degenerate)."""
    corners = (coords[:, None, :] + np.array([[dz, dy, dx] for dz in (0, 1) for dy in (0, 1)
                                               for dx in (0, 1)])[None]).reshape(-1, 3)
    corners = np.unique(corners, axis=0) * np.asarray(spacing)
    try:
        hull = ConvexHull(corners)
    except (QhullError, ValueError):
        return 1.0
    vox = spacing[0] * spacing[1] * spacing[2]
    return float(min(1.0, n_vox * vox / max(hull.volume, 1e-9)))


def _ring(comp: np.ndarray) -> np.ndarray:
    """In-plane ring RING_PX[0]+1 .. RING_PX[1] pixels outside ``comp``."""
    inner = ndimage.binary_dilation(comp, structure=_disc(RING_PX[0]))
    outer = ndimage.binary_dilation(comp, structure=_disc(RING_PX[1]))
    return outer & ~inner


def _disc(r: int) -> np.ndarray:
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return ((yy * yy + xx * xx) <= r * r + r)[None]


def measure_component(comp: np.ndarray, S: np.ndarray, lung: np.ndarray, lesion: np.ndarray,
                      spacing: tuple[float, float, float], offset: tuple[int, ...]) -> Component:
    """The measures of one component (``comp``: a box of the volume around it)."""
    vox_ml = spacing[0] * spacing[1] * spacing[2] / 1000.0
    n = int(comp.sum())
    values = S[comp]
    solid = values >= SOLID_HU
    coords = np.argwhere(comp)
    solid_fraction = float(solid.mean()) if n else 0.0
    # the hull only where it can decide (it costs on the large confluent components of CT-3/4)
    solidity = None
    if solid_fraction >= SOLID_FRACTION:
        surface = comp & ~ndimage.binary_erosion(comp)
        solidity = _solidity(np.argwhere(surface), spacing, n) if n >= 4 else 1.0
    ring = _ring(comp) & lung & ~lesion
    ring_vals = S[ring]
    halo = float(np.mean(ring_vals > HALO_HU)) if ring_vals.size else None
    drop = (float(np.median(values[solid]) - np.median(ring_vals))
            if ring_vals.size and solid.any() else None)
    is_mass = (n * vox_ml >= MIN_MASS_ML and solid_fraction >= SOLID_FRACTION
               and solidity is not None and solidity >= MIN_SOLIDITY)
    if is_mass and ring_vals.size >= MIN_RING:
        is_mass = (halo is not None and halo <= MAX_HALO_FRACTION
                   and drop is not None and drop >= MIN_EDGE_DROP_HU)
    centre = tuple(int(c) for c in coords.mean(axis=0).round().astype(int) + np.asarray(offset))
    return Component(volume_ml=n * vox_ml, solid_fraction=solid_fraction, solidity=solidity,
                     ring_voxels=int(ring_vals.size), halo_fraction=halo, edge_drop_hu=drop,
                     centre_zyx=(centre[0], centre[1], centre[2]), mass=bool(is_mass))


def find_masses(lesion: np.ndarray, hu_w: np.ndarray, lung: np.ndarray, spacing: tuple[float, float, float],
                *, min_ml: float = MIN_MASS_ML) -> tuple[np.ndarray, list[Component]]:
    """(mask of the lesion components that are masses, the measures of every component of
    at least ``min_ml``); ``hu_w``: working-grid HU (the 3x3 in-plane mean is taken here).

    Cheap first: the components are labelled in the lesions' bounding box and their solid
    fraction counted there in one pass; hull and ring are measured only for the components
    whose size and solid fraction pass (the others keep ``solidity`` and the ring figures
    empty), so the confluent ground glass of a CT-3/4 study costs one labelling."""
    mass = np.zeros(lesion.shape, dtype=bool)
    out: list[Component] = []
    if not lesion.any():
        return mass, out
    pad = RING_PX[1] + 2
    outer = []
    for axis in range(3):
        idx = np.flatnonzero(lesion.any(axis=tuple(a for a in range(3) if a != axis)))
        m = 0 if axis == 0 else pad
        outer.append(slice(max(0, int(idx[0]) - m), min(lesion.shape[axis], int(idx[-1]) + m + 1)))
    ob = tuple(outer)
    les = lesion[ob]
    lab, n = ndimage.label(les, structure=np.ones((3, 3, 3), dtype=bool))
    vox_ml = spacing[0] * spacing[1] * spacing[2] / 1000.0
    S_all = ndimage.uniform_filter(hu_w[ob].astype(np.float32), size=(1, 3, 3), mode="nearest")
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    solid_n = np.bincount(lab[les & (S_all >= SOLID_HU)], minlength=n + 1)
    for k, sl in enumerate(ndimage.find_objects(lab), start=1):
        if sl is None or sizes[k] * vox_ml < min_ml:
            continue
        frac = float(solid_n[k] / sizes[k])
        centre = ndimage.center_of_mass(lab[sl] == k)
        centre_zyx = tuple(int(round(c)) + s.start + o.start for c, s, o in zip(centre, sl, ob))
        if frac < SOLID_FRACTION:
            out.append(Component(volume_ml=float(sizes[k] * vox_ml), solid_fraction=frac, solidity=None,
                                 ring_voxels=0, halo_fraction=None, edge_drop_hu=None,
                                 centre_zyx=(centre_zyx[0], centre_zyx[1], centre_zyx[2]), mass=False))
            continue
        box = tuple(slice(s.start if i == 0 else max(0, s.start - pad),
                          s.stop if i == 0 else min(les.shape[i], s.stop + pad))
                    for i, s in enumerate(sl))
        comp = lab[box] == k
        c = measure_component(comp, S_all[box], lung[ob][box], les[box], spacing,
                              tuple(b.start + o.start for b, o in zip(box, ob)))
        out.append(c)
        if c.mass:
            mass[ob][box] |= comp
    return mass, out
