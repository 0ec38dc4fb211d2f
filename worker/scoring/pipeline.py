"""Score a study: read headers, select the series, load it, segment, measure.

Three entry points, all returning a :class:`ScoreResult` and never raising for bad
input (every failure becomes ``not_applicable`` or ``failed`` with a one-line reason):

- :func:`score_volume` - a loaded :class:`Volume`;
- :func:`score_study` - the files of a study grouped by series (what the worker has);
- :func:`score_path` - a DICOM folder, one DICOM file or a NIfTI file (the CLI).

``not_applicable``: the input is not something ct-triage scores (not CT, localizer,
too few slices, tilted or inconsistent geometry, no lungs in the volume).
``failed``: it should have been scorable but something broke (unreadable pixels, a
configuration error such as missing U-Net weights, an unexpected exception).

Measurement (:func:`measure`) is shared by every scorer: volumes are voxel counts
times the working-grid voxel size; % involvement is lesion over lung volume, total
and per lung; the category follows shared/seed-notes.md via ``category_for``; the
lesion count is the number of 26-connected lesion components; boxes are the
in-plane 8-connected lesion components of every original slice, mapped back to the
original pixel grid (a working pixel covers ``factor`` original pixels).

Importing this module does not import torch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from ct_triage.errors import CtTriageError, InvalidInput, NotApplicable
from worker.scoring.result import LesionBox, ScoreResult, Status, category_for

if TYPE_CHECKING:  # pragma: no cover
    from ct_triage.settings import Settings
    from worker.scoring.base import Scorer, Segmentation
    from worker.scoring.volume import Volume

log = logging.getLogger(__name__)

MIN_LUNG_ML = 150.0  # less than this is not a chest CT we can score
MIN_BOX_MM2 = 20.0  # in-plane lesion pieces smaller than this (a lesion's tip) get no box


def _now() -> float:
    return time.perf_counter()


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


def score_volume(volume: Volume, settings: Settings, *, scorer: Scorer | None = None,
                 timings: dict[str, float] | None = None, started: float | None = None) -> ScoreResult:
    """Segment and measure one volume. Never raises for bad input."""
    started = _now() if started is None else started
    timings = dict(timings or {})
    model, version, device = _default_model(settings), "", "cpu"
    try:
        if volume.hu.shape[0] < settings.min_slices:
            raise NotApplicable(
                f"too few slices: {volume.hu.shape[0]} (at least {settings.min_slices} needed "
                "for a chest CT volume)"
            )
        if min(volume.hu.shape[1:]) < 32:
            raise NotApplicable(f"slices of {volume.hu.shape[1]}x{volume.hu.shape[2]} pixels are too small")
        from worker.scoring.device import describe_device, resolve_device
        from worker.scoring.registry import get_scorer

        t = _now()
        device = resolve_device(settings.device)
        scorer = scorer or get_scorer(settings)
        model, version = scorer.name, scorer.version
        timings["setup"] = _now() - t
        t = _now()
        seg = scorer.segment(volume, device)
        timings["segment"] = _now() - t
        for key, value in seg.timings.items():
            timings[f"segment.{key}"] = value
        t = _now()
        result = measure(volume, seg, settings)
        timings["measure"] = _now() - t
        from worker.scoring.masks import ResultMasks

        result.masks = ResultMasks.from_segmentation(seg)  # for the SEG/SR; stored by the job
        log.debug("scored %s on %s", volume.source, describe_device(device))
    except NotApplicable as exc:
        result = ScoreResult(status="not_applicable", reason=_reason(exc))
    except CtTriageError as exc:
        result = ScoreResult(status="failed", reason=_reason(exc))
    except MemoryError:
        result = ScoreResult(status="failed", reason="out of memory while scoring")
    except Exception as exc:  # a bug or a broken environment: report, don't crash the worker
        log.exception("scoring %s failed", volume.source)
        result = ScoreResult(status="failed", reason=f"{type(exc).__name__}: {_reason(exc)}")
    result.model = model
    result.model_version = version or result.model_version
    result.device = device
    result.study_instance_uid = volume.study_instance_uid
    result.series_instance_uid = volume.series_instance_uid
    result.source_sop_instance_uids = list(volume.sop_instance_uids)
    timings["total"] = _now() - started
    result.timings = {k: round(v, 4) for k, v in timings.items()}
    result.seconds = round(timings["total"], 4)
    return result


_MODEL_NAMES = {"classical": "ct-triage-classical", "hybrid": "ct-triage-hybrid", "unet": "ct-triage-unet3d"}


def _default_model(settings: Settings) -> str:
    """The model name a result carries when it failed before a scorer was built."""
    kind = (getattr(settings, "scorer", "hybrid") or "hybrid").lower()
    return _MODEL_NAMES.get(kind, _MODEL_NAMES["hybrid"])


def measure(volume: Volume, seg: Segmentation, settings: Settings) -> ScoreResult:
    """Volumes, % involvement, category, lesion count and boxes from a segmentation."""
    from scipy import ndimage

    lung, left, lesion = seg.lung, seg.left, seg.lesion & seg.lung
    left = left & lung
    vml = seg.voxel_volume_ml
    n_lung, n_left = int(lung.sum()), int(left.sum())
    n_right = n_lung - n_left
    n_les = int(lesion.sum())
    n_les_left = int((lesion & left).sum())
    n_les_right = n_les - n_les_left
    lung_ml = n_lung * vml
    if lung_ml < MIN_LUNG_ML:
        raise NotApplicable(
            f"lungs found are only {lung_ml:.0f} ml (not a chest CT, or the lungs are outside "
            "the field of view)"
        )

    def pct(a: int, b: int) -> float | None:
        return round(100.0 * a / b, 2) if b > 0 else None

    total = 100.0 * n_les / n_lung
    category = category_for(min(max(total, 0.0), 100.0), settings.noise_floor_percent)
    count, boxes = 0, []
    if n_les:
        # label only the lesions' bounding box (much smaller than the volume)
        box = tuple(_extent(lesion, axis) for axis in range(3))
        sub, sub_left = lesion[box], left[box]
        _, count = ndimage.label(sub, structure=np.ones((3, 3, 3), dtype=bool))
        offset = tuple(sl.start for sl in box)
        min_pixels = max(1, int(round(MIN_BOX_MM2 / (seg.spacing_mm[1] * seg.spacing_mm[2]))))
        boxes = lesion_boxes(sub, sub_left, seg.factor, seg.original_shape,
                             volume.sop_instance_uids, offset=offset, min_pixels=min_pixels)
    return ScoreResult(
        status="scored",
        category=category,
        involvement_percent=round(total, 2),
        involvement_percent_left=pct(n_les_left, n_left),
        involvement_percent_right=pct(n_les_right, n_right),
        lung_volume_ml=round(lung_ml, 1),
        lung_volume_left_ml=round(n_left * vml, 1),
        lung_volume_right_ml=round(n_right * vml, 1),
        lesion_volume_ml=round(n_les * vml, 1),
        lesion_count=int(count),
        boxes=boxes,
        **_masses(seg),
    )


def _masses(seg: Segmentation) -> dict:
    """The result's mass fields (``worker.scoring.masses``) when the scorer looked for masses."""
    if seg.mass is None:
        return {}
    from scipy import ndimage

    n = int(seg.mass.sum())
    count = int(ndimage.label(seg.mass, structure=np.ones((3, 3, 3), dtype=bool))[1]) if n else 0
    return {"mass_volume_ml": round(n * seg.voxel_volume_ml, 1), "mass_count": count,
            "mass_excluded": bool(seg.mass_excluded)}


