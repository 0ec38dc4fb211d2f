"""Compare a scored study with the same patient's priors: deltas, rate, and the progression rule.

Pure functions of plain data (no database, no pixels): :class:`Snapshot` is one scored
study as the comparison sees it, :func:`assess` compares the current one with up to N
priors and :func:`apply_assessment` writes the outcome into the :class:`ScoreResult`.

What is compared (current minus prior), for each prior:

- involvement, total and per lung, in percentage points and relative to the prior
  (``100 * (current - prior) / prior``; ``None`` when the prior share is 0);
- lesion volume (ml); hours between the two acquisitions and the rate in points per day;
- what differs between the acquisitions (manufacturer/model, convolution kernel, slice
  thickness beyond 0.25 mm): stated on every output, because such differences move the
  numbers by themselves.

Acquisition time, in this order of trust: AcquisitionDateTime, AcquisitionDate +
AcquisitionTime, SeriesDate + SeriesTime, StudyDate + StudyTime (the first one present in
the scored series' first instance). Without any, the interval is unknown and the rule does
not fire.

The progression rule (MosMedData, doi:10.17816/DD46826, Table 2, CT-3: "+50 % in 24–48 h"
on a follow-up study): when total involvement rose by at least
``PROGRESSION_RELATIVE_PERCENT`` (default 50 %) relative to a prior acquired
``PROGRESSION_MIN_HOURS``..``PROGRESSION_MAX_HOURS`` earlier (default 0..48 h: a faster
increase is no less alarming; set 24 for the literal reading), and by at least
``PROGRESSION_MIN_POINTS`` percentage points (default 5, our guard: 1 % -> 1.6 % is +60 %
but noise), the category becomes at least CT-3, the reason "progression", so the priority
HIGH. Otherwise the trend is reported without changing the category: "worsening" (up by
``STABLE_POINTS`` points or more, default 5), "improvement" (down by that much) or
"stable"; the category then comes from the current share alone.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from worker.scoring.result import CATEGORIES, ScoreResult

TIME_SOURCES = (
    ("AcquisitionDateTime", None),
    ("AcquisitionDate", "AcquisitionTime"),
    ("SeriesDate", "SeriesTime"),
    ("StudyDate", "StudyTime"),
)
THICKNESS_TOLERANCE_MM = 0.25
PROGRESSION_CATEGORY = "CT-3"
TRENDS = ("progression", "worsening", "stable", "improvement")


@dataclass(frozen=True)
class ProgressionRule:
    """Thresholds of the rule; defaults are the settings' defaults (see the module docstring)."""

    relative_percent: float = 50.0
    min_hours: float = 0.0
    max_hours: float = 48.0
    min_points: float = 5.0
    stable_points: float = 5.0

    def __post_init__(self) -> None:
        if not self.relative_percent > 0:
            raise ValueError(f"argument 'relative_percent' must be > 0, got {self.relative_percent!r}")
        if not 0 <= self.min_hours <= self.max_hours:
            raise ValueError(f"arguments 'min_hours'/'max_hours' must satisfy 0 <= min <= max, got "
                             f"{self.min_hours!r}/{self.max_hours!r}")
        if self.min_points < 0 or self.stable_points < 0:
            raise ValueError("arguments 'min_points' and 'stable_points' must be >= 0")

    @classmethod
    def from_settings(cls, settings) -> ProgressionRule:
        return cls(settings.progression_relative_percent, settings.progression_min_hours,
                   settings.progression_max_hours, settings.progression_min_points, settings.stable_points)

    def describe(self) -> str:
        return (f">= +{self.relative_percent:g} % relative and >= +{self.min_points:g} points within "
                f"{self.min_hours:g}-{self.max_hours:g} h")


@dataclass(frozen=True)
class Snapshot:
    """One scored study, as compared: numbers, when it was acquired, on what."""

    study_instance_uid: str
    involvement_percent: float
    acquired_at: dt.datetime | None = None
    time_source: str = "unknown"
    involvement_percent_left: float | None = None
    involvement_percent_right: float | None = None
    lesion_volume_ml: float | None = None
    category: str | None = None
    result_id: int | None = None
    manufacturer: str | None = None
    model_name: str | None = None
    kernel: str | None = None
    slice_thickness_mm: float | None = None
    # One instance of the scored series, so reports can reference the prior study.
    series_instance_uid: str | None = None
    sop_instance_uid: str | None = None
    sop_class_uid: str | None = None

    def __post_init__(self) -> None:
        if not self.study_instance_uid:
            raise ValueError("argument 'study_instance_uid' must not be empty")
        if self.involvement_percent is None or not 0 <= float(self.involvement_percent) <= 100:
            raise ValueError(f"argument 'involvement_percent' must be within 0..100, got {self.involvement_percent!r}")

    def to_json(self) -> dict:
        data = asdict(self)
        data["acquired_at"] = self.acquired_at.isoformat() if self.acquired_at else None
        return data

    @classmethod
    def from_json(cls, data: dict) -> Snapshot:
        data = dict(data)
        if data.get("acquired_at"):
            data["acquired_at"] = dt.datetime.fromisoformat(data["acquired_at"])
        return cls(**data)


