"""The scanner side of node tests: :mod:`ct_triage_tools.scanner` (shared with bench/),
plus the pytest-only check that dcmtk is installed."""

from __future__ import annotations

from pathlib import Path

from ct_triage_tools.scanner import (
    ECHOSCU,
    STORESCU,
    SeriesOnDisk,
    acknowledged_files,
    copy_series,
    dcmtk_env,
    echoscu,
    free_port,
    storescu,
    wait_echo,
    write_ct_series,
)

__all__ = [
    "ECHOSCU", "STORESCU", "SeriesOnDisk", "acknowledged_files", "copy_series", "dcmtk_env", "echoscu",
    "free_port", "require_dcmtk", "storescu", "wait_echo", "write_ct_series",
]


def require_dcmtk() -> None:
    import pytest

    if not Path(STORESCU).exists():
        pytest.fail("dcmtk is not installed (apt-get install dcmtk); .ci/run installs it")
