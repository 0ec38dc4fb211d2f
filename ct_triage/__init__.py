"""ct-triage: shared pieces every process uses (settings, task contract, errors).

Nothing here imports the worker, torch or pynetdicom, so `dicom_node` and `worker`
can both depend on it without pulling in each other.
"""

__version__ = "0.1.0"
