"""The series state machine (shared/design.md, "State of a series").

receiving -> stable -> queued -> scoring -> scored -> delivering -> delivered,
or not_applicable(reason) / failed(reason). A late instance reopens any state but
``not_applicable`` back to ``receiving`` with a new version.
"""

from __future__ import annotations

import enum


class SeriesState(str, enum.Enum):
    RECEIVING = "receiving"
    STABLE = "stable"
    QUEUED = "queued"
    SCORING = "scoring"
    SCORED = "scored"
    DELIVERING = "delivering"
    DELIVERED = "delivered"
    NOT_APPLICABLE = "not_applicable"
    FAILED = "failed"


S = SeriesState

ALLOWED: dict[SeriesState, frozenset[SeriesState]] = {
    S.RECEIVING: frozenset({S.STABLE, S.NOT_APPLICABLE, S.FAILED}),
    S.STABLE: frozenset({S.QUEUED, S.NOT_APPLICABLE, S.FAILED, S.RECEIVING}),
    S.QUEUED: frozenset({S.SCORING, S.NOT_APPLICABLE, S.FAILED, S.RECEIVING, S.SCORED}),
    S.SCORING: frozenset({S.SCORED, S.NOT_APPLICABLE, S.FAILED, S.QUEUED, S.RECEIVING}),
    S.SCORED: frozenset({S.DELIVERING, S.DELIVERED, S.FAILED, S.RECEIVING}),
    S.DELIVERING: frozenset({S.DELIVERED, S.FAILED, S.RECEIVING}),
    S.DELIVERED: frozenset({S.RECEIVING, S.DELIVERING}),
    S.NOT_APPLICABLE: frozenset({S.RECEIVING}),
    S.FAILED: frozenset({S.RECEIVING, S.QUEUED}),
}

# States in which a series no longer waits for instances.
SETTLED = frozenset(set(S) - {S.RECEIVING})


def can_transition(current: SeriesState, target: SeriesState) -> bool:
    return target in ALLOWED[SeriesState(current)]
