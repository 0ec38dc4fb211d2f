"""ct-triage workers: the scoring pipeline, DICOM writers and delivery.

Importing this package imports no torch; only the model code under
``worker.scoring`` does, lazily.
"""
