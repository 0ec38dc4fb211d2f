"""The read-only dashboard of a ct-triage deployment: worklist page, JSON API, /metrics.

Served by ``ct-triage serve`` and ``ct-triage node`` (see :mod:`dashboard.server`)
from the database alone: the SQL views of :mod:`db.views`, and the stored source
instances for the summary pictures. Imports ``db``, the settings, and the renderer of
:mod:`worker.outputs.render` (numpy, Pillow, pydicom: never torch); nothing here writes.
"""
