"""Train the 2D lesion network (``worker.scoring.lesion_net``) on COVID-SemiSeg.

Data (``../shared/data/covid-semiseg-2d``; non-commercial research use only, see the
model card): ``train/`` 50 radiologist-drawn slices, ``val/`` 24 radiologist-drawn
slices (the yardstick, never trained on), ``train-pseudo/`` 1600 consecutive slices of
20 volumes with Semi-Inf-Net pseudo labels (masks thresholded at 128). The pseudo set
is split by volume (the file name before the last ``_N``): the volumes in
``HOLDOUT_VOLUMES`` (255 slices, 4 of 20 volumes, both sources) are never trained on;
they choose the probability threshold and report a second Dice.

Recipe (fixed seed, CPU, deterministic order)
    * every image re-windowed to the network's HU window (``network_gray``: the
      coronacases.org images from their fitted window into MedSeg's, see
      ``SOURCE_WINDOWS_HU``) and resized to the network's square input (128 px) once;
      masks by area;
    * each epoch: ``pseudo_per_epoch`` (600) training pseudo slices drawn without
      replacement and the 50 radiologist slices ``RADIOLOGIST_REPEAT`` (4) times (their
      labels are the better ones), shuffled; 20 epochs (about 15 s each on this 2-core
      CPU); ``init`` starts from a weights file instead (fine-tuning, as stage 2 does);
    * augmentation, per sample, for what scanners and the source images vary in:
      orientation (any of the 8 rotations/flips: the source crops come in several),
      rotation +-15 deg, scale 0.8-1.25 and aspect +-10 % (FOV, pixel size), shift +-8 %,
      gray window (slope x0.65-1.55 about a random pivot, offset +-15 gray levels),
      kernel (Gaussian blur sigma up to 1.2 px or unsharp-mask sharpening up to 1.0),
      noise (sigma up to 0.03 of the gray range);
    * loss: binary cross-entropy + soft Dice per image; AdamW (lr 3e-3, weight decay
      1e-4), one warm-up epoch then cosine decay over ``epochs``; batch 16;
    * after each epoch: Dice on every 4th slice of the held-out pseudo volumes for
      thresholds 0.3..0.7 (the best one is the threshold), mean per-image Dice on
      ``val/`` at that threshold, with test-time left-right flip; the epoch with the best
      ``val/`` Dice is kept (so ``val/`` selects the epoch: the reported figure is
      slightly optimistic, the held-out pseudo Dice is the unbiased companion);
      ``ema`` (off by default) validates and keeps a moving average of the weights;
    * stage 2, fine-tuning (``train_staged``; the Semi-Inf-Net order: pseudo labels
      first, then the radiologist labels weigh more): starts from stage 1's kept epoch
      (exported as float16, the file stage 1 alone would ship) with a fresh optimiser;
      ``finetune_epochs`` (16) epochs of ``finetune_pseudo_per_epoch`` (400) pseudo
      slices + the radiologist slices ``finetune_radiologist_repeat`` (6) times (300 of
      700 samples instead of 200 of 800), lr 1e-3 (one warm-up epoch, cosine), the same
      augmentation, the same per-epoch validation and selection. Measured on this CPU
      (model card): stage 1 kept epoch 18 (val 0.675), stage 2 kept epoch 10 (val 0.696,
      held-out 0.666 on all 255 slices, float16). Tried: base 32 with a weight average
      (val 0.691), a wider gray-window augmentation (earlier frame; val 0.666-0.684).

``fit_window`` measures the tissue peaks that fix the HU-to-gray window (printed with
``--fit-window``; see ``worker/scoring/lesion_net.py``).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
import torch.nn.functional as F

from ct_triage_tools.datasets import network_gray, source_of
from worker.scoring.lesion_net import LesionNet, predict_images, save_weights

if TYPE_CHECKING:
    from torch.optim.swa_utils import AveragedModel

HOLDOUT_VOLUMES = (
    "Data-1_coronacases_org_003",
    "Data-1_coronacases_org_006",
    "Data-1_radiopaedia_org_covid-19-pneumonia-14_85914_0-dcm",
    "Data-1_radiopaedia_org_covid-19-pneumonia-40_86625_0-dcm",
)
RADIOLOGIST_REPEAT = 4

THRESHOLDS = (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7)


@dataclass
class Sample:
    name: str
    group: str  # "train", "val", "pseudo", "holdout"
    volume: str
    img: Path
    gt: Path


@dataclass
class Recipe:
    epochs: int = 20
    pseudo_per_epoch: int = 600  # training pseudo slices drawn (without replacement) per epoch
    stop_after: int | None = None  # stop after this many epochs (schedule still planned for `epochs`)
    batch: int = 16
    lr: float = 3e-3
    weight_decay: float = 1e-4
    base: int = 16
    levels: int = 4
    size: int = 128
    seed: int = 0
    threads: int = 2
    limit: int | None = None  # use only this many training slices (tiny runs, tests)
    radiologist_repeat: int = RADIOLOGIST_REPEAT  # times each radiologist slice is drawn per epoch
    window_slope: tuple[float, float] = (0.65, 1.55)  # gray window slope range of the augmentation
    init: str | None = None  # start from this weights file (fine-tuning) instead of a random init
    ema: float = 0.0  # validate and keep an exponential moving average of the weights (decay per step); 0 = off
    # stage 2 (fine-tuning, see ``train_staged``); 0 epochs = one stage only
    finetune_epochs: int = 16
    finetune_lr: float = 1e-3
    finetune_pseudo_per_epoch: int = 400
    finetune_radiologist_repeat: int = 6
    finetune_window_slope: tuple[float, float] = (0.65, 1.55)
    extras: dict = field(default_factory=dict)


def volume_of(stem: str) -> str:
    return stem.rsplit("_", 1)[0]




def _pairs(folder: Path) -> list[tuple[Path, Path]]:
    out: list[tuple[Path, Path]] = []
    imgs = folder / "Imgs"
    if not imgs.is_dir():
        return out
    for img in sorted(imgs.iterdir()):
        if img.suffix.lower() not in (".jpg", ".jpeg", ".png"):
            continue
        gt = folder / "GT" / (img.stem + ".png")
        if gt.is_file():
            out.append((img, gt))
    return out


def list_samples(root: Path) -> list[Sample]:
    """All labelled slices under a covid-semiseg-2d folder, tagged by use."""
    root = Path(root)
    out: list[Sample] = []
    for img, gt in _pairs(root / "train"):
        out.append(Sample(img.stem, "train", "medseg-train", img, gt))
    for img, gt in _pairs(root / "val"):
        out.append(Sample(img.stem, "val", "medseg-val", img, gt))
    for img, gt in _pairs(root / "train-pseudo"):
        vol = volume_of(img.stem)
        out.append(Sample(img.stem, "holdout" if vol in HOLDOUT_VOLUMES else "pseudo", vol, img, gt))
    return out


def read_gray(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("L"))


def read_mask(path: Path) -> np.ndarray:
    return read_gray(path) >= 128


def network_image(sample: Sample) -> np.ndarray:
    """A sample's image as the network sees it: re-windowed from its source's window (float 0..255)."""
    return network_gray(read_gray(sample.img), source_of(sample.name))


def _resized(arr: np.ndarray, size: int) -> torch.Tensor:
    t = torch.from_numpy(arr.astype(np.float32))[None, None]
    return F.interpolate(t, size=(size, size), mode="area")[0, 0]


def load_training_arrays(samples: list[Sample], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images and masks (N, size, size); masks hold the area fraction x 255."""
    imgs = torch.empty((len(samples), size, size), dtype=torch.uint8)
    masks = torch.empty((len(samples), size, size), dtype=torch.uint8)
    for i, s in enumerate(samples):
        imgs[i] = _resized(network_image(s), size).round().clamp(0, 255).to(torch.uint8)
        masks[i] = (_resized(read_mask(s.gt).astype(np.float32), size) * 255).round().to(torch.uint8)
    return imgs, masks


