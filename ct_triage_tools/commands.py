"""The offline sub-commands of ``ct-triage``: ``phantom``, ``score``, ``eval``, ``train``, ``demo``.

``ct_triage_app.cli`` calls :func:`register` with its sub-parsers (only when one of these
commands, help or an unknown command is asked for, so the daemon's commands never import
this package). Every handler, here as in the CLI, is ``func(args, settings) -> exit code``.
Results go to stdout (``--json``: exactly one JSON object), progress and messages to stderr.

Exit codes of ``score``: 0 scored, 2 not applicable (the reason is printed), 1 failed.
``demo``: 0 when every phantom study's outputs reached the PACS, else 1.
Other commands: 0 success, 1 failure.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ct_triage_tools.datasets import detect_layout
from ct_triage_tools.evaluate import evaluate, to_json
from ct_triage_tools.phantom import write_phantom
from worker.scoring.device import resolve_device
from worker.scoring.pipeline import score_path

_TRANSFER_SYNTAXES = {
    "explicit": "1.2.840.10008.1.2.1",
    "implicit": "1.2.840.10008.1.2",
    "rle": "1.2.840.10008.1.2.5",
    "jpeg2000": "1.2.840.10008.1.2.4.90",
}


TOOL_COMMANDS = ("phantom", "score", "eval", "train", "demo")


def register(subparsers) -> None:
    """Add the :data:`TOOL_COMMANDS` to an argparse sub-parsers object."""
    p = subparsers.add_parser("phantom", help="write a synthetic chest CT series with known involvement")
    p.add_argument("out_dir", type=Path, help="folder to write <kernel>/IM*.dcm and ground_truth.json into")
    p.add_argument("--involvement", type=float, required=True, help="lesion share of the lungs, %% (0-95)")
    p.add_argument("--slices", type=int, default=300, help="number of slices (default 300)")
    p.add_argument("--rows", type=int, default=512, help="rows = columns (default 512)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    p.add_argument("--kernels", default="FC51", help="comma-separated kernels, one series each (e.g. FC51,FC07)")
    p.add_argument("--transfer-syntax", choices=sorted(_TRANSFER_SYNTAXES), default="explicit")
    p.add_argument("--json", action="store_true", help="print the ground truth as JSON")
    p.set_defaults(func=cmd_phantom)

    s = subparsers.add_parser("score", help="score a DICOM folder or file, or a NIfTI file, offline")
    s.add_argument("path", type=Path, help="DICOM folder (all series; one is selected), DICOM file or .nii[.gz]")
    s.add_argument("--json", action="store_true", help="print one JSON object (the full result)")
    s.add_argument("--device", choices=("auto", "cpu", "cuda"), help="override CT_TRIAGE_DEVICE")
    s.add_argument("--scorer", choices=("classical", "hybrid", "unet"), help="override CT_TRIAGE_SCORER")
    s.add_argument("--weights", type=Path, help="weights file of the U-Net (CT_TRIAGE_UNET_WEIGHTS) or, with "
                   "--scorer hybrid, of the lesion network (CT_TRIAGE_LESION_WEIGHTS)")
    s.add_argument("--no-boxes", action="store_true", help="leave the per-slice lesion boxes out of --json")
    s.set_defaults(func=cmd_score)

    e = subparsers.add_parser("eval", help="evaluate on a MosMedData-layout or covid-semiseg-2d folder")
    e.add_argument("data_dir", type=Path, help="studies/CT-k/*.nii.gz (+ masks/) or Imgs/ + GT/")
    e.add_argument("--json", action="store_true", help="print the report as one JSON object")
    e.add_argument("--figure", type=Path, default=None,
                   help="PNG figure to write (default ./ct-triage-eval-<layout>.png)")
    e.add_argument("--output", type=Path, default=None, help="also write the JSON report to this file")
    e.add_argument("--device", choices=("auto", "cpu", "cuda"), help="override CT_TRIAGE_DEVICE")
    e.add_argument("--scorer", choices=("classical", "hybrid", "unet"), help="override CT_TRIAGE_SCORER")
    e.add_argument("--weights", type=Path, help="U-Net weights file, or the lesion network's with --scorer hybrid")
    e.set_defaults(func=cmd_eval)

    t = subparsers.add_parser("train", help="train the 2D lesion network (--lesion, covid-semiseg-2d) or the "
                              "3D U-Net (MosMedData layout)")
    t.add_argument("data_dir", type=Path, help="covid-semiseg-2d folder (with --lesion), else "
                   "studies/CT-k/study_XXXX.nii.gz + masks/study_XXXX_mask.nii.gz")
    t.add_argument("--lesion", action="store_true",
                   help="train the hybrid scorer's 2D lesion network (reproduces the shipped weights with the "
                   "defaults); prints its CPU time")
    t.add_argument("--epochs", type=int, default=None, help="(--lesion) planned epochs of the schedule")
    t.add_argument("--finetune-epochs", type=int, default=None,
                   help="(--lesion) epochs of stage 2, fine-tuning from stage 1's best (0: one stage)")
    t.add_argument("--stop-after", type=int, default=None, help="(--lesion) stop after this many epochs")
    t.add_argument("--limit", type=int, default=None, help="(--lesion) use only this many training slices")
    t.add_argument("--work-dir", type=Path, default=None,
                   help="(--lesion) checkpoints and log (default VAR_DIR/train-lesion)")
    t.add_argument("--out", type=Path, default=None,
                   help="weights file to write (default CT_TRIAGE_UNET_WEIGHTS or VAR_DIR/unet3d.pt)")
    t.add_argument("--steps", type=int, default=500, help="optimisation steps (default 500)")
    t.add_argument("--batch", type=int, default=2)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", choices=("auto", "cpu", "cuda"), help="override CT_TRIAGE_DEVICE")
    t.add_argument("--json", action="store_true", help="print the training summary as JSON")
    t.set_defaults(func=cmd_train)

    demo = subparsers.add_parser("demo", help="embedded daemon + local PACS + three phantom studies, end to end")
    demo.add_argument("--workdir", default="var/demo", help="scratch folder (emptied first)")
    demo.set_defaults(func=cmd_demo)


# -- helpers ------------------------------------------------------------------------------


def _settings(settings, args):
    """``settings`` with the command line's --device/--scorer/--weights applied."""
    changes = {}
    if getattr(args, "device", None):
        changes["device"] = args.device
    if getattr(args, "scorer", None):
        changes["scorer"] = args.scorer
    if getattr(args, "weights", None):
        if changes.get("scorer", settings.scorer) == "hybrid":
            changes["lesion_weights"] = args.weights
        else:
            changes["unet_weights"] = args.weights
            changes.setdefault("scorer", "unet")
    if changes:
        settings = dataclasses.replace(settings, **changes)
        settings.validate()
    return settings


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _print(args, data, human: Callable[[], str]) -> None:
    """A command's result on stdout: ``data`` as one JSON line with --json, else ``human()``."""
    print(json.dumps(data) if args.json else human())


