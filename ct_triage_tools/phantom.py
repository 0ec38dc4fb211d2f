"""Synthetic chest CT with a known lung involvement, for known-answer tests.

The anatomy lives in a fixed "model space" (350 mm field of view, 300 mm of z) that is
mapped onto whatever grid is asked for, so a small test phantom has the same anatomy
as a full 512x512x300 one, only coarser. Physical volumes in the ground truth are voxel
counts times the real voxel size, so they stay exact for any grid.

What it contains and why:

- body ellipse (soft tissue ~40 HU) with a subcutaneous fat ring (~-100 HU), spine,
  sternum and ribs (~700 HU) so body/bone thresholds have something to do;
- two lungs (parenchyma ~-860 HU) whose posterior part is denser (up to ~-730 HU):
  the dependent-lung gradient, which is *not* a lesion; the lungs fill the chest
  cavity only up to the inner surface of the ribs, so at least ~17 mm of rib, muscle
  and fat separate them from the outside air for every seed;
- a tapering, branching vessel tree (+40 HU, partial volume at its thin ends) and an
  airway tree (trachea, main bronchi, lobar bronchi at -1000 HU): a naive "HU > -700
  inside the lung" count is fooled by the vessels;
- lesions: a smooth random field thresholded inside the lungs at exactly the quantile
  that gives the requested involvement, biased to the periphery, the bases and the
  back (as COVID-19 pneumonia is), ground glass (-680..-380 HU) at the rims and
  consolidation (-60..+40 HU) in the cores, more consolidation at higher involvement;
- a small right pleural effusion (+10 HU) at the posterior base, outside the lung mask;
- Gaussian noise (sigma 20 HU); outside the scan circle -1024 (written as padding).

Lesions follow the MosMedData annotation protocol (doi:10.17816/DD46826): lesions =
ground glass + consolidation; vessels crossing a lesion stay in it; airways do not.

Coordinates: ``hu[k, row, col]``, k ascending = inferior -> superior (ascending
position along the slice normal, as the loader sorts), rows run anterior -> posterior,
columns run patient right -> left (``column_towards_patient_left``): the right lung is
at low columns.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)
from scipy import ndimage

from ct_triage.settings import DEFAULT_LUNG_KERNELS
from worker.scoring.result import category_for
from worker.scoring.volume import Volume

MODEL_FOV_MM = 350.0  # in-plane extent of the model space
MODEL_HEIGHT_MM = 300.0  # z extent of the model space
LUNG_Z_RANGE_MM = (18.0, 282.0)  # lungs span this part of the model's z
# The chest wall, as squared elliptic radii of the body ellipse (0 centre .. 1 skin):
# fat ring from 0.86, ribs between 0.70 and 0.80. The lungs (the parietal pleura) stay
# inside 0.70, against the inner surface of the ribs, whatever the per-seed jitter:
# the wall is then at least (1 - sqrt(0.70)) x 107.5 mm = 17.5 mm thick front and back,
# more at the sides.
BODY_FAT_RADIUS2 = 0.86
RIB_RADIUS2 = (0.70, 0.80)
PLEURA_RADIUS2 = RIB_RADIUS2[0]

HU_AIR = -1000.0
HU_FAT = -100.0
HU_SOFT_TISSUE = 40.0
HU_BONE = 700.0
HU_MARROW = 250.0
HU_PARENCHYMA = -860.0
HU_DEPENDENT_EXTRA = 130.0  # the posterior lung reaches about -730 HU
HU_VESSEL = 40.0
HU_EFFUSION = 10.0
HU_GGO = (-680.0, -380.0)
HU_CONSOLIDATION = (-60.0, 40.0)
NOISE_SIGMA_HU = 20.0
HU_MIN, HU_MAX = -1024, 3071

STORED_PADDING_VALUE = -2048  # stored value outside the scan circle when written
RESCALE_INTERCEPT = -1024  # stored = HU + 1024, signed 16 bit

MIN_LESION_MM3 = 30.0  # specks smaller than this are dropped: nobody draws them

_UID_ROOT = "ct-triage-phantom"


@dataclass
class Phantom:
    volume: Volume
    lung_mask: np.ndarray  # bool (z, rows, cols), both lungs, lesions included
    lesion_mask: np.ndarray  # bool, subset of lung_mask
    left_lung_mask: np.ndarray  # bool, the patient's left lung (high columns)
    ground_truth: dict = field(default_factory=dict)


# -- public API ---------------------------------------------------------------------


def make_phantom(
    involvement: float,
    *,
    slices: int = 300,
    rows: int = 512,
    seed: int = 0,
    slice_spacing_mm: float = 1.0,
    pixel_spacing_mm: float | None = None,
    study_instance_uid: str | None = None,
) -> Phantom:
    """A synthetic chest CT whose lesions cover ``involvement`` % of the lung volume.

    ``slices`` x ``rows`` x ``rows`` voxels; pixel spacing defaults to 350 mm / rows so
    the body fits. The anatomy always spans the whole z range, so the lung volume is
    realistic (4-6 l) only near the default 300 slices x 1 mm. Same arguments, same bytes.
    """
    involvement = float(involvement)
    if not 0.0 <= involvement <= 95.0:
        raise ValueError(f"involvement must be within 0..95 %, got {involvement!r}")
    if slices < 2:
        raise ValueError(f"slices must be >= 2, got {slices!r}")
    if rows < 32:
        raise ValueError(f"rows must be >= 32, got {rows!r}")
    if not slice_spacing_mm > 0:
        raise ValueError(f"slice_spacing_mm must be > 0, got {slice_spacing_mm!r}")
    pixel_spacing = MODEL_FOV_MM / rows if pixel_spacing_mm is None else float(pixel_spacing_mm)
    if not pixel_spacing > 0:
        raise ValueError(f"pixel_spacing_mm must be > 0, got {pixel_spacing_mm!r}")

    rng = np.random.default_rng(seed)
    grid = _Grid(slices, rows)
    anatomy = _Anatomy(rng)
    vessels, airways = _rasterize_trees(grid, anatomy, rng)
    field_3d = _lesion_field(rng)

    lung, left, field_values = _lungs_and_field(grid, anatomy, field_3d, airways)
    labels, consolidation_threshold, ggo_threshold = _threshold_lesions(
        lung, field_values, involvement, grid, pixel_spacing, slice_spacing_mm
    )
    lesion = labels.mask()
    hu = _render(grid, anatomy, rng, lung, lesion, field_values, vessels, airways,
                 ggo_threshold, consolidation_threshold)

    spacing = (float(slice_spacing_mm), pixel_spacing, pixel_spacing)
    uids = phantom_uids(involvement, seed, slices, rows, study_instance_uid, spacing_mm=spacing)
    volume = Volume(
        hu=hu,
        spacing_mm=spacing,
        sop_instance_uids=uids["sop_instance_uids"],
        study_instance_uid=uids["study_instance_uid"],
        series_instance_uid=uids["series_instance_uid"],
        column_towards_patient_left=True,
        source=f"phantom(involvement={involvement:g}, seed={seed})",
    )
    truth = _ground_truth(volume, lung, left, lesion, labels, involvement, seed)
    return Phantom(volume=volume, lung_mask=lung, lesion_mask=lesion, left_lung_mask=left,
                   ground_truth=truth)


def phantom_uids(involvement: float, seed: int, slices: int, rows: int,
                 study_instance_uid: str | None = None, kernel_index: int = 0,
                 spacing_mm: tuple[float, float, float] = (1.0, 0.0, 0.0)) -> dict:
    """Deterministic UIDs of a phantom: same arguments, same UIDs (retries resend the same)."""
    key = [_UID_ROOT, f"{float(involvement):g}", str(seed), str(slices), str(rows),
           ",".join(f"{float(s):.6g}" for s in spacing_mm)]
    study = study_instance_uid or str(generate_uid(entropy_srcs=key + ["study"]))
    series_key = key + [study, f"series{kernel_index}"]
    return {
        "study_instance_uid": study,
        "series_instance_uid": str(generate_uid(entropy_srcs=series_key)),
        "frame_of_reference_uid": str(generate_uid(entropy_srcs=key + [study, "frame"])),
        "sop_instance_uids": [
            str(generate_uid(entropy_srcs=series_key + [f"sop{k}"])) for k in range(slices)
        ],
    }


def write_phantom(
    out_dir,
    involvement: float,
    *,
    slices: int = 300,
    rows: int = 512,
    seed: int = 0,
    kernels=("FC51",),
    transfer_syntax=ExplicitVRLittleEndian,
    patient_id: str | None = None,
    study_instance_uid: str | None = None,
    **make_kwargs,
) -> dict:
    """Write ``out_dir/<kernel>/IM000001.dcm...`` (one CT series per kernel) and
    ``out_dir/ground_truth.json``; return the ground truth.

    The first kernel's series is the phantom itself (its UIDs are those in the ground
    truth); a kernel outside the lung-kernel list (e.g. FC07) gets the same anatomy
    slightly smoothed, as a soft-tissue reconstruction would. Instance 1 is the most
    superior slice, as a head-first scan numbers them.
    """
    if not kernels:
        raise ValueError("kernels must name at least one convolution kernel")
    transfer_syntax = UID(transfer_syntax)
    if transfer_syntax not in _WRITABLE_SYNTAXES:
        raise ValueError(
            f"transfer_syntax must be one of {', '.join(s.name for s in _WRITABLE_SYNTAXES)}, "
            f"got {transfer_syntax!r}"
        )
    phantom = make_phantom(involvement, slices=slices, rows=rows, seed=seed,
                           study_instance_uid=study_instance_uid, **make_kwargs)
    out = Path(out_dir)
    truth = dict(phantom.ground_truth)
    patient = _patient(float(involvement), seed, patient_id)
    series_by_kernel = {}
    for index, kernel in enumerate(kernels):
        uids = phantom_uids(involvement, seed, slices, rows, phantom.volume.study_instance_uid,
                            kernel_index=index, spacing_mm=phantom.volume.spacing_mm)
        hu = phantom.volume.hu if _is_sharp(kernel) else _soften(phantom.volume.hu)
        _write_series(out / kernel, hu, phantom.volume.spacing_mm, uids, patient, kernel,
                      series_number=2 + index, transfer_syntax=transfer_syntax)
        series_by_kernel[kernel] = uids["series_instance_uid"]
    truth.update(
        series_by_kernel=series_by_kernel,
        kernels=list(kernels),
        transfer_syntax=str(transfer_syntax),
        patient_id=patient["PatientID"],
    )
    out.mkdir(parents=True, exist_ok=True)
    write_truth_masks(out / TRUTH_MASKS_NAME, phantom)
    truth.update(truth_masks=TRUTH_MASKS_NAME, truth_labels=dict(TRUTH_LABELS))
    (out / "ground_truth.json").write_text(json.dumps(truth, indent=1))
    return truth


# -- truth masks ------------------------------------------------------------------------------

TRUTH_MASKS_NAME = "truth_masks.nii.gz"
#: Label values of the truth mask file (lesion voxels carry the side of the lung they lie in).
TRUTH_LABELS = {"right_lung": 1, "left_lung": 2, "right_lung_lesion": 3, "left_lung_lesion": 4}


def write_truth_masks(path, phantom: Phantom) -> None:
    """The phantom's masks as one NIfTI label map beside ground_truth.json.

    Voxel (i, j, k) = (column, row, slice), slice k in the order of the ground truth's
    ``sop_instance_uids`` / the volume (sorted along the slice normal); the affine only
    scales by the spacing (column, row, slice mm). Labels: :data:`TRUTH_LABELS`.
    """
    import nibabel as nib

    labels = np.zeros(phantom.lung_mask.shape, dtype=np.uint8)
    labels[phantom.lung_mask] = TRUTH_LABELS["right_lung"]
    labels[phantom.lung_mask & phantom.left_lung_mask] = TRUTH_LABELS["left_lung"]
    labels[phantom.lesion_mask] = TRUTH_LABELS["right_lung_lesion"]
    labels[phantom.lesion_mask & phantom.left_lung_mask] = TRUTH_LABELS["left_lung_lesion"]
    dz, dy, dx = phantom.volume.spacing_mm
    image = nib.Nifti1Image(np.ascontiguousarray(labels.transpose(2, 1, 0)), np.diag([dx, dy, dz, 1.0]))
    image.header.set_xyzt_units("mm")
    nib.save(image, str(path))


def read_truth_masks(folder) -> dict[str, np.ndarray]:
    """The masks :func:`write_phantom` stored: name -> bool array (slice, row, column)."""
    import nibabel as nib

    image: Any = nib.load(str(Path(folder) / TRUTH_MASKS_NAME))
    labels = np.asarray(image.dataobj).transpose(2, 1, 0)
    return {
        "lung": labels > 0,
        "left_lung": (labels == TRUTH_LABELS["left_lung"]) | (labels == TRUTH_LABELS["left_lung_lesion"]),
        "lesion": labels >= TRUTH_LABELS["right_lung_lesion"],
    }


# -- grid and anatomy ---------------------------------------------------------------


class _Grid:
    """Voxel centres in model millimetres; x = patient left, y = posterior, z = superior."""

    def __init__(self, slices: int, rows: int):
        self.slices, self.rows = slices, rows
        self.pixel_mm = MODEL_FOV_MM / rows
        self.slice_mm = MODEL_HEIGHT_MM / slices
        self.xy = ((np.arange(rows, dtype=np.float32) + 0.5) * self.pixel_mm - MODEL_FOV_MM / 2)
        self.z = (np.arange(slices, dtype=np.float64) + 0.5) * self.slice_mm
        self.x = self.xy[None, :]
        self.y = self.xy[:, None]
        # the lungs never leave this window: per-slice lung work is done inside it only
        self.crop = (slice(*self.index_range(-100.0, 110.0)), slice(*self.index_range(-130.0, 130.0)))
        self.xc = self.xy[self.crop[1]][None, :]
        self.yc = self.xy[self.crop[0]][:, None]

    def index_range(self, lo_mm: float, hi_mm: float) -> tuple[int, int]:
        lo = int(np.clip(math.floor((lo_mm + MODEL_FOV_MM / 2) / self.pixel_mm), 0, self.rows))
        hi = int(np.clip(math.ceil((hi_mm + MODEL_FOV_MM / 2) / self.pixel_mm), 0, self.rows))
        return lo, hi

    def z_range(self, lo_mm: float, hi_mm: float) -> tuple[int, int]:
        lo = int(np.clip(math.floor(lo_mm / self.slice_mm), 0, self.slices))
        hi = int(np.clip(math.ceil(hi_mm / self.slice_mm), 0, self.slices))
        return lo, hi


class _Anatomy:
    """Analytic shapes (model mm) with a little per-seed variation."""

    def __init__(self, rng: np.random.Generator):
        jitter = rng.uniform(0.96, 1.04, size=4)
        self.body_a, self.body_b = 154.0 * jitter[0], 112.0 * jitter[1]
        self.lung_x = 68.0  # lung centres at x = -68 (right) and +68 (left)
        self.lung_y = 6.0
        self.lung_a, self.lung_b = 52.0 * jitter[2], 88.0 * jitter[3]
        self.apex_start = 165.0  # above this the lungs narrow to the apex
        self.heart = (18.0, -28.0, 95.0, 58.0, 80.0)  # x, y, z centre, in-plane radius, z half-height
        # diaphragm domes (right higher because of the liver): x, y, z centre, radii
        self.domes = ((-66.0, -15.0, 18.0, 60.0, 85.0, 52.0), (66.0, -15.0, 18.0, 60.0, 85.0, 44.0))
        self.effusion_top = 50.0  # right posterior base, fluid level rises to the bottom
        self.effusion_depth = 22.0
        # a lesion split between the lungs: positive favours the left lung
        self.left_bias = float(rng.uniform(-0.6, 0.6))

    def lung_scale(self, z: float) -> float:
        lo, hi = LUNG_Z_RANGE_MM
        if z < lo or z > hi:
            return 0.0
        if z <= self.apex_start:
            return 1.0
        return math.sqrt(max(0.0, 1.0 - ((z - self.apex_start) / (hi - self.apex_start)) ** 2))

    def body_radius2(self, x, y):
        """Squared elliptic radius of the body outline: 0 centre .. 1 skin."""
        return (x / self.body_a) ** 2 + (y / self.body_b) ** 2

    def lungs(self, x, y, z: float, *, within_wall: bool = True):
        """(right, left, rho2) at one z: raw lung shapes including the effusion space,
        and the squared elliptic radius (0 centre .. 1 pleura) used to bias lesions.

        The lung ellipses are cut by the chest cavity (inside the ribs); ``within_wall=False``
        gives the uncut ellipses (the vessel and airway trees grow on those, so the random
        stream that follows them does not depend on the cut)."""
        scale = self.lung_scale(z)
        if scale == 0.0:
            empty = np.zeros(np.broadcast_shapes(np.shape(x), np.shape(y)), dtype=bool)
            return empty, empty.copy(), np.ones(empty.shape, dtype=np.float32)
        a, b = self.lung_a * scale, self.lung_b * scale
        dy2 = ((y - self.lung_y) / b) ** 2
        rho2_right = ((x + self.lung_x) / a) ** 2 + dy2
        rho2_left = ((x - self.lung_x) / a) ** 2 + dy2
        outside = ~self._heart(x, y, z)
        if within_wall:
            cavity2 = self.body_radius2(x, y) / PLEURA_RADIUS2
            outside = outside & (cavity2 < 1.0)
        right = (rho2_right < 1.0) & outside & ~self._dome(0, x, y, z)
        left = (rho2_left < 1.0) & outside & ~self._dome(1, x, y, z)
        rho2 = np.where(x < 0, rho2_right, rho2_left)
        if within_wall:  # the periphery is where either outline is near: lung or cavity
            rho2 = np.maximum(rho2, cavity2)
        return right, left, rho2.astype(np.float32)

    def posterior_limit(self, z: float) -> float:
        """The lungs' most posterior y at one z (the back of the ellipse or the cavity)."""
        scale = self.lung_scale(z)
        if scale == 0.0:
            return self.lung_y
        t = np.linspace(-1.0, 1.0, 2001)
        x = self.lung_x + self.lung_a * scale * t  # the lungs are mirror images in x
        y_lung = self.lung_y + self.lung_b * scale * np.sqrt(1.0 - t * t)
        y_wall = self.body_b * np.sqrt(np.clip(PLEURA_RADIUS2 - (x / self.body_a) ** 2, 0.0, None))
        return float(np.minimum(y_lung, y_wall).max())

    def _heart(self, x, y, z: float):
        hx, hy, hz, radius, half_height = self.heart
        h = (z - hz) / half_height
        if abs(h) >= 1.0:
            return np.zeros(np.broadcast_shapes(np.shape(x), np.shape(y)), dtype=bool)
        r = radius * math.sqrt(1.0 - h * h)
        return (x - hx) ** 2 + (y - hy) ** 2 < r * r

    def _dome(self, side: int, x, y, z: float):
        dx, dy, dz, ax, ay, az = self.domes[side]
        h = (z - dz) / az
        if abs(h) >= 1.0:
            return np.zeros(np.broadcast_shapes(np.shape(x), np.shape(y)), dtype=bool)
        s = 1.0 - h * h
        return ((x - dx) / ax) ** 2 + ((y - dy) / ay) ** 2 < s

    def effusion(self, right, x, y, z: float):
        """Fluid in the right lung's posterior base: a cap below a level that falls with z."""
        depth = self.effusion_depth * (1.0 - (z - LUNG_Z_RANGE_MM[0]) /
                                       (self.effusion_top - LUNG_Z_RANGE_MM[0]))
        if depth <= 0.0:
            return np.zeros(right.shape, dtype=bool)
        level = self.posterior_limit(z) - depth
        return right & (y > level) & (x < 0)

    def posterior_fraction(self, y, z: float):
        """0 in the front half of a lung, rising to 1 at its back: drives the dependent gradient."""
        b = max(self.posterior_limit(z) - self.lung_y, 1e-3)
        return np.clip((y - self.lung_y) / b, 0.0, 1.0) ** 2


