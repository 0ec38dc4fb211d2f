"""The one worklist priority rule: every place that orders or announces a study uses it.

Default rule (docs/worklist.md, "The priority rule"; configurable with ``CT_TRIAGE_PRIORITY_RULE``):

=========================================  ========  ================  ===============
Result                                     Priority  UPS (0074,1200)   HL7 table 0485
=========================================  ========  ================  ===============
CT-3, CT-4                                 HIGH      HIGH              S (stat)
CT-2                                       MEDIUM    MEDIUM            A (ASAP)
CT-0, CT-1                                 LOW       LOW               R (routine)
failed / not applicable (with the reason)  MEDIUM    MEDIUM            A (ASAP)
=========================================  ========  ================  ===============

Safety rule: a study we could not score is never given a lower priority than an
unscored study. An unscored study is read at the PACS' normal (MEDIUM) priority, so a
failed or not-applicable result is MEDIUM, and a configured rule may raise it to HIGH
but never lower it (:func:`parse_rule` refuses). Ties are broken by arrival: the time
the study's first instance was received (oldest first), then the database id.

A re-scored study version gets its priority from its own result; the superseded
version's workitem is cancelled and its HL7 order updated (db.repository, worker.tasks.score),
so the rule is applied once per result and read everywhere else from the database.

Pure Python, imports nothing of ours: the node, the workers and the dashboard views
share it.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

PRIORITIES = ("HIGH", "MEDIUM", "LOW")
#: Sort rank: lower is read first.
RANK = {"HIGH": 0, "MEDIUM": 1, "LOW": 2}
#: What an unscored study gets in a PACS worklist; a failure is never below it.
UNSCORED_PRIORITY = "MEDIUM"
CATEGORIES = ("CT-0", "CT-1", "CT-2", "CT-3", "CT-4")
#: Key in a rule for results that are not ``scored`` (failed, not applicable).
UNSCORED_KEY = "failed"

DEFAULT_RULE: dict[str, str] = {
    "CT-0": "LOW", "CT-1": "LOW", "CT-2": "MEDIUM", "CT-3": "HIGH", "CT-4": "HIGH",
    UNSCORED_KEY: "MEDIUM",
}
DEFAULT_RULE_TEXT = ",".join(f"{k}={v}" for k, v in DEFAULT_RULE.items())

#: HL7 v2 table 0485 (Extended Priority Codes) per priority: S stat, A ASAP, R routine.
HL7_PRIORITY = {"HIGH": "S", "MEDIUM": "A", "LOW": "R"}


class PriorityRuleError(ValueError):
    """A priority rule that is malformed or would put a failure below an unscored study."""


def parse_rule(text: str | Mapping[str, str] | None) -> dict[str, str]:
    """``"CT-0=LOW,...,failed=MEDIUM"`` (or a mapping) -> a complete, validated rule.

    Keys missing from ``text`` keep their default. Raises :class:`PriorityRuleError`
    naming the bad entry: unknown key, unknown priority, or ``failed`` below MEDIUM.
    """
    rule = dict(DEFAULT_RULE)
    if text is None or text == "":
        return rule
    if isinstance(text, Mapping):
        items = [(str(k), str(v)) for k, v in text.items()]
    else:
        items = []
        for entry in str(text).split(","):
            if not entry.strip():
                continue
            key, sep, value = entry.partition("=")
            if not sep:
                raise PriorityRuleError(f"priority rule entry {entry.strip()!r} is not KEY=PRIORITY")
            items.append((key.strip(), value.strip()))
    for key, value in items:
        key_norm = key.upper() if key.upper().startswith("CT-") else key.lower()
        value_norm = value.upper()
        if key_norm not in DEFAULT_RULE:
            raise PriorityRuleError(f"priority rule key {key!r} is not one of {', '.join(DEFAULT_RULE)}")
        if value_norm not in RANK:
            raise PriorityRuleError(f"priority rule value {value!r} for {key!r} is not HIGH, MEDIUM or LOW")
        rule[key_norm] = value_norm
    if RANK[rule[UNSCORED_KEY]] > RANK[UNSCORED_PRIORITY]:
        raise PriorityRuleError(f"priority rule: {UNSCORED_KEY}={rule[UNSCORED_KEY]} would put a study we could "
                                f"not score below an unscored one ({UNSCORED_PRIORITY})")
    return rule


def priority_for(status: str, category: str | None, rule: Mapping[str, str] | None = None) -> str:
    """The worklist priority of a result: ``HIGH``, ``MEDIUM`` or ``LOW``."""
    rule = DEFAULT_RULE if rule is None else rule
    if status == "scored" and category in CATEGORIES:
        return rule[category]
    return rule[UNSCORED_KEY]


def hl7_priority(priority: str) -> str:
    """HL7 table 0485 code (S, A, R) for a priority; unknown priorities are ASAP (never routine)."""
    return HL7_PRIORITY.get(priority, HL7_PRIORITY[UNSCORED_PRIORITY])


def worklist_key(priority: str, arrived_at: datetime | None, tie: int = 0) -> tuple:
    """Sort key: priority rank, then arrival (oldest first), then ``tie`` (e.g. a row id)."""
    return (RANK.get(priority, RANK[UNSCORED_PRIORITY]), arrived_at is None, arrived_at or datetime.min, tie)
