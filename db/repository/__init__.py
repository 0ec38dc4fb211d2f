"""Every state change and query of series, jobs, results and deliveries, one module per state machine.

The node and the workers change rows only through these functions; each checks the
state machine of :mod:`db.states` (the transition tables are there, and only there).
Functions take an open ``Session`` and never commit: the caller owns the transaction
(and publishes tasks only after its commit). Policy that needs more than the database
(is a worker process still alive? how long to wait before a retry?) stays with the
caller and is passed in.

- :mod:`db.repository.ingest`: patients, studies, series, instances; the series states.
- :mod:`db.repository.jobs`: scoring jobs, their claims and the files they read.
- :mod:`db.repository.results`: results and their stored output files.
- :mod:`db.repository.outbox`: deliveries (C-STORE, HL7) and the publish sweeps.
- :mod:`db.repository.status`: what ``status``, the page and the metrics read.
- :mod:`db.repository.retention`: expired files.
- The worklist (UPS workitems, subscriptions) is :mod:`db.worklist`; follow-up rows
  (priors, comparisons, prior searches) are :mod:`db.followup`.

Callers use ``from db import repository`` and ``repository.<function>``: this package
re-exports the public functions of its modules, so a caller does not need to know
which state machine a function belongs to.
"""

from db.repository.ingest import (
    InstanceRecord,
    StoreOutcome,
    count_duplicate,
    find_instance,
    geometry_flags,
    indexed_paths,
    lock_study_series,
    mark_stable,
    record_instance,
    record_instances,
    record_rejection,
    settle_quiet_series,
    stored_sop_instance_uids,
    transition,
)
from db.repository.jobs import (
    claim_job,
    create_due_job,
    create_due_jobs,
    due_study_ids,
    finish_job,
    get_job,
    instance_paths,
    mark_published,
    next_queued_job_id,
    release_job,
    requeue_abandoned_jobs,
    series_files,
    take_over_job,
    unpublished_job_ids,
)
from db.repository.outbox import (
    add_deliveries,
    align_destination_retries,
    claim_delivery,
    deliveries_ahead,
    delivery_result,
    due_delivery_ids,
    finish_delivery,
    get_delivery,
    mark_delivery_published,
    release_claims,
    start_delivery,
    unpublish_lost_work,
    unpublished_delivery_ids,
    unpublished_outbox_ids,
)
from db.repository.results import (
    add_result,
    forget_output_files,
    record_output_files,
    result_exists,
    stored_output_files,
)
from db.repository.retention import ExpiredFile, expired_files, mark_files_deleted
from db.repository.status import (
    ResultStatusRow,
    SeriesStatusRow,
    StorageCounts,
    counts,
    result_status,
    series_status,
    storage_counts,
)
from db.states import InvalidStateChange

__all__ = [
    "ExpiredFile", "InstanceRecord", "InvalidStateChange", "ResultStatusRow", "SeriesStatusRow", "StorageCounts",
    "StoreOutcome", "add_deliveries", "add_result", "align_destination_retries", "claim_delivery", "claim_job",
    "count_duplicate", "counts", "create_due_job", "create_due_jobs", "deliveries_ahead", "delivery_result",
    "due_delivery_ids", "due_study_ids", "expired_files", "find_instance", "finish_delivery", "finish_job",
    "forget_output_files", "geometry_flags", "get_delivery", "get_job", "indexed_paths", "instance_paths",
    "lock_study_series", "mark_delivery_published", "mark_files_deleted", "mark_published", "mark_stable",
    "next_queued_job_id", "record_instance", "record_instances", "record_output_files", "record_rejection",
    "release_claims", "release_job", "requeue_abandoned_jobs", "result_exists", "result_status", "series_files",
    "series_status", "settle_quiet_series", "start_delivery", "storage_counts", "stored_output_files",
    "stored_sop_instance_uids", "take_over_job", "transition", "unpublish_lost_work", "unpublished_delivery_ids",
    "unpublished_job_ids", "unpublished_outbox_ids",
]
