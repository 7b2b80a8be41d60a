"""jobs.overall_progress and overall_eta_s: one progress figure and ETA for the whole job

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-30 17:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | Sequence[str] | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "jobs", sa.Column("overall_progress", sa.Float(), server_default=sa.text("0"), nullable=False)
    )
    op.add_column("jobs", sa.Column("overall_eta_s", sa.Float(), nullable=True))
    # A job that succeeded before the column existed is wholly done.
    op.execute("UPDATE jobs SET overall_progress = 1 WHERE status = 'succeeded'")


def downgrade() -> None:
    op.drop_column("jobs", "overall_eta_s")
    op.drop_column("jobs", "overall_progress")
