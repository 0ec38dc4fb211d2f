"""The 3D U-Net scorer: weights from a file, a few training steps on phantoms, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ct_triage.errors import ConfigError
from ct_triage.settings import Settings
from ct_triage_tools.train import train_unet
from tests.support.cli import run_tool_command
from tests.test_eval import build_mosmed
from worker.scoring.base import Scorer
from worker.scoring.registry import clear_cache, get_scorer
from worker.scoring.unet import UNet3D, UNetScorer, load_weights, save_weights


def test_network_shapes_and_weights_round_trip(tmp_path):
    torch.manual_seed(0)
    net = UNet3D(base=4)
    x = torch.randn(1, 1, 8, 32, 32)
    assert net(x).shape == (1, 1, 8, 32, 32)
    path = save_weights(net, tmp_path / "w.pt", meta={"note": "test"})
    loaded, blob = load_weights(path)
    assert blob["meta"]["note"] == "test"
    net.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))


def test_missing_or_foreign_weights_name_the_path(tmp_path):
    with pytest.raises(ConfigError, match=str(tmp_path / "none.pt")):
        UNetScorer(tmp_path / "none.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match="bad.pt"):
        UNetScorer(bad)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(ConfigError, match="not a ct-triage-unet3d weights file"):
        UNetScorer(other)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("unet")
    build_mosmed(root, [(0, 1, False), (30, 2, True), (60, 3, True)], rows=128, slices=32)
    log = []
    summary = train_unet(root, root / "unet.pt", steps=4, patch=(8, 48, 48), batch=2,
                         progress=lambda i, n, info: log.append((i, n, info)))
    return root, summary, log


def test_train_few_steps_on_phantoms(trained):
    root, summary, log = trained
    assert summary["studies"] == 3 and summary["steps"] == 4
    assert (root / "unet.pt").exists()
    steps = [i for i, _, info in log if info.get("stage") == "training"]
    assert steps == [1, 2, 3, 4]
    assert all(np.isfinite(info["loss"]) for _, _, info in log if info.get("stage") == "training")


def test_unet_scorer_end_to_end(trained):
    from worker.scoring.pipeline import score_path

    root, _, _ = trained
    clear_cache()
    settings = Settings.from_env({}, device="cpu", scorer="unet", unet_weights=str(root / "unet.pt"))
    scorer = get_scorer(settings)
    assert isinstance(scorer, Scorer) and scorer is get_scorer(settings)  # built once
    study = next((root / "studies").rglob("study_0002.nii.gz"))
    r = score_path(study, settings)
    assert r.status == "scored", r.reason
    assert r.model == "ct-triage-unet3d" and r.device == "cpu"
    assert r.lung_volume_ml > 1000 and 0 <= r.involvement_percent <= 100
    assert r.category is not None
    # same interface, same arithmetic as the classical scorer: lungs are the classical ones
    classical = score_path(study, Settings.from_env({}, device="cpu"))
    assert r.lung_volume_ml == classical.lung_volume_ml


def test_train_command(trained, tmp_path):
    root, _, _ = trained
    code, out, err = run_tool_command("train", str(root), "--steps", "2", "--out", str(tmp_path / "w.pt"), "--json")
    assert code == 0
    assert json.loads(out)["weights"] == str(tmp_path / "w.pt")
    assert "train [2/2]" in err
    UNetScorer(Path(tmp_path / "w.pt"))  # loads