# -- vessel and airway trees ----------------------------------------------------------


@dataclass
class _Segment:
    start: np.ndarray
    end: np.ndarray
    r_start: float
    r_end: float


def _rasterize_trees(grid: _Grid, anatomy: _Anatomy, rng: np.random.Generator):
    """uint8 partial-volume occupancy (0..255) of the vessel and airway trees."""
    vessels = np.zeros((grid.slices, grid.rows, grid.rows), dtype=np.uint8)
    airways = np.zeros_like(vessels)
    for segment in _vessel_segments(anatomy, rng):
        _draw_segment(vessels, grid, segment)
    for segment in _airway_segments(anatomy, rng):
        _draw_segment(airways, grid, segment)
    return vessels, airways


def _vessel_segments(anatomy: _Anatomy, rng: np.random.Generator) -> list[_Segment]:
    """Arteries from the upper hilum and veins from a lower one, in each lung."""
    segments: list[_Segment] = []
    for side in (-1.0, 1.0):
        for hilum, trunks in (
            ((side * 34.0, 12.0, 150.0), [((0.35 * side, 0.05, 1.0), 5.0), ((0.6 * side, 0.6, 0.8), 4.0),
                                          ((side, 0.5, 0.0), 4.0), ((0.5 * side, 0.5, -1.0), 5.5)]),
            ((side * 32.0, -4.0, 120.0), [((0.4 * side, -0.5, 0.9), 4.5), ((side, -0.4, -0.1), 4.5),
                                          ((0.6 * side, -0.3, -1.0), 4.5), ((0.4 * side, 0.7, -0.6), 4.0)]),
        ):
            for direction, radius in trunks:
                _grow(segments, anatomy, rng, np.array(hilum), np.array(direction), radius,
                      length=32.0, depth=0, max_depth=9, min_radius=0.35)
    return segments


