"""The one priority rule (db.priority) and the settings that configure it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from ct_triage.errors import ConfigError
from ct_triage.settings import Settings
from db.priority import (
    DEFAULT_RULE,
    PriorityRuleError,
    hl7_priority,
    parse_rule,
    priority_for,
    worklist_key,
)
from worker.scoring.result import ScoreResult


@pytest.mark.parametrize("category,expected", [("CT-0", "LOW"), ("CT-1", "LOW"), ("CT-2", "MEDIUM"),
                                               ("CT-3", "HIGH"), ("CT-4", "HIGH")])
def test_default_rule_by_category(category, expected):
    assert priority_for("scored", category) == expected
    assert ScoreResult(status="scored", category=category).priority == expected


@pytest.mark.parametrize("status", ["failed", "not_applicable"])
def test_a_study_we_could_not_score_is_medium_never_lower(status):
    assert priority_for(status, None) == "MEDIUM"
    assert priority_for(status, "CT-0") == "MEDIUM"  # a category without a score does not count
    assert priority_for("scored", None) == "MEDIUM"
    with pytest.raises(PriorityRuleError, match="below an unscored"):
        parse_rule("failed=LOW")
    assert parse_rule("failed=HIGH")["failed"] == "HIGH"


def test_rule_is_configurable_and_validated():
    rule = parse_rule("CT-2=HIGH, ct-1=medium")
    assert rule == {**DEFAULT_RULE, "CT-2": "HIGH", "CT-1": "MEDIUM"}
    assert priority_for("scored", "CT-2", rule) == "HIGH"
    for bad, message in [("CT-5=HIGH", "key"), ("CT-2=URGENT", "value"), ("CT-2", "KEY=PRIORITY")]:
        with pytest.raises(PriorityRuleError, match=message):
            parse_rule(bad)
    settings = Settings.from_env({"CT_TRIAGE_PRIORITY_RULE": "CT-2=HIGH"})
    assert settings.priorities["CT-2"] == "HIGH"
    with pytest.raises(ConfigError, match="PRIORITY_RULE"):
        Settings.from_env({"CT_TRIAGE_PRIORITY_RULE": "failed=LOW"})


def test_hl7_codes_follow_table_0485():
    assert [hl7_priority(p) for p in ("HIGH", "MEDIUM", "LOW")] == ["S", "A", "R"]
    assert hl7_priority("???") == "A"  # never routine by accident


def test_ties_are_broken_by_arrival_then_id():
    t0 = datetime(2026, 11, 30, 8, tzinfo=UTC)
    rows = [("LOW", t0, 1), ("HIGH", t0 + timedelta(minutes=5), 2), ("MEDIUM", t0, 3), ("HIGH", t0, 4),
            ("HIGH", t0, 0), ("MEDIUM", None, 5)]
    ordered = sorted(rows, key=lambda r: worklist_key(*r))
    assert [r[2] for r in ordered] == [0, 4, 2, 3, 5, 1]


def test_settings_validate_the_worklist_and_hl7_entries():
    s = Settings.from_env({"CT_TRIAGE_HL7_DESTINATIONS": "ris.local:2575, mllp://10.0.0.2:6661",
                           "CT_TRIAGE_UPS_SUBSCRIBERS": "READER1@10.0.0.5:104",
                           "CT_TRIAGE_HL7_ORDER_MESSAGE": "OMI^O23"})
    assert s.hl7_destinations == ["ris.local:2575", "mllp://10.0.0.2:6661"]
    for name, value in [("HL7_DESTINATIONS", "ris.local"), ("UPS_SUBSCRIBERS", "READER1"),
                        ("HL7_ORDER_MESSAGE", "ORM^O02"), ("UPS_WORKLIST_LABEL", "x" * 65)]:
        with pytest.raises(ConfigError, match=name):
            Settings.from_env({f"CT_TRIAGE_{name}": value})
