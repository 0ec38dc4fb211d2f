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
# 0.6957 (model card), rounded down slightly here: a regression guard. The target
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
    g = hu_to_gray(np.array([-2000.0, -1059.0, -997.5, -872.5, 37.5, 3000.0])) * 255
    assert g[0] == 0 and g[1] == 0 and g[-1] == 255
    # the tissue peaks of the MedSeg images the window was fitted to: outside air -> 14.5,
    # lung parenchyma -> 44 (gray levels); soft tissue saturates, as in those images
    assert g[2].item() == pytest.approx(14.5, abs=1.0)
    assert g[3].item() == pytest.approx(44, abs=1.0)
    assert g[4].item() == 255


def test_source_images_are_rewindowed_to_the_network_window():
    from ct_triage_tools.datasets import MEDSEG_WINDOW_HU, network_gray, source_of

    assert MEDSEG_WINDOW_HU == (lesion_net.WINDOW_LOW_HU, lesion_net.WINDOW_HIGH_HU)
    assert source_of("Data-1_coronacases_org_001_12") == "coronacases"
    assert source_of("Data-1_radiopaedia_org_covid-19-pneumonia-7_85703_0-dcm_3") == "radiopaedia"
    assert source_of("36") == "medseg"
    gray = np.array([0, 14, 100, 255], dtype=np.uint8)
    # coronacases.org's lung peak (14) lands on MedSeg's (44); its soft tissue saturates
    out = network_gray(gray, "coronacases")
    assert out[1] == pytest.approx(44, abs=1.0) and out[2] == 255 and out[3] == 255
    assert np.array_equal(network_gray(gray, "medseg"), gray.astype(np.float32))
    assert np.array_equal(network_gray(gray, "radiopaedia"), gray.astype(np.float32))


def test_weights_name_their_window_and_a_missing_one_is_refused(tmp_path):
    model = LesionNet(base=4, levels=3, size=64).eval()
    save_weights(model, tmp_path / "w.pt", {"window_hu": [-1019.0, 1676.0]}, half=False)
    _, meta = load_weights(tmp_path / "w.pt")
    assert lesion_net.window_of(meta) == (-1019.0, 1676.0)
    blob = torch.load(tmp_path / "w.pt", weights_only=True)
    del blob["meta"]["window_hu"]
    torch.save(blob, tmp_path / "w.pt")
    lesion_net.checksum_path(tmp_path / "w.pt").write_text(f"{sha256_of(tmp_path / 'w.pt')}  w.pt\n")
    with pytest.raises(WeightsError, match="no HU window"):
        load_weights(tmp_path / "w.pt")


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


# -- how the hybrid combines the network with the classical candidates ----------------------


