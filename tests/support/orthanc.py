"""The throw-away Orthanc PACS of the tests: :mod:`ct_triage_tools.pacs` (shared with the
demo and bench/)."""

from __future__ import annotations

from ct_triage_tools.pacs import ORTHANC, OrthancError, OrthancServer, available
from ct_triage_tools.ports import free_port

__all__ = ["ORTHANC", "OrthancError", "OrthancServer", "available", "free_port", "require_orthanc"]


def require_orthanc() -> None:
    """Fail (not skip) the test when Orthanc is missing: CI installs it."""
    import pytest

    if not available():
        pytest.fail("Orthanc is not installed (apt-get install orthanc); .ci/run installs it")
