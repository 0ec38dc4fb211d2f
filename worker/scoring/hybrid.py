"""The hybrid scorer: lungs from the classical pipeline, lesions from the learned 2D network.

What
    1. Lungs, the left/right split, the airway removal and the dense-lung fill come from
       :class:`~worker.scoring.classical.ClassicalScorer` unchanged (their thresholds are
       documented there), on its working grid (~1.4 mm pixels), and so do its lesion
       candidates (step 5 of the classical scorer: HU bands with vessels, airways and the
       dependent gradient taken out), which serve as *extent* only (step 5 below).
    2. The lesion probability comes from :mod:`worker.scoring.lesion_net`, run on the
       lung-bearing working slices only, batched (``BATCH``), on ``cuda`` when the device
       says so. Each slice is pooled from the original HU like the working grid (but not
       clipped at +600 HU), mapped to gray by the HU window the weights file names (the
       window of the radiologist-labelled training images, see ``lesion_net``), cropped
       to that slice's lung box plus ``CROP_MARGIN_MM`` (never smaller than
       ``MIN_CROP_FRACTION`` of the volume's largest lung box, so apex and base slices
       are not blown up beyond what the training crops show), resized to the network
       input, scored (``FLIP``: a left-right flip averaged in, off: +0.01 Dice on the 2D
       validation slices for twice the time, and the extent comes from step 5 anyway),
       and the probability resized back into the crop.
    3. Along z the network runs on slices at most ``NET_STEP_MM`` apart (every slice of a
       >= 5 mm series; every second slice of 2.5 mm data; every fourth of 1.25 mm...);
       the probability of the slices between is interpolated linearly. Lesions that count
       for triage span centimetres; MosMedData itself is scored on 8 mm slices. On the
       512x512x300 phantom the network then takes ~0.5 s of a ~7 s warm scoring.
    4. Network lesion = lung voxel with probability >= the threshold stored with the
       weights (chosen on held-out pseudo-labelled volumes, never on the validation
       slices), and
       a. lung in the slices above and below (as the classical candidates): a 2D network
          sees thick-slice partial volume of the diaphragm dome, the heart and the apex as
          haze; on the real non-COVID series this rule took the hybrid from 2.6 % to 0.2 %;
       b. denser than ``LESION_FLOOR_HU`` (3x3 in-plane mean): ground glass is a hazy
          increase over aerated lung (~-860 HU), and the probability map, computed at
          128 px and resized, blurs lesion margins a few pixels into normal lung;
       c. not a thin dense structure: voxels denser than ``VESSEL_HU`` that vanish under a
          ``VESSEL_OPEN_MM`` opening are vessels a blurred map reaches into.
    5. Extent: a connected classical candidate (26-connected) of which at least
       ``CONFIRM_FRACTION`` is network lesion joins the lesion whole. The network decides
       *whether* a region is disease (texture: it tells ground glass from dependent
       density, partial volume and tumour, where HU bands cannot); the HU bands, measured
       on full-resolution HU, say how far it reaches (the network's 128 px map under-reads
       faint ground glass at the edges). Measured on the synthetic phantoms (60 slices
       at 1 mm, seed 1): the network alone read 12 / 27 / 38 % for 20 / 45 / 85 %; with
       this rule the phantom accuracy matrix (0..85 %, two seeds) is read within 1.2
       points, like the classical scorer, while the real non-COVID series stay at
       0.3..1.6 % (classical 1.1..4.8 % since its dense-lung margin rule reaches consolidation
       against the chest wall): its candidates there (dependent density, partial volume,
       tumour margins) are not confirmed.
    6. 3D components under ``MIN_LESION_ML`` are dropped (as the classical scorer does).
    7. Ground glass and consolidation: lesion voxels at or above ``CONSOLIDATION_HU``
       (working-grid HU, 3x3 mean) are consolidation, the rest ground glass; reported in
       ``Segmentation.notes`` as volumes. The HU band is the Fleischner glossary's
       (ground glass: hazy increase that does not obscure vessels, ~-700..-300 HU;
       consolidation: obscures them, soft-tissue density). Both masks go on with the
       segmentation: the SEG then carries "Ground glass opacity" and "Consolidation"
       segments instead of one "Lesions" segment, and the SR's lesions refer to them.
    8. Solid masses (``mass_mode``, ``CT_TRIAGE_MASS_EXCLUSION``; :mod:`worker.scoring.masses`
       gives the rule and its thresholds): lesion components that are solid, compact and
       sharply marginated (a tumour, not pneumonia) are measured and reported
       (``ScoreResult.mass_volume_ml``, ``mass_count``); with ``exclude`` they are also
       taken out of the lesion (and its ground glass / consolidation split).

Test-time HU normalisation (``hu_normalisation``, ``CT_TRIAGE_LESION_HU_NORMALISATION``):
step 2's window is corrected per volume so its air and lung (and soft-tissue) HU peaks land
where the training frame puts them (:mod:`worker.scoring.hu_frame`: bounds, fallback);
only the network input moves, the HU rules keep the true HU.

Everything after (volumes, %, category, boxes) is ``pipeline.measure``'s, as for every
scorer, so the hybrid and the classical scorer are compared on the same arithmetic.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ct_triage.errors import ConfigError
from worker.scoring import hu_frame, lesion_net, masses
from worker.scoring.base import Segmentation
from worker.scoring.classical import lung_segmentation
from worker.scoring.device import ModelCopies, configure_torch
from worker.scoring.lesion_net import LesionNet, hu_to_gray, probability
from worker.scoring.volume import Volume

log = logging.getLogger(__name__)

NAME = "ct-triage-hybrid"
VERSION = "0.1.0"

NET_STEP_MM = 5.0
CROP_MARGIN_MM = 8.0
MIN_CROP_FRACTION = 0.6
BATCH = 16
FLIP = False
MIN_LESION_ML = 0.2
LESION_FLOOR_HU = -700.0
VESSEL_HU = -300.0
VESSEL_OPEN_MM = 5.0
CONFIRM_FRACTION = 0.1
CONSOLIDATION_HU = -300.0


class HybridScorer:
    name = NAME
    version = VERSION

    def __init__(self, weights_path: Path | None = None, threshold: float | None = None, *,
                 hu_normalisation: str = "off", mass_mode: str = "report"):
        configure_torch()
        if mass_mode not in masses.MODES:
            raise ConfigError(f"mass mode must be one of {masses.MODES}, got {mass_mode!r}")
        if hu_normalisation not in hu_frame.MODES:
            raise ConfigError(f"HU normalisation must be one of {hu_frame.MODES}, got {hu_normalisation!r}")
        self.hu_normalisation = hu_normalisation
        self.mass_mode = mass_mode
        self.weights_path = Path(weights_path) if weights_path else lesion_net.DEFAULT_WEIGHTS
        try:
            self.model, self.meta = lesion_net.load_weights(self.weights_path)
        except lesion_net.WeightsError as exc:
            raise ConfigError(str(exc)) from exc
        self.threshold = float(threshold if threshold is not None else self.meta.get("threshold", 0.5))
        self.window = lesion_net.window_of(self.meta, self.weights_path)
        self.version = f"{VERSION}+{lesion_net.sha256_of(self.weights_path)[:12]}"
        self._copies = ModelCopies(self.model, prepare=lesion_net.fold_batch_norm)

    def segment(self, volume: Volume, device: str = "cpu") -> Segmentation:
        t = time.perf_counter()
        base, timings = lung_segmentation(volume, device, with_lesions=True)
        t1 = time.perf_counter()
        with torch.inference_mode():
            prob, hu_w, scored, frame = lesion_probability(self._copies.on(device), volume, base.lung, base.factor,
                                                           base.spacing_mm, device, self.window,
                                                           normalise=self.hu_normalisation)
        timings["network"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        lesion, consolidation = lesion_mask(prob, hu_w, base.lung, base.spacing_mm, self.threshold, base.lesion)
        timings["lesion_mask"] = time.perf_counter() - t2
        vox = base.voxel_volume_ml
        notes = list(base.notes) + [f"lesion network on {scored} slices (threshold {self.threshold:g})"]
        if frame is not None:
            notes.append(frame.note)
            if not frame.normalised:
                log.info("HU normalisation not applied: %s", frame.note)
        mass = None
        if self.mass_mode != "off":
            t3 = time.perf_counter()
            mass, comps = masses.find_masses(lesion, hu_w, base.lung, base.spacing_mm)
            n_mass = sum(c.mass for c in comps)
            if n_mass:
                verb = "excluded" if self.mass_mode == "exclude" else "counted"
                notes.append(f"solid mass(es) {verb}: {int(mass.sum()) * vox:.1f} ml ({n_mass})")
            if self.mass_mode == "exclude":
                lesion = lesion & ~mass
                consolidation = consolidation & ~mass
            timings["masses"] = time.perf_counter() - t3
        cons = int(consolidation.sum())
        ggo = int(lesion.sum()) - cons
        timings["total"] = time.perf_counter() - t
        notes.append(f"ground glass {ggo * vox:.1f} ml, consolidation {cons * vox:.1f} ml "
                     f"(split at {CONSOLIDATION_HU:g} HU)")
        return dataclasses.replace(base, lesion=lesion, timings=timings, notes=notes,
                                   ggo=lesion & ~consolidation, consolidation=consolidation,
                                   mass=mass, mass_excluded=self.mass_mode == "exclude")


def _pooled_slices(hu: np.ndarray, zs: list[int], factor: tuple[int, int, int]) -> torch.Tensor:
    """Working-grid slices ``zs`` pooled from the original HU (air-padded, not clipped above)."""
    fz, fy, fx = factor
    z, r, c = hu.shape
    out = []
    for zw in zs:
        part = torch.from_numpy(np.ascontiguousarray(hu[zw * fz: min(z, (zw + 1) * fz)])).float()
        part = part.clamp(min=-1024.0)
        pad_r, pad_c = (-r) % fy, (-c) % fx
        if pad_r or pad_c:
            part = F.pad(part, (0, pad_c, 0, pad_r), value=-1024.0)
        out.append(F.avg_pool2d(part.mean(0, keepdim=True)[None], kernel_size=(fy, fx))[0, 0])
    return torch.stack(out)


def _crop_boxes(lung: np.ndarray, zs: list[int], spacing: tuple[float, float, float]
                ) -> list[tuple[int, int, int, int]]:
    """(r0, r1, c0, c1) per slice: the slice's lung box plus the margin, at least a fraction of the largest."""
    _, R, C = lung.shape
    mr = int(round(CROP_MARGIN_MM / spacing[1]))
    mc = int(round(CROP_MARGIN_MM / spacing[2]))
    boxes = []
    rows_any = np.asarray(lung.any(axis=2))
    cols_any = np.asarray(lung.any(axis=1))
    spans = []
    for zw in zs:
        rr = np.flatnonzero(rows_any[zw])
        cc = np.flatnonzero(cols_any[zw])
        spans.append((rr[0], rr[-1] + 1, cc[0], cc[-1] + 1))
    max_h = max(b[1] - b[0] for b in spans) + 2 * mr
    max_w = max(b[3] - b[2] for b in spans) + 2 * mc
    for r0, r1, c0, c1 in spans:
        h = max(r1 - r0 + 2 * mr, int(MIN_CROP_FRACTION * max_h))
        w = max(c1 - c0 + 2 * mc, int(MIN_CROP_FRACTION * max_w))
        rc, cc_ = (r0 + r1) // 2, (c0 + c1) // 2
        r0n = int(np.clip(rc - h // 2, 0, max(0, R - h)))
        c0n = int(np.clip(cc_ - w // 2, 0, max(0, C - w)))
        boxes.append((r0n, min(R, r0n + h), c0n, min(C, c0n + w)))
    return boxes


def lesion_probability(model: LesionNet, volume: Volume, lung: np.ndarray, factor: tuple[int, int, int],
                       spacing: tuple[float, float, float], device: str,
                       window: lesion_net.Window = (lesion_net.WINDOW_LOW_HU, lesion_net.WINDOW_HIGH_HU),
                       *, normalise: str = "off"
                       ) -> tuple[np.ndarray, np.ndarray, int, hu_frame.Frame | None]:
    """(probability on the working grid, working-grid HU of the lung slices, slices scored,
    the HU frame unless ``normalise`` is off: the window corrected by the volume's own tissue peaks,
    :mod:`worker.scoring.hu_frame`)."""
    shape = lung.shape
    prob = np.zeros(shape, dtype=np.float32)
    hu_w = np.full(shape, -1024.0, dtype=np.float32)
    lung_z = np.flatnonzero(lung.any(axis=(1, 2)))
    if lung_z.size == 0:
        return prob, hu_w, 0, None
    step = max(1, int(np.floor(NET_STEP_MM / spacing[0] + 1e-6)))
    zs = list(lung_z[::step])
    if zs[-1] != lung_z[-1]:
        zs.append(int(lung_z[-1]))
    all_z = [int(z) for z in lung_z]
    hu_all = _pooled_slices(volume.hu, all_z, factor)
    for i, zw in enumerate(all_z):
        hu_w[zw] = hu_all[i].numpy()
    frame = None
    if normalise != "off":
        frame = hu_frame.volume_window(hu_w[lung_z], lung[lung_z], window, normalise)
        window = frame.window
    boxes = _crop_boxes(lung, zs, spacing)
    size = model.size
    dev = torch.device(device)
    index = {z: i for i, z in enumerate(all_z)}
    scored = np.zeros((len(zs),) + shape[1:], dtype=np.float32)
    for b0 in range(0, len(zs), BATCH):
        batch_z = zs[b0:b0 + BATCH]
        crops = []
        for k, zw in enumerate(batch_z):
            r0, r1, c0, c1 = boxes[b0 + k]
            g = hu_to_gray(hu_all[index[zw], r0:r1, c0:c1], window)
            crops.append(F.interpolate(g[None, None], size=(size, size), mode="bilinear",
                                       align_corners=False, antialias=True)[0])
        x = torch.stack(crops).to(dev)
        p = probability(model, x, flip=FLIP).float().cpu()
        for k in range(len(batch_z)):
            r0, r1, c0, c1 = boxes[b0 + k]
            scored[b0 + k, r0:r1, c0:c1] = F.interpolate(p[k:k + 1], size=(r1 - r0, c1 - c0), mode="bilinear",
                                                         align_corners=False)[0, 0].numpy()
    # interpolate along z between scored slices
    zs_arr = np.asarray(zs)
    for zw in all_z:
        j = int(np.searchsorted(zs_arr, zw))
        if j < len(zs) and zs_arr[j] == zw:
            prob[zw] = scored[j]
        else:
            lo, hi = zs_arr[j - 1], zs_arr[j]
            w = (zw - lo) / (hi - lo)
            prob[zw] = (1 - w) * scored[j - 1] + w * scored[j]
    return prob, hu_w, len(zs), frame


def lesion_mask(prob: np.ndarray, hu_w: np.ndarray, lung: np.ndarray, spacing: tuple[float, float, float],
                threshold: float, candidates: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(lesion mask, its consolidation part) from the network's probability and the
    classical ``candidates`` (extent); see the module docstring.

    Computed on the lungs' bounding box with a margin (one slice, so the z rule sees the
    lung end; the vessel opening's width in-plane), which gives the same mask as the whole
    volume at about half the cost."""
    lesion = np.zeros(lung.shape, dtype=bool)
    consolidation = np.zeros(lung.shape, dtype=bool)
    if not lung.any():
        return lesion, consolidation
    open_px = max(1, int(round(VESSEL_OPEN_MM / spacing[1])))
    box = []
    for axis, margin in enumerate((1, open_px + 2, open_px + 2)):
        idx = np.flatnonzero(lung.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(max(0, int(idx[0]) - margin), min(lung.shape[axis], int(idx[-1]) + margin + 1)))
    b = tuple(box)
    inner, inner_cons = _lesion_mask_in_box(prob[b], hu_w[b], lung[b], threshold, open_px, spacing,
                                          None if candidates is None else candidates[b])
    lesion[b] = inner
    consolidation[b] = inner_cons
    return lesion, consolidation


def _lesion_mask_in_box(prob: np.ndarray, hu_w: np.ndarray, lung: np.ndarray, threshold: float, open_px: int,
                        spacing: tuple[float, float, float], candidates: np.ndarray | None
                        ) -> tuple[np.ndarray, np.ndarray]:
    lesion = (prob >= threshold) & lung
    # 4a: lung above and below (outside the volume counts as lung: nothing is known there)
    lesion[1:] &= lung[:-1]
    lesion[:-1] &= lung[1:]
    if not lesion.any():
        return lesion, lesion.copy()
    S = ndimage.uniform_filter(hu_w, size=(1, 3, 3), mode="nearest")
    lesion &= S >= LESION_FLOOR_HU
    dense = lesion & (S >= VESSEL_HU)
    if dense.any():
        wide = ndimage.binary_opening(dense, structure=np.ones((1, open_px, open_px), dtype=bool))
        lesion &= ~(dense & ~wide)
    if candidates is not None and candidates.any() and lesion.any():
        lab, n = ndimage.label(candidates & lung, structure=np.ones((3, 3, 3), dtype=bool))
        size = np.bincount(lab.ravel(), minlength=n + 1)
        confirmed = np.bincount(lab[lesion].ravel(), minlength=n + 1)
        joins = (confirmed > 0) & (confirmed >= CONFIRM_FRACTION * size)
        joins[0] = False
        lesion |= joins[lab]
    voxel_ml = spacing[0] * spacing[1] * spacing[2] / 1000.0
    lab, n = ndimage.label(lesion, structure=np.ones((3, 3, 3), dtype=bool))
    if n:
        sizes = np.bincount(lab.ravel(), minlength=n + 1)
        small = sizes * voxel_ml < MIN_LESION_ML
        small[0] = False
        lesion[small[lab]] = False
    return lesion, lesion & (S >= CONSOLIDATION_HU)
