"""Backfill widget.color and make it NOT NULL.

A data migration and a schema change in one revision: both commit together on
each partition, or neither does.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 14:32:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.execute("UPDATE widget SET color = 'unpainted' WHERE color IS NULL")
    op.alter_column(
        "widget", "color", existing_type=sa.Text, nullable=False, server_default="unpainted"
    )


def downgrade() -> None:
    """Downgrade schema (the backfilled colours stay)."""
    op.alter_column("widget", "color", existing_type=sa.Text, nullable=True, server_default=None)