def _airway_segments(anatomy: _Anatomy, rng: np.random.Generator) -> list[_Segment]:
    carina = np.array([0.0, -8.0, 190.0])
    segments = [_Segment(np.array([0.0, -14.0, MODEL_HEIGHT_MM + 5.0]), carina, 8.0, 7.5)]
    for side, steep in ((-1.0, 0.55), (1.0, 0.85)):  # the right main bronchus is steeper
        hilum = np.array([side * 40.0, 2.0, 160.0 + 10.0 * (steep - 0.55)])
        segments.append(_Segment(carina, hilum, 6.5 if side < 0 else 5.5, 5.0))
        for direction in ((0.4 * side, 0.1, 1.0), (side, -0.4, -0.3), (0.5 * side, 0.6, -1.0)):
            _grow(segments, anatomy, rng, hilum, np.array(direction), 4.0,
                  length=26.0, depth=0, max_depth=3, min_radius=1.2)
    return segments


def _grow(segments, anatomy, rng, start, direction, radius, *, length, depth, max_depth,
          min_radius):
    """A tapering segment and, while it stays inside a lung, two thinner children."""
    direction = direction / np.linalg.norm(direction)
    end = start + direction * length
    r_end = radius * 0.92
    segments.append(_Segment(start, end, radius, r_end))
    if depth >= max_depth or r_end * 0.8 < min_radius or not _inside_lung(anatomy, end):
        return
    outward = np.array([np.sign(end[0]) or 1.0, 0.0, 0.0])
    for sign in (-1.0, 1.0):
        turn = _perpendicular(direction, rng) * sign * math.tan(math.radians(rng.uniform(22, 38)))
        child = direction + turn + 0.25 * outward
        _grow(segments, anatomy, rng, end, child, r_end * rng.uniform(0.76, 0.86),
              length=length * rng.uniform(0.72, 0.88), depth=depth + 1,
              max_depth=max_depth, min_radius=min_radius)


