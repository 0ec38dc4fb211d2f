"""Task bodies and the processes that run them.

Bodies are plain functions of (context, ID), testable without a broker, each claiming
its row first (:mod:`worker.tasks.context`):

- :mod:`worker.tasks.score`: a study version from received series to result, worklist
  entries and outbox (steps with one transaction boundary each).
- :mod:`worker.tasks.followup`: after a result commits, later studies compared again and
  PACS prior searches queued.
- :mod:`worker.tasks.outputs`: SR, SEG and SC built once and stored.
- :mod:`worker.tasks.deliver`: the outbox sent in worklist order (C-STORE, HL7).

They run in a Celery worker (:mod:`worker.tasks.celery_app`) or, with no broker, in the
embedded consumer of ``ct-triage serve`` (:mod:`worker.tasks.embedded`).
"""
