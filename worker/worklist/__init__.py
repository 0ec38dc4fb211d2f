"""The worklist's writer side: what a committed result puts on the radiologists' reading worklists.

- :mod:`worker.worklist.entries`: the UPS workitem (served by ``dicom_node.ups`` from
  ``db.worklist``) and the HL7 outbox rows, written in the result's transaction.
- :mod:`worker.worklist.hl7`: the HL7 v2 order update and ORU^R01 to the RIS over MLLP.

The reader side: ``dicom_node.ups`` (UPS Pull/Watch/Query), the page (``dashboard``), the
SQL views (``db.views``); the one priority rule for all of them is ``db.priority``.
"""
