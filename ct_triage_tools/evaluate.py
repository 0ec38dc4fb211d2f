"""Evaluate a scorer on labelled data: ``ct-triage eval DATA_DIR``.

Two layouts are recognised:

MosMedData (doi:10.17816/DD46826)
    ``studies/CT-0/study_0001.nii.gz`` ... ``studies/CT-4/...`` and optionally
    ``masks/study_XXXX_mask.nii.gz`` (read by :mod:`ct_triage_tools.datasets`). Every
    study is scored (NIfTI, as loaded by ``worker.scoring.load``); reported: the 5x5
    confusion matrix (rows true, columns predicted), quadratic-weighted kappa, per-class recall, the AUC of CT-0 against
    the rest with the involvement % as the score, and the lesion Dice of every study
    that has a mask (the scorer's lesion mask brought back to the original grid).
    Accuracy alone is never reported: 61.6 % of MosMedData is CT-1.

covid-semiseg-2d (Inf-Net's COVID-SemiSeg packaging of the MedSeg slices)
    ``Imgs/*.jpg`` and ``GT/*.png`` (or a folder holding ``val/`` or ``train/`` so laid
    out). These are 8-bit, windowed, lung-cropped slices without HU, so gray levels
    are mapped to approximate HU per image by two anchors found in its histogram: the
    dominant dark mode is aerated lung (-850 HU) and the dominant bright mode soft
    tissue (+40 HU); when either is missing a standard lung window (-1350..+150 HU) is
    assumed. The classical lesion step then runs in 2D
    (:func:`worker.scoring.classical.segment_slice`); with ``CT_TRIAGE_SCORER=hybrid``
    (``--scorer hybrid``) the lesion network scores the gray image as it is. Reported:
    the Dice of every image and the mean (as the anchors report it; an image where
    truth and prediction are both empty counts 1), the pixel confusion (background /
    ground glass / consolidation where ``GT-multiclass/`` has the image), and a PNG of
    the worst images (image, truth, prediction). Published anchors on the same 50 + 24
    split: U-Net 0.44, Inf-Net 0.68, Semi-Inf-Net 0.74 mean Dice (Fan et al., IEEE TMI
    2020).

All metrics are implemented here with numpy (no scikit-learn). A PNG figure is
written beside the JSON numbers.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ct_triage.errors import InvalidInput, NotApplicable
from ct_triage_tools.datasets import (
    Study,
    detect_layout,
    gray_to_hu,
    mosmed_studies,
    network_gray,
    semiseg_pairs,
    source_of,
)
from worker.scoring.device import resolve_device
from worker.scoring.load import load_nifti, nifti_array_zrc
from worker.scoring.pipeline import measure
from worker.scoring.registry import get_scorer
from worker.scoring.result import CATEGORIES, ScoreResult

Progress = Callable[[int, int, str], None]

# -- metrics -------------------------------------------------------------------------


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int = 5) -> np.ndarray:
    """Counts, rows = true class, columns = predicted class."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    for t, p in zip(y_true, y_pred):
        cm[int(t), int(p)] += 1
    return cm


def quadratic_weighted_kappa(cm: np.ndarray) -> float | None:
    """Cohen's kappa with quadratic weights from a confusion matrix; None if undefined."""
    cm = np.asarray(cm, dtype=np.float64)
    k = cm.shape[0]
    n = cm.sum()
    if n == 0 or k < 2:
        return None
    i, j = np.indices((k, k))
    weights = (i - j) ** 2 / (k - 1) ** 2
    expected = np.outer(cm.sum(axis=1), cm.sum(axis=0)) / n
    denom = (weights * expected).sum()
    if denom == 0:
        return None
    return float(1.0 - (weights * cm).sum() / denom)


def recall_per_class(cm: np.ndarray) -> list[float | None]:
    """Recall (sensitivity) of each true class; None for a class with no cases."""
    cm = np.asarray(cm)
    out: list[float | None] = []
    for c in range(cm.shape[0]):
        total = cm[c].sum()
        out.append(float(cm[c, c] / total) if total else None)
    return out


