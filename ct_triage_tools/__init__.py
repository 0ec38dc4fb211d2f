"""Offline tools beside the daemon: phantoms, scoring/eval/train commands, the demo,
and the helpers the demo, the benchmarks and the tests share (a throw-away Orthanc
PACS, dcmtk as the scanner, free ports).

The daemon's packages (``dicom_node``, ``worker``, ``db``, ``ct_triage``) never import
this package; it imports them. ``tests/test_boundaries.py`` checks both directions.
"""