# -- augmentation -------------------------------------------------------------------------


def _gauss_kernels(sigmas: torch.Tensor, radius: int = 3) -> torch.Tensor:
    r = torch.arange(-radius, radius + 1, dtype=torch.float32)
    s = sigmas.clamp(min=1e-3)[:, None]
    g = torch.exp(-(r[None] ** 2) / (2 * s ** 2))
    g = g / g.sum(1, keepdim=True)
    return g[:, :, None] * g[:, None, :]  # (N, k, k)


def augment(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator,
            window_slope: tuple[float, float] = (0.65, 1.55)) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment a batch: x gray/255 (N,1,S,S), y lesion fraction (N,1,S,S); see the module docstring."""
    n, _, s, _ = x.shape

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(shape or (n,), generator=gen)

    # orientation: 8 dihedral variants
    k = torch.randint(0, 4, (n,), generator=gen)
    fl = torch.rand(n, generator=gen) < 0.5
    xs, ys = [], []
    for i in range(n):
        xi, yi = x[i], y[i]
        if fl[i]:
            xi, yi = xi.flip(-1), yi.flip(-1)
        xs.append(torch.rot90(xi, int(k[i]), (-2, -1)))
        ys.append(torch.rot90(yi, int(k[i]), (-2, -1)))
    x, y = torch.stack(xs), torch.stack(ys)
    # geometry: rotation, scale, aspect, shift
    ang = u(-15, 15) * math.pi / 180
    scale = torch.exp(u(math.log(0.8), math.log(1.25)))
    aspect = torch.exp(u(-0.1, 0.1))
    sx, sy = scale * aspect, scale / aspect
    tx, ty = u(-0.08, 0.08), u(-0.08, 0.08)
    cos, sin = torch.cos(ang), torch.sin(ang)
    theta = torch.stack([torch.stack([cos / sx, -sin / sx, tx], 1), torch.stack([sin / sy, cos / sy, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    y = F.grid_sample(y, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # gray window
    slope = torch.exp(u(math.log(window_slope[0]), math.log(window_slope[1])))[:, None, None, None]
    pivot = u(10 / 255, 80 / 255)[:, None, None, None]
    off = u(-15 / 255, 15 / 255)[:, None, None, None]
    x = ((x - pivot) * slope + pivot + off).clamp(0, 1)
    # kernel: blur or sharpen (or neither)
    mode = torch.rand(n, generator=gen)
    sig = u(0.4, 1.2)
    blurred = F.conv2d(x.reshape(1, n, s, s), _gauss_kernels(sig)[:, None], padding=3, groups=n).reshape(n, 1, s, s)
    amount = u(0.2, 1.0)[:, None, None, None]
    sharpened = (x + amount * (x - blurred)).clamp(0, 1)
    x = torch.where((mode < 0.3)[:, None, None, None], blurred,
                    torch.where((mode > 0.7)[:, None, None, None], sharpened, x))
    # noise
    noise_on = (torch.rand(n, generator=gen) < 0.5).float()[:, None, None, None]
    sigma = u(0.0, 0.03)[:, None, None, None]
    x = (x + noise_on * sigma * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    return x, y


# -- metrics --------------------------------------------------------------------------------


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty (perfect agreement, as ``ct-triage eval``)."""
    from ct_triage_tools.evaluate import dice as _dice

    d = _dice(pred, truth)
    return 1.0 if d is None else d


