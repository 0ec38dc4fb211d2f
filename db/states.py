"""The state machines of series, jobs and deliveries.

Series: receiving -> stable -> queued -> scoring -> scored -> delivering -> delivered,
or not_applicable(reason) / failed(reason). A late instance reopens any state but
``not_applicable`` back to ``receiving`` with a new version.

Jobs (one per study version and task): queued -> running -> done; a running job whose
process died goes back to queued (embedded mode, at start). A worker taking over a
running job from a dead one keeps it running (not a state change).

Deliveries (one per result and destination): pending -> sending -> delivered, or
-> retrying (transient failure; sending again when due) or -> failed (permanent).

Each table maps a state to the states it may move to; :mod:`db.repository` makes
every change and refuses one the table does not allow.
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


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"


JOB_ALLOWED: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING}),
    JobState.RUNNING: frozenset({JobState.DONE, JobState.QUEUED}),
    JobState.DONE: frozenset(),
}


class DeliveryState(str, enum.Enum):
    PENDING = "pending"
    SENDING = "sending"
    RETRYING = "retrying"
    DELIVERED = "delivered"
    FAILED = "failed"


# Deliveries a worker may claim (when due): both go to sending, and only there.
CLAIMABLE_DELIVERY = frozenset({DeliveryState.PENDING, DeliveryState.RETRYING})
FINAL_DELIVERY = frozenset({DeliveryState.DELIVERED, DeliveryState.FAILED})

DELIVERY_ALLOWED: dict[DeliveryState, frozenset[DeliveryState]] = {
    **{state: frozenset({DeliveryState.SENDING}) for state in CLAIMABLE_DELIVERY},
    DeliveryState.SENDING: frozenset({DeliveryState.DELIVERED, DeliveryState.RETRYING, DeliveryState.FAILED}),
    **{state: frozenset() for state in FINAL_DELIVERY},
}

_TABLES: dict[type, dict] = {SeriesState: ALLOWED, JobState: JOB_ALLOWED, DeliveryState: DELIVERY_ALLOWED}


def can_transition(current: str, target: SeriesState | JobState | DeliveryState) -> bool:
    """Whether ``current`` (a state of ``target``'s kind, or its value) may become ``target``."""
    kind = type(target)
    return target in _TABLES[kind][kind(current)]


class InvalidStateChange(Exception):
    """A series, job or delivery was asked for a state change its state machine does not allow."""
