"""follow-up studies: comparisons, prior searches, retrieved priors (issue 12)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 09:30:00
"""

from alembic import op
import sqlalchemy as sa
import db.types


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('comparisons',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('result_fk', sa.Integer(), nullable=False),
    sa.Column('prior_result_fk', sa.Integer(), nullable=False),
    sa.Column('prior_study_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('current_acquired_at', sa.String(length=26), nullable=True),
    sa.Column('prior_acquired_at', sa.String(length=26), nullable=True),
    sa.Column('hours', sa.Float(), nullable=True),
    sa.Column('prior_percent', sa.Float(), nullable=True),
    sa.Column('current_percent', sa.Float(), nullable=True),
    sa.Column('delta_points', sa.Float(), nullable=True),
    sa.Column('delta_points_left', sa.Float(), nullable=True),
    sa.Column('delta_points_right', sa.Float(), nullable=True),
    sa.Column('relative_percent', sa.Float(), nullable=True),
    sa.Column('relative_percent_left', sa.Float(), nullable=True),
    sa.Column('relative_percent_right', sa.Float(), nullable=True),
    sa.Column('delta_lesion_ml', sa.Float(), nullable=True),
    sa.Column('points_per_day', sa.Float(), nullable=True),
    sa.Column('trend', sa.String(length=16), nullable=False),
    sa.Column('progression', sa.Boolean(), nullable=False),
    sa.Column('differences', sa.Text(), nullable=True),
    sa.Column('created_at', db.types.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['result_fk'], ['results.id'], name=op.f('fk_comparisons_result_fk_results')),
    sa.ForeignKeyConstraint(['prior_result_fk'], ['results.id'], name=op.f('fk_comparisons_prior_result_fk_results')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_comparisons')),
    sa.UniqueConstraint('result_fk', 'prior_result_fk', name='uq_comparisons_result_prior')
    )
    with op.batch_alter_table('comparisons', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_comparisons_result_fk'), ['result_fk'], unique=False)

    op.create_table('prior_searches',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('study_fk', sa.Integer(), nullable=False),
    sa.Column('source', sa.String(length=128), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', db.types.UTCDateTime(), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('found', sa.Integer(), nullable=False),
    sa.Column('requested', sa.Integer(), nullable=False),
    sa.Column('worker', sa.String(length=128), nullable=True),
    sa.Column('created_at', db.types.UTCDateTime(), nullable=False),
    sa.Column('published_at', db.types.UTCDateTime(), nullable=True),
    sa.Column('finished_at', db.types.UTCDateTime(), nullable=True),
    sa.ForeignKeyConstraint(['study_fk'], ['studies.id'], name=op.f('fk_prior_searches_study_fk_studies')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_prior_searches')),
    sa.UniqueConstraint('study_fk', 'source', name='uq_prior_searches_study_source')
    )
    with op.batch_alter_table('prior_searches', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_prior_searches_study_fk'), ['study_fk'], unique=False)
        batch_op.create_index('ix_prior_searches_state_next', ['state', 'next_attempt_at'], unique=False)

    op.create_table('prior_studies',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('search_fk', sa.Integer(), nullable=True),
    sa.Column('source', sa.String(length=128), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('requested_at', db.types.UTCDateTime(), nullable=False),
    sa.Column('retrieved_at', db.types.UTCDateTime(), nullable=True),
    sa.ForeignKeyConstraint(['search_fk'], ['prior_searches.id'], name=op.f('fk_prior_studies_search_fk_prior_searches')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_prior_studies')),
    sa.UniqueConstraint('study_instance_uid', name=op.f('uq_prior_studies_study_instance_uid'))
    )


def downgrade() -> None:
    op.drop_table('prior_studies')
    with op.batch_alter_table('prior_searches', schema=None) as batch_op:
        batch_op.drop_index('ix_prior_searches_state_next')
        batch_op.drop_index(batch_op.f('ix_prior_searches_study_fk'))
    op.drop_table('prior_searches')
    with op.batch_alter_table('comparisons', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_comparisons_result_fk'))
    op.drop_table('comparisons')