def probabilities(model: LesionNet, samples: list[Sample], *, flip: bool = True
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
    """(probability, truth) at each image's native size."""
    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(samples), 16):
            chunk = samples[i:i + 16]
            grays = [torch.from_numpy(network_image(s) / 255.0) for s in chunk]
            probs = predict_images(model, grays, flip=flip)
            for s, p in zip(chunk, probs):
                out.append((p.numpy(), read_mask(s.gt)))
    return out


def mean_dice(pairs: list[tuple[np.ndarray, np.ndarray]], threshold: float) -> tuple[float, list[float]]:
    ds = [dice(p >= threshold, t) for p, t in pairs]
    return (float(np.mean(ds)) if ds else float("nan")), ds


# -- training ---------------------------------------------------------------------------------


Log = Callable[[dict], None]


def train(data_root: Path, out_dir: Path, recipe: Recipe | None = None, *, log: Log | None = None,
          weights_out: Path | None = None) -> dict:
    """Train per ``recipe``; keeps ``out_dir/best.pt`` (best on val) and ``last.pt``.

    Returns a summary (epochs, Dice figures, threshold, CPU seconds). With
    ``weights_out`` the best checkpoint is also written there (with its ``.sha256``)."""
    recipe = recipe or Recipe()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(recipe.threads)
    random.seed(recipe.seed)
    np.random.seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)
    emit = log or (lambda entry: None)
    wall0, cpu0 = time.perf_counter(), time.process_time()

    train_s, val_s, hold_s = _split_samples(Path(data_root), recipe.limit)
    hold_eval = hold_s[::4]  # every fourth held-out slice: enough for the threshold, a quarter of the time
    imgs, masks = load_training_arrays(train_s, recipe.size)
    radiologist = np.array([i for i, s in enumerate(train_s) if s.group == "train"], dtype=np.int64)
    pseudo = np.array([i for i, s in enumerate(train_s) if s.group != "train"], dtype=np.int64)
    per_epoch = min(len(pseudo), recipe.pseudo_per_epoch)
    index = np.concatenate([np.repeat(radiologist, recipe.radiologist_repeat), np.zeros(per_epoch, dtype=np.int64)])
    emit({"stage": "data", "train": len(train_s), "train_radiologist": sum(s.group == "train" for s in train_s),
          "val": len(val_s), "holdout": len(hold_s), "holdout_volumes": sorted({s.volume for s in hold_s}),
          "epoch_samples": int(len(index)), "seconds": round(time.perf_counter() - wall0, 1)})

    model = LesionNet(base=recipe.base, levels=recipe.levels, size=recipe.size)
    if recipe.init:
        _load_init(model, Path(recipe.init))
        emit({"stage": "init", "from": str(recipe.init)})
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    # the weights validated and kept: the averaged copy when ``ema`` (steadier than the last step's)
    kept: LesionNet = model
    averaged: AveragedModel | None = None
    if recipe.ema:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(recipe.ema), use_buffers=True)
        kept = cast(LesionNet, averaged.module)  # a deep copy of the model
    steps_per_epoch = math.ceil(len(index) / recipe.batch)
    total = steps_per_epoch * recipe.epochs
    warm = steps_per_epoch

    def lr_at(step: int) -> float:
        if step < warm:
            return recipe.lr * (step + 1) / warm
        return recipe.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    rng = np.random.default_rng(recipe.seed)
    best: dict = {"val_dice": -1.0}
    history = []
    step = 0
    last_epoch = recipe.epochs if recipe.stop_after is None else min(recipe.epochs, recipe.stop_after)
    for epoch in range(1, last_epoch + 1):
        model.train()
        drawn = rng.choice(pseudo, size=per_epoch, replace=False) if per_epoch else pseudo[:0]
        order = rng.permutation(np.concatenate([np.repeat(radiologist, recipe.radiologist_repeat), drawn]))
        t_ep = time.perf_counter()
        losses: list[float] = []
        for b in range(0, len(order), recipe.batch):
            ids = torch.from_numpy(order[b:b + recipe.batch].astype(np.int64))
            if len(ids) < 2:
                continue  # batch norm needs two
            x = imgs[ids].float()[:, None] / 255.0
            y = masks[ids].float()[:, None] / 255.0
            x, y = augment(x, y, gen, recipe.window_slope)
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            loss = _bce_soft_dice(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if averaged is not None:
                averaged.update_parameters(model)
            losses.append(float(loss.detach()))
            step += 1
        train_seconds = time.perf_counter() - t_ep
        # validation
        t_val = time.perf_counter()
        thr, per_thr = _holdout_threshold(kept, hold_eval)
        val_pairs = probabilities(kept, val_s)
        val_d, val_each = mean_dice(val_pairs, thr)
        val_05, _ = mean_dice(val_pairs, 0.5)
        entry = {"stage": "epoch", "epoch": epoch, "loss": round(float(np.mean(losses)), 4),
                 "lr": round(lr_at(step - 1), 6), "threshold": thr, "val_dice": round(val_d, 4),
                 "val_dice_at_0.5": round(val_05, 4),
                 "holdout_dice": round(per_thr.get(thr, float("nan")), 4),
                 "train_seconds": round(train_seconds, 1), "val_seconds": round(time.perf_counter() - t_val, 1),
                 "cpu_seconds_so_far": round(time.process_time() - cpu0, 1)}
        history.append(entry)
        meta = {"epoch": epoch, "threshold": thr, "val_dice": round(val_d, 4),
                "val_dice_per_image": [round(d, 4) for d in val_each],
                "holdout_dice": entry["holdout_dice"], "holdout_volumes": list(HOLDOUT_VOLUMES),
                "recipe": {k: v for k, v in recipe.__dict__.items() if k != "extras"}}
        save_weights(kept, out_dir / "last.pt", meta, half=False)
        if val_d > best["val_dice"]:
            best = dict(meta)
            save_weights(kept, out_dir / "best.pt", meta, half=False)
            entry["best"] = True
        emit(entry)
    summary = {"epochs_run": len(history), "best_epoch": best.get("epoch"), "val_dice": best.get("val_dice"),
               "holdout_dice": best.get("holdout_dice"), "threshold": best.get("threshold"),
               "wall_seconds": round(time.perf_counter() - wall0, 1),
               "cpu_seconds": round(time.process_time() - cpu0, 1), "history": history,
               "best_checkpoint": str(out_dir / "best.pt")}
    if weights_out is not None and best.get("epoch") is not None:
        exported = export_weights(out_dir / "best.pt", Path(weights_out), Path(data_root),
                                  extra={"training_cpu_seconds": summary["cpu_seconds"],
                                         "training_wall_seconds": summary["wall_seconds"]})
        summary.update({k: exported[k] for k in ("sha256", "val_dice", "holdout_dice")})
        summary["weights"] = str(weights_out)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _split_samples(data_root: Path, limit: int | None) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """(train with pseudo-labelled, val, held-out) samples; ``limit`` thins train and held-out evenly."""
    samples = list_samples(data_root)
    train_s = [s for s in samples if s.group in ("train", "pseudo")]
    val_s = [s for s in samples if s.group == "val"]
    hold_s = [s for s in samples if s.group == "holdout"]
    if not train_s or not val_s:
        raise ValueError(f"{data_root}: need train/ (or train-pseudo/) and val/ with Imgs/ and GT/")
    if limit is not None:
        train_s = train_s[:: max(1, len(train_s) // limit)][: limit]
        hold_s = hold_s[:: max(1, len(hold_s) // max(1, limit // 2))][: max(1, limit // 2)]
    return train_s, val_s, hold_s


def _load_init(model: LesionNet, init: Path) -> None:
    """Start ``model`` from the weights in ``init`` (the same network configuration, else ValueError)."""
    from worker.scoring.lesion_net import load_weights

    start, _ = load_weights(init, verify=False)
    if start.config() != model.config():
        raise ValueError(f"{init}: network {start.config()} is not the recipe's {model.config()}")
    model.load_state_dict(start.state_dict())


def _bce_soft_dice(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Training loss: binary cross-entropy plus the batch mean of the per-image soft Dice loss."""
    prob = torch.sigmoid(logits)
    bce = F.binary_cross_entropy_with_logits(logits, y)
    inter = (prob * y).sum((1, 2, 3))
    soft = 1 - (2 * inter + 1) / (prob.sum((1, 2, 3)) + y.sum((1, 2, 3)) + 1)
    return bce + soft.mean()


def _holdout_threshold(model: LesionNet, hold_eval: list[Sample]) -> tuple[float, dict[float, float]]:
    """The threshold of best held-out Dice (ties: nearest 0.5) and the Dice at each of THRESHOLDS.

    No held-out samples: 0.5 (its Dice NaN).
    """
    if not hold_eval:
        return 0.5, {0.5: float("nan")}
    hold_pairs = probabilities(model, hold_eval)
    if not hold_pairs:
        return 0.5, {0.5: float("nan")}
    per_thr = {thr: mean_dice(hold_pairs, thr)[0] for thr in THRESHOLDS}
    return max(per_thr, key=lambda k: (per_thr[k], -abs(k - 0.5))), per_thr


def finetune_recipe(recipe: Recipe, init: Path) -> Recipe:
    """Stage 2 of ``recipe``: its fine-tuning values, starting from ``init``."""
    return replace(recipe, epochs=recipe.finetune_epochs, stop_after=None, lr=recipe.finetune_lr,
                   pseudo_per_epoch=recipe.finetune_pseudo_per_epoch,
                   radiologist_repeat=recipe.finetune_radiologist_repeat,
                   window_slope=recipe.finetune_window_slope, init=str(init), finetune_epochs=0)


def train_staged(data_root: Path, out_dir: Path, recipe: Recipe | None = None, *, log: Log | None = None,
                 weights_out: Path | None = None) -> dict:
    """``train`` in up to two stages (the Semi-Inf-Net order: pseudo labels first, then the
    radiologist slices weigh more). Stage 1 is ``recipe`` (``out_dir/stage1``); its best
    checkpoint is exported as a float16 weights file, which stage 2 (``finetune_recipe``,
    ``out_dir/stage2``) starts from. Without ``finetune_epochs`` (or with ``init``) it is
    ``train`` itself. The summary is stage 2's, with the CPU and wall time of both."""
    recipe = recipe or Recipe()
    if not recipe.finetune_epochs or recipe.init:
        return train(data_root, out_dir, recipe, log=log, weights_out=weights_out)
    emit = log or (lambda entry: None)
    out_dir = Path(out_dir)
    first_w = out_dir / "stage1" / "lesion_net.pt"
    emit({"stage": "stage", "stage_number": 1, "epochs": recipe.epochs})
    first = train(data_root, out_dir / "stage1", recipe, log=log, weights_out=first_w)
    emit({"stage": "stage", "stage_number": 2, "epochs": recipe.finetune_epochs, "init": str(first_w)})
    second = train(data_root, out_dir / "stage2", finetune_recipe(recipe, first_w), log=log, weights_out=weights_out)
    second["stage1"] = {k: v for k, v in first.items() if k != "history"}
    for k in ("cpu_seconds", "wall_seconds"):
        second[k] = round(first[k] + second[k], 1)
    (out_dir / "summary.json").write_text(json.dumps(second, indent=1))
    return second


def export_weights(checkpoint: Path, out: Path, data_root: Path, extra: dict | None = None) -> dict:
    """Write a checkpoint as the shipped file: float16 tensors, the current HU window, and
    the val / held-out Dice measured again with the float16 weights; returns the meta."""
    from worker.scoring.lesion_net import FORMAT, LesionNet, load_weights

    blob = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{checkpoint} is not a {FORMAT} checkpoint")
    model = LesionNet(**blob["config"])
    model.load_state_dict(blob["state_dict"])
    meta = dict(blob.get("meta") or {})
    meta.update(extra or {})
    tmp = Path(out).with_name(Path(out).name + ".unverified")
    save_weights(model.eval(), tmp, meta, half=True)
    half_model, _ = load_weights(tmp)
    samples = list_samples(Path(data_root))
    thr = float(meta.get("threshold", 0.5))
    val_d, val_each = mean_dice(probabilities(half_model, [s for s in samples if s.group == "val"]), thr)
    hold_d, _ = mean_dice(probabilities(half_model, [s for s in samples if s.group == "holdout"]), thr)
    meta.update({"val_dice": round(val_d, 4), "val_dice_per_image": [round(d, 4) for d in val_each],
                 "holdout_dice": round(hold_d, 4), "holdout_slices": "all"})
    digest = save_weights(half_model, Path(out), meta, half=True)
    for p in (tmp, tmp.with_name(tmp.name + ".sha256")):
        p.unlink(missing_ok=True)
    meta["sha256"] = digest
    return meta


# -- HU -> gray window ----------------------------------------------------------------------


HU_PEAK_RANGES = {"air": (-1100.0, -900.0), "lung": (-990.0, -600.0), "soft": (0.0, 100.0)}


def _hu_peaks(files: list[Path]) -> dict[str, float]:
    """Modes (5 HU bins) of outside air, lung parenchyma and soft tissue, pooled over slices.

    Per slice: body = largest component >= -500 HU with holes filled; air = outside the
    body (scanner padding excluded); lung = body pixels < -500 HU; soft tissue = body
    pixels in 0..100 HU."""
    import pydicom
    from scipy import ndimage

    edges = np.arange(-1100.0, 301.0, 5.0)
    hists = {k: np.zeros(len(edges) - 1) for k in HU_PEAK_RANGES}
    for f in files:
        ds = pydicom.dcmread(f)
        raw = ds.pixel_array
        hu = raw.astype(np.float32) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
        pad = ds.get("PixelPaddingValue")
        valid = (hu > -1100) if pad is None else (raw != pad) & (hu > -1100)
        lab, n = ndimage.label(hu >= -500)
        if n == 0:
            continue
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        body = ndimage.binary_fill_holes(lab == int(np.argmax(sizes)))
        body = ndimage.binary_erosion(body, iterations=3)
        parts = {"air": valid & ~ndimage.binary_dilation(body, iterations=6),
                 "lung": body & (hu < -500), "soft": body & (hu >= 0) & (hu <= 100)}
        for k, m in parts.items():
            if m.sum() > 100:
                h, _ = np.histogram(hu[m], bins=edges)
                hists[k] += h / m.sum()
    centres = edges[:-1] + 2.5
    out = {}
    for k, (lo, hi) in HU_PEAK_RANGES.items():
        sel = (centres >= lo) & (centres < hi)
        h = np.convolve(hists[k], np.ones(3) / 3, mode="same")
        out[k] = float(centres[sel][np.argmax(h[sel])])
    return out


def _gray_peaks(files: list[Path]) -> dict[str, float]:
    """Lung and soft-tissue modes of the mean gray histogram; air = median 0.5th percentile."""
    hist = np.zeros(256)
    lows = []
    for f in files:
        g = read_gray(f)
        hist += np.bincount(g.ravel(), minlength=256) / g.size
        lows.append(np.percentile(g, 0.5))
    hist = np.convolve(hist, np.ones(5) / 5, mode="same")
    lung = int(np.argmax(hist[:128]))
    soft = lung + 40 + int(np.argmax(hist[lung + 40:]))
    return {"air": float(np.median(lows)), "lung": float(lung), "soft": float(soft)}


def fit_window(data_root: Path, ct_root: Path | None = None) -> dict:
    """Tissue peaks on both sides and the least-squares window; see lesion_net's docstring.

    HU side: the 20 axial COVID-19-NY-SBU slices and the middle 20 slices of each
    Lung-PET-CT-Dx series under ``ct_root`` (default: beside ``data_root``). Gray side:
    every image of the COVID-SemiSeg folders, pooled (each image weighs the same)."""
    data_root = Path(data_root)
    ct_root = Path(ct_root) if ct_root else data_root.parent
    ct_files = sorted((ct_root / "covid-19-ny-sbu-slices").glob("*axial*.dcm"))
    for d in sorted((ct_root / "lung-pet-ct-dx").glob("*")):
        fs = sorted(p for p in d.iterdir() if p.is_file())
        ct_files += fs[max(0, len(fs) // 2 - 10): len(fs) // 2 + 10]
    hu = _hu_peaks(ct_files)
    imgs = [s.img for s in list_samples(data_root)]
    gray = _gray_peaks(imgs)
    by_source = {}
    for src in ("coronacases", "radiopaedia"):
        by_source[src] = _gray_peaks([p for p in imgs if src in p.name])
    by_source["medseg"] = _gray_peaks([p for p in imgs if "Data-1" not in p.name])
    x = np.array([hu[k] for k in ("air", "lung", "soft")])
    y = np.array([gray[k] for k in ("air", "lung", "soft")])
    slope, intercept = np.polyfit(x, y, 1)
    low = -intercept / slope
    high = (255.0 - intercept) / slope
    return {"hu_peaks": hu, "gray_peaks": gray, "gray_peaks_by_source": by_source,
            "window_hu_by_source": {src: _source_window(hu, peaks) for src, peaks in by_source.items()
                                    if src != "radiopaedia"},
            "ct_files": len(ct_files), "images": len(imgs), "slope_gray_per_hu": float(slope),
            "window_hu": [round(float(low)), round(float(high))]}


def _source_window(hu: dict[str, float], gray: dict[str, float]) -> list[int]:
    """Least-squares window of one source over its unsaturated peaks (gray < 250)."""
    keys = [k for k in ("air", "lung", "soft") if gray[k] < 250]
    slope, intercept = np.polyfit([hu[k] for k in keys], [gray[k] for k in keys], 1)
    return [round(float(-intercept / slope)), round(float((255.0 - intercept) / slope))]


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("CT_TRIAGE_SEMISEG", "../shared/data/covid-semiseg-2d"))
    ap.add_argument("--out", default="var/train")
    ap.add_argument("--epochs", type=int, default=Recipe.epochs)
    ap.add_argument("--stop-after", type=int, default=None)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=Recipe.lr)
    ap.add_argument("--pseudo-per-epoch", type=int, default=Recipe.pseudo_per_epoch)
    ap.add_argument("--radiologist-repeat", type=int, default=Recipe.radiologist_repeat)
    ap.add_argument("--threads", type=int, default=Recipe.threads)
    ap.add_argument("--ema", type=float, default=Recipe.ema,
                    help="keep an EMA of the weights (decay per step; 0: off)")
    ap.add_argument("--base", type=int, default=Recipe.base, help="channels of the network's first level")
    ap.add_argument("--size", type=int, default=Recipe.size, help="the network's square input, pixels")
    ap.add_argument("--finetune-lr", type=float, default=Recipe.finetune_lr)
    ap.add_argument("--window-slope", type=float, nargs=2, default=Recipe.window_slope,
                    help="range of the gray window slope augmentation (log-uniform)")
    ap.add_argument("--init", default=None, help="start from this weights file (fine-tuning; one stage)")
    ap.add_argument("--finetune-epochs", type=int, default=Recipe.finetune_epochs,
                    help="epochs of stage 2 (fine-tuning from stage 1's best); 0 = one stage")
    ap.add_argument("--weights-out", default=None)
    ap.add_argument("--fit-window", action="store_true", help="print the HU-to-gray window fit and exit")
    ap.add_argument("--export", default=None, metavar="CHECKPOINT",
                    help="write CHECKPOINT as the shipped weights file (--weights-out) and exit")
    a = ap.parse_args(argv)
    if a.export:
        meta = export_weights(Path(a.export), Path(a.weights_out), Path(a.data))
        print(json.dumps({k: v for k, v in meta.items() if k != "val_dice_per_image"}), flush=True)
        return 0
    if a.fit_window:
        print(json.dumps(fit_window(Path(a.data)), indent=1))
        return 0
    recipe = Recipe(epochs=a.epochs, stop_after=a.stop_after, limit=a.limit, seed=a.seed, lr=a.lr,
                    pseudo_per_epoch=a.pseudo_per_epoch, radiologist_repeat=a.radiologist_repeat,
                    threads=a.threads, init=a.init, finetune_epochs=a.finetune_epochs,
                    window_slope=tuple(a.window_slope), ema=a.ema, base=a.base, size=a.size, finetune_lr=a.finetune_lr)

    def log(entry: dict) -> None:
        print(json.dumps(entry), flush=True)

    s = train_staged(Path(a.data), Path(a.out), recipe, log=log,
                     weights_out=Path(a.weights_out) if a.weights_out else None)
    print(json.dumps({k: v for k, v in s.items() if k != "history"}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