@dataclass
class Change:
    """The current study against one prior."""

    prior: Snapshot
    hours: float | None
    delta_points: float
    delta_points_left: float | None
    delta_points_right: float | None
    relative_percent: float | None
    relative_percent_left: float | None
    relative_percent_right: float | None
    delta_lesion_ml: float | None
    points_per_day: float | None
    trend: str
    progression: bool
    differences: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        data = asdict(self)
        data["prior"] = self.prior.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict) -> Change:
        data = dict(data)
        data["prior"] = Snapshot.from_json(data["prior"])
        return cls(**data)


@dataclass
class Assessment:
    """The comparison of one study with its priors, as stored in ``ScoreResult.comparison``."""

    current: Snapshot
    changes: list[Change]  # most recent prior first
    headline: Change  # the change that fired the rule, else the one against the most recent prior
    progression: bool
    category_from_percent: str | None
    category: str | None
    rule: ProgressionRule

    @property
    def trend(self) -> str:
        return self.headline.trend

    def reason(self) -> str:
        """``progression: 20% -> 32% (+60%) in 36 h since 2026-11-28`` and the like."""
        h = self.headline
        since = h.prior.acquired_at.strftime("%Y-%m-%d") if h.prior.acquired_at else "an earlier study"
        hours = f" in {h.hours:.0f} h" if h.hours is not None else ""
        rel = f" ({h.relative_percent:+.0f}%)" if h.relative_percent is not None else ""
        return (f"{h.trend}: {h.prior.involvement_percent:.0f}% -> {self.current.involvement_percent:.0f}%"
                f"{rel}{hours} since {since}")

    def to_json(self) -> dict:
        return {
            "current": self.current.to_json(),
            "changes": [c.to_json() for c in self.changes],
            "headline_prior": self.headline.prior.study_instance_uid,
            "progression": self.progression,
            "trend": self.trend,
            "category_from_percent": self.category_from_percent,
            "category": self.category,
            "rule": asdict(self.rule),
            "reason": self.reason(),
        }

    @classmethod
    def from_json(cls, data: dict) -> Assessment:
        changes = [Change.from_json(c) for c in data["changes"]]
        headline = next(c for c in changes if c.prior.study_instance_uid == data["headline_prior"])
        return cls(Snapshot.from_json(data["current"]), changes, headline, bool(data["progression"]),
                   data.get("category_from_percent"), data.get("category"), ProgressionRule(**data["rule"]))


# -- acquisition time ----------------------------------------------------------------------
def parse_da_tm(date: str, time: str | None) -> dt.datetime | None:
    date = (date or "").strip()
    if len(date) != 8 or not date.isdigit():
        return None
    text = (time or "").strip().split(".")[0]
    text = text.replace(":", "")
    if not text.isdigit():
        text = ""
    text = text.ljust(6, "0")[:6]
    try:
        return dt.datetime.strptime(date + text, "%Y%m%d%H%M%S")
    except ValueError:
        return None


def _parse_dt(value: str) -> dt.datetime | None:
    text = (value or "").strip()
    for sign in ("+", "-"):  # a UTC offset suffix: both studies come from one site, ignore it
        if sign in text[8:]:
            text = text[: 8 + text[8:].index(sign)]
    return parse_da_tm(text[:8], text[8:] or None)


def acquisition_time(ds) -> tuple[dt.datetime | None, str]:
    """(naive datetime, which attributes gave it) from a pydicom Dataset header."""
    for date_kw, time_kw in TIME_SOURCES:
        value = ds.get(date_kw)
        if not value:
            continue
        if time_kw is None:
            when = _parse_dt(str(value))
            label = date_kw
        else:
            when = parse_da_tm(str(value), str(ds.get(time_kw) or ""))
            label = f"{date_kw}/{time_kw}"
        if when is not None:
            return when, label
    return None, "unknown"


# -- comparing ------------------------------------------------------------------------------
def _relative(current: float | None, prior: float | None) -> float | None:
    if current is None or prior is None or prior <= 0:
        return None
    return 100.0 * (current - prior) / prior


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def differences(current: Snapshot, prior: Snapshot) -> list[str]:
    """What differs between the two acquisitions, in words (empty when nothing we know of)."""
    out = []
    scanner_now = " ".join(filter(None, [current.manufacturer, current.model_name])).strip()
    scanner_then = " ".join(filter(None, [prior.manufacturer, prior.model_name])).strip()
    if scanner_now and scanner_then and scanner_now.lower() != scanner_then.lower():
        out.append(f"scanner {scanner_then} -> {scanner_now}")
    if current.kernel and prior.kernel and current.kernel.lower() != prior.kernel.lower():
        out.append(f"kernel {prior.kernel} -> {current.kernel}")
    if (current.slice_thickness_mm and prior.slice_thickness_mm
            and abs(current.slice_thickness_mm - prior.slice_thickness_mm) > THICKNESS_TOLERANCE_MM):
        out.append(f"slice thickness {prior.slice_thickness_mm:g} -> {current.slice_thickness_mm:g} mm")
    return out