def _perpendicular(direction: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    v -= v.dot(direction) * direction
    return v / (np.linalg.norm(v) + 1e-9)


def _inside_lung(anatomy: _Anatomy, point: np.ndarray) -> bool:
    right, left, _ = anatomy.lungs(np.float32(point[0]), np.float32(point[1]), float(point[2]),
                                   within_wall=False)
    return bool(right | left)


def _draw_segment(occupancy: np.ndarray, grid: _Grid, segment: _Segment) -> None:
    """Max-blend a tapered cylinder; the soft edge gives thin vessels partial-volume HU."""
    r_max = max(segment.r_start, segment.r_end) + grid.pixel_mm
    lo = np.minimum(segment.start, segment.end) - r_max
    hi = np.maximum(segment.start, segment.end) + r_max
    rows = slice(*grid.index_range(lo[1], hi[1]))
    cols = slice(*grid.index_range(lo[0], hi[0]))
    zs = slice(*grid.z_range(lo[2], hi[2]))
    if rows.start >= rows.stop or cols.start >= cols.stop or zs.start >= zs.stop:
        return
    px = grid.xy[cols][None, None, :] - np.float32(segment.start[0])
    py = grid.xy[rows][None, :, None] - np.float32(segment.start[1])
    pz = grid.z[zs].astype(np.float32)[:, None, None] - np.float32(segment.start[2])
    d = (segment.end - segment.start).astype(np.float32)
    t = np.clip((px * d[0] + py * d[1] + pz * d[2]) / max(float(d.dot(d)), 1e-6), 0.0, 1.0)
    dist = np.sqrt((px - t * d[0]) ** 2 + (py - t * d[1]) ** 2 + (pz - t * d[2]) ** 2)
    radius = segment.r_start + (segment.r_end - segment.r_start) * t
    weight = np.clip((radius - dist) / grid.pixel_mm + 0.5, 0.0, 1.0)
    # a vessel thinner than a pixel shows only part of its density
    weight *= np.minimum(1.0, 2.0 * radius / grid.pixel_mm)
    view = occupancy[zs, rows, cols]
    np.maximum(view, (weight * 255.0 + 0.5).astype(np.uint8), out=view)


# -- lesions ----------------------------------------------------------------------------


_FIELD_CELL_MM = 3.0


def _lesion_field(rng: np.random.Generator) -> np.ndarray:
    """Smooth unit-variance random field on a 3 mm model grid: blobs of ~1-3 cm with
    irregular edges (a coarse and a finer component)."""
    shape = (int(MODEL_HEIGHT_MM / _FIELD_CELL_MM) + 2, int(MODEL_FOV_MM / _FIELD_CELL_MM) + 2,
             int(MODEL_FOV_MM / _FIELD_CELL_MM) + 2)
    coarse = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 3.0)
    fine = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 1.0)
    coarse /= coarse.std()
    fine /= fine.std()
    return coarse + 0.3 * fine


