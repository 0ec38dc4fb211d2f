"""The coded concepts and the TID 300 measurement that both parts of the SR use.

:mod:`worker.outputs.sr` (the result's groups) and :mod:`worker.outputs.sr_followup`
(the change since the priors) write the same anatomy (Lung 39607008, Right lung
3341006, Left lung 44029006, SCT), the same units (``%``, ``ml``, UCUM) and private
codes of the one scheme ``99CTTRIAGE`` (PS3.16 8.2: a "99" prefix is private); the SR
declares that scheme once. :func:`measurement` is the one way a value becomes a TID 300
measurement: absent values are left out (never written as 0).

Imports nothing else of :mod:`worker.outputs`, so ``sr`` can use ``sr_followup``
without a cycle.
"""

from __future__ import annotations

import highdicom as hd

SCHEME = "99CTTRIAGE"
SCHEME_NAME = "ct-triage private codes"

LUNG = hd.sr.CodedConcept("39607008", "SCT", "Lung")
RIGHT_LUNG = hd.sr.CodedConcept("3341006", "SCT", "Right lung")
LEFT_LUNG = hd.sr.CodedConcept("44029006", "SCT", "Left lung")
UNIT_ML = hd.sr.CodedConcept("ml", "UCUM", "milliliter")
UNIT_PERCENT = hd.sr.CodedConcept("%", "UCUM", "Percent")


def private(value: str, meaning: str) -> hd.sr.CodedConcept:
    """A concept of the private scheme ``99CTTRIAGE``."""
    return hd.sr.CodedConcept(value, SCHEME, meaning)


def measurement(name: hd.sr.CodedConcept, value: float | None, unit: hd.sr.CodedConcept, *,
                site: hd.sr.CodedConcept | None = None,
                images: list[hd.sr.SourceImageForMeasurement] | None = None) -> list[hd.sr.Measurement]:
    """One TID 300 measurement in a list (empty when ``value`` is None), with an optional
    finding site and images it was measured on; the group carries the algorithm."""
    if value is None:
        return []
    return [hd.sr.Measurement(name=name, value=float(value), unit=unit, referenced_images=images,
                              finding_sites=[hd.sr.FindingSite(site)] if site is not None else None)]
