"""Insert real COVID-19 lesion shapes into real chest CTs: the real-anatomy benchmark (issue #19, item 4).

What: the four Lung-PET-CT-Dx series in ``shared/data/lung-pet-ct-dx`` (two patients, two
kernels each; lung cancer, no COVID-19) get lesions whose shapes are the connected components
of the 50 expert MosMedData masks (``shared/data/mosmed-masks``), with a fixed HU and texture
model, at a requested share of a frozen lung mask. ``bench/insertion_bench.py`` scores the
result with the daemon's own entry (``worker.scoring.pipeline.score_volume``) and compares.

Why: the synthetic phantom (``ct_triage_tools.phantom``) has drawn vessels, airways and
noise. This puts lesions into real vessels, airways, fissures, reconstruction kernels and
noise, where the truth is still known exactly (the inserted voxels).

Everything below was fixed (written here and committed) **before any scorer was run on an
inserted scan**, and is not to be changed after seeing scorer results. A change makes a new
benchmark version (``MODEL_VERSION``) whose figures are not comparable with the old ones.

1. Frozen lung mask (the truth's denominator; never from a scorer under test)
   Computed on the unmodified scan, loaded by ``worker.scoring.load.load_series`` (HU only:
   the loader, no scorer code), by this independent procedure:

   a. air = HU < ``MASK_AIR_HU`` (-400 HU: halfway between aerated lung, about -850, and
      soft tissue; the usual lung-segmentation threshold).
   b. Per slice, 2D air components (8-connected) touching the image border are outside air
      (and the padding outside the scan circle): removed.
   c. Per slice, the trachea and main bronchi outside the lungs are removed: components
      smaller than ``MASK_AIRWAY_MAX_AREA_MM2`` (6 cm2; a trachea is about 2-4 cm2), whose
      centroid is within ``MASK_AIRWAY_MAX_OFFSET_MM`` (30 mm) of the body's column
      centroid and whose mean is below ``MASK_AIRWAY_MEAN_HU`` (-950 HU: pure air; lung
      parenchyma is about -850). Apical lung is lateral and not that dark, so it stays.
   d. 3D components (6-connected) are kept when they hold at least
      ``MASK_COMPONENT_MIN_FRACTION`` (10 %) of the largest one's voxels and their mean is
      above ``MASK_COMPONENT_MIN_MEAN_HU`` (-950 HU: stomach and bowel gas are pure air).
   e. Per slice and separately on each side of the body's midline (its column centroid,
      voxels >= ``MASK_BODY_HU`` -500 HU), a closing with a disk of radius
      ``MASK_CLOSING_MM`` (3 mm), then holes filled: vessels, bronchial walls, and nodules
      or tumours enclosed by aerated lung come back in (a mass against the chest wall is no
      hole and stays out, as on A0001). Per side, because where the lungs meet in front and
      behind the mediastinum is enclosed: it would be a "hole".

   The mask is frozen: ``insertion_masks.json`` (beside this module) records per series its
   shape, voxel count, volume in ml and the SHA-256 of the packed mask
   (``numpy.packbits`` of the C-ordered boolean array). :func:`prepare_case` refuses
   (:class:`FrozenMaskError`) when the recomputed mask differs. It was checked by eye on a
   montage of six slices per series with the mask outline (``--montage``); what was seen is
   written in docs/scoring.md.

2. Lesion shapes
   The 26-connected components of the 50 MosMedData masks (all CT-1; 8 mm slices; their
   own pixel spacing from the NIfTI header, via ``worker.scoring.load.nifti_array_zrc``,
   which also orients them as the volumes are: z up, rows to posterior, columns to the
   patient's left). Each component is resampled to the series' voxel spacing (linear
   interpolation of the mask, threshold 0.5); components that vanish are dropped. Specks
   under ``MIN_SHAPE_ML`` (0.1 ml, about 6 mm across) are dropped too: 2240 of the 2987
   components but only 40 ml of their 4319 ml (annotation strokes of a few voxels, 644 of
   them under 3 voxels); they would make most placements, and a 5-8 mm scan cannot show
   them. 747 shapes from 0.1 to 225 ml remain. A shape may be mirrored left-right when
   placed (probability 1/2).

3. Placement: where COVID-19 lesions sit (peripheral, posterior, lower lobes first)
   Weight of a lung voxel W = P x Q x Z:
   - P = exp(-d / ``PERIPHERAL_DECAY_MM``), d the 3D distance (mm) to the nearest non-lung
     voxel, decay 15 mm;
   - Q = ``POSTERIOR_MIN_WEIGHT`` + (1 - that) x r, r the row's position between the
     lung's most anterior (0) and most posterior (1) row: 0.25 at the front, 1 at the back;
   - Z = ``LOWER_MIN_WEIGHT`` + (1 - that) x (1 - s), s the slice's position between the
     lung's lowest (0) and highest (1) slice: 1 at the base, 0.25 at the apex.
   Shapes are taken in a seeded random order (at most ``PLACEMENT_PASSES`` passes over the
   library). A shape's centre is drawn among lung voxels with probability proportional to
   W ** ``PLACEMENT_SHARPNESS`` (2). It is placed when at least ``SHAPE_MIN_INSIDE`` (70 %)
   of it falls inside the lung, at most ``SHAPE_MAX_OVERLAP`` (30 %) of it on lesion placed
   already, and what it adds does not exceed what is still needed (``PLACEMENT_TRIES``, 20
   centres tried per shape). Only the part inside the lung is lesion.

4. Confluent growth (above ``CONFLUENT_FROM_PERCENT``, 30 %; also the final top-up)
   Shapes are placed up to min(target, 30 %) of the lung. The rest is grown from them:
   repeated one-voxel dilation constrained to the lung (in-plane 4-neighbours; along z
   only every round(dz / pixel) steps, so growth is about isotropic in mm), where each
   step adds the best ``GROW_SHELL_SHARE`` (50 %) of the new shell ranked by
   W x (1 + ``GROW_NOISE_WEIGHT`` x F), F a smooth seeded random field in [-1, 1]
   (Gaussian, sigma ``GROW_NOISE_SIGMA_MM`` 6 mm) so fronts are irregular; the last step
   takes exactly what is missing. Below 30 % the same growth tops up the remainder the
   shapes left (less than the smallest shape that still fits), so truth hits the target.

5. HU and texture (fixed from published values and the real slices here)
   - Ground glass: hazy increased attenuation with bronchial and vascular margins preserved
     (Fleischner Society glossary, Hansell D.M. et al., Radiology 2008;246:697-722).
     Quantitatively it is the "poorly aerated" part of the lung: between normally aerated
     (-900..-500 HU) and non-aerated (-100..+100 HU) tissue in the CT bands of Gattinoni L.
     et al. (Am J Respir Crit Care Med 2001;164:1701-1711); COVID-19 CT quantification
     commonly counts -700..-300 HU as ground glass. The target here is the faint, typical
     part of that band: ``GGO_TARGET_HU`` -700..-450 HU.
   - Consolidation: attenuation that hides vessels (Fleischner), the non-aerated band:
     ``CONSOLIDATION_TARGET_HU`` -100..+50 HU.
   - The target T varies smoothly within its band: a seeded Gaussian random field (sigma
     ``TARGET_FIELD_SIGMA_MM`` 4 mm) mapped to a uniform value in [0, 1] across the band.
   - Consolidation share: the deepest (3D distance to the lesion's edge) fraction of the
     lesion voxels consolidates; the fraction is ``CONSOLIDATION_SHARE`` interpolated at
     the target: 5 % at 5 % involvement, 10 % at 15, 20 % at 30, 30 % at 45, 40 % at 60,
     50 % at 80 (more and larger consolidated cores as disease advances). T moves from the
     ground-glass to the consolidation value over ``EDGE_RAMP_MM`` inside the core.
   - Blending with the parenchyma: new = P + alpha x (T - P), P the voxel's own HU (its
     vessels, fissures and noise), alpha = clip(d / ``EDGE_RAMP_MM`` (2.5 mm),
     ``EDGE_ALPHA_MIN`` (0.4), 1), d the 3D distance (mm) to the lesion's edge: soft edges,
     full target inside.
   - Noise: blending scales the parenchyma's own noise by (1 - alpha); noise of sigma
     s x sqrt(1 - (1 - alpha)^2) is added so the lesion keeps the scan's noise level s.
     s is measured on each scan (kernel and dose dependent): 1.4826 x MAD of HU minus its
     5 x 5 in-plane mean (x sqrt(25/24)), over parenchyma (the frozen mask eroded by 2
     pixels in-plane, local mean below ``NOISE_PARENCHYMA_MAX_HU`` -700 HU). The added
     noise is white noise smoothed in-plane (Gaussian, ``NOISE_GRAIN_SIGMA_PX`` 0.7 px) and
     rescaled to unit variance: a little grain, not each kernel's exact noise spectrum.
   - Vessels run through: a voxel already at or above its target stays as it is; a voxel
     denser than ``VESSEL_HU`` (-300 HU: vessels, bronchial walls, the tumour) is never
     made darker than it was.
   - Values are rounded and clipped to the loader's range (-1024..3071).

6. Truth: involvement % = inserted lesion voxels / frozen lung mask voxels x 100 (lesion is
   inside the mask by construction); its category is ``worker.scoring.result.category_for``
   at the daemon's noise floor. Everything is seeded: the same seed gives the same volume.

Limits: two patients (lung cancer, 5 and 8 mm slices), so 4 series x 6 levels are 24
correlated cases, not a population. The texture model is smooth plus grain: no crazy
paving, air bronchograms only where airways run through a lesion (they are raised like
parenchyma), no reticulation, no effusion, no volume loss. The lung does not change shape
as consolidation grows (real CT-4 lungs lose aeration and the scorer's lung mask with it).
Shapes are real but placed anew; confluent regions above 30 % are grown, not drawn.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage, special

from worker.scoring.result import category_for
from worker.scoring.volume import Volume

MODEL_VERSION = "insertion-1"
SERIES_NAMES = ("A0001-philips-L-5mm", "A0001-philips-B-5mm", "A0002-siemens-B70f-8mm", "A0002-siemens-B40f-8mm")
TARGET_PERCENTS = (5.0, 15.0, 30.0, 45.0, 60.0, 80.0)
FROZEN_MASKS_JSON = Path(__file__).with_name("insertion_masks.json")

# -- 1. frozen lung mask ------------------------------------------------------------------
MASK_PROCEDURE = "lung-mask-1"  # recorded with the checksums: a changed procedure is a new mask
MASK_AIR_HU = -400.0
MASK_AIRWAY_MAX_AREA_MM2 = 600.0
MASK_AIRWAY_MAX_OFFSET_MM = 30.0
MASK_AIRWAY_MEAN_HU = -950.0
MASK_BODY_HU = -500.0  # body voxels (for the column centroid used in step c)
MASK_COMPONENT_MIN_FRACTION = 0.10
MASK_COMPONENT_MIN_MEAN_HU = -950.0
MASK_CLOSING_MM = 3.0

MIN_SHAPE_ML = 0.1

# -- 3./4. placement and growth -----------------------------------------------------------
PERIPHERAL_DECAY_MM = 15.0
POSTERIOR_MIN_WEIGHT = 0.25
LOWER_MIN_WEIGHT = 0.25
PLACEMENT_SHARPNESS = 2.0
PLACEMENT_PASSES = 3
PLACEMENT_TRIES = 20
SHAPE_MIN_INSIDE = 0.70
SHAPE_MAX_OVERLAP = 0.30
CONFLUENT_FROM_PERCENT = 30.0
GROW_SHELL_SHARE = 0.5
GROW_NOISE_SIGMA_MM = 6.0
GROW_NOISE_WEIGHT = 0.5

# -- 5. HU and texture --------------------------------------------------------------------
GGO_TARGET_HU = (-700.0, -450.0)
CONSOLIDATION_TARGET_HU = (-100.0, 50.0)
TARGET_FIELD_SIGMA_MM = 4.0
CONSOLIDATION_SHARE = ((5.0, 0.05), (15.0, 0.10), (30.0, 0.20), (45.0, 0.30), (60.0, 0.40), (80.0, 0.50))
EDGE_RAMP_MM = 2.5
EDGE_ALPHA_MIN = 0.4
VESSEL_HU = -300.0
NOISE_WINDOW_PX = 5
NOISE_PARENCHYMA_MAX_HU = -700.0
NOISE_ERODE_PX = 2
NOISE_GRAIN_SIGMA_PX = 0.7
HU_RANGE = (-1024, 3071)


class FrozenMaskError(RuntimeError):
    """The recomputed lung mask is not the frozen one (or none is recorded)."""


@dataclass
class Case:
    """One unmodified series, its frozen lung mask and its measured parenchyma noise."""

    name: str
    volume: Volume
    lung: np.ndarray  # bool (z, rows, cols), the frozen mask
    noise_sigma_hu: float

    @property
    def lung_ml(self) -> float:
        return int(self.lung.sum()) * self.volume.voxel_volume_ml


@dataclass(frozen=True)
class LesionShape:
    """One MosMedData lesion component resampled to a series' voxel grid."""

    source: str  # "study_0255 #3"
    mask: np.ndarray  # bool crop (z, rows, cols)
    source_ml: float  # its volume in the MosMedData mask

    @property
    def voxels(self) -> int:
        return int(self.mask.sum())