class _Progress:
    """One line per update on stderr (rewritten in place on a terminal)."""

    def __init__(self, label: str):
        self.label = label
        self.tty = sys.stderr.isatty()
        self.started = time.perf_counter()
        self.last = 0.0

    def __call__(self, i: int, n: int, what) -> None:
        now = time.perf_counter()
        final = i >= n
        if not final and self.tty and now - self.last < 0.1:
            return
        self.last = now
        if isinstance(what, dict):
            what = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in what.items())
        pct = 100.0 * i / max(n, 1)
        line = f"{self.label} [{i}/{n}] {pct:5.1f}% {now - self.started:6.1f}s {what}"
        if self.tty:
            sys.stderr.write("\r" + line[:160].ljust(160) + ("\n" if final else ""))
            sys.stderr.flush()
        else:
            _err(line)


# -- commands -------------------------------------------------------------------------------


def cmd_phantom(args, settings) -> int:
    kernels = tuple(k.strip() for k in args.kernels.split(",") if k.strip())
    _err(f"writing phantom: involvement {args.involvement:g} %, {args.slices} x {args.rows}^2, "
         f"seed {args.seed}, kernels {','.join(kernels)} -> {args.out_dir}")
    truth = write_phantom(args.out_dir, args.involvement, slices=args.slices, rows=args.rows,
                          seed=args.seed, kernels=kernels,
                          transfer_syntax=_TRANSFER_SYNTAXES[args.transfer_syntax])
    if args.json:
        brief = {k: v for k, v in truth.items() if k != "lesion_boxes"}
        brief["lesion_boxes"] = len(truth.get("lesion_boxes", []))
        print(json.dumps(brief))
    else:
        print(f"{args.out_dir}: {truth['category']} {truth['involvement_percent']:.2f} % "
              f"(left {truth['involvement_percent_left']:.2f} %, right {truth['involvement_percent_right']:.2f} %), "
              f"lungs {truth['lung_volume_ml']:.0f} ml, lesions {truth['lesion_volume_ml']:.0f} ml; "
              f"ground truth in {Path(args.out_dir) / 'ground_truth.json'}")
    return 0


