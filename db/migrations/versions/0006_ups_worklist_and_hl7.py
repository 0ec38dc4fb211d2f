"""UPS worklist (workitems, subscriptions, event outbox) and the delivery channel (dicom | hl7)

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 09:40:00

Tables (documented in docs/worklist.md):
- ups_workitems: one UPS workitem per result (study version); state SCHEDULED, IN PROGRESS,
  COMPLETED, CANCELED; priority/priority_rank/scheduled_at order the worklist;
  superseded_at is set when a newer study version replaced it.
- ups_subscriptions: UPS Watch subscriptions (workitem_fk NULL = global).
- ups_events: N-EVENT-REPORT outbox, one row per (event, subscriber AE).
- deliveries.channel: 'dicom' (C-STORE to a PACS) or 'hl7' (MLLP to a RIS).
"""

import sqlalchemy as sa
from alembic import op

import db.types

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'ups_workitems',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
        sa.Column('result_fk', sa.Integer(), nullable=False),
        sa.Column('study_fk', sa.Integer(), nullable=False),
        sa.Column('study_version', sa.Integer(), nullable=False),
        sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
        sa.Column('accession_number', sa.String(length=16), nullable=True),
        sa.Column('patient_id', sa.String(length=64), nullable=False),
        sa.Column('issuer_of_patient_id', sa.String(length=64), nullable=False),
        sa.Column('patient_name', sa.String(length=324), nullable=True),
        sa.Column('patient_birth_date', sa.String(length=8), nullable=True),
        sa.Column('patient_sex', sa.String(length=16), nullable=True),
        sa.Column('study_description', sa.String(length=64), nullable=True),
        sa.Column('priority', sa.String(length=8), nullable=False),
        sa.Column('priority_rank', sa.Integer(), nullable=False),
        sa.Column('category', sa.String(length=8), nullable=True),
        sa.Column('worklist_label', sa.String(length=64), nullable=False),
        sa.Column('procedure_step_label', sa.String(length=64), nullable=False),
        sa.Column('comments', sa.Text(), nullable=True),
        sa.Column('state', sa.String(length=16), nullable=False),
        sa.Column('transaction_uid', sa.String(length=64), nullable=True),
        sa.Column('performer_ae_title', sa.String(length=16), nullable=True),
        sa.Column('scheduled_at', db.types.UTCDateTime(), nullable=False),
        sa.Column('input_json', sa.Text(), nullable=False),
        sa.Column('progress_json', sa.Text(), nullable=True),
        sa.Column('performed_json', sa.Text(), nullable=True),
        sa.Column('cancel_reason', sa.Text(), nullable=True),
        sa.Column('created_at', db.types.UTCDateTime(), nullable=False),
        sa.Column('updated_at', db.types.UTCDateTime(), nullable=False),
        sa.Column('in_progress_at', db.types.UTCDateTime(), nullable=True),
        sa.Column('completed_at', db.types.UTCDateTime(), nullable=True),
        sa.Column('canceled_at', db.types.UTCDateTime(), nullable=True),
        sa.Column('superseded_at', db.types.UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(['result_fk'], ['results.id'], name=op.f('fk_ups_workitems_result_fk_results')),
        sa.ForeignKeyConstraint(['study_fk'], ['studies.id'], name=op.f('fk_ups_workitems_study_fk_studies')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_ups_workitems')),
        sa.UniqueConstraint('result_fk', name=op.f('uq_ups_workitems_result_fk')),
        sa.UniqueConstraint('sop_instance_uid', name=op.f('uq_ups_workitems_sop_instance_uid')),
    )
    with op.batch_alter_table('ups_workitems', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_ups_workitems_priority'), ['priority'], unique=False)
        batch_op.create_index(batch_op.f('ix_ups_workitems_study_fk'), ['study_fk'], unique=False)
        batch_op.create_index(batch_op.f('ix_ups_workitems_study_instance_uid'), ['study_instance_uid'],
                              unique=False)
        batch_op.create_index('ix_ups_workitems_worklist', ['state', 'priority_rank', 'scheduled_at'], unique=False)

    op.create_table(
        'ups_subscriptions',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('ae_title', sa.String(length=16), nullable=False),
        sa.Column('workitem_fk', sa.Integer(), nullable=True),
        sa.Column('deletion_lock', sa.Boolean(), nullable=False),
        sa.Column('created_at', db.types.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(['workitem_fk'], ['ups_workitems.id'],
                                name=op.f('fk_ups_subscriptions_workitem_fk_ups_workitems')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_ups_subscriptions')),
    )
    with op.batch_alter_table('ups_subscriptions', schema=None) as batch_op:
        batch_op.create_index('ix_ups_subscriptions_ae', ['ae_title', 'workitem_fk'], unique=False)

    op.create_table(
        'ups_events',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('workitem_fk', sa.Integer(), nullable=False),
        sa.Column('ae_title', sa.String(length=16), nullable=False),
        sa.Column('event_type', sa.Integer(), nullable=False),
        sa.Column('payload_json', sa.Text(), nullable=False),
        sa.Column('state', sa.String(length=16), nullable=False),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('next_attempt_at', db.types.UTCDateTime(), nullable=True),
        sa.Column('last_error', sa.Text(), nullable=True),
        sa.Column('created_at', db.types.UTCDateTime(), nullable=False),
        sa.Column('sent_at', db.types.UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(['workitem_fk'], ['ups_workitems.id'],
                                name=op.f('fk_ups_events_workitem_fk_ups_workitems')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_ups_events')),
    )
    with op.batch_alter_table('ups_events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_ups_events_workitem_fk'), ['workitem_fk'], unique=False)
        batch_op.create_index('ix_ups_events_state_next', ['state', 'next_attempt_at'], unique=False)

    # Plain ALTER TABLE (no batch table rebuild on SQLite): the dashboard views read deliveries.
    op.add_column('deliveries', sa.Column('channel', sa.String(length=8), nullable=False, server_default='dicom'))


def downgrade() -> None:
    # ALTER TABLE ... DROP COLUMN (SQLite >= 3.35, PostgreSQL), no table rebuild under the views.
    op.execute('ALTER TABLE deliveries DROP COLUMN channel')
    with op.batch_alter_table('ups_events', schema=None) as batch_op:
        batch_op.drop_index('ix_ups_events_state_next')
        batch_op.drop_index(batch_op.f('ix_ups_events_workitem_fk'))
    op.drop_table('ups_events')
    with op.batch_alter_table('ups_subscriptions', schema=None) as batch_op:
        batch_op.drop_index('ix_ups_subscriptions_ae')
    op.drop_table('ups_subscriptions')
    with op.batch_alter_table('ups_workitems', schema=None) as batch_op:
        batch_op.drop_index('ix_ups_workitems_worklist')
        batch_op.drop_index(batch_op.f('ix_ups_workitems_study_instance_uid'))
        batch_op.drop_index(batch_op.f('ix_ups_workitems_study_fk'))
        batch_op.drop_index(batch_op.f('ix_ups_workitems_priority'))
    op.drop_table('ups_workitems')
