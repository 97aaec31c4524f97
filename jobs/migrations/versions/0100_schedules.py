"""Schedules and their runs (cron / on-new-revision re-merges; times are naive UTC).

Revision ID: 0100
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0100'
down_revision = '0001'
branch_labels = None
depends_on = None

SEQ = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    op.create_table('schedules',
    sa.Column('seq', SEQ, autoincrement=True, nullable=False),
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('tenant', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=True),
    sa.Column('spec', sa.JSON(), nullable=False),
    sa.Column('trigger', sa.JSON(), nullable=False),
    sa.Column('catch_up', sa.String(length=8), nullable=False),
    sa.Column('tag_template', sa.String(length=200), nullable=True),
    sa.Column('paused', sa.Boolean(), nullable=False),
    sa.Column('next_due_at', sa.DateTime(), nullable=True),
    sa.Column('run_count', sa.Integer(), nullable=False),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('lease_owner', sa.String(length=200), nullable=True),
    sa.Column('lease_until', sa.DateTime(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('seq'),
    sa.UniqueConstraint('id')
    )
    with op.batch_alter_table('schedules', schema=None) as batch_op:
        batch_op.create_index('ix_schedules_due', ['paused', 'next_due_at'], unique=False)
        batch_op.create_index('ix_schedules_tenant_seq', ['tenant', 'seq'], unique=False)

    op.create_table('schedule_runs',
    sa.Column('seq', SEQ, autoincrement=True, nullable=False),
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('schedule_id', sa.String(length=40), nullable=False),
    sa.Column('run_key', sa.String(length=200), nullable=False),
    sa.Column('n', sa.Integer(), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('due_at', sa.DateTime(), nullable=False),
    sa.Column('inputs', sa.JSON(), nullable=False),
    sa.Column('changes', sa.JSON(), nullable=False),
    sa.Column('spec', sa.JSON(), nullable=True),
    sa.Column('tag', sa.String(length=200), nullable=True),
    sa.Column('job_id', sa.String(length=40), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['schedule_id'], ['schedules.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('seq'),
    sa.UniqueConstraint('id'),
    sa.UniqueConstraint('schedule_id', 'n', name='uq_schedule_runs_n'),
    sa.UniqueConstraint('schedule_id', 'run_key', name='uq_schedule_runs_key')
    )
    with op.batch_alter_table('schedule_runs', schema=None) as batch_op:
        batch_op.create_index('ix_schedule_runs_schedule_seq', ['schedule_id', 'seq'], unique=False)
        batch_op.create_index('ix_schedule_runs_status', ['status', 'created_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('schedule_runs', schema=None) as batch_op:
        batch_op.drop_index('ix_schedule_runs_status')
        batch_op.drop_index('ix_schedule_runs_schedule_seq')
    op.drop_table('schedule_runs')
    with op.batch_alter_table('schedules', schema=None) as batch_op:
        batch_op.drop_index('ix_schedules_tenant_seq')
        batch_op.drop_index('ix_schedules_due')
    op.drop_table('schedules')
