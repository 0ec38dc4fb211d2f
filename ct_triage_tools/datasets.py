"""Readers of the labelled data sets ``ct-triage eval`` and ``ct-triage train`` use.

MosMedData (doi:10.17816/DD46826)
    ``studies/CT-0/study_0001.nii.gz`` ... ``studies/CT-4/...`` and optionally
    ``masks/study_XXXX_mask.nii.gz`` (:func:`mosmed_studies`).

covid-semiseg-2d (Inf-Net's COVID-SemiSeg packaging of the MedSeg slices)
    ``Imgs/*.jpg`` and ``GT/*.png`` (or a folder holding ``val/``, ``test/`` or
    ``train/`` so laid out) (:func:`semiseg_pairs`). These are 8-bit, windowed,
    lung-cropped slices without HU; :func:`gray_to_hu` maps gray levels to approximate
    HU per image by two anchors found in its histogram: the dominant dark mode is
    aerated lung (-850 HU) and the dominant bright mode soft tissue (+40 HU); when either
    is missing (the dark mode holds under 0.2 % of the pixels, or the modes are under 60
    gray levels apart) a standard lung window (-1350..+150 HU) is assumed.

:func:`write_nifti_study` writes a MosMedData-style study (used by tests and tools).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ct_triage.errors import InvalidInput
from worker.scoring.result import CATEGORIES

_STUDY_RE = re.compile(r"(study_\d+)\.nii(\.gz)?$", re.IGNORECASE)

MEDSEG_WINDOW_HU = (-1059.0, 21.0)
# The HU window each image source was written with, fitted from its tissue peaks
# (``fit_window``; gray = (HU - low) / (high - low) * 255): coronacases.org from air, lung
# and soft tissue (-1019..+1676); MedSeg (the radiologist-drawn train/ and val/) from air
# and lung, its soft tissue saturating (-1059..+21, the window the shipped network's input
# is in: ``worker.scoring.lesion_net.WINDOW_*_HU``). Radiopaedia's crops hold no outside air and saturate soft
# tissue, and their lung mode varies by volume (22..94): no window can be fitted, so they
# are taken as they are (a lung window, within the gray-window augmentation's reach).
SOURCE_WINDOWS_HU: dict[str, tuple[float, float] | None] = {
    "coronacases": (-1019.0, 1676.0),
    "medseg": MEDSEG_WINDOW_HU,
    "radiopaedia": None,
}


def source_of(name: str) -> str:
    """The image source of a COVID-SemiSeg file name (see ``SOURCE_WINDOWS_HU``)."""
    for source in ("coronacases", "radiopaedia"):
        if source in name:
            return source
    return "medseg"


def network_gray(gray: np.ndarray, source: str, window: tuple[float, float] = MEDSEG_WINDOW_HU) -> np.ndarray:
    """An 8-bit image of ``source`` re-windowed to a network's HU ``window`` (float 0..255):
    gray -> HU by the source's fitted window, HU -> gray by ``window``. Sources without a
    fitted window come back unchanged."""
    g = np.asarray(gray, dtype=np.float32)
    fitted = SOURCE_WINDOWS_HU.get(source)
    if fitted is None or tuple(fitted) == tuple(window):
        return g
    hu = fitted[0] + g / 255.0 * (fitted[1] - fitted[0])
    return np.clip((hu - window[0]) / (window[1] - window[0]) * 255.0, 0.0, 255.0)


def detect_layout(data_dir: Path) -> tuple[str, Path]:
    """('mosmed', folder) or ('semiseg', folder with Imgs/ and GT/)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise InvalidInput(f"{data_dir} is not a directory")
    if (data_dir / "studies").is_dir():
        return "mosmed", data_dir
    if (data_dir / "Imgs").is_dir() and (data_dir / "GT").is_dir():
        return "semiseg", data_dir
    for sub in ("val", "test", "train"):
        if (data_dir / sub / "Imgs").is_dir() and (data_dir / sub / "GT").is_dir():
            return "semiseg", data_dir / sub
    raise InvalidInput(
        f"{data_dir}: neither a MosMedData layout (studies/CT-0/study_0001.nii.gz, masks/) "
        "nor a covid-semiseg-2d layout (Imgs/*.jpg + GT/*.png)"
    )


@dataclass
class Study:
    study_id: str
    path: Path
    category: int
    mask: Path | None


def mosmed_studies(data_dir: Path) -> list[Study]:
    data_dir = Path(data_dir)
    masks = {}
    if (data_dir / "masks").is_dir():
        for m in sorted((data_dir / "masks").iterdir()):
            hit = re.match(r"(study_\d+)_mask\.nii(\.gz)?$", m.name, re.IGNORECASE)
            if hit:
                masks[hit.group(1).lower()] = m
    out = []
    for c, name in enumerate(CATEGORIES):
        folder = data_dir / "studies" / name
        if not folder.is_dir():
            continue
        for f in sorted(folder.iterdir()):
            hit = _STUDY_RE.search(f.name)
            if hit:
                sid = hit.group(1).lower()
                out.append(Study(sid, f, c, masks.get(sid)))
    return out


def write_nifti_study(hu_zrc: np.ndarray, spacing_mm: Sequence[float], path: Path,
                      dtype=np.int16) -> Path:
    """Write a (z, row, col) array as a MosMedData-style NIfTI that
    ``worker.scoring.load.load_nifti`` reads back unchanged (axes L, P, S)."""
    import nibabel as nib

    dz, dy, dx = (float(s) for s in spacing_mm)
    data = np.ascontiguousarray(np.transpose(np.asarray(hu_zrc), (2, 1, 0))).astype(dtype)
    affine = np.diag([-dx, -dy, dz, 1.0])  # +i -> patient left, +j -> posterior, +k -> superior
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


LUNG_HU, SOFT_TISSUE_HU = -850.0, 40.0
DEFAULT_WINDOW_GRAY = (85.0, 236.0)  # lung window -1350..+150 HU: -850 -> 85, +40 -> 236


def gray_to_hu(gray: np.ndarray) -> tuple[np.ndarray, str]:
    """Approximate HU of an 8-bit windowed CT slice (see module docstring)."""
    g = np.asarray(gray, dtype=np.float32)
    hist = np.bincount(np.clip(g, 0, 255).astype(np.int64).ravel(), minlength=256).astype(np.float64)
    smooth = np.convolve(hist, np.ones(7) / 7.0, mode="same")
    lo: float = int(np.argmax(smooth[:150]))
    hi: float = 150 + int(np.argmax(smooth[150:]))
    how = "histogram anchors"
    if smooth[int(lo)] < 0.002 * g.size or hi - lo < 60:
        lo, hi = DEFAULT_WINDOW_GRAY
        how = "default lung window"
    hu = (g - lo) / (hi - lo) * (SOFT_TISSUE_HU - LUNG_HU) + LUNG_HU
    return np.clip(hu, -1024.0, 600.0), how


def semiseg_pairs(folder: Path) -> list[tuple[Path, Path]]:
    folder = Path(folder)
    pairs = []
    for img in sorted((folder / "Imgs").iterdir()):
        if img.suffix.lower() not in (".jpg", ".jpeg", ".png"):
            continue
        for ext in (".png", ".jpg", ".jpeg"):
            gt = folder / "GT" / (img.stem + ext)
            if gt.exists():
                pairs.append((img, gt))
                break
    return pairs
