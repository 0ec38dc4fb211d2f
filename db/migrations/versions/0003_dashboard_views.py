"""dashboard views: worklist, turnaround, throughput_hourly, category_mix_daily, failures, queue_depth

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 09:20:00

Read-only SQL views the worklist page, /metrics and the Grafana dashboard read
(docs/worklist.md lists every column).
The same columns and meaning on SQLite and PostgreSQL; only three expressions
differ per dialect and are generated here: seconds between two timestamps,
"now" in UTC, and truncation to the hour or the day. Timestamps in the tables
are naive UTC (db.types.UTCDateTime), so every difference is in UTC.

The SQL is frozen in this file on purpose: a later change to a view is a new
migration that drops and recreates it, so an old revision always means the same.
"""

from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

SCORE_TASK = "ct_triage.score_study"  # ct_triage.contract.SCORE_STUDY, frozen here
VIEWS = ("worklist", "turnaround", "throughput_hourly", "category_mix_daily", "failures", "queue_depth")


class _Dialect:
    """The few expressions that differ between SQLite and PostgreSQL."""

    def __init__(self, name: str):
        self.pg = name == "postgresql"

    def now(self) -> str:
        return "(now() AT TIME ZONE 'UTC')" if self.pg else "strftime('%Y-%m-%d %H:%M:%f', 'now')"

    def seconds(self, start: str, end: str) -> str:
        """``end - start`` in seconds (double, rounded to the millisecond); NULL when either is NULL."""
        if self.pg:
            return f"CAST(ROUND(EXTRACT(EPOCH FROM ({end} - {start})), 3) AS DOUBLE PRECISION)"
        return f"ROUND((julianday({end}) - julianday({start})) * 86400.0, 3)"

    def hour(self, ts: str) -> str:
        return f"date_trunc('hour', {ts})" if self.pg else f"strftime('%Y-%m-%d %H:00:00', {ts})"

    def day(self, ts: str) -> str:
        return f"date_trunc('day', {ts})" if self.pg else f"strftime('%Y-%m-%d 00:00:00', {ts})"


