"""Schedule lifecycle: run-now, retries with backoff, health, which scheduler recorded a run

Revision ID: 0200
Revises: 0100
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0200'
down_revision = '0100'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('schedules', schema=None) as batch_op:
        batch_op.add_column(sa.Column('last_success_at', sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column('last_failure_at', sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column('last_outcome', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('consecutive_failures', sa.Integer(), nullable=False,
                                      server_default='0'))
        batch_op.add_column(sa.Column('run_requested_at', sa.DateTime(), nullable=True))
    with op.batch_alter_table('schedule_runs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('attempt', sa.Integer(), nullable=False, server_default='1'))
        batch_op.add_column(sa.Column('retry_of', sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column('retry_at', sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column('settled_at', sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column('scheduler', sa.String(length=200), nullable=True))
        batch_op.create_index('ix_schedule_runs_retry', ['retry_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('schedule_runs', schema=None) as batch_op:
        batch_op.drop_index('ix_schedule_runs_retry')
        for c in ('scheduler', 'settled_at', 'retry_at', 'retry_of', 'attempt'):
            batch_op.drop_column(c)
    with op.batch_alter_table('schedules', schema=None) as batch_op:
        for c in ('run_requested_at', 'consecutive_failures', 'last_outcome', 'last_failure_at',
                  'last_success_at'):
            batch_op.drop_column(c)
