"""Jobs by tenant and state: the per-tenant quota counts a tenant's active jobs on every submit and
scheduled run, and GET /v1/jobs?state= pages through one state newest first; without this index both
walked the tenant's whole job history

Revision ID: 0400
Revises: 0300
"""

from __future__ import annotations

from alembic import op

revision = '0400'
down_revision = '0300'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.create_index('ix_jobs_tenant_state', ['tenant', 'state', 'seq'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_tenant_state')