@dataclass
class Insertion:
    """An inserted volume and its truth."""

    volume: Volume  # the series with lesions (a copy; the case's volume is untouched)
    lesion: np.ndarray  # bool, full grid
    consolidation: np.ndarray  # bool, full grid, subset of lesion
    alpha: np.ndarray  # float32, full grid, 0 outside the lesion
    target_hu: np.ndarray  # float32, full grid, NaN outside the lesion (noise-free target T)
    target_percent: float
    truth_percent: float
    truth_category: str
    shapes_placed: int
    grown_percent: float  # points added by growth (confluence and top-up)


# -- 1. the frozen lung mask -------------------------------------------------------------------


def lung_mask(volume: Volume) -> np.ndarray:
    """The lung mask of an unmodified scan by the procedure of the module docstring (step 1)."""
    hu = volume.hu
    _, dy, dx = volume.spacing_mm
    air = hu < MASK_AIR_HU
    inner = np.zeros_like(air)
    for k in range(hu.shape[0]):
        inner[k] = _inner_air(air[k], hu[k], (dy, dx))
    labels, count = ndimage.label(inner)
    if count == 0:
        return inner
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sums = np.bincount(labels.ravel(), weights=hu.ravel().astype(np.float64), minlength=count + 1)
    sizes[0] = 0
    means = sums / np.maximum(sizes, 1)
    keep = (sizes >= MASK_COMPONENT_MIN_FRACTION * sizes.max()) & (means > MASK_COMPONENT_MIN_MEAN_HU)
    keep[0] = False
    lung = keep[labels]
    radius = max(1, int(round(MASK_CLOSING_MM / min(dy, dx))))
    for k in range(hu.shape[0]):
        if lung[k].any():
            midline = _body_midline(hu[k])
            for half in (slice(0, midline), slice(midline, hu.shape[2])):
                lung[k][:, half] = _close_and_fill(lung[k][:, half], radius)
    return lung


