"""retention: deleted-at marks on instances and quarantined files

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

import db.types

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD/DROP COLUMN (SQLite >= 3.35 has both): a batch table rebuild would break the
    # dashboard views that read these tables.
    op.add_column('instances', sa.Column('deleted_at', db.types.UTCDateTime(), nullable=True))
    op.add_column('rejected_instances', sa.Column('quarantine_deleted_at', db.types.UTCDateTime(), nullable=True))


def downgrade() -> None:
    op.drop_column('rejected_instances', 'quarantine_deleted_at')
    op.drop_column('instances', 'deleted_at')
