"""The DICOM node: C-ECHO, C-STORE and Storage Commitment for scanners.

Writes every instance durably, decides when a series/study is complete and queues
it by task name. Imports ``db`` and the task contract only: never torch, never the
scoring pipeline (a test checks ``import dicom_node`` leaves torch unloaded).
"""

from dicom_node.server import DicomNode

__all__ = ["DicomNode"]
