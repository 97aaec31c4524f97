"""Tenancy and limits: calibration sets found by content per tenant; deleted jobs kept as audit rows

Revision ID: 0300
Revises: 0200
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0300'
down_revision = '0200'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # not unique: sets uploaded before this revision may repeat content; new ones get an id derived
    # from (tenant, sha256), which the id's own unique constraint keeps single
    with op.batch_alter_table('calibration_sets', schema=None) as batch_op:
        batch_op.create_index('ix_calibration_sets_tenant_sha256', ['tenant', 'sha256'], unique=False)
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('deleted_at', sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('deleted_at')
    with op.batch_alter_table('calibration_sets', schema=None) as batch_op:
        batch_op.drop_index('ix_calibration_sets_tenant_sha256')
