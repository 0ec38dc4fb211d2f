"""workitem expiry: ups_workitems.expires_at (Scheduled Procedure Step Expiration DateTime)

Revision ID: 0010_expiry
Revises: 0009_audit
Create Date: 2026-12-07 14:00:00

One column and one index (documented in docs/worklist.md):
- ups_workitems.expires_at: when a SCHEDULED workitem that nobody claimed is cancelled by
  the node's expiry sweep (dicom_node.expiry), served as (0040,4008). New workitems get
  scheduled_at + CT_TRIAGE_WORKLIST_EXPIRY_H.
- Existing rows: SCHEDULED and IN PROGRESS ones get scheduled_at + 72 h (the setting's
  default; the migration cannot know a site's setting), so the months of history a
  worklist accumulated before this revision is cancelled by the first sweep after the
  upgrade, with the same reason and event reports as any expiry. Final (COMPLETED,
  CANCELED) rows keep NULL: they can no longer expire. NULL means "never expires".
- ix_ups_workitems_expiry (state, expires_at): the sweep's query.
"""

import sqlalchemy as sa
from alembic import op

import db.types

revision = '0010_expiry'
down_revision = '0009_audit'
branch_labels = None
depends_on = None

DEFAULT_EXPIRY_H = 72


def upgrade() -> None:
    with op.batch_alter_table('ups_workitems', schema=None) as batch_op:
        batch_op.add_column(sa.Column('expires_at', db.types.UTCDateTime(), nullable=True))
        batch_op.create_index('ix_ups_workitems_expiry', ['state', 'expires_at'], unique=False)
    bind = op.get_bind()
    items = sa.table('ups_workitems', sa.column('id', sa.Integer()), sa.column('state', sa.String()),
                     sa.column('scheduled_at', db.types.UTCDateTime()),
                     sa.column('expires_at', db.types.UTCDateTime()))
    if bind.dialect.name == 'postgresql':
        expires = items.c.scheduled_at + sa.literal_column(f"interval '{DEFAULT_EXPIRY_H} hours'", sa.Interval())
    else:  # SQLite keeps naive UTC as 'YYYY-MM-DD HH:MM:SS[.ffffff]' (db.types.UTCDateTime)
        expires = (sa.func.strftime('%Y-%m-%d %H:%M:%S', items.c.scheduled_at, f'+{DEFAULT_EXPIRY_H} hours')
                   .op('||')(sa.func.substr(items.c.scheduled_at, 20)))  # the fraction as stored
    bind.execute(items.update().where(items.c.state.in_(('SCHEDULED', 'IN PROGRESS')))
                 .values(expires_at=expires))


def downgrade() -> None:
    with op.batch_alter_table('ups_workitems', schema=None) as batch_op:
        batch_op.drop_index('ix_ups_workitems_expiry')
        batch_op.drop_column('expires_at')
