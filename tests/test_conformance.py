"""docs/conformance-statement.md lists exactly the SOP classes and transfer syntaxes the node accepts.

The document's machine-checked tables sit between ``<!-- conformance:NAME -->`` and
``<!-- /conformance -->``; every UID cell is compared with the node AE's supported
presentation contexts. A context added to the node without the document (or the reverse)
fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "conformance-statement.md"
UID_CELL = re.compile(r"`(1\.2\.840\.10008\.[0-9.]+)`")
UPS = {"1.2.840.10008.5.1.4.34.6.1", "1.2.840.10008.5.1.4.34.6.2", "1.2.840.10008.5.1.4.34.6.3",
       "1.2.840.10008.5.1.4.34.6.4", "1.2.840.10008.5.1.4.34.6.5"}


def doc_table(name: str) -> list[str]:
    """UIDs in the first UID column of the named table, in order; duplicates kept (checked)."""
    text = DOC.read_text()
    match = re.search(rf"<!-- conformance:{re.escape(name)} -->\n(.*?)<!-- /conformance -->", text, re.S)
    assert match, f"table {name!r} not found in {DOC.name}"
    uids = []
    for line in match.group(1).splitlines():
        if not line.startswith("|"):
            continue
        found = UID_CELL.search(line)
        if found:
            uids.append(found.group(1))
    assert uids, f"table {name!r} has no UID rows"
    assert len(uids) == len(set(uids)), f"table {name!r} lists a UID twice"
    return uids


@pytest.fixture
def node_contexts(tmp_path, sqlite_url):
    from ct_triage.contract import EmbeddedPublisher
    from ct_triage.runtime import open_database
    from dicom_node import DicomNode
    from tests.conftest import make_settings

    settings = make_settings(tmp_path, sqlite_url)
    engine, session_factory = open_database(settings)
    node = DicomNode(settings, session_factory, EmbeddedPublisher())  # not started: contexts only
    contexts = {str(c.abstract_syntax): [str(t) for t in c.transfer_syntax] for c in node.ae.supported_contexts}
    engine.dispose()
    return contexts


def test_storage_sop_classes_and_their_transfer_syntaxes_match_the_node(node_contexts):
    from pynetdicom import AllStoragePresentationContexts

    storage = {str(c.abstract_syntax) for c in AllStoragePresentationContexts}
    documented = doc_table("scp-storage-sop-classes")
    accepted = {uid for uid in node_contexts if uid in storage}
    assert set(documented) == accepted, (
        f"accepted, not documented: {sorted(accepted - set(documented))}; "
        f"documented, not accepted: {sorted(set(documented) - accepted)}")
    syntaxes = doc_table("transfer-syntaxes-storage")
    for uid in accepted:
        assert node_contexts[uid] == syntaxes, f"{uid}: node {node_contexts[uid]} != document {syntaxes}"


def test_other_sop_classes_and_transfer_syntaxes_match_the_node(node_contexts):
    from pynetdicom import AllStoragePresentationContexts

    storage = {str(c.abstract_syntax) for c in AllStoragePresentationContexts}
    documented = set(doc_table("scp-sop-classes"))
    accepted = {uid for uid in node_contexts if uid not in storage}
    if not accepted & UPS:
        # The UPS SCP (issue 8) lands separately; until it is merged, the document's UPS rows
        # are the only ones allowed to be missing from the node. Afterwards they must match.
        documented -= UPS
    assert documented == accepted, (
        f"accepted, not documented: {sorted(accepted - documented)}; "
        f"documented, not accepted: {sorted(documented - accepted)}")
    syntaxes = doc_table("transfer-syntaxes-other")
    for uid in accepted:
        assert node_contexts[uid] == syntaxes, f"{uid}: node {node_contexts[uid]} != document {syntaxes}"


def test_created_iods_are_the_ones_the_writers_make():
    from pydicom.uid import SecondaryCaptureImageStorage

    created = doc_table("created-iods")
    assert created[0] == SecondaryCaptureImageStorage
    from worker.outputs import sr

    assert "1.2.840.10008.5.1.4.1.1.88.34" in created  # Comprehensive 3D SR (worker.outputs.sr)
    assert hasattr(sr, "build_measurement_report")
    assert "1.2.840.10008.5.1.4.1.1.66.4" in created  # Segmentation (worker.outputs.seg, issue 9)
