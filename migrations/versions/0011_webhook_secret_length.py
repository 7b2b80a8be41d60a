"""webhook_endpoints.secret and previous_secret: room for a sealed secret (`fernet:<token>`)

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-30 16:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | Sequence[str] | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    for column in ("secret", "previous_secret"):
        op.alter_column(
            "webhook_endpoints", column, type_=sa.String(length=512), existing_type=sa.String(length=128)
        )


def downgrade() -> None:
    for column in ("secret", "previous_secret"):
        op.alter_column(
            "webhook_endpoints", column, type_=sa.String(length=128), existing_type=sa.String(length=512)
        )
