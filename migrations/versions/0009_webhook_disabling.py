"""webhook_endpoints.consecutive_failures, disabled_at, disabled_reason: an endpoint that keeps failing is disabled

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30 15:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("webhook_endpoints", sa.Column("consecutive_failures", sa.Integer(), nullable=True))
    op.add_column("webhook_endpoints", sa.Column("disabled_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("webhook_endpoints", sa.Column("disabled_reason", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("webhook_endpoints", "disabled_reason")
    op.drop_column("webhook_endpoints", "disabled_at")
    op.drop_column("webhook_endpoints", "consecutive_failures")