def cmd_score(args, settings) -> int:
    settings = _settings(settings, args)
    _err(f"scoring {args.path} (scorer {settings.scorer}, device {settings.device})")
    result = score_path(args.path, settings)
    data = result.to_json()
    if args.no_boxes:
        data["boxes"] = []
    data["box_count"] = len(result.boxes)
    _print(args, data, lambda: _human(result))
    return {"scored": 0, "not_applicable": 2}.get(result.status, 1)


def _human(r) -> str:
    if r.status != "scored":
        return f"{r.status.upper()}: {r.reason}\n(priority {r.priority}; model {r.model}, {r.seconds:.1f} s)"
    lines = [
        f"{r.category}  {r.involvement_percent:.1f} % of the lungs involved "
        f"(left {r.involvement_percent_left:.1f} %, right {r.involvement_percent_right:.1f} %)  "
        f"priority {r.priority}",
        f"lungs {r.lung_volume_ml:.0f} ml (left {r.lung_volume_left_ml:.0f}, right {r.lung_volume_right_ml:.0f}); "
        f"lesions {r.lesion_volume_ml:.0f} ml in {r.lesion_count} region(s), {len(r.boxes)} boxes on "
        f"{len({b.slice_index for b in r.boxes})} slices",
        f"model {r.model} {r.model_version} on {r.device}, {r.seconds:.2f} s",
        f"series {r.series_instance_uid}",
    ]
    return "\n".join(lines)


def cmd_eval(args, settings) -> int:
    settings = _settings(settings, args)
    layout, folder = detect_layout(args.data_dir)
    figure = args.figure or Path(f"ct-triage-eval-{layout}.png")
    _err(f"evaluating {folder} ({layout} layout)")
    report = evaluate(args.data_dir, settings, progress=_Progress("eval"), figure=figure)
    text = to_json(report)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text)
    _print(args, json.loads(text), lambda: _human_eval(report))
    _err(f"figure written to {figure}")
    return 0


def _human_eval(rep: dict) -> str:
    def f(v):
        return "n/a" if v is None else f"{v:.3f}"

    if rep["layout"] == "semiseg":
        out = [f"{r['image']:>40}  Dice {r['dice']:.3f}" + ("" if r["status"] == "scored" else f"  {r['status']}")
               for r in rep["images"]]
        out.append(f"{rep['n']} slices ({rep['model']} {rep['model_version']}): mean lesion Dice "
                   f"{f(rep['dice_mean'])} (median {f(rep.get('dice_median'))}); published U-Net 0.44, "
                   f"Inf-Net 0.68, Semi-Inf-Net 0.74")
        pc = rep.get("pixel_confusion")
        if pc:
            out.append("pixel confusion (rows truth, columns predicted):")
            out.append(" " * 16 + " ".join(f"{c:>14}" for c in pc["columns_predicted"]))
            for name, row in zip(pc["rows_truth"], pc["counts"]):
                out.append(f"{name:>15} " + " ".join(f"{v:>14}" for v in row))
        out.append("worst: " + ", ".join(rep.get("worst", [])))
        return "\n".join(out)
    out = [f"{rep['n']} studies, {rep['n_scored']} scored; quadratic kappa {f(rep['quadratic_kappa'])}; "
           f"AUC CT-0 vs rest {f(rep['auc_ct0_vs_rest'])}; Dice {f(rep['dice_mean'])} (n={rep['n_dice']})",
           "confusion matrix (rows true, columns predicted):",
           "        " + " ".join(f"{c:>5}" for c in rep["categories"])]
    for name, row in zip(rep["categories"], rep["confusion_matrix"]):
        out.append(f"  {name} " + " ".join(f"{v:>5}" for v in row))
    out.append("recall: " + ", ".join(f"{c} {f(r)}" for c, r in zip(rep["categories"], rep["recall_per_class"])))
    return "\n".join(out)


