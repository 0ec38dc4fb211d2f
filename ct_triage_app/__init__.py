"""The entry point: the ``ct-triage`` command line and the wiring of each process.

It sits above everything (``ct_triage``, ``db``, ``dicom_node``, ``worker``, ``dashboard``
and, for the offline commands only, ``ct_triage_tools``) and nothing of ours imports it.
"""