def compare(current: Snapshot, prior: Snapshot, rule: ProgressionRule | None = None) -> Change:
    """The change from ``prior`` to ``current`` and its trend under ``rule``."""
    rule = rule or ProgressionRule()
    hours = None
    if current.acquired_at is not None and prior.acquired_at is not None:
        hours = (current.acquired_at - prior.acquired_at).total_seconds() / 3600.0
    delta = current.involvement_percent - prior.involvement_percent
    relative = _relative(current.involvement_percent, prior.involvement_percent)
    rate = delta / (hours / 24.0) if hours and hours > 0 else None
    # A zero prior share makes any increase infinitely relative: points decide then.
    relative_ok = relative is None and delta > 0 or relative is not None and relative >= rule.relative_percent
    in_window = hours is not None and rule.min_hours <= hours <= rule.max_hours
    progression = bool(relative_ok and in_window and delta >= rule.min_points and delta > 0)
    if progression:
        trend = "progression"
    elif delta >= rule.stable_points and delta > 0:
        trend = "worsening"
    elif delta <= -rule.stable_points and delta < 0:
        trend = "improvement"
    else:
        trend = "stable"
    return Change(
        prior=prior, hours=hours, delta_points=delta,
        delta_points_left=_minus(current.involvement_percent_left, prior.involvement_percent_left),
        delta_points_right=_minus(current.involvement_percent_right, prior.involvement_percent_right),
        relative_percent=relative,
        relative_percent_left=_relative(current.involvement_percent_left, prior.involvement_percent_left),
        relative_percent_right=_relative(current.involvement_percent_right, prior.involvement_percent_right),
        delta_lesion_ml=_minus(current.lesion_volume_ml, prior.lesion_volume_ml), points_per_day=rate,
        trend=trend, progression=progression, differences=differences(current, prior),
    )


def _at_least(category: str | None, floor: str) -> str:
    if category not in CATEGORIES:
        return floor
    return category if CATEGORIES.index(category) >= CATEGORIES.index(floor) else floor


def assess(current: Snapshot, priors: Sequence[Snapshot], rule: ProgressionRule | None = None,
           category_from_percent: str | None = None) -> Assessment | None:
    """Compare ``current`` with each prior (at most as given); None when there is none.

    Priors acquired after ``current`` are ignored (a later study is not a prior).
    """
    rule = rule or ProgressionRule()
    usable = [p for p in priors if p.study_instance_uid != current.study_instance_uid
              and not (p.acquired_at and current.acquired_at and p.acquired_at > current.acquired_at)]
    if not usable:
        return None
    epoch = dt.datetime.min
    usable.sort(key=lambda p: p.acquired_at or epoch, reverse=True)
    changes = [compare(current, p, rule) for p in usable]
    firing = [c for c in changes if c.progression]
    headline = firing[0] if firing else changes[0]
    base = category_from_percent or current.category
    category = _at_least(base, PROGRESSION_CATEGORY) if firing else base
    return Assessment(current, changes, headline, bool(firing), base, category, rule)


def apply_assessment(score: ScoreResult, assessment: Assessment | None) -> ScoreResult:
    """Write the comparison into ``score`` (category, reason, ``score.comparison``); returns it.

    With ``None`` the score is reset to its category from the percentage and no comparison.
    """
    if not isinstance(score, ScoreResult):
        raise TypeError(f"argument 'score' must be a ScoreResult, got {type(score).__name__}")
    previous = score.comparison or {}
    base = previous.get("category_from_percent") or score.category
    if previous and score.reason == previous.get("reason"):
        score.reason = None
    score.category = base
    score.comparison = None
    if assessment is None or score.status != "scored":
        return score
    score.category = assessment.category
    score.comparison = assessment.to_json()
    score.reason = assessment.reason()
    return score


def trend_points(comparison: dict) -> list[dict]:
    """Involvement over time for the trend plot: [{date, total, left, right, current}], oldest first."""
    items = [(c["prior"], False) for c in comparison.get("changes", [])] + [(comparison["current"], True)]
    points = []
    for snap, is_current in items:
        points.append({"acquired_at": snap.get("acquired_at"), "total": snap.get("involvement_percent"),
                       "left": snap.get("involvement_percent_left"), "right": snap.get("involvement_percent_right"),
                       "current": is_current, "study_instance_uid": snap.get("study_instance_uid")})
    points.sort(key=lambda p: p["acquired_at"] or "")
    return points