def auc(scores_pos: Sequence[float], scores_neg: Sequence[float]) -> float | None:
    """Rank-based ROC AUC (Mann-Whitney U / n_pos n_neg, ties count half); None if a
    class is empty."""
    pos = np.asarray(scores_pos, dtype=np.float64)
    neg = np.asarray(scores_neg, dtype=np.float64)
    if pos.size == 0 or neg.size == 0:
        return None
    allv = np.concatenate([pos, neg])
    order = np.argsort(allv, kind="mergesort")
    ranks = np.empty(allv.size, dtype=np.float64)
    sorted_v = allv[order]
    i = 0
    while i < allv.size:  # average ranks over ties
        j = i
        while j + 1 < allv.size and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    u = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (pos.size * neg.size))


def dice(pred: np.ndarray, truth: np.ndarray) -> float | None:
    """2|P∩T| / (|P| + |T|); None when both are empty."""
    p, t = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    denom = int(p.sum()) + int(t.sum())
    if denom == 0:
        return None
    return float(2.0 * np.logical_and(p, t).sum() / denom)


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(vals)) if vals else None


def _upsample(mask: np.ndarray, factor: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    fz, fy, fx = factor
    out = mask
    if fz > 1:
        out = np.repeat(out, fz, axis=0)
    if fy > 1:
        out = np.repeat(out, fy, axis=1)
    if fx > 1:
        out = np.repeat(out, fx, axis=2)
    return out[: shape[0], : shape[1], : shape[2]]


def _score_study_file(study: Study, scorer, device: str, settings, row: dict):
    """Score one NIfTI study (and its Dice when a mask exists); never raises."""
    try:
        volume = load_nifti(study.path)
        seg = scorer.segment(volume, device)
        result = measure(volume, seg, settings)
    except NotApplicable as exc:
        return ScoreResult(status="not_applicable", reason=str(exc), model=scorer.name)
    except Exception as exc:  # one bad study is reported, not fatal
        return ScoreResult(status="failed", reason=f"{type(exc).__name__}: {exc}", model=scorer.name)
    result.model, result.model_version, result.device = scorer.name, scorer.version, device
    if study.mask is not None:
        try:
            truth, _ = nifti_array_zrc(study.mask)
            pred = _upsample(seg.lesion, seg.factor, seg.original_shape)
            if truth.shape != pred.shape:
                raise InvalidInput(f"shape {truth.shape} != study {pred.shape}")
            row["dice"] = dice(pred, truth > 0)
        except Exception as exc:  # an unreadable or mismatched mask is reported in the row
            row["dice_error"] = f"{study.mask.name}: {type(exc).__name__}: {exc}"
    return result


def evaluate_mosmed(data_dir: Path, settings, *, progress: Progress | None = None,
                    scorer=None) -> dict:
    """Score every study of a MosMedData-layout folder; metrics as the module says."""
    studies = mosmed_studies(data_dir)
    if not studies:
        raise InvalidInput(f"{data_dir}: no studies/CT-*/study_XXXX.nii.gz found")
    if scorer is None:
        scorer = get_scorer(settings)
    device = resolve_device(settings.device)
    rows: list[dict[str, Any]] = []
    y_true: list[int] = []
    y_pred: list[int] = []
    dices: list[float] = []
    started = time.perf_counter()
    for i, study in enumerate(studies):
        if progress:
            progress(i, len(studies), study.path.name)
        row: dict[str, Any] = {"study": study.study_id, "file": str(study.path), "true": CATEGORIES[study.category]}
        t0 = time.perf_counter()
        result = _score_study_file(study, scorer, device, settings, row)
        if row.get("dice") is not None:
            dices.append(row["dice"])
        row.update(status=result.status, reason=result.reason, predicted=result.category,
                   involvement_percent=result.involvement_percent,
                   lung_volume_ml=result.lung_volume_ml, seconds=round(time.perf_counter() - t0, 3))
        rows.append(row)
        if result.status == "scored" and result.category in CATEGORIES:
            y_true.append(study.category)
            y_pred.append(CATEGORIES.index(result.category))
    if progress:
        progress(len(studies), len(studies), "done")
    cm = confusion_matrix(y_true, y_pred)
    scored = [r for r in rows if r["status"] == "scored"]
    pos = [r["involvement_percent"] for r in scored if r["true"] != "CT-0"]
    neg = [r["involvement_percent"] for r in scored if r["true"] == "CT-0"]
    return {
        "layout": "mosmed",
        "data_dir": str(data_dir),
        "model": scorer.name,
        "model_version": scorer.version,
        "device": device,
        "n": len(studies),
        "n_scored": len(scored),
        "n_not_scored": len(studies) - len(scored),
        "categories": list(CATEGORIES),
        "confusion_matrix": cm.tolist(),
        "quadratic_kappa": quadratic_weighted_kappa(cm) if scored else None,
        "recall_per_class": recall_per_class(cm),
        "auc_ct0_vs_rest": auc(pos, neg),
        "dice_mean": _mean(dices),
        "n_dice": len(dices),
        "seconds": round(time.perf_counter() - started, 3),
        "studies": rows,
    }


# -- covid-semiseg-2d -------------------------------------------------------------------


PIXEL_CLASSES = ("background", "ground glass", "consolidation")
WORST_SHOWN = 6


def _net_lesions(settings):
    """A function (gray (H, W) uint8, image source) -> lesion probability (H, W), and its
    threshold, model, version; the image is re-windowed from its source's window to the
    one the weights were trained in."""
    import torch

    from worker.scoring.hybrid import VERSION
    from worker.scoring.lesion_net import DEFAULT_WEIGHTS, NAME, load_weights, predict_images, sha256_of, window_of

    path = Path(settings.lesion_weights) if settings.lesion_weights else DEFAULT_WEIGHTS
    model, meta = load_weights(path)
    threshold = float(meta.get("threshold", 0.5))
    window = window_of(meta, path)

    def run(gray: np.ndarray, source: str) -> np.ndarray:
        with torch.inference_mode():
            g = torch.from_numpy(network_gray(gray, source, window) / 255.0)
            return predict_images(model, [g])[0].numpy()

    return run, threshold, NAME, f"{VERSION}+{sha256_of(path)[:12]}"


def evaluate_semiseg(folder: Path, settings, *, progress: Progress | None = None,
                     pixel_mm: float = 0.75) -> dict:
    """Per-image and mean lesion Dice on a covid-semiseg-2d folder, with the pixel confusion.

    ``settings.scorer`` ``hybrid`` scores the slices with the lesion network directly (the
    images are already lung-windowed gray); otherwise with the classical 2D lesion step
    on HU estimated by :func:`gray_to_hu`. The pixel confusion has rows = truth
    (background, ground glass, consolidation when ``GT-multiclass/`` holds the image,
    else background and lesion) and columns = prediction (background, ground glass,
    consolidation: predicted lesion split at the hybrid's consolidation HU on the
    estimated HU)."""
    from PIL import Image

    from worker.scoring.hybrid import CONSOLIDATION_HU  # imports torch

    device = resolve_device(settings.device)
    pairs = semiseg_pairs(folder)
    if not pairs:
        raise InvalidInput(f"{folder}: no Imgs/*.jpg with a GT/*.png of the same name")
    use_net = (settings.scorer or "").strip().lower() == "hybrid"
    if use_net:
        net, threshold, model_name, model_version = _net_lesions(settings)
    else:
        from worker.scoring.classical import NAME, VERSION, segment_slice

        model_name, model_version, threshold = NAME + "-2d", VERSION, None
    multiclass_dir = Path(folder) / "GT-multiclass"
    confusion = np.zeros((3, 3), dtype=np.int64)
    binary_only = True
    rows: list[dict[str, Any]] = []
    dices: list[float] = []
    examples: list[tuple] = []
    started = time.perf_counter()
    for i, (img_path, gt_path) in enumerate(pairs):
        if progress:
            progress(i, len(pairs), img_path.name)
        gray = np.asarray(Image.open(img_path).convert("L"))
        truth = np.asarray(Image.open(gt_path).convert("L")) > 127
        hu, how = gray_to_hu(gray)
        try:
            if use_net:
                # COVID-SemiSeg's coronacases.org images are re-windowed to the network's
                # window, as in training; MedSeg's (train/, val/) are in it already
                source = source_of(img_path.stem)
                lesion = net(gray, source) >= threshold
                how = f"network on the gray image ({source} window)"
            else:
                _, lesion = segment_slice(hu, pixel_mm=pixel_mm, device=device)
            d = dice(lesion, truth)
            status = "scored"
        except Exception as exc:  # one bad image is reported in its row, not fatal
            lesion, d, status = np.zeros_like(truth), 0.0, f"failed: {type(exc).__name__}: {exc}"
        d = 1.0 if d is None else d  # both empty: perfect agreement
        dices.append(d)
        predicted = np.where(lesion, np.where(hu >= CONSOLIDATION_HU, 2, 1), 0)
        mc = multiclass_dir / gt_path.name
        if mc.is_file():
            binary_only = False
            true_cls = np.clip(np.asarray(Image.open(mc).convert("L")), 0, 2).astype(np.int64)
            if true_cls.shape != truth.shape:
                true_cls = truth.astype(np.int64)
        else:
            true_cls = truth.astype(np.int64)
        confusion += np.bincount(true_cls.ravel() * 3 + predicted.ravel(), minlength=9).reshape(3, 3)
        rows.append({"image": img_path.name, "dice": round(d, 4), "hu_mapping": how,
                     "truth_fraction": round(float(truth.mean()), 4),
                     "predicted_fraction": round(float(lesion.mean()), 4), "status": status})
        examples.append((gray, truth, lesion, d, img_path.name))
    if progress:
        progress(len(pairs), len(pairs), "done")
    examples.sort(key=lambda e: e[3])
    true_names = ("background", "lesion") if binary_only else PIXEL_CLASSES
    cm = confusion[: len(true_names)]
    return {
        "layout": "semiseg",
        "data_dir": str(folder),
        "model": model_name,
        "model_version": model_version,
        "device": device,
        "n": len(pairs),
        "confusion_matrix": None,
        "quadratic_kappa": None,
        "recall_per_class": None,
        "auc_ct0_vs_rest": None,
        "dice_mean": _mean(dices),
        "dice_median": float(np.median(dices)) if dices else None,
        "threshold": threshold,
        "pixel_confusion": {"rows_truth": list(true_names), "columns_predicted": list(PIXEL_CLASSES),
                            "counts": cm.tolist(),
                            "recall": [None if r.sum() == 0 else round(float(r[1:].sum() / r.sum() if k else
                                                                                  r[0] / r.sum()), 4)
                                       for k, r in enumerate(cm)]},
        "anchors": {"semi_inf_net_dice": 0.739, "inf_net_dice": 0.682, "unet_dice": 0.439,
                    "source": "Fan et al., Inf-Net, IEEE TMI 2020, COVID-SemiSeg test set"},
        "pixel_mm_assumed": None if use_net else pixel_mm,
        "seconds": round(time.perf_counter() - started, 3),
        "images": rows,
        "worst": [e[4] for e in examples[:WORST_SHOWN]],
        "_examples": examples[:WORST_SHOWN],
    }


def evaluate(data_dir: Path, settings, *, progress: Progress | None = None,
             figure: Path | None = None) -> dict:
    """Evaluate whatever layout ``data_dir`` has; write the PNG figure when asked."""
    layout, folder = detect_layout(Path(data_dir))
    if layout == "mosmed":
        report = evaluate_mosmed(folder, settings, progress=progress)
    else:
        report = evaluate_semiseg(folder, settings, progress=progress)
    examples = report.pop("_examples", None)
    if figure is not None:
        write_figure(report, Path(figure), examples)
        report["figure"] = str(figure)
    return report


# -- figure (pillow only) -----------------------------------------------------------------


def _font():
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=14)
    except TypeError:  # pragma: no cover - old pillow
        return ImageFont.load_default()


