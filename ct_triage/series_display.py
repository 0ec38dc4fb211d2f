"""What ``ct-triage status`` and the worklist page show of each series of a study.

The series state machine (:mod:`db.states`) stays as it is; only its display changes:
a series passed over because a twin of the same study was scored (its reason starts
``not selected``, see :func:`worker.scoring.select.not_selected_reason`) is still
``not_applicable`` in the database, but reads ``not selected`` and is no failure.
Every text from the headers (description, kernel) and every reason is cleaned
(:func:`ct_triage.text.clean`) here, before it reaches a terminal or a page.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from ct_triage.text import clean
from db.models import Series, Study

NOT_SELECTED = "not selected"


def is_not_selected(state: str, reason: str | None) -> bool:
    """A series left out because another series of its study was scored (not a failure)."""
    return state == "not_applicable" and (reason or "").startswith(NOT_SELECTED)


def display_state(state: str, reason: str | None) -> str:
    """The state as shown: ``not selected`` for a passed-over twin, else the state itself."""
    return NOT_SELECTED if is_not_selected(state, reason) else state


def display_reason(state: str, reason: str | None, limit: int = 200) -> str:
    """The reason as shown (a twin's without its leading ``not selected:``), cleaned."""
    text = reason or ""
    if is_not_selected(state, reason):
        text = text[len(NOT_SELECTED):].lstrip(" :")
    return clean(text, limit) if text else ""


@dataclass
class SeriesDisplay:
    study_instance_uid: str
    series_instance_uid: str
    series_number: int | None
    description: str  # cleaned, "" when absent
    kernel: str  # cleaned, "" when absent
    slice_thickness: float | None
    instance_count: int
    state: str  # the stored state (db.states)
    shown_state: str  # what status and the page show
    reason: str  # cleaned

    @property
    def thickness_text(self) -> str:
        return "-" if self.slice_thickness is None else f"{self.slice_thickness:g} mm"

    def to_json(self) -> dict:
        return {"series_instance_uid": self.series_instance_uid, "series_number": self.series_number,
                "description": self.description or None, "convolution_kernel": self.kernel or None,
                "slice_thickness_mm": self.slice_thickness, "instances": self.instance_count,
                "state": self.state, "shown_state": self.shown_state, "reason": self.reason or None}


def _display(row: Series, study_uid: str) -> SeriesDisplay:
    return SeriesDisplay(
        study_instance_uid=study_uid, series_instance_uid=row.series_instance_uid,
        series_number=row.series_number,
        description=clean(" ".join((row.series_description or "").split()), 64) if row.series_description else "",
        kernel=clean(row.convolution_kernel, 32) if row.convolution_kernel else "",
        slice_thickness=row.slice_thickness, instance_count=row.instance_count, state=row.state,
        shown_state=display_state(row.state, row.state_reason), reason=display_reason(row.state, row.state_reason))


def series_by_uid(session: Session, series_uids: Iterable[str]) -> dict[str, SeriesDisplay]:
    """SeriesInstanceUID -> what to show of it, for the given series."""
    uids = sorted(set(series_uids))
    found: dict[str, SeriesDisplay] = {}
    for start in range(0, len(uids), 500):  # bound the IN list
        rows = session.execute(select(Series, Study.study_instance_uid).join(Study, Series.study_fk == Study.id)
                               .where(Series.series_instance_uid.in_(uids[start:start + 500]))).all()
        found.update({s.series_instance_uid: _display(s, study_uid) for s, study_uid in rows})
    return found


def series_by_study(session: Session, study_uids: Iterable[str]) -> dict[str, list[SeriesDisplay]]:
    """StudyInstanceUID -> its series, by series number (then UID)."""
    uids = sorted(set(study_uids))
    found: dict[str, list[SeriesDisplay]] = {uid: [] for uid in uids}
    for start in range(0, len(uids), 500):
        rows = session.execute(select(Series, Study.study_instance_uid).join(Study, Series.study_fk == Study.id)
                               .where(Study.study_instance_uid.in_(uids[start:start + 500]))).all()
        for s, study_uid in rows:
            found[study_uid].append(_display(s, study_uid))
    for items in found.values():
        items.sort(key=lambda d: (d.series_number is None, d.series_number or 0, d.series_instance_uid))
    return found
