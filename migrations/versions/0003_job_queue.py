"""jobs.queue: the queue a job was sent to, so a worker starts the fairest job of its own queue

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 08:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # NULL for jobs created before: a worker still starts them from their own message.
    op.add_column("jobs", sa.Column("queue", sa.String(length=255), nullable=True))
    op.create_index(op.f("ix_jobs_queue_status"), "jobs", ["queue", "status"])


def downgrade() -> None:
    op.drop_index(op.f("ix_jobs_queue_status"), table_name="jobs")
    op.drop_column("jobs", "queue")