def _extent(mask: np.ndarray, axis: int) -> slice:
    other = tuple(a for a in range(mask.ndim) if a != axis)
    idx = np.flatnonzero(mask.any(axis=other))
    return slice(int(idx[0]), int(idx[-1]) + 1)


def lesion_boxes(lesion: np.ndarray, left: np.ndarray, factor: tuple[int, int, int],
                 original_shape: tuple[int, int, int], sop_instance_uids: Sequence[str],
                 offset: tuple[int, int, int] = (0, 0, 0), min_pixels: int = 1) -> list[LesionBox]:
    """Boxes of the in-plane (8-connected) lesion components of every original slice.

    ``lesion``/``left`` are working-grid masks (or a sub-block of them starting at
    ``offset``); a working voxel covers ``factor`` original voxels. Pieces smaller than
    ``min_pixels`` working pixels get no box. The lung side of a box is the side of
    most of its pixels.
    """
    from scipy import ndimage

    fz, fy, fx = factor
    oz, oy, ox = offset
    zo, ro, co = original_shape
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True
    labels, n = ndimage.label(lesion, structure=structure)
    if n == 0:
        return []
    flat = labels.ravel()
    size = np.bincount(flat, minlength=n + 1)
    n_left = np.bincount(flat, weights=left.ravel().astype(np.float64), minlength=n + 1)
    boxes: list[LesionBox] = []
    for index, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None or size[index] < min_pixels:
            continue
        zw = sl[0].start + oz
        r0, r1 = (sl[1].start + oy) * fy, min((sl[1].stop + oy) * fy, ro) - 1
        c0, c1 = (sl[2].start + ox) * fx, min((sl[2].stop + ox) * fx, co) - 1
        side: Literal["left", "right"] = "left" if n_left[index] * 2 >= size[index] else "right"
        for k in range(zw * fz, min((zw + 1) * fz, zo)):
            uid = sop_instance_uids[k] if k < len(sop_instance_uids) else ""
            boxes.append(LesionBox(slice_index=k, sop_instance_uid=uid, row_min=int(r0),
                                   col_min=int(c0), row_max=int(r1), col_max=int(c1), lung=side))
    boxes.sort(key=lambda b: (b.slice_index, b.row_min, b.col_min))
    return boxes


