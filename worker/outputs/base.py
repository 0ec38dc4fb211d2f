"""What every DICOM object ct-triage writes shares (as highdicom keeps ``base_content.py``).

- :func:`validate_inputs`: the builders' common arguments (source series, result,
  result version), checked once; errors name the bad argument.
- :func:`resolve_created_at` and :func:`freeze_times`: every date/time written comes from
  one timestamp (the result's), never from the clock, so a retry is byte-identical.
- :func:`contributing_equipment`: ct-triage as Processing Equipment (109102, DCM) with
  its own and the model's version.
- :func:`series_description`: "AI COVID-19 triage <kind> v<version> - NOT FOR DIAGNOSTIC USE".
- :func:`check_series_number`: the new series' number (default ``<kind's base> + version``),
  an int 1..2**31-1 (SeriesNumber is IS).
- :func:`plain_text`: ASCII text for what we author (the source's character set may be
  the default repertoire).

Used by :mod:`worker.outputs.sc`, :mod:`worker.outputs.sr` and :mod:`worker.outputs.render`;
imports nothing else of :mod:`worker.outputs`.
"""

from __future__ import annotations

import datetime as dt
import unicodedata
from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from ct_triage import __version__
from worker.scoring.result import ScoreResult

MANUFACTURER = "ct-triage"
SERIES_DESCRIPTION_PREFIX = "AI COVID-19 triage"
_HIGHDICOM_MANUFACTURER = "Highdicom open-source contributors"


def check_series_number(series_number: int | None, default: int) -> int:
    """``series_number``, or ``default`` when None; TypeError/ValueError naming the argument."""
    if series_number is None:
        series_number = default
    if isinstance(series_number, bool) or not isinstance(series_number, int):
        raise TypeError(f"argument 'series_number' must be an int, got {type(series_number).__name__}")
    if not 0 < series_number < 2**31:
        raise ValueError(f"argument 'series_number' must be 1..2147483647, got {series_number}")
    return series_number


def validate_inputs(source_datasets, result, result_version) -> list[Dataset]:
    """Check the builders' common arguments; returns ``source_datasets`` as a list.

    Raises TypeError/ValueError naming the offending argument.
    """
    if not isinstance(result, ScoreResult):
        raise TypeError(f"argument 'result' must be a ScoreResult, got {type(result).__name__}")
    if isinstance(result_version, bool) or not isinstance(result_version, int):
        raise TypeError(f"argument 'result_version' must be an int, got {type(result_version).__name__}")
    if result_version < 1:
        raise ValueError(f"argument 'result_version' must be >= 1, got {result_version}")
    if isinstance(source_datasets, (Dataset, str, bytes)) or not isinstance(source_datasets, Sequence):
        raise TypeError("argument 'source_datasets' must be a sequence of pydicom Datasets")
    datasets = list(source_datasets)
    if not datasets:
        raise ValueError("argument 'source_datasets' must not be empty")
    _check_identified(datasets)
    studies = {str(ds.StudyInstanceUID) for ds in datasets}
    series = {str(ds.SeriesInstanceUID) for ds in datasets}
    if len(studies) != 1 or len(series) != 1:
        raise ValueError("argument 'source_datasets' must all belong to one series of one study")
    if result.study_instance_uid and result.study_instance_uid not in studies:
        raise ValueError(
            f"argument 'source_datasets' belongs to study {studies.pop()}, "
            f"but result.study_instance_uid is {result.study_instance_uid}"
        )
    if result.series_instance_uid and result.series_instance_uid not in series:
        raise ValueError(
            f"argument 'source_datasets' belongs to series {series.pop()}, "
            f"but result.series_instance_uid is {result.series_instance_uid}"
        )
    uids = [str(ds.SOPInstanceUID) for ds in datasets]
    _check_order(uids, result)
    _check_boxes(datasets, uids, result)
    if result.status == "scored" and result.category is None:
        raise ValueError("argument 'result' is scored but has no category")
    return datasets


def _check_identified(datasets: list) -> None:
    """Each source is a Dataset with its SOP class and the three instance UIDs."""
    for i, ds in enumerate(datasets):
        if not isinstance(ds, Dataset):
            raise TypeError(f"argument 'source_datasets'[{i}] must be a pydicom Dataset, got {type(ds).__name__}")
        for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            if not ds.get(keyword):
                raise ValueError(f"argument 'source_datasets'[{i}] lacks {keyword}")


def _check_order(uids: list[str], result: ScoreResult) -> None:
    """The sources are the result's instances, in its order, each once."""
    if result.source_sop_instance_uids and uids != list(result.source_sop_instance_uids):
        if sorted(uids) == sorted(result.source_sop_instance_uids):
            raise ValueError(
                "argument 'source_datasets' must be in the order of result.source_sop_instance_uids "
                "(sorted along the slice normal)"
            )
        raise ValueError(
            f"argument 'source_datasets' ({len(uids)} instances) does not match "
            f"result.source_sop_instance_uids ({len(result.source_sop_instance_uids)} instances)"
        )
    if len(set(uids)) != len(uids):
        raise ValueError("argument 'source_datasets' contains duplicate SOP Instance UIDs")