class _FieldSampler:
    """Trilinear samples of the 3 mm field at the voxel centres of one slice."""

    def __init__(self, grid: _Grid, field_3d: np.ndarray):
        self.field = field_3d
        self.grid = grid
        self.rows = self._axis(grid.xy[grid.crop[0]] + MODEL_FOV_MM / 2, field_3d.shape[1])
        self.cols = self._axis(grid.xy[grid.crop[1]] + MODEL_FOV_MM / 2, field_3d.shape[2])

    @staticmethod
    def _axis(mm: np.ndarray, size: int):
        pos = np.clip(mm / _FIELD_CELL_MM, 0, size - 1.001)
        i0 = np.floor(pos).astype(np.intp)
        return i0, i0 + 1, (pos - i0).astype(np.float32)

    def slice(self, k: int) -> np.ndarray:
        pos = min(self.grid.z[k] / _FIELD_CELL_MM, self.field.shape[0] - 1.001)
        k0 = int(pos)
        f = np.float32(pos - k0)
        plane = self.field[k0] * (1 - f) + self.field[k0 + 1] * f
        r0, r1, fr = self.rows
        plane = plane[r0] * (1 - fr)[:, None] + plane[r1] * fr[:, None]
        c0, c1, fc = self.cols
        return plane[:, c0] * (1 - fc)[None, :] + plane[:, c1] * fc[None, :]


def _lungs_and_field(grid: _Grid, anatomy: _Anatomy, field_3d: np.ndarray, airways: np.ndarray):
    """Lung masks and, per slice, the biased lesion field at that slice's lung voxels."""
    shape = (grid.slices, grid.rows, grid.rows)
    lung = np.zeros(shape, dtype=bool)
    left = np.zeros(shape, dtype=bool)
    sampler = _FieldSampler(grid, field_3d)
    field_values: list[np.ndarray] = []
    lo, hi = LUNG_Z_RANGE_MM
    for k in range(grid.slices):
        z = float(grid.z[k])
        right_k, left_k, rho2 = anatomy.lungs(grid.xc, grid.yc, z)
        right_k &= ~anatomy.effusion(right_k, grid.xc, grid.yc, z)
        lung_k = right_k | left_k
        if not lung_k.any():
            field_values.append(np.empty(0, dtype=np.float32))
            continue
        lung[k][grid.crop] = lung_k
        left[k][grid.crop] = left_k
        # COVID-19 lesions favour the periphery, the back and the bases
        bias = (0.9 * rho2 + 0.5 * anatomy.posterior_fraction(grid.yc, z)
                + 0.6 * (hi - z) / (hi - lo))
        bias = bias + np.where(left_k, anatomy.left_bias, -anatomy.left_bias)
        values = (sampler.slice(k) + bias)[lung_k]
        # airways are lung but never lesion
        values[airways[k][grid.crop][lung_k] > 127] = -np.inf
        field_values.append(values.astype(np.float32))
    return lung, left, field_values


