"""The output step: a result's SR, SEG and SC series, built once and stored, then sent many times.

Build once, send many (issue 9): the first delivery of a result builds the objects
(:mod:`worker.outputs`) from the scored series' instances and the stored masks, writes
them durably and records them (``stored_outputs`` rows); retries and other destinations
reuse the files. The build is deterministic, so a rebuild (files wiped by hand) gives
identical bytes.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from sqlalchemy.orm import Session

from ct_triage.settings import Settings
from db import repository
from db.models import Result
from db.session import session_scope
from worker.scoring.result import ScoreResult
from worker.tasks.context import WorkerContext

log = logging.getLogger("ct_triage.worker")


def load_result(session: Session, result: Result):
    return ScoreResult.from_json(json.loads(result.result_json))


def source_datasets(session: Session, result: Result, score, storage_dir: Path) -> list:
    """The scored series' instances, full, in the order the result refers to them."""
    from pydicom import dcmread

    by_uid = repository.instance_paths(session, result.series_fk)
    order = score.source_sop_instance_uids or sorted(by_uid)
    missing = [uid for uid in order if uid not in by_uid]
    if missing:
        raise ValueError(f"{len(missing)} source instance(s) of result {result.id} are not stored")
    return [dcmread(storage_dir / by_uid[uid]) for uid in order]


def build_outputs(session: Session, result: Result, storage_dir: Path, settings: Settings | None = None) -> list:
    """SR, SEG and SC series of a result as ``(role, Dataset)``; deterministic, so a
    rebuild gives identical bytes. Reads the source instances and the stored masks."""
    from worker.outputs.stored import build_output_datasets
    from worker.scoring.masks import load_masks

    settings = settings or Settings()
    score = load_result(session, result)
    datasets = source_datasets(session, result, score, storage_dir)
    masks = None
    if result.masks_path:
        try:
            masks = load_masks(storage_dir / result.masks_path)
        except (OSError, ValueError) as exc:
            log.warning("result %d: stored masks unreadable, no SEG: %s", result.id, exc)
    return build_output_datasets(datasets, score, result.version, created_at=result.scored_at, masks=masks,
                                 sc_compression=settings.sc_compression, sc_max_slices=settings.sc_max_slices,
                                 seg_compression=settings.seg_compression, sr_max_lesions=settings.sr_max_lesions)


def stored_outputs(ctx: WorkerContext, result_id: int) -> list[Path]:
    """The result's output files in send order: built and stored on first use, then reused.

    Build once, send many (issue 9): the first call builds the SR, SEG and SC series,
    writes them durably and records them; later calls (retries, other destinations)
    return the recorded files without reading any source. Files recorded but gone
    (storage wiped by hand) are rebuilt.
    """
    from worker.outputs.stored import result_folder, write_outputs

    storage_dir = ctx.settings.effective_storage_dir
    with session_scope(ctx.session_factory) as session:
        files = repository.stored_output_files(session, result_id)
        if files is not None:
            paths = [storage_dir / f.path for f in files]
            if all(p.is_file() for p in paths):
                return paths
            log.warning("result %d: %d stored output file(s) missing, rebuilding", result_id,
                        sum(not p.is_file() for p in paths))
            repository.forget_output_files(session, result_id)
    started = time.monotonic()
    with session_scope(ctx.session_factory) as session:
        result = session.get_one(Result, result_id)
        items = build_outputs(session, result, storage_dir, ctx.settings)
        folder = result_folder(result.study.study_instance_uid, result.version)
    written = write_outputs(storage_dir, folder, items)
    with session_scope(ctx.session_factory) as session:
        recorded = repository.record_output_files(session, result_id, [vars(f) for f in written])
    log.info("result %d: built %d output instance(s), %.1f MB, in %.2f s%s", result_id, len(written),
             sum(f.size_bytes for f in written) / 1e6, time.monotonic() - started,
             "" if recorded else " (another worker recorded them first)")
    return [storage_dir / f.path for f in written]


