#!/usr/bin/env python
"""Benchmark: real-anatomy lesion insertion (issue #19, item 4), scored by the daemon's scorers.

Lesion shapes of the 50 MosMedData masks are inserted into the four real chest CTs of
``shared/data/lung-pet-ct-dx`` (both kernels of both patients) at 5, 15, 30, 45, 60 and 80 %
of a frozen lung mask, by the fixed model of ``ct_triage_tools.insertion`` (its docstring:
mask procedure, placement, confluent growth, HU and noise). Each inserted volume is scored
through ``worker.scoring.pipeline.score_volume``, the daemon's own entry.

Reported per scorer, series and level: truth %, scored %, error in points, truth and scored
category; then per scorer and per series the mean absolute error and the category
agreement, and over all cases (the issue's targets: mean error at most 5 points, category
agreement at least 90 %). Each series is also scored unmodified (the scorer's own reading
of these non-COVID lungs), shown apart and not in the means.

Usage:  .venv/bin/python bench/insertion_bench.py [--data ../shared/data] [--series NAME,...]
        [--levels 5,15,30,45,60,80] [--scorers classical,hybrid] [--weights PATH] [--seed 0]
        [--variant SETTING=VALUE ...] [--montage DIR] [--freeze] [--json]

``--weights PATH`` adds a column: the hybrid scorer with that lesion-network file (the new
model). ``--freeze`` recomputes the lung masks and writes their checksums to
``ct_triage_tools/insertion_masks.json`` (do it only after checking the montage by eye);
without it the benchmark refuses to run when a mask differs from the frozen one.
``--montage DIR`` writes PNGs of every series with its mask (green) and, for every level,
the inserted lesions (red: ground glass, yellow: consolidation).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ct_triage_tools import insertion  # noqa: E402 (after the checkout is on sys.path)

DEFAULT_DATA = ROOT.parent / "shared" / "data"
TARGET_MEAN_ERROR = 5.0
TARGET_AGREEMENT = 90.0
GREEN, RED, YELLOW = (0, 220, 0), (255, 40, 40), (255, 230, 0)


def _scorers(names: list[str], weights: Path | None, device: str, variants: list[str] = ()) -> dict:
    """Column name -> (settings, scorer), built once; each variant (``setting=value``) adds
    the hybrid scorer with that setting changed."""
    from ct_triage.settings import Settings
    from worker.scoring.registry import get_scorer

    built = {}
    for name in names:
        settings = Settings.from_env({}, device=device, scorer=name)
        built[name] = (settings, get_scorer(settings))
    if weights is not None:
        settings = Settings.from_env({}, device=device, scorer="hybrid", lesion_weights=weights)
        built[f"hybrid+{weights.name}"] = (settings, get_scorer(settings))
    for variant in variants:
        key, _, value = variant.partition("=")
        settings = Settings.from_env({}, device=device, scorer="hybrid", **{key: value})
        built[f"hybrid {key}={value}"] = (settings, get_scorer(settings))
    return built


def _score(volume, settings, scorer) -> dict:
    from worker.scoring.pipeline import score_volume

    t = time.perf_counter()
    result = score_volume(volume, settings, scorer=scorer)
    return {"status": result.status, "reason": result.reason, "percent": result.involvement_percent,
            "category": result.category, "lung_ml": result.lung_volume_ml, "lesion_ml": result.lesion_volume_ml,
            "seconds": round(time.perf_counter() - t, 2)}


def _freeze(args) -> int:
    records = {}
    for name in args.series:
        case = insertion.prepare_case(args.data / "lung-pet-ct-dx" / name, check=False)
        records[name] = insertion.mask_record(case.lung, case.volume.spacing_mm)
        print(f"{name}: {records[name]['voxels']} voxels, {records[name]['volume_ml']} ml, "
              f"noise {case.noise_sigma_hu:.1f} HU", file=sys.stderr)
        if args.montage:
            insertion.render_montage(case.volume.hu, [(case.lung, GREEN)], args.montage / f"mask_{name}.png")
    insertion.write_frozen(records)
    print(f"wrote {insertion.FROZEN_MASKS_JSON}", file=sys.stderr)
    return 0


def _run_series(name: str, args, scorers: dict) -> list[dict]:
    case = insertion.prepare_case(args.data / "lung-pet-ct-dx" / name)
    shapes = insertion.shape_library(args.data / "mosmed-masks" / "masks", case.volume.spacing_mm)
    print(f"{name}: lung {case.lung_ml:.0f} ml, noise {case.noise_sigma_hu:.1f} HU, {len(shapes)} shapes",
          file=sys.stderr, flush=True)
    if args.montage:
        insertion.render_montage(case.volume.hu, [(case.lung, GREEN)], args.montage / f"mask_{name}.png")
    rows = [{"series": name, "target": 0.0, "truth": 0.0, "truth_category": "unmodified",
             "lung_ml": round(case.lung_ml, 1), "noise_hu": round(case.noise_sigma_hu, 1),
             "scores": {col: _score(case.volume, s, sc) for col, (s, sc) in scorers.items()}}]
    for level in args.levels:
        t = time.perf_counter()
        ins = insertion.insert_lesions(case, level, shapes, seed=args.seed)
        seconds = time.perf_counter() - t
        if args.montage:
            ggo = ins.lesion & ~ins.consolidation
            insertion.render_montage(ins.volume.hu, [(ggo, RED), (ins.consolidation, YELLOW)],
                                     args.montage / f"inserted_{name}_{level:g}.png")
        row = {"series": name, "target": level, "truth": round(ins.truth_percent, 2),
               "truth_category": ins.truth_category, "shapes": ins.shapes_placed,
               "grown": round(ins.grown_percent, 2), "insert_s": round(seconds, 1), "scores": {}}
        for col, (settings, scorer) in scorers.items():
            score = _score(ins.volume, settings, scorer)
            if score["percent"] is not None:
                score["error"] = round(score["percent"] - ins.truth_percent, 2)
            score["agrees"] = score["category"] == ins.truth_category
            row["scores"][col] = score
        print(f"  {level:g} %: truth {row['truth']} % " + ", ".join(
            f"{c} {s['percent']} %" for c, s in row["scores"].items()), file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def summarise(rows: list[dict], columns: list[str]) -> dict:
    """Per scorer: mean |error|, max |error| and category agreement, overall and per series."""
    summary: dict = {}
    for col in columns:
        cases = [r for r in rows if r["truth_category"] != "unmodified"]
        summary[col] = {"all": _stats([r["scores"][col] for r in cases])}
        for name in dict.fromkeys(r["series"] for r in cases):
            summary[col][name] = _stats([r["scores"][col] for r in cases if r["series"] == name])
    return summary


def _stats(scores: list[dict]) -> dict:
    errors = [abs(s.get("error", 100.0)) for s in scores]
    agree = sum(bool(s["agrees"]) for s in scores)
    return {"cases": len(scores), "mean_abs_error": round(sum(errors) / max(1, len(errors)), 2),
            "max_abs_error": round(max(errors, default=0.0), 2),
            "category_agreement": round(100.0 * agree / max(1, len(scores)), 1)}


def markdown(rows: list[dict], summary: dict, columns: list[str]) -> str:
    lines = ["| series | target % | truth % (category) | " + " | ".join(
        f"{c} % (error, category)" for c in columns) + " |",
        "|---|---|---|" + "---|" * len(columns)]
    for r in rows:
        truth = "unmodified" if r["truth_category"] == "unmodified" else f"{r['truth']:.1f} ({r['truth_category']})"
        cells = []
        for col in columns:
            s = r["scores"][col]
            if s["percent"] is None:
                cells.append(f"{s['status']}: {s['reason']}")
            elif r["truth_category"] == "unmodified":
                cells.append(f"{s['percent']:.1f} ({s['category']})")
            else:
                mark = "" if s["agrees"] else " ✗"
                cells.append(f"{s['percent']:.1f} ({s['error']:+.1f}, {s['category']}{mark})")
        target = "–" if r["truth_category"] == "unmodified" else f"{r['target']:g}"
        lines.append(f"| {r['series']} | {target} | {truth} | " + " | ".join(cells) + " |")
    lines += ["", "| scorer | series | mean abs error (points) | max abs error | category agreement |",
              "|---|---|---|---|---|"]
    for col in columns:
        for name, st in summary[col].items():
            label = "**all**" if name == "all" else name
            lines.append(f"| {col} | {label} | {st['mean_abs_error']:.2f} | {st['max_abs_error']:.2f} | "
                         f"{st['category_agreement']:.0f} % ({st['cases']} cases) |")
    lines.append("")
    lines.append(f"Targets (issue #19): mean abs error ≤ {TARGET_MEAN_ERROR:g} points, category agreement "
                 f"≥ {TARGET_AGREEMENT:g} % over all cases.")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--series", default=",".join(insertion.SERIES_NAMES))
    parser.add_argument("--levels", default=",".join(f"{p:g}" for p in insertion.TARGET_PERCENTS))
    parser.add_argument("--scorers", default="classical,hybrid")
    parser.add_argument("--weights", type=Path, help="add the hybrid scorer with this lesion-network file")
    parser.add_argument("--variant", action="append", default=[], metavar="SETTING=VALUE",
                        help="add the hybrid scorer with this setting changed, e.g. mass_exclusion=exclude "
                             "or lesion_hu_normalisation=air-soft (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--montage", type=Path, help="write PNG montages here")
    parser.add_argument("--freeze", action="store_true", help="(re)write the frozen lung-mask checksums")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    args.series = [s for s in args.series.split(",") if s]
    args.levels = [float(v) for v in args.levels.split(",") if v]
    if not (args.data / "lung-pet-ct-dx").is_dir():
        print(f"real data not found at {args.data} (expected <repo>/../shared/data)", file=sys.stderr)
        return 2
    if args.freeze:
        return _freeze(args)
    scorers = _scorers([s for s in args.scorers.split(",") if s], args.weights, args.device, args.variant)
    started = time.perf_counter()
    try:
        rows = [row for name in args.series for row in _run_series(name, args, scorers)]
    except insertion.FrozenMaskError as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 3
    columns = list(scorers)
    summary = summarise(rows, columns)
    report = {"model": insertion.MODEL_VERSION, "seed": args.seed, "levels": args.levels, "rows": rows,
              "summary": summary, "seconds": round(time.perf_counter() - started, 1),
              "machine": {"cpus": len(os.sched_getaffinity(0)), "load_average_1min": round(os.getloadavg()[0], 1)}}
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(markdown(rows, summary, columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
