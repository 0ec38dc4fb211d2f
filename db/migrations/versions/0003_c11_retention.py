"""retention: deleted-at marks on instances and quarantined files

Revision ID: 0003_c11
Revises: 0004 (relinked after main's 0002 -> 0006 -> 0004)
"""

import sqlalchemy as sa
from alembic import op

import db.types

revision = '0003_c11'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('instances') as batch:
        batch.add_column(sa.Column('deleted_at', db.types.UTCDateTime(), nullable=True))
    with op.batch_alter_table('rejected_instances') as batch:
        batch.add_column(sa.Column('quarantine_deleted_at', db.types.UTCDateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('rejected_instances') as batch:
        batch.drop_column('quarantine_deleted_at')
    with op.batch_alter_table('instances') as batch:
        batch.drop_column('deleted_at')
