"""Schedule lifecycle: run-now, retries, health, spec/trigger changes (filled by the schedules work)

Revision ID: 0200
Revises: 0100
"""

from __future__ import annotations

revision = '0200'
down_revision = '0100'
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
