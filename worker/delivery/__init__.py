"""Delivery of our outputs to PACS and other systems (design.md, "Delivery").

- :mod:`worker.delivery.scu`: :func:`~worker.delivery.scu.send_instances`, one C-STORE
  association per destination, returning a ``DeliveryReport`` whose outcome
  (``delivered`` / ``transient`` / ``permanent``) drives the outbox's retry policy.
"""