def _check_boxes(datasets: list[Dataset], uids: list[str], result: ScoreResult) -> None:
    """Each lesion box lies on its source slice."""
    for j, box in enumerate(result.boxes):
        if not 0 <= box.slice_index < len(datasets):
            raise ValueError(f"argument 'result': boxes[{j}].slice_index {box.slice_index} is out of range")
        if box.sop_instance_uid != uids[box.slice_index]:
            raise ValueError(
                f"argument 'result': boxes[{j}].sop_instance_uid does not match source slice {box.slice_index}"
            )
        if box.row_min > box.row_max or box.col_min > box.col_max:
            raise ValueError(f"argument 'result': boxes[{j}] has min > max")
        ds = datasets[box.slice_index]
        rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
        if rows and cols and (box.row_min < 0 or box.col_min < 0 or box.row_max >= rows or box.col_max >= cols):
            raise ValueError(f"argument 'result': boxes[{j}] lies outside the {rows}x{cols} source image")


def resolve_created_at(created_at: dt.datetime | None, source_datasets: Sequence[Dataset]) -> dt.datetime:
    """The timestamp written into the objects (content/creation/series dates).

    Callers should pass the result's own timestamp (when scoring finished) so a retry
    reproduces it. ``None`` falls back to something equally deterministic: the latest
    ContentDate/ContentTime (else SeriesDate/Time, else StudyDate/Time) of the sources.
    Microseconds are dropped.
    """
    if created_at is not None:
        if not isinstance(created_at, dt.datetime):
            raise TypeError(f"argument 'created_at' must be a datetime, got {type(created_at).__name__}")
        return created_at.replace(microsecond=0)
    best: dt.datetime | None = None
    for ds in source_datasets:
        for date_kw, time_kw in (("ContentDate", "ContentTime"), ("SeriesDate", "SeriesTime"),
                                 ("StudyDate", "StudyTime")):
            date = str(ds.get(date_kw, "") or "")
            if len(date) == 8 and date.isdigit():
                time = str(ds.get(time_kw, "") or "").split(".")[0].ljust(6, "0")[:6]
                try:
                    value = dt.datetime.strptime(date + (time if time.isdigit() else "000000"), "%Y%m%d%H%M%S")
                except ValueError:
                    continue
                best = value if best is None or value > best else best
                break
    return best or dt.datetime(2000, 1, 1)


def plain_text(text: str) -> str:
    """ASCII version of text we author (comments, descriptions, SR TEXT values).

    The source's Specific Character Set is copied to our objects; it may be absent
    (default repertoire: ASCII only), so our own strings must not need more.
    """
    text = text.replace("\u00b7", "-").replace("\u2013", "-").replace("\u2014", "-")
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")


def _da(value: dt.datetime) -> str:
    return value.strftime("%Y%m%d")


def _tm(value: dt.datetime) -> str:
    return value.strftime("%H%M%S")


def _dt(value: dt.datetime) -> str:
    text = value.strftime("%Y%m%d%H%M%S")
    if value.tzinfo is not None and value.utcoffset() is not None:
        text += value.strftime("%z")
    return text


def freeze_times(ds: Dataset, created_at: dt.datetime) -> None:
    """Replace every clock-derived date/time highdicom wrote with ``created_at``."""
    for date_kw, time_kw in (
        ("InstanceCreationDate", "InstanceCreationTime"),
        ("ContentDate", "ContentTime"),
        ("SeriesDate", "SeriesTime"),
        ("DateOfSecondaryCapture", "TimeOfSecondaryCapture"),
    ):
        if date_kw in ds or time_kw in ds:
            setattr(ds, date_kw, _da(created_at))
            setattr(ds, time_kw, _tm(created_at))
    for item in ds.get("ContributingEquipmentSequence", []):
        if item.get("Manufacturer") in (MANUFACTURER, _HIGHDICOM_MANUFACTURER):
            item.ContributionDateTime = _dt(created_at)


def contributing_equipment(result: ScoreResult, created_at: dt.datetime, description: str) -> hd.ContributingEquipment:
    """ct-triage as Processing Equipment (109102, DCM) with its and the model's version."""
    return hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=plain_text(result.model)[:64],
        software_versions=[f"ct-triage {__version__}"[:64], plain_text(f"{result.model} {result.model_version}")[:64]],
        contribution_datetime=_dt(created_at),
        contribution_description=plain_text(description)[:1024],
    )


def series_description(kind: str, result_version: int) -> str:
    return f"{SERIES_DESCRIPTION_PREFIX} {kind} v{result_version} - NOT FOR DIAGNOSTIC USE"[:64]
