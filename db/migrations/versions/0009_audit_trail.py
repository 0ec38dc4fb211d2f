"""audit trail: audit_events, the IHE ATNA / DICOM PS3.15 A.5 audit messages and their outbox

Revision ID: 0009_audit
Revises: 0008
Create Date: 2026-12-02 10:00:00

One table (documented in docs/audit.md):
- audit_events: one row per audit message (event id, type, action, outcome, time, user,
  source address, participant objects as JSON, the rendered XML); sent_at NULL until the
  audit repository took it, attempts / next_attempt_at / last_error for the sender's retries.
"""

import sqlalchemy as sa
from alembic import op

import db.types

revision = '0009_audit'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'audit_events',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('kind', sa.String(length=32), nullable=False),
        sa.Column('event_id', sa.String(length=16), nullable=False),
        sa.Column('event_type', sa.String(length=16), nullable=True),
        sa.Column('action', sa.String(length=1), nullable=True),
        sa.Column('outcome', sa.Integer(), nullable=False),
        sa.Column('event_at', db.types.UTCDateTime(), nullable=False),
        sa.Column('user_id', sa.String(length=128), nullable=True),
        sa.Column('source_address', sa.String(length=64), nullable=True),
        sa.Column('participants_json', sa.Text(), nullable=False),
        sa.Column('message_xml', sa.Text(), nullable=False),
        sa.Column('created_at', db.types.UTCDateTime(), nullable=False),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('next_attempt_at', db.types.UTCDateTime(), nullable=True),
        sa.Column('last_error', sa.Text(), nullable=True),
        sa.Column('sent_at', db.types.UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_events')),
    )
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_audit_events_event_at'), ['event_at'], unique=False)
        batch_op.create_index('ix_audit_events_unsent', ['sent_at', 'next_attempt_at'], unique=False)
        batch_op.create_index('ix_audit_events_user', ['kind', 'user_id', 'event_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.drop_index('ix_audit_events_user')
        batch_op.drop_index('ix_audit_events_unsent')
        batch_op.drop_index(batch_op.f('ix_audit_events_event_at'))
    op.drop_table('audit_events')