def _threshold_lesions(lung, field_values, involvement, grid, pixel_mm, slice_mm):
    """Lesion labels at the field quantile giving ``involvement`` % of the lung.

    Returns (labels, consolidation threshold, lesion threshold); labels are int32,
    0 outside lesions, 1..n per 26-connected lesion, specks dropped.
    """
    all_values = np.concatenate(field_values)
    n = all_values.size
    n_lesion = int(round(n * involvement / 100.0))
    if n_lesion == 0:
        return _Labels(lung.shape, None, np.zeros((1, 1, 1), np.int32), 0), np.inf, np.inf
    # consolidation: the densest cores, a larger share when the disease is severe
    n_consolidation = max(int(n_lesion * (0.05 + 0.35 * involvement / 100.0)), 1)
    kth = sorted({n - n_lesion, n - n_consolidation})
    part = np.partition(all_values, kth)
    lesion_threshold = float(part[n - n_lesion])
    consolidation_threshold = float(part[n - n_consolidation])
    del part, all_values
    lesion = np.zeros_like(lung)
    for k, values in enumerate(field_values):
        if values.size:
            lesion[k][lung[k]] = values >= lesion_threshold
    labels = _label_lesions(lesion, grid, pixel_mm * pixel_mm * slice_mm)
    return labels, consolidation_threshold, lesion_threshold


@dataclass
class _Labels:
    """Connected lesions, labelled inside the lungs' bounding box only (labelling the
    whole 512x512x300 volume is the slowest step otherwise)."""

    shape: tuple
    box: tuple | None  # slices of the full volume that ``labels`` covers
    labels: np.ndarray
    count: int

    def mask(self) -> np.ndarray:
        full = np.zeros(self.shape, dtype=bool)
        if self.box is not None:
            full[self.box] = self.labels > 0
        return full


