"""Test helpers shared by the test modules (real components, no mocks).

- :mod:`tests.support.ct_datasets`: small synthetic chest CT series (pydicom datasets).
- :mod:`tests.support.dciodvfy`: run dicom3tools' ``dciodvfy`` and collect its errors.
- :mod:`tests.support.orthanc`, :mod:`tests.support.scanner`: the Orthanc PACS and the dcmtk scanner
  of :mod:`ct_triage_tools` (shared with the demo and bench/).
- :mod:`tests.support.cli`: run an offline ``ct-triage`` command in-process.
"""