def view_sql(dialect_name: str) -> dict[str, str]:
    d = _Dialect(dialect_name)
    priority = "COALESCE(r.priority, 'MEDIUM')"
    return {
        # One row per study: its current version only (superseded versions never appear).
        "worklist": f"""
SELECT
  st.id AS study_id,
  st.study_instance_uid AS study_instance_uid,
  st.version AS version,
  st.accession_number AS accession_number,
  st.study_date AS study_date,
  st.study_description AS study_description,
  r.id AS result_id,
  {priority} AS priority,
  CASE {priority} WHEN 'HIGH' THEN 0 WHEN 'MEDIUM' THEN 1 ELSE 2 END AS priority_rank,
  r.status AS result_status,
  r.category AS category,
  r.involvement_percent AS involvement_percent,
  r.involvement_percent_left AS involvement_percent_left,
  r.involvement_percent_right AS involvement_percent_right,
  r.lesion_volume_ml AS lesion_volume_ml,
  CASE
    WHEN r.id IS NOT NULL AND r.status <> 'scored' THEN r.status
    WHEN r.id IS NOT NULL AND r.delivered_at IS NOT NULL THEN 'delivered'
    WHEN r.id IS NOT NULL AND EXISTS (SELECT 1 FROM deliveries d
                                      WHERE d.result_fk = r.id AND d.state = 'failed') THEN 'delivery_failed'
    WHEN r.id IS NOT NULL AND EXISTS (SELECT 1 FROM deliveries d WHERE d.result_fk = r.id) THEN 'delivering'
    WHEN r.id IS NOT NULL THEN 'scored'
    WHEN j.state = 'running' THEN 'scoring'
    WHEN j.state = 'queued' THEN 'queued'
    WHEN j.state = 'failed' THEN 'failed'
    WHEN EXISTS (SELECT 1 FROM series s WHERE s.study_fk = st.id AND s.state = 'receiving') THEN 'receiving'
    WHEN NOT EXISTS (SELECT 1 FROM series s
                     WHERE s.study_fk = st.id AND s.state <> 'not_applicable') THEN 'not_applicable'
    ELSE 'stable'
  END AS state,
  CASE
    WHEN r.id IS NOT NULL THEN r.reason
    WHEN j.state = 'failed' THEN j.error
    WHEN NOT EXISTS (SELECT 1 FROM series s
                     WHERE s.study_fk = st.id AND s.state <> 'not_applicable') THEN 'no series to score'
    ELSE 'not scored yet'
  END AS reason,
  r.model AS model,
  st.first_received_at AS arrived_at,
  st.last_received_at AS last_received_at,
  r.scored_at AS scored_at,
  r.delivered_at AS delivered_at,
  {d.seconds('st.first_received_at', d.now())} AS waiting_s
FROM studies st
LEFT JOIN results r ON r.study_fk = st.id AND r.version = st.version
LEFT JOIN jobs j ON j.study_fk = st.id AND j.study_version = st.version AND j.task_name = '{SCORE_TASK}'
ORDER BY priority_rank, arrived_at, study_id
""",
        # One row per result (every version: a re-scored study was measured twice).
        "turnaround": f"""
SELECT
  r.id AS result_id,
  st.study_instance_uid AS study_instance_uid,
  r.version AS version,
  CASE WHEN r.version = st.version THEN 0 ELSE 1 END AS superseded,
  r.status AS status,
  r.category AS category,
  r.priority AS priority,
  r.received_at AS received_at,
  r.stable_at AS stable_at,
  r.scoring_started_at AS scoring_started_at,
  r.scored_at AS scored_at,
  r.delivered_at AS delivered_at,
  {d.seconds('r.received_at', 'r.stable_at')} AS receive_to_stable_s,
  {d.seconds('r.stable_at', 'r.scoring_started_at')} AS queue_wait_s,
  {d.seconds('r.scoring_started_at', 'r.scored_at')} AS scoring_s,
  {d.seconds('r.scored_at', 'r.delivered_at')} AS delivery_s,
  {d.seconds('r.received_at', 'r.scored_at')} AS received_to_scored_s,
  {d.seconds('r.received_at', 'r.delivered_at')} AS received_to_delivered_s
FROM results r
JOIN studies st ON st.id = r.study_fk
""",
        "throughput_hourly": f"""
SELECT
  e.hour AS hour,
  SUM(CASE WHEN e.kind = 'received' THEN 1 ELSE 0 END) AS studies_received,
  SUM(CASE WHEN e.kind = 'scored' THEN 1 ELSE 0 END) AS studies_scored,
  SUM(CASE WHEN e.kind = 'failed' THEN 1 ELSE 0 END) AS studies_failed,
  SUM(CASE WHEN e.kind = 'not_applicable' THEN 1 ELSE 0 END) AS studies_not_applicable,
  SUM(CASE WHEN e.kind = 'delivered' THEN 1 ELSE 0 END) AS studies_delivered,
  SUM(CASE WHEN e.kind = 'instance' THEN 1 ELSE 0 END) AS instances_received,
  SUM(CASE WHEN e.kind = 'rejected' THEN 1 ELSE 0 END) AS instances_rejected
FROM (
  SELECT {d.hour('first_received_at')} AS hour, 'received' AS kind FROM studies
  UNION ALL
  SELECT {d.hour('scored_at')}, CASE status WHEN 'scored' THEN 'scored' WHEN 'failed' THEN 'failed'
                                ELSE 'not_applicable' END
  FROM results WHERE scored_at IS NOT NULL
  UNION ALL
  SELECT {d.hour('delivered_at')}, 'delivered' FROM results WHERE delivered_at IS NOT NULL
  UNION ALL
  SELECT {d.hour('received_at')}, 'instance' FROM instances
  UNION ALL
  SELECT {d.hour('received_at')}, 'rejected' FROM rejected_instances
) e
GROUP BY e.hour
""",
        # Current versions only: a re-scored study counts once, under its latest category.
        "category_mix_daily": f"""
SELECT
  {d.day('r.scored_at')} AS day,
  COALESCE(r.category, r.status) AS category,
  COUNT(*) AS studies
FROM results r
JOIN studies st ON st.id = r.study_fk AND r.version = st.version
WHERE r.scored_at IS NOT NULL
GROUP BY {d.day('r.scored_at')}, COALESCE(r.category, r.status)
""",
        "failures": """
SELECT
  ri.received_at AS at,
  'rejected_instance' AS kind,
  CAST(NULL AS VARCHAR(64)) AS study_instance_uid,
  CAST(NULL AS INTEGER) AS version,
  ri.calling_ae_title AS peer,
  CAST(NULL AS INTEGER) AS attempts,
  ri.status_code AS status_code,
  ri.reason AS reason
FROM rejected_instances ri
UNION ALL
SELECT
  COALESCE(j.finished_at, j.started_at, j.created_at),
  CASE WHEN j.state = 'failed' THEN 'job_failed' ELSE 'scoring_failed' END,
  st.study_instance_uid,
  j.study_version,
  j.worker,
  j.attempts,
  CAST(NULL AS INTEGER),
  j.error
FROM jobs j
JOIN studies st ON st.id = j.study_fk
WHERE j.state = 'failed' OR j.error IS NOT NULL
UNION ALL
SELECT
  COALESCE(d.next_attempt_at, d.created_at),
  CASE WHEN d.state = 'failed' THEN 'delivery_failed' ELSE 'delivery_retrying' END,
  st.study_instance_uid,
  r.version,
  d.destination,
  d.attempts,
  CAST(NULL AS INTEGER),
  d.last_error
FROM deliveries d
JOIN results r ON r.id = d.result_fk
JOIN studies st ON st.id = r.study_fk
WHERE d.state IN ('failed', 'retrying')
""",
        # What waits where, now: series not yet settled, scoring jobs, outbox rows.
        "queue_depth": f"""
SELECT 'series' AS queue, s.state AS state, COUNT(*) AS items,
       MIN(s.last_received_at) AS oldest_at,
       {d.seconds('MIN(s.last_received_at)', d.now())} AS oldest_waiting_s
FROM series s WHERE s.state IN ('receiving', 'stable') GROUP BY s.state
UNION ALL
SELECT 'scoring', j.state, COUNT(*), MIN(j.created_at), {d.seconds('MIN(j.created_at)', d.now())}
FROM jobs j WHERE j.state IN ('queued', 'running') GROUP BY j.state
UNION ALL
SELECT 'delivery', dl.state, COUNT(*), MIN(dl.created_at), {d.seconds('MIN(dl.created_at)', d.now())}
FROM deliveries dl WHERE dl.state IN ('pending', 'sending', 'retrying') GROUP BY dl.state
""",
    }


def upgrade() -> None:
    bind = op.get_bind()
    for name, body in view_sql(bind.dialect.name).items():
        op.execute(sa.text(f"DROP VIEW IF EXISTS {name}"))
        op.execute(sa.text(f"CREATE VIEW {name} AS {body.strip()}"))


def downgrade() -> None:
    for name in reversed(VIEWS):
        op.execute(sa.text(f"DROP VIEW IF EXISTS {name}"))
