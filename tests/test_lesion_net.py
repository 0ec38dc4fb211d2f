"""The learned 2D lesion network, its shipped weights and the hybrid scorer (issue 10).

Real data (../shared/data) is needed for the Dice and the non-COVID checks; those skip
with a message when it is absent. The tiny training run uses a synthetic folder in the
covid-semiseg-2d layout so it runs everywhere, in seconds.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ct_triage.errors import ConfigError
from ct_triage.settings import Settings
from worker.scoring import lesion_net
from worker.scoring.lesion_net import (
    DEFAULT_WEIGHTS,
    LesionNet,
    WeightsError,
    hu_to_gray,
    load_weights,
    save_weights,
    sha256_of,
)

# The mean per-image Dice the shipped weights reach on covid-semiseg-2d/val (24 slices) is
# 0.6912 (model card), rounded down slightly here: a regression guard. The target
# (0.74, Semi-Inf-Net) is NOT reached; the model card reports the figure against it.
SHIPPED_VAL_DICE_AT_LEAST = 0.69


@pytest.fixture
def weights_copy(tmp_path) -> Path:
    dst = tmp_path / "lesion_net.pt"
    shutil.copy(DEFAULT_WEIGHTS, dst)
    shutil.copy(lesion_net.checksum_path(DEFAULT_WEIGHTS), lesion_net.checksum_path(dst))
    return dst


# -- the shipped weights file ---------------------------------------------------------------


def test_shipped_weights_load_verified_and_are_small():
    assert DEFAULT_WEIGHTS.stat().st_size <= 20 * 1024 * 1024
    model, meta = load_weights()
    assert isinstance(model, LesionNet) and not model.training
    assert lesion_net.expected_sha256(DEFAULT_WEIGHTS) == sha256_of(DEFAULT_WEIGHTS)
    assert meta["window_hu"] == [lesion_net.WINDOW_LOW_HU, lesion_net.WINDOW_HIGH_HU]
    assert 0.05 < meta["threshold"] < 0.95
    assert meta["val_dice"] >= SHIPPED_VAL_DICE_AT_LEAST


def test_tampered_weights_are_refused_with_a_clear_error(weights_copy):
    data = bytearray(weights_copy.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit in the middle of the tensors
    weights_copy.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=r"were altered: SHA-256 [0-9a-f]{64} does not match the recorded"):
        load_weights(weights_copy)
    # through the scorer factory it is a configuration error naming the file
    from worker.scoring.registry import clear_cache, get_scorer

    clear_cache()
    with pytest.raises(ConfigError, match=str(weights_copy.name)):
        get_scorer(Settings.from_env({}, scorer="hybrid", lesion_weights=weights_copy))
    clear_cache()


def test_missing_or_malformed_checksum_is_refused(weights_copy):
    side = lesion_net.checksum_path(weights_copy)
    side.write_text("not a digest\n")
    with pytest.raises(WeightsError, match="holds no SHA-256 digest"):
        load_weights(weights_copy)
    side.unlink()
    with pytest.raises(WeightsError, match="checksum file .* is missing"):
        load_weights(weights_copy)
    with pytest.raises(WeightsError, match="do not exist"):
        load_weights(weights_copy.with_name("nowhere.pt"))


def test_a_foreign_file_with_a_matching_checksum_is_refused(tmp_path):
    path = tmp_path / "foreign.pt"
    torch.save({"format": "something-else", "state_dict": {}}, path)
    lesion_net.checksum_path(path).write_text(f"{sha256_of(path)}  foreign.pt\n")
    with pytest.raises(WeightsError, match="are not a"):
        load_weights(path)
    # pickled code is not loaded (weights_only): an arbitrary object fails to read
    evil = tmp_path / "evil.pt"
    torch.save({"format": lesion_net.FORMAT, "state_dict": {}, "meta": {"x": Path("/")}}, evil)
    lesion_net.checksum_path(evil).write_text(f"{sha256_of(evil)}  evil.pt\n")
    with pytest.raises(WeightsError, match="cannot be read"):
        load_weights(evil)


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = LesionNet(base=4, levels=3, size=64).eval()
    digest = save_weights(model, tmp_path / "w.pt", {"threshold": 0.4}, half=False)
    assert digest == sha256_of(tmp_path / "w.pt")
    loaded, meta = load_weights(tmp_path / "w.pt")
    x = torch.rand(2, 1, 64, 64)
    with torch.inference_mode():
        assert torch.equal(model(x), loaded(x))
    assert meta["threshold"] == 0.4 and loaded.config() == {"base": 4, "levels": 3, "size": 64}


def test_hu_to_gray_is_the_fitted_window():
    g = hu_to_gray(np.array([-2000.0, -1019.0, -872.5, 37.5, 1676.0, 3000.0])) * 255
    assert g[0] == 0 and g[-1] == 255
    # the tissue peaks of the fit: lung parenchyma -> 14, soft tissue -> 100 (gray levels)
    assert g[2].item() == pytest.approx(14, abs=1.0)
    assert g[3].item() == pytest.approx(100, abs=1.0)


def test_bad_network_config_is_named():
    with pytest.raises(ValueError, match="bad config"):
        LesionNet(base=16, levels=4, size=100)


# -- a tiny training run (synthetic data in the covid-semiseg-2d layout) --------------------


def _write_semiseg(root: Path) -> None:
    from PIL import Image

    from ct_triage_tools.train_lesion import HOLDOUT_VOLUMES

    rng = np.random.default_rng(0)

    def pair(folder: Path, name: str) -> None:
        (folder / "Imgs").mkdir(parents=True, exist_ok=True)
        (folder / "GT").mkdir(parents=True, exist_ok=True)
        img = np.full((72, 88), 20, np.uint8)  # dark lung
        mask = np.zeros_like(img)
        r, c = rng.integers(15, 55), rng.integers(15, 70)
        yy, xx = np.ogrid[:72, :88]
        blob = (yy - r) ** 2 + (xx - c) ** 2 < 100
        img[blob] = 70  # ground glass
        mask[blob] = 255
        img = np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / "Imgs" / f"{name}.jpg")
        Image.fromarray(mask).save(folder / "GT" / f"{name}.png")

    for i in range(4):
        pair(root / "train", str(i))
    for i in range(2):
        pair(root / "val", str(10 + i))
    for i in range(4):
        pair(root / "train-pseudo", f"Data-1_volA_{i}")
        pair(root / "train-pseudo", f"{HOLDOUT_VOLUMES[0]}_{i}")


def test_tiny_training_run(tmp_path):
    from ct_triage_tools.train_lesion import Recipe, list_samples, train

    data = tmp_path / "semiseg"
    _write_semiseg(data)
    groups = {s.group for s in list_samples(data)}
    assert groups == {"train", "val", "pseudo", "holdout"}  # split by volume name
    entries = []
    recipe = Recipe(epochs=1, base=4, levels=3, size=48, batch=4, pseudo_per_epoch=4, threads=1)
    summary = train(data, tmp_path / "work", recipe, log=entries.append, weights_out=tmp_path / "w.pt")
    assert summary["epochs_run"] == 1 and summary["best_epoch"] == 1
    assert 0.0 <= summary["val_dice"] <= 1.0 and summary["cpu_seconds"] > 0
    assert [e["stage"] for e in entries] == ["data", "epoch"]
    assert entries[0]["holdout"] == 4 and entries[0]["train"] == 8
    model, meta = load_weights(tmp_path / "w.pt")
    assert meta["threshold"] in (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7)
    assert model.config() == {"base": 4, "levels": 3, "size": 48}
    # same seed, same weights
    again = train(data, tmp_path / "work2", recipe, weights_out=tmp_path / "w2.pt")
    model2, meta2 = load_weights(tmp_path / "w2.pt")
    for (k, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b), k
    assert meta2["val_dice"] == meta["val_dice"] and again["val_dice"] == summary["val_dice"]


def test_train_lesion_cli_prints_cpu_time(tmp_path):
    from tests.support.cli import run_tool_command

    data = tmp_path / "semiseg"
    _write_semiseg(data)
    rc, out, err = run_tool_command("train", str(data), "--lesion", "--epochs", "1", "--finetune-epochs", "1",
                                    "--limit", "6", "--work-dir", str(tmp_path / "w"),
                                    "--out", str(tmp_path / "w" / "net.pt"))
    assert rc == 0, err
    assert err.count("epoch 1: loss") == 2, err  # stage 1, then stage 2 from stage 1's weights
    assert (tmp_path / "w" / "stage1" / "lesion_net.pt").is_file()
    assert "stage_number=2" in err
    assert "training time:" in out and "s CPU" in out
    assert (tmp_path / "w" / "net.pt").is_file() and (tmp_path / "w" / "net.pt.sha256").is_file()


# -- the shipped weights on real data -------------------------------------------------------


def test_shipped_weights_val_dice(shared_data):
    from ct_triage_tools.train_lesion import list_samples, mean_dice, probabilities

    samples = [s for s in list_samples(shared_data / "covid-semiseg-2d") if s.group == "val"]
    assert len(samples) == 24
    model, meta = load_weights()
    torch.set_num_threads(2)
    dice, each = mean_dice(probabilities(model, samples), meta["threshold"])
    assert dice >= SHIPPED_VAL_DICE_AT_LEAST, (dice, each)
    assert dice == pytest.approx(meta["val_dice"], abs=0.01)  # what the model card reports


@pytest.mark.parametrize("folder", ["A0001-philips-L-5mm", "A0002-siemens-B70f-8mm"])
def test_hybrid_on_real_non_covid_series(shared_data, folder):
    from worker.scoring.pipeline import score_path
    from worker.scoring.registry import clear_cache

    clear_cache()
    r = score_path(shared_data / "lung-pet-ct-dx" / folder, Settings.from_env({}, device="cpu", scorer="hybrid"))
    assert r.status == "scored", r.reason
    assert r.model == "ct-triage-hybrid"
    assert r.involvement_percent <= 2.0, r.involvement_percent
    assert r.category in ("CT-0", "CT-1")
    assert 2000 <= r.lung_volume_ml <= 8000, r.lung_volume_ml
