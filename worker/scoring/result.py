"""What scoring a study produces: the one object every later stage reads.

Plain data (no torch, no numpy arrays) so it can be stored as JSON in the database,
printed by ``ct-triage score --json`` and handed to the DICOM writers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from db import priority as priority_rule

Status = Literal["scored", "not_applicable", "failed"]
CATEGORIES = ("CT-0", "CT-1", "CT-2", "CT-3", "CT-4")

# Routing decisions per category, MosMedData paper (doi:10.17816/DD46826), Table 2.
ROUTING = {
    "CT-0": "Not consistent with pneumonia: inform attending physician, refer to specialist",
    "CT-1": "Mild: follow-up at home with mandatory telemonitoring",
    "CT-2": "Moderate: follow-up at home by a primary care physician",
    "CT-3": "Severe: immediate admission to a COVID hospital",
    "CT-4": "Critical: emergency care, immediate admission, ICU",
}

# Worklist priority: the one rule lives in db.priority (default shown here for readers).
PRIORITY = {c: priority_rule.DEFAULT_RULE[c] for c in CATEGORIES}


def category_for(percent: float, noise_floor_percent: float = 0.5) -> str:
    """CT category for a total involvement share, boundaries from shared/seed-notes.md.

    CT-0 below the noise floor; CT-1 if p <= 25; CT-2 if 25 < p <= 50;
    CT-3 if 50 < p < 75; CT-4 if p >= 75.
    """
    if percent < 0 or percent > 100:
        raise ValueError(f"percent must be within 0..100, got {percent!r}")
    if percent < noise_floor_percent:
        return "CT-0"
    if percent <= 25:
        return "CT-1"
    if percent <= 50:
        return "CT-2"
    if percent < 75:
        return "CT-3"
    return "CT-4"


def priority_for(status: str, category: str | None) -> str:
    """The default rule's priority (db.priority); a configured rule is applied by the worker."""
    return priority_rule.priority_for(status, category)


@dataclass(frozen=True)
class LesionBox:
    """One lesion's extent on one original slice, in that slice's pixel coordinates.

    Rows and columns are inclusive; ``slice_index`` indexes the selected series'
    instances sorted along the slice normal (``ScoreResult.source_sop_instance_uids``).
    """

    slice_index: int
    sop_instance_uid: str
    row_min: int
    col_min: int
    row_max: int
    col_max: int
    lung: Literal["left", "right"] | None = None


@dataclass
class ScoreResult:
    status: Status
    reason: str | None = None
    category: str | None = None
    involvement_percent: float | None = None
    involvement_percent_left: float | None = None
    involvement_percent_right: float | None = None
    lung_volume_ml: float | None = None
    lung_volume_left_ml: float | None = None
    lung_volume_right_ml: float | None = None
    lesion_volume_ml: float | None = None
    lesion_count: int | None = None
    # Solid masses among the lesions (worker.scoring.masses; hybrid scorer, CT_TRIAGE_MASS_EXCLUSION):
    # None when not looked for; excluded from lesion_volume_ml and the % when mass_excluded.
    mass_volume_ml: float | None = None
    mass_count: int | None = None
    mass_excluded: bool | None = None
    model: str = "ct-triage-classical"
    model_version: str = "0.1.0"
    device: str = "cpu"
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None  # the series that was scored
    source_sop_instance_uids: list[str] = field(default_factory=list)  # sorted along the normal
    boxes: list[LesionBox] = field(default_factory=list)
    # Set by the worker from the configured rule (CT_TRIAGE_PRIORITY_RULE); None: default rule.
    assigned_priority: str | None = None
    # Follow-up comparison with the patient's priors (worker.followup.comparison.Assessment.to_json()), if any.
    comparison: dict | None = None
    # The masks the numbers were measured on (worker.outputs.masks.ResultMasks), kept in
    # memory for the DICOM SEG builder and stored beside the result; never serialized.
    masks: Any = field(default=None, repr=False, compare=False)

    @property
    def priority(self) -> str:
        return self.assigned_priority or priority_for(self.status, self.category)

    def to_json(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("masks", "boxes")}
        data["timings"] = dict(self.timings)
        data["source_sop_instance_uids"] = list(self.source_sop_instance_uids)
        data["boxes"] = [asdict(b) for b in self.boxes]
        data["priority"] = self.priority
        return data

    @classmethod
    def from_json(cls, data: dict) -> ScoreResult:
        data = dict(data)
        data.pop("priority", None)
        data.pop("masks", None)
        data["boxes"] = [LesionBox(**b) for b in data.get("boxes", [])]
        return cls(**data)
