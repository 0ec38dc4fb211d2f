"""Follow-up studies (issue 12): priors, their comparison with the current study, and retrieval.

- :mod:`worker.followup.comparison`: the arithmetic and the progression rule (Table 2 of the
  MosMedData paper), pure functions of two snapshots.
- :mod:`worker.followup.priors`: a study's local priors (``db.followup``), the comparison
  applied to a new score inside its result transaction, and the summary displays read.
- :mod:`worker.followup.search` and :mod:`worker.followup.retrieve`: priors from a PACS
  (C-FIND at STUDY level, C-MOVE to our own AE title).

The step that runs after a result commits (later studies compared again, searches
published) is :mod:`worker.tasks.followup`; the follow-up content of the SR and the
summary image is drawn by ``worker.outputs.sr_followup`` and ``worker.outputs.trend``,
beside the objects they belong to.
"""
