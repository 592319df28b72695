"""Add widget.color and the widget_tag table.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 14:31:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.add_column("widget", sa.Column("color", sa.Text, nullable=True))
    op.create_table(
        "widget_tag",
        sa.Column(
            "widget_id",
            sa.BigInteger,
            sa.ForeignKey("widget.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("tag", sa.Text, primary_key=True),
    )
    op.create_index("ix_widget_tag_tag", "widget_tag", ["tag"])


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_index("ix_widget_tag_tag", table_name="widget_tag")
    op.drop_table("widget_tag")
    op.drop_column("widget", "color")
