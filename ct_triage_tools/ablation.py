"""Ablation runs of the 2D lesion network (issue 19): one factor at a time from a baseline,
chosen on a split that does not grade, graded once on ``val/``, resumable.

Why a separate trainer
    ``train_lesion.train`` keeps the epoch with the best ``val/`` Dice, so ``val/`` (24
    slices, noise about +-0.03) both selects and grades. Here nothing that grades selects:

    * **selection split** (chooses the epoch and the threshold, nothing else): the
      pseudo-labelled volumes ``SELECTION_VOLUMES`` (3 of the 20, 225 slices, both
      sources) and the radiologist slices ``SELECTION_RADIOLOGIST`` (8 of the 50 of
      ``train/``, lesion shares 2..24 %). Its score is the mean of the two mean per-image
      Dice figures (pseudo volumes, radiologist slices), at the native resolution.
    * **report** (measured once per finished recipe, with the chosen epoch and threshold,
      at each image's native resolution: the probability is resized back to the image and
      thresholded there): ``val/`` (24 radiologist slices; mean and median per-image Dice)
      and the pseudo volumes ``train_lesion.HOLDOUT_VOLUMES`` (4 volumes, 255 slices, the
      ones the shipped weights were never trained on either, so the two are comparable).
    * **training**: the other 42 radiologist slices and the other 13 pseudo volumes.

    Split by volume, never by slice (neighbouring slices of a volume are near copies). The
    MedSeg slices carry no patient id, so the 8 radiologist selection slices may share a
    patient with training slices; they select, they do not grade.

Recipe (``AblationRecipe``; the baseline is the issue's counter-example)
    192 px, the raw 8-bit slices (``rewindow`` off: coronacases.org images as they come),
    radiologist slices x4 plus every training pseudo slice each epoch, batch 16, BCE +
    soft Dice, AdamW lr 2e-3 (weight decay 1e-4) x0.7 after every epoch, 6 epochs, seed
    0, augmentation: left-right and up-down flips and an intensity jitter (contrast
    x0.9..1.1, brightness +-0.05 of the gray range); ``window_aug`` adds the gray-window
    augmentation of ``train_lesion.augment`` (slope x0.65..1.55 about a pivot at gray
    10..80, offset +-15 gray levels). Network: ``worker.scoring.lesion_net.LesionNet``,
    the shipped architecture, so a winner can be shipped as it is.

Resumable
    Every finished epoch writes ``<runs>/<name>/epoch_NNN.pt`` (model, optimizer,
    scheduler, the torch and numpy RNG states, the epoch, the selection history, the CPU
    seconds so far; written to a temporary file and renamed). ``run --resume`` continues
    after the last one; the result is bit-identical to an uninterrupted run
    (``tests/test_lesion_ablation.py``). A finished recipe writes ``result.json`` in its
    folder and appends one JSON line to ``<runs>/ablation.jsonl``.

Use
    python -m ct_triage_tools.ablation presets
    python -m ct_triage_tools.ablation run baseline --resume          # one recipe
    python -m ct_triage_tools.ablation run baseline --set size=256 --name size256b
    python -m ct_triage_tools.ablation queue baseline rewindow ...    # one after another
    python -m ct_triage_tools.ablation table                          # ablation.jsonl as a table

Runs go to ``$CT_TRIAGE_RUNS`` (default ``/work/runs``), outside the repository. One torch
thread by default: the CPU is shared; start it under ``nice -n 19``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ct_triage_tools.datasets import network_gray, source_of
from ct_triage_tools.train_lesion import (
    HOLDOUT_VOLUMES,
    Sample,
    dice,
    list_samples,
    read_gray,
    read_mask,
)
from worker.scoring.lesion_net import LesionNet, predict_images, save_weights

# -- the split ------------------------------------------------------------------------------

SELECTION_VOLUMES = (
    "Data-1_coronacases_org_002",  # 76 slices
    "Data-1_coronacases_org_009",  # 114 slices
    "Data-1_radiopaedia_org_covid-19-pneumonia-27_86410_0-dcm",  # 35 slices
)
SELECTION_RADIOLOGIST = ("3", "12", "20", "27", "33", "41", "46", "54")  # of train/ (file stems)
REPORT_VOLUMES = HOLDOUT_VOLUMES
assert not set(SELECTION_VOLUMES) & set(REPORT_VOLUMES)

# Wider than train_lesion.THRESHOLDS (0.3-0.7): with that grid the chosen threshold sat at
# its 0.3 end in most epochs of the first runs, so the optimum may lie below it.
THRESHOLDS = (0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7)

GROUPS = ("train_radiologist", "train_pseudo", "select_radiologist", "select_pseudo", "report_pseudo", "val")

DEFAULT_RUNS = Path(os.environ.get("CT_TRIAGE_RUNS", "/work/runs"))
DEFAULT_DATA = Path(os.environ.get("CT_TRIAGE_SEMISEG", "/work/shared/data/covid-semiseg-2d"))


def split(root: Path) -> dict[str, list[Sample]]:
    """The labelled slices of a covid-semiseg-2d folder by use (see the module docstring);
    deterministic: sorted by name within each group."""
    out: dict[str, list[Sample]] = {g: [] for g in GROUPS}
    for s in list_samples(Path(root)):
        if s.group == "val":
            out["val"].append(s)
        elif s.group == "train":
            out["select_radiologist" if s.name in SELECTION_RADIOLOGIST else "train_radiologist"].append(s)
        elif s.volume in SELECTION_VOLUMES:
            out["select_pseudo"].append(s)
        elif s.volume in REPORT_VOLUMES:
            out["report_pseudo"].append(s)
        else:
            out["train_pseudo"].append(s)
    for g in out:
        out[g].sort(key=lambda s: s.name)
    return out


# -- the recipe -----------------------------------------------------------------------------

LOSSES = ("bce_dice", "bce", "dice", "focal_dice")


@dataclass(frozen=True)
class AblationRecipe:
    size: int = 192
    rewindow: bool = False  # coronacases.org images re-windowed into MedSeg's HU window
    window_aug: bool = False  # gray-window augmentation (train_lesion.augment's range)
    radiologist_repeat: int = 4
    base: int = 16
    levels: int = 4
    loss: str = "bce_dice"
    epochs: int = 6
    seed: int = 0
    lr: float = 2e-3
    lr_decay: float = 0.7  # multiplied into the lr after every epoch
    weight_decay: float = 1e-4
    batch: int = 16
    pseudo_per_epoch: int = 0  # 0: every training pseudo slice each epoch
    limit: int = 0  # tests: at most this many slices per group (0: all)

    def check(self) -> AblationRecipe:
        if self.loss not in LOSSES:
            raise ValueError(f"loss {self.loss!r}: one of {LOSSES}")
        if self.size % (2 ** self.levels) or self.epochs < 1 or self.batch < 2:
            raise ValueError(f"bad recipe {self}")
        return self


BASELINE = AblationRecipe()
PRESETS: dict[str, AblationRecipe] = {
    "baseline": BASELINE,
    "size128": replace(BASELINE, size=128),
    "size256": replace(BASELINE, size=256),
    "rewindow": replace(BASELINE, rewindow=True),
    "winaug": replace(BASELINE, window_aug=True),
    "rewindow-winaug": replace(BASELINE, rewindow=True, window_aug=True),
    "rad1": replace(BASELINE, radiologist_repeat=1),
    "rad8": replace(BASELINE, radiologist_repeat=8),
    "width24": replace(BASELINE, base=24),
    "width32": replace(BASELINE, base=32),
    "loss-bce": replace(BASELINE, loss="bce"),
    "loss-focal": replace(BASELINE, loss="focal_dice"),
    "epochs10": replace(BASELINE, epochs=10),
    "seed1": replace(BASELINE, seed=1),
    "seed2": replace(BASELINE, seed=2),
    # the budget-safe shape (128 px, width 16) with the one factor that read as a gain
    "size128-rewindow": replace(BASELINE, size=128, rewindow=True),
    "size128-rewindow-seed1": replace(BASELINE, size=128, rewindow=True, seed=1),
    "size128-rewindow-seed2": replace(BASELINE, size=128, rewindow=True, seed=2),
}


def parse_overrides(recipe: AblationRecipe, items: list[str]) -> AblationRecipe:
    """``key=value`` overrides (types from the dataclass)."""
    kinds = {f.name: f.type for f in fields(AblationRecipe)}
    changes: dict[str, object] = {}
    for item in items:
        key, _, raw = item.partition("=")
        if key not in kinds:
            raise ValueError(f"unknown recipe field {key!r} (one of {sorted(kinds)})")
        kind = str(kinds[key])
        if kind == "bool":
            changes[key] = raw.lower() in ("1", "true", "yes", "on")
        elif kind == "int":
            changes[key] = int(raw)
        elif kind == "float":
            changes[key] = float(raw)
        else:
            changes[key] = raw
    return replace(recipe, **changes).check()  # type: ignore[arg-type]


# -- data -----------------------------------------------------------------------------------


def gray_of(sample: Sample, rewindow: bool) -> np.ndarray:
    """The image as the recipe's network sees it (float 0..255, native size)."""
    g = read_gray(sample.img)
    return network_gray(g, source_of(sample.name)) if rewindow else g.astype(np.float32)