def score_study(series_files: Mapping[str, Sequence[Path]], settings: Settings, *,
                scorer: Scorer | None = None) -> ScoreResult:
    """Read the headers of every series, select one by the rules, load it and score it."""
    started = _now()
    timings: dict[str, float] = {}
    try:
        import pydicom

        t = _now()
        headers: dict[str, list] = {}
        unreadable: list[str] = []
        for uid, paths in series_files.items():
            for path in paths:
                try:
                    ds = pydicom.dcmread(path, stop_before_pixels=True)
                except Exception as exc:  # any unreadable file is reported
                    unreadable.append(f"{Path(path).name}: {type(exc).__name__}")
                    continue
                ds.filename = str(path)
                headers.setdefault(str(uid), []).append(ds)
        timings["read_headers"] = _now() - t
        if not headers:
            detail = f" ({'; '.join(unreadable[:3])})" if unreadable else ""
            raise InvalidInput(f"no readable DICOM headers in the study{detail}")
    except Exception as exc:  # any failure here is reported (status and reason), never raised
        return _failed(started, timings, exc, settings, None, "reading the study failed")
    return score_headers(headers, settings, scorer=scorer, timings=timings, started=started)


def score_headers(headers: Mapping[str, Sequence], settings: Settings, *, scorer: Scorer | None = None,
                  timings: dict[str, float] | None = None, started: float | None = None) -> ScoreResult:
    """Select a series among ``headers`` (SeriesInstanceUID -> datasets read without
    pixels, each with ``filename``), load it and score it. Never raises for bad input."""
    started = _now() if started is None else started
    timings = dict(timings or {})
    chosen: str | None = None
    try:
        from worker.scoring.select import SelectionRules, select_series

        t = _now()
        selection = select_series(headers, SelectionRules.from_settings(settings))
        timings["select"] = _now() - t
        chosen = selection.series_instance_uid
        if chosen is None:
            raise NotApplicable(selection.reason or "no series of the study can be scored")
        t = _now()
        paths = [Path(ds.filename) for ds in headers[chosen]]
        from worker.scoring.load import load_series

        volume = load_series(paths, min_slices=settings.min_slices)
        timings["load"] = _now() - t
    except NotApplicable as exc:
        return _early(started, timings, "not_applicable", exc, settings, chosen)
    except MemoryError as exc:
        return _early(started, timings, "failed", exc, settings, chosen)
    except Exception as exc:  # any failure here is reported (status and reason), never raised
        return _failed(started, timings, exc, settings, chosen, "loading the series failed")
    return score_volume(volume, settings, scorer=scorer, timings=timings, started=started)


