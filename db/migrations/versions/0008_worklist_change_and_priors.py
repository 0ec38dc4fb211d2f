"""worklist view: the change since the patient's prior, and retrieved priors left out (issue 12)

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30 11:30:00

The `worklist` view of 0003 gains one column at the end, ``change_since_prior``:
``progression`` when any comparison of the row's result met the progression rule, else the
trend (worsening | stable | improvement) against the most recent prior, NULL when the
result was not compared. Studies that ct-triage retrieved from a PACS only *as priors*
(``prior_studies``) are scored, but never on a worklist: the view leaves them out.
The body of 0003 is reused as it stands (same columns, same dialect expressions).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

CHANGE = """CASE
    WHEN EXISTS (SELECT 1 FROM comparisons c WHERE c.result_fk = w.result_id AND c.progression)
      THEN 'progression'
    ELSE (SELECT c.trend FROM comparisons c WHERE c.result_fk = w.result_id
          ORDER BY c.prior_acquired_at DESC LIMIT 1)
  END"""


def _worklist_0003(dialect_name: str) -> str:
    path = Path(__file__).with_name("0003_dashboard_views.py")
    spec = importlib.util.spec_from_file_location("ct_triage_migration_0003", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.view_sql(dialect_name)["worklist"].strip()


def worklist_sql(dialect_name: str) -> str:
    body, _, order = _worklist_0003(dialect_name).rpartition("ORDER BY")
    return (f"SELECT w.*, {CHANGE} AS change_since_prior\n"
            f"FROM ({body.strip()}) w\n"
            "WHERE NOT EXISTS (SELECT 1 FROM prior_studies p WHERE p.study_instance_uid = w.study_instance_uid)\n"
            f"ORDER BY {order.strip()}")


def upgrade() -> None:
    op.execute(sa.text("DROP VIEW IF EXISTS worklist"))
    op.execute(sa.text(f"CREATE VIEW worklist AS {worklist_sql(op.get_bind().dialect.name)}"))


def downgrade() -> None:
    op.execute(sa.text("DROP VIEW IF EXISTS worklist"))
    op.execute(sa.text(f"CREATE VIEW worklist AS {_worklist_0003(op.get_bind().dialect.name)}"))
