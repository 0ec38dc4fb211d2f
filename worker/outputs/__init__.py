"""DICOM objects ct-triage writes back to the PACS.

- :mod:`worker.outputs.uids`: deterministic UIDs (a retry sends identical objects).
- :mod:`worker.outputs.base`: what every object shares (input validation, frozen
  timestamps, contributing equipment, series description, text cleaning).
- :mod:`worker.outputs.render`: burned-in pictures (lung window, red boxes, summary).
- :mod:`worker.outputs.sc`: :func:`~worker.outputs.sc.build_secondary_capture_series`.
- :mod:`worker.outputs.sr`: :func:`~worker.outputs.sr.build_measurement_report`
  (Comprehensive 3D SR, TID 1500).

Submodules are imported on use (highdicom is slow to import); nothing here imports torch.
"""