def write_figure(report: dict, path: Path, examples=None) -> Path:
    """Confusion matrix + involvement by true class (MosMed), or example overlays and
    the Dice distribution (slices)."""
    from PIL import Image, ImageDraw

    font = _font()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if report["layout"] == "mosmed":
        img = Image.new("RGB", (980, 460), "white")
        draw = ImageDraw.Draw(img)
        cm = np.asarray(report["confusion_matrix"])
        cell, x0, y0 = 60, 90, 70
        peak = max(int(cm.max()), 1)
        draw.text((x0, 15), f"Confusion matrix (n={report['n_scored']}/{report['n']} scored), "
                  f"QWK={_fmt(report['quadratic_kappa'])}", fill="black", font=font)
        draw.text((x0 + 90, y0 - 22), "predicted", fill="black", font=font)
        for k, name in enumerate(CATEGORIES):
            draw.text((x0 + k * cell + 12, y0 - 5 - 0), "", fill="black", font=font)
            draw.text((x0 + k * cell + 10, y0 + 5 * cell + 6), name, fill="black", font=font)
            draw.text((x0 - 50, y0 + k * cell + 22), name, fill="black", font=font)
            for j in range(5):
                v = int(cm[k, j])
                shade = int(255 - 200 * v / peak)
                color = (shade, shade, 255) if k == j else (255, shade, shade)
                draw.rectangle([x0 + j * cell, y0 + k * cell, x0 + (j + 1) * cell - 2,
                                y0 + (k + 1) * cell - 2], fill=color, outline="gray")
                draw.text((x0 + j * cell + 22, y0 + k * cell + 22), str(v), fill="black", font=font)
        draw.text((10, y0 + 5 * cell + 30), "rows: true category", fill="black", font=font)
        draw.text((10, y0 + 5 * cell + 50),
                  f"AUC CT-0 vs rest {_fmt(report['auc_ct0_vs_rest'])}   Dice {_fmt(report['dice_mean'])}"
                  f" (n={report.get('n_dice', 0)})", fill="black", font=font)
        # involvement by true class, with the category boundaries
        px0, py0, pw, ph = 480, 60, 460, 330
        draw.rectangle([px0, py0, px0 + pw, py0 + ph], outline="black")
        draw.text((px0, 15), "Involvement % by true category", fill="black", font=font)
        for b in (0.5, 25, 50, 75):
            y = py0 + ph - ph * b / 100.0
            draw.line([px0, y, px0 + pw, y], fill=(200, 200, 200))
            draw.text((px0 - 34, y - 8), f"{b:g}", fill="gray", font=font)
        for k, name in enumerate(CATEGORIES):
            x = px0 + (k + 0.5) * pw / 5
            draw.text((x - 16, py0 + ph + 6), name, fill="black", font=font)
            vals = [r["involvement_percent"] for r in report["studies"]
                    if r["true"] == name and r.get("involvement_percent") is not None]
            for i, v in enumerate(vals):
                jitter = ((i * 37) % 21 - 10) * 2
                y = py0 + ph - ph * min(max(v, 0), 100) / 100.0
                ok = [r for r in report["studies"] if r["true"] == name][i].get("predicted") == name
                draw.ellipse([x + jitter - 3, y - 3, x + jitter + 3, y + 3],
                             fill=(40, 160, 40) if ok else (220, 40, 40))
        img.save(path)
        return path
    # slices
    tiles = []
    for gray, truth, lesion, d, name in (examples or []):
        from PIL import Image as _Image

        g = np.asarray(gray, dtype=np.uint8)
        rgb = np.stack([g, g, g], axis=-1).astype(np.float32)
        both = truth & lesion
        rgb[truth & ~lesion] = rgb[truth & ~lesion] * 0.5 + np.array([0, 0, 255]) * 0.5
        rgb[lesion & ~truth] = rgb[lesion & ~truth] * 0.5 + np.array([255, 0, 0]) * 0.5
        rgb[both] = rgb[both] * 0.5 + np.array([0, 200, 0]) * 0.5
        tile = _Image.fromarray(rgb.astype(np.uint8)).resize((240, 240))
        ImageDraw.Draw(tile).text((4, 4), f"{name} Dice {d:.2f}", fill="yellow", font=font)
        tiles.append(tile)
    width = max(3, len(tiles)) * 240 // (2 if len(tiles) > 3 else 1)
    cols = 3
    rows_n = max(1, math.ceil(len(tiles) / cols))
    img = Image.new("RGB", (cols * 240, rows_n * 240 + 220), "white")
    for i, t in enumerate(tiles):
        img.paste(t, ((i % cols) * 240, (i // cols) * 240))
    draw = ImageDraw.Draw(img)
    y = rows_n * 240 + 8
    draw.text((8, y - 0), f"the {len(tiles)} worst images by Dice.", fill="black", font=font)
    y += 18
    draw.text((8, y), f"green: agree, red: predicted only, blue: missed.  mean Dice "
              f"{_fmt(report['dice_mean'])} (n={report['n']}); U-Net 0.44, Inf-Net 0.68, Semi-Inf-Net 0.74",
              fill="black", font=font)
    ds = [r["dice"] for r in report["images"]]
    hist = np.histogram(ds, bins=10, range=(0, 1))[0]
    peak = max(int(hist.max()), 1)
    for b, h in enumerate(hist):
        x = 40 + b * 60
        draw.rectangle([x, y + 170 - 130 * h / peak, x + 50, y + 170], fill=(90, 120, 200))
        draw.text((x, y + 174), f"{b / 10:.1f}", fill="black", font=font)
    del width
    img.save(path)
    return path


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def to_json(report: dict) -> str:
    return json.dumps(report, indent=1, default=_json_default)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")
