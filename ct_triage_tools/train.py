"""Training of the 3D U-Net lesion scorer (:mod:`worker.scoring.unet`): ``ct-triage train``.

Training data: a MosMedData-layout folder (``studies/CT-k/study_XXXX.nii.gz`` and
``masks/study_XXXX_mask.nii.gz``, read by :mod:`ct_triage_tools.datasets`). Studies with
a mask are used with it; CT-0 studies without a mask are used as all-negative examples
(no lesion, by definition); other studies without a mask are skipped (their lesion
extent is unknown).

Patches of (16, 64, 64) working voxels by default, half of them centred on lesion when
the study has any; loss = binary cross-entropy + soft Dice; Adam. The weights file is
written by :func:`worker.scoring.unet.save_weights` with the summary as its metadata.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ct_triage.errors import InvalidInput
from ct_triage_tools.datasets import mosmed_studies
from worker.scoring.classical import ClassicalScorer, to_working_grid
from worker.scoring.device import configure_torch
from worker.scoring.load import load_nifti, nifti_array_zrc
from worker.scoring.unet import UNet3D, normalise, pad_to, save_weights


def _training_items(data_dir: Path) -> list[tuple[Path, Path | None]]:
    items: list[tuple[Path, Path | None]] = []
    for study in mosmed_studies(Path(data_dir)):
        if study.mask is not None:
            items.append((study.path, study.mask))
        elif study.category == 0:
            items.append((study.path, None))  # CT-0: no lesion by definition
    return items


def _prepare(study: Path, mask: Path | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(working-grid HU, lesion target, lung mask) of one study."""
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
            xw, _ = pad_to(xw[None], mult)
            yw, _ = pad_to(yw[None], mult)
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