def _failed(started: float, timings: dict, exc: Exception, settings: Settings, series_uid: str | None,
            doing: str) -> ScoreResult:
    """A failed result: our own errors with their message; anything else logged with its
    traceback (``doing`` says what failed) and its reason prefixed with its type."""
    if isinstance(exc, CtTriageError):
        return _early(started, timings, "failed", exc, settings, series_uid)
    log.exception(doing)
    return _early(started, timings, "failed", exc, settings, series_uid, with_type=True)


def _early(started: float, timings: dict, status: Status, exc: BaseException, settings: Settings,
           series_uid: str | None, with_type: bool = False) -> ScoreResult:
    reason = _reason(exc) if not isinstance(exc, MemoryError) else "out of memory while loading"
    if with_type:
        reason = f"{type(exc).__name__}: {reason}"
    timings = dict(timings)
    timings["total"] = _now() - started
    return ScoreResult(
        status=status, reason=reason, model=_default_model(settings),
        series_instance_uid=series_uid, seconds=round(timings["total"], 4),
        timings={k: round(v, 4) for k, v in timings.items()}, device="cpu",
    )


def _is_nifti(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def score_path(path: str | Path, settings: Settings, *, scorer: Scorer | None = None) -> ScoreResult:
    """Score a DICOM folder (all series under it; one is selected), a DICOM file, or a
    NIfTI file."""
    started = _now()
    path = Path(path)
    timings: dict[str, float] = {}
    try:
        if not path.exists():
            raise InvalidInput(f"{path} does not exist")
        if path.is_file() and _is_nifti(path):
            from worker.scoring.load import load_nifti

            t = _now()
            volume = load_nifti(path)
            timings["load"] = _now() - t
            return score_volume(volume, settings, scorer=scorer, timings=timings, started=started)
        if path.is_dir():
            from worker.scoring.load import read_series_headers

            t = _now()
            headers = read_series_headers(path)
            timings["read_headers"] = _now() - t
            if not headers:
                raise NotApplicable(f"no DICOM series found under {path}")
            studies = {str(ds.get("StudyInstanceUID", "")) for hs in headers.values() for ds in hs}
            if len(studies) > 1:
                raise InvalidInput(f"{path} holds {len(studies)} studies; score one study's folder at a time")
        else:
            try:
                import pydicom

                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except Exception as exc:  # any reader error means: not a DICOM file we can read
                raise InvalidInput(f"{path}: neither NIfTI nor a readable DICOM file ({exc})") from exc
            ds.filename = str(path)
            headers = {str(ds.get("SeriesInstanceUID", "(file)")): [ds]}
    except NotApplicable as exc:
        return _early(started, timings, "not_applicable", exc, settings, None)
    except CtTriageError as exc:
        return _early(started, timings, "failed", exc, settings, None)
    except Exception as exc:  # any failure here is reported (status and reason), never raised
        log.exception("reading %s failed", path)
        return _early(started, timings, "failed", exc, settings, None, with_type=True)
    return score_headers(headers, settings, scorer=scorer, timings=timings, started=started)
