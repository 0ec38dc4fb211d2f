"""The classical scorer: lungs and lesions from Hounsfield units, no trained weights.

Every step is a plain image operation with a named threshold (module constants
below), so a radiologist or an auditor can follow why a voxel was called lesion.
Dense per-voxel work (pooling, morphology, thresholds) runs in torch on the chosen
device (``cuda`` when present); connected-component bookkeeping runs in scipy on
boolean masks on the CPU. No randomness; every operation is deterministic, so the
same input gives the same numbers.

Working grid
    Rows and columns are average-pooled by a whole factor so that a working pixel is
    about 1.4 mm (factor 2 for a 512 matrix at 0.6-0.9 mm pixels, 1 for coarser data);
    slices closer than 0.83 mm are pooled in pairs. Pooling also halves the noise. HU
    are clipped to [-1024, 600] first so bone and metal cannot drag neighbours up.

1. Body: per slice, the largest 8-connected component of voxels >= -500 HU, holes
   filled. The couch, its pad and clothing are separate components and stay out.
   The body's column centroid per slice is the midline estimate.

2. Aerated lung: body voxels below -320 HU (air, normal parenchyma and most ground
   glass, which reaches -380 HU). Trachea and extrapulmonary bronchi are removed per
   slice: small (< 9 cm2), near-midline (< 35 mm) components darker than -890 HU on
   average. 3D components are lung when lung-like: mean above -940 HU (stomach and
   bowel gas are pure air), at least 20 ml and 3 % of the largest.

3. Left / right: per slice, the column with the fewest lung voxels within 40 mm of the
   midline (ties: nearest the midline), median-filtered along z.
   ``Volume.column_towards_patient_left`` says which side is the patient's left.
   Everything below runs on the lungs' bounding box plus a margin.

4. Dense lung, the part plain thresholds miss (consolidation, CT-3/CT-4). Per lung,
   candidates are what a closing of the aerated lung with a ~20 mm rounded element
   adds (bays that pleural-based consolidation bites into the lung), what the lung
   reaches within 10 mm along z (a stretch of wall consolidated between aerated
   slices), and per-slice holes (dense cores enclosed by aerated lung); bone and
   non-body voxels are dropped. Each candidate region (per slice, 8-connected) is
   kept when small (< 150 mm2: vessel cross-sections) or when its margin looks like
   disease: consolidation is wrapped in ground glass, so at least 30 % of the ring
   2-3 pixels out in the aerated lung (beyond the partial-volume rim; aerated in the
   slices above and below too, so thick-slice partial volume at the diaphragm and
   heart does not count) is denser than -620 HU (ground glass, smoothed 3x3: the
   faint end of the -700..-300 HU band counts too; normal and dependent lung stay
   below). A kept large region is taken in only within 20 mm (square, in-plane) of
   those dense ring pixels: consolidation grows in from its ground-glass margin, while
   an organ that diseased lung wraps around (liver dome, heart) would otherwise come
   in whole. Organs the lung wraps around (heart, liver dome, hilum) and pleural
   effusion meet normal lung with a sharp edge and stay out; an effusion's fluid
   level is flat, which a closing does not fill anyway.

5. Lesions (MosMedData protocol: ground glass + consolidation; vessels, airways and
   dependent density excluded where distinguishable):
   a. S = 3x3 in-plane mean of the working image (noise down ~3x).
   b. L = S inside the lung, -1024 outside. O = grey opening of L with a ~7 mm square
      per slice: the background level under anything narrower than 7 mm. Vessels,
      fissures, the partial-volume rim and thin dependent bands vanish; lesions keep
      their level. Because outside-lung is set to air, bands stuck to the chest wall,
      heart or diaphragm are thin and vanish too.
   c. Next to dense voxels (> -200 HU, i.e. vessels and consolidation) the level is the
      opening with a ~14 mm square instead: a vessel with its partial-volume halo is
      narrower than that, consolidation (or ground glass around a vessel) is wider.
   d. Threshold T = -680 HU, raised in the posterior half of each slice by the excess
      of the posterior over the anterior 25th percentile of lung HU (at most +40 HU):
      the dependent gradient, not a lesion. Candidates: level > T, S < +100 HU (no
      bone or calcification), and lung in the slices above and below (thick-slice
      partial volume at the diaphragm, apex and heart).
   e. 3D components under 0.2 ml are dropped.
   f. The faint lesion edge comes back by hysteresis: up to 4 in-plane steps (and one
      slice up/down) into lung voxels with S > T - 70 HU.

6. Numbers (shared by every scorer, in ``pipeline.measure``): lung and lesion volumes,
   % per lung and total, CT category, lesion count (26-connected) and per-slice boxes.

Calibrated on the synthetic phantoms (ct_triage_tools.phantom) and checked on the real scans in
shared/data (non-COVID patients: 1-5 % at 2.8-5.8 l) and on real lesion shapes inserted into
them (docs/scoring.md, insertion benchmark). Known limits: next to confluent consolidation
up to 20 mm of the heart border, mediastinum and liver dome can be taken in as lung and
lesion (an over-read); a lung whose aerated part is gone entirely has nothing to grow
from; consolidation against the mediastinum with a sharp margin can be rejected as
"organ"; dense dependent atelectasis thicker
than ~7 mm and clusters of vessels in motion-blurred lung next to the heart can read as
lesion; ground glass smaller than ~7 mm is not counted.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ct_triage.errors import NotApplicable
from worker.scoring.base import Segmentation
from worker.scoring.device import configure_torch
from worker.scoring.volume import Volume

NAME = "ct-triage-classical"
VERSION = "0.1.0"

# -- thresholds (HU) and sizes (mm); see the module docstring -------------------------
CLIP_HU = (-1024.0, 600.0)
OUTSIDE_AIR_HU = -500.0
AIR_LUNG_HU = -320.0
AIRWAY_MEAN_HU = -890.0
AIRWAY_MAX_AREA_MM2 = 900.0
AIRWAY_MAX_OFFSET_MM = 35.0
LUNG_MIN_MEAN_HU = -940.0
LUNG_MIN_ML = 20.0
LUNG_MIN_FRACTION = 0.03
SPLIT_BAND_MM = 40.0
CROP_MARGIN_MM = 30.0
BONE_HU = 200.0
CLOSING_RADIUS_MM = 20.0
Z_REACH_MM = 10.0
SMALL_HOLE_MM2 = 150.0
MARGIN_GGO_HU = -620.0
MARGIN_MIN_FRACTION = 0.3
MARGIN_REACH_MM = 20.0
LESION_LOW_HU = -680.0
LESION_HIGH_HU = 100.0
DENSE_HU = -200.0
OPEN_MM = 7.0
OPEN_DENSE_MM = 14.0
NEAR_DENSE_MM = 3.0
DEPENDENT_MAX_RAISE_HU = 40.0
MIN_LESION_ML = 0.2
GROW_LOW_HU = -750.0
GROW_STEPS = 4
WORKING_PIXEL_MM = 1.4
SLICE_AS_SLAB_MM = 20.0  # segment_slice: one slice scored as a 3 x 20 mm slab
MIN_SLICE_MM = 1.25  # slices closer than MIN_SLICE_MM / 1.5 are pooled in pairs

_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)
_IN_PLANE8 = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE8[1] = True


def _now() -> float:
    return time.perf_counter()


def _odd(n: float) -> int:
    """The odd integer nearest to n (at least 1): a kernel width in pixels."""
    return max(1, 2 * int(math.floor((n - 1) / 2 + 0.5)) + 1)


# -- torch helpers (tensors are (z, rows, cols) float32) ------------------------------


def _neg_fill(x: torch.Tensor) -> float | bool | int:
    if x.dtype == torch.bool:
        return False
    if x.dtype.is_floating_point:
        return float("-inf")
    return int(torch.iinfo(x.dtype).min)


def _max1d(x: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Centred running max of odd width k along dim (same size), O(log k) passes."""
    if k <= 1:
        return x
    r = k // 2
    shape = list(x.shape)
    shape[dim] = r
    pad = torch.full(shape, _neg_fill(x), dtype=x.dtype, device=x.device)
    m = torch.cat([pad, x, pad], dim)
    op = torch.logical_or if x.dtype == torch.bool else torch.maximum
    w = 1
    while 2 * w <= k:
        n = m.shape[dim] - w
        m = op(m.narrow(dim, 0, n), m.narrow(dim, w, n))
        w *= 2
    if w < k:
        s = k - w
        n = m.shape[dim] - s
        m = op(m.narrow(dim, 0, n), m.narrow(dim, s, n))
    return m