def _close_and_fill(mask: np.ndarray, radius: int) -> np.ndarray:
    """Closing with a disk, then holes filled, on one side of the midline of one slice (step e)."""
    if mask.size == 0 or not mask.any():
        return mask
    pad = radius + 1
    closed = ndimage.binary_closing(np.pad(mask, pad), structure=_disk(radius))[pad:-pad, pad:-pad]
    return ndimage.binary_fill_holes(closed)


def _body_midline(hu_slice: np.ndarray) -> int:
    """The column centroid of the body (voxels >= ``MASK_BODY_HU``) of one slice."""
    body = hu_slice >= MASK_BODY_HU
    if not body.any():
        return hu_slice.shape[1] // 2
    return int(round(float(np.nonzero(body)[1].mean())))


def _inner_air(air: np.ndarray, hu: np.ndarray, pixel_mm: tuple[float, float]) -> np.ndarray:
    """One slice's air that is not outside air nor trachea / main bronchi (steps b and c)."""
    labels, count = ndimage.label(air, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return air
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    outside = np.zeros(count + 1, dtype=bool)
    outside[border] = True
    outside[0] = True
    flat = labels.ravel()
    sizes = np.bincount(flat, minlength=count + 1)
    means = np.bincount(flat, weights=hu.ravel().astype(np.float64), minlength=count + 1) / np.maximum(sizes, 1)
    cols = np.bincount(flat, weights=np.tile(np.arange(air.shape[1], dtype=np.float64), air.shape[0]),
                       minlength=count + 1) / np.maximum(sizes, 1)
    midline = _body_midline(hu)
    pixel_mm2 = pixel_mm[0] * pixel_mm[1]
    airway = ((sizes * pixel_mm2 < MASK_AIRWAY_MAX_AREA_MM2) & (means < MASK_AIRWAY_MEAN_HU)
              & (np.abs(cols - midline) * pixel_mm[1] < MASK_AIRWAY_MAX_OFFSET_MM))
    return ~(outside | airway)[labels]


def _disk(radius: int) -> np.ndarray:
    y, x = np.ogrid[-radius:radius + 1, -radius:radius + 1]
    return (x * x + y * y) <= radius * radius


def mask_record(mask: np.ndarray, spacing_mm: Sequence[float]) -> dict:
    """What is frozen of a mask: shape, voxels, ml and the SHA-256 of the packed mask."""
    packed = np.packbits(np.ascontiguousarray(mask, dtype=bool), axis=None)
    voxels = int(mask.sum())
    return {
        "procedure": MASK_PROCEDURE,
        "shape": [int(n) for n in mask.shape],
        "voxels": voxels,
        "volume_ml": round(voxels * math.prod(spacing_mm) / 1000.0, 1),
        "sha256": hashlib.sha256(packed.tobytes()).hexdigest(),
    }


def check_frozen(name: str, record: dict, frozen_path: Path = FROZEN_MASKS_JSON) -> None:
    """Raise :class:`FrozenMaskError` unless ``record`` is the one frozen for ``name``."""
    if not frozen_path.exists():
        raise FrozenMaskError(f"no frozen lung masks at {frozen_path}: run bench/insertion_bench.py --freeze "
                              "once, check the montage by eye, commit the file")
    frozen = json.loads(frozen_path.read_text()).get("series", {}).get(name)
    if frozen is None:
        raise FrozenMaskError(f"{frozen_path} has no frozen lung mask for {name}")
    differs = [key for key in ("procedure", "shape", "voxels", "sha256") if frozen.get(key) != record[key]]
    if differs:
        raise FrozenMaskError(
            f"lung mask of {name} differs from the frozen one in {', '.join(differs)}: "
            f"recomputed {record['voxels']} voxels ({record['volume_ml']} ml, sha256 {record['sha256'][:12]}), "
            f"frozen {frozen.get('voxels')} voxels ({frozen.get('volume_ml')} ml, sha256 "
            f"{str(frozen.get('sha256'))[:12]}). The data or the mask procedure changed; the benchmark's truth "
            "would not be the checked one. Refreeze only after checking the new mask by eye.")


def write_frozen(records: dict[str, dict], frozen_path: Path = FROZEN_MASKS_JSON) -> None:
    document = {
        "what": "frozen ground-truth lung masks of the insertion benchmark (ct_triage_tools.insertion, step 1)",
        "series": {name: records[name] for name in sorted(records)},
    }
    frozen_path.write_text(json.dumps(document, indent=1) + "\n")


def load_case(series_dir: Path) -> Volume:
    from worker.scoring.load import load_series  # the loader only (HU and geometry), no scorer

    return load_series(sorted(Path(series_dir).glob("*.dcm")))


def prepare_case(series_dir: Path, *, check: bool = True, frozen_path: Path = FROZEN_MASKS_JSON) -> Case:
    """Load a series, compute its lung mask, check it against the frozen one, measure noise."""
    volume = load_case(series_dir)
    lung = lung_mask(volume)
    name = Path(series_dir).name
    if check:
        check_frozen(name, mask_record(lung, volume.spacing_mm), frozen_path)
    return Case(name=name, volume=volume, lung=lung, noise_sigma_hu=parenchyma_noise(volume.hu, lung))


def parenchyma_noise(hu: np.ndarray, lung: np.ndarray) -> float:
    """The scan's noise in lung parenchyma (step 5: robust sigma of HU minus its local mean)."""
    box = _bbox(lung, margin=NOISE_WINDOW_PX)
    values = hu[box].astype(np.float32)
    local = ndimage.uniform_filter(values, size=(1, NOISE_WINDOW_PX, NOISE_WINDOW_PX))
    inner = ndimage.binary_erosion(lung[box], structure=_in_plane_cross(), iterations=NOISE_ERODE_PX)
    parenchyma = inner & (local < NOISE_PARENCHYMA_MAX_HU)
    residual = (values - local)[parenchyma]
    if residual.size == 0:
        return 0.0
    mad = float(np.median(np.abs(residual - np.median(residual))))
    window = NOISE_WINDOW_PX * NOISE_WINDOW_PX
    return 1.4826 * mad * math.sqrt(window / (window - 1))


def _in_plane_cross() -> np.ndarray:
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = ndimage.generate_binary_structure(2, 1)
    return structure


def _bbox(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...]:
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        if idx.size == 0:
            box.append(slice(0, 0))
            continue
        box.append(slice(max(0, int(idx[0]) - margin), min(mask.shape[axis], int(idx[-1]) + 1 + margin)))
    return tuple(box)


# -- 2. lesion shapes ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def mosmed_components(mask_folder: str) -> tuple[tuple[str, np.ndarray, tuple[float, float, float], float], ...]:
    """Every 26-connected component of the MosMedData masks: (source, crop, spacing, ml)."""
    from worker.scoring.load import nifti_array_zrc  # orientation handling only

    found = []
    for path in sorted(Path(mask_folder).glob("*.nii.gz")):
        data, spacing = nifti_array_zrc(path)
        mask = np.asarray(data) > 0
        labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
        voxel_ml = math.prod(spacing) / 1000.0
        study = path.name.split("_mask")[0]
        for index, box in enumerate(ndimage.find_objects(labels), start=1):
            if box is None:
                continue
            crop = labels[box] == index
            found.append((f"{study} #{index}", crop, spacing, round(int(crop.sum()) * voxel_ml, 2)))
    return tuple(found)


def resample_shape(crop: np.ndarray, source_mm: Sequence[float], target_mm: Sequence[float]) -> np.ndarray:
    """A boolean crop resampled from one voxel spacing to another (linear, threshold 0.5)."""
    padded = np.pad(crop.astype(np.float32), 1)
    zoom = [s / t for s, t in zip(source_mm, target_mm)]
    resampled = ndimage.zoom(padded, zoom, order=1, grid_mode=True, mode="grid-constant")
    out = resampled >= 0.5
    box = _bbox(out)
    return np.ascontiguousarray(out[box])


def shape_library(mask_folder: Path, spacing_mm: Sequence[float]) -> list[LesionShape]:
    """The MosMedData lesion components of at least ``MIN_SHAPE_ML``, resampled to ``spacing_mm``."""
    shapes = []
    for source, crop, spacing, ml in mosmed_components(str(mask_folder)):
        if ml < MIN_SHAPE_ML:
            continue
        mask = resample_shape(crop, spacing, spacing_mm)
        if mask.size and mask.any():
            shapes.append(LesionShape(source=source, mask=mask, source_ml=ml))
    return shapes


# -- 3. and 4. placement and growth ----------------------------------------------------------


def placement_weights(lung: np.ndarray, spacing_mm: Sequence[float]) -> np.ndarray:
    """W = peripheral x posterior x lower (step 3), 0 outside the lung."""
    depth = ndimage.distance_transform_edt(lung, sampling=spacing_mm)
    peripheral = np.exp(-depth / PERIPHERAL_DECAY_MM)
    z_idx = np.flatnonzero(lung.any(axis=(1, 2)))
    r_idx = np.flatnonzero(lung.any(axis=(0, 2)))
    z = np.arange(lung.shape[0], dtype=np.float64)
    r = np.arange(lung.shape[1], dtype=np.float64)
    height = (z - z_idx[0]) / max(1, z_idx[-1] - z_idx[0])
    posterior = (r - r_idx[0]) / max(1, r_idx[-1] - r_idx[0])
    lower = LOWER_MIN_WEIGHT + (1.0 - LOWER_MIN_WEIGHT) * (1.0 - np.clip(height, 0, 1))
    back = POSTERIOR_MIN_WEIGHT + (1.0 - POSTERIOR_MIN_WEIGHT) * np.clip(posterior, 0, 1)
    weights = peripheral * lower[:, None, None] * back[None, :, None]
    return np.where(lung, weights, 0.0).astype(np.float32)


def smooth_field(rng: np.random.Generator, shape: tuple[int, ...], spacing_mm: Sequence[float],
                 sigma_mm: float) -> np.ndarray:
    """A seeded Gaussian random field, smoothed by ``sigma_mm``, mapped to uniform [0, 1]."""
    white = rng.standard_normal(shape).astype(np.float32)
    smooth = ndimage.gaussian_filter(white, sigma=[sigma_mm / s for s in spacing_mm], mode="nearest")
    spread = float(smooth.std()) or 1.0
    return (0.5 * (1.0 + special.erf(smooth / (spread * math.sqrt(2.0))))).astype(np.float32)


def place_shapes(lung: np.ndarray, weights: np.ndarray, shapes: Sequence[LesionShape], need: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Lesion mask with shapes placed by the weight map until ``need`` voxels (never more)."""
    lesion = np.zeros(lung.shape, dtype=bool)
    lung_index = np.flatnonzero(lung)
    cdf = np.cumsum(weights.ravel()[lung_index].astype(np.float64) ** PLACEMENT_SHARPNESS)
    if lung_index.size == 0 or cdf[-1] <= 0:
        return lesion, 0
    placed, count = 0, 0
    order = rng.permutation(len(shapes))
    for _ in range(PLACEMENT_PASSES):
        for i in order:
            remaining = need - placed
            if remaining <= 0:
                return lesion, count
            if shapes[i].voxels > remaining:
                continue
            added = _place_one(lesion, lung, lung_index, cdf, shapes[i].mask, remaining, rng)
            placed += added
            count += added > 0
    return lesion, count


def _place_one(lesion: np.ndarray, lung: np.ndarray, lung_index: np.ndarray, cdf: np.ndarray,
               shape: np.ndarray, remaining: int, rng: np.random.Generator) -> int:
    total = int(shape.sum())
    for _ in range(PLACEMENT_TRIES):
        pick = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
        centre = np.unravel_index(lung_index[min(pick, lung_index.size - 1)], lung.shape)
        mask = shape[:, :, ::-1] if rng.random() < 0.5 else shape
        target, source = _overlap_boxes(centre, mask.shape, lung.shape)
        piece = mask[source]
        inside = piece & lung[target]
        if inside.sum() < SHAPE_MIN_INSIDE * total:
            continue
        if (piece & lesion[target]).sum() > SHAPE_MAX_OVERLAP * total:
            continue
        new = inside & ~lesion[target]
        added = int(new.sum())
        if added == 0 or added > remaining:
            continue
        lesion[target] |= new
        return added
    return 0


def _overlap_boxes(centre: Sequence[int], shape: Sequence[int],
                   bounds: Sequence[int]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """Slices of the volume and of the shape where a shape centred at ``centre`` lands."""
    target, source = [], []
    for c, n, limit in zip(centre, shape, bounds):
        start = int(c) - n // 2
        lo, hi = max(0, start), min(limit, start + n)
        target.append(slice(lo, hi))
        source.append(slice(lo - start, hi - start))
    return tuple(target), tuple(source)


def grow(lesion: np.ndarray, lung: np.ndarray, score: np.ndarray, need: int, z_every: int) -> int:
    """Grow ``lesion`` in place by exactly ``need`` lung voxels (step 4); returns voxels added."""
    in_plane = _in_plane_cross()
    full = ndimage.generate_binary_structure(3, 1)
    added, step = 0, 0
    flat_score = score.ravel()
    while added < need:
        step += 1
        if not lesion.any():
            shell = lung & ~lesion
        else:
            structure = full if step % z_every == 0 else in_plane
            shell = ndimage.binary_dilation(lesion, structure=structure) & lung & ~lesion
        index = np.flatnonzero(shell)
        if index.size == 0:
            if step % z_every != 0 and lesion.any():
                continue  # nothing in-plane: the next z step may still reach lung
            break
        take = min(need - added, max(1, int(math.ceil(GROW_SHELL_SHARE * index.size))))
        best = index[np.argsort(-flat_score[index], kind="stable")[:take]]
        lesion.ravel()[best] = True
        added += take
    return added


# -- 5. HU and texture -----------------------------------------------------------------------------


def consolidation_share(target_percent: float) -> float:
    levels, shares = zip(*CONSOLIDATION_SHARE)
    return float(np.interp(target_percent, levels, shares))


def lesion_hu(hu: np.ndarray, lesion: np.ndarray, spacing_mm: Sequence[float], target_percent: float,
              noise_sigma_hu: float, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """New HU of a block with ``lesion`` inserted (step 5), and its consolidation, alpha and target."""
    depth = ndimage.distance_transform_edt(lesion, sampling=spacing_mm).astype(np.float32)
    alpha = np.where(lesion, np.clip(depth / EDGE_RAMP_MM, EDGE_ALPHA_MIN, 1.0), 0.0).astype(np.float32)
    consolidation = np.zeros_like(lesion)
    if lesion.any():
        cut = float(np.quantile(depth[lesion], 1.0 - consolidation_share(target_percent)))
        consolidation = lesion & (depth > cut)
    core_depth = ndimage.distance_transform_edt(consolidation, sampling=spacing_mm).astype(np.float32)
    beta = np.where(consolidation, np.clip(core_depth / EDGE_RAMP_MM, EDGE_ALPHA_MIN, 1.0), 0.0)
    level = smooth_field(rng, lesion.shape, spacing_mm, TARGET_FIELD_SIGMA_MM)
    ggo = GGO_TARGET_HU[0] + level * (GGO_TARGET_HU[1] - GGO_TARGET_HU[0])
    dense = CONSOLIDATION_TARGET_HU[0] + level * (CONSOLIDATION_TARGET_HU[1] - CONSOLIDATION_TARGET_HU[0])
    target = np.where(lesion, ggo + beta * (dense - ggo), np.nan).astype(np.float32)
    grain = ndimage.gaussian_filter(rng.standard_normal(lesion.shape).astype(np.float32),
                                    sigma=(0.0, NOISE_GRAIN_SIGMA_PX, NOISE_GRAIN_SIGMA_PX))
    grain /= float(grain.std()) or 1.0
    original = hu.astype(np.float32)
    blended = original + alpha * (np.nan_to_num(target) - original)
    blended += noise_sigma_hu * np.sqrt(1.0 - (1.0 - alpha) ** 2) * grain
    blended = np.clip(np.rint(blended), *HU_RANGE)
    vessel = original > VESSEL_HU
    blended = np.where(vessel, np.maximum(blended, original), blended)
    keep = ~lesion | (original >= np.nan_to_num(target, nan=np.inf))
    new = np.where(keep, hu, blended.astype(hu.dtype))
    return new, consolidation, alpha, target


# -- the whole insertion ------------------------------------------------------------------------------


def insert_lesions(case: Case, target_percent: float, shapes: Sequence[LesionShape], *, seed: int = 0,
                   noise_floor_percent: float = 0.5) -> Insertion:
    """Insert lesions into ``case`` at ``target_percent`` of its frozen lung (seeded)."""
    rng = np.random.default_rng([seed, SERIES_NAMES.index(case.name) if case.name in SERIES_NAMES else 99,
                                 int(round(target_percent * 100))])
    spacing = case.volume.spacing_mm
    box = _bbox(case.lung, margin=1)
    lung = np.ascontiguousarray(case.lung[box])
    n_lung = int(lung.sum())
    need = int(round(target_percent / 100.0 * n_lung))
    weights = placement_weights(lung, spacing)
    from_shapes = min(need, int(round(CONFLUENT_FROM_PERCENT / 100.0 * n_lung)))
    lesion, count = place_shapes(lung, weights, shapes, from_shapes, rng)
    roughness = smooth_field(rng, lung.shape, spacing, GROW_NOISE_SIGMA_MM) * 2.0 - 1.0
    score = weights * (1.0 + GROW_NOISE_WEIGHT * roughness)
    z_every = max(1, int(round(spacing[0] / min(spacing[1:]))))
    grown = grow(lesion, lung, score, need - int(lesion.sum()), z_every)
    new_hu, consolidation, alpha, target = lesion_hu(case.volume.hu[box], lesion, spacing, target_percent,
                                                     case.noise_sigma_hu, rng)
    full_shape = case.volume.hu.shape
    out = case.volume.hu.copy()
    out[box] = new_hu
    truth = 100.0 * int(lesion.sum()) / n_lung
    return Insertion(
        volume=dataclasses.replace(case.volume, hu=out, source=f"{case.volume.source} + {MODEL_VERSION} "
                                                               f"{target_percent:g} %"),
        lesion=_embed(lesion, box, full_shape, False),
        consolidation=_embed(consolidation, box, full_shape, False),
        alpha=_embed(alpha, box, full_shape, 0.0),
        target_hu=_embed(target, box, full_shape, np.nan),
        target_percent=target_percent,
        truth_percent=truth,
        truth_category=category_for(min(max(truth, 0.0), 100.0), noise_floor_percent),
        shapes_placed=count,
        grown_percent=100.0 * grown / n_lung,
    )


def _embed(block: np.ndarray, box: tuple[slice, ...], shape: tuple[int, ...], fill) -> np.ndarray:
    out = np.full(shape, fill, dtype=block.dtype)
    out[box] = block
    return out


# -- checking by eye ------------------------------------------------------------------------------------


def render_montage(hu: np.ndarray, outlines: Sequence[tuple[np.ndarray, tuple[int, int, int]]], path: Path,
                   slices: int = 6, columns: int = 3) -> Path:
    """A PNG of ``slices`` evenly spaced slices (lung window -1000..+200 HU), each mask outlined."""
    from PIL import Image

    union = np.zeros(hu.shape, dtype=bool)
    for mask, _ in outlines:
        union |= mask
    z_idx = np.flatnonzero(union.any(axis=(1, 2))) if union.any() else np.arange(hu.shape[0])
    picks = [int(z_idx[int(round(q))]) for q in np.linspace(0, z_idx.size - 1, slices + 2)[1:-1]]
    tiles = []
    for k in picks:
        gray = np.clip((hu[k].astype(np.float32) + 1000.0) / 1200.0 * 255.0, 0, 255).astype(np.uint8)
        rgb = np.repeat(gray[:, :, None], 3, axis=2)
        for mask, color in outlines:
            edge = mask[k] & ~ndimage.binary_erosion(mask[k], iterations=2)
            rgb[edge] = color
        tiles.append(rgb)
    rows = int(math.ceil(len(tiles) / columns))
    height, width = tiles[0].shape[:2]
    sheet = np.zeros((rows * height, columns * width, 3), dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        sheet[r * height:(r + 1) * height, c * width:(c + 1) * width] = tile
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet).save(path)
    return path