def _label_lesions(lesion: np.ndarray, grid: _Grid, voxel_mm3: float) -> _Labels:
    z_lo, z_hi = grid.z_range(*LUNG_Z_RANGE_MM)
    box = (slice(z_lo, z_hi), grid.crop[0], grid.crop[1])
    labels, count = ndimage.label(lesion[box], structure=np.ones((3, 3, 3), dtype=bool))
    # specks smaller than MIN_LESION_MM3 are dropped: nobody draws them
    min_voxels = int(math.ceil(MIN_LESION_MM3 / voxel_mm3))
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    keep = sizes >= min_voxels
    keep[0] = False
    remap = np.zeros(count + 1, dtype=np.int32)
    remap[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    labels = remap[labels]
    return _Labels(lesion.shape, box, labels, int(keep.sum()))


# -- rendering --------------------------------------------------------------------------


def _chest_wall(grid: _Grid, anatomy: _Anatomy):
    """The slice-invariant part: air, body, fat ring, spine, sternum; plus the rib band."""
    x, y = grid.x, grid.y
    body = anatomy.body_radius2(x, y)
    hu = np.full((grid.rows, grid.rows), HU_AIR, dtype=np.float32)
    hu[body < 1.0] = HU_FAT
    hu[body < BODY_FAT_RADIUS2] = HU_SOFT_TISSUE
    spine = x ** 2 + (y - 78.0) ** 2
    hu[spine < 17.0 ** 2] = HU_BONE
    hu[spine < 13.5 ** 2] = HU_MARROW
    hu[(np.abs(x) < 6.0) & (np.abs(y - 106.0) < 14.0)] = HU_BONE  # spinous process
    hu[(np.abs(x) < 14.0) & (np.abs(y + 96.0) < 5.0)] = HU_BONE  # sternum
    rib_band = (body > RIB_RADIUS2[0]) & (body < RIB_RADIUS2[1]) & (np.abs(x) > 22.0)
    angle = np.arctan2(y, x)
    # ribs run obliquely: their cross-sections move with z and with the angle round the chest
    rib_phase = (np.abs(angle - np.pi / 2) * 40.0).astype(np.float32)
    outside_scan = (x ** 2 + y ** 2) >= (MODEL_FOV_MM / 2) ** 2
    return hu, rib_band, rib_phase, outside_scan


def _render(grid, anatomy, rng, lung, lesion, field_values, vessels, airways,
            ggo_threshold, consolidation_threshold) -> np.ndarray:
    base, rib_band, rib_phase, outside_scan = _chest_wall(grid, anatomy)
    rib_rows, rib_cols = np.nonzero(rib_band)
    rib_phase = rib_phase[rib_band]
    hu_out = np.empty((grid.slices, grid.rows, grid.rows), dtype=np.int16)
    crop = grid.crop
    ggo_span = max(consolidation_threshold - ggo_threshold, 1e-6)
    for k in range(grid.slices):
        z = float(grid.z[k])
        hu = base.copy()
        ribs = np.mod(z + rib_phase, 24.0) < 9.0
        hu[rib_rows[ribs], rib_cols[ribs]] = HU_BONE
        region = hu[crop]  # a view: edits land in hu
        lung_k = lung[k][crop]
        if lung_k.any():
            right_k, _, _ = anatomy.lungs(grid.xc, grid.yc, z)
            region[anatomy.effusion(right_k, grid.xc, grid.yc, z)] = HU_EFFUSION
            parenchyma = HU_PARENCHYMA + HU_DEPENDENT_EXTRA * anatomy.posterior_fraction(grid.yc, z)
            region[lung_k] = np.broadcast_to(parenchyma, lung_k.shape)[lung_k]
            lesion_k = lesion[k][crop]
            if lesion_k.any():
                values = np.full(lung_k.shape, -np.inf, dtype=np.float32)
                values[lung_k] = field_values[k]
                strength = values[lesion_k]
                ggo = HU_GGO[0] + (HU_GGO[1] - HU_GGO[0]) * np.clip(
                    (strength - ggo_threshold) / ggo_span, 0.0, 1.0)
                cons = np.clip(HU_CONSOLIDATION[0] + 60.0 * (strength - consolidation_threshold),
                               *HU_CONSOLIDATION)
                region[lesion_k] = np.where(strength >= consolidation_threshold, cons, ggo)
            vessel_w = vessels[k][crop].astype(np.float32) * np.float32(1 / 255)
            vessel_w *= lung_k
            region += vessel_w * (HU_VESSEL - region)
        airway_w = airways[k][crop].astype(np.float32) * np.float32(1 / 255)
        region += airway_w * (HU_AIR - region)
        hu += rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(NOISE_SIGMA_HU)
        np.clip(hu, HU_MIN, HU_MAX, out=hu)
        hu[outside_scan] = HU_MIN
        hu_out[k] = np.rint(hu)
    return hu_out


# -- ground truth -------------------------------------------------------------------------


def _ground_truth(volume: Volume, lung, left, lesion, labels: _Labels, requested: float,
                  seed: int) -> dict:
    voxel_ml = volume.voxel_volume_ml
    lung_left = int(np.count_nonzero(left))
    lung_total = int(np.count_nonzero(lung))
    lesion_left = int(np.count_nonzero(lesion & left))
    lesion_total = int(np.count_nonzero(lesion))
    lung_right, lesion_right = lung_total - lung_left, lesion_total - lesion_left
    involvement = 100.0 * lesion_total / max(lung_total, 1)
    boxes = _lesion_boxes(labels, left, volume.sop_instance_uids)
    slices, rows, _ = volume.hu.shape
    return {
        "requested_involvement_percent": requested,
        "involvement_percent": involvement,
        "involvement_percent_left": 100.0 * lesion_left / max(lung_left, 1),
        "involvement_percent_right": 100.0 * lesion_right / max(lung_right, 1),
        "lung_volume_ml": lung_total * voxel_ml,
        "lung_volume_left_ml": lung_left * voxel_ml,
        "lung_volume_right_ml": lung_right * voxel_ml,
        "lesion_volume_ml": lesion_total * voxel_ml,
        "lesion_volume_left_ml": lesion_left * voxel_ml,
        "lesion_volume_right_ml": lesion_right * voxel_ml,
        "lesion_count": labels.count,
        "category": category_for(involvement),
        "seed": seed,
        "slices": slices,
        "rows": rows,
        "spacing_mm": list(volume.spacing_mm),
        "study_instance_uid": volume.study_instance_uid,
        "series_instance_uid": volume.series_instance_uid,
        "lesion_boxes": boxes,
    }


def _lesion_boxes(labels: _Labels, left: np.ndarray, sop_instance_uids: list[str]) -> list[dict]:
    """Per-slice bounding boxes (inclusive pixel coordinates) of each connected lesion;
    the keys are those of ``worker.scoring.result.LesionBox``."""
    boxes: list[dict] = []
    if labels.box is None:
        return boxes
    z0, r0, c0 = (s.start for s in labels.box)
    left_in_box = left[labels.box]
    for index, bbox in enumerate(ndimage.find_objects(labels.labels), start=1):
        if bbox is None:
            continue
        own = labels.labels[bbox] == index
        rows_hit = own.any(axis=2)  # (z, rows)
        cols_hit = own.any(axis=1)  # (z, cols)
        lung = "left" if left_in_box[bbox][own].mean() >= 0.5 else "right"
        for dz in np.nonzero(rows_hit.any(axis=1))[0]:
            r = np.nonzero(rows_hit[dz])[0]
            c = np.nonzero(cols_hit[dz])[0]
            k = z0 + bbox[0].start + int(dz)
            boxes.append({
                "slice_index": k,
                "sop_instance_uid": sop_instance_uids[k] if sop_instance_uids else "",
                "row_min": r0 + bbox[1].start + int(r[0]),
                "col_min": c0 + bbox[2].start + int(c[0]),
                "row_max": r0 + bbox[1].start + int(r[-1]),
                "col_max": c0 + bbox[2].start + int(c[-1]),
                "lung": lung,
            })
    boxes.sort(key=lambda b: (b["slice_index"], b["row_min"], b["col_min"]))
    return boxes


# -- DICOM writing ----------------------------------------------------------------------------


_WRITABLE_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, JPEG2000Lossless)
_LUNG_KERNELS = {k.upper() for k in DEFAULT_LUNG_KERNELS}


def _is_sharp(kernel: str) -> bool:
    return kernel.upper() in _LUNG_KERNELS


def _soften(hu: np.ndarray) -> np.ndarray:
    """A soft-tissue kernel: same anatomy, in-plane smoothing (less noise, blurrier edges)."""
    outside = hu == HU_MIN
    smooth = ndimage.gaussian_filter(hu.astype(np.float32), sigma=(0.0, 0.8, 0.8))
    out = np.rint(smooth).astype(np.int16)
    out[outside] = HU_MIN
    return out


def _patient(involvement: float, seed: int, patient_id: str | None) -> dict:
    tag = f"P{involvement:g}S{seed}".replace(".", "_")
    rng = np.random.default_rng([seed, 7919])
    age = int(rng.integers(25, 85))
    return {
        "PatientName": f"PHANTOM^{tag}",
        "PatientID": patient_id or f"PHANTOM-{tag}",
        "PatientSex": "F" if rng.random() < 0.56 else "M",
        "PatientBirthDate": f"{2020 - age}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}",
        "PatientAge": f"{age:03d}Y",
        "AccessionNumber": f"PH{seed % 10**6:06d}{int(involvement) % 100:02d}",
    }