def _maxfilter2d(x: torch.Tensor, k: int) -> torch.Tensor:
    """Per-slice max over a k x k square (separable), same size."""
    if k <= 1:
        return x
    return _max1d(_max1d(x, k, 1), k, 2)


def _minfilter2d(x: torch.Tensor, k: int) -> torch.Tensor:
    if x.dtype == torch.bool:
        return ~_maxfilter2d(~x, k)
    return -_maxfilter2d(-x, k)


def _opening2d(x: torch.Tensor, k: int) -> torch.Tensor:
    return _maxfilter2d(_minfilter2d(x, k), k)


def _boxmean2d(x: torch.Tensor, k: int) -> torch.Tensor:
    """Per-slice k x k mean, edges replicated (small k: shifted sums)."""
    if k <= 1:
        return x
    r = k // 2
    out = x
    for dim in (1, 2):
        n = out.shape[dim]
        first = out.narrow(dim, 0, 1).expand(*[r if d == dim else -1 for d in range(3)])
        last = out.narrow(dim, n - 1, 1).expand(*[r if d == dim else -1 for d in range(3)])
        padded = torch.cat([first, out, last], dim)
        acc = padded.narrow(dim, 0, n).clone()
        for s in range(1, k):
            acc += padded.narrow(dim, s, n)
        out = acc / k
    return out


