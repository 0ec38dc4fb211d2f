"""The scoring pipeline: load a series, select it, segment, score.

Import-light on purpose (no torch here): ``worker.scoring.load`` and
``worker.scoring.select`` need only numpy, scipy and pydicom; the model code imports
torch itself.
"""
