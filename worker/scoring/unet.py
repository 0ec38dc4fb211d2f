"""A small 3D U-Net lesion scorer behind the same interface as the classical one.

The lung mask (and its left/right split) comes from the classical method; the network
only decides which lung voxels are lesion. It works on the classical working grid
(rows/cols pooled to ~1.4 mm), input HU clipped to [-1024, 300] and scaled, and is
run on z-slabs so memory stays bounded on a CPU.

Weights are a file written by :func:`ct_triage_tools.train.train_unet` (``ct-triage train DATA_DIR``) and
named by ``CT_TRIAGE_UNET_WEIGHTS``; nothing is ever downloaded. A missing or foreign
file is a ``ConfigError`` that names the path.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ct_triage.errors import ConfigError
from worker.scoring.base import Segmentation
from worker.scoring.classical import lung_segmentation, to_working_grid
from worker.scoring.device import ModelCopies, configure_torch
from worker.scoring.unet_blocks import ConvBlock, unet_levels, unet_pass
from worker.scoring.volume import Volume

NAME = "ct-triage-unet3d"
VERSION = "0.1.0"
FORMAT = "ct-triage-unet3d"
HU_RANGE = (-1024.0, 300.0)
SLAB = 32  # working slices per inference slab
OVERLAP = 8


def normalise(hu: torch.Tensor) -> torch.Tensor:
    lo, hi = HU_RANGE
    return (hu.clamp(lo, hi) - (lo + hi) / 2) / ((hi - lo) / 2)


def _block(cin: int, cout: int) -> ConvBlock:
    return ConvBlock(cin, cout, 3, norm=lambda c: nn.GroupNorm(min(4, c), c),
                     activation=lambda: nn.LeakyReLU(0.1, inplace=True))


class UNet3D(nn.Module):
    """Three levels, ``base`` channels doubling; pooling in-plane and along z."""

    def __init__(self, base: int = 8, levels: int = 3):
        super().__init__()
        self.base, self.levels = base, levels
        chans = [base * 2 ** i for i in range(levels)]
        self.down, self.up, self.fuse = unet_levels(1, chans, 3, _block)
        self.head = nn.Conv3d(chans[0], 1, 1)

    @property
    def multiple(self) -> int:
        return 2 ** (self.levels - 1)

    def forward(self, x):
        return self.head(unet_pass(x, self.down, self.up, self.fuse, 3))

    def config(self) -> dict:
        return {"base": self.base, "levels": self.levels}


def pad_to(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    z, r, c = x.shape[-3:]
    pads = [(-z) % multiple, (-r) % multiple, (-c) % multiple]
    x = F.pad(x, (0, pads[2], 0, pads[1], 0, pads[0]), mode="replicate") if any(pads) else x
    return x, (z, r, c)


def load_weights(path: Path) -> tuple[UNet3D, dict]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"U-Net weights file {path} does not exist (write one with `ct-triage train`)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file
        raise ConfigError(f"U-Net weights file {path} cannot be read: {type(exc).__name__}: {exc}") from exc
    if not isinstance(blob, dict) or blob.get("format") != FORMAT or "state_dict" not in blob:
        raise ConfigError(f"U-Net weights file {path} is not a {FORMAT} weights file")
    config = dict(blob.get("config") or {})
    try:
        model = UNet3D(**config)
        model.load_state_dict(blob["state_dict"])
    except Exception as exc:  # any mismatch becomes a ConfigError naming the file
        raise ConfigError(f"U-Net weights file {path} does not fit the network: {exc}") from exc
    model.eval()
    return model, blob


def save_weights(model: UNet3D, path: Path, meta: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {"format": FORMAT, "version": VERSION, "config": model.config(),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "meta": meta or {}}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(blob, tmp)
    tmp.replace(path)
    return path


class UNetScorer:
    name = NAME
    version = VERSION

    def __init__(self, weights_path: Path, threshold: float = 0.5):
        configure_torch()
        self.weights_path = Path(weights_path)
        self.model, blob = load_weights(self.weights_path)
        self.threshold = threshold
        self.meta = blob.get("meta", {})
        self._copies = ModelCopies(self.model)

    def segment(self, volume: Volume, device: str = "cpu") -> Segmentation:
        t = time.perf_counter()
        base, timings = lung_segmentation(volume, device)
        t1 = time.perf_counter()
        dev = torch.device(device)
        with torch.inference_mode():
            W = to_working_grid(volume.hu, base.factor, dev)
            prob = predict(self._copies.on(device), W, base.lung)
        lesion = (prob >= self.threshold) & base.lung
        timings["unet"] = time.perf_counter() - t1
        timings["total"] = time.perf_counter() - t
        return dataclasses.replace(base, lesion=lesion, timings=timings)


def predict(model: UNet3D, W: torch.Tensor, lung: np.ndarray | None = None) -> np.ndarray:
    """Lesion probability on the working grid, slab by slab (inside the lungs' box)."""
    device = W.device
    z, r, c = W.shape
    out = np.zeros((z, r, c), dtype=np.float32)
    if lung is not None and lung.any():
        idx = [np.flatnonzero(lung.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
        box = tuple(slice(max(0, int(i[0]) - 2), min(n, int(i[-1]) + 3)) for i, n in zip(idx, (z, r, c)))
    else:
        box = (slice(0, z), slice(0, r), slice(0, c))
    sub = W[box]
    zs = sub.shape[0]
    acc = torch.zeros(sub.shape, dtype=torch.float32, device=device)
    weight = torch.zeros(sub.shape, dtype=torch.float32, device=device)
    step = max(1, SLAB - OVERLAP)
    starts = list(range(0, max(1, zs - SLAB + 1), step))
    if starts[-1] + SLAB < zs:
        starts.append(zs - SLAB)
    for s0 in starts:
        slab = sub[s0:s0 + SLAB]
        x, (nz, nr, nc) = pad_to(normalise(slab)[None, None], model.multiple)
        logits = model(x)[0, 0, :nz, :nr, :nc]
        acc[s0:s0 + nz] += torch.sigmoid(logits)
        weight[s0:s0 + nz] += 1
    out[box] = (acc / weight.clamp(min=1)).cpu().numpy()
    return out