def _write_series(folder: Path, hu: np.ndarray, spacing, uids: dict, patient: dict, kernel: str,
                  *, series_number: int, transfer_syntax: UID) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    slices, rows, cols = hu.shape
    dz, dy, dx = spacing
    z_top = -100.0  # table position of the most superior slice
    origin_x = -(cols - 1) / 2.0 * dx
    origin_y = -(rows - 1) / 2.0 * dy
    stored = hu.astype(np.int16) - np.int16(RESCALE_INTERCEPT)  # HU >= -1024 -> stored >= 0
    stored[hu == HU_MIN] = STORED_PADDING_VALUE  # outside the scan circle (and clipped air)
    for k in range(slices):
        instance_number = slices - k  # instance 1 = most superior = highest z
        z = z_top - (instance_number - 1) * dz
        ds = ct_slice_dataset(
            sop_instance_uid=uids["sop_instance_uids"][k], study_instance_uid=uids["study_instance_uid"],
            series_instance_uid=uids["series_instance_uid"], frame_of_reference_uid=uids["frame_of_reference_uid"],
            patient=patient, kernel=kernel, series_number=series_number, instance_number=instance_number,
            slices=slices, rows=rows, cols=cols, position=(origin_x, origin_y, z), spacing=spacing)
        ds.PixelData = stored[k].tobytes()
        ds.file_meta = ct_file_meta(ds.SOPInstanceUID)
        if transfer_syntax in (RLELossless, JPEG2000Lossless):
            ds.compress(transfer_syntax, stored[k], generate_instance_uid=False,
                        **_encoder_options(transfer_syntax))
        elif transfer_syntax == ImplicitVRLittleEndian:
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        ds.save_as(folder / f"IM{instance_number:06d}.dcm", enforce_file_format=True)


def _encoder_options(transfer_syntax: UID) -> dict:
    # pylibjpeg-rle is much faster than pydicom's pure-Python RLE encoder
    if transfer_syntax == RLELossless:
        try:
            import rle  # noqa: F401 - only checks that the pylibjpeg-rle encoder is installed
            return {"encoding_plugin": "pylibjpeg"}
        except ImportError:
            return {}
    return {}


def ct_file_meta(sop_instance_uid: str, transfer_syntax: UID = ExplicitVRLittleEndian) -> FileMetaDataset:
    """File meta of a CT Image instance (ct-triage's implementation UID and version name)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = generate_uid(entropy_srcs=[_UID_ROOT, "implementation"])
    meta.ImplementationVersionName = "CTTRIAGE_PH01"
    return meta


_STUDY_DATE, _STUDY_TIME = "20200401", "101500"


def ct_slice_dataset(*, sop_instance_uid: str, study_instance_uid: str, series_instance_uid: str,
                     frame_of_reference_uid: str, patient: Mapping[str, str], kernel: str, series_number: int,
                     instance_number: int, slices: int, rows: int, cols: int, position: tuple[float, float, float],
                     spacing: tuple[float, float, float], **elements: Any) -> Dataset:
    """The header of one axial CT Image instance as the phantom writes it (no pixel data, no
    file meta): the Patient (``patient``: PatientName, PatientID, PatientBirthDate,
    PatientSex, PatientAge, AccessionNumber), General Study, General Series, Frame of
    Reference, General Equipment, General Image, Image Plane (``position`` of the first
    pixel, ``spacing`` (slice, row, column) in mm), Image Pixel (signed 16 bit, stored = HU
    + 1024), CT Image, VOI LUT (lung window for a sharp ``kernel``, soft tissue else) and SOP
    Common modules. ``elements`` (keyword=value) are set last: they add to the defaults or
    replace them."""
    dz, dy, dx = spacing
    sharp = _is_sharp(kernel)
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_instance_uid
    for prefix in ("Study", "Series", "Acquisition", "Content"):
        setattr(ds, f"{prefix}Date", _STUDY_DATE)
        setattr(ds, f"{prefix}Time", _STUDY_TIME)
    ds.AccessionNumber = patient["AccessionNumber"]
    ds.Modality = "CT"
    ds.Manufacturer = "TOSHIBA"
    ds.InstitutionName = "ct-triage synthetic phantom"
    ds.ReferringPhysicianName = ""
    ds.StationName = "PHANTOM"
    ds.StudyDescription = "CT CHEST (SYNTHETIC PHANTOM)"
    ds.SeriesDescription = f"PHANTOM CHEST 1.0 {kernel}"
    ds.ManufacturerModelName = "Aquilion"
    ds.PatientName = patient["PatientName"]
    ds.PatientID = patient["PatientID"]
    ds.PatientBirthDate = patient["PatientBirthDate"]
    ds.PatientSex = patient["PatientSex"]
    ds.PatientAge = patient["PatientAge"]
    ds.PatientIdentityRemoved = "NO"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = _ds_number(dz)
    ds.KVP = "120"
    ds.DataCollectionDiameter = "500"
    ds.SoftwareVersions = "ct-triage phantom 1"
    ds.ReconstructionDiameter = _ds_number(cols * dx)
    ds.GantryDetectorTilt = "0"
    ds.TableHeight = "120"
    ds.RotationDirection = "CW"
    ds.XRayTubeCurrent = 200
    ds.ConvolutionKernel = kernel
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_instance_uid
    ds.SeriesInstanceUID = series_instance_uid
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [_ds_number(v) for v in position]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = _ds_number(position[2])
    ds.ImagesInAcquisition = slices
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.PixelSpacing = [_ds_number(dy), _ds_number(dx)]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.add(DataElement(0x00280120, "SS", STORED_PADDING_VALUE))  # PixelPaddingValue
    ds.WindowCenter = "-600" if sharp else "40"
    ds.WindowWidth = "1500" if sharp else "400"
    ds.RescaleIntercept = str(RESCALE_INTERCEPT)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.LossyImageCompression = "00"
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return ds


def _ds_number(value: float) -> str:
    """A DS string (at most 16 characters) for a float."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return text if len(text) <= 16 else f"{value:.9g}"
