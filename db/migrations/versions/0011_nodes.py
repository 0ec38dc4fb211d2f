"""nodes: the node processes sharing this database (several hosts, issue 18)

Revision ID: 0011_nodes
Revises: 0010_expiry
Create Date: 2027-01-11 10:00:00

One table (documented in docs/production.md, "Several hosts"):
- nodes: one row per node process (``ct-triage node``/``serve``): its CT_TRIAGE_NODE_ID (or host
  name), host, pid, when it started, its heartbeat (every 2 s), when it stopped, when a survivor
  recovered what it had acknowledged and not indexed (dicom_node.orphans), and the studies it is
  still receiving (busy_json), which the completeness tracker of the node holding that duty reads.
- ix_nodes_live (stopped_at, recovered_at): the survivors' look for dead nodes.
"""

import sqlalchemy as sa
from alembic import op

import db.types

revision = '0011_nodes'
down_revision = '0010_expiry'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'nodes',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('node_id', sa.String(length=128), nullable=False),
        sa.Column('host', sa.String(length=255), nullable=False),
        sa.Column('pid', sa.Integer(), nullable=False),
        sa.Column('started_at', db.types.UTCDateTime(), nullable=False),
        sa.Column('heartbeat_at', db.types.UTCDateTime(), nullable=False),
        sa.Column('stopped_at', db.types.UTCDateTime(), nullable=True),
        sa.Column('recovered_at', db.types.UTCDateTime(), nullable=True),
        sa.Column('busy_json', sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_nodes')),
    )
    with op.batch_alter_table('nodes', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_nodes_node_id'), ['node_id'], unique=False)
        batch_op.create_index('ix_nodes_live', ['stopped_at', 'recovered_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('nodes', schema=None) as batch_op:
        batch_op.drop_index('ix_nodes_live')
        batch_op.drop_index(batch_op.f('ix_nodes_node_id'))
    op.drop_table('nodes')
