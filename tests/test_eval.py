"""``ct-triage eval``: metrics, the MosMedData layout (built from phantoms) and the
covid-semiseg-2d slice layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ct_triage.settings import Settings
from ct_triage_tools.datasets import detect_layout, write_nifti_study
from ct_triage_tools.evaluate import (
    auc,
    confusion_matrix,
    dice,
    evaluate,
    quadratic_weighted_kappa,
    recall_per_class,
)
from ct_triage_tools.phantom import make_phantom
from tests.support.cli import run_tool_command
from worker.scoring.load import load_nifti, nifti_array_zrc

# -- metrics --------------------------------------------------------------------------------


def test_confusion_recall_kappa():
    cm = confusion_matrix([0, 1, 1, 2, 4], [0, 1, 2, 2, 3])
    assert cm.shape == (5, 5) and cm.sum() == 5
    assert cm[1, 2] == 1 and cm[4, 3] == 1
    assert recall_per_class(cm) == [1.0, 0.5, 1.0, None, 0.0]
    perfect = confusion_matrix([0, 1, 2, 3, 4], [0, 1, 2, 3, 4])
    assert quadratic_weighted_kappa(perfect) == pytest.approx(1.0)
    # a known value: two raters, 3 classes (checked by hand)
    cm3 = np.array([[2, 1, 0], [0, 2, 1], [0, 0, 2]])
    # weights (i-j)^2/4; observed = 2 * 0.25 = 0.5; expected from marginals [3,3,2] x [2,3,3] / 8
    expected = sum(((i - j) ** 2 / 4) * r * c / 8 for i, r in enumerate([3, 3, 2]) for j, c in enumerate([2, 3, 3]))
    assert quadratic_weighted_kappa(cm3) == pytest.approx(1 - 0.5 / expected)
    assert quadratic_weighted_kappa(np.zeros((5, 5))) is None
    # all predictions CT-1 (the majority class): kappa 0, however good the accuracy
    always_one = confusion_matrix([0, 1, 1, 1, 2], [1, 1, 1, 1, 1])
    assert quadratic_weighted_kappa(always_one) == pytest.approx(0.0)


def test_auc_and_dice():
    assert auc([3, 4, 5], [0, 1, 2]) == 1.0
    assert auc([0, 1], [2, 3]) == 0.0
    assert auc([1, 2], [1, 2]) == 0.5  # ties count half
    assert auc([0.8, 0.4, 0.6], [0.5, 0.1]) == pytest.approx(5 / 6)
    assert auc([], [1]) is None
    a = np.zeros((4, 4), bool)
    b = a.copy()
    assert dice(a, b) is None
    a[0, :2] = True
    b[0, 1:3] = True
    assert dice(a, b) == pytest.approx(0.5)


# -- MosMedData layout from phantoms ---------------------------------------------------------------


def build_mosmed(root: Path, cases, rows=160, slices=36) -> dict:
    """studies/CT-k/study_XXXX.nii.gz (+ masks for some) from phantoms; returns truths."""
    truths = {}
    for sid, (involvement, seed, with_mask) in enumerate(cases, start=1):
        ph = make_phantom(involvement, slices=slices, rows=rows, seed=seed, slice_spacing_mm=300.0 / slices)
        cat = ph.ground_truth["category"]
        write_nifti_study(ph.volume.hu, ph.volume.spacing_mm, root / "studies" / cat / f"study_{sid:04d}.nii.gz")
        if with_mask:
            write_nifti_study(ph.lesion_mask.astype(np.uint8), ph.volume.spacing_mm,
                              root / "masks" / f"study_{sid:04d}_mask.nii.gz", dtype=np.uint8)
        truths[f"study_{sid:04d}"] = ph.ground_truth
    return truths


@pytest.fixture(scope="module")
def mosmed(tmp_path_factory):
    root = tmp_path_factory.mktemp("mosmed")
    truths = build_mosmed(root, [(0, 1, False), (12, 2, True), (35, 3, True), (62, 4, False), (85, 5, False)])
    return root, truths


def test_nifti_round_trip(tmp_path):
    ph = make_phantom(20, slices=24, rows=96, seed=1, slice_spacing_mm=12.5)
    path = write_nifti_study(ph.volume.hu, ph.volume.spacing_mm, tmp_path / "study_0001.nii.gz")
    v = load_nifti(path)
    assert np.array_equal(v.hu, ph.volume.hu)
    assert v.spacing_mm == pytest.approx(ph.volume.spacing_mm)
    m = write_nifti_study(ph.lesion_mask.astype(np.uint8), ph.volume.spacing_mm, tmp_path / "m.nii.gz",
                          dtype=np.uint8)
    assert np.array_equal(nifti_array_zrc(m)[0] > 0, ph.lesion_mask)


def test_evaluate_mosmed_layout(mosmed, tmp_path):
    root, truths = mosmed
    assert detect_layout(root) == ("mosmed", root)
    seen = []
    report = evaluate(root, Settings.from_env({}, device="cpu"), progress=lambda i, n, m: seen.append((i, n)),
                      figure=tmp_path / "eval.png")
    assert report["n"] == 5 and report["n_scored"] == 5
    cm = np.array(report["confusion_matrix"])
    assert cm.shape == (5, 5) and cm.sum() == 5
    assert np.trace(cm) >= 4  # CT-0 may read as CT-1 (noise floor 0.5 %)
    assert report["quadratic_kappa"] >= 0.9
    assert report["auc_ct0_vs_rest"] == 1.0
    assert len(report["recall_per_class"]) == 5
    assert report["n_dice"] == 2 and report["dice_mean"] >= 0.6
    for row in report["studies"]:
        assert abs(row["involvement_percent"] - truths[row["study"]]["involvement_percent"]) <= 5.0
    assert seen[0] == (0, 5) and seen[-1] == (5, 5)
    png = Image.open(tmp_path / "eval.png")
    assert png.size[0] > 400


def run_command(*argv: str) -> tuple[int, str, str]:
    return run_tool_command(*argv)


def test_eval_command_json(mosmed, tmp_path):
    root, _ = mosmed
    figure = tmp_path / "fig.png"
    code, out, err = run_command("eval", str(root), "--json", "--figure", str(figure),
                                 "--output", str(tmp_path / "report.json"))
    assert code == 0
    data = json.loads(out)  # one object
    for key in ("n", "confusion_matrix", "quadratic_kappa", "recall_per_class", "auc_ct0_vs_rest", "dice_mean"):
        assert key in data
    assert figure.exists() and (tmp_path / "report.json").exists()
    assert "eval [5/5]" in err  # progress on stderr


# -- covid-semiseg-2d layout ----------------------------------------------------------------------


def test_evaluate_slice_layout(tmp_path):
    """Imgs/*.jpg (lung-windowed, cropped) + GT/*.png, built from phantom slices."""
    (tmp_path / "Imgs").mkdir()
    (tmp_path / "GT").mkdir()
    ph = make_phantom(40, slices=30, rows=256, seed=2, slice_spacing_mm=10.0)
    for k in (10, 14, 18):
        hu = ph.volume.hu[k].astype(np.float32)
        rows = np.flatnonzero(ph.lung_mask[k].any(axis=1))
        cols = np.flatnonzero(ph.lung_mask[k].any(axis=0))
        box = (slice(rows[0] - 4, rows[-1] + 5), slice(cols[0] - 4, cols[-1] + 5))
        gray = np.clip((hu[box] + 1350) / 1500 * 255, 0, 255).astype(np.uint8)  # lung window
        Image.fromarray(gray).save(tmp_path / "Imgs" / f"{k}.jpg", quality=95)
        Image.fromarray((ph.lesion_mask[k][box] * 255).astype(np.uint8)).save(tmp_path / "GT" / f"{k}.png")
    assert detect_layout(tmp_path) == ("semiseg", tmp_path)
    report = evaluate(tmp_path, Settings.from_env({}, device="cpu"), figure=tmp_path / "fig.png")
    assert report["n"] == 3 and report["dice_mean"] > 0.5
    assert report["confusion_matrix"] is None and report["auc_ct0_vs_rest"] is None
    assert (tmp_path / "fig.png").exists()


def test_unknown_layout_is_a_clear_error(tmp_path):
    from ct_triage.errors import InvalidInput

    with pytest.raises(InvalidInput, match="neither a MosMedData layout"):
        detect_layout(tmp_path)
