"""Delivery of our outputs to PACS and other systems.

- :mod:`worker.delivery.scu`: :func:`~worker.delivery.scu.send_instances`, one C-STORE
  association per destination, returning a ``DeliveryReport`` whose outcome
  (``delivered`` / ``transient`` / ``permanent``) drives the outbox's retry policy
  (:mod:`worker.tasks.deliver`). HL7 to the RIS is the worklist's writer,
  :mod:`worker.worklist.hl7`.
"""
