"""A small 3D U-Net lesion scorer behind the same interface as the classical one.

The lung mask (and its left/right split) comes from the classical method; the network
only decides which lung voxels are lesion. It works on the classical working grid
(rows/cols pooled to ~1.4 mm), input HU clipped to [-1024, 300] and scaled, and is
run on z-slabs so memory stays bounded on a CPU.

Weights are a file written by :func:`train_unet` (``ct-triage train DATA_DIR``) and
named by ``CT_TRIAGE_UNET_WEIGHTS``; nothing is ever downloaded. A missing or foreign
file is a ``ConfigError`` that names the path.

Training data: a MosMedData-layout folder (``studies/CT-k/study_XXXX.nii.gz`` and
``masks/study_XXXX_mask.nii.gz``). Studies with a mask are used with it; CT-0 studies
without a mask are used as all-negative examples (no lesion, by definition); other
studies without a mask are skipped (their lesion extent is unknown).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ct_triage.errors import ConfigError, InvalidInput
from worker.scoring.device import configure_torch
from worker.scoring.scorer import Segmentation
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


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv3d(cin, cout, 3, padding=1, bias=False),
            nn.GroupNorm(min(4, cout), cout),
            nn.LeakyReLU(0.1, inplace=True),
            nn.Conv3d(cout, cout, 3, padding=1, bias=False),
            nn.GroupNorm(min(4, cout), cout),
            nn.LeakyReLU(0.1, inplace=True),
        )

    def forward(self, x):
        return self.net(x)


class UNet3D(nn.Module):
    """Three levels, ``base`` channels doubling; pooling in-plane and along z."""

    def __init__(self, base: int = 8, levels: int = 3):
        super().__init__()
        self.base, self.levels = base, levels
        chans = [base * 2 ** i for i in range(levels)]
        self.down = nn.ModuleList()
        cin = 1
        for c in chans:
            self.down.append(_Block(cin, c))
            cin = c
        self.up = nn.ModuleList()
        self.fuse = nn.ModuleList()
        for i in range(levels - 1, 0, -1):
            self.up.append(nn.ConvTranspose3d(chans[i], chans[i - 1], 2, stride=2))
            self.fuse.append(_Block(chans[i - 1] * 2, chans[i - 1]))
        self.head = nn.Conv3d(chans[0], 1, 1)

    @property
    def multiple(self) -> int:
        return 2 ** (self.levels - 1)

    def forward(self, x):
        skips = []
        for i, block in enumerate(self.down):
            x = block(x)
            if i < self.levels - 1:
                skips.append(x)
                x = F.max_pool3d(x, 2)
        for up, fuse in zip(self.up, self.fuse):
            x = up(x)
            x = fuse(torch.cat([x, skips.pop()], dim=1))
        return self.head(x)

    def config(self) -> dict:
        return {"base": self.base, "levels": self.levels}


def _pad_to(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
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
    except Exception as exc:  # noqa: BLE001 - any unreadable file
        raise ConfigError(f"U-Net weights file {path} cannot be read: {type(exc).__name__}: {exc}") from exc
    if not isinstance(blob, dict) or blob.get("format") != FORMAT or "state_dict" not in blob:
        raise ConfigError(f"U-Net weights file {path} is not a {FORMAT} weights file")
    config = dict(blob.get("config") or {})
    try:
        model = UNet3D(**config)
        model.load_state_dict(blob["state_dict"])
    except Exception as exc:  # noqa: BLE001
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
        self._models: dict[str, UNet3D] = {"cpu": self.model}

    def _model_on(self, device: str) -> UNet3D:
        if device not in self._models:
            model = UNet3D(**self.model.config())
            model.load_state_dict(self.model.state_dict())
            self._models[device] = model.to(torch.device(device)).eval()
        return self._models[device]

    def segment(self, volume: Volume, device: str = "cpu") -> Segmentation:
        from worker.scoring.classical import ClassicalScorer, to_working_grid

        t = time.perf_counter()
        base = ClassicalScorer().segment(volume, device)
        timings = {f"classical.{k}": v for k, v in base.timings.items()}
        t1 = time.perf_counter()
        dev = torch.device(device)
        with torch.inference_mode():
            W = to_working_grid(volume.hu, base.factor, dev)
            prob = predict(self._model_on(device), W, base.lung)
        lesion = (prob >= self.threshold) & base.lung
        timings["unet"] = time.perf_counter() - t1
        timings["total"] = time.perf_counter() - t
        return Segmentation(lung=base.lung, left=base.left, lesion=lesion, factor=base.factor,
                            original_shape=base.original_shape, spacing_mm=base.spacing_mm,
                            timings=timings, notes=base.notes)


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
        x, (nz, nr, nc) = _pad_to(normalise(slab)[None, None], model.multiple)
        logits = model(x)[0, 0, :nz, :nr, :nc]
        acc[s0:s0 + nz] += torch.sigmoid(logits)
        weight[s0:s0 + nz] += 1
    out[box] = (acc / weight.clamp(min=1)).cpu().numpy()
    return out


# -- training -------------------------------------------------------------------------------


def _training_items(data_dir: Path) -> list[tuple[Path, Path | None]]:
    from worker.scoring.evaluate import mosmed_studies

    items = []
    for study in mosmed_studies(Path(data_dir)):
        if study.mask is not None:
            items.append((study.path, study.mask))
        elif study.category == 0:
            items.append((study.path, None))  # CT-0: no lesion by definition
    return items


def _prepare(study: Path, mask: Path | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(working-grid HU, lesion target, lung mask) of one study."""
    from worker.scoring.classical import ClassicalScorer, to_working_grid
    from worker.scoring.load import load_nifti, nifti_array_zrc

    volume = load_nifti(study)
    base = ClassicalScorer().segment(volume, "cpu")
    W = to_working_grid(volume.hu, base.factor, torch.device("cpu")).numpy()
    if mask is None:
        target = np.zeros(W.shape, dtype=np.float32)
    else:
        m, _ = nifti_array_zrc(mask)
        if m.shape != volume.hu.shape:
            raise InvalidInput(f"{mask}: shape {m.shape} does not match {study.name} {volume.hu.shape}")
        t = torch.from_numpy((m > 0).astype(np.float32))[None, None]
        fz, fy, fx = base.factor
        t = F.pad(t, (0, (-t.shape[-1]) % fx, 0, (-t.shape[-2]) % fy, 0, (-t.shape[-3]) % fz))
        target = F.avg_pool3d(t, kernel_size=base.factor)[0, 0].numpy()
    return W.astype(np.float32), target.astype(np.float32), base.lung


