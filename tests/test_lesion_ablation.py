"""The lesion ablation trainer (issue 19): the split that selects is per volume and
deterministic, a run resumes bit-identically from its checkpoint, the report's Dice is
measured at the native resolution. Synthetic data in the covid-semiseg-2d layout; tiny
networks; no real training."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from ct_triage_tools import ablation
from ct_triage_tools.ablation import (
    REPORT_VOLUMES,
    SELECTION_RADIOLOGIST,
    SELECTION_VOLUMES,
    AblationRecipe,
    native_dice,
    run_recipe,
    split,
)

TINY = AblationRecipe(size=32, base=4, levels=3, batch=4, epochs=2, limit=4)


def _write_semiseg(root: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)

    def pair(folder: Path, name: str) -> None:
        (folder / "Imgs").mkdir(parents=True, exist_ok=True)
        (folder / "GT").mkdir(parents=True, exist_ok=True)
        h, w = int(rng.integers(40, 60)), int(rng.integers(40, 60))
        img = np.full((h, w), 20, np.uint8)
        mask = np.zeros_like(img)
        r, c = rng.integers(10, h - 10), rng.integers(10, w - 10)
        yy, xx = np.ogrid[:h, :w]
        blob = (yy - r) ** 2 + (xx - c) ** 2 < 60
        img[blob] = 70
        mask[blob] = 255
        img = np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / "Imgs" / f"{name}.jpg")
        Image.fromarray(mask).save(folder / "GT" / f"{name}.png")

    for name in ["1", "2", "5", "6", *SELECTION_RADIOLOGIST[:3]]:
        pair(root / "train", name)
    for i in range(3):
        pair(root / "val", str(100 + i))
    volumes = ["Data-1_coronacases_org_001", "Data-1_radiopaedia_org_covid-19-pneumonia-7_85703_0-dcm",
               SELECTION_VOLUMES[0], SELECTION_VOLUMES[2], REPORT_VOLUMES[0]]
    for v in volumes:
        for i in range(3):
            pair(root / "train-pseudo", f"{v}_{i}")


@pytest.fixture(scope="module")
def semiseg(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("semiseg")
    _write_semiseg(root)
    return root


def test_the_selection_split_is_per_volume_and_deterministic(semiseg):
    groups = split(semiseg)
    assert groups == split(semiseg)  # same lists, same order
    vols = {g: {s.volume for s in v} for g, v in groups.items() if "pseudo" in g}
    assert vols["select_pseudo"] == {SELECTION_VOLUMES[0], SELECTION_VOLUMES[2]}
    assert vols["report_pseudo"] == {REPORT_VOLUMES[0]}
    assert not vols["train_pseudo"] & (set(SELECTION_VOLUMES) | set(REPORT_VOLUMES))
    # every slice of a volume is in one group, never split across
    for a in vols:
        for b in vols:
            assert a == b or not vols[a] & vols[b], (a, b)
    assert sorted(s.name for s in groups["select_radiologist"]) == sorted(SELECTION_RADIOLOGIST[:3])
    assert {s.name for s in groups["train_radiologist"]} == {"1", "2", "5", "6"}
    assert len(groups["val"]) == 3
    # the named selection and report volumes are distinct and exist in the real data set
    assert not set(SELECTION_VOLUMES) & set(REPORT_VOLUMES) and len(SELECTION_VOLUMES) == 3


def test_the_split_on_the_real_data(shared_data):
    groups = split(shared_data / "covid-semiseg-2d")
    counts = {g: len(v) for g, v in groups.items()}
    assert counts == {"train_radiologist": 42, "train_pseudo": 1120, "select_radiologist": 8,
                      "select_pseudo": 225, "report_pseudo": 255, "val": 24}


def test_native_dice_resizes_the_prediction_to_the_mask():
    prob = np.zeros((4, 4), np.float32)
    prob[:, :2] = 1.0  # the left half, at a quarter of the native size
    truth = np.zeros((8, 8), bool)
    truth[:, :4] = True
    assert native_dice(prob, truth, 0.5) == pytest.approx(1.0)
    truth[:, 4:6] = True  # three quarters drawn: 2 * 32 / (32 + 48)
    assert native_dice(prob, truth, 0.5) == pytest.approx(0.8)
    # a non-square native mask (the slices are 200..500 px, not square)
    truth = np.zeros((8, 12), bool)
    truth[:, :6] = True
    assert native_dice(prob, truth, 0.5) == pytest.approx(1.0)
    assert native_dice(np.zeros((4, 4)), np.zeros((8, 8), bool), 0.5) == 1.0  # both empty
    assert native_dice(np.zeros((4, 4)), truth, 0.5) == 0.0


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_a_run_resumed_from_its_checkpoint_is_bit_identical(semiseg, tmp_path):
    whole = run_recipe(TINY, tmp_path / "whole", semiseg, report=False)
    assert whole["finished"] and [e["epoch"] for e in whole["history"]] == [1, 2]
    part = run_recipe(TINY, tmp_path / "part", semiseg, stop_after=1)
    assert not part["finished"] and part["epochs_done"] == 1
    assert not (tmp_path / "part" / "epoch_002.pt").exists()
    with pytest.raises(FileExistsError, match="--resume"):
        run_recipe(TINY, tmp_path / "part", semiseg)  # never overwrites a run by accident
    with pytest.raises(ValueError, match="another name"):
        run_recipe(replace(TINY, seed=1), tmp_path / "part", semiseg, resume=True)
    resumed = run_recipe(TINY, tmp_path / "part", semiseg, resume=True, report=False)
    assert resumed["finished"]
    a, b = _state(tmp_path / "whole" / "epoch_002.pt"), _state(tmp_path / "part" / "epoch_002.pt")
    for key in ("model", "optimizer", "scheduler", "torch_generator", "torch_global", "numpy_rng", "epoch"):
        _assert_same(a[key], b[key], key)
    ha, hb = json.loads(a["history"]), json.loads(b["history"])
    assert [e["selection"] for e in ha] == [e["selection"] for e in hb]
    assert [e["loss"] for e in ha] == [e["loss"] for e in hb]


def test_a_finished_recipe_reports_once_at_native_resolution(semiseg, tmp_path):
    results = tmp_path / "ablation.jsonl"
    out = run_recipe(TINY, tmp_path / "r", semiseg, results=results)
    line = json.loads(results.read_text())
    for key in ("recipe", "selection_per_epoch", "chosen_epoch", "threshold", "val_dice_mean", "val_dice_median",
                "report_pseudo_dice_mean", "cpu_seconds"):
        assert key in line, key
    assert line["recipe"]["size"] == 32 and len(line["selection_per_epoch"]) == 2
    assert line["chosen_epoch"] == max(line["selection_per_epoch"], key=lambda e: (e["score"], -e["epoch"]))["epoch"]
    assert 0.0 <= line["val_dice_mean"] <= 1.0 and line["val_slices"] == 3
    assert set(out["val_dice_per_image"]) == {"100", "101", "102"}
    assert (tmp_path / "r" / "chosen.pt").is_file() and (tmp_path / "r" / "result.json").is_file()
    # resuming a finished run reports the stored result and appends nothing
    again = run_recipe(TINY, tmp_path / "r", semiseg, resume=True, results=results)
    assert again["val_dice_mean"] == out["val_dice_mean"] and len(results.read_text().splitlines()) == 1


def test_presets_and_overrides():
    assert ablation.PRESETS["baseline"] == AblationRecipe(size=192, rewindow=False, base=16, epochs=6, seed=0)
    r = ablation.parse_overrides(ablation.BASELINE, ["size=256", "rewindow=on", "lr=1e-3", "loss=bce"])
    assert (r.size, r.rewindow, r.lr, r.loss) == (256, True, 1e-3, "bce")
    with pytest.raises(ValueError, match="unknown recipe field"):
        ablation.parse_overrides(ablation.BASELINE, ["width=3"])
    with pytest.raises(ValueError, match="loss"):
        ablation.parse_overrides(ablation.BASELINE, ["loss=hinge"])


def test_the_queue_file_is_read_again_after_every_run(tmp_path):
    runs = tmp_path / "runs"
    (runs / "baseline").mkdir(parents=True)
    (runs / "baseline" / "result.json").write_text("{}")  # finished: skipped
    queue = tmp_path / "queue.txt"
    queue.write_text("baseline rad1  # the radiologist weighting\nnot-a-preset\n")
    it = ablation._queued(["rewindow"], queue, runs)
    assert next(it) == "rewindow"
    assert next(it) == "rad1"
    queue.write_text(queue.read_text() + "size128\n")  # appended while the queue runs
    assert list(it) == ["size128"]  # each tried once, unknown names skipped


def test_the_queue_command_takes_a_file_alone(tmp_path, capsys):
    """``queue --file F`` with no preset named (argparse refused the empty list once)."""
    queue = tmp_path / "queue.txt"
    queue.write_text("not-a-preset\n")
    assert ablation.main(["--runs", str(tmp_path / "runs"), "queue", "--file", str(queue)]) == 0
    assert '"skipped": "not a preset"' in capsys.readouterr().out
