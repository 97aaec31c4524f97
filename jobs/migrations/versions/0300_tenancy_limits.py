"""Tenancy, quotas and limits (filled by the security work)

Revision ID: 0300
Revises: 0200
"""

from __future__ import annotations

revision = '0300'
down_revision = '0200'
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