def _boxsum1d(x: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Running sum of odd width k along dim, zeros outside (cumulative sums: any k)."""
    if k <= 1:
        return x
    r = k // 2
    n = x.shape[dim]
    shape = list(x.shape)
    shape[dim] = r + 1
    head = torch.zeros(shape, dtype=x.dtype, device=x.device)
    shape[dim] = r
    tail = torch.zeros(shape, dtype=x.dtype, device=x.device)
    c = torch.cumsum(torch.cat([head, x, tail], dim), dim)
    return c.narrow(dim, 2 * r + 1, n) - c.narrow(dim, 0, n)


def _blur3d(x: torch.Tensor, kz: int, k: int) -> torch.Tensor:
    """Separable box mean over (kz, k, k), zeros outside."""
    y = _boxsum1d(x, kz, 0)
    y = _boxsum1d(y, k, 1)
    y = _boxsum1d(y, k, 2)
    return y / float(kz * k * k)


def _ball_closing(mask: torch.Tensor, radius_vox: tuple[float, float, float]) -> torch.Tensor:
    """Closing of a boolean mask with a rounded structuring element.

    Dilation and erosion are thresholds of two passes of a separable box mean (a
    pyramid-shaped kernel, rounder than a cube): cheap on any device, deterministic.
    """
    rz, ry, rx = radius_vox
    kz = _odd(rz + 1) if rz >= 0.5 else 1
    k = _odd(max(ry, rx) + 1)
    x = mask.float()
    d = _blur3d(_blur3d(x, kz, k), kz, k) > 0.02
    e = _blur3d(_blur3d((~d).float(), kz, k), kz, k) > 0.02
    return ~e


# -- the scorer -------------------------------------------------------------------------


class ClassicalScorer:
    name = NAME
    version = VERSION

    def segment(self, volume: Volume, device: str = "cpu") -> Segmentation:
        configure_torch()
        with torch.inference_mode():
            return _segment(volume, torch.device(device))


def lung_segmentation(volume: Volume, device: str = "cpu", *, with_lesions: bool = False
                      ) -> tuple[Segmentation, dict[str, float]]:
    """The classical segmentation the learned scorers take the lungs (and split, grid)
    from, and its timings named ``classical.<step>`` to start theirs with. Without
    ``with_lesions`` the lesion step is skipped and ``lesion`` is empty."""
    configure_torch()
    with torch.inference_mode():
        base = _segment(volume, torch.device(device), with_lesions=with_lesions)
    return base, {f"classical.{k}": v for k, v in base.timings.items()}


def segment_slice(hu: np.ndarray, pixel_mm: float = 0.75, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Lung and lesion masks of one axial slice (rows, cols) in HU, at its own size.

    The 2D variant for single slices: scored as a three-slice stack of itself
    (``SLICE_AS_SLAB_MM`` apart), so the z rules see lung above and below and the volume
    rules read as areas (20 ml -> 3.3 cm2 of lung-like air, 100 ml -> 17 cm2 of lung). When the image is a crop of the
    lungs (covid-semiseg-2d: less than 30 % of its border is air) the whole image
    counts as body. Same thresholds otherwise.
    """
    hu = np.asarray(hu, dtype=np.float32)
    if hu.ndim != 2:
        raise ValueError("segment_slice wants one 2-D slice")
    volume = Volume(hu=np.repeat(hu[None], 3, axis=0), spacing_mm=(SLICE_AS_SLAB_MM, pixel_mm, pixel_mm),
                    source="slice")
    # a full field of view has air all round the patient; a crop of the lungs has not
    border = np.concatenate([hu[0], hu[-1], hu[:, 0], hu[:, -1]])
    cropped = bool(np.mean(border < OUTSIDE_AIR_HU) < 0.3)
    configure_torch()
    with torch.inference_mode():
        seg = _segment(volume, torch.device(device), whole_image_is_body=cropped)
    fz, fy, fx = seg.factor
    r, c = hu.shape
    up = lambda m: np.repeat(np.repeat(m[1], fy, axis=0), fx, axis=1)[:r, :c]  # noqa: E731 - a one-line helper used in the next lines only
    return up(seg.lung), up(seg.lesion)


def working_factors(volume: Volume) -> tuple[int, int, int]:
    dz, dy, dx = volume.spacing_mm
    f = max(1, int(round(WORKING_PIXEL_MM / max(min(dy, dx), 1e-3))))
    fz = 2 if dz < MIN_SLICE_MM / 1.5 else 1
    return fz, f, f


def to_working_grid(hu: np.ndarray, factors: tuple[int, int, int], device: torch.device,
                    chunk: int = 48) -> torch.Tensor:
    """Average-pool (z, rows, cols) by whole factors, in z-chunks (memory), on device.

    Edges that do not divide evenly are padded with air (-1024 HU).
    """
    fz, fy, fx = factors
    z, r, c = hu.shape
    zo, ro, co = -(-z // fz), -(-r // fy), -(-c // fx)
    out = torch.empty((zo, ro, co), dtype=torch.float32, device=device)
    src = torch.from_numpy(np.ascontiguousarray(hu))
    step = max(fz, (chunk // fz) * fz)
    for z0 in range(0, z, step):
        part = src[z0:z0 + step].to(device=device, dtype=torch.float32, non_blocking=True)
        part.clamp_(*CLIP_HU)
        pad_z = (-part.shape[0]) % fz
        pad_r, pad_c = (-r) % fy, (-c) % fx
        if pad_z or pad_r or pad_c:
            part = F.pad(part, (0, pad_c, 0, pad_r, 0, pad_z), value=CLIP_HU[0])
        pooled = F.avg_pool3d(part.unsqueeze(0).unsqueeze(0), kernel_size=(fz, fy, fx))[0, 0]
        out[z0 // fz: z0 // fz + pooled.shape[0]] = pooled
    return out


def _segment(volume: Volume, device: torch.device, *, whole_image_is_body: bool = False,
             with_lesions: bool = True) -> Segmentation:
    timings: dict[str, float] = {}
    notes: list[str] = []
    t = _now()
    factors = working_factors(volume)
    fz, fy, fx = factors
    dz, dy, dx = volume.spacing_mm
    spacing = (dz * fz, dy * fy, dx * fx)
    px = min(spacing[1], spacing[2])
    pixel_mm2 = spacing[1] * spacing[2]
    voxel_ml = spacing[0] * pixel_mm2 / 1000.0
    W = to_working_grid(volume.hu, factors, device)
    full_shape = tuple(W.shape)
    timings["pool"] = _now() - t

    # 1. outside air, body, midline --------------------------------------------------
    t = _now()
    body, midline = _body_and_midline(W, whole_image_is_body)
    timings["body"] = _now() - t

    # 2. air lung -------------------------------------------------------------------------
    t = _now()
    Wn = W.cpu().numpy() if device.type != "cpu" else W.numpy()
    air = _remove_airways((Wn < AIR_LUNG_HU) & body, Wn, midline, px, pixel_mm2)
    air_lung = _air_lung(air, Wn, voxel_ml)
    timings["air_lung"] = _now() - t

    # 3. left / right split -------------------------------------------------------------
    t = _now()
    split = _split_columns(air_lung, midline, px)
    timings["split"] = _now() - t

    # crop to the lungs plus a margin: everything below works on the crop only
    crop = _lung_crop(air_lung, spacing)
    Wc = W[crop].contiguous()
    del W
    Wn_c = np.ascontiguousarray(Wn[crop])
    body_c = np.ascontiguousarray(body[crop])
    air_c = np.ascontiguousarray(air_lung[crop])
    del Wn, body, air_lung
    left_side = _left_side(crop, split, volume.column_towards_patient_left, air_c.shape)

    # 4. dense lung ------------------------------------------------------------------------
    t = _now()
    S = _boxmean2d(Wc, 3)
    Sn = S.cpu().numpy() if device.type != "cpu" else S.numpy()
    lung_c = _fill_dense(air_c, left_side, Wn_c, Sn, body_c, spacing, device)
    del Sn
    timings["lung_fill"] = _now() - t
    if lung_c.sum() * voxel_ml < 100.0:
        raise NotApplicable(f"lungs found are only {lung_c.sum() * voxel_ml:.0f} ml "
                            "(not a chest CT, or the lungs are outside the field of view)")

    # 5. lesions -----------------------------------------------------------------------------
    t = _now()
    lesion_c = (_lesions(Wc, S, lung_c, spacing, device, voxel_ml, notes) if with_lesions
                else np.zeros_like(lung_c))
    timings["lesions"] = _now() - t

    lung = np.zeros(full_shape, dtype=bool)
    lesion = np.zeros(full_shape, dtype=bool)
    left = np.zeros(full_shape, dtype=bool)
    lung[crop] = lung_c
    lesion[crop] = lesion_c & lung_c
    left[crop] = lung_c & left_side
    return Segmentation(lung=lung, left=left, lesion=lesion, factor=factors,
                        original_shape=tuple(volume.hu.shape), spacing_mm=spacing,
                        timings=timings, notes=notes)


def _body_and_midline(W: torch.Tensor, whole_image_is_body: bool) -> tuple[np.ndarray, np.ndarray]:
    """Body mask (everything inside the outside air) and, per slice, the body's mean column."""
    if whole_image_is_body:  # a crop of the lungs (2D data sets): no outside air in view
        body = np.ones(tuple(W.shape), dtype=bool)
    else:
        body = _body_mask((W >= OUTSIDE_AIR_HU).cpu().numpy())
    cols = np.arange(W.shape[2], dtype=np.float64)
    body_cols = body.sum(axis=1)  # (z, cols)
    body_n = body_cols.sum(axis=1)
    midline = np.where(body_n > 0, (body_cols * cols).sum(axis=1) / np.maximum(body_n, 1),
                       W.shape[2] / 2.0)
    return body, midline


def _air_lung(air: np.ndarray, Wn: np.ndarray, voxel_ml: float) -> np.ndarray:
    """The lung-like 3-D components of ``air`` (airways removed).

    Lung-like: mean above LUNG_MIN_MEAN_HU and at least LUNG_MIN_ML; of those, the ones
    of at least LUNG_MIN_FRACTION of the biggest. Raises NotApplicable when there are none.
    """
    lab3, n3 = ndimage.label(air)
    if n3 == 0:
        raise NotApplicable("no aerated lung found in the volume (not a chest CT?)")
    sizes = np.bincount(lab3.ravel(), minlength=n3 + 1).astype(np.float64)
    sums = np.bincount(lab3.ravel(), weights=Wn.ravel(), minlength=n3 + 1)
    sizes[0] = 0
    means = sums / np.maximum(sizes, 1)
    lunglike = (means > LUNG_MIN_MEAN_HU) & (sizes * voxel_ml >= LUNG_MIN_ML)
    lunglike[0] = False
    if not lunglike.any():
        raise NotApplicable("no lung-like air region of at least "
                            f"{LUNG_MIN_ML:g} ml inside the body (not a chest CT?)")
    biggest = sizes[lunglike].max()
    keep = lunglike & (sizes >= LUNG_MIN_FRACTION * biggest)
    return keep[lab3]


def _lung_crop(air_lung: np.ndarray, spacing: tuple[float, float, float]) -> tuple[slice, slice, slice]:
    """The aerated lungs' bounding box plus margins: the closing/z reach in z, CROP_MARGIN_MM in-plane."""
    return _bbox(air_lung, margins=(
        int(math.ceil(max(CLOSING_RADIUS_MM, Z_REACH_MM) / spacing[0])) + 1,
        int(math.ceil(CROP_MARGIN_MM / spacing[1])), int(math.ceil(CROP_MARGIN_MM / spacing[2]))))


def _left_side(crop: tuple[slice, slice, slice], split: np.ndarray, column_towards_patient_left: bool,
               shape: tuple[int, ...]) -> np.ndarray:
    """Per voxel of the crop: on the patient's left of the per-slice split column."""
    zs, _, cs = crop
    col_idx = np.arange(cs.start, cs.stop)[None, None, :]
    high_side = col_idx > split[zs, None, None]  # columns above the split line
    left_side = high_side if column_towards_patient_left else ~high_side
    return np.broadcast_to(left_side, shape)


def _bbox(mask: np.ndarray, margins: tuple[int, int, int]) -> tuple[slice, slice, slice]:
    out = []
    for axis, margin in enumerate(margins):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.nonzero(mask.any(axis=other))[0]
        lo = max(0, int(idx[0]) - margin)
        hi = min(mask.shape[axis], int(idx[-1]) + margin + 1)
        out.append(slice(lo, hi))
    return out[0], out[1], out[2]


def _body_mask(fg: np.ndarray) -> np.ndarray:
    """Per slice: the largest in-plane component of non-air, holes filled (the couch,
    clothing and other separate objects are left out). 8-connected, so that the holes
    (4-connected) cannot leak out through a diagonal step."""
    labels, n = ndimage.label(fg, structure=_IN_PLANE8)
    if n == 0:
        return fg
    flat = labels.ravel()
    count = np.bincount(flat, minlength=n + 1)
    zs = np.repeat(np.arange(fg.shape[0]), fg.shape[1] * fg.shape[2])
    zlab = np.zeros(n + 1, dtype=np.int64)
    zlab[flat] = zs  # labels never span slices (in-plane structure)
    count[0] = 0
    order = np.lexsort((-count[1:], zlab[1:])) + 1  # by slice, largest first
    first = np.ones(order.size, dtype=bool)
    first[1:] = zlab[order[1:]] != zlab[order[:-1]]
    keep = np.zeros(n + 1, dtype=bool)
    keep[order[first]] = True
    keep[0] = False
    return _fill_holes_2d(keep[labels])


def _remove_airways(air: np.ndarray, Wn: np.ndarray, midline: np.ndarray, px: float,
                    pixel_mm2: float) -> np.ndarray:
    """Drop trachea / extrapulmonary bronchi: small, dark, near-midline 2D components."""
    labels, n = ndimage.label(air, structure=_IN_PLANE)
    if n == 0:
        return air
    flat = labels.ravel()
    area = np.bincount(flat, minlength=n + 1).astype(np.float64)
    small = area * pixel_mm2 <= AIRWAY_MAX_AREA_MM2
    small[0] = False
    if not small.any():
        return air
    idx = np.flatnonzero(small[flat])  # voxels of small components only
    lab = flat[idx]
    zyx = np.unravel_index(idx, air.shape)
    hu_sum = np.bincount(lab, weights=Wn.ravel()[idx], minlength=n + 1)
    z_sum = np.bincount(lab, weights=zyx[0], minlength=n + 1)
    c_sum = np.bincount(lab, weights=zyx[2], minlength=n + 1)
    a = np.maximum(area, 1)
    mean_hu = hu_sum / a
    zc = np.clip(np.rint(z_sum / a).astype(int), 0, air.shape[0] - 1)
    offset = np.abs(c_sum / a - midline[zc]) * px
    airway = small & (mean_hu < AIRWAY_MEAN_HU) & (offset <= AIRWAY_MAX_OFFSET_MM)
    if not airway.any():
        return air
    out = air.copy()
    out.ravel()[idx[airway[lab]]] = False
    return out


def _split_columns(air_lung: np.ndarray, midline: np.ndarray, px: float) -> np.ndarray:
    """Per slice, the column between the lungs (fewest lung voxels near the midline)."""
    z, _, c = air_lung.shape
    band = max(2, int(round(SPLIT_BAND_MM / px)))
    counts = air_lung.sum(axis=1).astype(np.float64)  # (z, cols)
    split = np.empty(z, dtype=np.float64)
    cols = np.arange(c, dtype=np.float64)
    for k in range(z):
        m = midline[k]
        lo, hi = max(0, int(m) - band), min(c, int(m) + band + 1)
        if lo >= hi or counts[k].sum() == 0:
            split[k] = m
            continue
        prof = counts[k, lo:hi] + 1e-3 * np.abs(cols[lo:hi] - m)
        split[k] = lo + int(np.argmin(prof))
    has = counts.sum(axis=1) > 0
    if has.any():
        split = ndimage.median_filter(split, size=5, mode="nearest")
    return split


def _fill_dense(air_lung, left_side, Wn, level, body, spacing, device) -> np.ndarray:
    dz, dy, dx = spacing
    px = min(dy, dx)
    pixel_mm2 = dy * dx
    allowed = body & (Wn < BONE_HU)
    lung = np.zeros_like(air_lung)
    nz = int(round(Z_REACH_MM / dz))
    for side_mask in (left_side, ~left_side):
        side = air_lung & side_mask
        if not side.any():
            continue
        t = torch.from_numpy(side).to(device)
        # bays: closing on a 2x coarser grid, then back to the working grid
        zc, rc, cc = t.shape
        tp = F.pad(t.float(), (0, cc % 2, 0, rc % 2))
        coarse = tp.reshape(zc, (rc + 1) // 2, 2, (cc + 1) // 2, 2).amax(dim=(2, 4)) > 0
        r = (CLOSING_RADIUS_MM / dz, CLOSING_RADIUS_MM / (2 * dy), CLOSING_RADIUS_MM / (2 * dx))
        closed = _ball_closing(coarse, r)
        closed = closed.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)[:, :rc, :cc]
        cand_t = closed | t
        # reach along z: a consolidated stretch of the lung wall between aerated slices
        if nz > 0:
            cand_t |= _max1d(t, 2 * nz + 1, 0)
        cand = _fill_holes_2d(cand_t.cpu().numpy())
        cand &= allowed & side_mask
        added = cand & ~side
        keep = _accept_dense(added, side, level, px, pixel_mm2, device)
        lung |= side | keep
    return lung


def _fill_holes_2d(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(~mask, structure=_IN_PLANE)
    border = np.zeros(n + 1, dtype=bool)
    for edge in (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]):
        border[np.unique(edge)] = True
    border[0] = False  # label 0: the mask itself
    return ~border[labels]


def _accept_dense(added, aerated, level, px, pixel_mm2, device) -> np.ndarray:
    """Keep added (dense) regions that are small or wrapped in ground glass.

    The margin of a region is the ring 2-3 pixels out from it inside the aerated
    lung (beyond the partial-volume rim); a ring pixel belongs to the region with
    the highest label within 3 pixels; ``level`` is the smoothed image. Of a kept
    large region only the pixels within MARGIN_REACH_MM of a ring pixel above
    MARGIN_GGO_HU are returned.
    """
    labels, n = ndimage.label(added, structure=_IN_PLANE8)
    if n == 0:
        return added
    flat = labels.ravel()
    area = np.bincount(flat, minlength=n + 1) * pixel_mm2
    lab_t = torch.from_numpy(labels.astype(np.float32)).to(device)
    near1 = _maxfilter2d(lab_t, 3)
    near3 = _maxfilter2d(lab_t, 7)
    # ring pixels must be aerated in the slices above and below too: the z partial
    # volume of thick slices (diaphragm, heart) does not count as a margin
    air_t = torch.from_numpy(aerated).to(device)
    steady = air_t.clone()
    if steady.shape[0] > 2:
        steady[1:-1] &= air_t[:-2] & air_t[2:]
    ring_t = (near3 > 0) & (near1 == 0) & steady
    ring = ring_t.cpu().numpy()
    ring_lab = near3.cpu().numpy()[ring].astype(np.int64)
    ring_n = np.bincount(ring_lab, minlength=n + 1)
    ring_ggo = np.bincount(ring_lab, weights=(level[ring] > MARGIN_GGO_HU), minlength=n + 1)
    frac = ring_ggo / np.maximum(ring_n, 1)
    small = area < SMALL_HOLE_MM2
    accept = small | ((frac >= MARGIN_MIN_FRACTION) & (ring_n >= 8))
    accept[0] = False
    small[0] = False
    kept = accept[labels]
    large_kept = kept & ~small[labels]
    slices = np.flatnonzero(large_kept.any(axis=(1, 2)))
    if slices.size:
        # a large region is kept only within reach of its diseased margin: consolidation
        # grows in from the ground glass, an organ the diseased lung wraps around (liver
        # dome, heart) is taken in no deeper than the reach (only slices that hold one)
        diseased = torch.from_numpy(ring[slices] & (level[slices] > MARGIN_GGO_HU)).to(device)
        near = (_maxfilter2d(diseased, _odd(2 * MARGIN_REACH_MM / px))).cpu().numpy()
        kept[slices] &= ~large_kept[slices] | near
    return kept


def _lesions(W, S, lung: np.ndarray, spacing, device, voxel_ml, notes) -> np.ndarray:
    dz, dy, dx = spacing
    px = min(dy, dx)
    lung_t = torch.from_numpy(lung).to(device)
    # openings of the lung alone: what is not lung counts as air, so structures
    # attached to the chest wall, heart or diaphragm are thin and vanish like vessels
    L = torch.where(lung_t, S, torch.full_like(S, CLIP_HU[0]))
    O = _opening2d(L, _odd(OPEN_MM / px))  # noqa: E741 - the O of the module docstring (step b)
    Od = _opening2d(L, _odd(OPEN_DENSE_MM / px))
    del L
    # on and next to dense structures only what survives the larger opening counts:
    # a vessel with its partial-volume halo is narrower than OPEN_DENSE_MM
    dense = _boxmean2d(((W > DENSE_HU) & lung_t).float(), 3) > 0.3  # not single noisy pixels
    near_dense = _maxfilter2d(dense.float(), _odd(2 * NEAR_DENSE_MM / px)) > 0
    del dense
    level = torch.where(near_dense, Od, O)
    del O, Od, near_dense
    thr = _dependent_threshold(S, lung_t, px)
    # z partial volume (thick slices across the diaphragm, apex, heart): a candidate
    # needs lung in the slices above and below
    inner = lung_t.clone()
    if inner.shape[0] > 2:
        inner[1:-1] &= lung_t[:-2] & lung_t[2:]
        inner[0] &= lung_t[1]
        inner[-1] &= lung_t[-2]
    cand = (level > thr) & (S < LESION_HIGH_HU) & inner
    del level, inner
    cand_np = cand.cpu().numpy()
    labels, n = ndimage.label(cand_np, structure=np.ones((3, 3, 3), dtype=bool))
    if n:
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        big = sizes * voxel_ml >= MIN_LESION_ML
        big[0] = False
        cand_np = big[labels]
    lesion = torch.from_numpy(cand_np).to(device)
    # give back the faint lesion edge (hysteresis), in-plane and one slice up and down
    # SIM300 silenced below: S is the smoothed HU tensor, not a constant (ruff takes upper-case names for one)
    edge_ok = lung_t & (S > thr + (GROW_LOW_HU - LESION_LOW_HU)) & (S < LESION_HIGH_HU)  # noqa: SIM300
    for _ in range(GROW_STEPS):
        lesion = lesion | ((_maxfilter2d(lesion.float(), 3) > 0) & edge_ok)
    grown_z = torch.zeros_like(lesion)
    if lesion.shape[0] > 1:
        grown_z[1:] |= lesion[:-1]
        grown_z[:-1] |= lesion[1:]
    lesion = lesion | (grown_z & edge_ok & (S > thr))  # noqa: SIM300
    return lesion.cpu().numpy()


def _erode2d(mask: torch.Tensor, k: int) -> torch.Tensor:
    return _minfilter2d(mask.float(), k) > 0.5


def _dependent_threshold(S: torch.Tensor, lung: torch.Tensor, px: float) -> torch.Tensor:
    """LESION_LOW_HU, raised in the posterior lung by the dependent density gradient.

    Per slice: the 25th percentile of S over the anterior and the posterior third of
    the lung rows; the excess posterior-over-anterior (at most DEPENDENT_MAX_RAISE_HU)
    is added to the threshold, ramping linearly from the middle to the back of the lung.
    Rows are assumed to run anterior -> posterior (supine, standard axial orientation).
    Computed with numpy on the host (one transfer, no per-slice device syncs), so the
    CPU and CUDA paths give the same thresholds.
    """
    z, r, c = S.shape
    Sn = S.cpu().numpy()
    Ln = lung.cpu().numpy()
    thr = np.full((z, r, 1), LESION_LOW_HU, dtype=np.float32)
    rows_with = np.asarray(Ln.any(axis=2))  # (z, r)
    row_idx = np.arange(r, dtype=np.float32)
    for k in np.flatnonzero(rows_with.sum(axis=1) >= 6):
        rr = np.flatnonzero(rows_with[k])
        r0, r1 = int(rr[0]), int(rr[-1])
        h = r1 - r0 + 1
        a_end, p_start = r0 + h // 3, r1 - h // 3
        ant = Sn[k, r0:a_end][Ln[k, r0:a_end]]
        post = Sn[k, p_start:r1 + 1][Ln[k, p_start:r1 + 1]]
        if ant.size < 20 or post.size < 20:
            continue
        raise_hu = float(np.clip(np.percentile(post, 25) - np.percentile(ant, 25), 0.0,
                                 DEPENDENT_MAX_RAISE_HU))
        if raise_hu <= 0:
            continue
        mid = (r0 + r1) / 2.0
        ramp = np.clip((row_idx - mid) / max(r1 - mid, 1.0), 0.0, 1.0)
        thr[k, :, 0] = LESION_LOW_HU + raise_hu * ramp
    return torch.from_numpy(thr).to(S.device)