def cmd_train(args, settings) -> int:
    if args.lesion:
        return cmd_train_lesion(args, settings)
    from ct_triage_tools.train import train_unet  # imports torch

    settings = _settings(settings, args)
    out = args.out or settings.unet_weights or (Path(settings.var_dir) / "unet3d.pt")
    device = resolve_device(settings.device)
    _err(f"training the 3D U-Net on {args.data_dir} for {args.steps} steps on {device} -> {out}")
    summary = train_unet(args.data_dir, Path(out), steps=args.steps, batch=args.batch, lr=args.lr,
                         seed=args.seed, device=device, progress=_Progress("train"))
    _print(args, summary, lambda: (
        f"weights written to {summary['weights']} ({summary['studies']} studies, {summary['steps']} steps, "
        f"final loss {summary['final_loss']:.4f}, {summary['seconds']:.0f} s); "
        f"use CT_TRIAGE_SCORER=unet CT_TRIAGE_UNET_WEIGHTS={summary['weights']}"))
    return 0


def cmd_train_lesion(args, settings) -> int:
    from ct_triage_tools.train_lesion import Recipe, train_staged  # imports torch

    settings = _settings(settings, args)
    work = args.work_dir or (Path(settings.var_dir) / "train-lesion")
    out = args.out or (work / "lesion_net.pt")
    recipe = Recipe(seed=args.seed)
    if args.epochs is not None:
        recipe.epochs = args.epochs
    if args.finetune_epochs is not None:
        recipe.finetune_epochs = args.finetune_epochs
    recipe.stop_after = args.stop_after
    recipe.limit = args.limit
    stages = f" + {recipe.finetune_epochs} fine-tuning" if recipe.finetune_epochs else ""
    _err(f"training the 2D lesion network on {args.data_dir}: {recipe.epochs}{stages} epochs planned, "
         f"seed {recipe.seed}, CPU -> {out}")

    def log(entry: dict) -> None:
        if entry.get("stage") == "epoch":
            _err("epoch {epoch}: loss {loss} val Dice {val_dice} held-out Dice {holdout_dice} threshold {threshold} "
                 "({train_seconds} s + {val_seconds} s)".format(**entry))
        else:
            _err(" ".join(f"{k}={v}" for k, v in entry.items()))

    summary = train_staged(args.data_dir, work, recipe, log=log, weights_out=Path(out))
    _print(args, summary, lambda: (
        f"weights written to {summary.get('weights')} (epoch {summary['best_epoch']} of "
        f"{summary['epochs_run']}: val Dice {summary['val_dice']}, held-out pseudo Dice "
        f"{summary['holdout_dice']}, threshold {summary['threshold']}); sha256 {summary.get('sha256')}"))
    print(f"training time: {summary['cpu_seconds']:.0f} s CPU, {summary['wall_seconds']:.0f} s wall")
    return 0


def cmd_demo(args, settings) -> int:
    from ct_triage_tools.demo import print_rows, run_demo  # imports the whole daemon

    rows = run_demo(settings, Path(args.workdir))
    print_rows(rows)
    return 0 if all(r.state == "in PACS" for r in rows) else 1
