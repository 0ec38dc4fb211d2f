"""The real CT data beside the repository (``<repo>/../shared/data``) and a skip when it is absent.

Under CI (``CI`` set and not false/0, as CI services set it) absent data is a failure:
a CI run that silently skipped the real-CT tests would pass without testing them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
LUNG_PET_CT = SHARED_DATA / "lung-pet-ct-dx"
NY_SBU = SHARED_DATA / "covid-19-ny-sbu-slices"
MOSMED_MASKS = SHARED_DATA / "mosmed-masks" / "masks"


def need(path: Path) -> Path:
    """``path``, or skip the test when the shared data is not there."""
    if not path.exists():
        missing_data(f"real test data not found at {path} (expected the shared data folder "
                     f"beside the repository: <repo>/../shared/data)")
    return path


def in_ci(environ=os.environ) -> bool:
    return environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing_data(reason: str) -> None:
    """Skip the test with ``reason``; under CI fail it instead."""
    if in_ci():
        pytest.fail(f"{reason}; CI must run the real-CT tests", pytrace=False)
    pytest.skip(reason)