def _area(arr: np.ndarray, size: int) -> torch.Tensor:
    return F.interpolate(torch.from_numpy(arr.astype(np.float32))[None, None], size=(size, size), mode="area")[0, 0]


def training_arrays(samples: list[Sample], size: int, rewindow: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images and masks (N, size, size), area-resized; masks hold the lesion fraction x255."""
    imgs = torch.empty((len(samples), size, size), dtype=torch.uint8)
    masks = torch.empty((len(samples), size, size), dtype=torch.uint8)
    for i, s in enumerate(samples):
        imgs[i] = _area(gray_of(s, rewindow), size).round().clamp(0, 255).to(torch.uint8)
        masks[i] = (_area(read_mask(s.gt).astype(np.float32), size) * 255).round().to(torch.uint8)
    return imgs, masks


@dataclass
class NativeSet:
    """Images (gray/255) and truth masks at their native size, read once."""
    names: list[str]
    grays: list[torch.Tensor]
    truths: list[np.ndarray]


def native_set(samples: list[Sample], rewindow: bool) -> NativeSet:
    return NativeSet([s.name for s in samples],
                     [torch.from_numpy(gray_of(s, rewindow) / 255.0) for s in samples],
                     [read_mask(s.gt) for s in samples])


# -- metrics --------------------------------------------------------------------------------


def native_dice(prob: torch.Tensor | np.ndarray, truth: np.ndarray, threshold: float) -> float:
    """Dice at the truth's (native) resolution of a probability map of any size: the map is
    resized (bilinear) to the truth's shape, then thresholded. Both empty: 1.0."""
    p = torch.as_tensor(np.asarray(prob, dtype=np.float32))
    if tuple(p.shape) != tuple(truth.shape):
        p = F.interpolate(p[None, None], size=tuple(truth.shape), mode="bilinear", align_corners=False)[0, 0]
    return dice(p.numpy() >= threshold, np.asarray(truth, dtype=bool))


def native_probabilities(model: LesionNet, data: NativeSet, flip: bool = True) -> list[np.ndarray]:
    """Probability maps at native size (input resized to the model's, probability back)."""
    model.eval()
    with torch.inference_mode():
        return [p.numpy() for p in predict_images(model, data.grays, flip=flip)]


def dice_table(probs: list[np.ndarray], truths: list[np.ndarray]) -> dict[float, list[float]]:
    """Per-image native Dice for each threshold of ``THRESHOLDS``."""
    return {t: [native_dice(p, m, t) for p, m in zip(probs, truths)] for t in THRESHOLDS}


def selection_scores(model: LesionNet, pseudo: NativeSet, radiologist: NativeSet) -> dict:
    """Per threshold: mean Dice on the selection pseudo volumes, on the selection
    radiologist slices and their mean (the score); the best threshold (ties: nearer 0.5)."""
    tp = dice_table(native_probabilities(model, pseudo), pseudo.truths) if pseudo.names else {}
    tr = dice_table(native_probabilities(model, radiologist), radiologist.truths) if radiologist.names else {}
    per = {}
    for t in THRESHOLDS:
        parts = [float(np.mean(x[t])) for x in (tp, tr) if x]
        per[t] = {"pseudo": float(np.mean(tp[t])) if tp else None,
                  "radiologist": float(np.mean(tr[t])) if tr else None,
                  "score": float(np.mean(parts)) if parts else float("nan")}
    best = max(THRESHOLDS, key=lambda t: (per[t]["score"], -abs(t - 0.5)))
    return {"threshold": best, **{k: _r(v) for k, v in per[best].items()},
            "by_threshold": {str(t): _r(per[t]["score"]) for t in THRESHOLDS}}


def _r(v: float | None) -> float | None:
    return None if v is None else round(float(v), 4)


# -- training ---------------------------------------------------------------------------------


def augment(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator, window_aug: bool
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Flips (left-right, up-down), optional gray-window augmentation, intensity jitter."""
    n = x.shape[0]

    def u(lo: float, hi: float) -> torch.Tensor:
        return (lo + (hi - lo) * torch.rand(n, generator=gen))[:, None, None, None]

    lr = torch.rand(n, generator=gen)[:, None, None, None] < 0.5
    ud = torch.rand(n, generator=gen)[:, None, None, None] < 0.5
    x, y = torch.where(lr, x.flip(-1), x), torch.where(lr, y.flip(-1), y)
    x, y = torch.where(ud, x.flip(-2), x), torch.where(ud, y.flip(-2), y)
    if window_aug:
        slope = torch.exp(u(math.log(0.65), math.log(1.55)))
        pivot = u(10 / 255, 80 / 255)
        x = (x - pivot) * slope + pivot + u(-15 / 255, 15 / 255)
    x = (x - 0.5) * u(0.9, 1.1) + 0.5 + u(-0.05, 0.05)
    return x.clamp(0, 1), y


def loss_of(kind: str, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    prob = torch.sigmoid(logits)
    inter = (prob * y).sum((1, 2, 3))
    soft_dice = (1 - (2 * inter + 1) / (prob.sum((1, 2, 3)) + y.sum((1, 2, 3)) + 1)).mean()
    if kind == "dice":
        return soft_dice
    if kind == "focal_dice":
        bce = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
        pt = torch.exp(-bce)
        return ((1 - pt) ** 2 * bce).mean() * 4 + soft_dice
    bce = F.binary_cross_entropy_with_logits(logits, y)
    return bce if kind == "bce" else bce + soft_dice


def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("epoch_[0-9][0-9][0-9].pt"))


def _atomic_save(obj: object, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def _emit(log_fh, entry: dict) -> None:
    line = json.dumps(entry)
    print(line, flush=True)
    if log_fh is not None:
        log_fh.write(line + "\n")
        log_fh.flush()


def run_recipe(recipe: AblationRecipe, run_dir: Path, data_root: Path = DEFAULT_DATA, *,
               resume: bool = False, stop_after: int | None = None, threads: int = 1,
               results: Path | None = None, name: str | None = None, report: bool = True) -> dict:
    """Train ``recipe`` in ``run_dir`` (one checkpoint per epoch), then choose the epoch and
    threshold on the selection split and report ``val/`` and the report volumes once.

    ``resume`` continues after the last checkpoint (refused if its recipe differs);
    without it an existing checkpoint is refused. ``stop_after`` ends after that many
    epochs in total (the schedule is still ``recipe.epochs``; resume later). Returns the
    result (or the state so far, ``finished`` False)."""
    recipe = recipe.check()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    name = name or run_dir.name
    torch.set_num_threads(threads)
    with open(run_dir / "events.jsonl", "a") as log_fh:
        return _run(recipe, run_dir, Path(data_root), resume, stop_after, results, name, report, log_fh)


def _run(recipe: AblationRecipe, run_dir: Path, data_root: Path, resume: bool, stop_after: int | None,
         results: Path | None, name: str, report: bool, log_fh) -> dict:
    done = run_dir / "result.json"
    if done.is_file():
        if not resume:
            raise FileExistsError(f"{run_dir} holds a finished run (result.json); use another name")
        result = json.loads(done.read_text())
        _emit(log_fh, {"stage": "already finished", "name": name})
        return result
    existing = _checkpoints(run_dir)
    if existing and not resume:
        raise FileExistsError(f"{run_dir} holds checkpoints ({existing[-1].name}): --resume, or another name")

    cpu_mark, wall0 = time.process_time(), time.perf_counter()
    groups = split(data_root)
    if recipe.limit:
        groups = {g: v[:: max(1, len(v) // recipe.limit)][: recipe.limit] for g, v in groups.items()}
    train_s = groups["train_radiologist"] + groups["train_pseudo"]
    if not train_s or not groups["val"]:
        raise ValueError(f"{data_root}: need train/ (and train-pseudo/) and val/ with Imgs/ and GT/")
    imgs, masks = training_arrays(train_s, recipe.size, recipe.rewindow)
    n_rad = len(groups["train_radiologist"])
    radiologist = np.arange(n_rad, dtype=np.int64)
    pseudo = np.arange(n_rad, len(train_s), dtype=np.int64)
    per_epoch = len(pseudo) if recipe.pseudo_per_epoch <= 0 else min(len(pseudo), recipe.pseudo_per_epoch)
    sel_pseudo = native_set(groups["select_pseudo"], recipe.rewindow)
    sel_rad = native_set(groups["select_radiologist"], recipe.rewindow)

    torch.manual_seed(recipe.seed)
    model = LesionNet(base=recipe.base, levels=recipe.levels, size=recipe.size)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=recipe.lr_decay)
    gen = torch.Generator().manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    history: list[dict] = []
    cpu_before = 0.0
    start = 1
    if existing:
        history, cpu_before, start = _restore(existing[-1], recipe, model, opt, sched, gen, rng)
    _emit(log_fh, {"stage": "data", "name": name, "recipe": asdict(recipe), "start_epoch": start,
                   **{g: len(v) for g, v in groups.items()}, "epoch_samples": int(n_rad * recipe.radiologist_repeat
                                                                                    + per_epoch),
                   "seconds": round(time.perf_counter() - wall0, 1)})

    last = recipe.epochs if stop_after is None else min(recipe.epochs, stop_after)
    for epoch in range(start, last + 1):
        model.train()
        drawn = pseudo if per_epoch == len(pseudo) else rng.choice(pseudo, size=per_epoch, replace=False)
        order = rng.permutation(np.concatenate([np.repeat(radiologist, recipe.radiologist_repeat), drawn]))
        t_ep = time.perf_counter()
        losses = _train_epoch(recipe, model, opt, gen, imgs, masks, order, epoch)
        lr_used = opt.param_groups[0]["lr"]
        sched.step()
        train_s_wall = time.perf_counter() - t_ep
        t_sel = time.perf_counter()
        sel = selection_scores(model, sel_pseudo, sel_rad)
        cpu_now = cpu_before + time.process_time() - cpu_mark
        entry = {"stage": "epoch", "name": name, "epoch": epoch, "loss": round(float(np.mean(losses)), 4),
                 "lr": round(lr_used, 6), "selection": sel, "train_seconds": round(train_s_wall, 1),
                 "selection_seconds": round(time.perf_counter() - t_sel, 1), "cpu_seconds": round(cpu_now, 1)}
        history.append(entry)
        _atomic_save({"recipe": asdict(recipe), "epoch": epoch, "model": model.state_dict(),
                      "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                      "torch_generator": gen.get_state(), "torch_global": torch.get_rng_state(),
                      "numpy_rng": json.dumps(rng.bit_generator.state), "history": json.dumps(history),
                      "cpu_seconds": cpu_now}, run_dir / f"epoch_{epoch:03d}.pt")
        _emit(log_fh, entry)
    if len(history) < recipe.epochs:
        return {"finished": False, "name": name, "epochs_done": len(history), "history": history}
    if not report:
        return {"finished": True, "name": name, "history": history}
    return finish(recipe, run_dir, groups, history, name, results, log_fh,
                  cpu_before + time.process_time() - cpu_mark)


def _restore(checkpoint: Path, recipe: AblationRecipe, model: LesionNet, opt: torch.optim.Optimizer,
             sched: torch.optim.lr_scheduler.LRScheduler, gen: torch.Generator,
             rng: np.random.Generator) -> tuple[list[dict], float, int]:
    """Load an epoch checkpoint of this recipe into the training state: (history, CPU seconds, next epoch)."""
    ck = torch.load(checkpoint, map_location="cpu", weights_only=True)
    # a field added to the recipe later reads as its default in older checkpoints
    stored = {**asdict(AblationRecipe()), **ck["recipe"]}
    if stored != asdict(recipe):
        raise ValueError(f"{checkpoint}: recipe {stored} is not {asdict(recipe)}; use another name")
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    sched.load_state_dict(ck["scheduler"])
    gen.set_state(ck["torch_generator"])
    torch.set_rng_state(ck["torch_global"])
    rng.bit_generator.state = json.loads(ck["numpy_rng"])
    return json.loads(ck["history"]), float(ck["cpu_seconds"]), int(ck["epoch"]) + 1


def _train_epoch(recipe: AblationRecipe, model: LesionNet, opt: torch.optim.Optimizer, gen: torch.Generator,
                 imgs: torch.Tensor, masks: torch.Tensor, order: np.ndarray, epoch: int) -> list[float]:
    """One pass over ``order`` in batches (a last batch of one is skipped); the batch losses.

    Prints a progress line every 20 batches.
    """
    t_ep = time.perf_counter()
    losses: list[float] = []
    for b in range(0, len(order), recipe.batch):
        ids = torch.from_numpy(order[b:b + recipe.batch].astype(np.int64))
        if len(ids) < 2:
            continue  # batch norm needs two
        x = imgs[ids].float()[:, None] / 255.0
        y = masks[ids].float()[:, None] / 255.0
        x, y = augment(x, y, gen, recipe.window_aug)
        loss = loss_of(recipe.loss, model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if len(losses) % 20 == 0:
            print(json.dumps({"stage": "progress", "epoch": epoch, "batches": len(losses),
                              "of": math.ceil(len(order) / recipe.batch), "loss": round(float(np.mean(losses)), 4),
                              "seconds": round(time.perf_counter() - t_ep, 1)}), flush=True)
    return losses


def finish(recipe: AblationRecipe, run_dir: Path, groups: dict[str, list[Sample]], history: list[dict],
           name: str, results: Path | None, log_fh, cpu_seconds: float) -> dict:
    """Choose the epoch (best selection score, ties: the earlier) and report once."""
    t0 = time.perf_counter()
    chosen = max(history, key=lambda e: (e["selection"]["score"], -e["epoch"]))
    epoch, thr = int(chosen["epoch"]), float(chosen["selection"]["threshold"])
    ck = torch.load(run_dir / f"epoch_{epoch:03d}.pt", map_location="cpu", weights_only=True)
    model = LesionNet(base=recipe.base, levels=recipe.levels, size=recipe.size)
    model.load_state_dict(ck["model"])
    model.eval()
    out: dict = {"name": name, "recipe": asdict(recipe), "finished": True,
                 "selection_per_epoch": [{"epoch": e["epoch"], "score": e["selection"]["score"],
                                          "pseudo": e["selection"]["pseudo"],
                                          "radiologist": e["selection"]["radiologist"],
                                          "threshold": e["selection"]["threshold"], "loss": e["loss"]}
                                         for e in history],
                 "chosen_epoch": epoch, "threshold": thr}
    for key, group in (("val", "val"), ("report_pseudo", "report_pseudo")):
        data = native_set(groups[group], recipe.rewindow)
        ds = [native_dice(p, m, thr) for p, m in zip(native_probabilities(model, data), data.truths)]
        out[f"{key}_dice_mean"] = _r(float(np.mean(ds))) if ds else None
        out[f"{key}_dice_median"] = _r(float(np.median(ds))) if ds else None
        out[f"{key}_slices"] = len(ds)
        if key == "val":
            out["val_dice_per_image"] = {n: round(d, 4) for n, d in zip(data.names, ds)}
    out["report_volumes"] = sorted({s.volume for s in groups["report_pseudo"]})
    out["cpu_seconds"] = round(cpu_seconds, 1)
    out["report_seconds"] = round(time.perf_counter() - t0, 1)
    out["commit"] = _git_commit()
    save_weights(model, run_dir / "chosen.pt",
                 {"threshold": thr, "epoch": epoch, "recipe": asdict(recipe), "val_dice": out["val_dice_mean"],
                  "holdout_dice": out["report_pseudo_dice_mean"], "rewindowed": recipe.rewindow}, half=False)
    (run_dir / "result.json").write_text(json.dumps(out, indent=1))
    if results is not None:
        results.parent.mkdir(parents=True, exist_ok=True)
        with open(results, "a") as fh:
            fh.write(json.dumps({k: v for k, v in out.items() if k != "val_dice_per_image"}) + "\n")
    _emit(log_fh, {"stage": "result", **{k: v for k, v in out.items() if k != "val_dice_per_image"}})
    return out


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                              capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# -- command line ------------------------------------------------------------------------------


def table(results: Path) -> str:
    rows = ["| run | recipe (vs baseline) | selection per epoch | chosen | thr | val mean | val median "
            "| report vols | CPU h |", "|---|---|---|---|---|---|---|---|---|"]
    base = asdict(BASELINE)
    if results.is_file():
        for line in results.read_text().splitlines():
            r = json.loads(line)
            diff = ", ".join(f"{k}={v}" for k, v in r["recipe"].items() if base.get(k) != v) or "baseline"
            sel = " ".join(f"{e['score']:.3f}" for e in r["selection_per_epoch"])
            rows.append(f"| {r['name']} | {diff} | {sel} | {r['chosen_epoch']} | {r['threshold']} | "
                        f"{r['val_dice_mean']:.3f} | {r['val_dice_median']:.3f} | "
                        f"{(r['report_pseudo_dice_mean'] or float('nan')):.3f} | {r['cpu_seconds'] / 3600:.2f} |")
    return "\n".join(rows)


def _queued(presets: list[str], file: Path | None, runs: Path):
    """The presets to run, in order: those named, then those of ``file`` (re-read after each
    run); a preset whose folder holds ``result.json`` or that was tried once is skipped."""
    tried: set[str] = set()
    while True:
        names = list(presets)
        if file is not None and file.is_file():
            names += [w for line in file.read_text().splitlines()
                      for w in line.split("#", 1)[0].split()]
        todo = [p for p in names if p not in tried and not (runs / p / "result.json").is_file()]
        unknown = [p for p in todo if p not in PRESETS]
        for p in unknown:
            print(json.dumps({"queue": p, "skipped": "not a preset"}), flush=True)
            tried.add(p)
        todo = [p for p in todo if p in PRESETS]
        if not todo:
            return
        tried.add(todo[0])
        yield todo[0]


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, default=DEFAULT_RUNS, help="run folders and ablation.jsonl")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the covid-semiseg-2d folder")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("presets", help="list the named recipes")
    r = sub.add_parser("run", help="train one recipe (resumable), then report it")
    r.add_argument("preset", choices=sorted(PRESETS))
    r.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe overrides")
    r.add_argument("--name", default=None, help="run folder name (default: the preset's)")
    r.add_argument("--resume", action="store_true", help="continue after the last checkpoint")
    r.add_argument("--stop-after", type=int, default=None, help="stop after this many epochs in total")
    r.add_argument("--threads", type=int, default=1)
    q = sub.add_parser("queue", help="run presets one after another (each resumed), one process each")
    # no ``choices``: argparse rejects an empty list against them (``queue --file F`` alone);
    # _queued reports a name that is not a preset
    q.add_argument("presets", nargs="*", metavar="PRESET")
    q.add_argument("--file", type=Path, default=None,
                   help="also presets from this file (one a line, # comments), re-read after every run: "
                        "append to it while the queue runs")
    q.add_argument("--threads", type=int, default=1)
    sub.add_parser("table", help="print ablation.jsonl as a Markdown table")
    a = ap.parse_args(argv)
    results = a.runs / "ablation.jsonl"
    if a.cmd == "presets":
        for k, v in PRESETS.items():
            print(k, json.dumps({f: x for f, x in asdict(v).items() if asdict(BASELINE)[f] != x} or "baseline"))
        return 0
    if a.cmd == "table":
        print(table(results))
        return 0
    if a.cmd == "queue":
        failed = 0
        for p in _queued(a.presets, a.file, a.runs):
            run_dir = a.runs / p
            run_dir.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "ct_triage_tools.ablation", "--runs", str(a.runs), "--data", str(a.data),
                   "run", p, "--resume", "--threads", str(a.threads)]
            print(json.dumps({"queue": p, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "cmd": cmd}), flush=True)
            env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
            with open(run_dir / "log.txt", "a") as log:
                rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                     cwd=Path(__file__).resolve().parents[1])
            failed += rc != 0
            print(json.dumps({"queue": p, "rc": rc, "ended": time.strftime("%Y-%m-%d %H:%M:%S")}), flush=True)
        return 1 if failed else 0
    recipe = parse_overrides(PRESETS[a.preset], a.set)
    name = a.name or (a.preset if not a.set else None)
    if name is None:
        raise SystemExit("--set needs --name (a run folder holds one recipe)")
    out = run_recipe(recipe, a.runs / name, a.data, resume=a.resume, stop_after=a.stop_after,
                     threads=a.threads, results=results, name=name)
    print(json.dumps({k: v for k, v in out.items() if k not in ("history", "val_dice_per_image")}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