def train_unet(data_dir: Path, out_path: Path, *, steps: int = 200, patch=(16, 64, 64),
               batch: int = 2, lr: float = 2e-3, base: int = 8, seed: int = 0,
               device: str = "cpu", progress: Callable[[int, int, dict], None] | None = None) -> dict:
    """Train on a MosMedData-layout folder and write the weights file; returns a summary."""
    configure_torch()
    items = _training_items(Path(data_dir))
    if not items:
        raise InvalidInput(
            f"{data_dir}: no training studies (need studies/CT-k/study_XXXX.nii.gz with "
            "masks/study_XXXX_mask.nii.gz, or CT-0 studies)"
        )
    t0 = time.perf_counter()
    data = []
    for i, (study, mask) in enumerate(items):
        if progress:
            progress(0, steps, {"stage": "loading", "study": study.name, "index": i, "of": len(items)})
        data.append(_prepare(study, mask))
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    dev = torch.device(device)
    model = UNet3D(base=base).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    pz, pr, pc = patch
    mult = model.multiple
    history = []
    model.train()
    for step in range(1, steps + 1):
        xs, ys = [], []
        for _ in range(batch):
            W, target, lung = data[int(rng.integers(len(data)))]
            z, r, c = W.shape
            dz, dr, dc = min(pz, z), min(pr, r), min(pc, c)
            dz, dr, dc = (max(mult, d - d % mult) for d in (dz, dr, dc))
            # half the patches centred on lesion when there is any
            pos = np.argwhere(target > 0.5) if rng.random() < 0.5 else None
            if pos is not None and len(pos):
                cz, cr, cc = pos[int(rng.integers(len(pos)))]
            else:
                cz, cr, cc = (int(rng.integers(n)) for n in (z, r, c))
            z0 = int(np.clip(cz - dz // 2, 0, max(0, z - dz)))
            r0 = int(np.clip(cr - dr // 2, 0, max(0, r - dr)))
            c0 = int(np.clip(cc - dc // 2, 0, max(0, c - dc)))
            xw = torch.from_numpy(W[z0:z0 + dz, r0:r0 + dr, c0:c0 + dc])
            yw = torch.from_numpy(target[z0:z0 + dz, r0:r0 + dr, c0:c0 + dc])
            xw, _ = _pad_to(xw[None], mult)
            yw, _ = _pad_to(yw[None], mult)
            xs.append(normalise(xw))
            ys.append(yw)
        # patches of different studies may differ in size: crop to the common minimum
        shape = [min(x.shape[i] for x in xs) for i in range(1, 4)]
        x = torch.stack([v[:, :shape[0], :shape[1], :shape[2]] for v in xs]).to(dev)
        y = torch.stack([v[:, :shape[0], :shape[1], :shape[2]] for v in ys]).to(dev)
        logits = model(x)
        prob = torch.sigmoid(logits)
        bce = F.binary_cross_entropy_with_logits(logits, y)
        inter = (prob * y).sum()
        soft_dice = 1 - (2 * inter + 1) / (prob.sum() + y.sum() + 1)
        loss = bce + soft_dice
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        entry = {"step": step, "loss": loss.item(), "bce": bce.item(), "dice_loss": soft_dice.item()}
        history.append(entry)
        if progress:
            progress(step, steps, dict(entry, stage="training"))
    model.eval()
    summary = {"studies": len(items), "steps": steps, "seconds": round(time.perf_counter() - t0, 2),
               "final_loss": history[-1]["loss"] if history else None, "data_dir": str(data_dir),
               "patch": list(patch), "batch": batch, "lr": lr, "seed": seed}
    save_weights(model.cpu(), Path(out_path), meta=summary)
    summary["weights"] = str(out_path)
    return summary
