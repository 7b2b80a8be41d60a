"""jobs.parent_job_id and jobs.parent_step: a job that continues an earlier job's checkpoint

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 14:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("parent_job_id", sa.Uuid(), nullable=True))
    op.add_column("jobs", sa.Column("parent_step", sa.Integer(), nullable=True))
    op.create_foreign_key(
        op.f("fk_jobs_parent_job_id_jobs"), "jobs", "jobs", ["parent_job_id"], ["id"], ondelete="SET NULL"
    )


def downgrade() -> None:
    op.drop_constraint(op.f("fk_jobs_parent_job_id_jobs"), "jobs", type_="foreignkey")
    op.drop_column("jobs", "parent_step")
    op.drop_column("jobs", "parent_job_id")
