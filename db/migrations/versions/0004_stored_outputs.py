"""stored outputs: result masks and built output files (build once, send many)

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 09:30:00
"""

from alembic import op
import sqlalchemy as sa
import db.types


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('results', schema=None) as batch_op:
        batch_op.add_column(sa.Column('masks_path', sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column('outputs_built_at', db.types.UTCDateTime(), nullable=True))

    op.create_table('output_files',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('result_fk', sa.Integer(), nullable=False),
    sa.Column('role', sa.String(length=8), nullable=False),
    sa.Column('send_order', sa.Integer(), nullable=False),
    sa.Column('sop_class_uid', sa.String(length=64), nullable=False),
    sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('path', sa.String(length=255), nullable=False),
    sa.Column('size_bytes', sa.Integer(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.ForeignKeyConstraint(['result_fk'], ['results.id'], name=op.f('fk_output_files_result_fk_results')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_output_files')),
    sa.UniqueConstraint('result_fk', 'sop_instance_uid', name='uq_output_files_result_sop')
    )
    with op.batch_alter_table('output_files', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_output_files_result_fk'), ['result_fk'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('output_files', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_output_files_result_fk'))
    op.drop_table('output_files')
    if op.get_bind().dialect.name == 'sqlite':
        # Native DROP COLUMN (SQLite >= 3.35): batch mode would recreate the table, which
        # breaks the views that select from it (0003).
        op.execute('ALTER TABLE results DROP COLUMN outputs_built_at')
        op.execute('ALTER TABLE results DROP COLUMN masks_path')
    else:
        with op.batch_alter_table('results', schema=None) as batch_op:
            batch_op.drop_column('outputs_built_at')
            batch_op.drop_column('masks_path')
