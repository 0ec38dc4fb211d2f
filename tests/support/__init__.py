"""Test helpers shared by the test modules (real components, no mocks).

- :mod:`tests.support.ct_datasets`: small synthetic chest CT series (pydicom datasets).
- :mod:`tests.support.dciodvfy`: run dicom3tools' ``dciodvfy`` and collect its errors.
- :mod:`tests.support.orthanc`: a throw-away Orthanc PACS on loopback ports.
"""