def _lungs(z: int = 6, size: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """A box of aerated lung (-860 HU) in slices 1..z-2 of a (z, size, size) volume."""
    lung = np.zeros((z, size, size), dtype=bool)
    lung[1:z - 1, 5:35, 5:35] = True
    hu = np.where(lung, -860.0, 40.0).astype(np.float32)
    return lung, hu


def test_hybrid_drops_network_lesion_without_lung_above_or_below():
    """Thick-slice partial volume of the diaphragm dome or the apex: the network's haze in
    the first or last lung slice is not counted (the classical candidates' rule)."""
    from worker.scoring.hybrid import lesion_mask

    lung, hu = _lungs()
    hu[1:5, 10:20, 10:20] = -550.0  # ground glass through four slices
    prob = np.zeros(lung.shape, dtype=np.float32)
    prob[1:5, 10:20, 10:20] = 0.9
    lesion, consolidation = lesion_mask(prob, hu, lung, (5.0, 1.4, 1.4), 0.5)
    assert not lesion[1].any() and not lesion[4].any()  # the lung's first and last slice
    assert lesion[2:4, 11:19, 11:19].all() and not consolidation.any()


def test_hybrid_takes_extent_from_confirmed_classical_candidates_only():
    from worker.scoring.hybrid import CONFIRM_FRACTION, LESION_FLOOR_HU, lesion_mask

    lung, hu = _lungs()
    cand = np.zeros(lung.shape, dtype=bool)
    # region A: a classical candidate the network sees a third of -> joins whole
    hu[2:4, 6:16, 6:30] = -600.0
    cand[2:4, 6:16, 6:30] = True
    prob = np.zeros(lung.shape, dtype=np.float32)
    prob[2:4, 6:16, 6:14] = 0.9
    # region B: a candidate the network does not see (dependent density, say) -> stays out
    hu[2:4, 24:34, 6:30] = -600.0
    cand[2:4, 24:34, 6:30] = True
    prob[2:4, 24:34, 6:7] = 0.9  # under CONFIRM_FRACTION of it
    assert CONFIRM_FRACTION > 10 / 240
    # the network's blur into aerated lung (below the floor) is not lesion
    prob[2:4, 18:22, 6:30] = 0.9
    assert hu[2, 19, 10] < LESION_FLOOR_HU
    lesion, _ = lesion_mask(prob, hu, lung, (5.0, 1.4, 1.4), 0.5, cand)
    assert lesion[2:4, 6:16, 6:30].all()
    assert not lesion[2:4, 18:22].any()
    assert lesion[2:4, 24:34].sum() <= 2 * 10  # only the network's own sliver, if anything
    without, _ = lesion_mask(prob, hu, lung, (5.0, 1.4, 1.4), 0.5)
    assert without[2:4, 6:16, 14:30].sum() == 0  # the extent came from the candidate


def test_hybrid_hands_on_ground_glass_and_consolidation_masks():
    """Dense lesion voxels (>= CONSOLIDATION_HU) are consolidation, the rest ground glass;
    the two masks partition the lesion and reach the result's masks (for the SEG and SR)."""
    from worker.scoring.hybrid import CONSOLIDATION_HU, HybridScorer
    from worker.scoring.masks import ResultMasks
    from worker.scoring.volume import Volume

    lung, hu = _lungs()
    hu[2:4, 8:20, 8:20] = -550.0
    hu[2:4, 10:18, 10:18] = 0.0  # a consolidated core (11 mm: no vessel) inside the ground glass
    assert CONSOLIDATION_HU <= 0.0
    prob = np.zeros(lung.shape, dtype=np.float32)
    prob[2:4, 8:20, 8:20] = 0.9
    from worker.scoring.hybrid import lesion_mask

    lesion, consolidation = lesion_mask(prob, hu, lung, (5.0, 1.4, 1.4), 0.5)
    assert consolidation.any() and (consolidation <= lesion).all()
    assert consolidation[2, 14, 14] and not consolidation[2, 9, 9] and lesion[2, 9, 9]
    # through the scorer: a phantom with consolidation (85 %) gets both masks
    from ct_triage_tools.phantom import make_phantom

    ph = make_phantom(85, slices=40, rows=128, seed=1, slice_spacing_mm=7.5)
    seg = HybridScorer().segment(Volume(hu=ph.volume.hu, spacing_mm=ph.volume.spacing_mm))
    assert seg.ggo is not None and seg.consolidation is not None
    assert not (seg.ggo & seg.consolidation).any() and np.array_equal(seg.ggo | seg.consolidation, seg.lesion)
    assert seg.ggo.any() and seg.consolidation.any()
    masks = ResultMasks.from_segmentation(seg)
    assert masks.ggo is not None and masks.consolidation is not None


def test_hybrid_builds_folded_copies_for_any_device_from_the_loaded_weights():
    """BatchNorm is folded into the convolutions of each device's copy; the copies are made
    from the untouched loaded model (a folded model's weights no longer fit a fresh network:
    copying one for CUDA failed). ``meta`` stands in for a second device."""
    from worker.scoring.hybrid import HybridScorer

    scorer = HybridScorer()
    cpu = scorer._copies.on("cpu")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in cpu.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in scorer.model.modules())  # the loaded model is kept
    x = torch.rand(2, 1, 128, 128)
    with torch.inference_mode():
        assert torch.allclose(cpu(x), scorer.model(x), atol=1e-4)
    other = scorer._copies.on("meta")
    assert next(other.parameters()).device.type == "meta"
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in other.modules())
    assert scorer._copies.on("cpu") is cpu
