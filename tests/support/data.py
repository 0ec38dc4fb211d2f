"""The real CT data beside the repository (``<repo>/../shared/data``) and a skip when it is absent."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
LUNG_PET_CT = SHARED_DATA / "lung-pet-ct-dx"
NY_SBU = SHARED_DATA / "covid-19-ny-sbu-slices"
MOSMED_MASKS = SHARED_DATA / "mosmed-masks" / "masks"


def need(path: Path) -> Path:
    """``path``, or skip the test when the shared data is not there."""
    if not path.exists():
        pytest.skip(f"real test data not found at {path} (expected the shared data folder "
                    f"beside the repository: <repo>/../shared/data)")
    return path
